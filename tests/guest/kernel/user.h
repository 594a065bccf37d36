/* SPDX-License-Identifier: Apache-2.0 */
/* Layouts shared by user.S and user.c. */
#ifndef HV_USER_H
#define HV_USER_H

/* struct hv_ucpu (per CPU, KERNEL_GS_BASE while in user mode) */
#define UCPU_KSTACK		0
#define UCPU_USER_RSP		8
#define UCPU_SAVED_RSP		16
#define UCPU_TSS_RSP0		24

/* struct hv_udata (the user data page) */
#define UD_N			0
#define UD_CPU			8
#define UD_DEMAND_BASE		16
#define UD_DEMAND_PAGES		24
#define UD_MADE_SYSCALLS	32
#define UD_MADE_INT80		40
#define UD_FAIL_ITER		48
#define UD_FAIL_GOT		56
#define UD_FAIL_WANT		64
#define UD_HASH			80
#define UD_PATHS		128
#define UD_PATH_LEN		64

/* exit codes of the user loop */
#define UFAIL_OPEN		1
#define UFAIL_INT80		2
#define UFAIL_NOT_ZERO		3
#define UFAIL_PAGE_LOST		4

#endif
