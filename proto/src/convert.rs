//! Conversions from probe-spec's types to the API's messages, and the
//! INVALID_ARGUMENT status carrying a [`DefinitionError`] in its details.

use prost::Message;
use tonic::{Code, Status};

use crate::v1;
use crate::v1::DefinitionError;

/// Type URL of [`DefinitionError`] inside `google.protobuf.Any`.
pub const DEFINITION_ERROR_TYPE_URL: &str = "type.googleapis.com/hvprobe.v1.DefinitionError";

/// The [`DefinitionError`] for a parse error; `batch_index` is the failing
/// definition's index in a `CreateProbes` call.
pub fn definition_error(err: &probe_spec::ParseError, batch_index: Option<u32>) -> DefinitionError {
    DefinitionError {
        code: err.code.as_str().to_string(),
        message: match &err.detail {
            Some(d) => format!("{} ({d})", err.code.message()),
            None => err.code.message().to_string(),
        },
        arg_index: err.fetch_arg_index().and_then(|i| u32::try_from(i).ok()),
        batch_index,
        ..excerpt_fields(&err.excerpt())
    }
}

/// The `text`, `position`, `text_offset` and `rendered` fields of a
/// [`DefinitionError`] quoting `excerpt` (the rest left default).
pub fn excerpt_fields(excerpt: &probe_spec::Excerpt) -> DefinitionError {
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    DefinitionError {
        text: excerpt.text.clone(),
        position: n(excerpt.pos),
        text_offset: n(excerpt.offset),
        rendered: excerpt.render(),
        ..Default::default()
    }
}

/// An INVALID_ARGUMENT status for a parse error: the message reads
/// `CODE: text at arg N, position P` (prefixed with the batch index if
/// any), and the details hold a `google.rpc.Status` whose `details` carry the
/// [`DefinitionError`].
pub fn invalid_definition(err: &probe_spec::ParseError, batch_index: Option<u32>) -> Status {
    let detail = definition_error(err, batch_index);
    let message = match batch_index {
        Some(i) => format!("definition {i}: {}", err.summary()),
        None => err.summary(),
    };
    let rpc_status = tonic_types::pb::Status {
        code: Code::InvalidArgument as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: DEFINITION_ERROR_TYPE_URL.to_string(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(
        Code::InvalidArgument,
        message,
        rpc_status.encode_to_vec().into(),
    )
}

/// The [`DefinitionError`] inside a status made by [`invalid_definition`]
/// (for clients and tests).
pub fn definition_error_from_status(status: &Status) -> Option<DefinitionError> {
    let rpc = tonic_types::pb::Status::decode(status.details()).ok()?;
    rpc.details
        .iter()
        .find(|a| a.type_url == DEFINITION_ERROR_TYPE_URL)
        .and_then(|a| DefinitionError::decode(a.value.as_slice()).ok())
}

impl From<&probe_spec::Value> for v1::Value {
    fn from(v: &probe_spec::Value) -> Self {
        use probe_spec::Value as V;
        use v1::value::Kind;
        let kind = match v {
            V::Unsigned { bits, value } => Kind::Unsigned(v1::UnsignedValue {
                value: *value,
                bits: u32::from(*bits),
            }),
            V::Signed { bits, value } => Kind::Signed(v1::SignedValue {
                value: *value,
                bits: u32::from(*bits),
            }),
            V::Hex { bits, value } => Kind::Hex(v1::UnsignedValue {
                value: *value,
                bits: u32::from(*bits),
            }),
            V::Char { value } => Kind::Char(u32::from(*value)),
            V::Str { bytes, truncated } => Kind::String(v1::StringValue {
                text: String::from_utf8_lossy(bytes).into_owned(),
                raw: bytes.clone(),
                truncated: *truncated,
            }),
            V::Symbol { addr, name } => Kind::Symbol(v1::SymbolValue {
                address: *addr,
                symbol: name.clone().unwrap_or_default(),
            }),
            V::Array { elements } => Kind::Array(v1::ArrayValue {
                elements: elements.iter().map(v1::Value::from).collect(),
            }),
            V::Fault { addr } => Kind::Fault(v1::FaultValue { address: *addr }),
            // No value: the message's `text` says "(unavailable)".
            V::Unavailable { .. } => return v1::Value { kind: None },
        };
        v1::Value { kind: Some(kind) }
    }
}

/// By value: a string's bytes move into the message (no copy of `raw`).
impl From<probe_spec::Value> for v1::Value {
    fn from(v: probe_spec::Value) -> Self {
        use probe_spec::Value as V;
        use v1::value::Kind;
        match v {
            V::Str { bytes, truncated } => v1::Value {
                kind: Some(Kind::String(v1::StringValue {
                    text: String::from_utf8_lossy(&bytes).into_owned(),
                    raw: bytes,
                    truncated,
                })),
            },
            V::Symbol { addr, name } => v1::Value {
                kind: Some(Kind::Symbol(v1::SymbolValue {
                    address: addr,
                    symbol: name.unwrap_or_default(),
                })),
            },
            V::Array { elements } => v1::Value {
                kind: Some(Kind::Array(v1::ArrayValue {
                    elements: elements.into_iter().map(v1::Value::from).collect(),
                })),
            },
            other => v1::Value::from(&other),
        }
    }
}

impl From<&probe_spec::ArgValue> for v1::FetchedArg {
    fn from(a: &probe_spec::ArgValue) -> Self {
        v1::FetchedArg {
            name: a.name.clone(),
            r#type: a.ty.clone(),
            value: Some(v1::Value::from(&a.value)),
            text: a.value.to_string(),
        }
    }
}

impl From<probe_spec::ProbeKind> for v1::ProbeKind {
    fn from(k: probe_spec::ProbeKind) -> Self {
        match k {
            probe_spec::ProbeKind::Kprobe => v1::ProbeKind::Kprobe,
            probe_spec::ProbeKind::Kretprobe { .. } => v1::ProbeKind::Kretprobe,
        }
    }
}

/// The kprobe_events line equivalent to a structured [`v1::ProbeSpec`], for
/// parsing with probe-spec (so both forms share one grammar and one set of
/// errors). Fails with a message naming the bad field.
pub fn spec_to_line(spec: &v1::ProbeSpec) -> Result<String, String> {
    let kind = v1::ProbeKind::try_from(spec.kind)
        .map_err(|_| format!("kind: unknown value {}", spec.kind))?;
    let is_return = kind == v1::ProbeKind::Kretprobe;
    // Whitespace would split a field into several words of the line.
    let has_space = |s: &str| s.chars().any(char::is_whitespace);
    for (field, v) in [("group", &spec.group), ("event", &spec.event)] {
        if has_space(v) {
            return Err(format!("{field}: whitespace is not allowed"));
        }
    }
    let mut line = String::from(if is_return { "r" } else { "p" });
    if spec.maxactive != 0 {
        if !is_return {
            return Err("maxactive: only for kretprobes".into());
        }
        line.push_str(&spec.maxactive.to_string());
    }
    if !spec.group.is_empty() || !spec.event.is_empty() {
        line.push(':');
        if !spec.group.is_empty() {
            line.push_str(&spec.group);
            line.push('/');
        }
        line.push_str(&spec.event);
    }
    line.push(' ');
    match &spec.location {
        Some(v1::probe_spec::Location::Symbol(s)) => {
            if s.symbol.is_empty() {
                return Err("symbol.symbol: empty".into());
            }
            if has_space(&s.symbol) || has_space(&s.module) {
                return Err("symbol: whitespace is not allowed".into());
            }
            if !s.module.is_empty() {
                line.push_str(&s.module);
                line.push(':');
            }
            line.push_str(&s.symbol);
            if s.offset != 0 {
                line.push_str(&format!("+{}", s.offset));
            }
        }
        Some(v1::probe_spec::Location::Address(a)) => line.push_str(&format!("0x{a:x}")),
        None => return Err("location: missing (symbol or address)".into()),
    }
    if spec.hardware {
        line.push_str("%hw");
    }
    for (i, a) in spec.args.iter().enumerate() {
        if has_space(&a.name) || has_space(&a.expression) || has_space(&a.r#type) {
            return Err(format!("args[{i}]: whitespace is not allowed"));
        }
        if a.expression.is_empty() {
            return Err(format!("args[{i}].expression: empty"));
        }
        line.push(' ');
        if !a.name.is_empty() {
            line.push_str(&a.name);
            line.push('=');
        }
        line.push_str(&a.expression);
        if !a.r#type.is_empty() {
            line.push(':');
            line.push_str(&a.r#type);
        }
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_converts_the_same_by_value_and_by_reference() {
        use probe_spec::Value as V;
        let all = vec![
            V::Unsigned { bits: 8, value: 5 },
            V::Signed {
                bits: 32,
                value: -2,
            },
            V::Hex {
                bits: 64,
                value: 0xff,
            },
            V::Char { value: b'x' },
            V::Str {
                bytes: b"a\xffb".to_vec(),
                truncated: true,
            },
            V::Symbol {
                addr: 0x10,
                name: Some("f+0x0/0x4".into()),
            },
            V::Symbol {
                addr: 0x20,
                name: None,
            },
            V::Array {
                elements: vec![
                    V::Str {
                        bytes: b"x".to_vec(),
                        truncated: false,
                    },
                    V::Fault { addr: 8 },
                ],
            },
            V::Fault { addr: 0x99 },
            V::Unavailable {
                reason: "why".into(),
            },
        ];
        for v in all {
            let by_ref = v1::Value::from(&v);
            assert_eq!(v1::Value::from(v.clone()), by_ref, "{v:?}");
        }
    }

    #[test]
    fn invalid_definition_status_carries_details() {
        let err = probe_spec::parse_probe("p:ev do_sys_openat2 path=+0(%rsi):string").unwrap_err();
        let st = invalid_definition(&err, Some(2));
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(
            st.message().starts_with("definition 2: BAD_REG_NAME"),
            "{}",
            st.message()
        );
        let d = definition_error_from_status(&st).expect("details decode");
        assert_eq!(d.code, "BAD_REG_NAME");
        assert_eq!(d.position, 28);
        assert_eq!(d.arg_index, Some(0));
        assert_eq!(d.batch_index, Some(2));
        assert!(d.rendered.contains('^'));
    }

    #[test]
    fn long_definitions_are_quoted_around_the_error_once() {
        // ~3,700 characters (within the line limit), the bad register ~700 in.
        let line = format!(
            "p:g/e hv_fib {} bad=%rsi {}",
            (0..200).map(|i| format!("a{i}=%di")).collect::<Vec<_>>()[..100].join(" "),
            "x".repeat(3000)
        );
        assert!(line.len() > 3500 && line.len() <= probe_spec::limits::MAX_LINE_LEN);
        let err = probe_spec::parse_probe(&line).unwrap_err();
        assert_eq!(err.code.as_str(), "BAD_REG_NAME");
        let st = invalid_definition(&err, None);
        assert!(st.details().len() < 600, "{} bytes", st.details().len());
        assert!(st.message().len() < 200, "{}", st.message());
        let d = definition_error_from_status(&st).unwrap();
        assert_eq!(d.text.chars().count(), 128);
        assert_eq!(d.text_offset as usize + d.position as usize, err.pos);
        assert!(d.text[d.position as usize..].starts_with("%rsi"), "{d:?}");
        assert!(
            d.rendered.starts_with("  …") && d.rendered.contains("x…\n"),
            "{}",
            d.rendered
        );
        // A short definition is quoted whole.
        let e = probe_spec::parse_probe("p hv_fib %rsi").unwrap_err();
        let d = definition_error(&e, None);
        assert_eq!(
            (d.text.as_str(), d.position, d.text_offset),
            ("p hv_fib %rsi", 9, 0)
        );
    }

    #[test]
    fn values_convert() {
        let v = probe_spec::Value::Array {
            elements: vec![
                probe_spec::Value::Signed {
                    bits: 32,
                    value: -1,
                },
                probe_spec::Value::Fault { addr: 8 },
            ],
        };
        let p = v1::Value::from(&v);
        let Some(v1::value::Kind::Array(a)) = p.kind else {
            panic!("{p:?}")
        };
        assert_eq!(
            a.elements[0].kind,
            Some(v1::value::Kind::Signed(v1::SignedValue {
                value: -1,
                bits: 32
            }))
        );
        assert_eq!(
            a.elements[1].kind,
            Some(v1::value::Kind::Fault(v1::FaultValue { address: 8 }))
        );
        let arg = probe_spec::ArgValue {
            name: "p".into(),
            ty: "string".into(),
            value: probe_spec::Value::Str {
                bytes: b"/etc\xff".to_vec(),
                truncated: true,
            },
        };
        let f = v1::FetchedArg::from(&arg);
        assert_eq!(f.text, "\"/etc\\xff\"");
        let Some(v1::value::Kind::String(s)) = f.value.unwrap().kind else {
            panic!()
        };
        assert_eq!(s.raw, b"/etc\xff");
        assert!(s.truncated);
    }

    #[test]
    fn structured_spec_becomes_a_parsable_line() {
        let spec = v1::ProbeSpec {
            group: "fs".into(),
            event: "open".into(),
            kind: v1::ProbeKind::Kretprobe as i32,
            location: Some(v1::probe_spec::Location::Symbol(v1::SymbolLocation {
                module: String::new(),
                symbol: "do_sys_openat2".into(),
                offset: 0,
            })),
            maxactive: 16,
            args: vec![
                v1::FetchArgSpec {
                    name: "path".into(),
                    expression: "+0($arg2)".into(),
                    r#type: "string".into(),
                },
                v1::FetchArgSpec {
                    name: String::new(),
                    expression: "$retval".into(),
                    r#type: "s64".into(),
                },
            ],
            hardware: false,
        };
        let line = spec_to_line(&spec).unwrap();
        assert_eq!(
            line,
            "r16:fs/open do_sys_openat2 path=+0($arg2):string $retval:s64"
        );
        let def = probe_spec::parse_probe(&line).unwrap();
        assert_eq!(def.full_name(), "fs/open");
        assert_eq!(def.args.len(), 2);

        let hw = v1::ProbeSpec {
            hardware: true,
            ..spec.clone()
        };
        let line = spec_to_line(&hw).unwrap();
        assert_eq!(
            line,
            "r16:fs/open do_sys_openat2%hw path=+0($arg2):string $retval:s64"
        );
        assert!(probe_spec::parse_probe(&line).unwrap().hardware);

        let mut bad = spec.clone();
        bad.location = None;
        assert!(spec_to_line(&bad).unwrap_err().starts_with("location"));
        bad = spec.clone();
        bad.args[0].expression = "+0( %si)".into();
        assert!(spec_to_line(&bad).unwrap_err().contains("whitespace"));
        bad = spec;
        bad.kind = v1::ProbeKind::Kprobe as i32;
        assert!(spec_to_line(&bad).unwrap_err().starts_with("maxactive"));
    }
}
