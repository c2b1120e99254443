/*
 * Start-up benchmark guest (multiboot v1, 32-bit protected mode, ring 0).
 *
 * It writes one byte to COM1 as its very first action, so the harness can time
 * "process start -> first guest byte". Then it waits without exiting, so the
 * harness can measure the VMM's memory, until a byte arrives on COM1 (the harness
 * writes to the VMM's stdin). Then it powers off the xhyve way (PM1a_CNT at 0x404,
 * SLP_TYP=5|SLP_EN) and halts with interrupts off, which also stops QEMU's vCPU.
 *
 * Ring-0 code is emulated instruction by instruction on the build hosts, so the
 * wait loop is short: one LSR read (a VM exit) and a PAUSE per iteration.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000000
        .set COM1, 0x3F8
        .set COM1_LSR, COM1 + 5
        .set LSR_DATA_READY, 0x01
        .set PM1A_CNT, 0x404
        .set SLP_S5_EN, 0x3400

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .text
        .code32
        .globl start
start:
        cli
        movw $COM1, %dx
        movb $'X', %al
        outb %al, %dx

        movw $COM1_LSR, %dx
wait_for_input:
        pause
        inb %dx, %al
        testb $LSR_DATA_READY, %al
        jz wait_for_input

        movw $PM1A_CNT, %dx
        movw $SLP_S5_EN, %ax
        outw %ax, %dx
halt:
        cli
        hlt
        jmp halt
