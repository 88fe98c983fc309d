//! `GET /health`: the process answers (liveness), and whether it is ready: the SOCKS listener
//! is listening and the pool's actors answer (or there is no pool). 200 when ready, else 503,
//! so a load balancer can use the status alone; the body says which check failed.

use hyper::{Response, StatusCode};
use serde_json::json;

use super::pool_view::PoolView;
use super::response::{self, Body};
use super::router::Shared;

pub(super) async fn handle(shared: &Shared) -> Response<Body> {
    let listening = shared.ctx.readiness.is_listening();
    let (pool_ok, pool_check) = match shared.pool.read().await {
        PoolView::Disabled => (true, json!({ "state": "disabled" })),
        PoolView::Up(_) => (true, json!({ "state": "up" })),
        PoolView::Unavailable(why) => (false, json!({ "state": "unresponsive", "error": why })),
    };
    let ready = listening && pool_ok;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    response::json(
        status,
        &json!({
            "status": if ready { "ready" } else { "not ready" },
            "live": true,
            "ready": ready,
            "checks": {
                "listener": { "state": if listening { "listening" } else { "not listening" } },
                "pool": pool_check,
            },
            "uptime_secs": shared.ctx.started.elapsed().as_secs(),
        }),
    )
}
