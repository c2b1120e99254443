/* Proves RAM above 4 GiB exists where the multiboot memory map says:
 * paging gives a 2 MiB window that can point anywhere in physical
 * memory, and patterns written through it must read back intact. */
#include "tests.h"

#define FOUR_GIB 0x100000000ull
#define THREE_GIB 0xC0000000ull
#define PAGE_SIZE 4096u
#define LARGE_PAGE (2u << 20)
#define PTE_PRESENT 0x001u
#define PTE_WRITABLE 0x002u
#define PDE_LARGE 0x080u
#define CR0_PG 0x80000000u
#define CR4_PAE 0x00000020u
#define MSR_EFER 0xC0000080u
#define EFER_LME 0x00000100u
/* Virtual 1 GiB: PDPT slot 1, first 2 MiB page. Low 1 GiB stays identity. */
#define WINDOW_VIRT 0x40000000u
#define WORDS_PER_PAGE 16
#define MAX_MMAP_ENTRIES 64

/* 4-level tables: the build machines' KVM emulates CPL0 code and stops
 * (shutdown) on legacy 32-bit PAE paging, while IA-32e paging works. So the
 * guest turns on long mode but keeps running its 32-bit code segment
 * (compatibility mode): the same 2 MiB PAE-format entries, one level up. */
static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 identity_pd[512] __attribute__((aligned(4096)));
static u64 window_pd[512] __attribute__((aligned(4096)));

static void load_cr3(void)
{
    __asm__ volatile("movl %0, %%cr3" : : "r"((u32)pml4) : "memory");
}

static void enable_paging(void)
{
    for (u32 i = 0; i < 512; i++)
        identity_pd[i] = ((u64)i * LARGE_PAGE) | PTE_PRESENT | PTE_WRITABLE | PDE_LARGE;
    pdpt[0] = (u32)identity_pd | PTE_PRESENT | PTE_WRITABLE;
    pdpt[1] = (u32)window_pd | PTE_PRESENT | PTE_WRITABLE;
    pml4[0] = (u32)pdpt | PTE_PRESENT | PTE_WRITABLE;
    u32 cr0, cr4, efer_lo, efer_hi;
    __asm__ volatile("movl %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("movl %0, %%cr4" : : "r"(cr4 | CR4_PAE));
    load_cr3();
    __asm__ volatile("rdmsr" : "=a"(efer_lo), "=d"(efer_hi) : "c"(MSR_EFER));
    __asm__ volatile("wrmsr" : : "a"(efer_lo | EFER_LME), "d"(efer_hi), "c"(MSR_EFER));
    __asm__ volatile("movl %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("movl %0, %%cr0" : : "r"(cr0 | CR0_PG) : "memory");
}

/* Points the window at `phys` and returns the virtual address for it. */
static volatile u32 *window_to(u64 phys)
{
    window_pd[0] = (phys & ~(u64)(LARGE_PAGE - 1)) | PTE_PRESENT | PTE_WRITABLE | PDE_LARGE;
    load_cr3(); /* flushes the old window translation */
    return (volatile u32 *)(WINDOW_VIRT + (u32)(phys & (LARGE_PAGE - 1)));
}

static u32 pattern(u32 page, u32 word)
{
    return 0x9E3779B9u * (page * WORDS_PER_PAGE + word + 1);
}

static void report_mismatch(u64 addr, u32 wrote, u32 read)
{
    puts("highmem FAIL at ");
    print_hex(addr, 16);
    puts(" wrote ");
    print_hex(wrote, 8);
    puts(" read ");
    print_hex(read, 8);
    putc('\n');
    poweroff();
}

/* The first RAM range that reaches above 4 GiB, clipped to start at 4 GiB. */
static int find_high_ram(const struct mb_info *mbi, u64 *start, u64 *end)
{
    if (!(mbi->flags & MB_INFO_MMAP))
        fail("highmem: no memory map in the multiboot info");
    u32 p = mbi->mmap_addr;
    u32 limit = mbi->mmap_addr + mbi->mmap_length;
    for (int n = 0; p + sizeof(struct mb_mmap_entry) <= limit && n < MAX_MMAP_ENTRIES; n++) {
        const struct mb_mmap_entry *e = (const struct mb_mmap_entry *)p;
        puts("mmap ");
        print_hex(e->addr, 16);
        putc('-');
        print_hex(e->addr + e->len, 16);
        puts(" type ");
        print_dec(e->type);
        putc('\n');
        u64 e_end = e->addr + e->len;
        if (e->type == MB_MMAP_RAM && e_end > FOUR_GIB && !*end) {
            *start = e->addr > FOUR_GIB ? e->addr : FOUR_GIB;
            *end = e_end;
        }
        if (e->size < sizeof(struct mb_mmap_entry) - 4)
            fail("highmem: memory map entry too small");
        p += e->size + 4;
    }
    return *end != 0;
}

void test_highmem(const struct mb_info *mbi)
{
    u64 start = 0, end = 0;
    if (!find_high_ram(mbi, &start, &end))
        fail("highmem: no RAM above 4 GiB in the memory map");
    puts("highmem ram ");
    print_hex(start, 16);
    putc('-');
    print_hex(end, 16);
    putc('\n');
    /* Page-align inward so all three pages lie wholly inside the range. */
    start = (start + PAGE_SIZE - 1) & ~(u64)(PAGE_SIZE - 1);
    end &= ~(u64)(PAGE_SIZE - 1);
    if (end - start < 3 * PAGE_SIZE)
        fail("highmem: high RAM smaller than three pages");
    u64 pages[3] = {
        start,
        start + (((end - start) / 2) & ~(u64)(PAGE_SIZE - 1)),
        end - PAGE_SIZE,
    };

    enable_paging();
    for (u32 i = 0; i < 3; i++) {
        volatile u32 *w = window_to(pages[i]);
        for (u32 j = 0; j < WORDS_PER_PAGE; j++)
            w[j * (PAGE_SIZE / 4 / WORDS_PER_PAGE)] = pattern(i, j);
    }
    /* Read back only after all writes, so pages aliasing each other or
     * low memory show up as a mismatch. */
    for (u32 i = 0; i < 3; i++) {
        volatile u32 *w = window_to(pages[i]);
        for (u32 j = 0; j < WORDS_PER_PAGE; j++) {
            u32 got = w[j * (PAGE_SIZE / 4 / WORDS_PER_PAGE)];
            if (got != pattern(i, j))
                report_mismatch(pages[i] + j * (PAGE_SIZE / WORDS_PER_PAGE), pattern(i, j), got);
        }
        /* The same offset below 4 GiB must not have changed with it. */
        u64 low_alias = pages[i] & 0xFFFFFFFFull;
        if (low_alias < THREE_GIB) {
            u32 low = *window_to(low_alias);
            if (low == pattern(i, 0))
                report_mismatch(low_alias, pattern(i, 0), low);
        }
        puts("highmem page ");
        print_hex(pages[i], 16);
        println(" ok");
    }
    println("highmem ok");
    poweroff();
}
