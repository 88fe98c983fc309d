//! Response builders shared by the handlers: JSON, errors, and the headers every answer has.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

pub(super) type Body = Full<Bytes>;

/// A response with `content_type`, never cached (every answer is a live figure).
pub(super) fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

pub(super) fn json(status: StatusCode, value: &Value) -> Response<Body> {
    // Serialising a `Value` cannot fail (its keys are strings); an empty object is a safe
    // answer should that ever change.
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    with_body(status, "application/json", body)
}

/// `{"error": message}` plus any extra fields.
pub(super) fn error(
    status: StatusCode,
    message: impl Into<String>,
    extra: Value,
) -> Response<Body> {
    let mut body = json!({ "error": message.into(), "status": status.as_u16() });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    json(status, &body)
}

pub(super) fn not_found(path: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "no such route",
        json!({ "path": path, "routes": super::router::ROUTE_PATHS }),
    )
}

pub(super) fn method_not_allowed(method: &hyper::Method, allow: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed here"),
        json!({ "allow": allow }),
    );
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}
