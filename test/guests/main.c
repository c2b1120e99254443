/* One guest image; the first command-line word naming a test selects it.
 * Other words are ignored, so a loader that prepends the kernel path (as
 * QEMU does) still works. */
#include "lib.h"
#include "tests.h"

static void announce_exit(const char *how)
{
    puts("exit ");
    println(how);
}

static void test_poweroff(const struct mb_info *mbi)
{
    (void)mbi;
    announce_exit("poweroff");
    poweroff();
}

static void test_reset(const struct mb_info *mbi)
{
    (void)mbi;
    announce_exit("reset");
    reset();
}

static void test_reset_kbd(const struct mb_info *mbi)
{
    (void)mbi;
    announce_exit("reset-kbd");
    reset_kbd();
}

static void test_halt(const struct mb_info *mbi)
{
    (void)mbi;
    announce_exit("halt");
    halt();
}

static void test_triplefault(const struct mb_info *mbi)
{
    (void)mbi;
    announce_exit("triplefault");
    triple_fault();
}

static void test_hello(const struct mb_info *mbi)
{
    (void)mbi;
    println("hello from guest");
    poweroff();
}

static void test_ports(const struct mb_info *mbi)
{
    (void)mbi;
    u32 v = inl(0x1234);
    puts("port 0x1234 = ");
    print_hex(v, 8);
    putc('\n');
    poweroff();
}

static void test_wait_input(const struct mb_info *mbi)
{
    (void)mbi;
    println("ready");
    char c = getc();
    puts("got ");
    putc(c);
    putc('\n');
    poweroff();
}

/* ACPI fixed hardware as the FADT describes it. */
#define SMI_CMD 0xB2
#define ACPI_ENABLE 0xA0
#define PM1A_STS 0x400
#define PM1A_EN 0x402
#define PM1A_CNT 0x404
#define PWRBTN 0x100
#define SCI_EN 0x1

/* Enables ACPI and the power button, then waits for the VMM to press it (SIGTERM). */
static void test_powerbutton(const struct mb_info *mbi)
{
    (void)mbi;
    outb(SMI_CMD, ACPI_ENABLE);
    if (!(inw(PM1A_CNT) & SCI_EN))
        fail("powerbutton: SCI_EN not set after ACPI enable");
    outw(PM1A_EN, PWRBTN);
    println("ready");
    while (!(inw(PM1A_STS) & PWRBTN))
        ;
    outw(PM1A_STS, PWRBTN); /* write 1 to clear */
    if (inw(PM1A_STS) & PWRBTN)
        fail("powerbutton: PWRBTN_STS did not clear");
    println("power button pressed");
    poweroff();
}

/* Enables ACPI but not the power button event, so a pressed button is never seen; then waits
 * for one byte of input, as wait-input. */
static void test_acpi_wait(const struct mb_info *mbi)
{
    outb(SMI_CMD, ACPI_ENABLE);
    if (!(inw(PM1A_CNT) & SCI_EN))
        fail("acpi-wait: SCI_EN not set after ACPI enable");
    test_wait_input(mbi);
}

/* Prints numbered lines for ever: a console whose reader stops reading fills up. */
static void test_flood(const struct mb_info *mbi)
{
    (void)mbi;
    println("ready");
    for (u32 n = 0;; n++) {
        puts("flood ");
        print_hex(n, 8);
        putc('\n');
    }
}

/* Prints IA32_APIC_BASE: `-x` must have set the x2APIC enable bit (10). */
static void test_apicbase(const struct mb_info *mbi)
{
    (void)mbi;
    u64 base = rdmsr(0x1b);
    puts("apicbase ");
    print_hex((u32)base, 8);
    putc('\n');
    poweroff();
}

/* Reads an MSR no processor has: #GP (a triple fault here, no IDT) unless `-w`. */
static void test_unknown_msr(const struct mb_info *mbi)
{
    (void)mbi;
    println("reading msr 0x2badc0de");
    u64 v = rdmsr(0x2badc0de);
    puts("msr 0x2badc0de = ");
    print_hex((u32)v, 8);
    putc('\n');
    poweroff();
}

#define HPET 0xFED00000u
#define IOAPIC 0xFEC00000u
#define HPET_VECTOR 0x40
#define HPET_PIN 20

static u32 hpet_counter(void) { return mmio_read32(HPET + 0xF0); }

/* The HPET counts, and its timer 0 raises IOAPIC pin 20, which KVM's IOAPIC turns into vector
 * 0x40 pending in the LAPIC IRR. Interrupts stay off: this host delivers none in ring 0. */
static void test_hpet(const struct mb_info *mbi)
{
    (void)mbi;
    u32 caps = mmio_read32(HPET);
    u32 period_fs = mmio_read32(HPET + 4);
    puts("hpet caps ");
    print_hex(caps, 8);
    puts(" period ");
    print_hex(period_fs, 8);
    putc('\n');
    if (!(mmio_read32(HPET + 0x100 + 4) & (1u << HPET_PIN)))
        fail("hpet: timer 0 cannot route to pin 20");
    mmio_write32(HPET + 0x10, 1); /* enable the main counter */
    u32 a = hpet_counter();
    for (volatile int i = 0; i < 1000; i++)
        ;
    u32 b = hpet_counter();
    if (b == a)
        fail("hpet: main counter does not count");
    println("hpet counts");

    mmio_write32(LAPIC + 0xF0, 0x1FF); /* LAPIC software enable, spurious vector 0xFF */
    mmio_write32(IOAPIC, 0x10 + 2 * HPET_PIN + 1);
    mmio_write32(IOAPIC + 0x10, 0); /* destination APIC 0 */
    mmio_write32(IOAPIC, 0x10 + 2 * HPET_PIN);
    mmio_write32(IOAPIC + 0x10, HPET_VECTOR); /* fixed, physical, edge, unmasked */

    u32 start = hpet_counter();
    u32 one_ms = 1000000000u / (period_fs / 1000u); /* ticks per ms */
    mmio_write32(HPET + 0x108, start + one_ms);
    mmio_write32(HPET + 0x10C, 0);
    mmio_write32(HPET + 0x100, (HPET_PIN << 9) | (1u << 2)); /* edge, enabled, pin 20 */
    for (;;) {
        if (mmio_read32(LAPIC + 0x200 + 0x10 * (HPET_VECTOR / 32)) & (1u << (HPET_VECTOR % 32)))
            break;
        if (hpet_counter() - start > 10000 * one_ms)
            fail("hpet: no interrupt pending within 10 s");
    }
    println("hpet irq 0x40 pending");
    poweroff();
}

static const struct {
    const char *name;
    void (*run)(const struct mb_info *mbi);
} tests[] = {
    { "hello", test_hello },
    { "poweroff", test_poweroff },
    { "reset", test_reset },
    { "reset-kbd", test_reset_kbd },
    { "reset-api", test_reset_api },
    { "halt", test_halt },
    { "triplefault", test_triplefault },
    { "ports", test_ports },
    { "wait-input", test_wait_input },
    { "pciscan", test_pciscan },
    { "rtc", test_rtc },
    { "highmem", test_highmem },
    { "smp", test_smp },
    { "powerbutton", test_powerbutton },
    { "acpi-wait", test_acpi_wait },
    { "flood", test_flood },
    { "apicbase", test_apicbase },
    { "hpet", test_hpet },
    { "unknown-msr", test_unknown_msr },
    { "virtio-rnd", test_virtio_rnd },
    { "rm-pit", test_rm_pit },
    { "routing", test_routing },
    { "rm-rtc", test_rm_rtc },
    { "pm-rate", test_pm_rate },
    { "rm-lapic", test_rm_lapic },
    { "rm-hpet", test_rm_hpet },
    { "rm-ipi", test_rm_ipi },
    { "exitbench", test_exitbench },
    { "virtio-blk", test_virtio_blk },
    { "ahci-hd", test_ahci },
    { "ahci-cd", test_ahci },
    { "virtio-net", test_virtio_net },
    { "lm-pit", test_lm_pit },
    { "lm-rtc", test_lm_rtc },
    { "lm-lapic", test_lm_lapic },
    { "lm-hpet", test_lm_hpet },
    { "lm-level", test_lm_level },
    { "lm-ipi", test_lm_ipi },
    { "lm-complete", test_lm_complete },
    { "vmcall", test_vmcall },
    { "blkbench", test_blkbench },
    { "x2apic", test_x2apic },
    { "usernet", test_usernet },
};

void main(u32 magic, const struct mb_info *mbi)
{
    serial_init();
    if (magic != MULTIBOOT_BOOTLOADER_MAGIC)
        fail("bad multiboot magic");
    cmdline_init(mbi, magic);
    for (int w = 0; w < cmdline_words(); w++)
        for (u32 t = 0; t < sizeof(tests) / sizeof(tests[0]); t++)
            if (streq(cmdline_word(w), tests[t].name)) {
                tests[t].run(mbi);
                poweroff();
            }
    fail("no test named on the command line");
}
