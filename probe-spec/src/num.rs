//! Number parsing with the kernel's `kstrtoul`/`kstrtol` rules (base 0):
//! `0x` hex, leading `0` octal, otherwise decimal; an optional leading `+`;
//! no trailing garbage (one trailing newline is allowed, as in the kernel).

fn strip_newline(s: &str) -> &str {
    s.strip_suffix('\n').unwrap_or(s)
}

/// Parses an unsigned number as `kstrtoul(s, 0, ..)` does.
pub(crate) fn kstrtoul(s: &str) -> Option<u64> {
    let s = strip_newline(s);
    let s = s.strip_prefix('+').unwrap_or(s);
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Parses a signed number as `kstrtol(s, 0, ..)` does.
pub(crate) fn kstrtol(s: &str) -> Option<i64> {
    let s = strip_newline(s);
    if let Some(neg) = s.strip_prefix('-') {
        if neg.starts_with('+') {
            return None;
        }
        let v = kstrtoul(neg)?;
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        let v = kstrtoul(s)?;
        i64::try_from(v).ok()
    }
}

/// Parses a decimal-only unsigned number (`kstrtoul(s, 10, ..)`).
pub(crate) fn kstrtoul10(s: &str) -> Option<u64> {
    let s = strip_newline(s);
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `simple_strtoul(s, &end, 0)`: parses a prefix, returns value and the rest.
/// Returns `(0, s)` when there are no digits, like the kernel.
pub(crate) fn simple_strtoul(s: &str) -> (u64, &str) {
    let (body, radix, skip) = if (s.starts_with("0x") || s.starts_with("0X"))
        && s[2..].starts_with(|c: char| c.is_ascii_hexdigit())
    {
        (&s[2..], 16, 2)
    } else if s.starts_with('0') {
        (s, 8, 0)
    } else {
        (s, 10, 0)
    };
    let n = body.chars().take_while(|c| c.is_digit(radix)).count();
    if n == 0 {
        return (0, s);
    }
    // Saturate instead of wrapping; the callers range-check the value.
    let v = u64::from_str_radix(&body[..n], radix).unwrap_or(u64::MAX);
    (v, &s[skip + n..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kstrtoul_bases() {
        assert_eq!(kstrtoul("10"), Some(10));
        assert_eq!(kstrtoul("0x10"), Some(16));
        assert_eq!(kstrtoul("010"), Some(8));
        assert_eq!(kstrtoul("0"), Some(0));
        assert_eq!(kstrtoul("+5"), Some(5));
        assert_eq!(kstrtoul("5\n"), Some(5));
        assert_eq!(kstrtoul("08"), None);
        assert_eq!(kstrtoul("0x"), None);
        assert_eq!(kstrtoul(""), None);
        assert_eq!(kstrtoul("-1"), None);
        assert_eq!(kstrtoul("1a"), None);
        assert_eq!(kstrtoul("0xffffffffffffffff"), Some(u64::MAX));
        assert_eq!(kstrtoul("0x10000000000000000"), None);
    }

    #[test]
    fn kstrtol_signs() {
        assert_eq!(kstrtol("-8"), Some(-8));
        assert_eq!(kstrtol("-0x10"), Some(-16));
        assert_eq!(kstrtol("+0x10"), Some(16));
        assert_eq!(kstrtol("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(kstrtol("9223372036854775808"), None);
        assert_eq!(kstrtol("--1"), None);
        assert_eq!(kstrtol("-+1"), None);
    }

    #[test]
    fn simple_strtoul_prefix() {
        assert_eq!(simple_strtoul("4@2/32"), (4, "@2/32"));
        assert_eq!(simple_strtoul("0x4@"), (4, "@"));
        assert_eq!(simple_strtoul("@"), (0, "@"));
        assert_eq!(simple_strtoul("0@"), (0, "@"));
        assert_eq!(kstrtoul10("12"), Some(12));
        assert_eq!(kstrtoul10("0x12"), None);
    }
}
