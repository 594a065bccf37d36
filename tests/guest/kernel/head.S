/* SPDX-License-Identifier: Apache-2.0
 * PVH entry, boot page tables, GDT, exception stubs, the AP trampoline.
 * Linked at Linux's addresses: virtual 0xffffffff81000000, physical 0x1000000.
 */
#include "hvtest.h"

#define START_KERNEL_MAP	0xffffffff80000000
#define PA(x)			((x) - START_KERNEL_MAP)

#define KERNEL_CS		0x10
#define KERNEL_DS		0x18

#define X86_CR0_PE		0x00000001
#define X86_CR0_PG		0x80000000
#define X86_CR4_PAE		0x00000020
#define MSR_EFER		0xc0000080
#define EFER_LME		0x00000100

/* ---------------------------------------------------------------------- */
/* The PVH note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY, 32-bit entry.  */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4f - 3f			/* namesz */
	.long 6f - 5f			/* descsz */
	.long 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
3:	.asciz "Xen"
4:	.balign 4
5:	.long PA(pvh_start_xen)
6:	.balign 4

/* ---------------------------------------------------------------------- */
	.section .head.text, "ax"
	.code32
	.globl pvh_start_xen
	.type pvh_start_xen, @function
/*
 * PVH: 32-bit protected mode, paging off, flat segments, %ebx = physical
 * address of struct hvm_start_info. No stack is needed until 64-bit mode.
 */
pvh_start_xen:
	cli
	cld
	movl %ebx, PA(hv_start_info_pa)
	lgdtl PA(boot_gdt_desc32)

	movl %cr4, %eax
	orl $X86_CR4_PAE, %eax
	movl %eax, %cr4
	movl $PA(init_top_pgt), %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(X86_CR0_PG | X86_CR0_PE), %eax
	movl %eax, %cr0
	ljmpl $KERNEL_CS, $PA(1f)

	.code64
	/* 64-bit, still at the identity-mapped physical address. */
1:	movabsq $startup_64, %rax
	jmp *%rax
	.size pvh_start_xen, . - pvh_start_xen

	.text
	.globl startup_64
	.type startup_64, @function
startup_64:
	lgdt boot_gdt_desc64(%rip)
	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	leaq hv_stacks + HV_STACK_SIZE(%rip), %rsp
	pushq $KERNEL_CS
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:
	/* .bss is small (no stacks, no page tables): one rep stosq. */
	leaq __bss_start(%rip), %rdi
	leaq __bss_stop(%rip), %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq
	xorl %ebp, %ebp
	call hv_start_kernel
2:	cli
	hlt
	jmp 2b
	.size startup_64, . - startup_64

/* APs come here from the trampoline, in 64-bit mode on the boot page tables. */
	.globl hv_ap_entry
	.type hv_ap_entry, @function
hv_ap_entry:
	movq hv_ap_boot_stack(%rip), %rsp
	lgdt boot_gdt_desc64(%rip)
	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	pushq $KERNEL_CS
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:	movl hv_ap_boot_cpu(%rip), %edi
	xorl %ebp, %ebp
	call hv_ap_main
2:	cli
	hlt
	jmp 2b
	.size hv_ap_entry, . - hv_ap_entry

/* ---------------------------------------------------------------------- */
/* Exceptions. #BP counts and returns; hv_exception() returns only for a  */
/* fault it handled (user demand paging), else it reports and stops.      */
	.globl asm_exc_int3
	.type asm_exc_int3, @function
	.balign 16
asm_exc_int3:
	lock incq hv_bp_handled(%rip)
	iretq
	.size asm_exc_int3, . - asm_exc_int3

/* Stubs are 16 bytes apart so C can index them: hv_exc_stubs + 16 * vec. */
	.balign 16
	.globl hv_exc_stubs
hv_exc_stubs:
	.Lvec = 0
	.rept 32
	.balign 16
	/* Vectors 8, 10-14, 17, 21, 29, 30 push an error code themselves. */
	.if (.Lvec == 8) || (.Lvec >= 10 && .Lvec <= 14) || (.Lvec == 17) || (.Lvec == 21) || (.Lvec == 29) || (.Lvec == 30)
	.else
	pushq $0
	.endif
	pushq $.Lvec
	jmp hv_exc_common
	.Lvec = .Lvec + 1
	.endr

/*
 * hvtest.pf_entry_cld: a #PF entry that starts with `cld` (like Linux's
 * `nop; nop; nop; cld` without the nops), an instruction the VMM's
 * emulator does not take: the system-call bridge must single-step it.
 */
	.globl hv_pf_entry_cld
	.type hv_pf_entry_cld, @function
hv_pf_entry_cld:
	cld
	jmp hv_exc_stubs + 16 * 14
	.size hv_pf_entry_cld, . - hv_pf_entry_cld

hv_exc_common:
	/* Frame for C: r15..rax, vector, error code, then the CPU's iret frame. */
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	movq %rsp, %rbx
	andq $-16, %rsp
	call hv_exception
	movq %rbx, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp		/* vector, error code */
	iretq

/* ---------------------------------------------------------------------- */
/*
 * Real-mode AP trampoline, copied to HV_TRAMPOLINE_PADDR before the SIPI
 * (vector HV_TRAMPOLINE_PADDR >> 12). Real -> 32-bit protected -> long mode.
 */
#define TR(x)	(HV_TRAMPOLINE_PADDR + (x) - hv_trampoline_start)
	.section .rodata, "a"
	.balign 16
	.globl hv_trampoline_start, hv_trampoline_end
hv_trampoline_start:
	.code16
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl tr_gdt_desc - hv_trampoline_start
	movl %cr0, %eax
	orl $X86_CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $0x08, $TR(tr_pm32)

	.code32
tr_pm32:
	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %cr4, %eax
	orl $X86_CR4_PAE, %eax
	movl %eax, %cr4
	movl $PA(init_top_pgt), %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $X86_CR0_PG, %eax
	movl %eax, %cr0
	ljmpl $KERNEL_CS, $TR(tr_lm64)

	.code64
tr_lm64:
	movabsq $hv_ap_entry, %rax
	jmp *%rax

	.balign 8
tr_gdt:
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x08: 32-bit code */
	.quad 0x00af9a000000ffff	/* 0x10: 64-bit code */
	.quad 0x00cf92000000ffff	/* 0x18: data */
tr_gdt_desc:
	.word tr_gdt_desc - tr_gdt - 1
	.long TR(tr_gdt)
hv_trampoline_end:

/* ---------------------------------------------------------------------- */
	.data
	.balign 8
	.globl hv_start_info_pa
hv_start_info_pa:
	.quad 0

	.balign 16
boot_gdt:
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x08: 32-bit code */
	.quad 0x00af9a000000ffff	/* 0x10: __KERNEL_CS, 64-bit code */
	.quad 0x00cf92000000ffff	/* 0x18: __KERNEL_DS */
boot_gdt_end:
boot_gdt_desc32:
	.word boot_gdt_end - boot_gdt - 1
	.long PA(boot_gdt)
	.balign 8
boot_gdt_desc64:
	.word boot_gdt_end - boot_gdt - 1
	.quad boot_gdt

/*
 * Boot page tables, fully built at link time (no setup loop): four page
 * directories of 2 MiB pages map physical 0-4 GiB. They are used by
 *   identity   0x0                -> 0  (PML4[0])
 *   direct map 0xffff888000000000 -> 0  (PML4[273], like Linux)
 *   kernel     0xffffffff80000000 -> 0  (PML4[511], PDPT[510..511], 2 GiB)
 * 3-4 GiB (the MMIO hole: IOAPIC, LAPIC) is mapped uncached.
 */
#define PTE_P_RW		0x003
#define PDE_LARGE		0x083
#define PDE_UNCACHED		0x018
	.section .data.page_aligned, "aw"
	.balign 4096
	.globl init_top_pgt
init_top_pgt:
	.quad PA(level3_low_pgt) + PTE_P_RW
	.fill 272, 8, 0
	.quad PA(level3_low_pgt) + PTE_P_RW	/* 0xffff888000000000 */
	.fill 511 - 274, 8, 0
	.quad PA(level3_kernel_pgt) + PTE_P_RW

	.balign 4096
level3_low_pgt:
	.quad PA(level2_pgt) + PTE_P_RW
	.quad PA(level2_pgt) + 0x1000 + PTE_P_RW
	.quad PA(level2_pgt) + 0x2000 + PTE_P_RW
	.quad PA(level2_pgt) + 0x3000 + PTE_P_RW
	.fill 508, 8, 0

	.balign 4096
level3_kernel_pgt:
	.fill 510, 8, 0
	.quad PA(level2_pgt) + PTE_P_RW
	.quad PA(level2_pgt) + 0x1000 + PTE_P_RW

	.balign 4096
level2_pgt:
	.Li = 0
	.rept 2048
	.if .Li >= 1536
	.quad (.Li << 21) + PDE_LARGE + PDE_UNCACHED
	.else
	.quad (.Li << 21) + PDE_LARGE
	.endif
	.Li = .Li + 1
	.endr

/* Per-CPU stacks; never zeroed, never loaded (NOLOAD in the linker script). */
	.section .hv_stacks, "aw", @nobits
	.balign 4096
	.globl hv_stacks
hv_stacks:
	.skip HV_MAX_CPUS * HV_STACK_SIZE

	.section .note.GNU-stack, "", @progbits
