//! Client-controlled text on its way into a log line or a telemetry event.
//!
//! A username or a destination name is whatever bytes a client sent: with a newline and a
//! forged prefix it could write a whole fake log line (`INFO ... authenticated user=admin`),
//! and terminal escapes or bidirectional overrides could hide text from whoever reads the log.
//! [`Escaped`] shows such characters as `\n`, `\u{1b}`, `\u{202e}` instead.

use std::fmt;

/// Displays a string with control characters, bidirectional overrides and backslashes escaped.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if !text.chars().any(needs_escape) {
            return f.write_str(text);
        }
        for c in text.chars() {
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        Ok(())
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        // Bidirectional embeddings, overrides and isolates (Trojan Source), and line/paragraph
        // separators some viewers break lines on.
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_log_line_stays_on_one_line() {
        let hostile = "x\n2026-12-02T00:00:00Z  INFO authenticated user=admin\u{1b}[2J\u{202e}";
        let shown = Escaped(hostile).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\u{1b}') && !shown.contains('\u{202e}'));
        assert!(shown.contains("\\n") && shown.contains("\\u{1b}") && shown.contains("\\u{202e}"));
        assert_eq!(Escaped("plain.example.com").to_string(), "plain.example.com");
        assert_eq!(Escaped("a\\b").to_string(), "a\\\\b");
        assert_eq!(Escaped("ünïcødé").to_string(), "ünïcødé");
    }
}
