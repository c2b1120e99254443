/* A round trip through real mode, where this host delivers interrupts.
 *
 * realmode_pit(count, ticks, result) drops from 32-bit protected mode to real
 * mode, programs the 8259 pair (vectors 0x08/0x70, everything but IRQ 0
 * masked) and PIT channel 0 (mode 2, `count`), takes interrupts with STI;HLT
 * until the IRQ 0 handler (IVT entry 8) has run `ticks` times after the first,
 * then returns to protected mode. result[0] = PM timer at the first tick,
 * result[1] = PM timer at the last, result[2] = handler runs.
 *
 * The round trip itself is in realmode_common.inc. */

#include "realmode_common.inc"

    RM_FUNCTION realmode_pit
    movl RM_ARG0, %eax                  /* count */
    movw %ax, LOW(rm_count)
    RM_DROP_TO_REAL

    RM_BACK_IN_PM
    RM_PM_RETURN

    RM_ENTER_REAL
    movw $LOW(rm_irq0), 0x20            /* IVT entry 8: offset */
    movw $0, 0x22                       /*              segment */
    RM_PIC_INIT 0xff, 0xfe
    /* PIT channel 0: lobyte/hibyte, mode 2 */
    movb $0x34, %al
    outb %al, $0x43
    movw LOW(rm_count), %ax
    outb %al, $0x40
    movb %ah, %al
    outb %al, $0x40
    RM_TIME_TICKS
    movb $0xff, %al                     /* mask the PIC again */
    outb %al, $0x21
    RM_RETURN_TO_PM

rm_irq0:
    pushw %ax
    incl %cs:LOW(rm_ticks)
    movb $0x20, %al                     /* non-specific EOI */
    outb %al, $0x20
    popw %ax
    iret

rm_count:
    .word 0
    RM_REAL_DATA
rm_end:

    .section .note.GNU-stack, "", @progbits
