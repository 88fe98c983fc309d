//! `[auth]`: the SOCKS method, users and the failed-login limit.

use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError};
use crate::secret::Secret;

pub const DEFAULT_LOGIN_FAILURE_LIMIT: u32 = 5;
pub const DEFAULT_LOGIN_FAILURE_WINDOW_SECS: u64 = 60;

/// RFC 1929 caps usernames and passwords at 255 bytes.
const MAX_CREDENTIAL_LEN: usize = 255;

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocksMethod {
    #[default]
    None,
    Userpass,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When absent: `userpass` if `users` lists anyone, else `none`.
    pub socks_method: Option<SocksMethod>,
    pub users: Vec<UserConfig>,
    /// Failed logins a source address may have within the window before it is refused outright.
    pub login_failure_limit: u32,
    pub login_failure_window_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            socks_method: None,
            users: Vec::new(),
            login_failure_limit: DEFAULT_LOGIN_FAILURE_LIMIT,
            login_failure_window_secs: DEFAULT_LOGIN_FAILURE_WINDOW_SECS,
        }
    }
}

impl AuthConfig {
    pub fn method(&self) -> SocksMethod {
        self.socks_method.unwrap_or(if self.users.is_empty() {
            SocksMethod::None
        } else {
            SocksMethod::Userpass
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    /// Plain text, or an argon2 PHC string (`$argon2id$v=19$...`).
    pub password: Secret,
}

impl UserConfig {
    pub fn password_is_hashed(&self) -> bool {
        self.password.expose().starts_with("$argon2")
    }
}

impl Config {
    pub(super) fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        if auth.login_failure_limit == 0 {
            return Err(invalid("auth.login_failure_limit", "must be at least 1"));
        }
        if auth.login_failure_window_secs == 0 {
            return Err(invalid("auth.login_failure_window_secs", "must be greater than 0"));
        }
        for user in auth.users.iter().filter(|user| user.password_is_hashed()) {
            let problem = match argon2::PasswordHash::new(user.password.expose()) {
                Ok(hash) if hash.salt.is_some() && hash.hash.is_some() => continue,
                Ok(_) => "it has no salt or no hash".to_string(),
                Err(e) => e.to_string(),
            };
            return Err(invalid(
                "auth.users.password",
                format!(
                    "of user {:?} looks like an argon2 hash but does not parse: {problem}",
                    user.username
                ),
            ));
        }
        match auth.method() {
            SocksMethod::None if !auth.users.is_empty() => Err(invalid(
                "auth.socks_method",
                format!(
                    "is \"none\" but auth.users lists {} user(s): set socks_method = \"userpass\" or remove the users",
                    auth.users.len()
                ),
            )),
            SocksMethod::Userpass if auth.users.is_empty() => Err(invalid(
                "auth.users",
                "is empty but auth.socks_method is \"userpass\": add [[auth.users]] entries",
            )),
            _ => {
                let mut seen = std::collections::HashSet::new();
                for user in &auth.users {
                    if user.username.is_empty() || user.username.len() > MAX_CREDENTIAL_LEN {
                        return Err(invalid("auth.users.username", "must be 1 to 255 bytes long"));
                    }
                    if user.password.expose().is_empty() || user.password.expose().len() > MAX_CREDENTIAL_LEN {
                        return Err(invalid(
                            "auth.users.password",
                            format!("of user {:?} must be 1 to 255 bytes long", user.username),
                        ));
                    }
                    if !seen.insert(user.username.as_str()) {
                        return Err(invalid(
                            "auth.users.username",
                            format!("{:?} is listed more than once", user.username),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}
