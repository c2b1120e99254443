/* Multiboot v1 entry: header, stack, zeroed bss, then main(magic, mbi). */

#define MB_MAGIC        0x1BADB002
/* bit 0: page-align modules, bit 1: want memory info,
 * bit 16: the address fields below are valid (a.out kludge). */
#define MB_FLAGS        0x00010003

    .section .multiboot, "a"
    .align 4
multiboot_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long multiboot_header      /* header_addr */
    .long __load_start          /* load_addr */
    .long __load_end            /* load_end_addr */
    .long __bss_end             /* bss_end_addr */
    .long _start                /* entry_addr */

    .text
    .code32
    .globl _start
_start:
    cli
    cld
    /* eax (magic) and ebx (MBI pointer) must survive zeroing bss, which
     * also holds the stack: keep them in edx and ebx until it is done. */
    movl %eax, %edx
    movl $__load_end, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl
    movl $stack_top, %esp
    pushl %ebx
    pushl %edx
    call main
    /* main never returns; if it does, stop this CPU for good. */
1:  cli
    hlt
    jmp 1b

    .bss
    .align 16
stack_bottom:
    .skip 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
