//! The policy file: a YAML (or JSON, which is YAML too) document of named
//! policies, parsed with serde-saphyr, whose `Spanned` values keep the line
//! and column of every policy and probe, so an error found after parsing
//! (an unknown symbol, a definition that does not parse) still says where
//! in the file it is.
//!
//! ```yaml
//! policies:
//!   - name: etc-opens
//!     enabled: true                      # default true
//!     filter: 'path ~ "/etc/*"'          # tracefs syntax, ANDed with each probe's own
//!     tags: {team: secops, severity: high}
//!     rate_limit: {events: 100, per: 1s, scope: process}   # task | process | global
//!     action: 'override:-13'             # optional, each probe's (needs --allow-actions)
//!     probes:
//!       - 'p:pol/open hv_open_file path=+0(%si):string'
//!       - kprobe_events: 'r:pol/open_ret hv_open_file ret=$retval:s64'
//!         filter: 'ret != 0'
//!         action: none                   # a probe's own action replaces the policy's
//!       - spec: {group: pol, event: fib, symbol: {symbol: hv_fib}, args: [{name: n, expression: $arg1, type: s32}]}
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use proto::v1;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::limit::Scope;

/// Most policies loaded at once (their names are metric labels).
pub const MAX_POLICIES: usize = 256;
/// Longest policy name.
pub const MAX_NAME_LEN: usize = 63;
/// Most tags of one policy.
pub const MAX_TAGS: usize = 32;
/// Longest tag key and value.
pub const MAX_TAG_KEY_LEN: usize = 63;
pub const MAX_TAG_VALUE_LEN: usize = 255;
/// Longest policy document (a file larger than this is refused unread).
pub const MAX_DOCUMENT_LEN: usize = 4 << 20;
/// Longest rate-limit window.
pub const MAX_WINDOW_NS: u64 = 3600 * 1_000_000_000;

/// A line and column (1-based) in a policy document.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl Pos {
    fn of(l: &serde_saphyr::Location) -> Option<Pos> {
        (l.line() > 0).then(|| Pos {
            line: l.line(),
            column: l.column(),
        })
    }
}

/// What is wrong in a document, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocError {
    /// The document's name (its file).
    pub source: String,
    pub pos: Option<Pos>,
    pub message: String,
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(
                f,
                "{}:{}:{}: {}",
                self.source, p.line, p.column, self.message
            ),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

impl std::error::Error for DocError {}

/// A rate limit: at most `events` per window of `window_ns` per scope key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitDef {
    pub events: u64,
    pub window_ns: u64,
    pub scope: Scope,
}

/// One probe of a policy, as written.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeEntry {
    /// The definition, its filter already combined with the policy's.
    pub definition: v1::ProbeDefinition,
    pub pos: Option<Pos>,
}

/// A policy checked for form (its probes are resolved when it is loaded).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyDef {
    pub name: String,
    pub enabled: bool,
    pub filter: String,
    pub tags: BTreeMap<String, String>,
    pub rate_limit: Option<RateLimitDef>,
    pub probes: Vec<ProbeEntry>,
    /// The document it came from.
    pub source: String,
    pub pos: Option<Pos>,
}

impl PolicyDef {
    /// "SOURCE:LINE:COL: policy 'NAME' probes[I]: " for messages about probe `i`.
    pub fn probe_context(&self, i: usize) -> String {
        let at = self.probes.get(i).and_then(|p| p.pos).or(self.pos);
        let loc = match at {
            Some(p) => format!("{}:{}:{}", self.source, p.line, p.column),
            None => self.source.clone(),
        };
        format!("{loc}: policy '{}' probes[{i}]", self.name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    policies: Vec<Spanned<PolicyDoc>>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    name: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    filter: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    rate_limit: Option<Spanned<RateLimitDoc>>,
    /// Every probe's action, unless the probe names its own.
    #[serde(default)]
    action: Option<String>,
    probes: Vec<Spanned<ProbeDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitDoc {
    events: u64,
    per: String,
    scope: String,
}

/// A probe: a kprobe_events line, or a map with `kprobe_events` or `spec`
/// (the API's ProbeSpec in its JSON mapping) and an optional `filter`.
struct ProbeDoc(ProbeMapDoc);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProbeMapDoc {
    #[serde(default)]
    kprobe_events: Option<String>,
    #[serde(default)]
    spec: Option<v1::ProbeSpec>,
    #[serde(default)]
    filter: String,
    /// This probe's action (`none`: not the policy's either).
    #[serde(default)]
    action: Option<String>,
}

impl<'de> Deserialize<'de> for ProbeDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ProbeDoc;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a kprobe_events line or a map with kprobe_events or spec")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ProbeDoc, E> {
                Ok(ProbeDoc(ProbeMapDoc {
                    kprobe_events: Some(s.to_string()),
                    ..Default::default()
                }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ProbeDoc, A::Error> {
                ProbeMapDoc::deserialize(de::value::MapAccessDeserializer::new(map)).map(ProbeDoc)
            }
        }
        d.deserialize_any(V)
    }
}

/// An `action:` of a policy or probe: the `--action` spelling
/// ([`proto::parse_action`]), `none` (no action; a probe's way out of its
/// policy's), and a snapshot directory that is absolute (a file that is
/// reloaded has no working directory of its own to be relative to).
fn parse_policy_action(text: &str) -> Result<Option<v1::ProbeAction>, String> {
    if text.trim() == "none" {
        return Ok(None);
    }
    let a = proto::parse_action(text.trim()).map_err(|m| format!("action: {m}"))?;
    if let Some(v1::probe_action::Action::Snapshot(s)) = &a.action {
        if !std::path::Path::new(&s.dir).is_absolute() {
            return Err(format!(
                "action: snapshot:{}: the directory must be an absolute path",
                s.dir
            ));
        }
    }
    Ok(Some(a))
}

/// `500ms`, `1s`, `10s`, `1m`, `1h` as nanoseconds.
pub fn parse_window(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("per: {s:?} is not a duration such as 500ms, 1s, 1m, 1h"))?;
    let mul: u64 = match unit.trim() {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(format!("per: {s:?} needs a unit (ms, s, m, h), e.g. 1s")),
    };
    match n.checked_mul(mul) {
        Some(0) => Err(format!("per: {s:?} must be above 0")),
        Some(v) if v <= MAX_WINDOW_NS => Ok(v),
        _ => Err(format!("per: {s:?} is longer than 1h")),
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME_LEN
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `policy` and `probe` filters as one: both must hold.
pub fn combine_filters(policy: &str, probe: &str) -> String {
    match (policy.trim(), probe.trim()) {
        ("", p) => p.to_string(),
        (f, "") => f.to_string(),
        (f, p) => format!("({f}) && ({p})"),
    }
}

/// serde-saphyr's message without its "error: line L column C: " lead
/// (ours says where) and without the snippet lines after it.
fn saphyr_message(full: &str) -> String {
    let first = full.lines().next().unwrap_or_default();
    let m = first.strip_prefix("error: ").unwrap_or(first);
    if let Some(rest) = m.strip_prefix("line ") {
        let words: Vec<&str> = rest.splitn(4, ' ').collect();
        if let [_, "column", col, tail] = words[..] {
            if col
                .trim_end_matches(':')
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                return tail.to_string();
            }
        }
    }
    m.to_string()
}

/// Parses and checks a policy document named `source`.
pub fn parse(source: &str, text: &str) -> Result<Vec<PolicyDef>, DocError> {
    let err = |pos: Option<Pos>, message: String| DocError {
        source: source.to_string(),
        pos,
        message,
    };
    if text.len() > MAX_DOCUMENT_LEN {
        return Err(err(
            None,
            format!(
                "{} bytes, more than the limit of {MAX_DOCUMENT_LEN}",
                text.len()
            ),
        ));
    }
    let doc: FileDoc = serde_saphyr::from_str(text).map_err(|e| {
        let pos = e.location().and_then(|l| Pos::of(&l));
        err(pos, saphyr_message(&e.to_string()))
    })?;
    if doc.policies.len() > MAX_POLICIES {
        return Err(err(
            None,
            format!(
                "{} policies, more than the limit of {MAX_POLICIES}",
                doc.policies.len()
            ),
        ));
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(doc.policies.len());
    for (pi, sp) in doc.policies.into_iter().enumerate() {
        let pos = Pos::of(&sp.referenced);
        let p = sp.value;
        let at = |m: String| err(pos, format!("policies[{pi}] ({:?}): {m}", p.name));
        if !valid_name(&p.name) {
            return Err(at(format!(
                "name: must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ - ."
            )));
        }
        if !names.insert(p.name.clone()) {
            return Err(at("name: another policy of this document has it".into()));
        }
        if p.probes.is_empty() {
            return Err(at("probes: empty (a policy has at least one probe)".into()));
        }
        if p.tags.len() > MAX_TAGS {
            return Err(at(format!(
                "tags: {}, more than the limit of {MAX_TAGS}",
                p.tags.len()
            )));
        }
        for (k, v) in &p.tags {
            if k.is_empty() || k.len() > MAX_TAG_KEY_LEN || v.len() > MAX_TAG_VALUE_LEN {
                return Err(at(format!(
                    "tags: key {k:?} must be 1 to {MAX_TAG_KEY_LEN} bytes and its value at most {MAX_TAG_VALUE_LEN}"
                )));
            }
        }
        let rate_limit = match p.rate_limit {
            None => None,
            Some(rl) => {
                let rpos = Pos::of(&rl.referenced).or(pos);
                let r = rl.value;
                let at = |m: String| {
                    err(
                        rpos,
                        format!("policies[{pi}] ({:?}): rate_limit.{m}", p.name),
                    )
                };
                if r.events == 0 {
                    return Err(at("events: must be at least 1".into()));
                }
                let window_ns = parse_window(&r.per).map_err(at)?;
                let scope = Scope::parse(&r.scope).ok_or_else(|| {
                    at(format!(
                        "scope: {:?} is not one of task, process, global",
                        r.scope
                    ))
                })?;
                Some(RateLimitDef {
                    events: r.events,
                    window_ns,
                    scope,
                })
            }
        };
        let policy_action = match &p.action {
            Some(t) => parse_policy_action(t).map_err(at)?,
            None => None,
        };
        let mut probes = Vec::with_capacity(p.probes.len());
        for (i, sp) in p.probes.into_iter().enumerate() {
            let ppos = Pos::of(&sp.referenced).or(pos);
            let m = sp.value.0;
            let definition = match (m.kprobe_events, m.spec) {
                (Some(l), None) => v1::probe_definition::Definition::KprobeEvents(l),
                (None, Some(s)) => v1::probe_definition::Definition::Spec(s),
                _ => {
                    return Err(err(
                        ppos,
                        format!(
                            "policy {:?} probes[{i}]: exactly one of kprobe_events or spec",
                            p.name
                        ),
                    ))
                }
            };
            let action = match &m.action {
                Some(t) => parse_policy_action(t)
                    .map_err(|e| err(ppos, format!("policy {:?} probes[{i}]: {e}", p.name)))?,
                None => policy_action.clone(),
            };
            probes.push(ProbeEntry {
                definition: v1::ProbeDefinition {
                    definition: Some(definition),
                    create_disabled: !p.enabled,
                    filter: combine_filters(&p.filter, &m.filter),
                    action,
                },
                pos: ppos,
            });
        }
        out.push(PolicyDef {
            name: p.name,
            enabled: p.enabled,
            filter: p.filter.trim().to_string(),
            tags: p.tags,
            rate_limit,
            probes,
            source: source.to_string(),
            pos,
        });
    }
    Ok(out)
}

/// Refuses a policy of `more` whose name one of `have` already has.
pub fn check_unique(have: &[PolicyDef], more: &[PolicyDef]) -> Result<(), DocError> {
    for m in more {
        if let Some(h) = have.iter().find(|h| h.name == m.name) {
            let at = |d: &PolicyDef| match d.pos {
                Some(p) => format!("{}:{}:{}", d.source, p.line, p.column),
                None => d.source.clone(),
            };
            return Err(DocError {
                source: m.source.clone(),
                pos: m.pos,
                message: format!("policy '{}' is defined at {} too", m.name, at(h)),
            });
        }
    }
    Ok(())
}

/// Reads and parses policy files (as `hvprobe run --policy` and its
/// reloads do): every file parses, and no policy name is in two of them.
pub fn parse_files(paths: &[std::path::PathBuf]) -> Result<Vec<PolicyDef>, DocError> {
    let mut defs: Vec<PolicyDef> = Vec::new();
    for p in paths {
        let source = p.display().to_string();
        let fail = |message: String| DocError {
            source: source.clone(),
            pos: None,
            message,
        };
        let meta = std::fs::metadata(p).map_err(|e| fail(e.to_string()))?;
        if !meta.is_file() {
            return Err(fail("not a regular file".into()));
        }
        if meta.len() > MAX_DOCUMENT_LEN as u64 {
            return Err(fail(format!(
                "{} bytes, more than the limit of {MAX_DOCUMENT_LEN}",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(p).map_err(|e| fail(e.to_string()))?;
        let more = parse(&source, &text)?;
        check_unique(&defs, &more)?;
        defs.extend(more);
    }
    Ok(defs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
policies:
  - name: opens
    filter: 'path ~ "/etc/*"'
    tags: {team: secops, severity: high}
    rate_limit: {events: 5, per: 1s, scope: process}
    probes:
      - 'p:pol/open hv_open_file path=+0(%si):string'
      - kprobe_events: 'r:pol/ret hv_open_file ret=$retval:s64'
        filter: 'ret != 0'
  - name: fib
    enabled: false
    probes:
      - spec: {group: pol, event: fib, symbol: {symbol: hv_fib}, args: [{name: n, expression: $arg1, type: s32}]}
"#;

    #[test]
    fn parses_lines_maps_specs_with_positions() {
        let v = parse("p.yaml", GOOD).unwrap();
        assert_eq!(v.len(), 2);
        let a = &v[0];
        assert_eq!(a.name, "opens");
        assert!(a.enabled);
        assert_eq!(a.tags.get("team").map(String::as_str), Some("secops"));
        assert_eq!(
            a.rate_limit,
            Some(RateLimitDef {
                events: 5,
                window_ns: 1_000_000_000,
                scope: Scope::Process
            })
        );
        assert_eq!(a.probes.len(), 2);
        assert_eq!(a.probes[0].definition.filter, r#"path ~ "/etc/*""#);
        assert_eq!(
            a.probes[1].definition.filter,
            r#"(path ~ "/etc/*") && (ret != 0)"#
        );
        assert_eq!(a.probes[0].pos.map(|p| p.line), Some(8));
        assert_eq!(a.probes[1].pos.map(|p| p.line), Some(9));
        let b = &v[1];
        assert!(!b.enabled);
        assert!(b.probes[0].definition.create_disabled);
        match &b.probes[0].definition.definition {
            Some(v1::probe_definition::Definition::Spec(s)) => {
                assert_eq!(s.event, "fib");
                assert_eq!(s.args[0].expression, "$arg1");
                assert_eq!(
                    proto::spec_to_line(s).unwrap(),
                    "p:pol/fib hv_fib n=$arg1:s32"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.probes[0].pos.map(|p| p.line), Some(14));
        assert!(
            b.probe_context(0).starts_with("p.yaml:14:"),
            "{}",
            b.probe_context(0)
        );
    }

    #[test]
    fn json_is_a_policy_document_too() {
        let v = parse(
            "p.json",
            r#"{"policies": [{"name": "j", "probes": ["p:j/a hv_fib"]}]}"#,
        )
        .unwrap();
        assert_eq!(v[0].name, "j");
        assert!(v[0].rate_limit.is_none());
    }

    fn error(text: &str) -> DocError {
        parse("bad.yaml", text).unwrap_err()
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let e = error("policies:\n  - name: a\n    probes: [ 'p:a/b hv_fib'\n");
        assert!(e.pos.is_some(), "{e}");
        assert!(e.to_string().starts_with("bad.yaml:"), "{e}");
        // An unknown key, on its line.
        let e = error("policies:\n  - name: a\n    probez: []\n");
        assert_eq!(e.pos.map(|p| p.line), Some(3), "{e}");
        assert!(e.message.contains("probez"), "{e}");
        // A wrong type.
        let e =
            error("policies:\n  - name: a\n    enabled: sometimes\n    probes: ['p:a/b hv_fib']\n");
        assert_eq!(e.pos.map(|p| p.line), Some(3), "{e}");
    }

    #[test]
    fn checks_names_tags_and_limits() {
        let e = error("policies:\n  - name: 'bad name'\n    probes: ['p:a/b hv_fib']\n");
        assert!(e.message.contains("name:"), "{e}");
        assert_eq!(e.pos.map(|p| p.line), Some(2), "{e}");
        let e = error("policies:\n  - {name: a, probes: ['p:a/b hv_fib']}\n  - {name: a, probes: ['p:a/c hv_fib']}\n");
        assert!(e.message.contains("another policy"), "{e}");
        assert_eq!(e.pos.map(|p| p.line), Some(3), "{e}");
        let e = error("policies:\n  - {name: a, probes: []}\n");
        assert!(e.message.contains("probes: empty"), "{e}");
        let e = error(
            "policies:\n  - name: a\n    probes: ['p:a/b hv_fib']\n    rate_limit: {events: 1, per: 1s, scope: thread}\n",
        );
        assert!(e.message.contains("rate_limit.scope"), "{e}");
        assert_eq!(e.pos.map(|p| p.line), Some(4), "{e}");
        let e = error(
            "policies:\n  - name: a\n    probes: ['p:a/b hv_fib']\n    rate_limit: {events: 1, per: 1, scope: task}\n",
        );
        assert!(e.message.contains("needs a unit"), "{e}");
        let e = error(
            "policies:\n  - name: a\n    probes: ['p:a/b hv_fib']\n    rate_limit: {events: 0, per: 1s, scope: task}\n",
        );
        assert!(e.message.contains("at least 1"), "{e}");
        let e = error("policies:\n  - name: a\n    probes: [{filter: 'x == 1'}]\n");
        assert!(e.message.contains("exactly one of"), "{e}");
        assert_eq!(e.pos.map(|p| p.line), Some(3), "{e}");
    }

    #[test]
    fn files_parse_together_and_names_are_unique_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        std::fs::write(&a, "policies:\n  - {name: x, probes: ['p:a/b hv_fib']}\n").unwrap();
        std::fs::write(&b, "policies:\n  - {name: y, probes: ['p:a/c hv_fib']}\n").unwrap();
        let v = parse_files(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(
            v.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["x", "y"]
        );
        std::fs::write(&b, "policies:\n\n  - {name: x, probes: ['p:a/c hv_fib']}\n").unwrap();
        let e = parse_files(&[a.clone(), b.clone()]).unwrap_err();
        assert_eq!(e.source, b.display().to_string());
        assert_eq!(e.pos.map(|p| p.line), Some(3), "{e}");
        assert!(e.message.contains("a.yaml:2:"), "{e}");
        let e = parse_files(&[dir.path().join("missing.yaml")]).unwrap_err();
        assert!(e.to_string().contains("missing.yaml"), "{e}");
        let e = parse_files(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");
    }

    #[test]
    fn crate_messages_lose_their_own_position() {
        assert_eq!(
            saphyr_message("error: line 3 column 13: unclosed bracket '['\n  snippet"),
            "unclosed bracket '['"
        );
        assert_eq!(saphyr_message("invalid boolean"), "invalid boolean");
        let e = error("policies:\n  - name: a\n    probez: []\n");
        assert!(e.message.starts_with("unknown field `probez`"), "{e}");
        assert_eq!(e.to_string().matches("line").count(), 0, "{e}");
    }

    /// Untrusted documents (LoadPolicy takes them from any client) give an
    /// answer, never a panic: every truncation of a good one, and byte
    /// mutations of it.
    #[test]
    fn broken_documents_are_errors_not_panics() {
        let mut answers = [0usize; 2];
        for end in 0..=GOOD.len() {
            let text = String::from_utf8_lossy(&GOOD.as_bytes()[..end]);
            answers[usize::from(parse("t", &text).is_ok())] += 1;
        }
        // A deterministic xorshift: the same mutations each run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        const BYTES: &[u8] = b" \n\t:-[]{}'\"#&*!|>%@`,?0a~\\";
        for _ in 0..3000 {
            let mut b = GOOD.as_bytes().to_vec();
            for _ in 0..1 + next() % 4 {
                let i = usize::try_from(next() % b.len() as u64).unwrap();
                let c = BYTES[usize::try_from(next() % BYTES.len() as u64).unwrap()];
                match next() % 3 {
                    0 => b[i] = c,
                    1 => b.insert(i, c),
                    _ => {
                        b.remove(i);
                    }
                }
            }
            let text = String::from_utf8_lossy(&b);
            match parse("t", &text) {
                Ok(_) => answers[1] += 1,
                Err(e) => {
                    assert!(e.to_string().starts_with("t:"), "{e}");
                    answers[0] += 1;
                }
            }
        }
        // Both kinds of answer occurred (the mutations are not all fatal).
        assert!(answers[0] > 100 && answers[1] > 100, "{answers:?}");
    }

    #[test]
    fn actions_per_policy_and_per_probe() {
        use v1::probe_action::Action;
        let defs = parse(
            "t.yaml",
            "
policies:
  - name: a
    action: 'override:-13'
    probes:
      - 'p:a/x f'
      - {kprobe_events: 'p:a/y g', action: freeze}
      - {kprobe_events: 'p:a/z h', action: none}
      - {kprobe_events: 'p:a/w k', action: 'snapshot:/var/tmp'}
  - name: b
    probes: ['p:b/x f']
",
        )
        .unwrap();
        let acts: Vec<Option<Action>> = defs[0]
            .probes
            .iter()
            .map(|p| p.definition.action.clone().and_then(|a| a.action))
            .collect();
        assert_eq!(
            acts,
            vec![
                Some(Action::OverrideReturn(-13)),
                Some(Action::Freeze(v1::FreezeAction {})),
                None,
                Some(Action::Snapshot(v1::SnapshotAction {
                    dir: "/var/tmp".into()
                })),
            ]
        );
        assert_eq!(defs[1].probes[0].definition.action, None);
        let e = error("policies:\n  - name: a\n    action: kill\n    probes: ['p:a/x f']\n");
        assert_eq!(e.pos.map(|p| p.line), Some(2), "{e}");
        assert!(e.message.contains("action: unknown action 'kill'"), "{e}");
        let e = error("policies:\n  - name: a\n    probes:\n      - {kprobe_events: 'p:a/x f', action: 'snapshot:rel'}\n");
        assert_eq!(e.pos.map(|p| p.line), Some(4), "{e}");
        assert!(
            e.message.contains(
                "probes[0]: action: snapshot:rel: the directory must be an absolute path"
            ),
            "{e}"
        );
        let e = error("policies:\n  - name: a\n    probes:\n      - {kprobe_events: 'p:a/x f', action: 'override:x'}\n");
        assert!(e.message.contains("override value 'x'"), "{e}");
    }

    #[test]
    fn windows() {
        assert_eq!(parse_window("500ms"), Ok(500_000_000));
        assert_eq!(parse_window("1s"), Ok(1_000_000_000));
        assert_eq!(parse_window("2m"), Ok(120_000_000_000));
        assert_eq!(parse_window("1h"), Ok(MAX_WINDOW_NS));
        assert!(parse_window("2h").is_err());
        assert!(parse_window("0s").is_err());
        assert!(parse_window("s").is_err());
        assert!(parse_window("10").is_err());
    }

    #[test]
    fn filters_combine_with_and() {
        assert_eq!(combine_filters("", ""), "");
        assert_eq!(combine_filters(" a == 1 ", ""), "a == 1");
        assert_eq!(combine_filters("", "b == 2"), "b == 2");
        let f = combine_filters("a == 1 || a == 3", "b == 2");
        assert_eq!(f, "(a == 1 || a == 3) && (b == 2)");
        // The engine's filter grammar reads it.
        probe_spec::Filter::parse(&f).unwrap();
    }
}
