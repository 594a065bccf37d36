// SPDX-License-Identifier: Apache-2.0
/*
 * The counted functions: named, global, noinline, shaped like kernel code.
 * Each increments its own slot of hv_call_counts once per call.
 */
#include "hvtest.h"

u64 hv_call_counts[HV_NR_COUNTED];
const u8 hv_checksum_data[HV_CHECKSUM_DATA_LEN] = HV_CHECKSUM_DATA;

/* Like do_sys_openat2(): the result depends on every argument and the path string. */
noinline int hv_open_file(int dfd, const char *path, int flags, unsigned int mode)
{
	u32 h = 0x811c9dc5;

	hv_count(hv_open_file);
	while (*path) {
		h ^= (u8)*path++;
		h *= 0x01000193;
	}
	return (int)((h ^ (u32)flags ^ (mode << 8) ^ (u32)dfd) & 0x7fffffff);
}

noinline long hv_fib(int n)
{
	hv_count(hv_fib);
	long a, b;

	if (n < 2)
		return n;
	/*
	 * The empty asm keeps both calls real calls: gcc -O2 would otherwise turn
	 * the recursion into a loop with an accumulator, and a probe at hv_fib+0
	 * would see fewer entries than the counter counts.
	 */
	a = hv_fib(n - 1);
	b = hv_fib(n - 2);
	asm volatile("" : "+r"(b));
	return a + b;
}

/* depth activations in flight at the deepest point; returns depth + ... + 1. */
noinline long hv_recurse(int depth)
{
	hv_count(hv_recurse);
	long r;

	if (depth <= 1)
		return depth;
	/* A real recursive call (see hv_fib): kretprobes need nested returns. */
	r = hv_recurse(depth - 1);
	asm volatile("" : "+r"(r));
	return depth + r;
}

/* hvtest.override: callers count the results that are not n + 1. */
u64 hv_may_fail_body;
noinline long hv_may_fail(long n)
{
	__atomic_fetch_add(&hv_may_fail_body, 1, __ATOMIC_RELAXED);
	return n + 1;
}

/* Returns nothing: an override here is refused. */
u64 hv_note_sum;
noinline void hv_note(long n)
{
	__atomic_fetch_add(&hv_note_sum, (u64)n, __ATOMIC_RELAXED);
}

noinline long hv_add(long a, long b)
{
	hv_count(hv_add);
	return a + b;
}

/* Arguments 7 and 8 are on the stack ($stack1, $stack2 at entry). */
noinline long hv_many_args(long a1, long a2, long a3, long a4, long a5, long a6,
			   long a7, long a8)
{
	hv_count(hv_many_args);
	return a1 + 2 * a2 + 3 * a3 + 4 * a4 + 5 * a5 + 6 * a6 + 7 * a7 + 8 * a8;
}

noinline long hv_work_item(struct hv_work *w)
{
	long r;

	hv_count(hv_work_item);
	r = 3 * (long)w->id + w->flags + (long)hv_strlen(w->name);
	if (w->next)
		r += w->next->id;
	return r;
}

noinline u32 hv_checksum(const void *buf, size_t len)
{
	const u8 *p = buf;
	u32 sum = 0;

	hv_count(hv_checksum);
	while (len--)
		sum = ((sum << 1) | (sum >> 31)) ^ *p++;
	return sum;
}

/* Ends in a sibling call: "jmp hv_add" (checked in the crate's tests). */
noinline long hv_sub_tail(long a, long b)
{
	hv_count(hv_sub_tail);
	return hv_add(a, -b);
}

/*
 * A local buffer forces "sub $N, %rsp"; without shrink-wrapping it is in the
 * prologue: nop5; push %rbp; mov %rsp,%rbp; sub $N,%rsp.
 */
__attribute__((optimize("no-shrink-wrap")))
noinline long hv_stack_frame(const char *s)
{
	volatile char buf[64];
	long n = 0, sum = 0;

	hv_count(hv_stack_frame);
	while (s[n] && n < (long)sizeof(buf)) {
		buf[n] = s[n];
		n++;
	}
	for (long i = 0; i < n; i++)
		sum += (u8)buf[i];
	return (n << 16) + sum;
}

size_t hv_strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

/* gcc may emit calls to these for struct copies and initialisers. */
void *memset(void *s, int c, size_t n)
{
	u8 *p = s;

	while (n--)
		*p++ = (u8)c;
	return s;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;

	while (n--)
		*dp++ = *sp++;
	return d;
}
