//! The optional stats token (`sessions.stats_api_token`).
//!
//! `Authorization: Bearer <token>` is the form for scripts and scrapers. A browser cannot send
//! a bearer token to open the dashboard, but it prompts for Basic credentials and then sends
//! them on the page's own requests, so `Basic` with the token as the password (any user name)
//! is accepted too. Both compare in constant time.

use base64::Engine;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::StatusCode;
use serde_json::json;

use super::response::{self, Body};
use crate::secret::Secret;

/// True when no token is configured or the request carries it.
pub(super) fn authorized(token: Option<&Secret>, headers: &HeaderMap) -> bool {
    let Some(token) = token else { return true };
    let Some(value) = headers.get(header::AUTHORIZATION) else { return false };
    let Some((scheme, credentials)) = value.as_bytes().split_first_chunk_at_space() else {
        return false;
    };
    let credentials = credentials.trim_ascii();
    if scheme.eq_ignore_ascii_case(b"bearer") {
        token.matches(credentials)
    } else if scheme.eq_ignore_ascii_case(b"basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return false;
        };
        // user:password, and the password is the token. User names are not checked.
        match decoded.iter().position(|&b| b == b':') {
            Some(colon) => token.matches(&decoded[colon + 1..]),
            None => false,
        }
    } else {
        false
    }
}

/// 401 with the challenges a client can answer: Basic makes a browser prompt, which is only
/// wanted for the dashboard page, not for API calls from scripts.
pub(super) fn unauthorized(is_page: bool) -> hyper::Response<Body> {
    let mut response = response::error(
        StatusCode::UNAUTHORIZED,
        "a valid stats token is required (Authorization: Bearer <token>)",
        json!({}),
    );
    let challenge = if is_page {
        "Bearer realm=\"poolsocks\", Basic realm=\"poolsocks\", charset=\"UTF-8\""
    } else {
        "Bearer realm=\"poolsocks\""
    };
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

trait SplitAtSpace {
    fn split_first_chunk_at_space(&self) -> Option<(&[u8], &[u8])>;
}

impl SplitAtSpace for [u8] {
    fn split_first_chunk_at_space(&self) -> Option<(&[u8], &[u8])> {
        let space = self.iter().position(|&b| b == b' ')?;
        Some((&self[..space], &self[space + 1..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn no_token_configured_lets_everyone_in() {
        assert!(authorized(None, &HeaderMap::new()));
    }

    #[test]
    fn bearer_and_basic_must_carry_the_exact_token() {
        let token = Secret::new("s3cret");
        assert!(authorized(Some(&token), &headers("Bearer s3cret")));
        assert!(authorized(Some(&token), &headers("bearer  s3cret ")));
        // "anyone:s3cret"
        assert!(authorized(Some(&token), &headers("Basic YW55b25lOnMzY3JldA==")));
        assert!(!authorized(Some(&token), &headers("Bearer s3cre")));
        assert!(!authorized(Some(&token), &headers("Bearer")));
        assert!(!authorized(Some(&token), &headers("Basic !!!")));
        assert!(!authorized(Some(&token), &headers("Token s3cret")));
        assert!(!authorized(Some(&token), &HeaderMap::new()));
    }
}
