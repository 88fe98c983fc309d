//! `GET /api/telemetry/events`: the telemetry feed, newest first, filtered and bounded.

use hyper::{Response, StatusCode};
use serde_json::json;

use super::query::EventsQuery;
use super::response::{self, Body};
use super::router::Shared;

pub(super) fn handle(shared: &Shared, raw_query: Option<&str>) -> Response<Body> {
    let query = match EventsQuery::parse(raw_query) {
        Ok(query) => query,
        Err(e) => {
            return response::error(
                StatusCode::BAD_REQUEST,
                e.to_string(),
                json!({ "parameter": e.parameter }),
            )
        }
    };
    let telemetry = &shared.ctx.telemetry;
    let events = telemetry.query(&query.to_event_query());
    let (held, recorded) = telemetry.counts();
    response::json(
        StatusCode::OK,
        &json!({
            "enabled": telemetry.is_enabled(),
            "count": events.len(),
            "held": held,
            "recorded": recorded,
            "query": {
                "minutes": query.minutes,
                "limit": query.limit,
                "severity": query.severity,
                "category": query.category,
            },
            "events": events,
        }),
    )
}
