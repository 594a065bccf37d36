// SPDX-License-Identifier: Apache-2.0
/*
 * Boot CPU and AP setup, command line, ACPI MADT, console, exceptions and
 * the worker loops that call the counted functions and check every result.
 */
#include "hvtest.h"

#define PAGE_OFFSET		0xffff888000000000UL
#define DIRECT_MAP_SIZE		0x100000000UL	/* what the boot page tables map */
#define SERIAL_THR		0x3f8
#define MSR_LSTAR		0xc0000082
#define INT80_VECTOR		0x80
#define LAPIC_PADDR		0xfee00000UL
#define LAPIC_ID		0x020
#define LAPIC_SVR		0x0f0
#define LAPIC_ICR_LO		0x300
#define LAPIC_ICR_HI		0x310
#define ICR_BUSY		(1u << 12)
#define ICR_INIT		0x00004500	/* INIT, level assert */
#define ICR_STARTUP		0x00004600
#define AP_TIMEOUT_TSC		4000000000ULL	/* about 1-2 s of TSC */
#define HVM_START_MAGIC		0x336ec578

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};

struct idt_entry {
	u16 off0;
	u16 sel;
	u8 ist;
	u8 type;
	u16 off1;
	u32 off2;
	u32 reserved;
};

struct exc_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vec, err, rip, cs, rflags, rsp, ss;
};

/* Layout checks against the generated contract. */
_Static_assert(offsetof(struct hv_work, id) == HV_WORK_OFF_ID, "hv_work.id");
_Static_assert(offsetof(struct hv_work, flags) == HV_WORK_OFF_FLAGS, "hv_work.flags");
_Static_assert(offsetof(struct hv_work, name) == HV_WORK_OFF_NAME, "hv_work.name");
_Static_assert(offsetof(struct hv_work, next) == HV_WORK_OFF_NEXT, "hv_work.next");
_Static_assert(offsetof(struct hv_work, data) == HV_WORK_OFF_DATA, "hv_work.data");
_Static_assert(sizeof(struct hv_work) == HV_WORK_SIZE, "hv_work size");

/* From head.S */
extern u64 hv_start_info_pa;
extern const char hv_trampoline_start[], hv_trampoline_end[];
extern const char hv_exc_stubs[];
void asm_exc_int3(void);
void entry_SYSCALL_64(void);
void entry_INT80(void);
void hv_pf_entry_cld(void);

/* Read by the AP trampoline path (hv_ap_entry). */
u64 hv_ap_boot_stack;
u32 hv_ap_boot_cpu;

u64 hv_bp_handled;
u64 hv_expected_counts[HV_NR_COUNTED];
const char linux_banner[] = HV_LINUX_BANNER;

static const char *const hv_fn_names[HV_NR_COUNTED] = { HV_COUNTED_NAMES };
static const char *const hv_open_paths[HV_NR_OPEN_PATHS] = { HV_OPEN_PATHS };
static const u32 hv_open_path_hash[HV_NR_OPEN_PATHS] = HV_OPEN_PATH_HASHES;
static const u64 hv_fib_values[HV_FIB_MODULUS] = HV_FIB_VALUES;
static const u64 hv_fib_calls[HV_FIB_MODULUS] = HV_FIB_CALLS;
static const u32 hv_checksum_prefix[HV_CHECKSUM_DATA_LEN + 1] = HV_CHECKSUM_PREFIX;
static const char *const hv_work_names[3] = { "kworker/0:1", "ksoftirqd/0", "rcu_sched" };

/* In .data: loaded with the image, not zeroed at boot like .bss. */
static struct idt_entry hv_idt[INT80_VECTOR + 1] __attribute__((section(".data")));
static struct idt_entry hv_idt_gap[32] __attribute__((section(".data")));
static u32 hv_ncpus = 1;
static u64 hv_iters = HV_DEFAULT_ITERS;
static int hv_forever;
static int hv_init_hold;
static u64 hv_ftrace_n;
static u64 hv_bench;
static u64 hv_user;
/* hvtest.override=N: calls of hv_may_fail per CPU, and what callers saw. */
static u64 hv_override_n;
static u64 hv_override_calls, hv_overridden, hv_override_mixed;
/* The overridden value callers saw; this marks none yet. */
#define OVERRIDE_UNSET 0x8000000000000000ULL
static u64 hv_override_value = OVERRIDE_UNSET;
static u64 hv_watch_n;
static int hv_idt_gap_on;
static int hv_pf_entry_cld_on;
/* hvtest.recurse_on=N: only CPU N calls hv_recurse (-1: every CPU). */
static long hv_recurse_on = -1;
static u32 hv_ap_started;
static u32 hv_workers_done;
static u32 hv_console_lock;
static u8 hv_apic_ids[HV_MAX_CPUS];

/* ---------------------------------------------------------------- I/O */
static inline void outb(u16 port, u8 v)
{
	asm volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u16 port, u32 v)
{
	asm volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline void wrmsr(u32 msr, u64 v)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;

	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	asm volatile("pause" ::: "memory");
}

static __noreturn void halt_forever(void)
{
	for (;;)
		asm volatile("cli; hlt");
}

__noreturn void hv_exit(u32 status)
{
	outl(HV_EXIT_PORT, status);
	halt_forever();
}

/* Physical memory through the direct map; NULL outside what is mapped. */
static const void *phys(u64 pa, u64 len)
{
	if (pa == 0 || pa >= DIRECT_MAP_SIZE || len > DIRECT_MAP_SIZE - pa)
		return NULL;
	return (const void *)(PAGE_OFFSET + pa);
}

static u32 rd32(const void *p)
{
	u32 v;

	__builtin_memcpy(&v, p, sizeof(v));
	return v;
}

static u64 rd64(const void *p)
{
	u64 v;

	__builtin_memcpy(&v, p, sizeof(v));
	return v;
}

/* ------------------------------------------------------------ console */
/* One line is assembled in a buffer and written under a lock: lines from
 * different CPUs never interleave. Each byte is one port write (one exit). */
void l_str(struct line *l, const char *s)
{
	while (*s && l->n < sizeof(l->buf) - 1)
		l->buf[l->n++] = *s++;
}

void l_dec(struct line *l, u64 v)
{
	char tmp[20];
	int i = 0;

	do {
		tmp[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i && l->n < sizeof(l->buf) - 1)
		l->buf[l->n++] = tmp[--i];
}

void l_hex(struct line *l, u64 v)
{
	int shift = 60;

	l_str(l, "0x");
	while (shift > 0 && !((v >> shift) & 0xf))
		shift -= 4;
	for (; shift >= 0 && l->n < sizeof(l->buf) - 1; shift -= 4)
		l->buf[l->n++] = "0123456789abcdef"[(v >> shift) & 0xf];
}

void l_start(struct line *l)
{
	l->n = 0;
	l_str(l, HV_LINE_PREFIX);
}

void l_emit(struct line *l)
{
	l->buf[l->n++] = '\n';
	while (__atomic_exchange_n(&hv_console_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	for (u32 i = 0; i < l->n; i++)
		outb(SERIAL_THR, (u8)l->buf[i]);
	__atomic_store_n(&hv_console_lock, 0, __ATOMIC_RELEASE);
}

static void say(const char *s)
{
	struct line l;

	l_start(&l);
	l_str(&l, s);
	l_emit(&l);
}

/* --------------------------------------------------------- exceptions */
static void idt_set_type(int vec, u64 addr, u8 type)
{
	struct idt_entry *e = &hv_idt[vec];

	e->off0 = (u16)addr;
	e->sel = 0x10;
	e->ist = 0;
	e->type = type;
	e->off1 = (u16)(addr >> 16);
	e->off2 = (u32)(addr >> 32);
	e->reserved = 0;
}

static void idt_set(int vec, u64 addr)
{
	idt_set_type(vec, addr, 0x8e);	/* present, DPL0, 64-bit interrupt gate */
}

static void lidt(const struct idt_entry *idt, u64 size)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) desc = { (u16)(size - 1), (u64)idt };

	asm volatile("lidt %0" : : "m"(desc));
}

static void idt_load(void)
{
	lidt(hv_idt, sizeof(hv_idt));
}

static void idt_init(void)
{
	for (int v = 0; v < 32; v++)
		idt_set(v, (u64)hv_exc_stubs + 16 * v);
	idt_set(3, (u64)asm_exc_int3);
	/* int $0x80 from user mode: present, DPL3, 64-bit interrupt gate. */
	idt_set_type(INT80_VECTOR, (u64)entry_INT80, 0xee);
}

/*
 * hvtest.idt_gap: a while with an IDT whose #PF gate is not present (boot
 * CPU, in its user-mode setup, once syscall is enabled).
 */
void hv_idt_gap_if_asked(u32 cpu)
{
	if (!hv_idt_gap_on || cpu != 0)
		return;
	memcpy(hv_idt_gap, hv_idt, sizeof(hv_idt_gap));
	hv_idt_gap[14].type = 0;
	lidt(hv_idt_gap, sizeof(hv_idt_gap));
	say("idt without #PF gate");
	idt_load();
	say("idt restored");
}

static u64 current_cpu_from(u64 rsp)
{
	return (rsp - (u64)hv_stacks) / HV_STACK_SIZE;
}

/* Returns only when a user-mode fault was handled (demand paging). */
void hv_exception(struct exc_frame *f)
{
	struct line l;

	if (f->vec == 14 || f->vec == 6) {
		u64 cr2 = 0;

		if (f->vec == 14)
			asm volatile("mov %%cr2, %0" : "=r"(cr2));
		if (hv_user_fault(f->vec, f->err, f->rip, f->cs, cr2,
				  (u32)current_cpu_from((u64)f)))
			return;
	}

	l_start(&l);
	l_str(&l, "EXCEPTION vec=");
	l_dec(&l, f->vec);
	l_str(&l, " rip=");
	l_hex(&l, f->rip);
	l_str(&l, " err=");
	l_hex(&l, f->err);
	if (f->vec == 14) {
		u64 cr2;

		asm volatile("mov %%cr2, %0" : "=r"(cr2));
		l_str(&l, " cr2=");
		l_hex(&l, cr2);
	}
	l_str(&l, " cpu=");
	l_dec(&l, current_cpu_from((u64)f));
	l_emit(&l);
	hv_exit(HV_EXIT_EXCEPTION);
}

/* Like Linux's int3_selftest(): our own int3 must reach our #BP handler. */
noinline void hv_int3_selftest(void)
{
	u64 before = __atomic_load_n(&hv_bp_handled, __ATOMIC_RELAXED);
	u64 after;

	asm volatile("int3" ::: "memory");
	after = __atomic_load_n(&hv_bp_handled, __ATOMIC_RELAXED);
	if (after != before + 1) {
		struct line l;

		l_start(&l);
		l_str(&l, "FAIL int3 selftest handled=");
		l_dec(&l, after - before);
		l_emit(&l);
		hv_exit(HV_EXIT_INT3_SELFTEST);
	}
	say("int3 ok");
}

/* ------------------------------------------------------- command line */
static int starts_with(const char *w, u64 len, const char *lit, u64 *rest)
{
	u64 i = 0;

	for (; lit[i]; i++)
		if (i >= len || w[i] != lit[i])
			return 0;
	*rest = i;
	return 1;
}

static int parse_u64(const char *s, u64 len, u64 *out)
{
	u64 v = 0;

	if (len == 0 || len > 19)
		return 0;
	for (u64 i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		v = v * 10 + (u64)(s[i] - '0');
	}
	*out = v;
	return 1;
}

static void bad_option(const char *w, u64 len)
{
	struct line l;

	l_start(&l);
	l_str(&l, "ignoring bad option ");
	for (u64 i = 0; i < len && l.n < sizeof(l.buf) - 2; i++)
		l.buf[l.n++] = w[i];
	l_emit(&l);
}

/* hvtest.iters=N, hvtest.forever, hvtest.cpus=N; other words are ignored. */
static void parse_cmdline(const char *c, u32 *cpus_override)
{
	while (*c) {
		const char *w;
		u64 len = 0, rest, v;

		while (*c == ' ' || *c == '\t' || *c == '\n')
			c++;
		w = c;
		while (w[len] && w[len] != ' ' && w[len] != '\t' && w[len] != '\n')
			len++;
		c = w + len;
		if (len == 0)
			break;
		if (starts_with(w, len, "hvtest.iters=", &rest)) {
			if (parse_u64(w + rest, len - rest, &v))
				hv_iters = v;
			else
				bad_option(w, len);
		} else if (starts_with(w, len, "hvtest.cpus=", &rest)) {
			if (parse_u64(w + rest, len - rest, &v) && v >= 1 && v <= HV_MAX_CPUS)
				*cpus_override = (u32)v;
			else
				bad_option(w, len);
		} else if (starts_with(w, len, "hvtest.recurse_on=", &rest)) {
			if (parse_u64(w + rest, len - rest, &v))
				hv_recurse_on = (long)v;
		} else if (starts_with(w, len, "hvtest.bench=", &rest)) {
			if (parse_u64(w + rest, len - rest, &v))
				hv_bench = v;
		} else if (starts_with(w, len, HV_USER_PARAM, &rest)) {
			if (parse_u64(w + rest, len - rest, &v))
				hv_user = v;
			else
				bad_option(w, len);
		} else if (starts_with(w, len, HV_IDT_GAP_PARAM, &rest) && rest == len) {
			hv_idt_gap_on = 1;
		} else if (starts_with(w, len, HV_PF_ENTRY_CLD_PARAM, &rest) && rest == len) {
			hv_pf_entry_cld_on = 1;
		} else if (starts_with(w, len, HV_OVERRIDE_PARAM, &rest)) {
			if (parse_u64(w + rest, len - rest, &v))
				hv_override_n = v;
			else
				bad_option(w, len);
		} else if (starts_with(w, len, HV_FTRACE_PARAM, &rest)) {
			if (parse_u64(w + rest, len - rest, &v))
				hv_ftrace_n = v;
			else
				bad_option(w, len);
		} else if (starts_with(w, len, HV_WATCH_PARAM, &rest)) {
			if (parse_u64(w + rest, len - rest, &v))
				hv_watch_n = v;
			else
				bad_option(w, len);
		} else if (starts_with(w, len, HV_INIT_HOLD_PARAM, &rest) && rest == len) {
			hv_init_hold = 1;
		} else if (starts_with(w, len, "hvtest.forever", &rest) && rest == len) {
			hv_forever = 1;
		}
	}
}

/* ---------------------------------------------------------------- ACPI */
static const u8 *rsdp_check(u64 pa)
{
	const u8 *p = phys(pa, 36);

	/* "RSD PTR " as one load: this runs 8k times when the BIOS area is scanned. */
	if (!p || rd64(p) != 0x2052545020445352ULL)
		return NULL;
	return p;
}

/* Only when the loader gave no rsdp_paddr: the BIOS areas, as Linux does. */
static const u8 *rsdp_scan(void)
{
	const u16 *ebda_seg = phys(0x40e, 2);
	u64 ebda = ebda_seg ? (u64)*ebda_seg << 4 : 0;
	const u8 *p;

	if (ebda >= 0x80000 && ebda < 0xa0000)
		for (u64 a = ebda; a < ebda + 1024; a += 16)
			if ((p = rsdp_check(a)))
				return p;
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if ((p = rsdp_check(a)))
			return p;
	return NULL;
}

static const u8 *acpi_table(u64 pa)
{
	const u8 *h = phys(pa, 36);
	u32 len;

	if (!h)
		return NULL;
	len = rd32(h + 4);
	if (len < 36 || !phys(pa, len))
		return NULL;
	return h;
}

/* Enabled type-0 Local APIC entries of the MADT; returns how many were found. */
static u32 madt_cpus(u64 rsdp_pa, u8 *ids, u32 max)
{
	const u8 *rsdp = rsdp_pa ? rsdp_check(rsdp_pa) : rsdp_scan();
	const u8 *sdt, *madt = NULL;
	u32 entry_size, n = 0;

	if (!rsdp)
		return 0;
	if (rsdp[15] >= 2 && rd64(rsdp + 24)) {
		sdt = acpi_table(rd64(rsdp + 24));
		entry_size = 8;
	} else {
		sdt = acpi_table(rd32(rsdp + 16));
		entry_size = 4;
	}
	if (!sdt)
		return 0;
	for (u32 off = 36; off + entry_size <= rd32(sdt + 4); off += entry_size) {
		u64 pa = entry_size == 8 ? rd64(sdt + off) : rd32(sdt + off);
		const u8 *t = acpi_table(pa);

		if (t && !__builtin_memcmp(t, "APIC", 4)) {
			madt = t;
			break;
		}
	}
	if (!madt)
		return 0;
	for (u32 off = 44; off + 2 <= rd32(madt + 4);) {
		u8 type = madt[off], len = madt[off + 1];

		if (len < 2 || off + len > rd32(madt + 4))
			break;
		if (type == 0 && len >= 8 && (rd32(madt + off + 4) & 1) && n < max)
			ids[n++] = madt[off + 3];
		off += len;
	}
	return n;
}

/* ----------------------------------------------------------------- SMP */
static volatile u32 *lapic(u32 reg)
{
	return (volatile u32 *)(PAGE_OFFSET + LAPIC_PADDR + reg);
}

static void lapic_icr(u8 apic_id, u32 lo)
{
	*lapic(LAPIC_ICR_HI) = (u32)apic_id << 24;
	*lapic(LAPIC_ICR_LO) = lo;
	for (int i = 0; i < 1000 && (*lapic(LAPIC_ICR_LO) & ICR_BUSY); i++)
		cpu_relax();
}

static void cpu_common_init(void)
{
	idt_load();
	wrmsr(MSR_LSTAR, (u64)entry_SYSCALL_64);
}

/* The list of APIC IDs: the BSP first, then the MADT's enabled ones; if
 * hvtest.cpus= asks for more, unused IDs counting up from 0. */
static void build_apic_ids(u8 bsp, const u8 *madt, u32 nmadt)
{
	u32 n = 0;

	hv_apic_ids[n++] = bsp;
	for (u32 i = 0; i < nmadt && n < hv_ncpus; i++)
		if (madt[i] != bsp)
			hv_apic_ids[n++] = madt[i];
	for (u32 id = 0; n < hv_ncpus && id < 256; id++) {
		int used = 0;

		for (u32 k = 0; k < n; k++)
			used |= hv_apic_ids[k] == id;
		if (!used)
			hv_apic_ids[n++] = (u8)id;
	}
}

static void start_aps(void)
{
	u64 len = (u64)(hv_trampoline_end - hv_trampoline_start);

	memcpy((void *)(PAGE_OFFSET + HV_TRAMPOLINE_PADDR), hv_trampoline_start, len);
	for (u32 cpu = 1; cpu < hv_ncpus; cpu++) {
		u64 t0;

		hv_ap_boot_cpu = cpu;
		hv_ap_boot_stack = (u64)hv_stacks + (u64)(cpu + 1) * HV_STACK_SIZE;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		/* KVM and QEMU need no delays between these; a running AP ignores the second SIPI. */
		lapic_icr(hv_apic_ids[cpu], ICR_INIT);
		lapic_icr(hv_apic_ids[cpu], ICR_STARTUP | (HV_TRAMPOLINE_PADDR >> 12));
		lapic_icr(hv_apic_ids[cpu], ICR_STARTUP | (HV_TRAMPOLINE_PADDR >> 12));
		t0 = rdtsc();
		while (__atomic_load_n(&hv_ap_started, __ATOMIC_ACQUIRE) != cpu) {
			if (rdtsc() - t0 > AP_TIMEOUT_TSC) {
				struct line l;

				l_start(&l);
				l_str(&l, "FAIL ap timeout cpu=");
				l_dec(&l, cpu);
				l_str(&l, " apic_id=");
				l_dec(&l, hv_apic_ids[cpu]);
				l_emit(&l);
				hv_exit(HV_EXIT_AP_TIMEOUT);
			}
			cpu_relax();
		}
	}
}

/* ------------------------------------------------------------- workers */
static __noreturn noinline void hv_fail(u32 cpu, u32 fn, u64 got, u64 want)
{
	struct line l;

	l_start(&l);
	l_str(&l, "FAIL cpu=");
	l_dec(&l, cpu);
	l_str(&l, " fn=");
	l_str(&l, hv_fn_names[fn]);
	l_str(&l, " got=");
	l_hex(&l, got);
	l_str(&l, " want=");
	l_hex(&l, want);
	l_emit(&l);
	hv_exit(HV_EXIT_RETVAL_MISMATCH);
}

static __noreturn noinline void hv_fail_clobbered(u32 cpu, u32 fn, u64 mask)
{
	struct line l;

	l_start(&l);
	l_str(&l, "FAIL cpu=");
	l_dec(&l, cpu);
	l_str(&l, " fn=");
	l_str(&l, hv_fn_names[fn]);
	l_str(&l, " clobbered=");
	l_hex(&l, mask);
	l_emit(&l);
	hv_exit(HV_EXIT_REGS_CLOBBERED);
}

/* fn(a, b) through hv_call_checked: the return value is checked by the
 * caller, the callee-saved registers here. */
#define CHECKED_CALL(fn, a, b)                                          \
	({                                                              \
		u64 __clob;                                             \
		long __r = hv_call_checked(fn, (a), (b), &__clob);      \
		if (__clob)                                             \
			hv_fail_clobbered(cpu, HV_FN_##fn, __clob);     \
		__r;                                                    \
	})

#define CHECK(fn, got, want)                                            \
	do {                                                            \
		u64 __g = (u64)(got), __w = (u64)(want);                \
		if (__g != __w)                                         \
			hv_fail(cpu, HV_FN_##fn, __g, __w);             \
	} while (0)

static long jcc_max(long a, long b)
{
	long ret;

	/* The flags are an argument of hv_jcc_after_nop. */
	asm volatile("cmp %%rsi, %%rdi\n\tcall hv_jcc_after_nop"
		     : "=a"(ret) : "D"(a), "S"(b) : "cc", "memory");
	return ret;
}

static long stack_frame_want(const char *s)
{
	long n = 0, sum = 0;

	while (s[n] && n < 64)
		sum += (u8)s[n++];
	return (n << 16) + sum;
}

static void worker(u32 cpu)
{
	u64 exp[HV_NR_COUNTED] = { 0 };
	struct hv_work w[3];
	long wname_len[3];

	for (int k = 0; k < 3; k++) {
		const char *name = hv_work_names[k];
		int i = 0;

		w[k].id = cpu * 16 + (u32)k + 1;
		w[k].flags = 0x100u << k;
		for (; name[i] && i < HV_WORK_NAME_LEN - 1; i++)
			w[k].name[i] = name[i];
		w[k].name[i] = 0;
		wname_len[k] = i;
		w[k].next = k < 2 ? &w[k + 1] : NULL;
		w[k].data = k;
	}

	for (u64 it = 0; hv_forever || it < hv_iters; it++) {
		u32 sel = cpu + (u32)it;
		u32 pi = sel % HV_NR_OPEN_PATHS, n = sel % HV_FIB_MODULUS;
		u32 len = 1 + sel % HV_CHECKSUM_DATA_LEN;
		int flags = 0x80000 | (int)(it & 3);	/* O_CLOEXEC | access mode */
		unsigned int mode = (it & 1) ? 0644 : 0;
		long a = (long)(it * 0x10001) - 77;
		long b = ((long)cpu << 40) | 0x5a5a;
		struct hv_work *wi = &w[it % 3];
		long wwant = 3 * (long)wi->id + wi->flags + wname_len[it % 3] +
			     (wi->next ? wi->next->id : 0);
		long jb = (it & 1) ? a + 5 : a - 5;

		CHECK(hv_open_file, hv_open_file(HV_AT_FDCWD, hv_open_paths[pi], flags, mode),
		      (hv_open_path_hash[pi] ^ (u32)flags ^ (mode << 8) ^ (u32)HV_AT_FDCWD) &
			      0x7fffffff);
		CHECK(hv_fib, hv_fib((int)n), hv_fib_values[n]);
		if (hv_recurse_on < 0 || hv_recurse_on == (long)cpu)
			CHECK(hv_recurse, hv_recurse(HV_RECURSE_DEPTH), HV_RECURSE_RESULT);
		CHECK(hv_add, CHECKED_CALL(hv_add, a, b), a + b);
		CHECK(hv_many_args, hv_many_args(a, b, a + 1, b + 1, a + 2, b + 2, a + 3, b + 3),
		      a + 2 * b + 3 * (a + 1) + 4 * (b + 1) + 5 * (a + 2) + 6 * (b + 2) +
			      7 * (a + 3) + 8 * (b + 3));
		CHECK(hv_work_item, hv_work_item(wi), wwant);
		CHECK(hv_checksum, hv_checksum(hv_checksum_data, len), hv_checksum_prefix[len]);
		CHECK(hv_sub_tail, hv_sub_tail(a, b), a - b);
		CHECK(hv_stack_frame, hv_stack_frame(hv_open_paths[pi]),
		      stack_frame_want(hv_open_paths[pi]));
		CHECK(hv_lea_first, CHECKED_CALL(hv_lea_first, a, b), a + 2 * b + 0x11);
		CHECK(hv_jcc_after_nop, jcc_max(a, jb), a > jb ? a : jb);
		CHECK(hv_tail_jmp, hv_tail_jmp(a, b), a + b);
		CHECK(hv_ibt_func, hv_ibt_ops(a), 7 * a + 3);

		exp[HV_FN_hv_open_file]++;
		exp[HV_FN_hv_fib] += hv_fib_calls[n];
		if (hv_recurse_on < 0 || hv_recurse_on == (long)cpu)
			exp[HV_FN_hv_recurse] += HV_RECURSE_DEPTH;
		exp[HV_FN_hv_add] += 3;	/* direct, hv_sub_tail, hv_tail_jmp */
		exp[HV_FN_hv_many_args]++;
		exp[HV_FN_hv_work_item]++;
		exp[HV_FN_hv_checksum]++;
		exp[HV_FN_hv_sub_tail]++;
		exp[HV_FN_hv_stack_frame]++;
		exp[HV_FN_hv_lea_first]++;
		exp[HV_FN_hv_jcc_after_nop]++;
		exp[HV_FN_hv_tail_jmp]++;
		exp[HV_FN_hv_ibt_func]++;
	}
	for (int i = 0; i < HV_NR_COUNTED; i++)
		__atomic_fetch_add(&hv_expected_counts[i], exp[i], __ATOMIC_RELAXED);
}

/* hvtest.override=N: call hv_may_fail N times, count what came back. */
static void override_calls(void)
{
	u64 overridden = 0;

	for (u64 i = 0; i < hv_override_n; i++) {
		long r = hv_may_fail((long)i);

		hv_note((long)i);
		if (r == (long)i + 1)
			continue;
		overridden++;
		/* The first overridden value any CPU saw sets it; others must match. */
		u64 seen = OVERRIDE_UNSET;

		if (!__atomic_compare_exchange_n(&hv_override_value, &seen, (u64)r, 0,
						 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE) &&
		    seen != (u64)r)
			__atomic_fetch_add(&hv_override_mixed, 1, __ATOMIC_RELAXED);
	}
	__atomic_fetch_add(&hv_override_calls, hv_override_n, __ATOMIC_RELAXED);
	__atomic_fetch_add(&hv_overridden, overridden, __ATOMIC_RELAXED);
}

extern u64 hv_may_fail_body;

static void override_report(void)
{
	struct line l;
	u64 body = __atomic_load_n(&hv_may_fail_body, __ATOMIC_ACQUIRE);
	long v = hv_override_value == OVERRIDE_UNSET ? 0 : (long)hv_override_value;

	l_start(&l);
	l_str(&l, "override calls=");
	l_dec(&l, hv_override_calls);
	l_str(&l, " overridden=");
	l_dec(&l, hv_overridden);
	l_str(&l, " body=");
	l_dec(&l, body);
	l_str(&l, " value=");
	if (v < 0) {
		l_str(&l, "-");
		l_dec(&l, (u64)-v);
	} else {
		l_dec(&l, (u64)v);
	}
	l_emit(&l);
	if (body != hv_override_calls - hv_overridden || hv_override_mixed) {
		l_start(&l);
		l_str(&l, "FAIL override body=");
		l_dec(&l, body);
		l_str(&l, " mixed=");
		l_dec(&l, hv_override_mixed);
		l_emit(&l);
		hv_exit(HV_EXIT_OVERRIDE_MISMATCH);
	}
}

/* A CPU's whole job: the kernel-mode loop, then (hvtest.user=N) user mode. */
static void cpu_work(u32 cpu)
{
	worker(cpu);
	if (hv_override_n)
		override_calls();
	if (hv_user)
		hv_user_run(cpu, hv_user, 0);
	__atomic_fetch_add(&hv_workers_done, 1, __ATOMIC_RELEASE);
}

static void bench_watch(u64 n);

/*
 * hvtest.bench=N: timed phases on the boot CPU, each announced on the marker
 * port: N bare exits, N empty loop iterations (loop overhead), N calls.
 */
static void bench(u64 n)
{
	outl(HV_BENCH_MARKER_PORT, HV_BENCH_PHASE_EXITS);
	for (u64 i = 0; i < n; i++)
		outb(HV_BENCH_NOP_PORT, 0);
	outl(HV_BENCH_MARKER_PORT, HV_BENCH_PHASE_LOOP);
	for (u64 i = 0; i < n; i++)
		asm volatile("" : : : "memory");
	outl(HV_BENCH_MARKER_PORT, HV_BENCH_PHASE_CALLS);
	for (u64 i = 0; i < n; i++) {
		long r = hv_add((long)i, 1);

		if (r != (long)i + 1)
			hv_fail(0, HV_FN_hv_add, (u64)r, (u64)i + 1);
	}
	outl(HV_BENCH_MARKER_PORT, HV_BENCH_PHASE_END);
	if (hv_watch_n)
		bench_watch(n);
	if (hv_user)
		hv_user_run(0, n, 1);
}


/*
 * hvtest.watch=N (see WATCH_PARAM in contract.rs): a watched u64 that only
 * hv_watch_set writes, and hot data on the same page that every CPU hits
 * with locked read-modify-writes and plain stores; the totals are checked
 * exactly, so a lost update on the page fails the run.
 */
struct hv_watch_page {
	u64 watched;		/* WATCH_VALUE_OFFSET: only hv_watch_set writes it */
	u64 spare;
	u32 lock;		/* lock cmpxchg spinlock */
	u32 pad;
	u64 locked_total;	/* plain increments under the lock */
	u64 xadd_total;		/* lock xadd */
	u64 xchg_slot;		/* xchg of unique tokens */
	u64 per_cpu[HV_MAX_CPUS];	/* plain stores, one slot per CPU */
};
struct hv_watch_page hv_watch_page __attribute__((aligned(4096), section(".data")));
u64 hv_watch_writes;
volatile u64 hv_watch_go;
static u64 hv_watch_xadd_sum[HV_MAX_CPUS];
static u64 hv_watch_xchg_got[HV_MAX_CPUS];
static u32 hv_watch_done;

noinline void hv_watch_set(u64 v)
{
	__atomic_store_n(&hv_watch_page.watched, v, __ATOMIC_RELAXED);
}

static void watch_rounds(u32 cpu)
{
	struct hv_watch_page *p = &hv_watch_page;
	u64 sum = 0, got = 0;

	for (u64 i = 0; i < hv_watch_n; i++) {
		if (cpu == 0) {
			hv_watch_set(3 * i + 1);
			hv_watch_writes++;
		}
		for (;;) {
			u32 unlocked = 0;

			if (__atomic_compare_exchange_n(&p->lock, &unlocked, 1, 0,
							__ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
				break;
			cpu_relax();
		}
		__atomic_store_n(&p->locked_total,
				 __atomic_load_n(&p->locked_total, __ATOMIC_RELAXED) + 1,
				 __ATOMIC_RELAXED);
		__atomic_store_n(&p->lock, 0, __ATOMIC_RELEASE);
		sum += __atomic_fetch_add(&p->xadd_total, 1, __ATOMIC_SEQ_CST);
		got += __atomic_exchange_n(&p->xchg_slot, (u64)cpu * hv_watch_n + i + 1,
					   __ATOMIC_SEQ_CST);
		__atomic_store_n(&p->per_cpu[cpu],
				 __atomic_load_n(&p->per_cpu[cpu], __ATOMIC_RELAXED) + 1,
				 __ATOMIC_RELAXED);
	}
	hv_watch_xadd_sum[cpu] = sum;
	hv_watch_xchg_got[cpu] = got;
	__atomic_fetch_add(&hv_watch_done, 1, __ATOMIC_RELEASE);
}

/* hvtest.bench=N with hvtest.watch=: the cost of watched-page writes. */
static void bench_watch(u64 n)
{
	outl(HV_BENCH_MARKER_PORT, HV_BENCH_PHASE_WATCH_WAIT);
	while (!hv_watch_go)
		cpu_relax();
	outl(HV_BENCH_MARKER_PORT, HV_BENCH_PHASE_WATCHED);
	for (u64 i = 0; i < n; i++)
		hv_watch_set(i);
	outl(HV_BENCH_MARKER_PORT, HV_BENCH_PHASE_PAGE_WRITES);
	for (u64 i = 0; i < n; i++)
		__atomic_store_n(&hv_watch_page.spare, i, __ATOMIC_RELAXED);
	outl(HV_BENCH_MARKER_PORT, HV_BENCH_PHASE_WATCH_END);
}

static void watch_fail(const char *what, u64 got, u64 want)
{
	struct line l;

	l_start(&l);
	l_str(&l, "FAIL watch ");
	l_str(&l, what);
	l_str(&l, " got=");
	l_dec(&l, got);
	l_str(&l, " want=");
	l_dec(&l, want);
	l_emit(&l);
	hv_exit(HV_EXIT_WATCH_MISMATCH);
}

static void watch_report(void)
{
	struct hv_watch_page *p = &hv_watch_page;
	u64 n = hv_watch_n, total = (u64)hv_ncpus * n, sum = 0, got = 0, put = 0;
	struct line l;

	for (u32 c = 0; c < hv_ncpus; c++) {
		sum += hv_watch_xadd_sum[c];
		got += hv_watch_xchg_got[c];
		for (u64 i = 0; i < n; i++)
			put += (u64)c * n + i + 1;
		if (p->per_cpu[c] != n)
			watch_fail("per_cpu", p->per_cpu[c], n);
	}
	if (p->locked_total != total)
		watch_fail("locked", p->locked_total, total);
	if (p->xadd_total != total)
		watch_fail("xadd", p->xadd_total, total);
	/* fetch_add handed out 0..total-1 once each. */
	if (total && sum != total * (total - 1) / 2)
		watch_fail("xadd_sum", sum, total * (total - 1) / 2);
	/* Every token went in once and came out once, but the last. */
	if (got + p->xchg_slot != put)
		watch_fail("xchg", got + p->xchg_slot, put);
	if (p->lock != 0)
		watch_fail("lock", p->lock, 0);
	if (n && p->watched != 3 * (n - 1) + 1)
		watch_fail("watched", p->watched, 3 * (n - 1) + 1);
	l_start(&l);
	l_str(&l, "watch writes=");
	l_dec(&l, hv_watch_writes);
	l_str(&l, " locked=");
	l_dec(&l, p->locked_total);
	l_str(&l, " xadd=");
	l_dec(&l, p->xadd_total);
	l_emit(&l);
}

/* ---------------------------------------------------------- entry points */
void hv_ap_main(u32 cpu)
{
	cpu_common_init();
	__atomic_store_n(&hv_ap_started, cpu, __ATOMIC_RELEASE);
	if (hv_bench)
		halt_forever();
	if (hv_watch_n) {
		while (!hv_watch_go)
			cpu_relax();
		watch_rounds(cpu);
		halt_forever();
	}
	cpu_work(cpu);
	halt_forever();
}

static void check_counters(void)
{
	for (int i = 0; i < HV_NR_COUNTED; i++) {
		u64 got = __atomic_load_n(&hv_call_counts[i], __ATOMIC_RELAXED);

		if (got != hv_expected_counts[i]) {
			struct line l;

			l_start(&l);
			l_str(&l, "FAIL counter fn=");
			l_str(&l, hv_fn_names[i]);
			l_str(&l, " got=");
			l_dec(&l, got);
			l_str(&l, " want=");
			l_dec(&l, hv_expected_counts[i]);
			l_emit(&l);
			hv_exit(HV_EXIT_COUNTER_MISMATCH);
		}
	}
}

/* ------------------------------------------------------------ init text */
/* Linux's enum system_states, as far as init text goes. */
#define SYSTEM_BOOTING 0
#define SYSTEM_FREEING_INITMEM 2
#define SYSTEM_RUNNING 3
int system_state = SYSTEM_BOOTING;
u64 hv_init_calls;
volatile u64 hv_init_release;
extern u8 __init_begin[], __init_end[];

__attribute__((section(".init.text"))) noinline long hv_init_func(long x)
{
	__atomic_add_fetch(&hv_init_calls, 1, __ATOMIC_RELAXED);
	asm volatile("" ::: "memory");
	return 3 * x + 1;
}

/* As Linux's: the init text is poisoned and given back (here: kept as is). */
noinline void free_initmem(void)
{
	*(volatile int *)&system_state = SYSTEM_FREEING_INITMEM;
	for (u8 *p = __init_begin; p < __init_end; p++)
		*(volatile u8 *)p = 0xcc;
	*(volatile int *)&system_state = SYSTEM_RUNNING;
}

static void run_init(void)
{
	struct line l;

	for (long i = 0; i < HV_INIT_CALLS; i++) {
		long got = hv_init_func(i);

		if (got != 3 * i + 1) {
			l_start(&l);
			l_str(&l, "FAIL cpu=0 fn=hv_init_func got=");
			l_hex(&l, (u64)got);
			l_str(&l, " want=");
			l_hex(&l, (u64)(3 * i + 1));
			l_emit(&l);
			hv_exit(HV_EXIT_RETVAL_MISMATCH);
		}
	}
	free_initmem();
	l_start(&l);
	l_str(&l, "init freed");
	l_emit(&l);
	while (hv_init_hold && !hv_init_release)
		cpu_relax();
}

/* Nothing may write into the freed init text (the host included). */
static void check_init_poison(void)
{
	struct line l;

	for (u8 *p = __init_begin; p < __init_end; p++) {
		if (*(volatile u8 *)p == 0xcc)
			continue;
		l_start(&l);
		l_str(&l, "FAIL init text changed at ");
		l_hex(&l, (u64)p);
		l_str(&l, " got=");
		l_hex(&l, *p);
		l_emit(&l);
		hv_exit(HV_EXIT_INIT_TEXT_CHANGED);
	}
}

/* ------------------------------------------------------------- ftrace */
/*
 * hvtest.ftrace=N: the guest's own "ftrace" on hv_add, done as Linux's
 * ftrace_modify_code does it: check that the 5 bytes at the function's
 * fentry site hold what they should (the nop, then the call), and stop
 * with an "ftrace bug" if they do not.
 */
u64 hv_ftrace_calls;
extern void hv_ftrace_hook(void);
static const u8 ftrace_nop5[5] = { 0x0f, 0x1f, 0x44, 0x00, 0x00 };

static void ftrace_expect(const u8 *site, const u8 *want, const char *what)
{
	struct line l;

	for (int i = 0; i < 5; i++) {
		if (site[i] == want[i])
			continue;
		l_start(&l);
		l_str(&l, "FAIL ftrace bug: hv_add+");
		l_dec(&l, (u64)i);
		l_str(&l, " is ");
		l_hex(&l, site[i]);
		l_str(&l, ", want ");
		l_hex(&l, want[i]);
		l_str(&l, " before patching it ");
		l_str(&l, what);
		l_emit(&l);
		hv_exit(HV_EXIT_FTRACE_BUG);
	}
}

static void guest_ftrace(void)
{
	volatile u8 *site = (volatile u8 *)(void *)hv_add;
	int rel = (int)((u64)(void *)hv_ftrace_hook - ((u64)(void *)hv_add + 5));
	u8 call[5] = { 0xe8, (u8)rel, (u8)(rel >> 8), (u8)(rel >> 16), (u8)(rel >> 24) };
	struct line l;

	for (u64 i = 0; i < hv_ftrace_n; i++) {
		ftrace_expect((const u8 *)site, ftrace_nop5, "to a call");
		for (int b = 0; b < 5; b++)
			site[b] = call[b];
		if (hv_add((long)i, 1) != (long)i + 1)
			hv_exit(HV_EXIT_RETVAL_MISMATCH);
		ftrace_expect((const u8 *)site, call, "back to the nop");
		for (int b = 0; b < 5; b++)
			site[b] = ftrace_nop5[b];
		if (hv_add((long)i, 2) != (long)i + 2)
			hv_exit(HV_EXIT_RETVAL_MISMATCH);
	}
	__atomic_fetch_add(&hv_expected_counts[HV_FN_hv_add], 2 * hv_ftrace_n, __ATOMIC_RELAXED);
	if (hv_ftrace_calls != hv_ftrace_n) {
		l_start(&l);
		l_str(&l, "FAIL ftrace hook calls=");
		l_dec(&l, hv_ftrace_calls);
		l_emit(&l);
		hv_exit(HV_EXIT_FTRACE_BUG);
	}
	l_start(&l);
	l_str(&l, "ftrace ok n=");
	l_dec(&l, hv_ftrace_n);
	l_emit(&l);
}

/* The first C function, called once by the boot CPU from startup_64. */
void hv_start_kernel(void)
{
	const struct hvm_start_info *si = phys(hv_start_info_pa, sizeof(*si));
	u8 madt_ids[HV_MAX_CPUS];
	u32 nmadt, cpus_override = 0;
	struct line l;

	idt_init();
	cpu_common_init();
	if (!si || si->magic != HVM_START_MAGIC) {
		l_start(&l);
		l_str(&l, "FAIL bad hvm_start_info at ");
		l_hex(&l, hv_start_info_pa);
		l_emit(&l);
		hv_exit(HV_EXIT_BAD_BOOT_INFO);
	}
	if (si->cmdline_paddr) {
		const char *c = phys(si->cmdline_paddr, 1);

		if (c)
			parse_cmdline(c, &cpus_override);
	}
	nmadt = madt_cpus(si->rsdp_paddr, madt_ids, HV_MAX_CPUS);
	hv_ncpus = cpus_override ? cpus_override : nmadt ? nmadt : 1;

	l_start(&l);
	l_str(&l, "boot cpus=");
	l_dec(&l, hv_ncpus);
	l_str(&l, " iters=");
	if (hv_forever)
		l_str(&l, "forever");
	else
		l_dec(&l, hv_iters);
	l_emit(&l);

	hv_int3_selftest();
	run_init();
	if (hv_ftrace_n)
		guest_ftrace();
	if (hv_pf_entry_cld_on)
		idt_set(14, (u64)hv_pf_entry_cld);
	if (hv_user)
		hv_user_setup_shared();

	if (hv_ncpus > 1) {
		/* Software-enable our LAPIC: KVM delivers no IPI from a disabled one. */
		*lapic(LAPIC_SVR) = *lapic(LAPIC_SVR) | 0x1ff;
		build_apic_ids((u8)(*lapic(LAPIC_ID) >> 24), madt_ids, nmadt);
		start_aps();
	}

	if (hv_bench) {
		bench(hv_bench);
		hv_exit(HV_EXIT_OK);
	}
	if (hv_watch_n) {
		say("watch ready");
		while (!hv_watch_go)
			cpu_relax();
		watch_rounds(0);
		while (__atomic_load_n(&hv_watch_done, __ATOMIC_ACQUIRE) != hv_ncpus)
			cpu_relax();
		watch_report();
		l_start(&l);
		l_str(&l, "done ok cpus=");
		l_dec(&l, hv_ncpus);
		l_str(&l, " iters=");
		l_dec(&l, hv_watch_n);
		l_emit(&l);
		hv_exit(HV_EXIT_OK);
	}
	cpu_work(0);
	while (__atomic_load_n(&hv_workers_done, __ATOMIC_ACQUIRE) != hv_ncpus)
		cpu_relax();
	check_counters();
	check_init_poison();
	if (hv_override_n)
		override_report();
	if (hv_user)
		hv_user_report(hv_ncpus);

	l_start(&l);
	l_str(&l, "done ok cpus=");
	l_dec(&l, hv_ncpus);
	l_str(&l, " iters=");
	l_dec(&l, hv_iters);
	l_emit(&l);
	hv_exit(HV_EXIT_OK);
}
