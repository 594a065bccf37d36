/* SPDX-License-Identifier: Apache-2.0
 * Counted functions with exact, hand-chosen probe-site shapes: the
 * instruction right after the ftrace nop is a lea, a jcc, or a jmp.
 */
#include "hvtest.h"

#define NOP5	.byte 0x0f, 0x1f, 0x44, 0x00, 0x00
#define COUNT(fn)	lock incq hv_call_counts + 8 * HV_FN_##fn(%rip)

	.text

/* hvtest.ftrace=N turns hv_add's fentry nop into a call here (see main.c). */
	.globl hv_ftrace_hook
	.type hv_ftrace_hook, @function
	.balign 16
hv_ftrace_hook:
	lock incq hv_ftrace_calls(%rip)
	ret
	.size hv_ftrace_hook, . - hv_ftrace_hook

/* long hv_lea_first(long a, long b): a + 2 * b + 0x11 */
	.globl hv_lea_first
	.type hv_lea_first, @function
	.balign 16
hv_lea_first:
	NOP5
	leaq 0x11(%rdi,%rsi,2), %rax
	COUNT(hv_lea_first)
	ret
	.size hv_lea_first, . - hv_lea_first

/*
 * hv_jcc_after_nop: the caller sets the flags with "cmp %rsi, %rdi"; returns
 * max(%rdi, %rsi) (signed). A probe at +0 that clobbers the flags shows up
 * as a wrong return value.
 */
	.globl hv_jcc_after_nop
	.type hv_jcc_after_nop, @function
	.balign 16
hv_jcc_after_nop:
	NOP5
	jl 1f
	movq %rdi, %rax
	COUNT(hv_jcc_after_nop)
	ret
1:	movq %rsi, %rax
	COUNT(hv_jcc_after_nop)
	ret
	.size hv_jcc_after_nop, . - hv_jcc_after_nop

/* long hv_tail_jmp(long a, long b): a jmp right after the nop, then a tail jmp to hv_add. */
	.globl hv_tail_jmp
	.type hv_tail_jmp, @function
	.balign 16
hv_tail_jmp:
	NOP5
	jmp hv_tail_jmp_body
	.size hv_tail_jmp, . - hv_tail_jmp

	.globl hv_tail_jmp_body
	.type hv_tail_jmp_body, @function
	.balign 16
hv_tail_jmp_body:
	COUNT(hv_tail_jmp)
	jmp hv_add
	.size hv_tail_jmp_body, . - hv_tail_jmp_body

/*
 * long hv_call_checked(long (*fn)(long, long), long a, long b, u64 *clobbered)
 * Calls fn(a, b) with canaries in the callee-saved registers and reports in
 * *clobbered which of them did not survive (bits: rbx, r12, r13, r14, r15,
 * rsp/rbp, DF set), so a probe engine that corrupts state at a probe site is
 * caught even where the return value would not show it. Not counted itself.
 */
#define CANARY(r)	(0x5a5a000000000000 + (r))
	.globl hv_call_checked
	.type hv_call_checked, @function
	.balign 16
hv_call_checked:
	NOP5
	pushq %rbp
	movq %rsp, %rbp
	pushq %rbx
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	pushq %rcx			/* clobbered; %rsp is 16-byte aligned now */
	movq %rdi, %rax
	movq %rsi, %rdi
	movq %rdx, %rsi
	movabsq $CANARY(0xb), %rbx
	movabsq $CANARY(0xc), %r12
	movabsq $CANARY(0xd), %r13
	movabsq $CANARY(0xe), %r14
	movabsq $CANARY(0xf), %r15
	call *%rax
	xorl %ecx, %ecx
	movabsq $CANARY(0xb), %rdx
	cmpq %rdx, %rbx
	je 1f
	orl $0x01, %ecx
1:	movabsq $CANARY(0xc), %rdx
	cmpq %rdx, %r12
	je 1f
	orl $0x02, %ecx
1:	movabsq $CANARY(0xd), %rdx
	cmpq %rdx, %r13
	je 1f
	orl $0x04, %ecx
1:	movabsq $CANARY(0xe), %rdx
	cmpq %rdx, %r14
	je 1f
	orl $0x08, %ecx
1:	movabsq $CANARY(0xf), %rdx
	cmpq %rdx, %r15
	je 1f
	orl $0x10, %ecx
1:	leaq -48(%rbp), %rdx
	cmpq %rdx, %rsp
	je 1f
	orl $0x20, %ecx
	movq %rdx, %rsp			/* best effort, to report it */
1:	pushfq
	testl $0x400, (%rsp)
	je 1f
	orl $0x40, %ecx
	cld
1:	addq $8, %rsp
	popq %rdx
	movq %rcx, (%rdx)
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbx
	popq %rbp
	ret
	.size hv_call_checked, . - hv_call_checked

	.section .note.GNU-stack, "", @progbits
