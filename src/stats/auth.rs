//! The optional stats token (`sessions.stats_api_token`), and the limit on guessing it.
//!
//! `Authorization: Bearer <token>` is the form for scripts and scrapers. A browser cannot send
//! a bearer token to open the dashboard, but it prompts for Basic credentials and then sends
//! them on the page's own requests, so `Basic` with the token as the password (any user name)
//! is accepted too. Both compare in constant time. The header must be exactly
//! `scheme 1*SP credentials` (RFC 7235 2.1, RFC 6750 2.1, RFC 7617 2): the scheme in any case,
//! one or more spaces, then the credentials with no whitespace in or after them.
//!
//! Wrong tokens are counted per source address (an IPv6 /64) with the failed-login tracker:
//! after [`FAILURE_LIMIT`] within [`FAILURE_WINDOW`], the source gets 429 without its token
//! being compared until the window passes. A request without credentials is no guess and is
//! not counted. Wrong tokens and refusals are counted (`/api/pool/stats`, `/metrics`) and
//! logged at `warn` naming the source, at most once per [`LOG_INTERVAL`].

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::StatusCode;
use serde_json::json;
use tracing::warn;

use super::response::{self, Body};
use crate::secret::Secret;
use crate::server::login_limit::{LoginLimit, DEFAULT_CAPACITY};
use crate::throttle::Throttle;

/// Wrong tokens per source within [`FAILURE_WINDOW`] before it is refused.
const FAILURE_LIMIT: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// At most one log line about wrong tokens per this long.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a request's `Authorization` header amounts to against the configured token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credentials {
    Matched,
    /// No `Authorization` header: not a guess.
    Missing,
    Wrong,
}

fn credentials(token: &Secret, headers: &HeaderMap) -> Credentials {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Credentials::Missing };
    let value = value.as_bytes();
    let matched = if let Some(bearer) = after_scheme(value, b"bearer") {
        token.matches(bearer)
    } else if let Some(basic) = after_scheme(value, b"basic") {
        base64::engine::general_purpose::STANDARD.decode(basic).is_ok_and(|decoded| {
            // user:password, and the password is the token. User names are not checked.
            decoded
                .iter()
                .position(|&b| b == b':')
                .is_some_and(|colon| token.matches(&decoded[colon + 1..]))
        })
    } else {
        false
    };
    if matched {
        Credentials::Matched
    } else {
        Credentials::Wrong
    }
}

/// The credentials of `scheme 1*SP credentials` when the scheme is `scheme` (in any case);
/// `None` for another scheme, no space after it, or whitespace in the credentials.
fn after_scheme<'a>(value: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (name, rest) = value.split_at(space);
    if !name.eq_ignore_ascii_case(scheme) {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    let credentials = &rest[start..];
    (!credentials.iter().any(u8::is_ascii_whitespace)).then_some(credentials)
}

/// True when no token is configured or the request carries it.
#[cfg(test)]
fn authorized(token: Option<&Secret>, headers: &HeaderMap) -> bool {
    match token {
        None => true,
        Some(token) => credentials(token, headers) == Credentials::Matched,
    }
}

/// Checks the token of every request but `/health`, and refuses sources that guess.
pub(super) struct TokenGuard {
    failures: Arc<LoginLimit>,
    wrong: AtomicU64,
    rate_limited: AtomicU64,
    log: Mutex<Throttle>,
}

/// Counters of the token check, for `/api/pool/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(super) struct TokenCounts {
    /// Requests that carried credentials other than the token.
    pub(super) token_failures: u64,
    /// Requests refused with 429 because their source guessed too often.
    pub(super) token_rate_limited: u64,
}

impl Default for TokenGuard {
    fn default() -> Self {
        TokenGuard {
            failures: LoginLimit::new(FAILURE_LIMIT, FAILURE_WINDOW, DEFAULT_CAPACITY),
            wrong: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            log: Mutex::new(Throttle::new(LOG_INTERVAL)),
        }
    }
}

impl TokenGuard {
    /// `None` when no token is configured or the request from `client` carries it; else the
    /// answer: 429 for a source over the limit (its token is not compared), else 401.
    pub(super) fn refusal(
        &self,
        token: Option<&Secret>,
        headers: &HeaderMap,
        client: IpAddr,
        is_page: bool,
    ) -> Option<hyper::Response<Body>> {
        let token = token?;
        let Some(attempt) = self.failures.begin(client, Instant::now()) else {
            self.rate_limited.fetch_add(1, Relaxed);
            self.report(client, true);
            return Some(too_many_requests());
        };
        match credentials(token, headers) {
            Credentials::Matched => {
                attempt.succeeded();
                None
            }
            Credentials::Missing => {
                attempt.withdrawn();
                Some(unauthorized(is_page))
            }
            Credentials::Wrong => {
                attempt.failed();
                self.wrong.fetch_add(1, Relaxed);
                self.report(client, false);
                Some(unauthorized(is_page))
            }
        }
    }

    pub(super) fn counts(&self) -> TokenCounts {
        TokenCounts {
            token_failures: self.wrong.load(Relaxed),
            token_rate_limited: self.rate_limited.load(Relaxed),
        }
    }

    fn report(&self, client: IpAddr, limited: bool) {
        let allowed = self
            .log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .allow(tokio::time::Instant::now());
        let Some(held_back) = allowed else { return };
        if limited {
            warn!(
                %client,
                token_failures_not_logged = held_back,
                "stats endpoint: too many wrong tokens from this address; refused (429) for now"
            );
        } else {
            warn!(%client, token_failures_not_logged = held_back, "stats endpoint: wrong token");
        }
    }
}

/// 429 with how long the source's window lasts at most.
fn too_many_requests() -> hyper::Response<Body> {
    let mut response = response::error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many wrong stats tokens from this address; try again later",
        json!({}),
    );
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(FAILURE_WINDOW.as_secs()));
    response
}

/// 401 with the challenges a client can answer: Basic makes a browser prompt, which is only
/// wanted for the dashboard page, not for API calls from scripts.
fn unauthorized(is_page: bool) -> hyper::Response<Body> {
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
        // The scheme in any case (RFC 7235 2.1), then 1*SP.
        assert!(authorized(Some(&token), &headers("bEARER s3cret")));
        assert!(authorized(Some(&token), &headers("Bearer   s3cret")));
        // "anyone:s3cret"
        assert!(authorized(Some(&token), &headers("Basic YW55b25lOnMzY3JldA==")));
        assert!(authorized(Some(&token), &headers("BASIC  YW55b25lOnMzY3JldA==")));
        assert!(!authorized(Some(&token), &headers("Bearer s3cre")));
        assert!(!authorized(Some(&token), &headers("Bearer s3cret2")));
        // No whitespace around the token but the separating spaces; only SP separates.
        assert!(!authorized(Some(&token), &headers("Bearer s3cret ")));
        assert!(!authorized(Some(&token), &headers("Bearer s3cret\t")));
        assert!(!authorized(Some(&token), &headers("Bearer\ts3cret")));
        assert!(!authorized(Some(&token), &headers(" Bearer s3cret")));
        assert!(!authorized(Some(&token), &headers("Bearer s3cret extra")));
        assert!(!authorized(Some(&token), &headers("Basic YW55b25lOnMzY3JldA== ")));
        assert!(!authorized(Some(&token), &headers("Bearer")));
        assert!(!authorized(Some(&token), &headers("Bearer ")));
        assert!(!authorized(Some(&token), &headers("Bearers3cret")));
        assert!(!authorized(Some(&token), &headers("Basic !!!")));
        assert!(!authorized(Some(&token), &headers("Token s3cret")));
        assert!(!authorized(Some(&token), &HeaderMap::new()));
        // A token with a space in it can never be matched.
        let spaced = Secret::new("s3 cret");
        assert!(!authorized(Some(&spaced), &headers("Bearer s3 cret")));
    }

    #[test]
    fn a_source_that_guesses_gets_429_without_a_compare_and_others_are_not_affected() {
        let guard = TokenGuard::default();
        let token = Secret::new("s3cret");
        let guesser: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        // Requests without credentials are not guesses.
        for _ in 0..20 {
            let refused = guard.refusal(Some(&token), &HeaderMap::new(), guesser, false);
            assert_eq!(refused.map(|r| r.status()), Some(StatusCode::UNAUTHORIZED));
        }
        for _ in 0..FAILURE_LIMIT {
            let refused = guard.refusal(Some(&token), &headers("Bearer wrong"), guesser, false);
            assert_eq!(refused.map(|r| r.status()), Some(StatusCode::UNAUTHORIZED));
        }
        let limited = guard.refusal(Some(&token), &headers("Bearer s3cret"), guesser, false);
        assert_eq!(limited.map(|r| r.status()), Some(StatusCode::TOO_MANY_REQUESTS));
        assert!(guard.refusal(Some(&token), &headers("Bearer s3cret"), other, false).is_none());
        let counts = guard.counts();
        assert_eq!((counts.token_failures, counts.token_rate_limited), (10, 1));
        // Without a token configured nothing is checked or counted.
        assert!(guard.refusal(None, &headers("Bearer wrong"), guesser, false).is_none());
    }
}
