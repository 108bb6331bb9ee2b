//! Regular expressions as Istio checks them and Envoy runs them: RE2 syntax. The `regex` crate reads almost the
//! same language; what RE2 has that it lacks (`\Q…\E` quoting, octal escapes) is rewritten here, and RE2's limits
//! (Istio's 1024 characters, 1000 repetitions, 1000 levels of nesting) are applied, so a pattern is refused
//! exactly where Istio refuses it and matches what Envoy would.

use std::borrow::Cow;

use regex_syntax::ast::{self, Ast, RepetitionKind, RepetitionRange};

/// Istio's cap on a regex's length (it stands in for RE2's program size).
pub const MAX_LENGTH: usize = 1024;
/// RE2's largest repetition count (`x{1000}`).
const MAX_REPEAT: u32 = 1000;
/// RE2's deepest nesting of groups and repetitions.
pub const NEST_LIMIT: u32 = 1000;

/// `pattern` in the `regex` crate's syntax: `\Q…\E` becomes escaped text, `\123` (octal) becomes `\x{53}`. Other
/// text is kept as written.
pub fn translate(pattern: &str) -> Cow<'_, str> {
    if !pattern.contains('\\') {
        return Cow::Borrowed(pattern);
    }
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars().peekable();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(next) = chars.next() else {
                    out.push('\\');
                    break;
                };
                if next == 'Q' && !in_class {
                    let mut literal = String::new();
                    while let Some(c) = chars.next() {
                        if c == '\\' && chars.peek() == Some(&'E') {
                            chars.next();
                            break;
                        }
                        literal.push(c);
                    }
                    regex_syntax::escape_into(&literal, &mut out);
                    continue;
                }
                let octal = |c: Option<&char>| c.is_some_and(|c| ('0'..='7').contains(c));
                if next == '0' || (('1'..='7').contains(&next) && octal(chars.peek())) {
                    let mut value = next as u32 - '0' as u32;
                    for _ in 1..3 {
                        if !octal(chars.peek()) {
                            break;
                        }
                        value = value * 8 + (chars.next().unwrap_or('0') as u32 - '0' as u32);
                    }
                    out.push_str(&format!("\\x{{{value:x}}}"));
                    continue;
                }
                out.push('\\');
                out.push(next);
            }
            '[' if !in_class => {
                in_class = true;
                out.push('[');
                if chars.peek() == Some(&'^') {
                    out.push(chars.next().unwrap_or('^'));
                }
                if chars.peek() == Some(&']') {
                    out.push(chars.next().unwrap_or(']'));
                }
            }
            '[' if chars.peek() == Some(&':') => {
                // A POSIX class inside a class (`[[:alpha:]]`): its `]` does not close the outer one.
                out.push('[');
                while let Some(c) = chars.next() {
                    out.push(c);
                    if c == ':' && chars.peek() == Some(&']') {
                        out.push(chars.next().unwrap_or(']'));
                        break;
                    }
                }
            }
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

/// Why Istio would refuse `pattern`, if it would.
pub fn problem(pattern: &str) -> Option<String> {
    if pattern.len() > MAX_LENGTH {
        return Some(format!("the regular expression is {} characters long; at most {MAX_LENGTH}", pattern.len()));
    }
    let translated = translate(pattern);
    let invalid = |error: &dyn std::fmt::Display| {
        let last = error.to_string().lines().last().unwrap_or("invalid").trim().to_owned();
        let reason = last.strip_prefix("error: ").unwrap_or(&last).to_owned();
        Some(format!("invalid regular expression: {reason} (RE2 syntax)"))
    };
    let ast = match ast::parse::ParserBuilder::new().nest_limit(NEST_LIMIT).build().parse(&translated) {
        Ok(ast) => ast,
        Err(error) => return invalid(&error),
    };
    if let Err(reason) = ast::visit(&ast, RepeatLimit) {
        return Some(reason);
    }
    // The AST parses; translating it catches what only meaning refuses (an unknown Unicode class, say).
    regex_syntax::hir::translate::Translator::new().translate(&translated, &ast).err().and_then(|e| invalid(&e))
}

/// Refuses a counted repetition above RE2's limit.
struct RepeatLimit;

impl ast::Visitor for RepeatLimit {
    type Output = ();
    type Err = String;

    fn finish(self) -> Result<(), String> {
        Ok(())
    }

    fn visit_pre(&mut self, ast: &Ast) -> Result<(), String> {
        if let Ast::Repetition(repetition) = ast {
            if let RepetitionKind::Range(range) = &repetition.op.kind {
                let largest = match *range {
                    RepetitionRange::Exactly(n) | RepetitionRange::AtLeast(n) => n,
                    RepetitionRange::Bounded(m, n) => m.max(n),
                };
                if largest > MAX_REPEAT {
                    return Err(format!(
                        "invalid regular expression: repetition count {largest} is above RE2's limit of {MAX_REPEAT}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re2_quoting_and_octal_read_as_re2_reads_them() {
        assert_eq!(translate(r"\Qa.b*\E+"), r"a\.b\*+");
        assert_eq!(translate(r"^/\Q[v1]"), r"^/\[v1\]");
        assert_eq!(translate(r"\101\0"), r"\x{41}\x{0}");
        assert_eq!(translate(r"[\Q]"), r"[\Q]", "no quoting inside a class: RE2 refuses it there too");
        assert_eq!(translate(r"[[:alpha:]\]]\d"), r"[[:alpha:]\]]\d");
        for pattern in [r"\Qa.b\E", r"^/api/\Q(v1)\E/.*", r"\101", "^/v[0-9]{1,1000}$", r"(?P<id>\d+)"] {
            assert_eq!(problem(pattern), None, "{pattern}");
        }
        let quoted = regex::Regex::new(&translate(r"^\Q/a.b\E$")).unwrap();
        assert!(quoted.is_match("/a.b") && !quoted.is_match("/axb"));
    }

    #[test]
    fn what_re2_and_istio_refuse_is_refused() {
        for pattern in ["(open", "a{1001}", "x{2,5000}", r"\1", "(?=look)", r"\pX"] {
            assert!(problem(pattern).is_some(), "{pattern}");
        }
        let long = "a".repeat(MAX_LENGTH + 1);
        assert!(problem(&long).unwrap().contains("at most 1024"));
        let deep = format!("{}a{}", "(".repeat(300), ")".repeat(300));
        assert_eq!(problem(&deep), None, "RE2 nests 1000 deep; the regex crate's default of 250 is not the limit");
    }
}
