//! Which SOCKS method a client gets, and the username/password check.

use std::collections::HashMap;

use crate::config::{AuthConfig, SocksMethod};
use crate::secret::Secret;
use crate::socks::{UserPassRequest, METHOD_NO_AUTH, METHOD_USERPASS};

/// The authentication policy, built once from `[auth]`.
#[derive(Debug, Clone)]
pub struct Authenticator {
    method: SocksMethod,
    users: HashMap<String, Secret>,
    /// Compared against when the username is unknown, so a miss costs as long as a wrong password.
    decoy: Secret,
}

impl Authenticator {
    pub fn from_config(auth: &AuthConfig) -> Self {
        let users =
            auth.users.iter().map(|user| (user.username.clone(), user.password.clone())).collect();
        Authenticator { method: auth.method(), users, decoy: Secret::new("x".repeat(32)) }
    }

    /// The method byte to select from what the client offers, or `None` if nothing fits.
    pub fn select_method(&self, offered: &[u8]) -> Option<u8> {
        let wanted = match self.method {
            SocksMethod::None => METHOD_NO_AUTH,
            SocksMethod::Userpass => METHOD_USERPASS,
        };
        offered.contains(&wanted).then_some(wanted)
    }

    pub fn verify(&self, request: &UserPassRequest) -> bool {
        let candidate = request.password.expose().as_bytes();
        match self.users.get(&request.username) {
            Some(password) => password.matches(candidate),
            None => {
                let _ = self.decoy.matches(candidate);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserConfig;

    fn userpass() -> Authenticator {
        Authenticator::from_config(&AuthConfig {
            socks_method: None,
            users: vec![UserConfig { username: "alice".into(), password: Secret::new("s3cret") }],
        })
    }

    #[test]
    fn selects_the_configured_method_only_when_offered() {
        let open = Authenticator::from_config(&AuthConfig::default());
        assert_eq!(open.select_method(&[METHOD_NO_AUTH]), Some(METHOD_NO_AUTH));
        assert_eq!(open.select_method(&[METHOD_USERPASS]), None);
        assert_eq!(
            userpass().select_method(&[METHOD_NO_AUTH, METHOD_USERPASS]),
            Some(METHOD_USERPASS)
        );
        assert_eq!(userpass().select_method(&[METHOD_NO_AUTH]), None);
    }

    #[test]
    fn verifies_username_and_password_together() {
        let auth = userpass();
        let request =
            |u: &str, p: &str| UserPassRequest { username: u.into(), password: Secret::new(p) };
        assert!(auth.verify(&request("alice", "s3cret")));
        assert!(!auth.verify(&request("alice", "wrong")));
        assert!(!auth.verify(&request("bob", "s3cret")));
    }
}
