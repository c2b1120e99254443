/* The C half of ring3.h: the tables long mode needs, and the ring-3 waiting loop. */
#include "ring3.h"

#define PM_TIMER 0x408
#define PM_TICKS_PER_MS 3580u
#define PG_PRESENT 0x001u
#define PG_WRITABLE 0x002u
#define PG_USER 0x004u
#define PG_LARGE 0x080u
#define LARGE_PAGE (2u << 20)
/* Every level must allow user access, or ring 3's first fetch is a page fault. */
#define PG_TABLE (PG_PRESENT | PG_WRITABLE | PG_USER)
#define SEL_CODE64 0x18
#define GATE_INTERRUPT_DPL0 0x8E
#define TSS_AVAILABLE_64 0x89

volatile u32 ring3_count[256];
volatile u32 ring3_first_pm[256];
volatile u32 ring3_last_pm[256];
volatile u32 ring3_isr_seen[256];
volatile u32 ring3_rte_seen[256];
volatile u32 ring3_rtc_c;
u32 ring3_action[256];
u32 ring3_pin[256];
u32 ring3_mask_after[256];
volatile u32 ring3_faulted, ring3_fault_vector, ring3_fault_error, ring3_fault_rip, ring3_fault_cs,
    ring3_fault_rflags;

extern u64 ring3_gdt[];
extern u8 ring3_stubs[];
void ring3_cpu_init(u32 cr3);
void ring3_run(void (*body)(void), u32 stack_pointer);
void ring3_leave(void) __attribute__((noreturn));

/* Identity map of the low 4 GiB in 2 MiB pages: RAM, the PCI hole, IOAPIC, HPET, LAPIC. */
static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[4][512] __attribute__((aligned(4096)));
u64 ring3_idt[512] __attribute__((aligned(4096)));
static u8 interrupt_stack[4096] __attribute__((aligned(16)));
static u8 user_stack[8192] __attribute__((aligned(16)));

/* The 64-bit TSS: only RSP0 matters (the stack for interrupts taken in ring 3). */
static struct {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
    /* All zero: every port allowed. This host's KVM drops IOPL 3 from the iretq frame
     * (ring 3 runs with IOPL 0), so in/out in ring 3 rely on this bitmap. The byte after
     * it must be all ones. */
    u8 iomap[8192];
    u8 iomap_end;
} __attribute__((packed, aligned(16))) tss;

static int initialized;

static void build_tables(void)
{
    for (u32 g = 0; g < 4; g++) {
        for (u32 i = 0; i < 512; i++)
            pd[g][i] = ((u64)g << 30) + (u64)i * LARGE_PAGE + (PG_TABLE | PG_LARGE);
        pdpt[g] = (u32)pd[g] | PG_TABLE;
    }
    pml4[0] = (u32)pdpt | PG_TABLE;

    for (u32 v = 0; v < 256; v++) {
        u32 target = (u32)ring3_stubs + 16 * v;
        u32 type = GATE_INTERRUPT_DPL0;
        ring3_idt[2 * v] = (target & 0xFFFFu) | ((u64)SEL_CODE64 << 16) | ((u64)type << 40) |
                           ((u64)(target >> 16) << 48);
        ring3_idt[2 * v + 1] = 0; /* offset bits 63:32 */
    }

    tss.rsp[0] = (u32)interrupt_stack + sizeof(interrupt_stack);
    tss.iomap_base = (u32)tss.iomap - (u32)&tss;
    tss.iomap_end = 0xFF;
    u32 base = (u32)&tss, limit = sizeof(tss) - 1;
    ring3_gdt[6] = (limit & 0xFFFFu) | ((u64)(base & 0xFFFFFFu) << 16) |
                   ((u64)TSS_AVAILABLE_64 << 40) | ((u64)(base >> 24) << 56);
    ring3_gdt[7] = 0; /* base bits 63:32 */
}

void ring3_handle(u32 vector, u32 actions, u32 pin, u32 mask_after)
{
    ring3_action[vector & 0xFF] = actions;
    ring3_pin[vector & 0xFF] = pin;
    ring3_mask_after[vector & 0xFF] = mask_after;
    ring3_count[vector & 0xFF] = 0;
}

static volatile u32 wait_vector, wait_n, wait_timeout_ticks;

/* Runs at CPL3 (compatibility mode, IOPL 3): spins with interrupts on. */
static void wait_in_ring3(void)
{
    u32 last = inl(PM_TIMER) & 0xffffff, elapsed = 0;
    while (ring3_count[wait_vector] < wait_n && elapsed < wait_timeout_ticks) {
        for (int i = 0; i < 100; i++)
            cpu_relax();
        u32 now = inl(PM_TIMER) & 0xffffff;
        elapsed += (now - last) & 0xffffff;
        last = now;
    }
    ring3_leave();
}

u32 ring3_wait(u32 vector, u32 n, u32 timeout_ms)
{
    if (!initialized) {
        build_tables();
        ring3_cpu_init((u32)pml4);
        initialized = 1;
    }
    wait_vector = vector & 0xFF;
    wait_n = n;
    wait_timeout_ticks = timeout_ms * PM_TICKS_PER_MS;
    /* As if called: the body's prologue expects a return address slot above 16 alignment. */
    ring3_run(wait_in_ring3, (u32)user_stack + sizeof(user_stack) - 4);
    if (ring3_faulted) {
        puts("FAIL ring3: exception ");
        print_dec(ring3_fault_vector);
        puts(" error ");
        print_hex(ring3_fault_error, 8);
        puts(" at ");
        print_hex(ring3_fault_cs, 4);
        putc(':');
        print_hex(ring3_fault_rip, 8);
        puts(" rflags ");
        print_hex(ring3_fault_rflags, 8);
        putc('\n');
        poweroff();
    }
    return ring3_count[vector & 0xFF];
}
