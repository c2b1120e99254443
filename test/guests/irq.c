/* Interrupt delivery and routing tests.
 *
 * rm-pit: end-to-end delivery in real mode (the only ring-0 mode in which this
 * host delivers interrupts): the PIT's IRQ 0 through the 8259 runs an IVT
 * handler, timed against the ACPI PM timer.
 *
 * routing: with interrupts off, raise interrupts and read back where they
 * landed: IOAPIC remote IRR and LAPIC IRR for a level pin (the SCI, asserted by
 * the power button, which the harness presses with SIGTERM), nothing for a
 * masked pin, and the 8259's IRR through OCW3. */
#include "tests.h"

#define PIT_HZ 1193182u
#define RM_PIT_HZ 100u
#define RM_PIT_TICKS 50u

void realmode_pit(u32 count, u32 ticks, u32 *result);

void test_rm_pit(const struct mb_info *mbi)
{
    (void)mbi;
    u32 result[3];
    realmode_pit(PIT_HZ / RM_PIT_HZ, RM_PIT_TICKS, result);
    u32 pm_ticks = (result[1] - result[0]) & 0xffffff; /* 24-bit PM timer */
    /* 200/716 us per tick is 1/3.579545 within 0.02%, in 32 bits up to the 24-bit wrap */
    u32 us = pm_ticks * 200u / 716u;
    puts("rm-pit ");
    print_dec(result[2] - 1);
    puts(" ticks in ");
    print_dec(us);
    println(" us");
    poweroff();
}

/* 64 Hz (register A: 32.768 kHz time base, rate 10), 32 periods: half a second. */
#define RM_RTC_REG_A 0x2Au
#define RM_RTC_TICKS 32u

void realmode_rtc(u32 reg_a, u32 ticks, u32 *result);

void test_rm_rtc(const struct mb_info *mbi)
{
    (void)mbi;
    u32 result[4];
    realmode_rtc(RM_RTC_REG_A, RM_RTC_TICKS, result);
    u32 pm_ticks = (result[1] - result[0]) & 0xffffff;
    u32 us = pm_ticks * 200u / 716u;
    puts("rm-rtc ");
    print_dec(result[2] - 1);
    puts(" ticks in ");
    print_dec(us);
    println(" us");
    puts("rm-rtc register c ");
    print_hex(result[3], 2);
    putc('\n');
    poweroff();
}

/* LAPIC timer periodic, divide by 16, initial count 625000: 10 ms on KVM's
 * in-kernel LAPIC (1 GHz bus), 100 ms on ours (100 MHz bus, as xhyve). */
#define LAPIC_REG_SVR 0xF0
#define LAPIC_REG_LVT_TIMER 0x320
#define LAPIC_REG_TIMER_INITIAL 0x380
#define LAPIC_REG_TIMER_DIVIDE 0x3E0
#define LAPIC_TIMER_PERIODIC (1u << 17)
#define RM_LAPIC_VECTOR 0x40
#define RM_LAPIC_COUNT 625000u
#define RM_LAPIC_TICKS 20u

void realmode_lapic(u32 unused, u32 ticks, u32 *result);
static void ioapic_write(u32 index, u32 value);

void test_rm_lapic(const struct mb_info *mbi)
{
    (void)mbi;
    u32 result[3];
    u32 lapic = 0xFEE00000u;
    mmio_write32(lapic + LAPIC_REG_SVR, 0x1FF);
    mmio_write32(lapic + LAPIC_REG_TIMER_DIVIDE, 0x3); /* divide by 16 */
    mmio_write32(lapic + LAPIC_REG_LVT_TIMER, LAPIC_TIMER_PERIODIC | RM_LAPIC_VECTOR);
    mmio_write32(lapic + LAPIC_REG_TIMER_INITIAL, RM_LAPIC_COUNT);
    realmode_lapic(0, RM_LAPIC_TICKS, result);
    mmio_write32(lapic + LAPIC_REG_TIMER_INITIAL, 0);
    u32 pm_ticks = (result[1] - result[0]) & 0xffffff;
    u32 us = pm_ticks * 200u / 716u;
    puts("rm-lapic ");
    print_dec(result[2] - 1);
    puts(" ticks in ");
    print_dec(us);
    println(" us");
    poweroff();
}

/* HPET timer 0 periodic every 10 ms, through IOAPIC pin 20 (the IOAPIC still
 * delivers to the LAPIC in real mode) as vector 0x40, taken by the same
 * real-mode handler as the LAPIC timer's. */
#define HPET_BASE 0xFED00000u
#define RM_HPET_PIN 20u
#define RM_HPET_TICKS 20u

void test_rm_hpet(const struct mb_info *mbi)
{
    (void)mbi;
    u32 result[3];
    u32 period_fs = mmio_read32(HPET_BASE + 4);
    u32 ten_ms = 10u * (1000000000u / (period_fs / 1000u));
    if (!(mmio_read32(HPET_BASE + 0x100 + 4) & (1u << RM_HPET_PIN)))
        fail("rm-hpet: timer 0 cannot route to pin 20");
    mmio_write32(0xFEE00000u + LAPIC_REG_SVR, 0x1FF);
    ioapic_write(0x10 + 2 * RM_HPET_PIN + 1, 0);           /* to APIC 0 */
    ioapic_write(0x10 + 2 * RM_HPET_PIN, RM_LAPIC_VECTOR); /* fixed, edge, unmasked */
    mmio_write32(HPET_BASE + 0x10, 0);                     /* halt the main counter */
    mmio_write32(HPET_BASE + 0xF0, 0);
    mmio_write32(HPET_BASE + 0xF4, 0);
    /* periodic, enabled, edge, pin 20; VAL_SET: the next write sets comparator and period */
    mmio_write32(HPET_BASE + 0x100, (RM_HPET_PIN << 9) | (1u << 6) | (1u << 3) | (1u << 2));
    mmio_write32(HPET_BASE + 0x108, ten_ms);
    mmio_write32(HPET_BASE + 0x10, 1);
    realmode_lapic(0, RM_HPET_TICKS, result);
    mmio_write32(HPET_BASE + 0x10, 0);
    u32 pm_ticks = (result[1] - result[0]) & 0xffffff;
    u32 us = pm_ticks * 200u / 716u;
    puts("rm-hpet ");
    print_dec(result[2] - 1);
    puts(" ticks in ");
    print_dec(us);
    println(" us");
    poweroff();
}

/* PM timer rate: two serial markers PM_RATE_TICKS apart on the PM timer (2 s at
 * 3.579545 MHz); the host times them on its own clock. */
#define PM_TIMER_PORT 0x408
#define PM_RATE_TICKS 7159090u

void test_pm_rate(const struct mb_info *mbi)
{
    (void)mbi;
    u32 last = inl(PM_TIMER_PORT) & 0xffffff;
    u32 elapsed = 0;
    println("pm-rate start");
    while (elapsed < PM_RATE_TICKS) {
        u32 now = inl(PM_TIMER_PORT) & 0xffffff;
        elapsed += (now - last) & 0xffffff; /* 24-bit wrap: read far more often than 4.7 s */
        last = now;
    }
    println("pm-rate end");
    puts("pm-rate ticks ");
    print_dec(elapsed);
    putc('\n');
    poweroff();
}

#define IOAPIC 0xFEC00000u
#define SMI_CMD 0xB2
#define ACPI_ENABLE 0xA0
#define PM1A_STS 0x400
#define PM1A_EN 0x402
#define PWRBTN 0x100
#define SCI_GSI 9
#define SCI_VECTOR 0x59
#define COM1_GSI 4
#define COM1_VECTOR 0x54
#define COM1 0x3F8

static void ioapic_write(u32 index, u32 value)
{
    mmio_write32(IOAPIC, index);
    mmio_write32(IOAPIC + 0x10, value);
}

static u32 ioapic_read(u32 index)
{
    mmio_write32(IOAPIC, index);
    return mmio_read32(IOAPIC + 0x10);
}

static int lapic_irr(u32 vector)
{
    return (mmio_read32(LAPIC + 0x200 + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

static void report(const char *what, u32 value)
{
    puts(what);
    putc(' ');
    print_dec(value);
    putc('\n');
}

void test_routing(const struct mb_info *mbi)
{
    (void)mbi;
    mmio_write32(LAPIC + 0xF0, 0x1FF); /* software enable */
    /* SCI: level, active high, vector 0x59, to APIC 0 */
    ioapic_write(0x10 + 2 * SCI_GSI + 1, 0);
    ioapic_write(0x10 + 2 * SCI_GSI, SCI_VECTOR | (1u << 15));
    /* COM1: masked, vector 0x54 */
    ioapic_write(0x10 + 2 * COM1_GSI + 1, 0);
    ioapic_write(0x10 + 2 * COM1_GSI, COM1_VECTOR | (1u << 16));
    /* 8259 pair initialised, everything masked */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFF); outb(0xA1, 0xFF);

    /* A transmit-empty interrupt from COM1: an edge on GSI 4. */
    outb(COM1 + 1, 0x02);
    putc('\n');
    for (volatile int i = 0; i < 1000; i++)
        ;
    outb(COM1 + 1, 0x00);
    report("masked pin vector pending", lapic_irr(COM1_VECTOR));
    outb(0x20, 0x0A); /* OCW3: read IRR */
    report("pic irr irq4", (inb(0x20) >> 4) & 1);

    outb(SMI_CMD, ACPI_ENABLE);
    outw(PM1A_EN, PWRBTN);
    report("level pin remote irr before", (ioapic_read(0x10 + 2 * SCI_GSI) >> 14) & 1);
    println("ready");
    while (!(inw(PM1A_STS) & PWRBTN))
        ;
    report("level pin remote irr", (ioapic_read(0x10 + 2 * SCI_GSI) >> 14) & 1);
    report("level pin vector pending", lapic_irr(SCI_VECTOR));
    poweroff();
}
