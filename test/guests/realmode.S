/* A round trip through real mode, where this host delivers interrupts.
 *
 * realmode_pit(count, ticks, result) drops from 32-bit protected mode to real
 * mode, programs the 8259 pair (vectors 0x08/0x70, everything but IRQ 0
 * masked) and PIT channel 0 (mode 2, `count`), takes interrupts with STI;HLT
 * until the IRQ 0 handler (IVT entry 8) has run `ticks` times after the first,
 * then returns to protected mode. result[0] = PM timer at the first tick,
 * result[1] = PM timer at the last, result[2] = handler runs.
 *
 * The real-mode part runs copied to RM_BASE (below 64 KiB, clear of the AP
 * trampoline at 0x8000); every address in it is RM_BASE + (label - rm_start). */

#define RM_BASE 0x6000
#define LOW(label) (RM_BASE + (label - rm_start))
#define RM_STACK 0x5ff0
#define PM_TIMER 0x408

#define SEL_CODE32 0x08
#define SEL_DATA32 0x10
#define SEL_CODE16 0x18
#define SEL_DATA16 0x20

    .text
    .code32
    .globl realmode_pit
realmode_pit:
    pushal
    /* copy the real-mode part low */
    movl $rm_start, %esi
    movl $RM_BASE, %edi
    movl $(rm_end - rm_start), %ecx
    cld
    rep movsb
    movl 36(%esp), %eax                 /* count */
    movw %ax, LOW(rm_count)
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
    movw $LOW(rm_irq0), 0x20            /* IVT entry 8: offset */
    movw $0, 0x22                       /*              segment */
    movl $0, LOW(rm_ticks)
    /* 8259 pair: ICW1-ICW4, then masks */
    movb $0x11, %al
    outb %al, $0x20
    outb %al, $0xa0
    movb $0x08, %al
    outb %al, $0x21
    movb $0x70, %al
    outb %al, $0xa1
    movb $0x04, %al
    outb %al, $0x21
    movb $0x02, %al
    outb %al, $0xa1
    movb $0x01, %al
    outb %al, $0x21
    outb %al, $0xa1
    movb $0xff, %al
    outb %al, $0xa1
    movb $0xfe, %al
    outb %al, $0x21
    /* PIT channel 0: lobyte/hibyte, mode 2 */
    movb $0x34, %al
    outb %al, $0x43
    movw LOW(rm_count), %ax
    outb %al, $0x40
    movb %ah, %al
    outb %al, $0x40
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
    movb $0xff, %al                     /* mask the PIC again */
    outb %al, $0x21
    /* back to protected mode (GDTR still holds our GDT) */
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $back_in_pm

rm_irq0:
    pushw %ax
    incl %cs:LOW(rm_ticks)
    movb $0x20, %al                     /* non-specific EOI */
    outb %al, $0x20
    popw %ax
    iret

    .align 4
rm_idt:
    .word 0x3ff
    .long 0
rm_count:
    .word 0
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
