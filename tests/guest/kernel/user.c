// SPDX-License-Identifier: Apache-2.0
/*
 * User mode (hvtest.user=N), Linux-like: each CPU gets its own GDT (user CS
 * 0x33, SS 0x2b) and TSS, STAR/LSTAR/SFMASK and KERNEL_GS_BASE, then drops
 * to CPL3 and runs hv_user_main (user.S). The kernel side: system calls
 * (openat copies the path in from user memory and calls hv_open_file; exit
 * returns to the kernel), int $0x80 (calls hv_add), and demand-zero paging
 * of a per-CPU user range. The counters reconcile at the end (boot CPU).
 */
#include "hvtest.h"
#include "user.h"

#define PAGE_OFFSET		0xffff888000000000UL
#define PAGE_SIZE		4096UL
#define MSR_EFER		0xc0000080
#define MSR_STAR		0xc0000081
#define MSR_SFMASK		0xc0000084
#define MSR_GS_BASE		0xc0000101
#define MSR_KERNEL_GS_BASE	0xc0000102
#define EFER_SCE		0x1
#define EFER_NXE		0x800
#define SFMASK_LINUX		0x257fd5UL	/* CF PF AF ZF SF TF IF DF OF IOPL NT RF AC ID */
#define PTE_USER		0x7UL		/* present, writable, user */
#define PTE_USER_RO		0x5UL
#define CPU_REGION		0x200000UL	/* user VA per CPU: one page table */
#define DEMAND_OFF		0x10000UL
#define STACK_TOP_OFF		0x4000UL
#define POOL_SHARED_PAGES	3
#define POOL_CPU_PAGES		64
#define POOL_DEMAND_FIRST	16

struct hv_sysregs {
	u64 r9, r8, r10, rdx, rsi, rdi, orig_ax, rip, cs, rflags, rsp, ss;
};

struct hv_ucpu {
	u64 kstack;		/* UCPU_KSTACK */
	u64 user_rsp;		/* UCPU_USER_RSP */
	u64 saved_rsp;		/* UCPU_SAVED_RSP */
	u64 *tss_rsp0;		/* UCPU_TSS_RSP0 */
};

struct hv_udata {
	u64 n, cpu, demand_base, demand_pages;
	u64 made_syscalls, made_int80;
	u64 fail_iter, fail_got, fail_want, reserved;
	u32 hash[8];
	u8 pad[UD_PATHS - UD_HASH - 32];
	char paths[HV_NR_OPEN_PATHS][UD_PATH_LEN];
};

struct hv_tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

_Static_assert(__builtin_offsetof(struct hv_ucpu, saved_rsp) == UCPU_SAVED_RSP, "ucpu");
_Static_assert(__builtin_offsetof(struct hv_ucpu, tss_rsp0) == UCPU_TSS_RSP0, "ucpu");
_Static_assert(__builtin_offsetof(struct hv_udata, made_int80) == UD_MADE_INT80, "udata");
_Static_assert(__builtin_offsetof(struct hv_udata, fail_want) == UD_FAIL_WANT, "udata");
_Static_assert(__builtin_offsetof(struct hv_udata, hash) == UD_HASH, "udata");
_Static_assert(__builtin_offsetof(struct hv_udata, paths) == UD_PATHS, "udata");
_Static_assert(sizeof(struct hv_tss) == 104, "tss");
_Static_assert(HV_NR_OPEN_PATHS == 8, "user.S indexes 8 paths");

extern u64 init_top_pgt[512];
extern const char hv_user_text_start[], hv_user_text_end[], hv_user_main[], hv_user_bench[];
long hv_enter_user(struct hv_ucpu *u, u64 rip, u64 rsp, u64 arg);
__noreturn void hv_user_return(u64 saved_rsp, long code);
void entry_SYSCALL_64(void);

u64 hv_user_made, hv_user_syscalls, hv_user_int80, hv_user_faults;
static u64 hv_user_made_int80, hv_user_pages_wanted;
/* Not in .bss (zeroed at every boot): never loaded, each CPU fills its own. */
#define __noload __attribute__((section(".hv_noload")))
static struct hv_ucpu hv_ucpu[HV_MAX_CPUS] __noload;
static struct hv_tss hv_tss[HV_MAX_CPUS] __attribute__((aligned(16))) __noload;
static u64 hv_gdt[HV_MAX_CPUS][10] __attribute__((aligned(16))) __noload;
static const char *const user_paths[HV_NR_OPEN_PATHS] = { HV_OPEN_PATHS };
static const u32 user_path_hash[HV_NR_OPEN_PATHS] = HV_OPEN_PATH_HASHES;

static inline void wrmsr(u32 msr, u64 v)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;

	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static u64 pool_pa(u64 page)
{
	return HV_USER_POOL_PADDR + page * PAGE_SIZE;
}

static u64 *pa_ptr(u64 pa)
{
	return (u64 *)(PAGE_OFFSET + pa);
}

static u64 cpu_page(u32 cpu, u64 i)
{
	return POOL_SHARED_PAGES + (u64)cpu * POOL_CPU_PAGES + i;
}

static u64 cpu_va(u32 cpu)
{
	return HV_USER_BASE + (u64)(cpu + 1) * CPU_REGION;
}

/* PML4 slot of HV_USER_BASE -> PDPT -> PD; PD[0] maps the user text. */
void hv_user_setup_shared(void)
{
	u64 pdpt = pool_pa(0), pd = pool_pa(1), pt = pool_pa(2);
	u64 text_pa = (u64)hv_user_text_start - 0xffffffff80000000UL;
	u64 pages = (u64)(hv_user_text_end - hv_user_text_start) / PAGE_SIZE;

	memset(pa_ptr(pdpt), 0, 3 * PAGE_SIZE);
	for (u64 i = 0; i < pages; i++)
		pa_ptr(pt)[i] = (text_pa + i * PAGE_SIZE) | PTE_USER_RO;
	pa_ptr(pd)[0] = pt | PTE_USER;
	pa_ptr(pdpt)[(HV_USER_BASE >> 30) & 511] = pd | PTE_USER;
	init_top_pgt[(HV_USER_BASE >> 39) & 511] = pdpt | PTE_USER;
}

static void load_gdt_tss(u32 cpu)
{
	u64 *g = hv_gdt[cpu];
	u64 tss = (u64)&hv_tss[cpu];
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) desc = { sizeof(hv_gdt[0]) - 1, (u64)g };

	g[0] = 0;
	g[1] = 0x00cf9a000000ffffULL;	/* 0x08 kernel 32-bit code */
	g[2] = 0x00af9a000000ffffULL;	/* 0x10 __KERNEL_CS */
	g[3] = 0x00cf92000000ffffULL;	/* 0x18 __KERNEL_DS */
	g[4] = 0x00cffa000000ffffULL;	/* 0x23 __USER32_CS */
	g[5] = 0x00cff2000000ffffULL;	/* 0x2b __USER_DS */
	g[6] = 0x00affa000000ffffULL;	/* 0x33 __USER_CS */
	g[7] = 0;
	g[8] = (sizeof(struct hv_tss) - 1) | ((tss & 0xffffff) << 16) | (0x89ULL << 40) |
	       (((tss >> 24) & 0xff) << 56);
	g[9] = tss >> 32;
	memset(&hv_tss[cpu], 0, sizeof(hv_tss[cpu]));
	hv_tss[cpu].iomap_base = sizeof(struct hv_tss);
	asm volatile("lgdt %0" : : "m"(desc));
	asm volatile("ltr %w0" : : "r"(0x40));
}

/* Runs on `cpu` after its kernel-mode checks. */
void hv_user_run(u32 cpu, u64 n, int bench)
{
	u64 pt = pool_pa(cpu_page(cpu, 0)), data = pool_pa(cpu_page(cpu, 1));
	u64 va = cpu_va(cpu);
	struct hv_udata *ud = (struct hv_udata *)pa_ptr(data);
	struct hv_ucpu *u = &hv_ucpu[cpu];
	u64 pages = n < HV_USER_DEMAND_PAGES ? n : HV_USER_DEMAND_PAGES;
	struct line l;
	long code;

	/* This CPU's page table: data page, three stack pages; demand pages absent. */
	memset(pa_ptr(pt), 0, PAGE_SIZE);
	pa_ptr(pt)[0] = data | PTE_USER;
	for (u64 i = 1; i <= 3; i++) {
		memset(pa_ptr(pool_pa(cpu_page(cpu, 1 + i))), 0, PAGE_SIZE);
		pa_ptr(pt)[i] = pool_pa(cpu_page(cpu, 1 + i)) | PTE_USER;
	}
	pa_ptr(pool_pa(1))[cpu + 1] = pt | PTE_USER;

	memset(ud, 0, PAGE_SIZE);
	ud->n = n;
	ud->cpu = cpu;
	ud->demand_base = va + DEMAND_OFF;
	ud->demand_pages = pages;
	for (int i = 0; i < HV_NR_OPEN_PATHS; i++) {
		ud->hash[i] = user_path_hash[i];
		for (int k = 0; user_paths[i][k] && k < UD_PATH_LEN - 1; k++)
			ud->paths[i][k] = user_paths[i][k];
	}
	if (!bench)
		__atomic_fetch_add(&hv_user_pages_wanted, pages, __ATOMIC_RELAXED);

	load_gdt_tss(cpu);
	memset(u, 0, sizeof(*u));
	u->tss_rsp0 = (u64 *)((char *)&hv_tss[cpu] + 4);	/* rsp0, 4-byte aligned */
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE | EFER_NXE);	/* as Linux: #PF reports fetches */
	wrmsr(MSR_STAR, ((u64)(HV_USER_SS - 8) << 48) | (0x10ULL << 32));
	wrmsr(MSR_SFMASK, SFMASK_LINUX);
	wrmsr(MSR_GS_BASE, 0);
	wrmsr(MSR_KERNEL_GS_BASE, (u64)u);
	hv_idt_gap_if_asked(cpu);

	l_start(&l);
	l_str(&l, "user cpu=");
	l_dec(&l, cpu);
	l_str(&l, " syscalls=");
	l_dec(&l, n);
	l_emit(&l);

	code = hv_enter_user(u,
			     HV_USER_BASE + (u64)((bench ? hv_user_bench : hv_user_main) -
						  hv_user_text_start),
			     va + STACK_TOP_OFF, va);
	if (code) {
		static const char *const what[] = { "?", "open", "int80", "not_zero", "page_lost" };

		l_start(&l);
		l_str(&l, "FAIL user cpu=");
		l_dec(&l, cpu);
		l_str(&l, " what=");
		l_str(&l, what[code > 0 && code <= UFAIL_PAGE_LOST ? code : 0]);
		l_str(&l, " iter=");
		l_dec(&l, ud->fail_iter);
		l_str(&l, " got=");
		l_hex(&l, ud->fail_got);
		l_str(&l, " want=");
		l_hex(&l, ud->fail_want);
		l_emit(&l);
		hv_exit(HV_EXIT_USER_CHECK);
	}
}

static __noreturn void user_exit(u32 cpu, long code)
{
	struct hv_udata *ud = (struct hv_udata *)pa_ptr(pool_pa(cpu_page(cpu, 1)));

	/* What user code counted it made becomes the callers' tally. */
	__atomic_fetch_add(&hv_user_made, ud->made_syscalls, __ATOMIC_RELAXED);
	__atomic_fetch_add(&hv_user_made_int80, ud->made_int80, __ATOMIC_RELAXED);
	if (ud->made_syscalls)	/* the bench loop does not count */
		__atomic_fetch_add(&hv_expected_counts[HV_FN_hv_open_file],
				   ud->made_syscalls - 1, __ATOMIC_RELAXED);
	__atomic_fetch_add(&hv_expected_counts[HV_FN_hv_add], ud->made_int80, __ATOMIC_RELAXED);
	hv_user_return(hv_ucpu[cpu].saved_rsp, code);
}

static u32 cpu_of(const void *kstack_ptr)
{
	return (u32)(((u64)kstack_ptr - (u64)hv_stacks) / HV_STACK_SIZE);
}

static int user_range(u64 p, u64 len)
{
	u64 end = HV_USER_BASE + (u64)(HV_MAX_CPUS + 1) * CPU_REGION;

	return p >= HV_USER_BASE && p < end && len <= end - p;
}

u64 hv_syscall(struct hv_sysregs *r)
{
	u32 cpu = cpu_of(r);

	__atomic_fetch_add(&hv_user_syscalls, 1, __ATOMIC_RELAXED);
	switch (r->orig_ax) {
	case HV_SYS_OPENAT: {
		char path[UD_PATH_LEN];
		const char *up = (const char *)r->rsi;
		int i = 0;

		if (!user_range(r->rsi, UD_PATH_LEN))
			return (u64)-14L;	/* EFAULT */
		for (; i < UD_PATH_LEN - 1 && up[i]; i++)
			path[i] = up[i];
		path[i] = 0;
		return (u64)(long)hv_open_file((int)r->rdi, path, (int)r->rdx, (unsigned int)r->r10);
	}
	case HV_SYS_GETPID:
		return 1000 + cpu;
	case HV_SYS_BENCH_MARK:
		asm volatile("outl %0, %1" : : "a"((u32)r->rdi), "Nd"((u16)HV_BENCH_MARKER_PORT));
		return 0;
	case HV_SYS_EXIT:
		user_exit(cpu, (long)r->rdi);
	default:
		return (u64)-38L;	/* ENOSYS */
	}
}

u64 hv_int80(struct hv_sysregs *r)
{
	__atomic_fetch_add(&hv_user_int80, 1, __ATOMIC_RELAXED);
	return (u64)hv_add((long)r->rdi, (long)r->rsi);
}

/*
 * From hv_exception: a fault taken in user mode. Demand-zero faults in this
 * CPU's range are mapped (returns 1); a system call that arrived as a fault
 * is reported and ends the run; anything else returns 0 (fatal, reported).
 */
int hv_user_fault(u64 vec, u64 err, u64 rip, u64 cs, u64 cr2, u32 cpu)
{
	struct line l;

	if ((cs & 3) != 3 || cpu >= HV_MAX_CPUS)
		return 0;
	if (vec == 14 && !(err & 1)) {
		u64 base = cpu_va(cpu) + DEMAND_OFF;

		if (cr2 >= base && cr2 < base + HV_USER_DEMAND_PAGES * PAGE_SIZE) {
			u64 k = (cr2 - base) / PAGE_SIZE;
			u64 pa = pool_pa(cpu_page(cpu, POOL_DEMAND_FIRST + k));
			u64 *pt = pa_ptr(pool_pa(cpu_page(cpu, 0)));

			memset(pa_ptr(pa), 0, PAGE_SIZE);
			pt[(DEMAND_OFF / PAGE_SIZE) + k] = pa | PTE_USER;
			asm volatile("invlpg (%0)" : : "r"(cr2) : "memory");
			__atomic_fetch_add(&hv_user_faults, 1, __ATOMIC_RELAXED);
			return 1;
		}
	}
	if ((vec == 14 && rip == (u64)entry_SYSCALL_64) ||
	    (vec == 6 && user_range(rip, 2) && ((const u8 *)rip)[0] == 0xcd &&
	     ((const u8 *)rip)[1] == 0x80)) {
		l_start(&l);
		l_str(&l, "FAIL user cpu=");
		l_dec(&l, cpu);
		l_str(&l, vec == 14 ? " syscall did not reach the kernel (#PF at entry_SYSCALL_64 err="
				    : " int $0x80 did not reach the kernel (#UD err=");
		l_hex(&l, err);
		l_str(&l, ")");
		l_emit(&l);
		hv_exit(HV_EXIT_USER_SYSCALL);
	}
	return 0;
}

/* Boot CPU, after every CPU came back: made == handled, pages == faults. */
void hv_user_report(u32 ncpus)
{
	u64 made = __atomic_load_n(&hv_user_made, __ATOMIC_RELAXED);
	u64 sys = __atomic_load_n(&hv_user_syscalls, __ATOMIC_RELAXED);
	u64 made80 = __atomic_load_n(&hv_user_made_int80, __ATOMIC_RELAXED);
	u64 i80 = __atomic_load_n(&hv_user_int80, __ATOMIC_RELAXED);
	u64 faults = __atomic_load_n(&hv_user_faults, __ATOMIC_RELAXED);
	u64 pages = __atomic_load_n(&hv_user_pages_wanted, __ATOMIC_RELAXED);
	struct line l;

	l_start(&l);
	if (made != sys || made80 != i80 || faults != pages) {
		l_str(&l, "FAIL user counters made=");
		l_dec(&l, made);
		l_str(&l, " syscalls=");
		l_dec(&l, sys);
		l_str(&l, " int80_made=");
		l_dec(&l, made80);
		l_str(&l, " int80=");
		l_dec(&l, i80);
		l_str(&l, " pages=");
		l_dec(&l, pages);
		l_str(&l, " faults=");
		l_dec(&l, faults);
		l_emit(&l);
		hv_exit(HV_EXIT_USER_CHECK);
	}
	l_str(&l, "user ok cpus=");
	l_dec(&l, ncpus);
	l_str(&l, " syscalls=");
	l_dec(&l, sys);
	l_str(&l, " int80=");
	l_dec(&l, i80);
	l_str(&l, " faults=");
	l_dec(&l, faults);
	l_emit(&l);
}
