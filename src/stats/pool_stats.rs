//! `GET /api/pool/stats`: the seed's counters, hit and reuse rates, the effective config (no
//! secrets) and a per-destination breakdown. Zeros and `enabled: false` when the pool is off.

use std::time::{SystemTime, UNIX_EPOCH};

use hyper::{Response, StatusCode};
use serde_json::{json, Map, Value};

use super::pool_view::PoolView;
use super::query::DestinationsQuery;
use super::response::{self, Body};
use super::router::Shared;
use crate::config::{Config, SocksMethod};
use crate::pool::{DestStats, PoolStats};

pub(super) async fn handle(shared: &Shared, raw_query: Option<&str>) -> Response<Body> {
    let listing = match DestinationsQuery::parse(raw_query) {
        Ok(listing) => listing,
        Err(e) => {
            return response::error(
                StatusCode::BAD_REQUEST,
                e.to_string(),
                json!({ "parameter": e.parameter }),
            )
        }
    };
    let view = shared.pool.read().await;
    let (status, stats, problem) = match &view {
        PoolView::Up(stats) => (StatusCode::OK, (**stats).clone(), None),
        PoolView::Disabled => (StatusCode::OK, PoolStats::default(), None),
        // Zeros rather than a bare error, so a dashboard keeps its shape while the pool is slow.
        PoolView::Unavailable(why) => {
            (StatusCode::SERVICE_UNAVAILABLE, PoolStats::default(), Some(why.clone()))
        }
    };
    let config = &*shared.ctx.config.current();
    let mut body = match serde_json::to_value(&stats) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    body.insert("enabled".into(), json!(shared.pool.enabled()));
    body.insert("available".into(), json!(matches!(view, PoolView::Up(_))));
    if let Some(why) = problem {
        body.insert("error".into(), json!(why));
    }
    body.insert(
        "hit_rate".into(),
        json!(ratio(stats.pool_hits, stats.pool_hits + stats.pool_misses)),
    );
    body.insert("reuse_rate".into(), json!(ratio(stats.total_reused, stats.total_created)));
    let (listed, omitted) = per_destination(&stats, config, listing);
    body.insert("per_destination".into(), listed);
    body.insert("destinations_omitted".into(), json!(omitted));
    body.insert(
        "destinations_listing".into(),
        json!({
            "order": if listing.all { "name" } else { "busiest" },
            "offset": listing.offset,
            "limit": listing.limit,
        }),
    );
    body.insert("config".into(), effective_config(config, shared.ctx.telemetry.is_enabled()));
    body.insert("config_reload".into(), json!(*shared.ctx.config.status()));
    body.insert("server".into(), json!(shared.ctx.server_metrics.snapshot()));
    body.insert("stats_api".into(), json!(shared.tokens.counts()));
    body.insert("generated_at_ms".into(), json!(now_ms()));
    response::json(status, &Value::Object(body))
}

/// `part / whole`, and 0 when there is nothing to divide.
pub(super) fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Each listed destination's own fields, plus its idle limit and hit rate (what the dashboard
/// draws), and how many were left out. By default the busiest (checkout rate, then connections
/// held); with `destinations=all`, every one by name, a page at a time.
fn per_destination(
    stats: &PoolStats,
    config: &Config,
    listing: DestinationsQuery,
) -> (Value, usize) {
    let mut chosen: Vec<&DestStats> = stats.per_destination.iter().collect();
    if !listing.all {
        let held = |d: &DestStats| d.in_use as usize + d.idle;
        chosen.sort_by(|a, b| {
            b.refill
                .checkouts_per_sec
                .total_cmp(&a.refill.checkouts_per_sec)
                .then_with(|| held(b).cmp(&held(a)))
                .then_with(|| a.destination.cmp(&b.destination))
        });
    }
    let total = chosen.len();
    let page: Vec<&DestStats> =
        chosen.into_iter().skip(listing.offset).take(listing.limit).collect();
    let omitted = total - page.len();
    let rows = page.into_iter().map(|dest| {
        let mut row = match serde_json::to_value(dest) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        row.insert("limit".into(), json!(config.server.pool.max_idle_per_dest));
        row.insert(
            "hit_rate".into(),
            json!(ratio(dest.counters.hits, dest.counters.hits + dest.counters.misses)),
        );
        Value::Object(row)
    });
    (Value::Array(rows.collect()), omitted)
}

/// The settings in force, chosen field by field: passwords and the stats token never appear,
/// only whether they are set.
fn effective_config(config: &Config, telemetry_enabled: bool) -> Value {
    let pool = &config.server.pool;
    let sessions = &config.sessions;
    json!({
        "pool": {
            "enabled": pool.enabled,
            "max_idle_per_dest": pool.max_idle_per_dest,
            "max_total_idle": pool.max_total_idle,
            "idle_timeout_secs": pool.idle_timeout_secs,
            "connect_timeout_ms": pool.connect_timeout_ms,
        },
        "server": {
            "bind_address": config.server.bind_addr().to_string(),
            "max_connections": config.server.max_connections,
            "handshake_timeout_ms": config.server.handshake_timeout_ms,
            "shutdown_grace_secs": config.server.shutdown_grace_secs,
            "udp_associate": config.server.udp_associate,
            "bind": config.server.bind,
            "udp_idle_timeout_secs": config.server.udp_idle_timeout_secs,
            "bind_timeout_secs": config.server.bind_timeout_secs,
            "shutdown_delay_ms": config.server.shutdown_delay_ms,
            "proxy_protocol": config.server.proxy_protocol,
            "proxy_protocol_trusted": config.server.proxy_protocol_trusted.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "reuse_port": config.server.reuse_port,
        },
        "auth": {
            "socks_method": match config.auth.method() {
                SocksMethod::None => "none",
                SocksMethod::Userpass => "userpass",
            },
            "users": config.auth.users.len(),
        },
        "stats_api": {
            "bind_address": sessions.stats_api_addr().to_string(),
            "token_required": sessions.stats_api_token.is_some(),
        },
        "telemetry": {
            "enabled": telemetry_enabled,
            "max_events": config.telemetry.max_events,
            "retention_hours": config.telemetry.retention_hours,
        },
    })
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
