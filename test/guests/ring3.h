/* Taking interrupts in a long-mode guest: wait for them in ring 3 (longmode.S, ring3.c).
 *
 * This host delivers interrupts to a protected/long-mode guest only while it runs at CPL3
 * (DESIGN.md). ring3_wait() turns on long mode on first use (identity map of the low 4 GiB,
 * U/S at every level; IDT of 64-bit interrupt gates; 64-bit TSS), drops to ring 3 with IF=1
 * and IOPL=3, and spins there until a vector's handler has run often enough or a PM-timer
 * deadline passes. The handlers run at CPL0, count per vector, do what ring3_handle() asked
 * and iretq back to ring 3. The caller's code keeps running at CPL0 in compatibility mode
 * before and after, with interrupts off. */
#ifndef GUEST_RING3_H
#define GUEST_RING3_H
#include "lib.h"

/* What the handler of a vector does, in this order, besides counting. */
#define R3_SAMPLE_ISR 8   /* ring3_isr_seen[v] = the vector's LAPIC ISR bit, before any EOI */
#define R3_SAMPLE_RTE 16  /* ring3_rte_seen[v] = the pin's IOAPIC redirection entry (low) */
#define R3_READ_RTC_C 4   /* ring3_rtc_c = RTC register C (which re-arms the RTC's IRQ 8) */
#define R3_MASK_PIN 32    /* mask the IOAPIC pin once ring3_count[v] >= mask_after */
#define R3_EOI_PIC 2      /* non-specific EOI to the slave, then the master 8259 */
#define R3_EOI_LAPIC 1    /* LAPIC EOI */

extern volatile u32 ring3_count[256];
extern volatile u32 ring3_first_pm[256]; /* PM timer at the first handler run */
extern volatile u32 ring3_last_pm[256];  /* and at the latest */
extern volatile u32 ring3_isr_seen[256];
extern volatile u32 ring3_rte_seen[256];
extern volatile u32 ring3_rtc_c;

/* Sets what the handler of `vector` does; `pin` is its IOAPIC pin for R3_SAMPLE_RTE and
 * R3_MASK_PIN. Resets the vector's count. */
void ring3_handle(u32 vector, u32 actions, u32 pin, u32 mask_after);

/* Waits in ring 3, interrupts on, until ring3_count[vector] >= n or timeout_ms of PM timer
 * time pass; returns ring3_count[vector]. An exception in ring 3 prints a FAIL line. */
u32 ring3_wait(u32 vector, u32 n, u32 timeout_ms);

/* Microseconds between two PM timer readings less than 4.6 s apart. */
static inline u32 pm_us(u32 from, u32 to)
{
    /* 200/716 us per tick is 1/3.579545 within 0.02%, in 32 bits up to the 24-bit wrap */
    return ((to - from) & 0xffffff) * 200u / 716u;
}

/* The vector's bit in this CPU's LAPIC ISR. */
static inline int isr_set(u32 vector)
{
    return (mmio_read32(LAPIC + 0x100 + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

#endif
