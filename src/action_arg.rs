//! `hvprobe probe add --action ...`: the command-line spelling of a probe
//! action, `override:VALUE` (decimal, negative allowed, or 0x hex),
//! `freeze`, or `snapshot:DIR` (DIR made absolute here: the server writes it).

use proto::v1;

/// Parses an `--action` value.
pub fn parse(text: &str) -> Result<v1::ProbeAction, String> {
    use v1::probe_action::Action;
    let (word, arg) = match text.split_once(':') {
        Some((w, a)) => (w, Some(a)),
        None => (text, None),
    };
    let action = match (word, arg) {
        ("override", Some(v)) => Action::OverrideReturn(parse_value(v)?),
        ("override", None) => {
            return Err("override needs a value: override:VALUE (e.g. override:-2)".into())
        }
        ("freeze", None) => Action::Freeze(v1::FreezeAction {}),
        ("snapshot", Some(dir)) if !dir.is_empty() => {
            let abs = std::path::absolute(dir).map_err(|e| format!("snapshot:{dir}: {e}"))?;
            Action::Snapshot(v1::SnapshotAction {
                dir: abs.display().to_string(),
            })
        }
        ("snapshot", _) => return Err("snapshot needs a directory: snapshot:DIR".into()),
        _ => {
            return Err(format!(
                "unknown action '{text}': override:VALUE, freeze or snapshot:DIR"
            ))
        }
    };
    Ok(v1::ProbeAction {
        action: Some(action),
    })
}

fn parse_value(v: &str) -> Result<i64, String> {
    let bad = |e: std::num::ParseIntError| format!("override value '{v}': {e}");
    if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).map(|u| u as i64).map_err(bad)
    } else {
        v.parse::<i64>().map_err(bad)
    }
}

/// An action as `--action` spells it (for listings).
pub fn format(a: &v1::ProbeAction) -> String {
    use v1::probe_action::Action;
    match &a.action {
        Some(Action::OverrideReturn(v)) => format!("override:{v}"),
        Some(Action::Freeze(_)) => "freeze".into(),
        Some(Action::Snapshot(s)) => format!("snapshot:{}", s.dir),
        None => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::probe_action::Action;

    #[test]
    fn spellings() {
        let a = |t: &str| parse(t).map(|a| a.action.unwrap());
        assert_eq!(a("override:-2"), Ok(Action::OverrideReturn(-2)));
        assert_eq!(a("override:0x10"), Ok(Action::OverrideReturn(16)));
        assert_eq!(
            a("override:0xffffffffffffffff"),
            Ok(Action::OverrideReturn(-1))
        );
        assert_eq!(a("freeze"), Ok(Action::Freeze(v1::FreezeAction {})));
        match a("snapshot:/tmp/x").unwrap() {
            Action::Snapshot(s) => assert_eq!(s.dir, "/tmp/x"),
            other => panic!("{other:?}"),
        }
        for bad in [
            "override",
            "override:",
            "override:two",
            "freeze:1",
            "snapshot",
            "snapshot:",
            "kill",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert_eq!(format(&parse("override:-13").unwrap()), "override:-13");
    }
}
