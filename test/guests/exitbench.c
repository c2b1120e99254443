/* exitbench: the guest side of bench/exits.sh. It makes EXITBENCH_N
 * accesses of each kind, each one a VM exit that the VMM (or KVM's in-kernel
 * irqchip) must handle, and prints how long they took by the ACPI PM timer.
 * It runs at CPL 0, which the build machines emulate (DESIGN.md): there the
 * loop's own instructions add a fixed cost per exit to both modes. (Ring 3
 * would run natively: ring3.h shows how; this host drops IOPL 3 from the
 * iretq frame, so ring-3 port access needs the TSS I/O bitmap, which is what
 * made the earlier ring-3 attempt fault.)
 *   eoi        32-bit write of the LAPIC EOI register (MMIO)
 *   pit-read   inb from PIT channel 0 (port 0x40)
 *   pit-latch  outb of a counter-latch command to the PIT (port 0x43) */
#include "tests.h"

#define EXITBENCH_N 20000u
#define CHUNK 5000u
#define PM_TIMER 0x408
#define LAPIC_EOI 0xFEE000B0u

/* Microseconds between two PM timer readings less than 4.6 s apart. */
static u32 pm_elapsed_us(u32 from, u32 to)
{
    return ((to - from) & 0xffffff) * 200u / 716u;
}

static void report(const char *what, u32 us)
{
    puts("exitbench ");
    puts(what);
    putc(' ');
    print_dec(EXITBENCH_N);
    puts(" exits in ");
    print_dec(us);
    println(" us");
}

static void bench(void)
{
    u32 us = 0;
    for (u32 done = 0; done < EXITBENCH_N; done += CHUNK) {
        u32 t0 = inl(PM_TIMER);
        for (u32 i = 0; i < CHUNK; i++)
            mmio_write32(LAPIC_EOI, 0);
        us += pm_elapsed_us(t0, inl(PM_TIMER));
    }
    report("eoi", us);

    us = 0;
    for (u32 done = 0; done < EXITBENCH_N; done += CHUNK) {
        u32 t0 = inl(PM_TIMER);
        for (u32 i = 0; i < CHUNK; i++)
            (void)inb(0x40);
        us += pm_elapsed_us(t0, inl(PM_TIMER));
    }
    report("pit-read", us);

    us = 0;
    for (u32 done = 0; done < EXITBENCH_N; done += CHUNK) {
        u32 t0 = inl(PM_TIMER);
        for (u32 i = 0; i < CHUNK; i++)
            outb(0x43, 0x00);
        us += pm_elapsed_us(t0, inl(PM_TIMER));
    }
    report("pit-latch", us);
    poweroff();
}

void test_exitbench(const struct mb_info *mbi)
{
    (void)mbi;
    /* PIT channel 0 programmed, so that reads and latches touch a running counter. */
    outb(0x43, 0x34);
    outb(0x40, 0);
    outb(0x40, 0);
    bench();
}
