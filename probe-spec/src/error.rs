//! Errors in the style of the kernel's `trace_probe_log` / `tracing/error_log`:
//! a code, the word (argv index) it happened in and a character position,
//! rendered with a caret under the position.

use std::fmt;

macro_rules! error_codes {
    ($($(#[$m:meta])* $name:ident => $text:literal,)*) => {
        /// Error codes. The probe-definition codes are the kernel's
        /// `TP_ERR_*` names (kernel/trace/trace_probe.h); the filter codes are
        /// those of kernel/trace/trace_events_filter.c.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        pub enum ErrorCode {
            $($(#[$m])* $name,)*
        }

        impl ErrorCode {
            /// The code as the kernel spells it, e.g. `"BAD_REG_NAME"`.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$name => stringify!($name),)* }
            }

            /// The kernel's human-readable text for the code.
            pub fn message(self) -> &'static str {
                match self { $(ErrorCode::$name => $text,)* }
            }
        }
    };
}

error_codes! {
    // --- probe definitions (trace_probe.h) ---
    BAD_MAXACT_TYPE => "Maxactive is only for function exit",
    BAD_MAXACT => "Invalid maxactive number",
    MAXACT_TOO_BIG => "Maxactive is too big",
    BAD_PROBE_ADDR => "Invalid probed address or symbol",
    BAD_RETPROBE => "Retprobe address must be an function entry",
    BAD_ADDR_SUFFIX => "Invalid probed address suffix",
    NO_GROUP_NAME => "Group name is not specified",
    GROUP_TOO_LONG => "Group name is too long",
    BAD_GROUP_NAME => "Group name must follow the same rules as C identifiers",
    NO_EVENT_NAME => "Event name is not specified",
    EVENT_TOO_LONG => "Event name is too long",
    BAD_EVENT_NAME => "Event name must follow the same rules as C identifiers",
    RETVAL_ON_PROBE => "$retval is not available on probe",
    NO_RETVAL => "This function returns 'void' type",
    BAD_STACK_NUM => "Invalid stack number",
    BAD_ARG_NUM => "Invalid argument number",
    BAD_VAR => "Invalid $-valiable specified",
    BAD_REG_NAME => "Invalid register name",
    BAD_MEM_ADDR => "Invalid memory address",
    BAD_IMM => "Invalid immediate value",
    IMMSTR_NO_CLOSE => "String is not closed with '\"'",
    FILE_ON_KPROBE => "File offset is not available with kprobe",
    TOO_MANY_OPS => "Dereference is too much nested",
    DEREF_NEED_BRACE => "Dereference needs a brace",
    BAD_DEREF_OFFS => "Invalid dereference offset",
    DEREF_OPEN_BRACE => "Dereference brace is not closed",
    COMM_CANT_DEREF => "$comm can not be dereferenced",
    BAD_FETCH_ARG => "Invalid fetch argument",
    ARRAY_NO_CLOSE => "Array is not closed",
    BAD_ARRAY_SUFFIX => "Array has wrong suffix",
    BAD_ARRAY_NUM => "Invalid array size",
    ARRAY_TOO_BIG => "Array number is too big",
    BAD_TYPE => "Unknown type is specified",
    BAD_STRING => "String accepts only memory argument",
    BAD_SYMSTRING => "Symbol String doesn't accept data/userdata",
    BAD_BITFIELD => "Invalid bitfield",
    ARG_NAME_TOO_LONG => "Argument name is too long",
    NO_ARG_NAME => "Argument name is not specified",
    BAD_ARG_NAME => "Argument name must follow the same rules as C identifiers",
    USED_ARG_NAME => "This argument name is already used",
    ARG_TOO_LONG => "Argument expression is too long",
    NO_ARG_BODY => "No argument expression",
    NOSUP_BTFARG => "BTF is not available or not supported",
    NO_BTFARG => "This variable is not found at this probe point",
    NOFENTRY_ARGS => "$arg* can be used only on function entry or exit",
    NO_PTR_STRCT => "This is not a pointer to union/structure.",
    NOSUP_DAT_ARG => "Non pointer structure/union argument is not supported.",
    BAD_HYPHEN => "Failed to parse single hyphen. Forgot '>'?",
    NO_BTF_FIELD => "This field is not found.",
    BAD_TYPE4STR => "This type does not fit for string.",
    NEED_STRING_TYPE => "$comm and immediate-string only accepts string type",
    TOO_MANY_ARGS => "Too many arguments are specified",
    /// Not a kernel code: the line is not a `p`, `r` or `-` command (the
    /// kernel silently hands such lines to other dynamic-event parsers).
    BAD_COMMAND => "Unknown probe command (expected 'p', 'r' or '-')",
    /// Not a kernel code: an unresolved `@SYM` in a fetch argument.
    NO_SYMBOL => "Symbol is not found",
    /// Not a kernel code: a definition or filter longer than the kernel
    /// takes (the kernel refuses the write with -EINVAL and a warning).
    TOO_LONG => "Input is too long",

    // --- event filters (trace_events_filter.c) ---
    INVALID_OP => "Illegal operation",
    TOO_MANY_OPEN => "Too many '('",
    TOO_MANY_CLOSE => "Too few '('",
    MISSING_QUOTE => "Missing matching quote",
    OPERAND_TOO_LONG => "Operand too long",
    EXPECT_STRING => "Expecting string field",
    EXPECT_DIGIT => "Expecting numeric field",
    ILLEGAL_FIELD_OP => "Illegal operation for field type",
    FIELD_NOT_FOUND => "Field not found",
    ILLEGAL_INTVAL => "Illegal integer value",
    TOO_MANY_PREDS => "Too many terms in predicate expression",
    INVALID_FILTER => "Meaningless filter expression",
    NO_FILTER => "No filter found",
}

/// A parse (or resolve) error with the position it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// What went wrong.
    pub code: ErrorCode,
    /// The text that was parsed (a kprobe_events line or a filter).
    pub text: String,
    /// Position of the error in `text`, counted in characters from 0. May be
    /// `text`'s length (the error is "after the end").
    pub pos: usize,
    /// For probe definitions: the whitespace-separated word the error is in,
    /// as the kernel's `trace_probe_log` index (0 = the `p:GRP/EVENT` word,
    /// 1 = the probe point, 2.. = fetch arguments).
    pub word: Option<usize>,
    /// Extra detail beyond the kernel's text (e.g. a suggestion).
    pub detail: Option<String>,
}

impl ParseError {
    pub(crate) fn new(code: ErrorCode, text: &str, byte_pos: usize) -> Self {
        let byte_pos = byte_pos.min(text.len());
        // Byte positions may land inside a multi-byte char on odd input;
        // count the chars that start before it.
        let pos = text
            .char_indices()
            .take_while(|(i, _)| *i < byte_pos)
            .count();
        ParseError {
            code,
            text: text.to_string(),
            pos,
            word: None,
            detail: None,
        }
    }

    pub(crate) fn word(mut self, word: usize) -> Self {
        self.word = Some(word);
        self
    }

    pub(crate) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Index (0-based) of the fetch argument the error is in, if any.
    pub fn fetch_arg_index(&self) -> Option<usize> {
        self.word.and_then(|w| w.checked_sub(2))
    }

    /// One-line summary: `CODE: text (arg N, position P)`.
    pub fn summary(&self) -> String {
        let mut s = format!("{}: {}", self.code.as_str(), self.code.message());
        if let Some(d) = &self.detail {
            s.push_str(" (");
            s.push_str(d);
            s.push(')');
        }
        match self.fetch_arg_index() {
            Some(a) => s.push_str(&format!(" at arg {}, position {}", a + 1, self.pos)),
            None => s.push_str(&format!(" at position {}", self.pos)),
        }
        s
    }

    /// The part of the text around the position that errors quote.
    pub fn excerpt(&self) -> Excerpt {
        Excerpt::around(&self.text, self.pos)
    }

    /// The text (at most [`EXCERPT_RADIUS`] characters either side of the
    /// position, "…" marking a cut) with a caret under the position, as
    /// tracefs `error_log` shows it.
    pub fn render_caret(&self) -> String {
        self.excerpt().render()
    }
}

/// Most characters an error quotes on either side of its position: errors
/// about a long (or hostile) input stay short.
pub const EXCERPT_RADIUS: usize = 64;

/// A window of a text around a position, for quoting it in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excerpt {
    /// The quoted characters (the whole text when it is short enough).
    pub text: String,
    /// Characters of the whole text before `text` (0 unless cut at the start).
    pub offset: usize,
    /// The position in `text`, in characters.
    pub pos: usize,
    /// Characters of the whole text after `text` (0 unless cut at the end).
    pub after: usize,
}

impl Excerpt {
    /// At most [`EXCERPT_RADIUS`] characters of `text` either side of the
    /// character position `pos` (clamped to the text's length).
    pub fn around(text: &str, pos: usize) -> Excerpt {
        let total = text.chars().count();
        let pos = pos.min(total);
        let offset = pos.saturating_sub(EXCERPT_RADIUS);
        let end = pos.saturating_add(EXCERPT_RADIUS).min(total);
        Excerpt {
            text: text.chars().skip(offset).take(end - offset).collect(),
            offset,
            pos: pos - offset,
            after: total - end,
        }
    }

    /// `  TEXT` with a caret line under the position; "…" marks a cut end.
    /// Tabs and other control chars would misalign the caret; they show as
    /// spaces.
    pub fn render(&self) -> String {
        let line: String = self
            .text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let (pre, post) = (
            if self.offset > 0 { "…" } else { "" },
            if self.after > 0 { "…" } else { "" },
        );
        let indent = self.pos + pre.chars().count();
        format!("  {pre}{line}{post}\n  {}^", " ".repeat(indent))
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n{}", self.summary(), self.render_caret())
    }
}

impl std::error::Error for ParseError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caret_is_under_the_position() {
        let e = ParseError::new(ErrorCode::BAD_REG_NAME, "p foo %bar", 6).word(2);
        assert_eq!(e.pos, 6);
        assert_eq!(e.fetch_arg_index(), Some(0));
        let s = e.to_string();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines[0],
            "BAD_REG_NAME: Invalid register name at arg 1, position 6"
        );
        assert_eq!(lines[1], "  p foo %bar");
        assert_eq!(lines[2].find('^'), Some(2 + 6));
    }

    #[test]
    fn long_texts_are_quoted_around_the_position_only() {
        let long = format!("p {} %bar {}", "a".repeat(5000), "b".repeat(5000));
        let e = ParseError::new(ErrorCode::BAD_REG_NAME, &long, 5003).word(2);
        let x = e.excerpt();
        assert_eq!((x.offset, x.pos), (5003 - EXCERPT_RADIUS, EXCERPT_RADIUS));
        assert_eq!(x.text.chars().count(), 2 * EXCERPT_RADIUS);
        assert_eq!(x.after, long.len() - 5003 - EXCERPT_RADIUS);
        assert_eq!(&x.text[x.pos..x.pos + 4], "%bar");
        let s = e.to_string();
        assert!(s.len() < 400, "{} bytes", s.len());
        let lines: Vec<&str> = s.lines().collect();
        assert!(
            lines[1].starts_with("  …a") && lines[1].ends_with("b…"),
            "{s}"
        );
        // The caret stays under the '%' with the leading ellipsis.
        let caret = lines[2].chars().position(|c| c == '^').unwrap();
        assert_eq!(lines[1].chars().nth(caret), Some('%'));
        // Short texts are quoted whole, without ellipses.
        let x = Excerpt::around("p foo %bar", 6);
        assert_eq!(
            (x.text.as_str(), x.offset, x.pos, x.after),
            ("p foo %bar", 0, 6, 0)
        );
        assert!(!x.render().contains('…'));
        // Past the end is clamped, multi-byte chars are counted as one.
        let x = Excerpt::around(&"é".repeat(200), 500);
        assert_eq!((x.offset, x.pos, x.after), (136, 64, 0));
    }

    #[test]
    fn position_counts_chars_not_bytes() {
        let e = ParseError::new(ErrorCode::BAD_TYPE, "p é x", 5);
        assert_eq!(e.pos, 4);
        // A byte position inside a char or past the end does not panic.
        let e = ParseError::new(ErrorCode::BAD_TYPE, "é", 1);
        assert_eq!(e.pos, 1);
        let e = ParseError::new(ErrorCode::BAD_TYPE, "ab", 99);
        assert_eq!(e.pos, 2);
    }
}
