// SPDX-License-Identifier: Apache-2.0
/*
 * Compiled with -fcf-protection=branch, like an IBT kernel: functions start
 * with "endbr64" and then the 5-byte ftrace nop.
 */
#include "hvtest.h"

noinline long hv_ibt_func(long x)
{
	hv_count(hv_ibt_func);
	return 7 * x + 3;
}

/* Called through this pointer, the reason endbr64 exists. */
long (*hv_ibt_ops)(long x) = hv_ibt_func;
