/* SPDX-License-Identifier: Apache-2.0
 * Counted functions with exact, hand-chosen probe-site shapes: the
 * instruction right after the ftrace nop is a lea, a jcc, or a jmp.
 */
#include "hvtest.h"

#define NOP5	.byte 0x0f, 0x1f, 0x44, 0x00, 0x00
#define COUNT(fn)	lock incq hv_call_counts + 8 * HV_FN_##fn(%rip)

	.text

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

	.section .note.GNU-stack, "", @progbits
