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

#define RM_BASE 0x6000
#define LOW(label) (RM_BASE + (label - rm_start))
#define RM_STACK 0x5ff0
#define PM_TIMER 0x408
#define RTC_VECTOR_IVT (0x70 * 4)

#define SEL_CODE32 0x08
#define SEL_DATA32 0x10
#define SEL_CODE16 0x18
#define SEL_DATA16 0x20

    .text
    .code32
    .globl realmode_rtc
realmode_rtc:
    pushal
    movl $rm_start, %esi
    movl $RM_BASE, %edi
    movl $(rm_end - rm_start), %ecx
    cld
    rep movsb
    movl 36(%esp), %eax                 /* reg_a */
    movb %al, LOW(rm_reg_a)
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
    movzbl LOW(rm_last_c), %eax
    movl %eax, 12(%edi)
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
    movw $LOW(rm_irq8), RTC_VECTOR_IVT
    movw $0, RTC_VECTOR_IVT + 2
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
    movb $0xfe, %al                     /* slave: IRQ 8 only */
    outb %al, $0xa1
    movb $0xfb, %al                     /* master: the cascade only */
    outb %al, $0x21
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
    movb $0x0b, %al                     /* PIE off */
    outb %al, $0x70
    inb $0x71, %al
    andb $~0x40, %al
    outb %al, $0x71
    movb $0xff, %al                     /* mask the PICs again */
    outb %al, $0x21
    outb %al, $0xa1
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $back_in_pm

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

    .align 4
rm_idt:
    .word 0x3ff
    .long 0
rm_reg_a:
    .byte 0
rm_last_c:
    .byte 0
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
