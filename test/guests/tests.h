/* The tests that live in their own files. Each ends the VM itself. */
#ifndef GUEST_TESTS_H
#define GUEST_TESTS_H
#include "lib.h"

void test_pciscan(const struct mb_info *mbi);
void test_rtc(const struct mb_info *mbi);
void test_highmem(const struct mb_info *mbi);
void test_smp(const struct mb_info *mbi);
void test_virtio_rnd(const struct mb_info *mbi);
void test_rm_pit(const struct mb_info *mbi);
void test_routing(const struct mb_info *mbi);
void test_rm_rtc(const struct mb_info *mbi);
void test_pm_rate(const struct mb_info *mbi);
void test_rm_lapic(const struct mb_info *mbi);
void test_rm_hpet(const struct mb_info *mbi);
void test_rm_ipi(const struct mb_info *mbi);
/* cpu1 in real mode with a handler for vector 0x42 (smp.c, ipi_ap.S) */
#define RM_AP_VECTOR 0x42u
volatile u32 *rm_ap_start(void);
u32 rm_ap_wait_count(volatile u32 *count, u32 n);
void test_exitbench(const struct mb_info *mbi);
void test_virtio_blk(const struct mb_info *mbi);
void test_ahci(const struct mb_info *mbi);
void test_virtio_net(const struct mb_info *mbi);
void test_lm_pit(const struct mb_info *mbi);
void test_lm_rtc(const struct mb_info *mbi);
void test_lm_lapic(const struct mb_info *mbi);
void test_lm_hpet(const struct mb_info *mbi);
void test_lm_level(const struct mb_info *mbi);
void test_lm_ipi(const struct mb_info *mbi);
void test_lm_complete(const struct mb_info *mbi);
void test_vmcall(const struct mb_info *mbi);
/* cpu1 in long mode, waiting in ring 3 for `runs` handler runs of `vector` (lm_ipi.c). */
void lm_ap_start(u32 vector, u32 runs, u32 actions);
u32 lm_ap_wait_count(u32 vector, u32 n);
void test_blkbench(const struct mb_info *mbi);
void test_x2apic(const struct mb_info *mbi);
void test_usernet(const struct mb_info *mbi);
void test_reset_api(const struct mb_info *mbi);

#endif
