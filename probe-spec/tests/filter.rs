//! tracefs event filters: parsing with positions, type checks, evaluation.

use probe_spec::*;

fn fields() -> Vec<ArgValue> {
    vec![
        ArgValue {
            name: "dfd".into(),
            ty: "s32".into(),
            value: Value::Signed {
                bits: 32,
                value: -100,
            },
        },
        ArgValue {
            name: "flags".into(),
            ty: "x32".into(),
            value: Value::Hex {
                bits: 32,
                value: 0x8241,
            },
        },
        ArgValue {
            name: "path".into(),
            ty: "string".into(),
            value: Value::Str {
                bytes: b"/etc/passwd".to_vec(),
                truncated: false,
            },
        },
        ArgValue {
            name: "bad".into(),
            ty: "u64".into(),
            value: Value::Fault { addr: 0 },
        },
    ]
}

fn check(text: &str) -> bool {
    let f = Filter::parse(text).unwrap_or_else(|e| panic!("{e}"));
    let args = fields();
    let extra = [
        ("common_pid", FieldValue::Signed(42)),
        ("comm", FieldValue::Str(b"bash")),
    ];
    let ev = EventFields {
        args: &args,
        extra: &extra,
    };
    f.matches(&ev)
}

fn kind(name: &str) -> Option<FieldKind> {
    match name {
        "dfd" | "common_pid" => Some(FieldKind::Signed),
        "flags" | "bad" => Some(FieldKind::Unsigned),
        "path" | "comm" => Some(FieldKind::String),
        _ => None,
    }
}

#[track_caller]
fn parse_err(text: &str, code: ErrorCode, at: usize) {
    let e = Filter::parse(text).expect_err(text);
    assert_eq!((e.code, e.pos), (code, at), "{text}: {e}");
}

#[track_caller]
fn check_err(text: &str, code: ErrorCode, at: usize) {
    let f = Filter::parse(text).unwrap_or_else(|e| panic!("{e}"));
    let e = f.check(&kind).expect_err(text);
    assert_eq!((e.code, e.pos), (code, at), "{text}: {e}");
}

#[test]
fn numeric_predicates() {
    assert!(check("dfd == -100"));
    assert!(!check("dfd != -100"));
    assert!(check("dfd < 0"));
    assert!(check("dfd <= -100"));
    assert!(!check("dfd > -100"));
    assert!(check("dfd >= -100"));
    assert!(check("flags & 0x40"));
    assert!(!check("flags & 0x2"));
    assert!(check("flags == 33345"));
    assert!(check("flags == 0x8241"));
    assert!(check("common_pid == 42"));
    // A faulted field never matches.
    assert!(!check("bad == 0"));
    assert!(!check("bad != 0"));
    // Unknown field at evaluation: no match.
    assert!(!check("nosuch == 1"));
}

#[test]
fn string_predicates() {
    assert!(check("path == \"/etc/passwd\""));
    assert!(check("path == '/etc/passwd'"));
    assert!(check("path == /etc/passwd"));
    assert!(check("path != \"/etc/shadow\""));
    assert!(check("path ~ \"/etc/*\""));
    assert!(check("path ~ \"*pass*\""));
    assert!(!check("path ~ \"/usr/*\""));
    assert!(check("comm == bash"));
    assert!(check("comm ~ \"ba?h\""));
}

#[test]
fn logic_and_precedence() {
    assert!(check("dfd == -100 && path ~ \"/etc/*\""));
    assert!(!check("dfd == 1 && path ~ \"/etc/*\""));
    assert!(check("dfd == 1 || path ~ \"/etc/*\""));
    // && binds tighter than ||.
    assert!(check("dfd == 1 && comm == zsh || common_pid == 42"));
    assert!(!check("dfd == 1 && (comm == zsh || common_pid == 42)"));
    assert!(check("!(dfd == 1)"));
    assert!(!check("!dfd == -100"));
    assert!(check("!!(dfd == -100)"));
    assert!(check("((dfd==-100))&&(flags&1)"));
}

#[test]
fn parse_errors_with_positions() {
    parse_err("", ErrorCode::NO_FILTER, 0);
    parse_err("   ", ErrorCode::NO_FILTER, 0);
    parse_err("dfd", ErrorCode::INVALID_OP, 3);
    parse_err("dfd =! 3", ErrorCode::INVALID_OP, 4);
    parse_err("dfd == ", ErrorCode::INVALID_FILTER, 7);
    parse_err("path == \"abc", ErrorCode::MISSING_QUOTE, 8);
    parse_err("(dfd == 1", ErrorCode::TOO_MANY_OPEN, 0);
    parse_err("dfd == 1)", ErrorCode::TOO_MANY_CLOSE, 8);
    parse_err("dfd == 1 &&", ErrorCode::INVALID_FILTER, 11);
    parse_err("dfd == 1 dfd == 2", ErrorCode::INVALID_FILTER, 9);
    parse_err("== 1", ErrorCode::INVALID_OP, 0);
    parse_err(")", ErrorCode::TOO_MANY_CLOSE, 0);
    let deep = format!("{}dfd == 1{}", "(".repeat(100), ")".repeat(100));
    assert_eq!(
        Filter::parse(&deep).unwrap_err().code,
        ErrorCode::TOO_MANY_PREDS
    );
    let e = Filter::parse("dfd == 1)").unwrap_err();
    assert!(e.to_string().contains("TOO_MANY_CLOSE"));
}

#[test]
fn type_checks_against_fields() {
    Filter::parse("dfd == -1 && path ~ \"/x*\" && flags & 4")
        .unwrap()
        .check(&kind)
        .unwrap();
    check_err("nosuch == 1", ErrorCode::FIELD_NOT_FOUND, 0);
    check_err("dfd == 1 && nosuch == 1", ErrorCode::FIELD_NOT_FOUND, 12);
    check_err("path < 3", ErrorCode::ILLEGAL_FIELD_OP, 5);
    check_err("dfd ~ 3", ErrorCode::ILLEGAL_FIELD_OP, 4);
    check_err("dfd == abc", ErrorCode::ILLEGAL_INTVAL, 7);
    check_err("dfd == \"1\"", ErrorCode::ILLEGAL_INTVAL, 7);
}
