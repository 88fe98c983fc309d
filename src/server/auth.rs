//! Which SOCKS method a client gets, the username/password check, and the per-address limit
//! on failed logins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};

use crate::config::{AuthConfig, SocksMethod};
use crate::secret::Secret;
use crate::socks::{UserPassRequest, METHOD_NO_AUTH, METHOD_USERPASS};

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

    async fn verify(&self, candidate: Secret) -> bool {
        match self {
            Credential::Plain(password) => password.matches(candidate.expose().as_bytes()),
            Credential::Hashed(phc) => {
                let phc = phc.clone();
                tokio::task::spawn_blocking(move || {
                    PasswordHash::new(phc.expose()).is_ok_and(|hash| {
                        Argon2::default()
                            .verify_password(candidate.expose().as_bytes(), &hash)
                            .is_ok()
                    })
                })
                .await
                .unwrap_or(false)
            }
        }
    }
}

/// The result of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    Accepted,
    Rejected,
    /// Too many recent failures from this address: refused without checking the password.
    RateLimited,
}

/// The authentication policy, built once from `[auth]`.
#[derive(Debug)]
pub struct Authenticator {
    method: SocksMethod,
    users: HashMap<String, Credential>,
    /// Checked when the username is unknown, so a miss costs as long as a wrong password
    /// (the first hashed password if any user has one, so timing matches the slow path too).
    decoy: Credential,
    failures: FailedLogins,
}

impl Authenticator {
    pub fn from_config(auth: &AuthConfig) -> Self {
        let users: HashMap<String, Credential> = auth
            .users
            .iter()
            .map(|user| (user.username.clone(), Credential::from_secret(&user.password)))
            .collect();
        let decoy = users
            .values()
            .find(|credential| matches!(credential, Credential::Hashed(_)))
            .cloned()
            .unwrap_or_else(|| Credential::Plain(Secret::new("x".repeat(32))));
        Authenticator {
            method: auth.method(),
            users,
            decoy,
            failures: FailedLogins::new(
                auth.login_failure_limit,
                Duration::from_secs(auth.login_failure_window_secs),
            ),
        }
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
        if self.failures.is_limited(client, Instant::now()) {
            return LoginOutcome::RateLimited;
        }
        let accepted = match self.users.get(&request.username) {
            Some(credential) => credential.verify(request.password.clone()).await,
            None => {
                let _ = self.decoy.verify(request.password.clone()).await;
                false
            }
        };
        if accepted {
            LoginOutcome::Accepted
        } else {
            self.failures.record(client, Instant::now());
            LoginOutcome::Rejected
        }
    }
}

/// Failed logins per source address in fixed windows. A short mutex is fine: it is touched
/// once per login, not per byte.
#[derive(Debug)]
struct FailedLogins {
    limit: u32,
    window: Duration,
    by_address: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Above this many tracked addresses, expired entries are purged so memory stays bounded.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

impl FailedLogins {
    fn new(limit: u32, window: Duration) -> Self {
        FailedLogins { limit, window, by_address: Mutex::new(HashMap::new()) }
    }

    fn is_limited(&self, client: IpAddr, now: Instant) -> bool {
        let map = self.by_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(&client).is_some_and(|&(start, count)| {
            now.duration_since(start) < self.window && count >= self.limit
        })
    }

    fn record(&self, client: IpAddr, now: Instant) {
        let mut map = self.by_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.len() >= MAX_TRACKED_ADDRESSES {
            map.retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let entry = map.entry(client).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
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

    #[test]
    fn the_failure_window_expires() {
        let failures = FailedLogins::new(2, Duration::from_secs(60));
        let start = Instant::now();
        failures.record(CLIENT, start);
        failures.record(CLIENT, start);
        assert!(failures.is_limited(CLIENT, start + Duration::from_secs(59)));
        assert!(!failures.is_limited(CLIENT, start + Duration::from_secs(60)));
        failures.record(CLIENT, start + Duration::from_secs(61));
        assert!(!failures.is_limited(CLIENT, start + Duration::from_secs(61)), "new window");
    }
}
