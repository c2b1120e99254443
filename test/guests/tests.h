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
void test_exitbench(const struct mb_info *mbi);
void test_virtio_blk(const struct mb_info *mbi);
void test_ahci(const struct mb_info *mbi);
void test_virtio_net(const struct mb_info *mbi);

#endif
