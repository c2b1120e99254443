/* Real-mode code for the application processor of `reset-api` (reset.c).
 *
 * The BSP copies [reset_ap_start, reset_ap_end) to RESET_AP_BASE and starts the AP there
 * with INIT + SIPI. The AP prints "cpu1 up" on COM1, sets its ready flag and then counts
 * for ever in its counter, so that a machine reset which leaves the AP running shows as a
 * counter that still moves after the reset. */

#define RESET_AP_BASE 0x9000
#define LOW(label) (RESET_AP_BASE + (label - reset_ap_start))

    .section .rodata
    .code16
    .globl reset_ap_start, reset_ap_end, reset_ap_ready_offset, reset_ap_count_offset
reset_ap_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw $LOW(message), %si
next_char:
    movb (%si), %bl
    testb %bl, %bl
    jz done
    movw $0x3FD, %dx        /* COM1 line status */
wait_thr:
    inb %dx, %al
    testb $0x20, %al
    jz wait_thr
    movw $0x3F8, %dx
    movb %bl, %al
    outb %al, %dx
    incw %si
    jmp next_char
done:
    movl $1, LOW(ready)
count:
    incl LOW(counter)
    pause
    jmp count
message:
    .asciz "cpu1 up\n"
    .align 4
ready:
    .long 0
counter:
    .long 0
reset_ap_end:

    .align 4
reset_ap_ready_offset:
    .long ready - reset_ap_start
reset_ap_count_offset:
    .long counter - reset_ap_start

    .section .note.GNU-stack, "", @progbits
