//! Fuzzes the kprobe_events parser, the filter parser, name resolution and
//! evaluation: none may panic, and a parsed definition printed back must
//! parse to the same definition.
#![no_main]

use libfuzzer_sys::fuzz_target;
use probe_spec::*;

/// A vCPU whose memory is the fuzz input itself, mapped at 0x1000.
struct InputVcpu<'a>(&'a [u8]);

impl FetchContext for InputVcpu<'_> {
    fn reg(&self, r: Reg) -> u64 {
        // Point some registers into the mapped input, others nowhere.
        match r {
            Reg::Di | Reg::Si | Reg::Sp => 0x1000,
            Reg::Dx => 0x1000 + (self.0.len() as u64 / 2),
            _ => 0xdead_0000_0000,
        }
    }
    fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let off = addr.checked_sub(0x1000).ok_or(Fault { addr })? as usize;
        let src = self
            .0
            .get(off..off.checked_add(buf.len()).ok_or(Fault { addr })?)
            .ok_or(Fault { addr })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn comm(&self) -> Option<String> {
        Some("fuzz".into())
    }
    fn symbolize(&self, addr: u64) -> Option<String> {
        (addr & 1 == 0).then(|| format!("sym+0x{:x}/0x100", addr & 0xff))
    }
}

/// Debug info where every parameter exists and every member is a pointer.
struct AnyDwarf;

impl DebugInfo for AnyDwarf {
    fn param(&self, _func: &str, name: &str) -> Option<ParamInfo> {
        Some(ParamInfo {
            index: (name.len() % 8) as u32,
            ty: ptr_to_struct(name.len() as u64),
        })
    }
    fn param_at(&self, _func: &str, index: u32) -> Option<ParamInfo> {
        Some(ParamInfo {
            index,
            ty: ptr_to_struct(u64::from(index)),
        })
    }
    fn return_type(&self, _func: &str) -> Option<TypeInfo> {
        Some(ptr_to_struct(0))
    }
    fn member(&self, _ty: &TypeInfo, name: &str) -> Option<MemberInfo> {
        let ty = match name.len() % 4 {
            0 => ptr_to_struct(1),
            1 => TypeInfo {
                id: 2,
                name: "struct s".into(),
                size: 16,
                kind: TypeKind::Struct,
            },
            2 => TypeInfo {
                id: 3,
                name: "int".into(),
                size: 4,
                kind: TypeKind::Int { signed: true },
            },
            _ => TypeInfo {
                id: 4,
                name: "char".into(),
                size: 1,
                kind: TypeKind::Char,
            },
        };
        Some(MemberInfo {
            offset: name.len() as u64 * 8,
            ty,
            bitfield: (name.len() % 5 == 0).then_some((1, 3)),
        })
    }
}

fn ptr_to_struct(id: u64) -> TypeInfo {
    TypeInfo {
        id: 0,
        name: "struct s *".into(),
        size: 8,
        kind: TypeKind::Pointer {
            pointee: Some(Box::new(TypeInfo {
                id,
                name: "struct s".into(),
                size: 64,
                kind: TypeKind::Struct,
            })),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Filter::parse(text).map(|f| {
        let _ = f.check(&|_| Some(FieldKind::Unsigned));
        f.matches(&EventFields {
            args: &[],
            extra: &[("a", FieldValue::Str(b"x"))],
        })
    });
    match parse_command(text) {
        Ok(Command::Add(mut def)) => {
            let printed = def.to_string();
            let mut again = match parse_probe(&printed) {
                Ok(d) => d,
                Err(e) => panic!("printed form does not parse: {printed:?}\n{e}"),
            };
            again.event_generated = def.event_generated;
            assert_eq!(def, again, "round trip of {text:?} via {printed:?}");
            let cpu = InputVcpu(data);
            let _ = evaluate(&def, &cpu, &EvalOptions { max_string_len: 64 });
            if resolve_names(&mut def, text, &AnyDwarf).is_ok() {
                let _ = evaluate(&def, &cpu, &EvalOptions { max_string_len: 64 });
            }
        }
        Ok(Command::Remove(_)) => {}
        Err(e) => {
            assert!(e.pos <= text.chars().count());
            let _ = e.to_string();
        }
    }
});
