/* The RTC's periodic interrupt, taken in real mode.
 *
 * realmode_rtc(reg_a, ticks, result) drops to real mode as realmode.S does,
 * programs the 8259 pair (vectors 0x08/0x70; only the cascade IRQ 2 on the
 * master and IRQ 8 on the slave unmasked), sets RTC register A to `reg_a` and
 * PIE in register B, then takes IRQ 8 (IVT entry 0x70) with STI;HLT until the
 * handler has run `ticks` times after the first. The handler reads register C,
 * without which the RTC raises no further interrupt, and sends EOI to both
 * 8259s. result[0] = PM timer at the first tick, result[1] = at the last,
 * result[2] = handler runs, result[3] = the last register C value read. */

#include "realmode_common.inc"

#define RTC_VECTOR_IVT (0x70 * 4)

    RM_FUNCTION realmode_rtc
    movl RM_ARG0, %eax                  /* reg_a */
    movb %al, LOW(rm_reg_a)
    RM_DROP_TO_REAL

    RM_BACK_IN_PM
    movzbl LOW(rm_last_c), %eax
    movl %eax, 12(%edi)
    RM_PM_RETURN

    RM_ENTER_REAL
    movw $LOW(rm_irq8), RTC_VECTOR_IVT
    movw $0, RTC_VECTOR_IVT + 2
    RM_PIC_INIT 0xfe, 0xfb              /* slave: IRQ 8 only; master: the cascade only */
    /* RTC: rate in A, stale flags cleared from C, then PIE in B */
    movb $0x0a, %al
    outb %al, $0x70
    movb LOW(rm_reg_a), %al
    outb %al, $0x71
    movb $0x0c, %al
    outb %al, $0x70
    inb $0x71, %al
    movb $0x0b, %al
    outb %al, $0x70
    inb $0x71, %al
    orb $0x40, %al
    outb %al, $0x71
    RM_TIME_TICKS
    movb $0x0b, %al                     /* PIE off */
    outb %al, $0x70
    inb $0x71, %al
    andb $~0x40, %al
    outb %al, $0x71
    movb $0xff, %al                     /* mask the PICs again */
    outb %al, $0x21
    outb %al, $0xa1
    RM_RETURN_TO_PM

rm_irq8:
    pushw %ax
    movb $0x0c, %al                     /* acknowledge: read register C */
    outb %al, $0x70
    inb $0x71, %al
    movb %al, %cs:LOW(rm_last_c)
    incl %cs:LOW(rm_ticks)
    movb $0x20, %al                     /* non-specific EOI, slave then master */
    outb %al, $0xa0
    outb %al, $0x20
    popw %ax
    iret

rm_reg_a:
    .byte 0
rm_last_c:
    .byte 0
    RM_REAL_DATA
rm_end:

    .section .note.GNU-stack, "", @progbits
