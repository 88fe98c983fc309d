//! `[access]`: which clients may connect and which destinations they may reach.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError};

/// `[access]`: who may use the proxy, and where to.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Client source networks allowed to connect; empty allows any.
    pub client_networks: Vec<IpNet>,
    /// What happens to a destination no rule matches.
    pub default_action: RuleAction,
    /// Destination rules, first match wins.
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    #[default]
    Allow,
    Deny,
}

/// A destination rule. It matches when every criterion it sets matches (an unset criterion
/// matches anything); within a criterion any entry may match.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub action: RuleAction,
    /// CIDRs, checked against every resolved address (so a name cannot smuggle a denied address).
    #[serde(default)]
    pub networks: Vec<IpNet>,
    /// Domain suffixes: `example.com` matches it and every subdomain.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Ports or ranges: `443` or `"8000-8999"`.
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

/// An inclusive port range, written `80` or `"8000-8999"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Port(u16),
            Range(String),
        }
        let parse =
            |text: &str| text.trim().parse::<u16>().map_err(|_| format!("bad port {text:?}"));
        let range = match Raw::deserialize(deserializer)? {
            Raw::Port(port) => Ok(PortRange { first: port, last: port }),
            Raw::Range(text) => match text.split_once('-') {
                Some((first, last)) => {
                    parse(first).and_then(|first| Ok(PortRange { first, last: parse(last)? }))
                }
                None => parse(&text).map(|port| PortRange { first: port, last: port }),
            },
        };
        match range {
            Ok(range) if range.first <= range.last => Ok(range),
            Ok(range) => Err(serde::de::Error::custom(format!(
                "port range {}-{} is backwards",
                range.first, range.last
            ))),
            Err(message) => Err(serde::de::Error::custom(format!(
                "{message}: expected a port (443) or a range (\"8000-8999\")"
            ))),
        }
    }
}

/// Written back as it is read: `443`, or `"8000-8999"`.
impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last {
            serializer.serialize_u16(self.first)
        } else {
            serializer.collect_str(&format_args!("{}-{}", self.first, self.last))
        }
    }
}

impl Config {
    pub(super) fn validate_access(&self) -> Result<(), ConfigError> {
        for rule in &self.access.rules {
            if let Some(domain) = rule.domains.iter().find(|d| d.trim_matches('.').is_empty()) {
                return Err(invalid(
                    "access.rules.domains",
                    format!("{domain:?} is not a domain suffix"),
                ));
            }
        }
        Ok(())
    }
}
