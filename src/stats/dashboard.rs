//! `GET /`: the dashboard, one HTML file with its CSS, JS and SVG chart inline, compiled into
//! the binary so it needs no files, no CDN and no build step.

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::response::{self, Body};

const PAGE: &str = include_str!("dashboard.html");

/// Only inline code and same-origin requests: the page shows destination names that SOCKS
/// clients chose, and this keeps any mistake in escaping them from running anything.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

pub(super) fn page() -> Response<Body> {
    let mut response = response::with_body(StatusCode::OK, "text/html; charset=utf-8", PAGE);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}
