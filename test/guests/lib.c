#include "lib.h"

#define COM1 0x3F8
#define UART_RBR 0
#define UART_THR 0
#define UART_IER 1
#define UART_DLL 0
#define UART_DLM 1
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20

/* xhyve's PM1a control register, and S5 as its DSDT defines it. QEMU's
 * PIIX4 has the register at 0x604 and its DSDT's S5 sleep type is 0. */
#define PM1A_CNT_XHYVE 0x404
#define PM1A_CNT_QEMU 0x604
#define SLP_TYP_S5_XHYVE (5u << 10)
#define SLP_TYP_S5_QEMU (0u << 10)
#define SLP_EN (1u << 13)

static u16 pm1a_cnt_port = PM1A_CNT_XHYVE;
static u16 pm1a_s5_value = SLP_TYP_S5_XHYVE | SLP_EN;

void *memcpy(void *dst, const void *src, u32 n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memset(void *dst, int c, u32 n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void serial_init(void)
{
    outb(COM1 + UART_IER, 0x00);
    outb(COM1 + UART_LCR, 0x80);
    outb(COM1 + UART_DLL, 0x01); /* 115200 baud */
    outb(COM1 + UART_DLM, 0x00);
    outb(COM1 + UART_LCR, 0x03); /* 8N1, divisor latch off */
    outb(COM1 + UART_MCR, 0x03);
}

void putc(char c)
{
    /* Bounded so a UART that never reports THR empty still lets the guest
     * reach its exit, which the host test can then diagnose. */
    for (u32 spins = 0; spins < 100000; spins++) {
        if (inb(COM1 + UART_LSR) & LSR_THR_EMPTY)
            break;
    }
    outb(COM1 + UART_THR, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

void println(const char *s)
{
    puts(s);
    putc('\n');
}

int serial_can_read(void)
{
    return inb(COM1 + UART_LSR) & LSR_DATA_READY;
}

char getc(void)
{
    while (!serial_can_read())
        cpu_relax();
    return (char)inb(COM1 + UART_RBR);
}

void print_hex(u64 v, int digits)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = digits - 1; i >= 0; i--)
        putc(hex[(v >> (i * 4)) & 0xF]);
}

void print_dec(u32 v)
{
    char buf[10];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(buf[--n]);
}

void print_dec_pad(u32 v, int digits)
{
    char buf[10];
    for (int i = digits - 1; i >= 0; i--) {
        buf[i] = (char)('0' + v % 10);
        v /= 10;
    }
    for (int i = 0; i < digits; i++)
        putc(buf[i]);
}

/* Command line, split once into words. */
#define MAX_WORDS 16
#define MAX_WORD_LEN 64
static char words[MAX_WORDS][MAX_WORD_LEN];
static int word_count;

int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

void cmdline_init(const struct mb_info *mbi, u32 magic)
{
    word_count = 0;
    if (magic != MULTIBOOT_BOOTLOADER_MAGIC || !(mbi->flags & MB_INFO_CMDLINE) || !mbi->cmdline)
        return;
    const char *p = (const char *)mbi->cmdline;
    /* Bounded: a loader that forgets the terminator must not hang us. */
    for (u32 scanned = 0; *p && scanned < 4096 && word_count < MAX_WORDS; scanned++) {
        if (*p == ' ' || *p == '\t' || *p == '\n') {
            p++;
            continue;
        }
        int len = 0;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n' && scanned < 4096) {
            if (len < MAX_WORD_LEN - 1)
                words[word_count][len++] = *p;
            p++;
            scanned++;
        }
        words[word_count][len] = 0;
        word_count++;
    }
    if (cmdline_has("qemu")) {
        pm1a_cnt_port = PM1A_CNT_QEMU;
        pm1a_s5_value = SLP_TYP_S5_QEMU | SLP_EN;
    }
}

int cmdline_words(void)
{
    return word_count;
}

const char *cmdline_word(int i)
{
    return (i >= 0 && i < word_count) ? words[i] : "";
}

int cmdline_has(const char *word)
{
    for (int i = 0; i < word_count; i++)
        if (streq(words[i], word))
            return 1;
    return 0;
}

const char *cmdline_after(const char *word)
{
    for (int i = 0; i + 1 < word_count; i++)
        if (streq(words[i], word))
            return words[i + 1];
    return "";
}

void halt(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void poweroff(void)
{
    outw(pm1a_cnt_port, pm1a_s5_value);
    halt();
}

void reset(void)
{
    /* Reset control register: system reset (bit 1) + CPU reset (bit 2). */
    outb(0xCF9, 0x06);
    halt();
}

void reset_kbd(void)
{
    /* 8042 command 0xFE pulses the CPU reset line. */
    outb(0x64, 0xFE);
    halt();
}

void triple_fault(void)
{
    /* An empty IDT makes the next exception unhandleable: #UD -> #DF ->
     * shutdown. */
    static const struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) empty_idt = { 0, 0 };
    __asm__ volatile("lidt %0; ud2" : : "m"(empty_idt));
    halt();
}

void fail(const char *why)
{
    puts("FAIL ");
    println(why);
    poweroff();
}
