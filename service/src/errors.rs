//! Engine and definition errors as gRPC statuses.
//!
//! Definition errors keep probe-spec's kernel-style code and position and
//! carry a `DefinitionError` in the status details; engine refusals get a
//! kernel-style code too (`BAD_INSN_BNDRY`, `SAME_PROBE`, ...) pointing at the
//! probe-point word of the line.

use introspect::ProbeError;
use prost::Message;
use proto::v1::DefinitionError;
use tonic::{Code, Status};

/// A status with a [`DefinitionError`] in its details (as
/// `proto::definition_error_from_status` reads them back).
pub fn status_with_definition(code: Code, message: String, detail: DefinitionError) -> Status {
    let rpc_status = tonic_types::pb::Status {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: proto::DEFINITION_ERROR_TYPE_URL.to_string(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, rpc_status.encode_to_vec().into())
}

/// A parse or resolve error of a definition or filter. `$retval` on an
/// entry probe is a FAILED_PRECONDITION (the definition is well-formed, the
/// probe kind cannot supply it); everything else is INVALID_ARGUMENT.
pub fn parse_error(err: &probe_spec::ParseError, batch_index: Option<u32>) -> Status {
    if err.code == probe_spec::ErrorCode::RETVAL_ON_PROBE {
        let detail = proto::definition_error(err, batch_index);
        let message = match batch_index {
            Some(i) => format!("definition {i}: {}", err.summary()),
            None => err.summary(),
        };
        return status_with_definition(Code::FailedPrecondition, message, detail);
    }
    proto::invalid_definition(err, batch_index)
}

/// Character position of word `n` (0-based, whitespace-separated) in `line`.
pub fn word_position(line: &str, n: usize) -> usize {
    let mut words = 0;
    let mut prev_space = true;
    for (i, c) in line.chars().enumerate() {
        let space = c.is_whitespace();
        if prev_space && !space {
            if words == n {
                return i;
            }
            words += 1;
        }
        prev_space = space;
    }
    line.chars().count()
}

/// Kernel-style code and gRPC code of an engine refusal.
fn classify(e: &ProbeError) -> (Code, &'static str) {
    match e {
        ProbeError::NotInstructionBoundary { .. } => (Code::FailedPrecondition, "BAD_INSN_BNDRY"),
        ProbeError::Blacklisted { .. } => (Code::FailedPrecondition, "BLACKLISTED"),
        ProbeError::Unmapped { .. } => (Code::FailedPrecondition, "BAD_PROBE_ADDR"),
        ProbeError::NotKernelText { .. } => (Code::FailedPrecondition, "BAD_PROBE_ADDR"),
        ProbeError::RetprobeNotAtEntry { .. } => (Code::FailedPrecondition, "BAD_RETPROBE"),
        ProbeError::Undecodable { .. } => (Code::FailedPrecondition, "BAD_INSN_BNDRY"),
        ProbeError::NoReturnTrap => (Code::FailedPrecondition, "NO_RETURN_TRAP"),
        ProbeError::AlreadyExists { .. } => (Code::AlreadyExists, "EVENT_EXISTS"),
        ProbeError::Duplicate { .. } => (Code::AlreadyExists, "SAME_PROBE"),
        ProbeError::NotFound(_) => (Code::NotFound, "NOT_FOUND"),
        ProbeError::BadMaxactive { .. } => (Code::InvalidArgument, "BAD_MAXACT"),
        ProbeError::InitTextFreed { .. } => (Code::FailedPrecondition, "INIT_TEXT_FREED"),
        ProbeError::InitStateUnknown { .. } => (Code::FailedPrecondition, "BAD_PROBE_ADDR"),
        ProbeError::Mechanism { .. } => (Code::FailedPrecondition, "HW_MECHANISM"),
        ProbeError::NoHwSlot { .. } => (Code::ResourceExhausted, "NO_HW_SLOT"),
        ProbeError::ModulesUnavailable(_) => (Code::FailedPrecondition, "NO_MODULES"),
        ProbeError::ModuleSymbolNotFound { .. } => (Code::NotFound, "BAD_PROBE_ADDR"),
        ProbeError::ModuleOffsetOutside { .. } => (Code::InvalidArgument, "BAD_PROBE_ADDR"),
        ProbeError::ActionRefused { .. } => (Code::FailedPrecondition, "BAD_ACTION"),
        // Live kretprobes hold the trap: the request can succeed once they
        // are gone, the guest itself is fine.
        ProbeError::ReturnTrapInUse { .. } => (Code::FailedPrecondition, "RETURN_TRAP_IN_USE"),
        ProbeError::Guest(_) | ProbeError::Snapshot(_) => (Code::Unavailable, "GUEST"),
    }
}

/// An engine refusal of the probe defined by `line`.
pub fn engine_error(e: &ProbeError, line: &str, batch_index: Option<u32>) -> Status {
    let (code, kcode) = classify(e);
    let message = match batch_index {
        Some(i) => format!("definition {i}: {kcode}: {e}"),
        None => format!("{kcode}: {e}"),
    };
    let excerpt = probe_spec::Excerpt::around(line, word_position(line, 1));
    let detail = DefinitionError {
        code: kcode.to_string(),
        message: e.to_string(),
        arg_index: None,
        batch_index,
        ..proto::excerpt_fields(&excerpt)
    };
    status_with_definition(code, message, detail)
}

/// Most characters of a client's name (symbol, probe name, module) an error
/// message repeats.
pub const QUOTE_MAX: usize = 64;

/// `text` for an error message: at most [`QUOTE_MAX`] characters, with "…"
/// and the full length in bytes when cut.
pub fn quote(text: &str) -> String {
    if text.chars().count() <= QUOTE_MAX {
        return text.to_string();
    }
    let head: String = text.chars().take(QUOTE_MAX).collect();
    format!("{head}… ({} bytes)", text.len())
}

/// INVALID_ARGUMENT unless `text` (named `what` in the message) has at most
/// `max` bytes.
pub fn check_len(what: &str, text: &str, max: usize) -> Result<(), Status> {
    if text.len() <= max {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "{what}: {} bytes, longer than the limit of {max}",
        text.len()
    )))
}

/// An engine error outside probe creation (enable, delete, arm).
pub fn engine_op_error(e: &ProbeError) -> Status {
    Status::new(classify(e).0, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retval_on_entry_probe_is_a_failed_precondition_with_details() {
        let err = probe_spec::parse_probe("p:a/b hv_fib x=$retval").unwrap_err();
        let st = parse_error(&err, None);
        assert_eq!(st.code(), Code::FailedPrecondition);
        let d = proto::definition_error_from_status(&st).expect("details");
        assert_eq!(d.code, "RETVAL_ON_PROBE");
        assert_eq!(
            usize::try_from(d.position).unwrap(),
            "p:a/b hv_fib x=".len()
        );
    }

    #[test]
    fn engine_errors_point_at_the_probe_point() {
        let e = ProbeError::NotInstructionBoundary {
            addr: 0x10,
            location: "f+0x1/0x10".into(),
            insn_start: 0xf,
            insn: "nop".into(),
        };
        let st = engine_error(&e, "p:g/e  f+1", Some(3));
        assert_eq!(st.code(), Code::FailedPrecondition);
        assert!(st.message().starts_with("definition 3: BAD_INSN_BNDRY"));
        let d = proto::definition_error_from_status(&st).unwrap();
        assert_eq!((d.position, d.batch_index), (7, Some(3)));
        assert_eq!(
            engine_op_error(&ProbeError::NotFound(4)).code(),
            Code::NotFound
        );
    }

    #[test]
    fn a_busy_return_trap_is_a_precondition_not_a_guest_failure() {
        let st = engine_error(
            &ProbeError::ReturnTrapInUse { addr: 0x1000 },
            "r:a/b f",
            None,
        );
        assert_eq!(st.code(), Code::FailedPrecondition);
        assert!(
            st.message().starts_with("RETURN_TRAP_IN_USE: "),
            "{}",
            st.message()
        );
    }

    #[test]
    fn engine_errors_quote_long_lines_around_the_probe_point() {
        let line = format!("p:g/e  f+1 {}", "x=%di ".repeat(1000));
        let st = engine_error(&ProbeError::NotFound(4), &line, None);
        let d = proto::definition_error_from_status(&st).unwrap();
        assert_eq!((d.position, d.text_offset), (7, 0));
        assert_eq!(d.text.chars().count(), 7 + probe_spec::EXCERPT_RADIUS);
        assert!(d.rendered.lines().next().unwrap().ends_with('…'));
        assert!(st.details().len() < 400, "{}", st.details().len());
    }

    #[test]
    fn quotes_and_lengths_are_bounded() {
        assert_eq!(quote("hv_fib"), "hv_fib");
        let q = quote(&"s".repeat(1 << 20));
        assert_eq!(q, format!("{}… (1048576 bytes)", "s".repeat(QUOTE_MAX)));
        assert!(check_len("x", "abc", 3).is_ok());
        let e = check_len("probe.name", "abcd", 3).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            e.message(),
            "probe.name: 4 bytes, longer than the limit of 3"
        );
    }

    #[test]
    fn word_positions() {
        assert_eq!(word_position("p:a  b c", 1), 5);
        assert_eq!(word_position("  p", 0), 2);
        assert_eq!(word_position("p", 3), 1);
    }
}
