/* The AP side of the real-mode IPI test.
 *
 * Copied to IPI_AP_BASE and started there by INIT/SIPI, the AP loads fs with
 * a flat 4 GiB segment through a brief stay in protected mode, returns to
 * real mode ("unreal": fs keeps its limit, so the LAPIC at 0xFEE00000 stays
 * in reach), software-enables its LAPIC, installs an IVT handler for vector
 * IPI_VECTOR, reports ready and waits with STI;HLT. The handler counts and
 * sends EOI: without the EOI a second IPI of the same vector would stay
 * pending in the IRR, so several handler runs prove EOI works too. */

#include "mode_switch.inc"

#define IPI_AP_BASE 0x7000
#define A(label) (IPI_AP_BASE + (label - ipi_ap_start))
#define AP_STACK 0x7ff0
#define IPI_VECTOR 0x42
#define LAPIC_SVR 0xFEE000F0
#define LAPIC_EOI 0xFEE000B0
/* The ISR word that holds IPI_VECTOR's bit */
#define LAPIC_ISR_IPI (0xFEE00100 + 0x10 * (IPI_VECTOR / 32))

    .section .rodata
    .globl ipi_ap_start, ipi_ap_end, ipi_ap_ready_offset, ipi_ap_count_offset
    .globl ipi_ap_isr_offset
    .align 4
ipi_ap_ready_offset:
    .long ap_ready - ipi_ap_start
ipi_ap_count_offset:
    .long ap_count - ipi_ap_start
ipi_ap_isr_offset:
    .long ap_isr - ipi_ap_start

    .code16
ipi_ap_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $AP_STACK, %sp
    lgdtl A(ap_gdt_descriptor)
    CR0_PE_ON
    ljmp $0x08, $A(ap_pm16)
ap_pm16:
    movw $0x10, %ax
    movw %ax, %fs
    CR0_PE_OFF
    ljmp $0, $A(ap_real)
ap_real:
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movl $LAPIC_SVR, %ebx
    movl $0x1ff, %fs:(%ebx)
    movw $A(ap_ipi_handler), IPI_VECTOR * 4
    movw $0, IPI_VECTOR * 4 + 2
    movl $1, A(ap_ready)
    sti
ap_wait:
    hlt
    jmp ap_wait

ap_ipi_handler:
    pushl %ebx
    incl %cs:A(ap_count)
    pushl %eax
    movl $LAPIC_ISR_IPI, %ebx           /* the vector must be in service now */
    movl %fs:(%ebx), %eax
    movl %eax, %cs:A(ap_isr)
    popl %eax
    movl $LAPIC_EOI, %ebx
    movl $0, %fs:(%ebx)
    popl %ebx
    iret

    .align 8
ap_gdt:
    .quad 0
    .quad 0x00009a000000ffff            /* 0x08: 16-bit code, base 0, 64 KiB */
    .quad 0x00cf92000000ffff            /* 0x10: 32-bit data, flat 4 GiB */
ap_gdt_descriptor:
    .word ap_gdt_descriptor - ap_gdt - 1
    .long A(ap_gdt)
    .align 4
ap_ready:
    .long 0
ap_count:
    .long 0
ap_isr:
    .long 0
ipi_ap_end:

    .section .note.GNU-stack, "", @progbits
