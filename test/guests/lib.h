/* Freestanding runtime for the multiboot test guests: port I/O, COM1,
 * printing, command-line parsing and the ways a guest can end. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u

/* Multiboot v1 information structure (only the fields we use are named). */
struct mb_info {
    u32 flags;
    u32 mem_lower;
    u32 mem_upper;
    u32 boot_device;
    u32 cmdline;
    u32 mods_count;
    u32 mods_addr;
    u32 syms[4];
    u32 mmap_length;
    u32 mmap_addr;
} __attribute__((packed));

#define MB_INFO_MEM (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)
#define MB_INFO_MMAP (1u << 6)

/* One memory map entry; `size` does not count itself. */
struct mb_mmap_entry {
    u32 size;
    u64 addr;
    u64 len;
    u32 type;
} __attribute__((packed));

#define MB_MMAP_RAM 1

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u32 mmio_read32(u32 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u32 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* COM1 */
void serial_init(void);
void putc(char c);
void puts(const char *s);          /* no newline added */
void println(const char *s);       /* adds "\n" */
int serial_can_read(void);
char getc(void);                   /* polls until a byte arrives */

/* Number printing: fixed-width zero-padded lowercase hex, and decimal. */
void print_hex(u64 v, int digits);
void print_dec(u32 v);
void print_dec_pad(u32 v, int digits);

/* Command line: whitespace-separated words. */
void cmdline_init(const struct mb_info *mbi, u32 magic);
int cmdline_words(void);
const char *cmdline_word(int i);   /* NUL-terminated copy, or "" */
int cmdline_has(const char *word);
/* The word after `word`, or "" when absent. */
const char *cmdline_after(const char *word);
int streq(const char *a, const char *b);

/* Ends. None prints anything; none returns. The cmdline word "qemu" moves
 * poweroff() to QEMU's PIIX4 PM1a control port (0x604, S5 = type 0). */
void poweroff(void) __attribute__((noreturn));
void reset(void) __attribute__((noreturn));
void reset_kbd(void) __attribute__((noreturn));
void halt(void) __attribute__((noreturn));
void triple_fault(void) __attribute__((noreturn));

/* Print "FAIL <why>" and power off. */
void fail(const char *why) __attribute__((noreturn));

void *memcpy(void *dst, const void *src, u32 n);
void *memset(void *dst, int c, u32 n);

/* PCI configuration mechanism #1 on bus 0, for the device drivers. */
#define PCI_CONFIG_ADDRESS 0xCF8
#define PCI_CONFIG_DATA 0xCFC
static inline u32 cfg_addr(u32 slot, u32 off) { return 0x80000000u | (slot << 11) | (off & 0xFC); }
static inline u32 cfg_read32(u32 slot, u32 off) { outl(PCI_CONFIG_ADDRESS, cfg_addr(slot, off)); return inl(PCI_CONFIG_DATA); }
static inline u8 cfg_read8(u32 slot, u32 off) { outl(PCI_CONFIG_ADDRESS, cfg_addr(slot, off)); return inb(PCI_CONFIG_DATA + (off & 3)); }
static inline void cfg_write16(u32 slot, u32 off, u16 v) { outl(PCI_CONFIG_ADDRESS, cfg_addr(slot, off)); outw(PCI_CONFIG_DATA + (off & 2), v); }
static inline void cfg_write32(u32 slot, u32 off, u32 v) { outl(PCI_CONFIG_ADDRESS, cfg_addr(slot, off)); outl(PCI_CONFIG_DATA, v); }

static inline void mmio_write16(u32 a, u16 v) { *(volatile u16 *)a = v; }
static inline u16 mmio_read16(u32 a) { return *(volatile u16 *)a; }
static inline void mmio_write8(u32 a, u8 v) { *(volatile u8 *)a = v; }
static inline u8 mmio_read8(u32 a) { return *(volatile u8 *)a; }

/* Whether `vector` is pending in this CPU's LAPIC IRR: how these guests, which run with
 * interrupts off, prove that an interrupt was raised and routed. */
#define LAPIC 0xFEE00000u
static inline int irr_pending(u32 vector)
{
    return (mmio_read32(LAPIC + 0x200 + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

#endif
