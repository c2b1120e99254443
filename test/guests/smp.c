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

/* rm-ipi: the BSP (protected mode, interrupts off) starts the AP in real mode
 * with a handler for IPI_VECTOR (ipi_ap.S), then sends it IPI_COUNT fixed
 * IPIs, each after the previous one has been handled. */
#define IPI_AP_BASE 0x7000u
#define IPI_VECTOR 0x42u
#define IPI_COUNT 3u

extern const u8 ipi_ap_start[], ipi_ap_end[];
extern const u32 ipi_ap_ready_offset, ipi_ap_count_offset, ipi_ap_isr_offset;

/* Starts cpu1 in real mode waiting for IPI_VECTOR (ipi_ap.S); returns its
 * handler-run counter. The BSP's LAPIC is software-enabled too. */
volatile u32 *rm_ap_start(void)
{
    memcpy((void *)IPI_AP_BASE, ipi_ap_start, (u32)(ipi_ap_end - ipi_ap_start));
    volatile u32 *ready = (volatile u32 *)(IPI_AP_BASE + ipi_ap_ready_offset);
    volatile u32 *count = (volatile u32 *)(IPI_AP_BASE + ipi_ap_count_offset);
    *ready = 0;
    *count = 0;
    mmio_write32(LAPIC_BASE + 0xF0, 0x1FF); /* BSP LAPIC software enable */

    send_ipi(AP_APIC_ID, ICR_INIT | ICR_LEVEL_ASSERT);
    spin(SETTLE_SPINS);
    send_ipi(AP_APIC_ID, ICR_STARTUP | ICR_LEVEL_ASSERT | (IPI_AP_BASE >> 12));
    if (!wait_for_ap(ready, AP_WAIT_SPINS / 10)) {
        send_ipi(AP_APIC_ID, ICR_STARTUP | ICR_LEVEL_ASSERT | (IPI_AP_BASE >> 12));
        if (!wait_for_ap(ready, AP_WAIT_SPINS))
            fail("rm-ipi: cpu1 did not reach real mode");
    }
    return count;
}

/* Waits until `*count` reaches `n`; returns the count seen. */
u32 rm_ap_wait_count(volatile u32 *count, u32 n)
{
    for (u32 spins = 0; spins < AP_WAIT_SPINS && *count < n; spins++)
        cpu_relax();
    return *count;
}

void test_rm_ipi(const struct mb_info *mbi)
{
    (void)mbi;
    volatile u32 *count = rm_ap_start();
    println("rm-ipi cpu1 waiting");
    u32 handled = 0;
    for (u32 i = 1; i <= IPI_COUNT; i++) {
        send_ipi(AP_APIC_ID, ICR_LEVEL_ASSERT | IPI_VECTOR); /* fixed, physical */
        handled = rm_ap_wait_count(count, i);
        if (handled < i)
            break;
    }
    puts("rm-ipi handled ");
    print_dec(handled);
    putc('\n');
    u32 isr = *(volatile u32 *)(IPI_AP_BASE + ipi_ap_isr_offset);
    puts("rm-ipi in service in the handler ");
    print_dec((isr >> (IPI_VECTOR % 32)) & 1);
    putc('\n');
    poweroff();
}
