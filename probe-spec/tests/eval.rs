//! Fetch-argument evaluation over a fake vCPU: registers, paged memory with
//! holes, a symbol table and a task name.

use std::collections::HashMap;

use probe_spec::*;

const PAGE: u64 = 4096;

#[derive(Default)]
struct FakeVcpu {
    regs: HashMap<Reg, u64>,
    /// Mapped pages (page-aligned address -> contents).
    pages: HashMap<u64, Vec<u8>>,
    comm: Option<String>,
    syms: Vec<(u64, u64, &'static str)>,
    user_reads: std::cell::Cell<usize>,
}

impl FakeVcpu {
    fn set(&mut self, r: Reg, v: u64) -> &mut Self {
        self.regs.insert(r, v);
        self
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> &mut Self {
        for (i, b) in data.iter().enumerate() {
            let a = addr + i as u64;
            let page = self
                .pages
                .entry(a & !(PAGE - 1))
                .or_insert_with(|| vec![0; PAGE as usize]);
            page[(a % PAGE) as usize] = *b;
        }
        self
    }
    fn write_u64(&mut self, addr: u64, v: u64) -> &mut Self {
        self.write(addr, &v.to_le_bytes())
    }
}

impl FetchContext for FakeVcpu {
    fn reg(&self, r: Reg) -> u64 {
        self.regs.get(&r).copied().unwrap_or(0)
    }
    fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = addr.wrapping_add(i as u64);
            let page = self
                .pages
                .get(&(a & !(PAGE - 1)))
                .ok_or(Fault { addr: a })?;
            *b = page[(a % PAGE) as usize];
        }
        Ok(())
    }
    fn read_user(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.user_reads.set(self.user_reads.get() + 1);
        self.read_kernel(addr, buf)
    }
    fn comm(&self) -> Option<String> {
        self.comm.clone()
    }
    fn symbolize(&self, addr: u64) -> Option<String> {
        self.syms
            .iter()
            .find(|(a, size, _)| addr >= *a && addr < a + size)
            .map(|(a, size, n)| format!("{n}+0x{:x}/0x{size:x}", addr - a))
    }
}

fn eval_line(line: &str, cpu: &FakeVcpu) -> Vec<ArgValue> {
    let def = parse_probe(line).unwrap_or_else(|e| panic!("{e}"));
    evaluate(&def, cpu, &EvalOptions::default())
}

fn texts(v: &[ArgValue]) -> Vec<String> {
    v.iter().map(|a| a.to_string()).collect()
}

#[test]
fn registers_and_integer_types() {
    let mut cpu = FakeVcpu::default();
    cpu.set(Reg::Di, 0xffff_ffff_ffff_ff9c)
        .set(Reg::Si, 0x1234_5678_9abc_def0);
    let v = eval_line(
        "p f a=%di b=%di:s32 c=%di:u32 d=%si:x16 e=%si:u8 f=%si:s8 g=%si:char h=%di:s64 i=%si",
        &cpu,
    );
    assert_eq!(
        texts(&v),
        [
            "a=0xffffffffffffff9c",
            "b=-100",
            "c=4294967196",
            "d=0xdef0",
            "e=240",
            "f=-16",
            "g='\\xf0'",
            "h=-100",
            "i=0x123456789abcdef0"
        ]
    );
    assert_eq!(
        v[1].value,
        Value::Signed {
            bits: 32,
            value: -100
        }
    );
    assert_eq!(
        v[3].value,
        Value::Hex {
            bits: 16,
            value: 0xdef0
        }
    );
    assert_eq!(v[1].ty, "s32");
}

#[test]
fn memory_strings_and_faults() {
    let mut cpu = FakeVcpu::default();
    cpu.set(Reg::Si, 0x10_000)
        .set(Reg::Di, 0x20_000)
        .set(Reg::Dx, 0xdead_0000);
    cpu.write(0x10_000, b"/etc/passwd\0");
    cpu.write_u64(0x20_000, 0x10_000)
        .write_u64(0x20_008, 0x10_005);
    cpu.write(0x10_100, &0x0102_0304u32.to_le_bytes());
    let v = eval_line(
        "p f path=+0(%si):string tail=+5(%si):string pp=+0(+0(%di)):string word=+0x100(%si):u32 \
         bad=+0(%dx):string badint=+8(%dx):u64 arr=+0(%di):x64[2] strs=+0(%di):string[2] \
         bytes=+0(%si):u8[4] ok=%si",
        &cpu,
    );
    assert_eq!(
        texts(&v),
        [
            "path=\"/etc/passwd\"",
            "tail=\"passwd\"",
            "pp=\"/etc/passwd\"",
            "word=16909060",
            "bad=(fault)",
            "badint=(fault)",
            "arr={0x10000,0x10005}",
            "strs={\"/etc/passwd\",\"passwd\"}",
            "bytes={47,101,116,99}",
            "ok=0x10000",
        ]
    );
    // The fault carries the address that failed, and others are unaffected.
    assert_eq!(v[4].value, Value::Fault { addr: 0xdead_0000 });
    assert_eq!(v[5].value, Value::Fault { addr: 0xdead_0008 });
    assert!(v[4].value.is_fault());
}

#[test]
fn string_across_pages_limits_and_partial_arrays() {
    let mut cpu = FakeVcpu::default();
    // A string that ends exactly at the end of a mapped page, next page unmapped.
    let start = 0x30_000 + PAGE - 4;
    cpu.write(start, b"abc\0");
    cpu.set(Reg::Si, start);
    assert_eq!(
        texts(&eval_line("p f s=+0(%si):string", &cpu)),
        ["s=\"abc\""]
    );
    // Without a NUL before the unmapped page: a fault, like the kernel.
    cpu.write(start, b"abcd");
    assert_eq!(
        texts(&eval_line("p f s=+0(%si):string", &cpu)),
        ["s=(fault)"]
    );

    // Length limit.
    cpu.write(0x40_000, &[b'x'; 100])
        .write(0x40_000 + 100, b"\0");
    cpu.set(Reg::Di, 0x40_000);
    let def = parse_probe("p f s=+0(%di):string").unwrap();
    let v = evaluate(&def, &cpu, &EvalOptions { max_string_len: 10 });
    assert_eq!(
        v[0].value,
        Value::Str {
            bytes: b"xxxxxxxxxx".to_vec(),
            truncated: true
        }
    );
    let v = evaluate(&def, &cpu, &EvalOptions::default());
    assert!(matches!(&v[0].value, Value::Str { bytes, truncated: false } if bytes.len() == 100));

    // An array whose second element is unmapped keeps the first.
    cpu.write(0x50_000 + PAGE - 4, &7u32.to_le_bytes());
    cpu.set(Reg::Dx, 0x50_000 + PAGE - 4);
    let v = eval_line("p f a=+0(%dx):u32[2]", &cpu);
    assert_eq!(texts(&v), ["a={7,(fault)}"]);
    assert!(v[0].value.is_fault());
}

#[test]
fn stack_args_retval_comm_immediates_symbols() {
    let mut cpu = FakeVcpu::default();
    let sp = 0x7000;
    cpu.set(Reg::Sp, sp)
        .set(Reg::Di, 1)
        .set(Reg::Si, 2)
        .set(Reg::Dx, 3);
    cpu.set(Reg::Cx, 4)
        .set(Reg::R8, 5)
        .set(Reg::R9, 6)
        .set(Reg::Ax, 0xfffffffffffffffe);
    cpu.write_u64(sp, 0xffff_ffff_8100_1234); // return address
    cpu.write_u64(sp + 8, 7).write_u64(sp + 16, 8);
    cpu.comm = Some("bash".into());
    cpu.syms = vec![
        (0xffff_ffff_8100_1200, 0x80, "vfs_read"),
        (0xffff_ffff_8200_0000, 8, "jiffies"),
    ];
    cpu.write_u64(0xffff_ffff_8200_0000, 12345);
    cpu.write(0x9000, b"hi\0");

    let v = eval_line(
        "p f a1=$arg1 a6=$arg6:u8 a7=$arg7:u8 a8=$arg8:u8 s=$stack s0=$stack0:symbol s1=$stack1:u8 \
         c=$comm i=\\-2:s32 t=\\\"lit\" is=\\0x9000:string sym=%ax:symbol ss=$stack0:symstr",
        &cpu,
    );
    assert_eq!(
        texts(&v),
        [
            "a1=0x1",
            "a6=6",
            "a7=7",
            "a8=8",
            "s=0x7000",
            "s0=vfs_read+0x34/0x80",
            "s1=7",
            "c=\"bash\"",
            "i=-2",
            "t=\"lit\"",
            "is=\"hi\"",
            "sym=0xfffffffffffffffe",
            "ss=\"vfs_read+0x34/0x80\"",
        ]
    );

    let mut def = parse_probe("r f r=$retval:s64 j=@jiffies:u64 k=@jiffies+4096").unwrap();
    // Unresolved @SYM is reported as unavailable, not as a fault or a panic.
    let v = evaluate(&def, &cpu, &EvalOptions::default());
    assert!(
        matches!(v[1].value, Value::Unavailable { .. }),
        "{:?}",
        v[1]
    );
    let lookup = |s: &str| (s == "jiffies").then_some(0xffff_ffff_8200_0000u64);
    resolve_symbols(&mut def, "", &lookup).unwrap();
    let v = evaluate(&def, &cpu, &EvalOptions::default());
    assert_eq!(texts(&v), ["r=-2", "j=12345", "k=(fault)"]);
    let mut bad = parse_probe("p f x=@nosuch").unwrap();
    let e = resolve_symbols(&mut bad, "p f x=@nosuch", &lookup).unwrap_err();
    assert_eq!((e.code, e.pos), (ErrorCode::NO_SYMBOL, 6));

    // No comm known: unavailable, others still fetched.
    cpu.comm = None;
    let v = eval_line("p f c=$comm x=%di", &cpu);
    assert_eq!(texts(&v), ["c=(unavailable)", "x=0x1"]);
}

#[test]
fn user_reads_and_bitfields() {
    let mut cpu = FakeVcpu::default();
    cpu.set(Reg::Si, 0x1000);
    cpu.write(0x1000, b"user\0");
    cpu.write(0x2000, &[0b1011_0110, 0xff]);
    cpu.set(Reg::Di, 0x2000);
    let v = eval_line("p f u=+u0(%si):string us=+0(%si):ustring", &cpu);
    assert_eq!(texts(&v), ["u=\"user\"", "us=\"user\""]);
    assert!(cpu.user_reads.get() >= 2);

    // 0b1011_0110: bits 2..5 = 0b1101 = 13; bits 4..7 = 0b1011 = 11.
    let v = eval_line(
        "p f a=+0(%di):b4@2/8 b=+0(%di):b4@4/8 c=+0(%di):b1@0/8 d=+0(%di):b16@0/16 e=%di:b8@8/16",
        &cpu,
    );
    assert_eq!(texts(&v), ["a=13", "b=11", "c=0", "d=65462", "e=32"]);
    assert_eq!(v[0].value, Value::Unsigned { bits: 8, value: 13 });
    assert_eq!(v[0].ty, "b4@2/8");
}

#[test]
fn return_probes_use_entry_args() {
    let def = parse_probe("r f fd=$arg1:s32 name=+0($arg2):string ret=$retval:s32").unwrap();
    assert_eq!(def.entry_arg_indices(), [0, 1]);
    let mut entry = FakeVcpu::default();
    entry.set(Reg::Di, 3).set(Reg::Si, 0x1000);
    let saved = EntryArgs::capture(&def, &entry);

    // At return the argument registers are clobbered; memory is read then.
    let mut ret = FakeVcpu::default();
    ret.set(Reg::Di, 99)
        .set(Reg::Si, 0)
        .set(Reg::Ax, 0xffff_fff2);
    ret.write(0x1000, b"now\0");
    let ctx = AtReturn {
        inner: &ret,
        entry: &saved,
    };
    let v = evaluate(&def, &ctx, &EvalOptions::default());
    assert_eq!(texts(&v), ["fd=3", "name=\"now\"", "ret=-14"]);

    // Without saved args they are unavailable, never taken from clobbered regs.
    let none = EntryArgs::default();
    let ctx = AtReturn {
        inner: &ret,
        entry: &none,
    };
    let v = evaluate(&def, &ctx, &EvalOptions::default());
    assert!(matches!(v[0].value, Value::Unavailable { .. }));

    // Capturing into reused buffers saves the same, and nothing of before.
    let def = parse_probe("r f b=$arg3:s32 a=+8($arg1):u8 again=$arg3:x32 r=$retval").unwrap();
    entry.set(Reg::Dx, 5);
    let mut reused = saved.clone();
    reused.recapture(&def, &entry);
    assert_eq!(reused, EntryArgs::capture(&def, &entry));
    assert_ne!(reused, saved);
}

#[test]
fn event_line_and_json() {
    let mut cpu = FakeVcpu::default();
    cpu.set(Reg::Di, 5).set(Reg::Si, 0x1000);
    cpu.write(0x1000, b"a\x01\xffb\0");
    let v = eval_line("p:open f dfd=%di:s32 path=+0(%si):string", &cpu);
    assert_eq!(
        format_event_line("open", "do_sys_openat2+0x0/0x100", &v),
        "open: (do_sys_openat2+0x0/0x100) dfd=5 path=\"a\\x01\\xffb\""
    );
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json[0]["name"], "dfd");
    assert_eq!(json[0]["type"], "s32");
    assert_eq!(json[0]["value"]["kind"], "signed");
    assert_eq!(json[0]["value"]["value"], 5);
    assert_eq!(json[1]["value"]["kind"], "str");
    assert_eq!(json[1]["value"]["truncated"], false);
    let fault = serde_json::to_value(Value::Fault { addr: 16 }).unwrap();
    assert_eq!(fault, serde_json::json!({"kind": "fault", "addr": 16}));
    // Values read back are the values written, non-UTF-8 strings included
    // (snapshots keep kretprobe entry values this way).
    let values: Vec<Value> = v.iter().map(|a| a.value.clone()).collect();
    let back: Vec<Value> = serde_json::from_str(&serde_json::to_string(&values).unwrap()).unwrap();
    assert_eq!(back, values);
    let text = serde_json::to_value(Value::Str {
        bytes: b"/etc/hostname".to_vec(),
        truncated: false,
    })
    .unwrap();
    assert_eq!(text["bytes"], "/etc/hostname");
}

#[test]
fn reusing_a_value_reads_the_string_into_its_buffer_and_changes_nothing_else() {
    let mut cpu = FakeVcpu::default();
    // Strings of every length around the read sizes, one ending at a page
    // end; the same answers as a fresh evaluation, in the old buffer.
    let def = parse_probe("p f s=+0(%si):string n=%di:u32").unwrap();
    let opts = EvalOptions::default();
    let mut old = Value::Str {
        bytes: Vec::with_capacity(2048),
        truncated: false,
    };
    for (i, len) in [0usize, 1, 63, 64, 127, 128, 129, 600, 700, 1500]
        .into_iter()
        .enumerate()
    {
        let at = 0x60_000 + 0x1000 * i as u64 + 0x7f0;
        let text: Vec<u8> = (0..len).map(|k| b'a' + (k % 26) as u8).collect();
        cpu.write(at, &text).write(at + len as u64, b"\0");
        cpu.set(Reg::Si, at);
        let fresh = evaluate_value(&def.args[0], &cpu, &opts);
        let before = match &old {
            Value::Str { bytes, .. } => bytes.as_ptr(),
            _ => unreachable!(),
        };
        let got = evaluate_value_reusing(&def.args[0], &cpu, &opts, old);
        assert_eq!(got, fresh, "length {len}");
        assert_eq!(
            got,
            Value::Str {
                bytes: text,
                truncated: false
            }
        );
        match &got {
            Value::Str { bytes, .. } => assert_eq!(bytes.as_ptr(), before, "length {len}"),
            _ => unreachable!(),
        }
        old = got;
    }
    // A number, or a fault, in place of an old string: the same as fresh.
    cpu.set(Reg::Di, 7).set(Reg::Si, 0xdead_0000);
    for a in &def.args {
        let old = Value::Str {
            bytes: b"stale".to_vec(),
            truncated: true,
        };
        let fresh = evaluate_value(a, &cpu, &opts);
        assert_eq!(evaluate_value_reusing(a, &cpu, &opts, old), fresh);
    }
    assert_eq!(
        evaluate_value_reusing(&def.args[0], &cpu, &opts, Value::Char { value: 1 }),
        Value::Fault { addr: 0xdead_0000 }
    );
}

#[test]
fn string_text_escapes_each_control_byte_and_keeps_printable_runs() {
    let v = Value::Str {
        bytes: "tab\there\u{85}é\n"
            .as_bytes()
            .iter()
            .copied()
            .chain([0xfe, b'z'])
            .collect(),
        truncated: false,
    };
    assert_eq!(v.to_string(), "\"tab\\x09here\\xc2\\x85é\\x0a\\xfez\"");
    let plain = Value::Str {
        bytes: b"/etc/hostname".to_vec(),
        truncated: false,
    };
    assert_eq!(plain.to_string(), "\"/etc/hostname\"");
}
