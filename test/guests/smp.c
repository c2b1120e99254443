/* Starts the second CPU with INIT + SIPI through the xAPIC and waits for
 * it to report in. Interrupts stay off throughout. */
#include "tests.h"

#define AP_TRAMPOLINE_BASE 0x8000u
#define SIPI_VECTOR (AP_TRAMPOLINE_BASE >> 12)
#define LAPIC_BASE 0xFEE00000u
#define LAPIC_ICR_LOW (LAPIC_BASE + 0x300)
#define LAPIC_ICR_HIGH (LAPIC_BASE + 0x310)
#define ICR_DELIVERY_PENDING (1u << 12)
#define ICR_LEVEL_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)
#define AP_APIC_ID 1u
/* CPL0 code is emulated at ~1-2 M instructions/s on the build machines:
 * these bounds are a few seconds there, a blink on real hardware. */
#define SETTLE_SPINS 20000u
#define AP_WAIT_SPINS 3000000u

extern const u8 ap_trampoline[], ap_trampoline_end[];
extern const u32 ap_flag_offset;

static void spin(u32 n)
{
    for (volatile u32 i = 0; i < n; i++)
        cpu_relax();
}

static void send_ipi(u32 apic_id, u32 command)
{
    mmio_write32(LAPIC_ICR_HIGH, apic_id << 24);
    mmio_write32(LAPIC_ICR_LOW, command);
    for (u32 i = 0; i < SETTLE_SPINS; i++)
        if (!(mmio_read32(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING))
            break;
}

static int wait_for_ap(volatile u32 *flag, u32 spins)
{
    for (u32 i = 0; i < spins; i++) {
        if (*flag)
            return 1;
        cpu_relax();
    }
    return *flag != 0;
}

void test_smp(const struct mb_info *mbi)
{
    (void)mbi;
    u32 size = (u32)(ap_trampoline_end - ap_trampoline);
    memcpy((void *)AP_TRAMPOLINE_BASE, ap_trampoline, size);
    volatile u32 *flag = (volatile u32 *)(AP_TRAMPOLINE_BASE + ap_flag_offset);
    *flag = 0;

    send_ipi(AP_APIC_ID, ICR_INIT | ICR_LEVEL_ASSERT);
    spin(SETTLE_SPINS);
    send_ipi(AP_APIC_ID, ICR_STARTUP | ICR_LEVEL_ASSERT | SIPI_VECTOR);
    /* The MP spec sends a second SIPI if the first one was missed. */
    if (!wait_for_ap(flag, AP_WAIT_SPINS / 10)) {
        send_ipi(AP_APIC_ID, ICR_STARTUP | ICR_LEVEL_ASSERT | SIPI_VECTOR);
        if (!wait_for_ap(flag, AP_WAIT_SPINS))
            fail("smp: cpu1 did not start");
    }
    println("smp ok");
    poweroff();
}
