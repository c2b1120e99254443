/* lm-complete, the 64-bit half (lm_complete.c is the C half): runs at CPL0 in 64-bit mode,
 * with interrupts off, the instructions this host's KVM cannot emulate and xhyve completes
 * for it, and stores what they did in lm_complete_results (indices in lm_complete.c).
 *
 * lm_complete_run() is called from compatibility mode (after ring3_init()); it loads its own
 * IDT (vector 3: interrupt gate, 0x81: trap gate, 13: #GP), switches to 64-bit mode, runs the checks,
 * restores the previous IDT and returns to compatibility mode. */

#define SEL_CODE32 0x08
#define SEL_CODE64 0x18
/* The image is 32-bit ELF: 64-bit code reaches symbols through zero-extended immediates. */
#define AT(symbol, reg) movl $symbol, reg

    .text
    .code32
    .globl lm_complete_run
lm_complete_run:
    pushl %ebp
    pushl %ebx
    pushl %esi
    pushl %edi
    ljmp $SEL_CODE64, $checks64

    .code64
checks64:
    movl %esp, %esp
    AT(lm_complete_saved_idt, %r8d)
    sidt (%r8)
    AT(lm_complete_idt_descriptor, %r8d)
    lidt (%r8)
    AT(lm_complete_results, %r15d)

    /* int3 through an interrupt gate; int $0x81 through a trap gate. */
    int3
int3_return:
    movl $int3_return, %eax
    movq %rax, 16(%r15)
    int $0x81

    /* popcnt, lzcnt, tzcnt */
    movabsq $0xF0F0F0F0F0F0F0F1, %rax
    popcnt %rax, %rbx
    movq %rbx, 64(%r15)
    xorl %ecx, %ecx
    popcnt %rcx, %rbx
    pushfq
    popq %rax
    movq %rax, 72(%r15)
    movabsq $0x0000010000000000, %rax
    lzcnt %rax, %rbx
    movq %rbx, 80(%r15)
    tzcnt %rax, %rbx
    movq %rbx, 88(%r15)

    /* fwait with nothing pending */
    fninit
    fwait
    movq $1, 96(%r15)

    /* cmpxchg16b: a match stores RCX:RBX, a mismatch loads RDX:RAX */
    AT(lm_complete_cx16, %r8d)
    movq $1, (%r8)
    movq $2, 8(%r8)
    movl $1, %eax
    movl $2, %edx
    movl $3, %ebx
    movl $4, %ecx
    lock cmpxchg16b (%r8)
    pushfq
    popq %r9
    movq %r9, 128(%r15)
    movq (%r8), %r9
    movq %r9, 136(%r15)
    movq 8(%r8), %r9
    movq %r9, 144(%r15)
    movl $1, %eax
    movl $2, %edx
    lock cmpxchg16b (%r8)
    pushfq
    popq %r9
    movq %r9, 152(%r15)
    movq %rax, 160(%r15)
    movq %rdx, 168(%r15)

    /* stac, clac */
    stac
    pushfq
    popq %rax
    movq %rax, 184(%r15)
    clac
    pushfq
    popq %rax
    movq %rax, 192(%r15)

    /* lsl (Linux's NMI entry reads its CPU number so): the 4 GiB limit of the DPL-3 data
     * segment; a null selector clears ZF (set by the xor) and faults nothing. */
    movl $0x2b, %eax
    lsl %eax, %ebx
    movq %rbx, 200(%r15)
    xorl %eax, %eax
    lsl %eax, %ebx
    pushfq
    popq %rax
    movq %rax, 208(%r15)

    /* SSE and XSAVE on: CR0.EM off, MP on; CR4.OSFXSR, OSXMMEXCPT, OSXSAVE; XCR0 = x87|SSE */
    movq %cr0, %rax
    andq $~4, %rax
    orq $2, %rax
    movq %rax, %cr0
    movq %cr4, %rax
    orq $0x40600, %rax
    movq %rax, %cr4
    xorl %ecx, %ecx
    movl $3, %eax
    xorl %edx, %edx
    xsetbv

    /* ldmxcsr / stmxcsr: round toward zero, then back to the default */
    AT(lm_complete_mxcsr, %r8d)
    movl $0x7f80, (%r8)
    ldmxcsr (%r8)
    stmxcsr 4(%r8)
    movl 4(%r8), %eax
    movq %rax, 176(%r15)
    movl $0x1f80, (%r8)
    ldmxcsr (%r8)

    /* xsave, clobber xmm0, xrstor: xmm0 comes back */
    AT(lm_complete_xmm, %r8d)
    movdqu (%r8), %xmm0
    AT(lm_complete_xsave_area, %r8d)
    movl $3, %eax
    xorl %edx, %edx
    xsave64 (%r8)
    movq 512(%r8), %r9
    movq %r9, 104(%r15)
    AT(lm_complete_xmm, %r8d)
    movdqu 16(%r8), %xmm0
    AT(lm_complete_xsave_area, %r8d)
    movl $3, %eax
    xorl %edx, %edx
    xrstor64 (%r8)
    AT(lm_complete_xmm, %r8d)
    movdqu %xmm0, 32(%r8)
    movq 32(%r8), %r9
    movq %r9, 112(%r15)
    movq 40(%r8), %r9
    movq %r9, 120(%r15)

    /* xrstor of an image whose reserved header bytes (512 + 16..63) are not zero: #GP(0), at
     * the xrstor, delivered to the handler at vector 13, which resumes after it. */
    AT(lm_complete_gp_resume, %r8d)
    movl $gp_xrstor_done, %eax
    movq %rax, (%r8)
    AT(lm_complete_xsave_area, %r8d)
    movq $1, 528(%r8)
    movl $3, %eax
    xorl %edx, %edx
gp_xrstor:
    xrstor64 (%r8)
gp_xrstor_done:
    movq $0, 528(%r8)
    movq 272(%r15), %r9
    movq %r9, 224(%r15)
    movq 280(%r15), %r9
    movq %r9, 232(%r15)
    movl $gp_xrstor, %eax
    movq %rax, 240(%r15)

    /* int $0x90, beyond the IDT limit (0x82 vectors): #GP(0x90 * 8 + 2) at the int. */
    AT(lm_complete_gp_resume, %r8d)
    movl $gp_int_done, %eax
    movq %rax, (%r8)
gp_int:
    int $0x90
gp_int_done:
    movq 272(%r15), %r9
    movq %r9, 248(%r15)
    movq 280(%r15), %r9
    movq %r9, 256(%r15)
    movl $gp_int, %eax
    movq %rax, 264(%r15)

    AT(lm_complete_saved_idt, %r8d)
    lidt (%r8)
    pushq $SEL_CODE32
    movl $back32, %eax
    pushq %rax
    lretq

/* Vector 3: count, keep the frame's RIP and CS, RFLAGS inside, RSP at entry. */
    .globl lm_complete_int3_handler
lm_complete_int3_handler:
    pushq %r8
    pushq %rax
    AT(lm_complete_results, %r8d)
    incq 0(%r8)
    movq 16(%rsp), %rax
    movq %rax, 8(%r8)
    movq 24(%rsp), %rax
    movq %rax, 24(%r8)
    pushfq
    popq %rax
    movq %rax, 32(%r8)
    leaq 16(%rsp), %rax
    movq %rax, 40(%r8)
    popq %rax
    popq %r8
    iretq

/* Vector 0x81 (trap gate): count, RFLAGS inside. */
    .globl lm_complete_trap_handler
lm_complete_trap_handler:
    pushq %r8
    pushq %rax
    AT(lm_complete_results, %r8d)
    incq 48(%r8)
    pushfq
    popq %rax
    movq %rax, 56(%r8)
    popq %rax
    popq %r8
    iretq

/* Vector 13: count, keep the error code and the faulting RIP, resume at
 * lm_complete_gp_resume (the faulting instruction is skipped). */
    .globl lm_complete_gp_handler
lm_complete_gp_handler:
    pushq %r8
    pushq %rax
    AT(lm_complete_results, %r8d)
    incq 216(%r8)
    movq 16(%rsp), %rax
    movq %rax, 272(%r8)
    movq 24(%rsp), %rax
    movq %rax, 280(%r8)
    AT(lm_complete_gp_resume, %r8d)
    movq (%r8), %rax
    movq %rax, 24(%rsp)
    popq %rax
    popq %r8
    addq $8, %rsp
    iretq

    .code32
back32:
    popl %edi
    popl %esi
    popl %ebx
    popl %ebp
    ret
    .section .note.GNU-stack,"",@progbits
