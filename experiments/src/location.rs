//! Pointing at a place in a study file: byte offsets (toml spans) → `FILE:LINE:COLUMN`, and the
//! one error shape every study-file problem uses (`Error::Config` with the location as `field`).

use std::ops::Range;

use dynrobust_core::Error;

/// The text of a study file and the name it is reported under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl<'a> Source<'a> {
    /// `FILE:LINE:COLUMN` (both 1-based, column counted in characters) of byte offset `at`.
    pub fn locate(&self, at: usize) -> String {
        let at = floor_char_boundary(self.text, at.min(self.text.len()));
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("{}:{line}:{col}", self.file)
    }

    /// A config error at the start of `span`.
    pub fn error(&self, span: &Range<usize>, problem: impl Into<String>) -> Error {
        Error::config(self.locate(span.start), problem)
    }

    /// Converts a toml parse/deserialise error, keeping its span and naming the line it hit.
    pub fn toml_error(&self, e: &toml::de::Error) -> Error {
        let span = e.span().unwrap_or(0..0);
        let line = self.line_at(span.start);
        let msg = e.message().trim_end();
        // a missing key has no line of its own: toml points at the table that lacks it
        if line.is_empty() || msg.starts_with("missing field") {
            self.error(&span, msg.to_string())
        } else {
            self.error(&span, format!("{msg} (in `{line}`)"))
        }
    }

    /// The trimmed text of the line holding byte offset `at`.
    fn line_at(&self, at: usize) -> &'a str {
        let at = floor_char_boundary(self.text, at.min(self.text.len()));
        let start = self.text[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = self.text[at..].find('\n').map_or(self.text.len(), |i| at + i);
        self.text[start..end].trim()
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns_are_one_based() {
        let src = Source { file: "x.toml", text: "a = 1\nbé = 2\n" };
        assert_eq!(src.locate(0), "x.toml:1:1");
        assert_eq!(src.locate(6), "x.toml:2:1");
        assert_eq!(src.locate(9), "x.toml:2:3");
        assert_eq!(src.line_at(8), "bé = 2");
    }
}
