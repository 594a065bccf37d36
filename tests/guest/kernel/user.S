/* SPDX-License-Identifier: Apache-2.0
 * User mode (hvtest.user=N): the system-call and int $0x80 entries, the
 * switch to CPL3 and back, and the user-mode loop itself (CPL3 code in its
 * own page, mapped at HV_USER_BASE with the U bit; it uses no absolute
 * addresses: everything is relative to its data page in %rdi).
 */
#include "hvtest.h"
#include "user.h"

	.text
/*
 * MSR_LSTAR points here, as on Linux. Linux-like: swapgs, user RSP saved in
 * the per-CPU area, kernel stack from it, a pt_regs-like frame, C handler,
 * sysretq. Only rax, rcx and r11 differ on return.
 */
	.globl entry_SYSCALL_64
	.type entry_SYSCALL_64, @function
	.balign 16
entry_SYSCALL_64:
	swapgs
	movq	%rsp, %gs:UCPU_USER_RSP
	movq	%gs:UCPU_KSTACK, %rsp
	pushq	$HV_USER_SS		/* ss */
	pushq	%gs:UCPU_USER_RSP	/* rsp */
	pushq	%r11			/* rflags */
	pushq	$HV_USER_CS		/* cs */
	pushq	%rcx			/* rip */
	pushq	%rax			/* orig_ax */
	pushq	%rdi
	pushq	%rsi
	pushq	%rdx
	pushq	%r10
	pushq	%r8
	pushq	%r9
	movq	%rsp, %rdi
	call	hv_syscall
	popq	%r9
	popq	%r8
	popq	%r10
	popq	%rdx
	popq	%rsi
	popq	%rdi
	addq	$8, %rsp		/* orig_ax */
	popq	%rcx
	addq	$8, %rsp		/* cs */
	popq	%r11
	popq	%rsp
	swapgs
	sysretq
	.size entry_SYSCALL_64, . - entry_SYSCALL_64

/* IDT[0x80], a DPL3 interrupt gate: the same frame, iretq. */
	.globl entry_INT80
	.type entry_INT80, @function
	.balign 16
entry_INT80:
	pushq	%rax			/* orig_ax */
	pushq	%rdi
	pushq	%rsi
	pushq	%rdx
	pushq	%r10
	pushq	%r8
	pushq	%r9
	pushq	%rcx
	pushq	%r11
	leaq	16(%rsp), %rdi
	call	hv_int80
	popq	%r11
	popq	%rcx
	popq	%r9
	popq	%r8
	popq	%r10
	popq	%rdx
	popq	%rsi
	popq	%rdi
	addq	$8, %rsp
	iretq
	.size entry_INT80, . - entry_INT80

/*
 * long hv_enter_user(struct hv_ucpu *u, u64 rip, u64 rsp, u64 arg):
 * save the callee-saved registers and RSP in u, make the kernel stack for
 * system calls and exceptions (TSS.RSP0) start below this frame, and iretq
 * to CPL3 with interrupts off. Returns the code hv_user_return() passes.
 */
	.globl hv_enter_user
	.type hv_enter_user, @function
hv_enter_user:
	pushq	%rbp
	pushq	%rbx
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, UCPU_SAVED_RSP(%rdi)
	leaq	-256(%rsp), %rax
	andq	$-16, %rax
	movq	%rax, UCPU_KSTACK(%rdi)
	movq	UCPU_TSS_RSP0(%rdi), %r8
	movq	%rax, (%r8)
	pushq	$HV_USER_SS
	pushq	%rdx
	pushq	$0x2			/* rflags: IF off */
	pushq	$HV_USER_CS
	pushq	%rsi
	movq	%rcx, %rdi
	xorl	%eax, %eax
	xorl	%ebx, %ebx
	xorl	%ecx, %ecx
	xorl	%edx, %edx
	xorl	%esi, %esi
	xorl	%ebp, %ebp
	xorl	%r8d, %r8d
	xorl	%r9d, %r9d
	xorl	%r10d, %r10d
	xorl	%r11d, %r11d
	xorl	%r12d, %r12d
	xorl	%r13d, %r13d
	xorl	%r14d, %r14d
	xorl	%r15d, %r15d
	iretq
	.size hv_enter_user, . - hv_enter_user

/* void hv_user_return(u64 saved_rsp, long code): back into hv_enter_user's caller. */
	.globl hv_user_return
	.type hv_user_return, @function
hv_user_return:
	movq	%rdi, %rsp
	movq	%rsi, %rax
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbx
	popq	%rbp
	ret
	.size hv_user_return, . - hv_user_return

/* ------------------------------------------------------------------ */
/* CPL3 code: one page of its own, mapped user-readable at HV_USER_BASE.  */
	.section .text.hv_user, "ax"
	.balign 4096
	.globl hv_user_text_start
hv_user_text_start:
/*
 * %rdi = this CPU's user data page (struct hv_udata). Each iteration i:
 *   openat(AT_FDCWD, paths[(cpu + i) % 8], 0x80000 | (i & 3), i odd ? 0644 : 0)
 *     checked against hash ^ flags ^ (mode << 8) ^ dfd, & 0x7fffffff
 *   int $0x80 with rdi = i, rsi = cpu << 32 | 0x5a: checked == rdi + rsi
 *   i < demand_pages: store i + 1 at demand_base + i * 4096 (a demand-zero
 *     fault), after checking the next word of the fresh page reads 0
 * then every demand page still holds its value; exit(0). On a failed check
 * the what/iter/got/want are stored and exit(what).
 */
	.globl hv_user_main
hv_user_main:
	movq	%rdi, %rbx
	xorl	%r12d, %r12d
1:	cmpq	UD_N(%rbx), %r12
	jae	5f
	movq	UD_CPU(%rbx), %r13
	addq	%r12, %r13
	andl	$7, %r13d			/* path index */
	movq	%r12, %r14
	andl	$3, %r14d
	orl	$0x80000, %r14d			/* flags */
	xorl	%r15d, %r15d
	testb	$1, %r12b
	jz	2f
	movl	$0644, %r15d			/* mode */
2:	movq	%r13, %rsi
	shlq	$6, %rsi
	leaq	UD_PATHS(%rbx,%rsi), %rsi
	movq	$-100, %rdi
	movq	%r14, %rdx
	movq	%r15, %r10
	movl	$HV_SYS_OPENAT, %eax
	incq	UD_MADE_SYSCALLS(%rbx)
	syscall
	movl	UD_HASH(%rbx,%r13,4), %ecx
	xorl	%r14d, %ecx
	movl	%r15d, %edx
	shll	$8, %edx
	xorl	%edx, %ecx
	xorl	$0xffffff9c, %ecx
	andl	$0x7fffffff, %ecx
	cmpq	%rcx, %rax
	movl	$UFAIL_OPEN, %edx
	jne	8f

	movq	%r12, %rdi
	movq	UD_CPU(%rbx), %rsi
	shlq	$32, %rsi
	orq	$0x5a, %rsi
	leaq	(%rdi,%rsi), %r13		/* want */
	incq	UD_MADE_INT80(%rbx)
	int	$0x80
	movq	%r13, %rcx
	cmpq	%rcx, %rax
	movl	$UFAIL_INT80, %edx
	jne	8f

	cmpq	UD_DEMAND_PAGES(%rbx), %r12
	jae	3f
	movq	%r12, %r13
	shlq	$12, %r13
	addq	UD_DEMAND_BASE(%rbx), %r13
	movq	8(%r13), %rax			/* the fault: a fresh page reads 0 */
	xorl	%ecx, %ecx
	movl	$UFAIL_NOT_ZERO, %edx
	testq	%rax, %rax
	jnz	8f
	leaq	1(%r12), %rax
	movq	%rax, (%r13)
3:	incq	%r12
	jmp	1b

5:	xorl	%r12d, %r12d
6:	cmpq	UD_DEMAND_PAGES(%rbx), %r12
	jae	7f
	cmpq	UD_N(%rbx), %r12
	jae	7f
	movq	%r12, %r13
	shlq	$12, %r13
	addq	UD_DEMAND_BASE(%rbx), %r13
	movq	(%r13), %rax
	leaq	1(%r12), %rcx
	cmpq	%rcx, %rax
	movl	$UFAIL_PAGE_LOST, %edx
	jne	8f
	incq	%r12
	jmp	6b
7:	xorl	%edi, %edi
	movl	$HV_SYS_EXIT, %eax
	incq	UD_MADE_SYSCALLS(%rbx)
	syscall
	ud2

8:	movq	%r12, UD_FAIL_ITER(%rbx)
	movq	%rax, UD_FAIL_GOT(%rbx)
	movq	%rcx, UD_FAIL_WANT(%rbx)
	movq	%rdx, %rdi
	movl	$HV_SYS_EXIT, %eax
	incq	UD_MADE_SYSCALLS(%rbx)
	syscall
	ud2

/* hvtest.bench=N hvtest.user=1: N minimal system calls between two markers. */
	.globl hv_user_bench
hv_user_bench:
	movq	%rdi, %rbx
	movl	$HV_BENCH_PHASE_SYSCALLS, %edi
	movl	$HV_SYS_BENCH_MARK, %eax
	syscall
	movq	UD_N(%rbx), %r12
	testq	%r12, %r12
	jz	2f
1:	movl	$HV_SYS_GETPID, %eax
	syscall
	decq	%r12
	jnz	1b
2:	movl	$HV_BENCH_PHASE_SYSCALLS_END, %edi
	movl	$HV_SYS_BENCH_MARK, %eax
	syscall
	xorl	%edi, %edi
	movl	$HV_SYS_EXIT, %eax
	syscall
	ud2

	.balign 4096
	.globl hv_user_text_end
hv_user_text_end:

	.section .note.GNU-stack, "", @progbits
