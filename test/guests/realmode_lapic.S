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

#define RM_BASE 0x6000
#define LOW(label) (RM_BASE + (label - rm_start))
#define RM_STACK 0x5ff0
#define PM_TIMER 0x408
#define LAPIC_VECTOR_IVT (0x40 * 4)
#define LAPIC_EOI 0xFEE000B0

#define SEL_CODE32 0x08
#define SEL_DATA32 0x10
#define SEL_CODE16 0x18
#define SEL_DATA16 0x20

    .text
    .code32
    .globl realmode_lapic
realmode_lapic:
    pushal
    movl $rm_start, %esi
    movl $RM_BASE, %edi
    movl $(rm_end - rm_start), %ecx
    cld
    rep movsb
    movl 40(%esp), %eax                 /* ticks */
    movl %eax, LOW(rm_ticks_wanted)
    movl %esp, saved_esp
    lgdt gdt_descriptor
    ljmp $SEL_CODE16, $LOW(rm16)

back_in_pm:
    movw $SEL_DATA32, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl saved_esp, %esp
    movl 44(%esp), %edi                 /* result */
    movl LOW(rm_pm_first), %eax
    movl %eax, 0(%edi)
    movl LOW(rm_pm_last), %eax
    movl %eax, 4(%edi)
    movl LOW(rm_ticks), %eax
    movl %eax, 8(%edi)
    popal
    ret

    .data
    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x08: 32-bit code, flat */
    .quad 0x00cf92000000ffff            /* 0x10: 32-bit data, flat */
    .quad 0x00009a000000ffff            /* 0x18: 16-bit code, base 0, 64 KiB */
    .quad 0x000092000000ffff            /* 0x20: 16-bit data, base 0, 64 KiB */
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt
saved_esp:
    .long 0

    .section .rodata
    .code16
rm_start:
rm16:
    movw $SEL_DATA16, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    /* fs keeps its flat 4 GiB limit in real mode ("unreal"), for the LAPIC's EOI */
    movw $SEL_DATA32, %ax
    movw %ax, %fs
    movl %cr0, %eax
    andl $~1, %eax
    movl %eax, %cr0
    ljmp $0, $LOW(rm_entry)
rm_entry:
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $RM_STACK, %sp
    lidt LOW(rm_idt)
    movw $LOW(rm_lapic_timer), LAPIC_VECTOR_IVT
    movw $0, LAPIC_VECTOR_IVT + 2
    movl $0, LOW(rm_ticks)
    /* the 8259s stay out of the way: everything masked */
    movb $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    sti
wait_first:
    hlt
    cmpl $0, LOW(rm_ticks)
    je wait_first
    movw $PM_TIMER, %dx
    inl %dx, %eax
    movl %eax, LOW(rm_pm_first)
    movl LOW(rm_ticks_wanted), %ebx
    incl %ebx
wait_rest:
    hlt
    cmpl %ebx, LOW(rm_ticks)
    jb wait_rest
    movw $PM_TIMER, %dx
    inl %dx, %eax
    movl %eax, LOW(rm_pm_last)
    cli
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $back_in_pm

rm_lapic_timer:
    pushl %ebx
    incl %cs:LOW(rm_ticks)
    movl $LAPIC_EOI, %ebx
    movl $0, %fs:(%ebx)
    popl %ebx
    iret

    .align 4
rm_idt:
    .word 0x3ff
    .long 0
    .align 4
rm_ticks_wanted:
    .long 0
rm_ticks:
    .long 0
rm_pm_first:
    .long 0
rm_pm_last:
    .long 0
rm_end:

    .section .note.GNU-stack, "", @progbits
