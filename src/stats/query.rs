//! Validation of `/api/telemetry/events` query parameters. Every problem names its parameter,
//! so a 400 tells the caller exactly what to fix.

use crate::telemetry::{EventQuery, Severity};

/// The most events one request may ask for.
pub const MAX_EVENTS_LIMIT: usize = 1000;
/// Events returned when `limit` is not given.
pub const DEFAULT_EVENTS_LIMIT: usize = 100;
/// The widest `minutes` window: a week (telemetry keeps far less by default anyway).
pub const MAX_MINUTES: u64 = 7 * 24 * 60;
const MAX_CATEGORY_LEN: usize = 64;

/// A validated query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsQuery {
    pub minutes: Option<u64>,
    pub limit: usize,
    pub severity: Option<Severity>,
    pub category: Option<String>,
}

/// A parameter that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query parameter `{parameter}` {problem}")]
pub struct QueryError {
    pub parameter: String,
    pub problem: String,
}

impl EventsQuery {
    /// Parses the raw (still percent-encoded) query string.
    pub fn parse(raw: Option<&str>) -> Result<Self, QueryError> {
        let mut query = EventsQuery {
            minutes: None,
            limit: DEFAULT_EVENTS_LIMIT,
            severity: None,
            category: None,
        };
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let fail = |problem: String| QueryError { parameter: name.to_string(), problem };
            if seen.iter().any(|s| *s == name) {
                return Err(fail("is given more than once".into()));
            }
            seen.push(name.to_string());
            match name.as_ref() {
                "minutes" => {
                    query.minutes = Some(
                        parse_in_range(&value, 1, MAX_MINUTES)
                            .ok_or_else(|| fail(range_problem(&value, 1, MAX_MINUTES)))?,
                    );
                }
                "limit" => {
                    let limit = parse_in_range(&value, 1, MAX_EVENTS_LIMIT as u64)
                        .ok_or_else(|| fail(range_problem(&value, 1, MAX_EVENTS_LIMIT as u64)))?;
                    // In range, so it fits in usize on every platform.
                    query.limit = usize::try_from(limit).unwrap_or(MAX_EVENTS_LIMIT);
                }
                "severity" => {
                    query.severity = Some(Severity::parse(&value).ok_or_else(|| {
                        fail(format!(
                            "must be one of info, warning, error; got {:?}",
                            shorten(&value)
                        ))
                    })?);
                }
                "category" => {
                    let valid = !value.is_empty()
                        && value.len() <= MAX_CATEGORY_LEN
                        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                    if !valid {
                        return Err(fail(format!(
                            "must be 1 to {MAX_CATEGORY_LEN} characters of letters, digits, \
                             '.', '_' or '-' (e.g. pool.dial); got {:?}",
                            shorten(&value)
                        )));
                    }
                    query.category = Some(value.into_owned());
                }
                _ => {
                    return Err(QueryError {
                        parameter: shorten(&name),
                        problem: "is not known (use minutes, limit, severity, category)".into(),
                    })
                }
            }
        }
        Ok(query)
    }

    pub fn to_event_query(&self) -> EventQuery {
        EventQuery {
            since_minutes: self.minutes,
            limit: Some(self.limit),
            severity: self.severity,
            category: self.category.clone(),
        }
    }
}

/// Destinations `/api/pool/stats` lists by default: the busiest, so the answer stays small
/// whatever number of destinations clients have named.
pub const DEFAULT_DESTINATIONS_LISTED: usize = 50;
/// The most destinations one page lists.
pub const MAX_DESTINATIONS_PAGE: usize = 1000;

/// Which destinations `/api/pool/stats` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationsQuery {
    /// All destinations by name (paginated) rather than the busiest.
    pub all: bool,
    pub offset: usize,
    pub limit: usize,
}

impl DestinationsQuery {
    /// `destinations=busiest|all`, `offset`, `limit` (1 to 1000).
    pub fn parse(raw: Option<&str>) -> Result<Self, QueryError> {
        let mut query =
            DestinationsQuery { all: false, offset: 0, limit: DEFAULT_DESTINATIONS_LISTED };
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let fail = |problem: String| QueryError { parameter: shorten(&name), problem };
            if seen.iter().any(|s| *s == name) {
                return Err(fail("is given more than once".into()));
            }
            seen.push(name.to_string());
            match name.as_ref() {
                "destinations" => match value.as_ref() {
                    "busiest" => query.all = false,
                    "all" => query.all = true,
                    other => {
                        return Err(fail(format!(
                            "must be busiest or all; got {:?}",
                            shorten(other)
                        )))
                    }
                },
                "offset" => {
                    let offset = parse_in_range(&value, 0, u64::from(u32::MAX))
                        .ok_or_else(|| fail(range_problem(&value, 0, u64::from(u32::MAX))))?;
                    query.offset = usize::try_from(offset).unwrap_or(usize::MAX);
                }
                "limit" => {
                    let max = MAX_DESTINATIONS_PAGE as u64;
                    let limit = parse_in_range(&value, 1, max)
                        .ok_or_else(|| fail(range_problem(&value, 1, max)))?;
                    query.limit = usize::try_from(limit).unwrap_or(MAX_DESTINATIONS_PAGE);
                }
                _ => {
                    return Err(QueryError {
                        parameter: shorten(&name),
                        problem: "is not known (use destinations, offset, limit)".into(),
                    })
                }
            }
        }
        Ok(query)
    }
}

fn parse_in_range(value: &str, min: u64, max: u64) -> Option<u64> {
    value.parse::<u64>().ok().filter(|n| (min..=max).contains(n))
}

fn range_problem(value: &str, min: u64, max: u64) -> String {
    format!("must be an integer from {min} to {max}; got {:?}", shorten(value))
}

/// Echoes at most a little of what the client sent: an error must not amplify a huge input.
fn shorten(value: &str) -> String {
    const MAX: usize = 40;
    match value.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameter_of(raw: &str) -> String {
        EventsQuery::parse(Some(raw)).expect_err(raw).parameter
    }

    #[test]
    fn defaults_without_parameters() {
        let q = EventsQuery::parse(None).unwrap();
        assert_eq!(q.limit, DEFAULT_EVENTS_LIMIT);
        assert_eq!((q.minutes, q.severity, q.category), (None, None, None));
    }

    #[test]
    fn accepts_valid_values_percent_encoded() {
        let q =
            EventsQuery::parse(Some("minutes=5&limit=1000&severity=WARNING&category=pool%2Edial"))
                .unwrap();
        assert_eq!(q.minutes, Some(5));
        assert_eq!(q.limit, 1000);
        assert_eq!(q.severity, Some(Severity::Warning));
        assert_eq!(q.category.as_deref(), Some("pool.dial"));
    }

    #[test]
    fn each_bad_value_names_its_parameter() {
        assert_eq!(parameter_of("limit=0"), "limit");
        assert_eq!(parameter_of("limit=1001"), "limit");
        assert_eq!(parameter_of("limit=-1"), "limit");
        assert_eq!(parameter_of("limit="), "limit");
        assert_eq!(parameter_of("minutes=abc"), "minutes");
        assert_eq!(parameter_of("minutes=99999999999999999999999"), "minutes");
        assert_eq!(parameter_of("severity=fatal"), "severity");
        assert_eq!(parameter_of("category=%3Cscript%3E"), "category");
        assert_eq!(parameter_of("category="), "category");
        assert_eq!(parameter_of("limit=1&limit=2"), "limit");
        assert_eq!(parameter_of("colour=red"), "colour");
    }

    #[test]
    fn long_input_is_not_echoed_whole() {
        let long = "x".repeat(10_000);
        let err = EventsQuery::parse(Some(&format!("severity={long}"))).unwrap_err();
        assert!(err.problem.len() < 200, "{}", err.problem.len());
    }
}
