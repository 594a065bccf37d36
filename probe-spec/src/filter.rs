//! tracefs event filters (Documentation/trace/events.rst, "Event filtering"):
//! `field OP value` predicates joined by `&&`, `||`, `!` and parentheses.
//! Numeric operators `== != < <= > >= &`; string operators `== != ~` (glob).

use std::fmt;

use crate::error::{ErrorCode as E, ParseError};
use crate::eval::{ArgValue, Value};
use crate::num::{kstrtol, kstrtoul};

/// Deepest nesting of parentheses and `!` accepted.
const MAX_DEPTH: usize = 64;
/// Most predicates in one filter.
const MAX_PREDS: usize = 4096;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `&`: bitwise and is non-zero.
    And,
    /// `~`: glob match (strings only).
    Glob,
}

impl FilterOp {
    fn as_str(self) -> &'static str {
        match self {
            FilterOp::Eq => "==",
            FilterOp::Ne => "!=",
            FilterOp::Lt => "<",
            FilterOp::Le => "<=",
            FilterOp::Gt => ">",
            FilterOp::Ge => ">=",
            FilterOp::And => "&",
            FilterOp::Glob => "~",
        }
    }
}

/// The right-hand side of a predicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operand {
    /// The text (without quotes).
    pub text: String,
    /// It was quoted (so it is a string).
    pub quoted: bool,
    /// Its numeric value, when it parses as a number.
    pub number: Option<i128>,
}

/// `field OP value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    /// Field name.
    pub field: String,
    /// Operator.
    pub op: FilterOp,
    /// Value.
    pub value: Operand,
    field_pos: usize,
    op_pos: usize,
    value_pos: usize,
}

/// A parsed filter expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterExpr {
    /// Both hold.
    And(Box<FilterExpr>, Box<FilterExpr>),
    /// Either holds.
    Or(Box<FilterExpr>, Box<FilterExpr>),
    /// Does not hold.
    Not(Box<FilterExpr>),
    /// A comparison.
    Pred(Predicate),
}

/// Type of an event field, for checking a filter before use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Unsigned integer.
    Unsigned,
    /// Signed integer.
    Signed,
    /// String.
    String,
}

/// A field's value at evaluation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValue<'a> {
    /// Unsigned integer.
    Unsigned(u64),
    /// Signed integer.
    Signed(i64),
    /// String bytes.
    Str(&'a [u8]),
}

/// Source of field values for evaluation.
pub trait Fields {
    /// Value of field `name`, `None` if there is none (or it faulted).
    fn field(&self, name: &str) -> Option<FieldValue<'_>>;
}

impl<'v> FieldValue<'v> {
    /// The field form of a fetched value (`None` for faults, arrays...).
    pub fn from_value(v: &'v Value) -> Option<FieldValue<'v>> {
        match v {
            Value::Unsigned { value, .. } | Value::Hex { value, .. } => {
                Some(FieldValue::Unsigned(*value))
            }
            Value::Signed { value, .. } => Some(FieldValue::Signed(*value)),
            Value::Char { value } => Some(FieldValue::Unsigned(u64::from(*value))),
            Value::Symbol { addr, .. } => Some(FieldValue::Unsigned(*addr)),
            Value::Str { bytes, .. } => Some(FieldValue::Str(bytes)),
            _ => None,
        }
    }
}

/// Event fields: fetched args plus extra named values (`common_pid`, `comm`...).
pub struct EventFields<'a> {
    /// Fetched arguments.
    pub args: &'a [ArgValue],
    /// Extra fields, looked up after the args.
    pub extra: &'a [(&'a str, FieldValue<'a>)],
}

impl Fields for EventFields<'_> {
    fn field(&self, name: &str) -> Option<FieldValue<'_>> {
        if let Some(a) = self.args.iter().find(|a| a.name == name) {
            return FieldValue::from_value(&a.value);
        }
        self.extra.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

/// A parsed filter with its source text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The filter text as given.
    pub text: String,
    /// The expression.
    pub expr: FilterExpr,
}

impl Filter {
    /// Parses a filter.
    pub fn parse(text: &str) -> Result<Filter, ParseError> {
        crate::parse::check_length(text, crate::parse::limits::MAX_FILTER_LEN, "filter")?;
        let mut p = FParser {
            text,
            b: text.as_bytes(),
            i: 0,
            depth: 0,
            preds: 0,
        };
        p.skip_ws();
        if p.i == p.b.len() {
            return Err(ParseError::new(E::NO_FILTER, text, 0));
        }
        let expr = p.or()?;
        p.skip_ws();
        if p.i < p.b.len() {
            let code = if p.b[p.i] == b')' {
                E::TOO_MANY_CLOSE
            } else {
                E::INVALID_FILTER
            };
            return Err(ParseError::new(code, text, p.i));
        }
        Ok(Filter {
            text: text.to_string(),
            expr,
        })
    }

    /// Checks field names, operators and value types against the event's
    /// fields (`kind(name)` gives a field's type, `None` if it has none).
    pub fn check(&self, kind: &dyn Fn(&str) -> Option<FieldKind>) -> Result<(), ParseError> {
        check_expr(&self.expr, &self.text, kind)
    }

    /// Evaluates the filter against an event.
    pub fn matches(&self, fields: &dyn Fields) -> bool {
        eval(&self.expr, fields)
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn check_expr(
    e: &FilterExpr,
    text: &str,
    kind: &dyn Fn(&str) -> Option<FieldKind>,
) -> Result<(), ParseError> {
    match e {
        FilterExpr::And(a, b) | FilterExpr::Or(a, b) => {
            check_expr(a, text, kind)?;
            check_expr(b, text, kind)
        }
        FilterExpr::Not(a) => check_expr(a, text, kind),
        FilterExpr::Pred(p) => {
            let k = kind(&p.field)
                .ok_or_else(|| ParseError::new(E::FIELD_NOT_FOUND, text, p.field_pos))?;
            match k {
                FieldKind::String => {
                    if !matches!(p.op, FilterOp::Eq | FilterOp::Ne | FilterOp::Glob) {
                        return Err(ParseError::new(E::ILLEGAL_FIELD_OP, text, p.op_pos));
                    }
                }
                FieldKind::Unsigned | FieldKind::Signed => {
                    if p.op == FilterOp::Glob {
                        return Err(ParseError::new(E::ILLEGAL_FIELD_OP, text, p.op_pos));
                    }
                    if p.value.quoted || p.value.number.is_none() {
                        return Err(ParseError::new(E::ILLEGAL_INTVAL, text, p.value_pos));
                    }
                }
            }
            Ok(())
        }
    }
}

fn eval(e: &FilterExpr, fields: &dyn Fields) -> bool {
    match e {
        FilterExpr::And(a, b) => eval(a, fields) && eval(b, fields),
        FilterExpr::Or(a, b) => eval(a, fields) || eval(b, fields),
        FilterExpr::Not(a) => !eval(a, fields),
        FilterExpr::Pred(p) => {
            let Some(v) = fields.field(&p.field) else {
                return false;
            };
            match v {
                FieldValue::Str(s) => match p.op {
                    FilterOp::Eq => s == p.value.text.as_bytes(),
                    FilterOp::Ne => s != p.value.text.as_bytes(),
                    FilterOp::Glob => glob_match(p.value.text.as_bytes(), s),
                    _ => false,
                },
                FieldValue::Unsigned(_) | FieldValue::Signed(_) => {
                    let (Some(rhs), false) = (p.value.number, p.value.quoted) else {
                        return false;
                    };
                    let lhs = match v {
                        FieldValue::Unsigned(u) => i128::from(u),
                        FieldValue::Signed(s) => i128::from(s),
                        FieldValue::Str(_) => return false,
                    };
                    match p.op {
                        FilterOp::Eq => lhs == rhs,
                        FilterOp::Ne => lhs != rhs,
                        FilterOp::Lt => lhs < rhs,
                        FilterOp::Le => lhs <= rhs,
                        FilterOp::Gt => lhs > rhs,
                        FilterOp::Ge => lhs >= rhs,
                        // Compare bit patterns: -1 means all bits.
                        FilterOp::And => (lhs as u64) & (rhs as u64) != 0,
                        FilterOp::Glob => false,
                    }
                }
            }
        }
    }
}

/// Shell-style glob as the kernel's `glob_match`: `*`, `?`, `[abc]`,
/// `[a-z]`, `[!x]`, `\` escapes.
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with one backtrack point for the last '*' (linear-ish,
    // no recursion, so hostile patterns cannot blow the stack).
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star = Some((p, i));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(&pat[p..], s[i]) {
                        if matched {
                            p += next;
                            i += 1;
                            continue;
                        }
                    } else if s[i] == b'[' {
                        // An unterminated '[' is a literal.
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pat.len() => {
                    if pat[p + 1] == s[i] {
                        p += 2;
                        i += 1;
                        continue;
                    }
                }
                c => {
                    if c == s[i] {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp + 1;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|c| *c == b'*')
}

/// Matches `c` against the class at the start of `pat` (`[...]`); returns
/// (matched, length of the class) or `None` if the class is unterminated.
fn class_match(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut j = 1;
    let negate = matches!(pat.get(j), Some(b'!') | Some(b'^'));
    if negate {
        j += 1;
    }
    let mut matched = false;
    let mut first = true;
    while j < pat.len() {
        let a = pat[j];
        if a == b']' && !first {
            return Some((matched != negate, j + 1));
        }
        first = false;
        if pat.get(j + 1) == Some(&b'-') && pat.get(j + 2).is_some_and(|b| *b != b']') {
            let b = pat[j + 2];
            if a <= c && c <= b {
                matched = true;
            }
            j += 3;
        } else {
            if a == c {
                matched = true;
            }
            j += 1;
        }
    }
    None
}

struct FParser<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    depth: usize,
    preds: usize,
}

impl FParser<'_> {
    fn err(&self, code: E, at: usize) -> ParseError {
        ParseError::new(code, self.text, at)
    }

    fn skip_ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, s: &str) -> bool {
        self.skip_ws();
        if self.b[self.i..].starts_with(s.as_bytes()) {
            self.i += s.len();
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<FilterExpr, ParseError> {
        let mut l = self.and()?;
        while self.eat("||") {
            let r = self.and()?;
            l = FilterExpr::Or(Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<FilterExpr, ParseError> {
        let mut l = self.unary()?;
        while self.eat("&&") {
            let r = self.unary()?;
            l = FilterExpr::And(Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn unary(&mut self) -> Result<FilterExpr, ParseError> {
        self.skip_ws();
        if self.depth >= MAX_DEPTH {
            return Err(self
                .err(E::TOO_MANY_PREDS, self.i)
                .detail("nesting too deep"));
        }
        if self.b.get(self.i) == Some(&b'!') && self.b.get(self.i + 1) != Some(&b'=') {
            self.i += 1;
            self.depth += 1;
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(FilterExpr::Not(Box::new(e)));
        }
        if self.b.get(self.i) == Some(&b'(') {
            let open = self.i;
            self.i += 1;
            self.depth += 1;
            let e = self.or()?;
            self.depth -= 1;
            self.skip_ws();
            if self.b.get(self.i) != Some(&b')') {
                return Err(self.err(E::TOO_MANY_OPEN, open));
            }
            self.i += 1;
            return Ok(e);
        }
        self.pred().map(FilterExpr::Pred)
    }

    fn pred(&mut self) -> Result<Predicate, ParseError> {
        self.skip_ws();
        let field_pos = self.i;
        while self.i < self.b.len()
            && (self.b[self.i].is_ascii_alphanumeric()
                || matches!(self.b[self.i], b'_' | b'.' | b'$'))
        {
            self.i += 1;
        }
        if self.i == field_pos {
            let code = match self.b.get(self.i) {
                None => E::INVALID_FILTER,
                Some(b')') => E::TOO_MANY_CLOSE,
                Some(_) => E::INVALID_OP,
            };
            return Err(self.err(code, self.i));
        }
        let field = self.text[field_pos..self.i].to_string();
        self.skip_ws();
        let op_pos = self.i;
        let rest = &self.b[self.i..];
        let (op, len) = if rest.starts_with(b"==") {
            (FilterOp::Eq, 2)
        } else if rest.starts_with(b"!=") {
            (FilterOp::Ne, 2)
        } else if rest.starts_with(b"<=") {
            (FilterOp::Le, 2)
        } else if rest.starts_with(b">=") {
            (FilterOp::Ge, 2)
        } else if rest.starts_with(b"<") {
            (FilterOp::Lt, 1)
        } else if rest.starts_with(b">") {
            (FilterOp::Gt, 1)
        } else if rest.starts_with(b"&") && !rest.starts_with(b"&&") {
            (FilterOp::And, 1)
        } else if rest.starts_with(b"~") {
            (FilterOp::Glob, 1)
        } else {
            return Err(self.err(E::INVALID_OP, op_pos));
        };
        self.i += len;
        self.skip_ws();
        let value_pos = self.i;
        let value = self.operand()?;
        self.preds += 1;
        if self.preds > MAX_PREDS {
            return Err(self.err(E::TOO_MANY_PREDS, field_pos));
        }
        Ok(Predicate {
            field,
            op,
            value,
            field_pos,
            op_pos,
            value_pos,
        })
    }

    fn operand(&mut self) -> Result<Operand, ParseError> {
        let start = self.i;
        match self.b.get(self.i) {
            None => Err(self.err(E::INVALID_FILTER, start).detail("missing value")),
            Some(&q) if q == b'"' || q == b'\'' => {
                let body = start + 1;
                let Some(len) = self.b[body..].iter().position(|c| *c == q) else {
                    return Err(self.err(E::MISSING_QUOTE, start));
                };
                self.i = body + len + 1;
                Ok(Operand {
                    text: self.text[body..body + len].to_string(),
                    quoted: true,
                    number: None,
                })
            }
            Some(_) => {
                while self.i < self.b.len()
                    && !self.b[self.i].is_ascii_whitespace()
                    && !matches!(
                        self.b[self.i],
                        b'(' | b')' | b'&' | b'|' | b'!' | b'=' | b'<' | b'>' | b'~'
                    )
                {
                    self.i += 1;
                }
                if self.i == start {
                    return Err(self.err(E::INVALID_FILTER, start).detail("missing value"));
                }
                let text = &self.text[start..self.i];
                let number = kstrtoul(text)
                    .map(i128::from)
                    .or_else(|| kstrtol(text).map(i128::from));
                Ok(Operand {
                    text: text.to_string(),
                    quoted: false,
                    number,
                })
            }
        }
    }
}

impl fmt::Display for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ", self.field, self.op.as_str())?;
        if self.value.quoted {
            write!(f, "\"{}\"", self.value.text)
        } else {
            f.write_str(&self.value.text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"/etc/*", b"/etc/passwd"));
        assert!(!glob_match(b"/etc/*", b"/usr/etc/x"));
        assert!(glob_match(b"*sh", b"bash"));
        assert!(glob_match(b"*as*", b"bash"));
        assert!(glob_match(b"b?sh", b"bash"));
        assert!(glob_match(b"[ab]ash", b"bash"));
        assert!(glob_match(b"[a-c]ash", b"bash"));
        assert!(!glob_match(b"[!b]ash", b"bash"));
        assert!(glob_match(b"a\\*", b"a*"));
        assert!(!glob_match(b"a\\*", b"ab"));
        assert!(glob_match(b"[x", b"[x"));
        assert!(!glob_match(b"abc", b"ab"));
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
        assert!(!glob_match(b"a*b*c", b"axxbyy"));
    }
}
