//! Parser for `kprobe_events` lines, following the kernel's
//! `trace_kprobe_create` / `traceprobe_parse_probe_arg` (kernel/trace/
//! trace_kprobe.c, trace_probe.c): same words, same defaults, same error
//! codes. Error positions are character positions in the original line.

use crate::ast::*;
use crate::error::{ErrorCode as E, ParseError};
use crate::num::{kstrtol, kstrtoul, kstrtoul10, simple_strtoul};
use crate::reg::Reg;

/// Kernel limits (kernel/trace/trace_probe.h, x86-64).
pub mod limits {
    /// `MAX_TRACE_ARGS`.
    pub const MAX_TRACE_ARGS: usize = 128;
    /// `MAX_ARGSTR_LEN`: longest fetch-arg body.
    pub const MAX_ARGSTR_LEN: usize = 63;
    /// `MAX_ARG_NAME_LEN`.
    pub const MAX_ARG_NAME_LEN: usize = 32;
    /// `MAX_ARRAY_LEN`.
    pub const MAX_ARRAY_LEN: u32 = 64;
    /// `MAX_EVENT_NAME_LEN` (names must be shorter).
    pub const MAX_EVENT_NAME_LEN: usize = 64;
    /// `KRETPROBE_MAXACTIVE_MAX`.
    pub const MAXACTIVE_MAX: u32 = 4096;
    /// `PARAM_MAX_STACK` = THREAD_SIZE / sizeof(long) with 16 KiB stacks.
    pub const PARAM_MAX_STACK: u64 = 2048;
    /// `FETCH_INSN_MAX` minus the END slot: most fetch ops per argument.
    pub const MAX_FETCH_OPS: usize = 15;
    /// Longest definition line, in bytes, after trimming whitespace: the
    /// kernel parses a `kprobe_events` write in a `WRITE_BUFSIZE` (4096)
    /// buffer and refuses a longer line ("Line length is too long").
    pub const MAX_LINE_LEN: usize = 4095;
    /// Longest event filter, in bytes: the kernel refuses a write of
    /// `PAGE_SIZE` or more to an event's `filter` file.
    pub const MAX_FILTER_LEN: usize = 4095;
    /// `KSYM_NAME_LEN`: symbol names are shorter (at most 511 bytes).
    pub const KSYM_NAME_LEN: usize = 512;
    /// `MODULE_NAME_LEN` on 64-bit: module names are shorter (at most 55 bytes).
    pub const MODULE_NAME_LEN: usize = 56;
}
use limits::*;

/// Default group, as the kernel's `KPROBE_EVENT_SYSTEM`.
pub const DEFAULT_GROUP: &str = "kprobes";

/// Field names no argument may use (`reserved_field_names`).
const RESERVED_FIELDS: &[&str] = &[
    "common_type",
    "common_flags",
    "common_preempt_count",
    "common_pid",
    "common_tgid",
    "__probe_ip",
    "__probe_ret_ip",
    "__probe_func",
];

/// Parses one `kprobe_events` line: `p`, `r` or `-`. A line longer than
/// [`limits::MAX_LINE_LEN`] bytes (leading and trailing whitespace aside)
/// is refused with `TOO_LONG` at the first byte past the limit.
pub fn parse_command(line: &str) -> Result<Command, ParseError> {
    check_length(line, MAX_LINE_LEN, "definition")?;
    Parser::new(line).command()
}

/// Leading and trailing whitespace (as the kernel's `isspace`) cut off:
/// the canonical form of a definition line.
pub fn trim_line(line: &str) -> &str {
    line.trim_matches(|c: char| c.is_ascii() && is_space(c as u8))
}

/// `TOO_LONG` if `text` without its surrounding whitespace exceeds `max`
/// bytes; the position is the first character past the limit.
pub(crate) fn check_length(text: &str, max: usize, what: &str) -> Result<(), ParseError> {
    let t = trim_line(text);
    if t.len() <= max {
        return Ok(());
    }
    let start = text.len()
        - text
            .trim_start_matches(|c: char| c.is_ascii() && is_space(c as u8))
            .len();
    Err(
        ParseError::new(E::TOO_LONG, text, start + max).detail(format!(
            "{what} is {} bytes without surrounding whitespace; the limit is {max}",
            t.len()
        )),
    )
}

/// Parses a `p`/`r` line; a `-:` line is an error here.
pub fn parse_probe(line: &str) -> Result<ProbeDef, ParseError> {
    match parse_command(line)? {
        Command::Add(d) => Ok(d),
        Command::Remove(_) => Err(ParseError::new(E::BAD_COMMAND, line, 0)
            .word(0)
            .detail("expected a 'p' or 'r' definition, not a '-:' removal")),
    }
}

/// Parses a whole file in `kprobe_events` format: one command per line,
/// `#` starts a comment, blank lines are skipped. Returns each command with
/// its 1-based line number, or the first error with its line number.
pub fn parse_script(text: &str) -> Result<Vec<(usize, Command)>, (usize, ParseError)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = match raw.find('#') {
            Some(p) => &raw[..p],
            None => raw,
        };
        if line.trim().is_empty() {
            continue;
        }
        out.push((i + 1, parse_command(line).map_err(|e| (i + 1, e))?));
    }
    Ok(out)
}

fn is_space(b: u8) -> bool {
    // The kernel's argv_split() splits on isspace().
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// `is_good_name`: a C identifier.
pub(crate) fn is_good_name(s: &str) -> bool {
    let mut b = s.bytes();
    match b.next() {
        Some(c) if c.is_ascii_alphabetic() || c == b'_' => {}
        _ => return false,
    }
    b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// `is_good_system_name`: a C identifier that may also contain dots.
fn is_good_system_name(s: &str) -> bool {
    let mut b = s.bytes();
    match b.next() {
        Some(c) if c.is_ascii_alphabetic() || c == b'_' => {}
        _ => return false,
    }
    b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
}

/// One whitespace-separated word and its byte position in the line.
#[derive(Clone, Copy)]
struct Word<'a> {
    text: &'a str,
    pos: usize,
}

struct Parser<'a> {
    line: &'a str,
    words: Vec<Word<'a>>,
}

/// Context for parsing one fetch argument.
struct ArgCtx {
    word: usize,
    is_return: bool,
    /// `$argN` and DWARF names allowed (function entry or return).
    entry_or_return: bool,
}

impl<'a> Parser<'a> {
    fn new(line: &'a str) -> Self {
        let bytes = line.as_bytes();
        let mut words = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            while i < bytes.len() && is_space(bytes[i]) {
                i += 1;
            }
            let start = i;
            while i < bytes.len() && !is_space(bytes[i]) {
                i += 1;
            }
            if i > start {
                words.push(Word {
                    text: &line[start..i],
                    pos: start,
                });
            }
        }
        Parser { line, words }
    }

    fn err(&self, code: E, byte_pos: usize, word: usize) -> ParseError {
        ParseError::new(code, self.line, byte_pos).word(word)
    }

    fn command(&self) -> Result<Command, ParseError> {
        let Some(w0) = self.words.first().copied() else {
            return Err(ParseError::new(E::BAD_COMMAND, self.line, 0).detail("empty line"));
        };
        match w0.text.as_bytes()[0] {
            b'-' => self.remove(w0).map(Command::Remove),
            b'p' | b'r' => self.probe(w0).map(Command::Add),
            _ => Err(self.err(E::BAD_COMMAND, w0.pos, 0)),
        }
    }

    fn remove(&self, w0: Word<'a>) -> Result<RemoveDef, ParseError> {
        let Some(name) = w0.text.strip_prefix("-:") else {
            return Err(self
                .err(E::BAD_COMMAND, w0.pos + 1, 0)
                .detail("expected '-:[GRP/]EVENT'"));
        };
        let (group, event) = self.event_name(name, w0.pos + 2)?;
        let Some(event) = event else {
            return Err(self.err(E::NO_EVENT_NAME, w0.pos + w0.text.len(), 0));
        };
        Ok(RemoveDef {
            group,
            event,
            match_args: self.words[1..].iter().map(|w| w.text.to_string()).collect(),
        })
    }

    /// `traceprobe_parse_event_name`: `[GRP/]EVENT` (or `GRP.EVENT`).
    /// Returns the group (if given) and the event (`None` for `GRP/`).
    fn event_name(
        &self,
        s: &str,
        mut pos: usize,
    ) -> Result<(Option<String>, Option<String>), ParseError> {
        let slash = s.find('/').or_else(|| s.find('.'));
        let mut group = None;
        let mut event = s;
        if let Some(sl) = slash {
            if sl == 0 {
                return Err(self.err(E::NO_GROUP_NAME, pos, 0));
            }
            if sl + 1 > MAX_EVENT_NAME_LEN {
                return Err(self.err(E::GROUP_TOO_LONG, pos, 0));
            }
            let g = &s[..sl];
            if !is_good_system_name(g) {
                return Err(self.err(E::BAD_GROUP_NAME, pos, 0));
            }
            group = Some(g.to_string());
            event = &s[sl + 1..];
            pos += sl + 1;
        }
        if event.is_empty() {
            if slash.is_some() {
                return Ok((group, None));
            }
            return Err(self.err(E::NO_EVENT_NAME, pos, 0));
        }
        if event.len() >= MAX_EVENT_NAME_LEN {
            return Err(self.err(E::EVENT_TOO_LONG, pos, 0));
        }
        if !is_good_name(event) {
            return Err(self.err(E::BAD_EVENT_NAME, pos, 0));
        }
        Ok((group, Some(event.to_string())))
    }

    fn probe(&self, w0: Word<'a>) -> Result<ProbeDef, ParseError> {
        let head = w0.text;
        let mut is_return = head.starts_with('r');
        let (maxact, event_part) = match head[1..].find(':') {
            Some(c) => (&head[1..1 + c], Some((&head[2 + c..], w0.pos + 2 + c))),
            None => (&head[1..], None),
        };

        let mut maxactive = None;
        if !maxact.is_empty() {
            if !maxact.as_bytes()[0].is_ascii_digit() {
                return Err(self.err(E::BAD_COMMAND, w0.pos + 1, 0));
            }
            if !is_return {
                return Err(self.err(E::BAD_MAXACT_TYPE, w0.pos + 1, 0));
            }
            match kstrtoul(maxact) {
                Some(v) if v > 0 && v <= u64::from(u32::MAX) => {
                    if v > u64::from(MAXACTIVE_MAX) {
                        return Err(self.err(E::MAXACT_TOO_BIG, w0.pos + 1, 0));
                    }
                    maxactive = Some(v as u32);
                }
                _ => return Err(self.err(E::BAD_MAXACT, w0.pos + 1, 0)),
            }
        }

        let Some(w1) = self.words.get(1).copied() else {
            return Err(self
                .err(E::BAD_PROBE_ADDR, self.line.len(), 1)
                .detail("missing probe point"));
        };
        let mut target_text = w1.text;
        let mut hardware = false;
        // Suffixes: the kernel's `%return`, and hvprobe's `%hw` (a debug
        // register instead of an int3), in either order, each at most once.
        if let Some(pct) = target_text.find('%') {
            let mut at = pct;
            let mut saw_return = false;
            for suffix in target_text[pct + 1..].split('%') {
                let seen = match suffix {
                    "return" => std::mem::replace(&mut saw_return, true),
                    "hw" => std::mem::replace(&mut hardware, true),
                    _ => return Err(self.err(E::BAD_ADDR_SUFFIX, w1.pos + at, 1)),
                };
                if seen {
                    return Err(self
                        .err(E::BAD_ADDR_SUFFIX, w1.pos + at, 1)
                        .detail("a suffix given twice"));
                }
                at += suffix.len() + 1;
            }
            is_return |= saw_return;
            target_text = &target_text[..pct];
        }
        let target = self.target(target_text, w1.pos)?;
        if is_return {
            if let ProbeTarget::Symbol { offset, .. } = target {
                if offset != 0 {
                    return Err(self.err(E::BAD_RETPROBE, w1.pos, 1));
                }
            }
        }

        let (group, event) = match event_part {
            Some((s, pos)) => self.event_name(s, pos)?,
            None => (None, None),
        };
        let event_generated = event.is_none();
        let event = event.unwrap_or_else(|| generated_event_name(is_return, &target));
        let kind = if is_return {
            ProbeKind::Kretprobe { maxactive }
        } else {
            ProbeKind::Kprobe
        };

        let entry_or_return = is_return || matches!(target, ProbeTarget::Symbol { offset: 0, .. });
        let mut args: Vec<FetchArg> = Vec::new();
        for (i, w) in self.words.iter().enumerate().skip(2) {
            if args.len() == MAX_TRACE_ARGS {
                return Err(self.err(E::TOO_MANY_ARGS, w.pos, i));
            }
            let ctx = ArgCtx {
                word: i,
                is_return,
                entry_or_return,
            };
            let arg = self.fetch_arg(*w, args.len(), &args, &ctx)?;
            args.push(arg);
        }

        Ok(ProbeDef {
            kind,
            group: group.unwrap_or_else(|| DEFAULT_GROUP.to_string()),
            event,
            event_generated,
            target,
            hardware,
            args,
        })
    }

    fn target(&self, s: &str, pos: usize) -> Result<ProbeTarget, ParseError> {
        if let Some(a) = kstrtoul(s) {
            return Ok(ProbeTarget::Address(a));
        }
        let bad = || self.err(E::BAD_PROBE_ADDR, pos, 1);
        // traceprobe_split_symbol_offset: the offset starts at the first + or -.
        let (name, offset) = match s.find(['+', '-']) {
            Some(p) => {
                let off = kstrtol(&s[p..]).ok_or_else(bad)?;
                if off < 0 || off > i64::from(u32::MAX) {
                    return Err(bad());
                }
                (&s[..p], off as u64)
            }
            None => (s, 0),
        };
        let (module, symbol) = match name.split_once(':') {
            Some((m, sym)) => (Some(m), sym),
            None => (None, name),
        };
        let sym_ok = |t: &str| {
            !t.is_empty()
                && !t.as_bytes()[0].is_ascii_digit()
                && t.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'$'))
        };
        if !sym_ok(symbol) || module.is_some_and(|m| !sym_ok(m)) {
            return Err(bad());
        }
        if symbol.len() >= KSYM_NAME_LEN {
            return Err(bad().detail(format!(
                "symbol name is {} bytes; KSYM_NAME_LEN allows at most {}",
                symbol.len(),
                KSYM_NAME_LEN - 1
            )));
        }
        if let Some(m) = module.filter(|m| m.len() >= MODULE_NAME_LEN) {
            return Err(bad().detail(format!(
                "module name is {} bytes; MODULE_NAME_LEN allows at most {}",
                m.len(),
                MODULE_NAME_LEN - 1
            )));
        }
        Ok(ProbeTarget::Symbol {
            module: module.map(str::to_string),
            symbol: symbol.to_string(),
            offset,
        })
    }

    fn fetch_arg(
        &self,
        w: Word<'a>,
        index: usize,
        prev: &[FetchArg],
        ctx: &ArgCtx,
    ) -> Result<FetchArg, ParseError> {
        let arg = w.text;
        let (name, name_generated, body, body_pos) = match arg.find('=') {
            Some(eq) => {
                let name = &arg[..eq];
                if name.len() > MAX_ARG_NAME_LEN {
                    return Err(self.err(E::ARG_NAME_TOO_LONG, w.pos, ctx.word));
                }
                if name.is_empty() {
                    return Err(self.err(E::NO_ARG_NAME, w.pos, ctx.word));
                }
                (name.to_string(), false, &arg[eq + 1..], w.pos + eq + 1)
            }
            None => {
                // Like kernels with BTF args: a plain identifier names itself.
                let head = arg.split(':').next().unwrap_or("");
                let name = if is_good_name(head) {
                    head.to_string()
                } else {
                    format!("arg{}", index + 1)
                };
                (name, true, arg, w.pos)
            }
        };
        if !is_good_name(&name) {
            return Err(self.err(E::BAD_ARG_NAME, w.pos, ctx.word));
        }
        if RESERVED_FIELDS.contains(&name.as_str()) || prev.iter().any(|a| a.name == name) {
            return Err(self.err(E::USED_ARG_NAME, w.pos, ctx.word));
        }

        if body.len() > MAX_ARGSTR_LEN {
            return Err(self.err(E::ARG_TOO_LONG, body_pos, ctx.word));
        }
        if body.is_empty() {
            return Err(self.err(E::NO_ARG_BODY, body_pos, ctx.word));
        }

        let (expr_text, type_text) = match body.find(':') {
            Some(c) => (&body[..c], Some((&body[c + 1..], body_pos + c + 1))),
            None => (body, None),
        };
        let type_pos = type_text.map(|(_, p)| p).unwrap_or(body_pos);
        let ty = self.fetch_type(expr_text, type_text, ctx)?;

        let expr = self.expr(expr_text, body_pos, ctx)?;
        self.check_store(&expr, &ty, body_pos, type_pos, ctx)?;

        Ok(FetchArg {
            name,
            name_generated,
            expr,
            ty,
        })
    }

    /// `parse_probe_arg_type`: `TYPE[N]`, defaults, `$comm` and immediate strings.
    fn fetch_type(
        &self,
        expr_text: &str,
        type_text: Option<(&str, usize)>,
        ctx: &ArgCtx,
    ) -> Result<FetchType, ParseError> {
        let mut array = None;
        let mut tname = None;
        let mut tpos = 0;
        if let Some((t, pos)) = type_text {
            tpos = pos;
            let mut t = t;
            if let Some(open) = t.find('[') {
                let rest = &t[open + 1..];
                let Some(close) = rest.find(']') else {
                    return Err(self.err(E::ARRAY_NO_CLOSE, pos + t.len(), ctx.word));
                };
                if close + 1 != rest.len() {
                    return Err(self.err(
                        E::BAD_ARRAY_SUFFIX,
                        pos + open + 1 + close + 1,
                        ctx.word,
                    ));
                }
                let n = match kstrtoul(&rest[..close]) {
                    Some(n) if n > 0 => n,
                    _ => return Err(self.err(E::BAD_ARRAY_NUM, pos + open + 1, ctx.word)),
                };
                if n > u64::from(MAX_ARRAY_LEN) {
                    return Err(self.err(E::ARRAY_TOO_BIG, pos + open + 1, ctx.word));
                }
                array = Some(n as u32);
                t = &t[..open];
            }
            tname = Some(t);
        }

        if matches!(expr_text, "$comm" | "$COMM") || expr_text.starts_with("\\\"") {
            if array.is_some() || tname.is_some_and(|t| t != "string") {
                let p = if type_text.is_some() { tpos } else { 0 };
                return Err(self.err(E::NEED_STRING_TYPE, p, ctx.word));
            }
            return Ok(FetchType {
                base: BaseType::String,
                array: None,
                bitfield: None,
                explicit: tname.is_some(),
            });
        }

        let Some(t) = tname else {
            return Ok(FetchType::default_type());
        };
        let bad_type = || self.err(E::BAD_TYPE, tpos, ctx.word);
        if let Some(bf) = t.strip_prefix('b') {
            // find_fetch_type: the container after '/' decides the type first.
            let slash = bf.find('/').ok_or_else(bad_type)?;
            let container = kstrtoul(&bf[slash + 1..]).ok_or_else(bad_type)?;
            let base = u32::try_from(container)
                .ok()
                .and_then(BaseType::unsigned_of_bits)
                .ok_or_else(bad_type)?;
            let bad_bf = || self.err(E::BAD_BITFIELD, tpos, ctx.word);
            let (width, rest) = simple_strtoul(bf);
            let rest = rest.strip_prefix('@').ok_or_else(bad_bf)?;
            if width == 0 {
                return Err(bad_bf());
            }
            let (offset, tail) = simple_strtoul(rest);
            if tail.len() == rest.len() || !tail.starts_with('/') {
                return Err(bad_bf());
            }
            if width.saturating_add(offset) > container {
                return Err(bad_bf());
            }
            return Ok(FetchType {
                base,
                array,
                bitfield: Some(Bitfield {
                    width: width as u32,
                    offset: offset as u32,
                    container: container as u32,
                }),
                explicit: true,
            });
        }
        let base = BaseType::from_name(t).ok_or_else(bad_type)?;
        Ok(FetchType {
            base,
            array,
            bitfield: None,
            explicit: true,
        })
    }

    /// `parse_probe_arg`: one fetch expression at byte position `pos`.
    fn expr(&self, s: &str, pos: usize, ctx: &ArgCtx) -> Result<FetchExpr, ParseError> {
        let word = ctx.word;
        let Some(&first) = s.as_bytes().first() else {
            return Err(self.err(E::BAD_FETCH_ARG, pos, word));
        };
        match first {
            b'$' => self.var(s, pos, ctx),
            b'%' => Reg::from_name(&s[1..]).map(FetchExpr::Reg).ok_or_else(|| {
                let e = self.err(E::BAD_REG_NAME, pos, word);
                match Reg::suggest(&s[1..]) {
                    Some(r) => e.detail(format!("x86-64 pt_regs name: did you mean %{r}?")),
                    None => e,
                }
            }),
            b'@' => {
                let rest = &s[1..];
                if rest.as_bytes().first().is_some_and(u8::is_ascii_digit) {
                    kstrtoul(rest)
                        .map(FetchExpr::Mem)
                        .ok_or_else(|| self.err(E::BAD_MEM_ADDR, pos, word))
                } else if rest.starts_with('+') {
                    Err(self.err(E::FILE_ON_KPROBE, pos, word))
                } else {
                    let (symbol, offset) = match rest.find(['+', '-']) {
                        Some(p) => {
                            let off = kstrtol(&rest[p..])
                                .ok_or_else(|| self.err(E::BAD_MEM_ADDR, pos, word))?;
                            (&rest[..p], off)
                        }
                        None => (rest, 0),
                    };
                    if !is_good_symbol(symbol) {
                        return Err(self.err(E::BAD_MEM_ADDR, pos, word));
                    }
                    Ok(FetchExpr::SymMem {
                        symbol: symbol.to_string(),
                        offset,
                        resolved: None,
                    })
                }
            }
            b'+' | b'-' => {
                let neg = first == b'-';
                let mut rest = &s[1..];
                let user = rest.starts_with('u');
                if user {
                    rest = &rest[1..];
                }
                let Some(open) = rest.find('(') else {
                    return Err(self.err(E::DEREF_NEED_BRACE, pos, word));
                };
                let num = &rest[..open];
                // The sign belongs to the number; "+-8(" and "-+8(" are invalid.
                if num.starts_with(['+', '-']) {
                    return Err(self.err(E::BAD_DEREF_OFFS, pos, word));
                }
                let offset = if neg {
                    kstrtol(&format!("-{num}"))
                } else {
                    kstrtol(num)
                }
                .ok_or_else(|| self.err(E::BAD_DEREF_OFFS, pos, word))?;
                let inner_start = s.len() - rest.len() + open + 1;
                let inner_pos = pos + inner_start;
                let inner_all = &s[inner_start..];
                let Some(close) = inner_all.rfind(')') else {
                    return Err(self.err(E::DEREF_OPEN_BRACE, inner_pos + inner_all.len(), word));
                };
                if close + 1 != inner_all.len() {
                    // The kernel silently drops text after the last ')'; refuse it.
                    return Err(self
                        .err(E::BAD_FETCH_ARG, inner_pos + close + 1, word)
                        .detail("unexpected text after ')'"));
                }
                let inner = self.expr(&inner_all[..close], inner_pos, ctx)?;
                if matches!(inner, FetchExpr::Comm | FetchExpr::ImmStr(_)) {
                    return Err(self.err(E::COMM_CANT_DEREF, inner_pos, word));
                }
                let e = FetchExpr::Deref {
                    offset,
                    user,
                    inner: Box::new(inner),
                };
                if expr_ops(&e) > MAX_FETCH_OPS {
                    return Err(self.err(E::TOO_MANY_OPS, inner_pos, word));
                }
                Ok(e)
            }
            b'\\' => {
                let rest = &s[1..];
                if let Some(str_body) = rest.strip_prefix('"') {
                    match str_body.strip_suffix('"') {
                        Some(v) => Ok(FetchExpr::ImmStr(v.to_string())),
                        None => Err(self.err(E::IMMSTR_NO_CLOSE, pos + 2 + str_body.len(), word)),
                    }
                } else {
                    let v = match rest.as_bytes().first() {
                        Some(c) if c.is_ascii_digit() => kstrtoul(rest),
                        Some(b'-') => kstrtol(rest).map(|v| v as u64),
                        Some(b'+') => kstrtol(&rest[1..]).map(|v| v as u64),
                        _ => None,
                    };
                    v.map(FetchExpr::Imm)
                        .ok_or_else(|| self.err(E::BAD_IMM, pos + 1, word))
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                if !ctx.entry_or_return {
                    return Err(self.err(E::NOSUP_BTFARG, pos, word));
                }
                let (ident, rest) = split_ident(s);
                let path = self.member_path(rest, pos + ident.len(), word)?;
                Ok(FetchExpr::Named(NamedExpr {
                    base: NamedBase::Param(ident.to_string()),
                    path,
                }))
            }
            _ => Err(self.err(E::BAD_FETCH_ARG, pos, word)),
        }
    }

    /// `->a.b->c` after a named base; positions are byte positions in the line.
    fn member_path(
        &self,
        mut s: &str,
        mut pos: usize,
        word: usize,
    ) -> Result<Vec<MemberStep>, ParseError> {
        let mut path = Vec::new();
        while !s.is_empty() {
            let (arrow, skip) = if s.starts_with("->") {
                (true, 2)
            } else if s.starts_with('.') {
                (false, 1)
            } else if s.starts_with('-') {
                return Err(self.err(E::BAD_HYPHEN, pos, word));
            } else {
                return Err(self.err(E::BAD_FETCH_ARG, pos, word));
            };
            let (ident, rest) = split_ident(&s[skip..]);
            if !is_good_name(ident) {
                return Err(self.err(E::NO_BTF_FIELD, pos + skip, word));
            }
            path.push(MemberStep {
                arrow,
                name: ident.to_string(),
                pos,
            });
            pos += skip + ident.len();
            s = rest;
        }
        Ok(path)
    }

    /// `parse_probe_vars`: `$retval`, `$stack[N]`, `$comm`, `$argN`, and
    /// their DWARF member forms (`$arg1->f_path`).
    fn var(&self, s: &str, pos: usize, ctx: &ArgCtx) -> Result<FetchExpr, ParseError> {
        let word = ctx.word;
        let body = &s[1..];
        // Split off a member path for the DWARF forms.
        let (var, path_text) = match body.find(['-', '.']) {
            Some(p) => (&body[..p], &body[p..]),
            None => (body, ""),
        };
        let base = if var == "retval" {
            if !ctx.is_return {
                return Err(self.err(E::RETVAL_ON_PROBE, pos, word));
            }
            if path_text.is_empty() {
                return Ok(FetchExpr::Retval);
            }
            NamedBase::Retval
        } else if let Some(n) = var.strip_prefix("stack").filter(|_| path_text.is_empty()) {
            if n.is_empty() {
                return Ok(FetchExpr::StackPtr);
            }
            if !n.as_bytes()[0].is_ascii_digit() {
                return Err(self.err(E::BAD_VAR, pos, word));
            }
            let v = kstrtoul10(n).ok_or_else(|| self.err(E::BAD_VAR, pos, word))?;
            if v > PARAM_MAX_STACK {
                return Err(self.err(E::BAD_STACK_NUM, pos, word));
            }
            return Ok(FetchExpr::Stack(v as u32));
        } else if matches!(var, "comm" | "COMM") && path_text.is_empty() {
            return Ok(FetchExpr::Comm);
        } else if let Some(n) = var.strip_prefix("arg") {
            let v = kstrtoul10(n).ok_or_else(|| self.err(E::BAD_VAR, pos, word))?;
            if v == 0 || v > PARAM_MAX_STACK {
                return Err(self.err(E::BAD_ARG_NUM, pos, word));
            }
            if !ctx.entry_or_return {
                return Err(self.err(E::NOFENTRY_ARGS, pos, word));
            }
            if path_text.is_empty() {
                return Ok(FetchExpr::Arg(v as u32));
            }
            NamedBase::Arg(v as u32)
        } else {
            return Err(self.err(E::BAD_VAR, pos, word));
        };
        let path = self.member_path(path_text, pos + 1 + var.len(), word)?;
        Ok(FetchExpr::Named(NamedExpr { base, path }))
    }

    /// `finalize_fetch_insn`: which expressions fit which store types.
    fn check_store(
        &self,
        expr: &FetchExpr,
        ty: &FetchType,
        body_pos: usize,
        type_pos: usize,
        ctx: &ArgCtx,
    ) -> Result<(), ParseError> {
        let word = ctx.word;
        let named = matches!(expr, FetchExpr::Named(_));
        let mem = expr.is_memory() || named;
        match ty.base {
            BaseType::SymStr => {
                let ok = mem
                    || matches!(
                        expr,
                        FetchExpr::Reg(_)
                            | FetchExpr::Stack(_)
                            | FetchExpr::Retval
                            | FetchExpr::Arg(_)
                    );
                if !ok || ty.array.is_some() {
                    let code = if ok { E::BAD_STRING } else { E::BAD_SYMSTRING };
                    return Err(self.err(code, type_pos, word));
                }
            }
            BaseType::String | BaseType::UString => {
                let ok = mem
                    || matches!(
                        expr,
                        FetchExpr::Imm(_) | FetchExpr::Comm | FetchExpr::ImmStr(_)
                    );
                if !ok || (ty.array.is_some() && !mem) {
                    return Err(self.err(E::BAD_STRING, type_pos, word));
                }
            }
            _ => {
                if ty.array.is_some() && !mem {
                    return Err(self.err(E::BAD_STRING, type_pos, word));
                }
            }
        }
        if store_ops(expr, ty) > MAX_FETCH_OPS {
            return Err(self.err(E::TOO_MANY_OPS, body_pos, word));
        }
        Ok(())
    }
}

fn is_good_symbol(s: &str) -> bool {
    !s.is_empty()
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'$'))
}

/// Splits a leading C identifier off `s`.
fn split_ident(s: &str) -> (&str, &str) {
    let n = s
        .bytes()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
        .count();
    s.split_at(n)
}

/// Number of kernel fetch instructions an expression compiles to.
fn expr_ops(e: &FetchExpr) -> usize {
    match e {
        FetchExpr::Mem(_) => 2,
        FetchExpr::SymMem { .. } => 3,
        FetchExpr::Deref { inner, .. } => expr_ops(inner) + 1,
        FetchExpr::Named(n) => 1 + n.path.len(),
        _ => 1,
    }
}

/// Fetch instructions including store, bitfield and array ops.
fn store_ops(e: &FetchExpr, ty: &FetchType) -> usize {
    let base = expr_ops(e);
    let replaces_deref = e.is_memory()
        && (!ty.base.is_string() || (ty.base != BaseType::SymStr && ty.array.is_none()));
    base + usize::from(!replaces_deref)
        + usize::from(ty.bitfield.is_some())
        + usize::from(ty.array.is_some())
}

/// The kernel's generated name: `p_SYM_OFFS` / `r_SYM_OFFS` / `p_0xADDR`,
/// with every non-alphanumeric char turned into `_`, at most 63 chars.
fn generated_event_name(is_return: bool, target: &ProbeTarget) -> String {
    let c = if is_return { 'r' } else { 'p' };
    let raw = match target {
        ProbeTarget::Symbol {
            module,
            symbol,
            offset,
        } => match module {
            Some(m) => format!("{c}_{m}:{symbol}_{offset}"),
            None => format!("{c}_{symbol}_{offset}"),
        },
        ProbeTarget::Address(a) => format!("{c}_0x{a:x}"),
    };
    raw.chars()
        .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
        .take(MAX_EVENT_NAME_LEN - 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_longer_than_the_kernel_takes_are_refused() {
        // Surrounding whitespace does not count: 1 MB of trailing spaces.
        let padded = format!("  p:g/e hv_fib{}", " ".repeat(1 << 20));
        assert!(matches!(parse_command(&padded), Ok(Command::Add(_))));
        assert_eq!(trim_line(&padded), "p:g/e hv_fib");
        assert_eq!(trim_line("\t\x0bp x \r\n"), "p x");
        // MAX_LINE_LEN bytes are parsed (and fail on their content) ...
        let at_limit = format!("p {}", "a".repeat(MAX_LINE_LEN - 2));
        assert_eq!(
            parse_command(&at_limit).unwrap_err().code,
            E::BAD_PROBE_ADDR
        );
        // ... one more is TOO_LONG, pointing at the first byte past the limit.
        let over = format!(" p {}", "a".repeat(MAX_LINE_LEN - 1));
        let e = parse_command(&over).unwrap_err();
        assert_eq!((e.code, e.pos), (E::TOO_LONG, 1 + MAX_LINE_LEN));
        assert!(e.summary().contains("4096 bytes"), "{}", e.summary());
        assert!(e.summary().contains("limit is 4095"), "{}", e.summary());
        // Filters have the kernel's bound too.
        let f = crate::Filter::parse(&"a".repeat(MAX_FILTER_LEN + 1)).unwrap_err();
        assert_eq!((f.code, f.pos), (E::TOO_LONG, MAX_FILTER_LEN));
    }

    #[test]
    fn symbol_and_module_names_have_the_kernel_bounds() {
        let sym = "s".repeat(KSYM_NAME_LEN - 1);
        assert!(parse_probe(&format!("p {sym}")).is_ok());
        let e = parse_probe(&format!("p {sym}s+4")).unwrap_err();
        assert_eq!((e.code, e.pos), (E::BAD_PROBE_ADDR, 2));
        assert!(e.summary().contains("at most 511"), "{}", e.summary());
        let m = "m".repeat(MODULE_NAME_LEN - 1);
        assert!(parse_probe(&format!("p {m}:f")).is_ok());
        let e = parse_probe(&format!("p {m}m:f")).unwrap_err();
        assert!(e.summary().contains("at most 55"), "{}", e.summary());
    }

    #[test]
    fn generated_names() {
        let t = ProbeTarget::Symbol {
            module: Some("ext4".into()),
            symbol: "ext4_sync_fs".into(),
            offset: 16,
        };
        assert_eq!(generated_event_name(false, &t), "p_ext4_ext4_sync_fs_16");
        assert_eq!(
            generated_event_name(true, &ProbeTarget::Address(0xffff_ffff_8100_0000)),
            "r_0xffffffff81000000"
        );
        let long = ProbeTarget::Symbol {
            module: None,
            symbol: "a".repeat(100),
            offset: 0,
        };
        assert_eq!(generated_event_name(false, &long).len(), 63);
    }

    #[test]
    fn ops_count_matches_kernel_shape() {
        let e = FetchExpr::Deref {
            offset: 0,
            user: false,
            inner: Box::new(FetchExpr::Reg(Reg::Di)),
        };
        assert_eq!(expr_ops(&e), 2);
        // +0(%di):u32 stores by replacing the deref; %di:u32 needs a raw store.
        assert_eq!(store_ops(&e, &FetchType::default_type()), 2);
        assert_eq!(
            store_ops(&FetchExpr::Reg(Reg::Di), &FetchType::default_type()),
            2
        );
    }
}
