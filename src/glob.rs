//! Glob patterns over notification types and portal ids (`job.*`, `my-org/*`).
//!
//! Only `*` (any run of characters, `/` and `.` included) and `?` (exactly one
//! character) are special. That is all a filter such as `types = ["job.*"]`
//! needs, and it keeps matching a pure, allocation-free function instead of a
//! dependency on a regex engine.

/// A validated glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Accepts any non-empty pattern; returns `None` for an empty one.
    pub fn new(pattern: &str) -> Option<Glob> {
        if pattern.is_empty() { None } else { Some(Glob(pattern.to_owned())) }
    }

    /// The pattern as written in the config.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        matches(self.0.as_bytes(), text.as_bytes())
    }
}

/// Iterative matcher with single-star backtracking: linear in practice and
/// never recursive, so a hostile pattern cannot blow the stack.
fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was seen in the pattern, and the text position it
    // currently stands for; on a mismatch the star swallows one more byte.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether any of `patterns` matches `text`; an empty list matches everything.
pub fn any_matches(patterns: &[Glob], text: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|g| g.matches(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases() {
        let cases = [
            ("job.*", "job.completed", true),
            ("job.*", "watch.failed", false),
            ("*", "", true),
            ("my-org/*", "my-org/contact_form", true),
            ("my-org/*", "other/contact_form", false),
            ("job.?vent", "job.event", true),
            ("*.failed", "watch.failed", true),
            ("*.failed", "job.failed.x", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(Glob::new(pattern).unwrap().matches(text), want, "{pattern} vs {text}");
        }
    }

    #[test]
    fn empty_list_matches_all() {
        assert!(any_matches(&[], "anything"));
        assert!(Glob::new("").is_none());
    }
}
