//! Which SOCKS method a client gets, the username/password check, and the per-address limit
//! on failed logins (see [`super::login_limit`]).
//!
//! What a login costs must not depend on who is asked about, nor be chosen by an attacker:
//! - **Bounded memory and threads.** An argon2 check takes its memory parameter in RAM (19 MiB
//!   by default) for a few tens of milliseconds. At most [`MAX_CONCURRENT_VERIFICATIONS`] run at
//!   once; the others wait for a place, and the wait counts against the handshake timeout.
//!   `main` keeps such blocks out of the allocator's arenas, so their memory goes back to the
//!   system when a check ends.
//! - **Strangers cannot starve known clients.** The places go first to sources that logged in
//!   before, and the line of waiting logins is bounded; a login the line has no room for is
//!   shed, answered as a failure at once (see [`super::verify_queue`]). The place is taken
//!   before the user is looked up, so being shed says nothing about the user.
//! - **The same cost for every miss.** When any user has an argon2 hash, every login runs one
//!   argon2 check with the most expensive parameters configured: a hashed user's own, or a
//!   decoy for an unknown user, and a decoy after the constant-time compare of a plain-password
//!   user. Unknown users, wrong plain passwords and wrong hashed passwords then look alike.
//!   (Hashed users with cheaper parameters than others remain distinguishable: a warning at
//!   start and on every reload names them.)
//! - **Counted before checked**: a place against the failure limit is taken first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};

use super::login_limit::{LoginLimit, DEFAULT_CAPACITY};
use super::verify_queue::{Place, Shed, VerifyQueue};
use crate::config::{AuthConfig, SocksMethod};
use crate::secret::Secret;
use crate::socks::{UserPassRequest, METHOD_NO_AUTH, METHOD_USERPASS};

/// argon2 checks running at once. Two cores here: more would only queue on the CPU while each
/// held its memory.
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 2;

/// How a configured password is held.
#[derive(Debug, Clone)]
enum Credential {
    Plain(Secret),
    /// An argon2 PHC string; verifying costs milliseconds of CPU, so it runs off the reactor.
    Hashed(Arc<Secret>),
}

impl Credential {
    fn from_secret(password: &Secret) -> Self {
        if password.expose().starts_with("$argon2") {
            Credential::Hashed(Arc::new(password.clone()))
        } else {
            Credential::Plain(password.clone())
        }
    }
}

/// The result of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    Accepted,
    Rejected,
    /// Too many recent failures (or attempts in flight) from this address: refused without
    /// checking the password.
    RateLimited,
    /// The line for argon2 checks had no room: refused without checking the password.
    Shed,
}

/// Counters of the login path, for the stats endpoint and tests.
#[derive(Debug, Default)]
pub struct AuthCounters {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Logins refused because the line for argon2 checks was full.
    pub shed: AtomicU64,
    /// argon2 checks run (real and decoy).
    pub argon2_checks: AtomicU64,
}

/// A snapshot of [`AuthCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuthCountersSnapshot {
    pub logins_accepted: u64,
    pub logins_rejected: u64,
    pub logins_rate_limited: u64,
    pub logins_shed: u64,
    pub argon2_checks: u64,
}

impl AuthCounters {
    pub fn snapshot(&self) -> AuthCountersSnapshot {
        AuthCountersSnapshot {
            logins_accepted: self.accepted.load(Relaxed),
            logins_rejected: self.rejected.load(Relaxed),
            logins_rate_limited: self.rate_limited.load(Relaxed),
            logins_shed: self.shed.load(Relaxed),
            argon2_checks: self.argon2_checks.load(Relaxed),
        }
    }
}

/// Runs argon2 checks on the blocking pool, a bounded number at a time.
#[derive(Debug)]
struct Verifier {
    /// Shared by the authenticators a reload builds, so the bound, the line and the known
    /// sources hold across a reload.
    queue: Arc<VerifyQueue>,
    counters: Arc<AuthCounters>,
}

impl Verifier {
    async fn verify(&self, place: Place, phc: Arc<Secret>, candidate: Secret) -> bool {
        self.counters.argon2_checks.fetch_add(1, Relaxed);
        tokio::task::spawn_blocking(move || {
            // The place goes with the check: a client that leaves mid-check does not free it
            // while the check still holds its memory.
            let _place = place;
            PasswordHash::new(phc.expose()).is_ok_and(|hash| {
                Argon2::default().verify_password(candidate.expose().as_bytes(), &hash).is_ok()
            })
        })
        .await
        .unwrap_or(false)
    }
}

/// The authentication policy, built once from `[auth]`.
#[derive(Debug)]
pub struct Authenticator {
    method: SocksMethod,
    users: HashMap<String, Credential>,
    /// Checked for unknown users and after plain-password checks when any user is hashed:
    /// the configured hash with the highest cost, so every login costs the same.
    decoy: Option<Arc<Secret>>,
    verifier: Verifier,
    failures: Arc<LoginLimit>,
    counters: Arc<AuthCounters>,
}

/// argon2 cost of a PHC string: memory (KiB) times passes, as configured.
fn argon2_cost(phc: &Secret) -> u64 {
    PasswordHash::new(phc.expose()).map_or(0, |hash| {
        let param = |name: &str| hash.params.get_decimal(name).map_or(1, u64::from);
        param("m").saturating_mul(param("t")).saturating_mul(param("p").max(1))
    })
}

/// Hashed users whose argon2 cost is below the decoy's (the most expensive configured).
fn cheaper_hashed_users(
    users: &HashMap<String, Credential>,
    decoy: Option<&Secret>,
) -> Vec<String> {
    let Some(top) = decoy.map(argon2_cost) else { return Vec::new() };
    let mut names: Vec<String> = users
        .iter()
        .filter(|(_, credential)| {
            matches!(credential, Credential::Hashed(phc) if argon2_cost(phc) < top)
        })
        .map(|(name, _)| name.clone())
        .collect();
    names.sort();
    names
}

impl Authenticator {
    pub fn from_config(auth: &AuthConfig) -> Self {
        Self::with_counters(auth, Arc::default())
    }

    /// Like [`Authenticator::from_config`], counting into `counters` (the server's).
    pub fn with_counters(auth: &AuthConfig, counters: Arc<AuthCounters>) -> Self {
        let queue = VerifyQueue::new(MAX_CONCURRENT_VERIFICATIONS);
        let failures = LoginLimit::new(
            auth.login_failure_limit,
            Duration::from_secs(auth.login_failure_window_secs),
            DEFAULT_CAPACITY,
        );
        Self::build(auth, counters, queue, failures)
    }

    /// The authenticator of a reloaded `[auth]`: new users and passwords, the same argon2
    /// places, line, known sources and counters, and the same failed-login tracker unless its limit or window
    /// changed (a reload must not wipe an attacker's record).
    pub fn reloaded(&self, previous: &AuthConfig, auth: &AuthConfig) -> Self {
        let failures = if previous.login_failure_limit == auth.login_failure_limit
            && previous.login_failure_window_secs == auth.login_failure_window_secs
        {
            Arc::clone(&self.failures)
        } else {
            LoginLimit::new(
                auth.login_failure_limit,
                Duration::from_secs(auth.login_failure_window_secs),
                DEFAULT_CAPACITY,
            )
        };
        Self::build(auth, self.counters.clone(), Arc::clone(&self.verifier.queue), failures)
    }

    fn build(
        auth: &AuthConfig,
        counters: Arc<AuthCounters>,
        queue: Arc<VerifyQueue>,
        failures: Arc<LoginLimit>,
    ) -> Self {
        let users: HashMap<String, Credential> = auth
            .users
            .iter()
            .map(|user| (user.username.clone(), Credential::from_secret(&user.password)))
            .collect();
        let decoy = users
            .values()
            .filter_map(|credential| match credential {
                Credential::Hashed(phc) => Some(phc.clone()),
                Credential::Plain(_) => None,
            })
            .max_by_key(|phc| argon2_cost(phc));
        let cheaper = cheaper_hashed_users(&users, decoy.as_deref());
        if !cheaper.is_empty() {
            // Their wrong passwords answer faster than an unknown user's: a timing oracle for
            // exactly these names. Named so the operator can rehash them.
            tracing::warn!(
                users = %crate::logsafe::Escaped(&cheaper.join(", ")),
                "these users' argon2 hashes use cheaper parameters than others: a client can \
                 tell them apart from unknown users by timing; hash every password with the \
                 same parameters"
            );
        }
        Authenticator {
            method: auth.method(),
            users,
            decoy,
            verifier: Verifier { queue, counters: counters.clone() },
            failures,
            counters,
        }
    }

    pub fn counters(&self) -> Arc<AuthCounters> {
        self.counters.clone()
    }

    /// The method byte to select from what the client offers, or `None` if nothing fits.
    pub fn select_method(&self, offered: &[u8]) -> Option<u8> {
        let wanted = match self.method {
            SocksMethod::None => METHOD_NO_AUTH,
            SocksMethod::Userpass => METHOD_USERPASS,
        };
        offered.contains(&wanted).then_some(wanted)
    }

    pub async fn login(&self, client: IpAddr, request: &UserPassRequest) -> LoginOutcome {
        let Some(attempt) = self.failures.begin(client, Instant::now()) else {
            self.counters.rate_limited.fetch_add(1, Relaxed);
            return LoginOutcome::RateLimited;
        };
        // When any user is hashed, every login runs one argon2 check: its place is taken before
        // the user is looked up, so whether a login waits or is shed depends on its source and
        // the line only. Waiting is part of the handshake, which has its own timeout.
        let check = match &self.decoy {
            Some(decoy) => match self.verifier.queue.acquire(client).await {
                Ok(place) => Some((place, decoy.clone())),
                Err(Shed) => {
                    attempt.withdrawn();
                    self.counters.shed.fetch_add(1, Relaxed);
                    if let Some(held_back) = self.verifier.queue.shed_report() {
                        tracing::warn!(
                            %client,
                            shed_not_logged = held_back,
                            "login shed: too many logins wait for a password check; answered \
                             as a failure"
                        );
                    }
                    return LoginOutcome::Shed;
                }
            },
            None => None,
        };
        let candidate = request.password.clone();
        let accepted = match (self.users.get(&request.username), check) {
            (Some(Credential::Plain(password)), check) => {
                let matched = password.matches(candidate.expose().as_bytes());
                if let Some((place, decoy)) = check {
                    let _ = self.verifier.verify(place, decoy, candidate).await;
                }
                matched
            }
            (Some(Credential::Hashed(phc)), Some((place, _))) => {
                self.verifier.verify(place, phc.clone(), candidate).await
            }
            // Not reached: a hashed user makes `decoy` set, and so a place taken.
            (Some(Credential::Hashed(_)), None) => false,
            (None, Some((place, decoy))) => {
                let _ = self.verifier.verify(place, decoy, candidate).await;
                false
            }
            (None, None) => {
                // Nobody is hashed: a plain compare against a fixed string.
                let _ = Secret::new("x".repeat(32)).matches(candidate.expose().as_bytes());
                false
            }
        };
        if accepted {
            self.verifier.queue.remember(client);
            attempt.succeeded();
            self.counters.accepted.fetch_add(1, Relaxed);
            LoginOutcome::Accepted
        } else {
            attempt.failed();
            self.counters.rejected.fetch_add(1, Relaxed);
            LoginOutcome::Rejected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserConfig;

    fn auth_with(password: &str) -> Authenticator {
        Authenticator::from_config(&AuthConfig {
            users: vec![UserConfig { username: "alice".into(), password: Secret::new(password) }],
            login_failure_limit: 3,
            ..AuthConfig::default()
        })
    }

    fn request(user: &str, password: &str) -> UserPassRequest {
        UserPassRequest { username: user.into(), password: Secret::new(password) }
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn selects_the_configured_method_only_when_offered() {
        let open = Authenticator::from_config(&AuthConfig::default());
        assert_eq!(open.select_method(&[METHOD_NO_AUTH]), Some(METHOD_NO_AUTH));
        assert_eq!(open.select_method(&[METHOD_USERPASS]), None);
        let auth = auth_with("s3cret");
        assert_eq!(auth.select_method(&[METHOD_NO_AUTH, METHOD_USERPASS]), Some(METHOD_USERPASS));
        assert_eq!(auth.select_method(&[METHOD_NO_AUTH]), None);
    }

    #[tokio::test]
    async fn verifies_username_and_password_together() {
        let auth = auth_with("s3cret");
        assert_eq!(auth.login(CLIENT, &request("alice", "s3cret")).await, LoginOutcome::Accepted);
        assert_eq!(auth.login(CLIENT, &request("alice", "wrong")).await, LoginOutcome::Rejected);
        assert_eq!(auth.login(CLIENT, &request("bob", "s3cret")).await, LoginOutcome::Rejected);
    }

    #[tokio::test]
    async fn argon2_hashed_passwords_verify() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::from_b64("cG9vbHNvY2tzdGVzdHNhbHQ").expect("salt");
        let phc = Argon2::default().hash_password(b"hashed pw", &salt).expect("hash").to_string();
        let auth = auth_with(&phc);
        assert_eq!(
            auth.login(CLIENT, &request("alice", "hashed pw")).await,
            LoginOutcome::Accepted
        );
        assert_eq!(auth.login(CLIENT, &request("alice", "wrong")).await, LoginOutcome::Rejected);
        // The PHC string itself is not a password.
        assert_eq!(auth.login(CLIENT, &request("alice", &phc)).await, LoginOutcome::Rejected);
    }

    #[tokio::test]
    async fn repeated_failures_from_one_address_are_rate_limited_not_others() {
        let auth = auth_with("s3cret");
        for _ in 0..3 {
            assert_eq!(
                auth.login(CLIENT, &request("alice", "guess")).await,
                LoginOutcome::Rejected
            );
        }
        // Even the right password is refused while the address is limited.
        assert_eq!(
            auth.login(CLIENT, &request("alice", "s3cret")).await,
            LoginOutcome::RateLimited
        );
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        assert_eq!(auth.login(other, &request("alice", "s3cret")).await, LoginOutcome::Accepted);
    }

    fn hash(password: &[u8]) -> String {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::from_b64("cG9vbHNvY2tzdGVzdHNhbHQ").expect("salt");
        Argon2::default().hash_password(password, &salt).expect("hash").to_string()
    }

    #[test]
    fn hashed_users_cheaper_than_the_decoy_are_named() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::from_b64("cG9vbHNvY2tzdGVzdHNhbHQ").expect("salt");
        let params = argon2::Params::new(8 * 1024, 1, 1, None).expect("params");
        let cheap = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(b"pw", &salt)
            .expect("hash")
            .to_string();
        let users: HashMap<String, Credential> = [
            ("strong", Secret::new(hash(b"pw"))),
            ("weak", Secret::new(cheap)),
            ("plain", Secret::new("s3cret")),
        ]
        .into_iter()
        .map(|(name, secret)| (name.to_string(), Credential::from_secret(&secret)))
        .collect();
        let decoy = Secret::new(hash(b"decoy"));
        assert_eq!(cheaper_hashed_users(&users, Some(&decoy)), vec!["weak".to_string()]);
        assert!(cheaper_hashed_users(&users, None).is_empty());
    }

    #[tokio::test]
    async fn every_miss_costs_one_argon2_check_when_any_user_is_hashed() {
        let auth = Authenticator::from_config(&AuthConfig {
            users: vec![
                UserConfig { username: "plain".into(), password: Secret::new("s3cret") },
                UserConfig { username: "hashed".into(), password: Secret::new(hash(b"pw")) },
            ],
            login_failure_limit: 100,
            ..AuthConfig::default()
        });
        let checks = |auth: &Authenticator| auth.counters().snapshot().argon2_checks;
        for (user, password) in [("plain", "wrong"), ("hashed", "wrong"), ("nobody", "x")] {
            let before = checks(&auth);
            assert_eq!(auth.login(CLIENT, &request(user, password)).await, LoginOutcome::Rejected);
            assert_eq!(checks(&auth) - before, 1, "{user}: one argon2 check");
        }
        // Without hashed users nobody pays for argon2.
        let plain_only = auth_with("s3cret");
        assert_eq!(plain_only.login(CLIENT, &request("nobody", "x")).await, LoginOutcome::Rejected);
        assert_eq!(checks(&plain_only), 0);
    }

    #[tokio::test]
    async fn concurrent_attempts_are_counted_before_they_are_checked() {
        let auth = Arc::new(Authenticator::from_config(&AuthConfig {
            users: vec![UserConfig {
                username: "alice".into(),
                password: Secret::new(hash(b"pw")),
            }],
            login_failure_limit: 5,
            ..AuthConfig::default()
        }));
        let mut logins = Vec::new();
        for i in 0..41 {
            let auth = auth.clone();
            let password = if i == 40 { "pw" } else { "wrong" };
            logins.push(tokio::spawn(async move {
                auth.login(CLIENT, &request("alice", password)).await
            }));
        }
        let mut checked = 0;
        for login in logins {
            if login.await.expect("login task") != LoginOutcome::RateLimited {
                checked += 1;
            }
        }
        assert!(checked <= 5, "{checked} logins were checked with a limit of 5");
        assert_eq!(auth.counters().snapshot().argon2_checks, checked);
    }
}
