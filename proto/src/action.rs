//! The text spelling of a probe action, shared by `hvprobe probe add
//! --action` and policy files: `override:VALUE` (decimal, negative allowed,
//! or 0x hex), `freeze`, or `snapshot:DIR`. A relative DIR is kept as
//! written; each caller decides what it is relative to.

use crate::v1;

/// Parses an action spelling.
pub fn parse_action(text: &str) -> Result<v1::ProbeAction, String> {
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
        ("snapshot", Some(dir)) if !dir.is_empty() => Action::Snapshot(v1::SnapshotAction {
            dir: dir.to_string(),
        }),
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

/// An action as [`parse_action`] spells it (listings, policy keys).
pub fn format_action(a: &v1::ProbeAction) -> String {
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
        let a = |t: &str| parse_action(t).map(|a| a.action.unwrap());
        assert_eq!(a("override:-2"), Ok(Action::OverrideReturn(-2)));
        assert_eq!(a("override:0x10"), Ok(Action::OverrideReturn(16)));
        assert_eq!(
            a("override:0xffffffffffffffff"),
            Ok(Action::OverrideReturn(-1))
        );
        assert_eq!(a("freeze"), Ok(Action::Freeze(v1::FreezeAction {})));
        match a("snapshot:rel/x").unwrap() {
            Action::Snapshot(s) => assert_eq!(s.dir, "rel/x"),
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
            let e = parse_action(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        for t in ["override:-13", "freeze", "snapshot:/tmp/x"] {
            assert_eq!(format_action(&parse_action(t).unwrap()), t);
        }
    }
}
