//! Text that came from a guest (or a peer), made safe to print: terminal
//! control characters are shown escaped, as `git` and `less` do, so a guest
//! cannot clear the screen, set the window title or forge a line.

use std::borrow::Cow;

/// `text` with every control character but newline and tab written as an
/// escape (`\x1b`, `\r`, `\u{9b}`), and nothing else changed.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        // Bidirectional overrides can make text read as something else.
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_obey_and_keeps_the_rest() {
        assert!(matches!(
            escape_controls("plain\ttext\nok é"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_controls("\x1b[2J\x1b]0;title\x07fake\rjob succeeded"),
            "\\x1b[2J\\x1b]0;title\\x07fake\\rjob succeeded"
        );
        assert_eq!(escape_controls("a\u{9b}b\u{202e}c"), "a\\u{9b}b\\u{202e}c");
    }
}
