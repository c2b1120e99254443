/* x2apic: the LAPIC through its MSRs (run with -x). Enables x2APIC mode in IA32_APIC_BASE,
 * reads the APIC ID (MSR 0x802) and version (0x803), then arms the TSC-deadline timer
 * (LVT timer mode 2, MSR 0x6E0) and waits with interrupts off until its vector is pending in
 * the IRR, read back through MSRs 0x820-0x827. Prints each step; the host checks the lines. */
#include "tests.h"

#define MSR_APIC_BASE 0x1Bu
#define MSR_TSC_DEADLINE 0x6E0u
#define X2APIC_MSR(reg) (0x800u + ((reg) >> 4))
#define APIC_BASE_ENABLE (1u << 11)
#define APIC_BASE_X2APIC (1u << 10)
#define TIMER_VECTOR 0x61u
#define LVT_TSC_DEADLINE (2u << 17)

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "a"((u32)v), "d"((u32)(v >> 32)), "c"(msr));
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static u32 cpuid1_ecx(void)
{
    u32 a = 1, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return c;
}

static int x2apic_irr_pending(u32 vector)
{
    return (rdmsr(X2APIC_MSR(0x200 + 0x10 * (vector / 32))) >> (vector % 32)) & 1;
}

void test_x2apic(const struct mb_info *mbi)
{
    (void)mbi;
    u32 ecx = cpuid1_ecx();
    if (!(ecx & (1u << 21)))
        fail("x2apic not in cpuid");
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
    if (!(rdmsr(MSR_APIC_BASE) & APIC_BASE_X2APIC))
        fail("x2apic mode did not stick");
    puts("x2apic id ");
    print_hex((u32)rdmsr(X2APIC_MSR(0x020)), 8);
    puts(" version ");
    print_hex((u32)rdmsr(X2APIC_MSR(0x030)) & 0xFF, 2);
    putc('\n');

    if (!(ecx & (1u << 24))) {
        println("x2apic tsc-deadline not advertised");
        poweroff();
    }
    wrmsr(X2APIC_MSR(0x0F0), 0x1FF); /* SVR: software enabled */
    wrmsr(X2APIC_MSR(0x320), LVT_TSC_DEADLINE | TIMER_VECTOR);
    wrmsr(MSR_TSC_DEADLINE, rdtsc() + 200000);
    u32 polls = 0;
    while (!x2apic_irr_pending(TIMER_VECTOR)) {
        if (++polls > 2000000u)
            fail("tsc-deadline timer never fired");
        cpu_relax();
    }
    println("x2apic tsc-deadline irr pending");
    if (rdmsr(MSR_TSC_DEADLINE) != 0)
        fail("tsc-deadline not cleared after firing");
    println("x2apic ok");
    poweroff();
}
