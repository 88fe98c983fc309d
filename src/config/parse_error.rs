//! A TOML error described without quoting the file.
//!
//! toml's own message repeats the offending line, and serde's quote the value they could not
//! take (`invalid type: string "..."`). A config holds passwords and tokens, and the message
//! goes to the log, the stats endpoint and telemetry, so what is kept is the position, the
//! table and key named by the schema, and the kind of problem; every quoted word that is not
//! a name the documented config uses is replaced by `…`.

use super::DEFAULT_CONFIG_TOML;

/// Where and what, for a document that did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseProblem {
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The dotted key the error is at, when the line assigns a documented key.
    pub key: Option<String>,
    /// The problem, with anything taken from the file masked.
    pub problem: String,
}

impl std::fmt::Display for ParseProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TOML parse error")?;
        if let Some(line) = self.line {
            write!(f, " at line {line}")?;
            if let Some(column) = self.column {
                write!(f, ", column {column}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, " (`{key}`)")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl ParseProblem {
    pub fn from_toml(text: &str, error: &toml::de::Error) -> Self {
        let offset = error.span().map(|span| span.start.min(text.len()));
        let (line, column) = match offset {
            Some(offset) => {
                let head = text.get(..offset).unwrap_or(text);
                let line = head.matches('\n').count() + 1;
                let column = head.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        let line_text = line.and_then(|n| text.lines().nth(n - 1)).unwrap_or("");
        let own_key = key_on_line(line_text);
        let key = own_key.filter(|k| is_documented(k)).map(|leaf| match table_at(text, line) {
            Some(table) => format!("{table}.{leaf}"),
            None => leaf.to_string(),
        });
        let problem = mask(error.message().trim(), own_key);
        ParseProblem { line, column, key, problem: one_line(&problem) }
    }
}

/// The bare key a `key = value` line assigns, if it has one.
fn key_on_line(line: &str) -> Option<&str> {
    let (left, _) = line.split_once('=')?;
    let key = left.trim();
    let bare = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    bare.then_some(key)
}

/// The table header in force at `line` (`[a.b]` or `[[a.b]]`), if any.
fn table_at(text: &str, line: Option<usize>) -> Option<String> {
    let line = line?;
    let before: Vec<&str> = text.lines().take(line.saturating_sub(1)).collect();
    before.into_iter().rev().find_map(|l| {
        let l = l.trim();
        let inner = l.strip_prefix("[[").and_then(|r| r.split_once("]]")).map(|(t, _)| t);
        let inner =
            inner.or_else(|| l.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(t, _)| t));
        inner.map(|t| t.trim().to_string()).filter(|t| {
            t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        })
    })
}

/// A word the shipped, commented config uses: a key or a named value, never a secret.
fn is_documented(word: &str) -> bool {
    let starts_with_letter = word.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    starts_with_letter
        && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && DEFAULT_CONFIG_TOML
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .any(|w| w == word || w.rsplit('.').next() == Some(word))
}

/// Punctuation toml names in a syntax error (`.`, `=`, `"`, `]`...).
fn is_punctuation(word: &str) -> bool {
    !word.is_empty() && word.len() <= 3 && word.chars().all(|c| c.is_ascii_punctuation())
}

/// Replaces every quoted part of `message` (between backticks, double or single quotes) that is
/// not punctuation, a documented name, or the line's own key (a typo'd key is shown) by `…`.
fn mask(message: &str, own_key: Option<&str>) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['`', '"', '\'']) {
        let quote = rest[start..].chars().next().unwrap_or('`');
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find(quote) else {
            // An unbalanced quote: the rest may be a value.
            out.push(quote);
            out.push('…');
            return out;
        };
        let word = &after[..end];
        let keep = is_punctuation(word)
            || (quote == '`' && (is_documented(word) || Some(word) == own_key));
        out.push(quote);
        out.push_str(if keep { word } else { "…" });
        out.push(quote);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// One line: the log, the stats JSON and telemetry each show it whole.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> ParseProblem {
        let error = toml::from_str::<super::super::Config>(text).expect_err("must not parse");
        ParseProblem::from_toml(text, &error)
    }

    #[test]
    fn no_value_from_the_file_is_quoted() {
        let secrets = [
            ("[[auth.users]]\nusername = \"alice\"\npassword = Alice-PW-s3cr3t-XYZ\n", 3),
            ("[sessions]\nstats_api_token = tok3n-Secret-99\n", 2),
            ("[[auth.users]]\nusername = \"a\"\npassword = $argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA\n", 3),
            ("[[auth.users]]\nusername = \"a\"\npassword = \"Alice-PW-s3cr3t\nx = 1\n", 3),
            ("[sessions]\nstats_api_token = 12345678\n", 2),
            ("[sessions]\nstats_api_token = [\"tok3n-Secret-99\"]\n", 2),
            ("[server]\nbind_port = \"s3cr3t-port\"\n", 2),
            ("[auth]\nsocks_method = \"Alice-PW-s3cr3t\"\n", 2),
            ("Alice-PW-s3cr3t-XYZ\n", 1),
        ];
        for (text, line) in secrets {
            let problem = problem(text);
            let shown = problem.to_string();
            for secret in ["s3cr3t", "Secret", "argon2id", "aGFzaA", "12345678"] {
                assert!(!shown.contains(secret), "{secret} in {shown:?} for {text:?}");
            }
            assert_eq!(problem.line, Some(line), "{shown}");
            assert!(!shown.contains('\n'), "{shown:?}");
        }
    }

    #[test]
    fn the_key_the_table_and_the_kind_of_problem_are_named() {
        let shown =
            problem("[server]\nbind_port = 1080\n[server.pool]\nenabled = \"yes\"\n").to_string();
        assert!(shown.contains("line 4") && shown.contains("`server.pool.enabled`"), "{shown}");
        assert!(
            shown.contains("invalid type: string") && shown.contains("expected a boolean"),
            "{shown}"
        );
        let shown = problem("[server]\nmax_conections = 3\n").to_string();
        assert!(shown.contains("unknown field `max_conections`"), "a typo is shown: {shown}");
        assert!(shown.contains("`max_connections`"), "the expected keys are listed: {shown}");
        let shown = problem("[server]\nmax_connections = = 3\n").to_string();
        assert!(
            shown.contains("line 2") && shown.contains("(`server.max_connections`)"),
            "{shown}"
        );
    }
}
