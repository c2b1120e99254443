/* lm-ipi: cpu1 in long mode waits in ring 3 (ring3.h) for fixed IPIs of LM_IPI_VECTOR; the
 * BSP, at CPL0 with interrupts off, sends LM_IPI_COUNT of them, each after the previous one
 * was handled. The handler records the APIC ID it ran on and its ISR bit. */
#include "tests.h"
#include "ring3.h"

#define LM_AP_BASE 0x9000u
#define LAPIC_ICR_LOW (LAPIC + 0x300)
#define LAPIC_ICR_HIGH (LAPIC + 0x310)
#define ICR_DELIVERY_PENDING (1u << 12)
#define ICR_LEVEL_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)
#define AP_APIC_ID 1u
#define LM_IPI_VECTOR 0x42u
#define LM_IPI_COUNT 3u
/* Emulated CPL0 spinning: a few seconds on the build machines. */
#define SETTLE_SPINS 20000u
#define AP_WAIT_SPINS 3000000u

extern const u8 lm_ap_trampoline[], lm_ap_trampoline_end[];
static volatile u32 ap_ready, ap_done, ap_vector, ap_runs;

/* cpu1, at CPL0 in 32-bit protected mode, from lm_ap.S. */
void lm_ap_main(void)
{
    ring3_init_ap();
    mmio_write32(LAPIC + 0xF0, 0x1FF); /* cpu1's LAPIC software enable */
    ap_ready = 1;
    ring3_wait(ap_vector, ap_runs, 20000);
    ap_done = 1;
}

static void send_ipi(u32 apic_id, u32 command)
{
    mmio_write32(LAPIC_ICR_HIGH, apic_id << 24);
    mmio_write32(LAPIC_ICR_LOW, command);
    for (u32 i = 0; i < SETTLE_SPINS; i++)
        if (!(mmio_read32(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING))
            break;
}

static int wait_for(volatile u32 *value, u32 at_least, u32 spins)
{
    for (u32 i = 0; i < spins && *value < at_least; i++)
        cpu_relax();
    return *value >= at_least;
}

void lm_ap_start(u32 vector, u32 runs, u32 actions)
{
    ring3_init(); /* the tables cpu1 shares */
    ring3_handle(vector, actions, 0, 0);
    ap_vector = vector;
    ap_runs = runs;
    mmio_write32(LAPIC + 0xF0, 0x1FF);
    memcpy((void *)LM_AP_BASE, lm_ap_trampoline, (u32)(lm_ap_trampoline_end - lm_ap_trampoline));
    send_ipi(AP_APIC_ID, ICR_INIT | ICR_LEVEL_ASSERT);
    for (volatile u32 i = 0; i < SETTLE_SPINS; i++)
        cpu_relax();
    send_ipi(AP_APIC_ID, ICR_STARTUP | ICR_LEVEL_ASSERT | (LM_AP_BASE >> 12));
    if (!wait_for(&ap_ready, 1, AP_WAIT_SPINS / 10)) {
        send_ipi(AP_APIC_ID, ICR_STARTUP | ICR_LEVEL_ASSERT | (LM_AP_BASE >> 12));
        if (!wait_for(&ap_ready, 1, AP_WAIT_SPINS))
            fail("cpu1 did not reach long mode");
    }
}

u32 lm_ap_wait_count(u32 vector, u32 n)
{
    wait_for(&ring3_count[vector & 0xFF], n, AP_WAIT_SPINS);
    return ring3_count[vector & 0xFF];
}

void test_lm_ipi(const struct mb_info *mbi)
{
    (void)mbi;
    lm_ap_start(LM_IPI_VECTOR, LM_IPI_COUNT, R3_SAMPLE_CPU | R3_SAMPLE_ISR | R3_EOI_LAPIC);
    println("lm-ipi cpu1 waiting");
    u32 handled = 0;
    for (u32 i = 1; i <= LM_IPI_COUNT; i++) {
        send_ipi(AP_APIC_ID, ICR_LEVEL_ASSERT | LM_IPI_VECTOR); /* fixed, physical */
        handled = lm_ap_wait_count(LM_IPI_VECTOR, i);
        if (handled < i)
            break;
    }
    puts("lm-ipi handled ");
    print_dec(handled);
    putc('\n');
    puts("lm-ipi handler on apic ");
    print_dec(ring3_cpu_seen[LM_IPI_VECTOR]);
    putc('\n');
    puts("lm-ipi in service in the handler ");
    print_dec(ring3_isr_seen[LM_IPI_VECTOR]);
    putc('\n');
    puts("lm-ipi cpu1 left ring 3 ");
    print_dec(wait_for(&ap_done, 1, AP_WAIT_SPINS));
    putc('\n');
    if (irr_pending(LM_IPI_VECTOR))
        fail("lm-ipi: the vector is pending at the BSP");
    poweroff();
}
