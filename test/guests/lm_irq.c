/* End-to-end interrupt delivery in long mode: each test programs a source with interrupts
 * off at CPL0, then waits in ring 3 (ring3.h) while the CPL0 handler counts and EOIs.
 *
 * lm-pit    PIT channel 0 at 100 Hz, ISA IRQ 0 = IOAPIC pin 2 -> vector 0x30
 * lm-rtc    RTC periodic 64 Hz, IRQ 8 = pin 8 -> 0x38; the handler reads register C
 * lm-lapic  LAPIC timer periodic (divide 16, count 625000) -> 0x40
 * lm-hpet   HPET timer 0 periodic 10 ms, pin 20 -> 0x41
 * lm-level  the SCI (GSI 9, level) after the power button: the handler EOIs without
 *           clearing PWRBTN_STS, so the still-high line is delivered again
 * Rates print as "<test> N ticks in US us" (first to last handler run, PM timer). */
#include "tests.h"
#include "ring3.h"

#define IOAPIC 0xFEC00000u
#define HPET 0xFED00000u
#define PIT_HZ 1193182u
#define TIMEOUT_MS 10000u

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

/* Pin -> vector on APIC 0, fixed delivery; `flags` adds level (1 << 15) or mask (1 << 16). */
static void route_pin(u32 pin, u32 vector, u32 flags)
{
    ioapic_write(0x10 + 2 * pin + 1, 0);
    ioapic_write(0x10 + 2 * pin, vector | flags);
}

/* LAPIC on, and the 8259 pair initialised with every input masked, so that nothing also
 * arrives through LINT0 (ExtINT). */
static void controllers_init(void)
{
    ring3_init();
    mmio_write32(LAPIC + 0xF0, 0x1FF);
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
}

static void report_rate(const char *name, u32 vector, u32 periods)
{
    ring3_log_vector = vector;
    u32 got = ring3_wait(vector, periods + 1, TIMEOUT_MS);
    puts(name);
    putc(' ');
    if (got < periods + 1) {
        puts("FAIL only ");
        print_dec(got);
        println(" handler runs");
        poweroff();
    }
    print_dec(got - 1);
    puts(" ticks in ");
    print_dec(pm_us(ring3_first_pm[vector], ring3_last_pm[vector]));
    println(" us");
    /* Each period on its own: a host thread late by a period or more stretches the span
     * above, but leaves most intervals at their nominal length. */
    puts(name);
    puts(" intervals us");
    for (u32 i = 1; i < got && i < RING3_LOG_SIZE; i++) {
        putc(' ');
        print_dec(pm_us(ring3_log[i - 1], ring3_log[i]));
    }
    putc('\n');
    /* The handler saw its vector in service; its EOI retired it. */
    puts(name);
    puts(" in service in the handler ");
    print_dec(ring3_isr_seen[vector]);
    putc('\n');
    puts(name);
    puts(" in service after eoi ");
    print_dec(isr_set(vector));
    putc('\n');
}

#define PIT_VECTOR 0x30
#define PIT_PIN 2
#define PIC_BASE_VECTOR 0x20

/* lm-pit: IOAPIC pin 2, as the MADT's override of ISA IRQ 0 says. lm-pit pic: the 8259's
 * IRQ 0 (vector 0x20) through LINT0 as ExtINT; EOI to the 8259, the LAPIC has nothing in
 * service. lm-pit pin0: pin 0 (where KVM's default GSI routing, which we replace, puts its PIT). */
void test_lm_pit(const struct mb_info *mbi)
{
    (void)mbi;
    controllers_init();
    u32 vector = PIT_VECTOR;
    u32 pin = cmdline_has("pin0") ? 0 : PIT_PIN;
    if (cmdline_has("pic")) {
        vector = PIC_BASE_VECTOR;
        mmio_write32(LAPIC + 0x350, 0x700); /* LVT LINT0: ExtINT, unmasked */
        outb(0x21, 0x20); /* ICW2 was 0x20: IRQ 0 is vector 0x20; unmask IRQ 0 only */
        outb(0x21, 0xFE);
        ring3_handle(vector, R3_EOI_PIC, 0, 0);
    } else {
        route_pin(pin, vector, 0);
        ring3_handle(vector, R3_SAMPLE_ISR | R3_EOI_LAPIC, pin, 0);
    }
    outb(0x43, 0x34); /* channel 0, lobyte/hibyte, mode 2 */
    outb(0x40, (PIT_HZ / 100) & 0xFF);
    outb(0x40, (PIT_HZ / 100) >> 8);
    report_rate("lm-pit", vector, 50);
    if (cmdline_has("pic")) {
        outb(0x20, 0x0B); /* OCW3: read ISR */
        puts("lm-pit pic in service after eoi ");
        print_dec(inb(0x20) & 1);
        putc('\n');
        outb(0x21, 0xFF);
    } else {
        route_pin(pin, vector, 1u << 16);
    }
    poweroff();
}

#define RTC_VECTOR 0x38
#define RTC_PIN 8

void test_lm_rtc(const struct mb_info *mbi)
{
    (void)mbi;
    controllers_init();
    route_pin(RTC_PIN, RTC_VECTOR, 0);
    ring3_handle(RTC_VECTOR, R3_READ_RTC_C | R3_SAMPLE_ISR | R3_EOI_LAPIC, RTC_PIN, 0);
    outb(0x70, 0x0A);
    outb(0x71, 0x2A); /* 32.768 kHz time base, rate 10: 64 Hz */
    outb(0x70, 0x0B);
    u8 b = inb(0x71);
    outb(0x70, 0x0B);
    outb(0x71, b | 0x40); /* PIE */
    outb(0x70, 0x0C);
    (void)inb(0x71);
    report_rate("lm-rtc", RTC_VECTOR, 32);
    puts("lm-rtc register c ");
    print_hex(ring3_rtc_c, 2);
    putc('\n');
    poweroff();
}

#define LAPIC_TIMER_VECTOR 0x40

void test_lm_lapic(const struct mb_info *mbi)
{
    (void)mbi;
    controllers_init();
    ring3_handle(LAPIC_TIMER_VECTOR, R3_SAMPLE_ISR | R3_EOI_LAPIC, 0, 0);
    mmio_write32(LAPIC + 0x3E0, 0x3); /* divide by 16 */
    mmio_write32(LAPIC + 0x320, (1u << 17) | LAPIC_TIMER_VECTOR); /* periodic */
    mmio_write32(LAPIC + 0x380, 625000u);
    report_rate("lm-lapic", LAPIC_TIMER_VECTOR, 20);
    mmio_write32(LAPIC + 0x380, 0);
    poweroff();
}

#define HPET_VECTOR 0x41
#define HPET_PIN 20

void test_lm_hpet(const struct mb_info *mbi)
{
    (void)mbi;
    controllers_init();
    u32 period_fs = mmio_read32(HPET + 4);
    u32 ten_ms = 10u * (1000000000u / (period_fs / 1000u));
    if (!(mmio_read32(HPET + 0x100 + 4) & (1u << HPET_PIN)))
        fail("lm-hpet: timer 0 cannot route to pin 20");
    route_pin(HPET_PIN, HPET_VECTOR, 0);
    ring3_handle(HPET_VECTOR, R3_SAMPLE_ISR | R3_EOI_LAPIC, HPET_PIN, 0);
    mmio_write32(HPET + 0x10, 0); /* halt the main counter while programming */
    mmio_write32(HPET + 0xF0, 0);
    mmio_write32(HPET + 0xF4, 0);
    /* periodic, enabled, edge, pin 20; VAL_SET: the next write sets comparator and period */
    mmio_write32(HPET + 0x100, (HPET_PIN << 9) | (1u << 6) | (1u << 3) | (1u << 2));
    mmio_write32(HPET + 0x108, ten_ms);
    mmio_write32(HPET + 0x10, 1);
    report_rate("lm-hpet", HPET_VECTOR, 20);
    mmio_write32(HPET + 0x10, 0);
    poweroff();
}

#define SMI_CMD 0xB2
#define ACPI_ENABLE 0xA0
#define PM1A_STS 0x400
#define PM1A_EN 0x402
#define PWRBTN 0x100
#define SCI_PIN 9
#define SCI_VECTOR 0x59
#define LEVEL_DELIVERIES 3u
#define RTE_REMOTE_IRR (1u << 14)

static void report(const char *what, u32 value)
{
    puts(what);
    putc(' ');
    print_dec(value);
    putc('\n');
}

void test_lm_level(const struct mb_info *mbi)
{
    (void)mbi;
    controllers_init();
    route_pin(SCI_PIN, SCI_VECTOR, 1u << 15); /* level, active high */
    /* The handler leaves PWRBTN_STS set: the line stays high through each EOI. The third
     * run masks the pin before its EOI, so the repeats stop. */
    ring3_handle(SCI_VECTOR, R3_SAMPLE_RTE | R3_SAMPLE_ISR | R3_MASK_PIN | R3_EOI_LAPIC, SCI_PIN,
                 LEVEL_DELIVERIES);
    outb(SMI_CMD, ACPI_ENABLE);
    outw(PM1A_EN, PWRBTN);
    println("ready");
    u32 got = ring3_wait(SCI_VECTOR, LEVEL_DELIVERIES, 30000);
    report("lm-level deliveries", got);
    report("lm-level remote irr in the handler", !!(ring3_rte_seen[SCI_VECTOR] & RTE_REMOTE_IRR));
    report("lm-level in service in the handler", ring3_isr_seen[SCI_VECTOR]);
    u32 rte = ioapic_read(0x10 + 2 * SCI_PIN);
    report("lm-level masked", !!(rte & (1u << 16)));
    report("lm-level remote irr after eoi", !!(rte & RTE_REMOTE_IRR));
    report("lm-level line still high", !!(inw(PM1A_STS) & PWRBTN));
    poweroff();
}
