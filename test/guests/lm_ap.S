/* cpu1's way into long mode for the lm-ipi test.
 *
 * The BSP copies [lm_ap_trampoline, lm_ap_trampoline_end) to LM_AP_BASE and sends SIPI
 * vector LM_AP_BASE >> 12. The copy turns on protected mode with ring3_gdt (already loaded
 * and filled by the BSP's ring3_init) and jumps to lm_ap_pm32, linked where the image is,
 * which calls lm_ap_main() on its own stack. */

#include "mode_switch.inc"

#define LM_AP_BASE 0x9000
#define LOW(label) (LM_AP_BASE + (label - lm_ap_trampoline))

    .section .rodata
    .code16
    .globl lm_ap_trampoline, lm_ap_trampoline_end
lm_ap_trampoline:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl LOW(gdt_descriptor)
    CR0_PE_ON
    ljmpl $SEL_CODE32, $lm_ap_pm32
    .p2align 2
gdt_descriptor:
    .word 10 * 8 - 1                    /* ring3_gdt: 6 descriptors and two 16-byte TSSs */
    .long ring3_gdt
lm_ap_trampoline_end:

    .text
    .code32
lm_ap_pm32:
    LOAD_FLAT_DATA_SEGMENTS
    movl $lm_ap_stack_top, %esp
    call lm_ap_main
1:  cli
    hlt
    jmp 1b

    .bss
    .p2align 4
    .skip 8192
lm_ap_stack_top:

    .section .note.GNU-stack, "", @progbits
