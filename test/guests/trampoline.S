/* Real-mode start-up code for an application processor.
 *
 * The BSP copies [ap_trampoline, ap_trampoline_end) to AP_TRAMPOLINE_BASE
 * and sends SIPI vector AP_TRAMPOLINE_BASE >> 12, so the AP starts here at
 * CS:IP = 0x0800:0000. With DS = 0, every address below is
 * AP_TRAMPOLINE_BASE + (label - ap_trampoline).
 *
 * It prints "cpu1 up" on COM1, then sets ap_flag so the BSP (which stays
 * off COM1 until then) may continue, and halts with interrupts off. Real
 * mode is emulated on the build machines, so this stays short. */

#define AP_TRAMPOLINE_BASE 0x8000
#define LOW(label) (AP_TRAMPOLINE_BASE + (label - ap_trampoline))

    .section .rodata
    .code16
    .globl ap_trampoline, ap_trampoline_end, ap_flag_offset
ap_trampoline:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw $LOW(ap_message), %si
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
    movl $1, LOW(ap_flag)
park:
    cli
    hlt
    jmp park
ap_message:
    .asciz "cpu1 up\n"
    .align 4
ap_flag:
    .long 0
ap_trampoline_end:

    .align 4
ap_flag_offset:
    .long ap_flag - ap_trampoline

    .section .note.GNU-stack, "", @progbits
