//! `hvprobe probe add --action ...`: the spelling of [`proto::parse_action`]
//! (`override:VALUE`, `freeze`, `snapshot:DIR`), with DIR made absolute
//! here, against the CLI's working directory: the server writes it.

use proto::v1;

/// Parses an `--action` value.
pub fn parse(text: &str) -> Result<v1::ProbeAction, String> {
    let mut action = proto::parse_action(text)?;
    if let Some(v1::probe_action::Action::Snapshot(s)) = &mut action.action {
        let abs = std::path::absolute(&s.dir).map_err(|e| format!("snapshot:{}: {e}", s.dir))?;
        s.dir = abs.display().to_string();
    }
    Ok(action)
}

/// An action as `--action` spells it (for listings).
pub fn format(a: &v1::ProbeAction) -> String {
    proto::format_action(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::probe_action::Action;

    #[test]
    fn snapshot_directories_become_absolute() {
        match parse("snapshot:rel/x").unwrap().action.unwrap() {
            Action::Snapshot(s) => {
                assert!(std::path::Path::new(&s.dir).is_absolute(), "{}", s.dir);
                assert!(s.dir.ends_with("rel/x"), "{}", s.dir);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse("kill").is_err());
        assert_eq!(format(&parse("override:-13").unwrap()), "override:-13");
    }
}
