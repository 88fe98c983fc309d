//! Method and path dispatch, after the token check and the request-size check.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::context::StatsContext;
use super::pool_view::PoolReader;
use super::response::{self, Body};
use super::{auth, dashboard, events, health, metrics, pool_stats};

/// Every route, for the 404 answer and the docs.
pub(super) const ROUTE_PATHS: [&str; 5] =
    ["/", "/api/pool/stats", "/api/telemetry/events", "/metrics", "/health"];

/// Every route answers these; HEAD gets the headers without the body (hyper drops it).
const ALLOW: &str = "GET, HEAD";

/// What every connection's requests share.
pub(super) struct Shared {
    pub(super) ctx: StatsContext,
    pub(super) pool: PoolReader,
    pub(super) tokens: auth::TokenGuard,
}

impl Shared {
    pub(super) fn new(ctx: StatsContext) -> Self {
        let pool = PoolReader::new(
            ctx.pool.clone(),
            ctx.options.pool_call_timeout,
            ctx.options.pool_stats_ttl,
        );
        Shared { ctx, pool, tokens: auth::TokenGuard::default() }
    }
}

#[derive(Clone, Copy)]
enum Route {
    Dashboard,
    PoolStats,
    Events,
    Metrics,
    Health,
}

fn route_of(path: &str) -> Option<Route> {
    match path {
        "/" | "/index.html" => Some(Route::Dashboard),
        "/api/pool/stats" => Some(Route::PoolStats),
        "/api/telemetry/events" => Some(Route::Events),
        "/metrics" => Some(Route::Metrics),
        "/health" => Some(Route::Health),
        _ => None,
    }
}

/// Answers `request` from `peer` (whose address the token check counts guesses under).
pub(super) async fn handle(
    shared: &Shared,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let path = request.uri().path();
    let route = route_of(path);
    // `/health` tells liveness, readiness and uptime only, and a balancer's check (HAProxy's
    // `option httpchk GET /health`) carries no token. Every other path is checked before
    // routing, so without the token even the list of routes stays private.
    if !matches!(route, Some(Route::Health)) {
        let config = shared.ctx.config.current();
        let token = config.sessions.stats_api_token.as_ref();
        let is_page = matches!(route, Some(Route::Dashboard));
        if let Some(refused) = shared.tokens.refusal(token, request.headers(), peer.ip(), is_page) {
            return refused;
        }
    }
    if has_body(&request) {
        // No route takes a body; refusing it keeps a client from streaming data at us.
        let mut response = response::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the stats endpoint takes no request body",
            json!({}),
        );
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let Some(route) = route else { return response::not_found(path) };
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return response::method_not_allowed(request.method(), ALLOW);
    }
    let query = request.uri().query();
    match route {
        Route::Dashboard => dashboard::page(),
        Route::PoolStats => pool_stats::handle(shared, query).await,
        Route::Events => events::handle(shared, query),
        Route::Metrics => metrics::handle(shared).await,
        Route::Health => health::handle(shared).await,
    }
}

fn has_body(request: &Request<Incoming>) -> bool {
    let headers = request.headers();
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(0));
    declared_length || headers.contains_key(header::TRANSFER_ENCODING)
}
