/* Long mode with a ring-3 waiting loop: the only way a protected/long-mode guest takes
 * interrupts on the build machines' KVM (DESIGN.md: delivery works at CPL3, not at CPL0).
 *
 * ring3_cpu_init(cr3)  from 32-bit protected mode (paging off): loads ring3_gdt, turns on
 *                      IA-32e paging (CR4.PAE, CR3, EFER.LME, CR0.PG), loads ring3_idt and the
 *                      64-bit TSS. The caller keeps running its 32-bit code at CPL0 in
 *                      compatibility mode.
 * ring3_run(body, sp)  calls body() at CPL3 in compatibility mode (32-bit C code, the
 *                      identity map has U/S set at every level), RFLAGS.IF=1; the TSS's I/O
 *                      bitmap lets ring 3 use in/out. body must end by calling ring3_leave();
 *                      ring3_run then returns at CPL0.
 * Interrupts taken in ring 3 enter ring3_common at CPL0 in 64-bit mode on the TSS's RSP0
 * stack: it counts per vector, does what ring3_action[vector] asks (EOIs, reads) and
 * `iretq`s back. An exception (vectors 0-31) leaves ring 3 like the leave vector, with
 * ring3_fault_* filled in for ring3_run's caller to report. */

#define SEL_CODE32 0x08
#define SEL_DATA32 0x10
#define SEL_CODE64 0x18
#define SEL_USER_CODE32 0x23
#define SEL_USER_DATA 0x2B
#define SEL_TSS 0x30
#define PM_TIMER 0x408
#define LAPIC 0xFEE00000
#define IOAPIC 0xFEC00000
/* IOPL 3 | IF | the always-one bit 1 */
#define USER_RFLAGS 0x3202

/* ring3_action bits, as in ring3.h */
#define A_EOI_LAPIC 1
#define A_EOI_PIC 2
#define A_READ_RTC_C 4
#define A_SAMPLE_ISR 8
#define A_SAMPLE_RTE 16
#define A_MASK_PIN 32

    .text
    .code32
    .globl ring3_cpu_init
ring3_cpu_init:
    movl 4(%esp), %ecx                  /* cr3 */
    lgdt ring3_gdt_descriptor
    ljmp $SEL_CODE32, $1f
1:  movw $SEL_DATA32, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax                     /* PAE */
    movl %eax, %cr4
    movl %ecx, %cr3
    movl $0xC0000080, %ecx              /* EFER: LME on, NXE stays off (no NX bits used) */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax               /* PG: IA-32e mode, compatibility submode */
    movl %eax, %cr0
    lidt ring3_idt_descriptor
    movw $SEL_TSS, %ax
    ltr %ax
    ret

/* Called by the ring-3 body when it is done. This host's KVM answers `int n` in ring 3 with
 * #UD, so the way back to ring 0 is a #UD at this known address. */
    .globl ring3_leave
ring3_leave:
    ud2

    .globl ring3_run
ring3_run:
    pushl %ebp
    pushl %ebx
    pushl %esi
    pushl %edi
    movl 20(%esp), %esi                 /* body */
    movl 24(%esp), %edi                 /* ring-3 stack pointer */
    movl %esp, ring3_saved_esp
    ljmp $SEL_CODE64, $to_user64

    .code64
to_user64:
    /* A mode switch leaves the upper halves of the registers undefined. */
    movl %esi, %esi
    movl %edi, %edi
    /* IRET to an outer ring nulls data segment registers whose DPL is below the new CPL;
     * a compatibility-mode ring 3 needs a usable DS/ES, so give it the DPL 3 one. */
    movw $SEL_USER_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    pushq $SEL_USER_DATA                /* SS */
    pushq %rdi                          /* RSP */
    pushq $USER_RFLAGS
    pushq $SEL_USER_CODE32              /* CS: 32-bit code, DPL 3 */
    pushq %rsi                          /* RIP */
    iretq

/* One 16-byte stub per vector, so IDT entry v points at ring3_stubs + 16 * v. Each leaves
 * the same frame: vector, error code (0 where the CPU pushes none), then the CPU's. */
    .p2align 4
    .globl ring3_stubs
ring3_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp ring3_common
    .set vec, vec + 1
    .endr

/* Stack: r8 rcx rdx rbx rax | vector, error, RIP, CS, RFLAGS, RSP, SS.
 * The image is 32-bit ELF, which has no sign-extended 32-bit relocation, so 64-bit code
 * reaches symbols through `movl $symbol, %reg` (zero-extended) and a register base. */
#define AT(symbol) movl $symbol, %r8d
ring3_common:
    pushq %rax
    pushq %rbx
    pushq %rdx
    pushq %rcx
    pushq %r8
    movl 40(%rsp), %ecx
    cmpl $32, %ecx
    jb exception
    AT(ring3_count)
    incl (%r8, %rcx, 4)
    movl (%r8, %rcx, 4), %ebx           /* the count, for the first-run check */
    movl $PM_TIMER, %edx
    inl %dx, %eax
    AT(ring3_last_pm)
    movl %eax, (%r8, %rcx, 4)
    cmpl $1, %ebx
    jne 1f
    AT(ring3_first_pm)
    movl %eax, (%r8, %rcx, 4)
1:  AT(ring3_action)
    movl (%r8, %rcx, 4), %ebx

    testl $A_SAMPLE_ISR, %ebx
    jz 1f
    movl %ecx, %eax                     /* ISR word: LAPIC + 0x100 + 0x10 * (vector / 32) */
    shrl $5, %eax
    shll $4, %eax
    addl $(LAPIC + 0x100), %eax
    movl (%rax), %eax
    btl %ecx, %eax                      /* bit vector % 32 */
    setc %al
    movzbl %al, %eax
    AT(ring3_isr_seen)
    movl %eax, (%r8, %rcx, 4)
1:
    testl $A_SAMPLE_RTE, %ebx
    jz 1f
    AT(ring3_pin)
    movl (%r8, %rcx, 4), %eax
    leal 0x10(, %rax, 2), %eax
    movl $IOAPIC, %edx
    movl %eax, (%rdx)
    movl 0x10(%rdx), %eax
    AT(ring3_rte_seen)
    movl %eax, (%r8, %rcx, 4)
1:
    testl $A_READ_RTC_C, %ebx
    jz 1f
    movb $0x0C, %al
    outb %al, $0x70
    inb $0x71, %al
    movzbl %al, %eax
    AT(ring3_rtc_c)
    movl %eax, (%r8)
1:
    testl $A_MASK_PIN, %ebx
    jz 1f
    AT(ring3_count)
    movl (%r8, %rcx, 4), %eax
    AT(ring3_mask_after)
    cmpl (%r8, %rcx, 4), %eax
    jb 1f
    AT(ring3_pin)
    movl (%r8, %rcx, 4), %eax
    leal 0x10(, %rax, 2), %eax
    movl $IOAPIC, %edx
    movl %eax, (%rdx)
    movl 0x10(%rdx), %eax
    orl $0x10000, %eax
    movl %eax, 0x10(%rdx)
1:
    testl $A_EOI_PIC, %ebx
    jz 1f
    movb $0x20, %al
    outb %al, $0xA0
    outb %al, $0x20
1:
    testl $A_EOI_LAPIC, %ebx
    jz 1f
    movl $(LAPIC + 0xB0), %eax
    movl $0, (%rax)
1:
    popq %r8
    popq %rcx
    popq %rdx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

exception:
    /* The #UD of ring3_leave's ud2 is the way out, not a fault. */
    cmpl $6, %ecx
    jne fault
    movl $ring3_leave, %eax
    cmpl %eax, 56(%rsp)
    je leave
fault:
    AT(ring3_fault_vector)
    movl %ecx, (%r8)
    movl 48(%rsp), %eax
    AT(ring3_fault_error)
    movl %eax, (%r8)
    movl 56(%rsp), %eax
    AT(ring3_fault_rip)
    movl %eax, (%r8)
    movl 64(%rsp), %eax
    AT(ring3_fault_cs)
    movl %eax, (%r8)
    movl 72(%rsp), %eax
    AT(ring3_fault_rflags)
    movl %eax, (%r8)
    AT(ring3_faulted)
    movl $1, (%r8)
leave:
    /* Back to 32-bit code at CPL0; the interrupt left SS null, which compatibility mode
     * cannot use, so reload it before the first push. */
    pushq $SEL_CODE32
    movl $back32, %eax
    pushq %rax
    lretq

    .code32
back32:
    movw $SEL_DATA32, %ax
    movw %ax, %ss
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movl ring3_saved_esp, %esp
    popl %edi
    popl %esi
    popl %ebx
    popl %ebp
    ret

    .data
    .p2align 3
    .globl ring3_gdt
ring3_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x08: 32-bit code, DPL 0 */
    .quad 0x00cf92000000ffff            /* 0x10: data, DPL 0 */
    .quad 0x00af9a000000ffff            /* 0x18: 64-bit code, DPL 0 (interrupt gates) */
    .quad 0x00cffa000000ffff            /* 0x20: 32-bit code, DPL 3 */
    .quad 0x00cff2000000ffff            /* 0x28: data, DPL 3 */
    .quad 0, 0                          /* 0x30: 64-bit TSS, filled in by ring3.c */
ring3_gdt_end:
ring3_gdt_descriptor:
    .word ring3_gdt_end - ring3_gdt - 1
    .long ring3_gdt
ring3_idt_descriptor:
    .word 256 * 16 - 1
    .long ring3_idt
ring3_saved_esp:
    .long 0

    .section .note.GNU-stack, "", @progbits
