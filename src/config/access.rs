//! `[access]`: which clients may connect and which destinations they may reach.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml_edit::{ImDocument, Item, TableLike};

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

/// `443`, or `8000-8999`.
impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
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

impl RuleConfig {
    /// A rule with no criterion matches every destination.
    pub fn matches_everything(&self) -> bool {
        self.networks.is_empty() && self.domains.is_empty() && self.ports.is_empty()
    }
}

impl AccessConfig {
    /// The first rule that cannot be meant as written: its index, the key at fault and why.
    pub(super) fn rule_problem(&self) -> Option<(usize, &'static str, String)> {
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            let number = index + 1;
            if let Some(domain) = rule.domains.iter().find(|d| d.trim_matches('.').is_empty()) {
                return Some((
                    index,
                    "access.rules.domains",
                    format!("(rule {number}) {domain:?} is not a domain suffix"),
                ));
            }
            if !rule.matches_everything() {
                return None;
            }
            let problem = match rule.action {
                RuleAction::Deny => format!(
                    "(rule {number}, deny) has no networks, domains or ports, so it denies every \
                     destination and no later rule is ever reached. Give it networks, domains or \
                     ports; to deny what no rule matches, set access.default_action = \"deny\""
                ),
                RuleAction::Allow => format!(
                    "(rule {number}, allow) has no networks, domains or ports, so it allows every \
                     destination and no later rule is ever reached. Give it networks, domains or \
                     ports; to allow what no rule matches, set access.default_action = \"allow\""
                ),
            };
            Some((index, "access.rules", problem))
        })
    }
}

impl Config {
    pub(super) fn validate_access(&self) -> Result<(), ConfigError> {
        match self.access.rule_problem() {
            Some((_, key, problem)) => Err(invalid(key, problem)),
            None => Ok(()),
        }
    }
}

/// The line of rule `index` in `text` (its `[[access.rules]]` header, or its inline table), or of
/// the key `key` ends with inside it (`access.rules.domains`: its `domains`).
pub(super) fn line_of_rule(text: &str, index: usize, key: &str) -> Option<usize> {
    let document = ImDocument::parse(text).ok()?;
    let rules = document.get("access")?.as_table_like()?.get("rules")?;
    let (table, span): (&dyn TableLike, _) = match rules {
        Item::ArrayOfTables(tables) => {
            let table = tables.get(index)?;
            (table, table.span())
        }
        Item::Value(value) => {
            let rule = value.as_array()?.get(index)?;
            (rule.as_inline_table()?, rule.span())
        }
        _ => return None,
    };
    let leaf = key.strip_prefix("access.rules.");
    let offset = leaf
        .and_then(|leaf| table.get_key_value(leaf))
        .and_then(|(key, _)| key.span())
        .or(span)?
        .start;
    Some(text.get(..offset)?.matches('\n').count() + 1)
}
