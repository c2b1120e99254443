/* The LAPIC timer's periodic interrupt, taken in real mode.
 *
 * The caller programs the LAPIC (software enable, LVT timer periodic with
 * vector 0x40, divider, initial count) in protected mode with interrupts off.
 * realmode_lapic(unused, ticks, result) then drops to real mode as realmode.S
 * does, with the 8259s masked, and takes vector 0x40 (IVT entry 0x40) with
 * STI;HLT until the handler has run `ticks` times after the first. The
 * handler's EOI goes to 0xFEE000B0 through fs, loaded with a flat 4 GiB
 * segment before leaving protected mode; real mode keeps that limit.
 * result[0] = PM timer at the first tick, result[1] = at the last,
 * result[2] = handler runs. */

#include "realmode_common.inc"

#define LAPIC_VECTOR_IVT (0x40 * 4)
#define LAPIC_EOI 0xFEE000B0

    RM_FUNCTION realmode_lapic
    RM_DROP_TO_REAL

    RM_BACK_IN_PM
    RM_PM_RETURN

    RM_ENTER_REAL unreal_fs=1           /* fs reaches the LAPIC's EOI register */
    movw $LOW(rm_lapic_timer), LAPIC_VECTOR_IVT
    movw $0, LAPIC_VECTOR_IVT + 2
    /* the 8259s stay out of the way: everything masked */
    movb $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    RM_TIME_TICKS
    RM_RETURN_TO_PM

rm_lapic_timer:
    pushl %ebx
    incl %cs:LOW(rm_ticks)
    movl $LAPIC_EOI, %ebx
    movl $0, %fs:(%ebx)
    popl %ebx
    iret

    RM_REAL_DATA
rm_end:

    .section .note.GNU-stack, "", @progbits
