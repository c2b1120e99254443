/* blkbench: the guest side of bench/blk_guest.py. Command line:
 *   blkbench MODE COUNT [qd N] [ring0] [noflush]
 *   MODE  seqread | seqwrite : 64 KiB requests, sequential, wrapping at the end of the disk
 *         randread | randwrite : 4 KiB requests at random 4 KiB-aligned offsets
 *   COUNT requests to complete; qd N keeps N (1-32, default 32) in flight.
 *   noflush: do not negotiate FLUSH (QEMU then syncs every write: write-through).
 * It drives the first virtio-blk function (1af4:1001) through the legacy I/O interface, which
 * both xhyve and QEMU's transitional device offer, with interrupts suppressed
 * (VRING_AVAIL_F_NO_INTERRUPT): it polls the used ring and refills each completed slot at once.
 * Time comes from the ACPI PM timer, whose port it takes from the FADT (0x408 on xhyve with
 * -A, 0x608 on QEMU), so one image measures both VMMs.
 * The timed loop runs at CPL 3 (ring3.h), natively on the build machines; `ring0` runs it at
 * CPL 0, which these machines emulate at 1-2 M instructions/s (DESIGN.md): there a few dozen
 * instructions per request cap it near 25k/s. (Measured: ring 3 is slower still on this host,
 * ~16-17k/s, for reasons outside the guest; see bench/README.md.)
 * Set-up (PCI, FADT, descriptor chains, built once) stays at CPL 0. Prints
 *   blkbench MODE reqs N bytes B qd Q ticks T notifies K ring R
 * (T: PM timer ticks at 3579545 Hz; K: queue notifications written) and the host turns that
 * into MB/s and IOPS. */
#include "tests.h"
#include "ring3.h"
#include "virtio_common.h"

/* longmode.S and ring3.c, beyond ring3.h */
void ring3_run(void (*body)(void), u32 stack_pointer);
void ring3_leave(void) __attribute__((noreturn));
extern volatile u32 ring3_faulted, ring3_fault_vector, ring3_fault_rip;

/* Fixed guest-physical areas well above the image and its bss (which entry.S zeroes,
 * expensively under emulation); the benchmark runs with -m 256M. */
#define RING_BASE 0x01000000u   /* legacy split ring, up to 256 entries: 16 KiB */
#define RING_BYTES 0x4000u
#define HEADER_BASE 0x01004000u /* MAX_DEPTH request headers, 16 bytes each */
#define STATUS_BASE 0x01004800u /* MAX_DEPTH status bytes */
#define DATA_BASE 0x01100000u   /* MAX_DEPTH data buffers of SEQ_BYTES */

#define MAX_DEPTH 32u
#define MAX_QUEUE 256u
#define SEQ_BYTES 65536u
#define RAND_BYTES 4096u
#define PM_HZ 3579545u
/* Read the 24-bit PM timer at least this often (it wraps every 4.7 s). */
#define PM_EVERY_COMPLETIONS 128u
#define PM_EVERY_SPINS_RING0 0x10000u  /* emulated: ~0.1-0.5 s */
#define PM_EVERY_SPINS_RING3 0x400000u /* native: a few ms */

#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define F_FLUSH (1u << 9)

struct req_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

struct desc {
    u32 addr_lo, addr_hi, len;
    u16 flags, next;
};

static u16 io;
static u32 qsize;
static volatile struct desc *descs;
static volatile u16 *avail; /* flags, idx, ring[qsize] */
static volatile u16 *used;  /* flags, idx, then {u32 id, u32 len}[qsize] */

static u32 parse_u32(const char *s)
{
    u32 v = 0;
    if (!*s)
        fail("blkbench: usage: blkbench seqread|seqwrite|randread|randwrite COUNT [qd N]");
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            fail("blkbench: COUNT and qd must be decimal numbers");
        v = v * 10 + (u32)(*s - '0');
    }
    return v;
}

static int bytes_equal(const volatile u8 *a, const char *b, u32 n)
{
    for (u32 i = 0; i < n; i++)
        if (a[i] != (u8)b[i])
            return 0;
    return 1;
}

/* The PM timer port from the FADT: RSDP in 0xE0000-0xFFFFF, then the RSDT (or XSDT). */
static u16 pm_timer_port(void)
{
    u32 rsdp = 0;
    for (u32 p = 0xE0000; p < 0x100000; p += 16)
        if (bytes_equal((const volatile u8 *)p, "RSD PTR ", 8)) {
            rsdp = p;
            break;
        }
    if (!rsdp)
        fail("blkbench: no RSDP in 0xE0000-0xFFFFF");
    u32 root = mmio_read32(rsdp + 16);
    u32 entry_size = 4;
    if (!root && mmio_read8(rsdp + 15) >= 2) {
        root = mmio_read32(rsdp + 24); /* the XSDT; 32-bit guest, tables below 4 GiB */
        entry_size = 8;
    }
    if (!root)
        fail("blkbench: RSDP names no RSDT or XSDT");
    u32 len = mmio_read32(root + 4);
    for (u32 off = 36; off + entry_size <= len; off += entry_size) {
        u32 table = mmio_read32(root + off);
        if (bytes_equal((const volatile u8 *)table, "FACP", 4)) {
            u32 port = mmio_read32(table + 76); /* PM_TMR_BLK */
            if (!port || port > 0xFFFC)
                fail("blkbench: FADT has no PM timer port");
            return (u16)port;
        }
    }
    fail("blkbench: no FADT");
}

static int no_flush;

/* Resets the device, accepts FLUSH alone (or nothing, with `noflush`), and places queue 0 at
 * RING_BASE. */
static void legacy_start(u32 slot)
{
    cfg_write16(slot, 0x04, 0x0005); /* I/O space, bus master */
    io = (u16)(cfg_read32(slot, 0x10) & ~3u);
    u32 offered = virtio_legacy_begin(io);
    /* FLUSH, as every real driver: QEMU turns its write cache off (a host flush after every
     * write) for a driver that does not take it, and on for one that does, whatever its
     * cache= option; xhyve, like bhyve, keeps its open mode (O_SYNC with `,sync`) either way. */
    outl(io + VIO_GUEST_FEATURES, no_flush ? 0 : offered & F_FLUSH);
    outw(io + VIO_QUEUE_SEL, 0);
    qsize = inw(io + VIO_QUEUE_NUM);
    if (qsize < 3 * MAX_DEPTH || qsize > MAX_QUEUE || (qsize & (qsize - 1)))
        fail("blkbench: queue size must be a power of two from 96 to 256");
    memset((void *)RING_BASE, 0, RING_BYTES);
    descs = (volatile struct desc *)RING_BASE;
    avail = (volatile u16 *)(RING_BASE + 16 * qsize);
    u32 used_off = (16 * qsize + 6 + 2 * qsize + 4095) & ~4095u;
    used = (volatile u16 *)(RING_BASE + used_off);
    avail[0] = AVAIL_F_NO_INTERRUPT;
    outl(io + VIO_QUEUE_PFN, RING_BASE >> 12);
    outb(io + VIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
}

static u32 capacity_sectors(void)
{
    u32 lo = inl(io + VIO_CONFIG), hi = inl(io + VIO_CONFIG + 4);
    return hi ? 0xFFFFFFFFu : lo;
}

/* Slot s owns descriptors 3s (header), 3s+1 (data), 3s+2 (status): built once. */
static void build_chains(u32 depth, u32 type, u32 bytes)
{
    for (u32 s = 0; s < depth; s++) {
        volatile struct req_header *h = (volatile struct req_header *)(HEADER_BASE + 16 * s);
        h->type = type;
        h->reserved = 0;
        h->sector = 0;
        volatile struct desc *d = descs + 3 * s;
        d[0].addr_lo = HEADER_BASE + 16 * s;
        d[0].addr_hi = 0;
        d[0].len = 16;
        d[0].flags = DESC_F_NEXT;
        d[0].next = (u16)(3 * s + 1);
        d[1].addr_lo = DATA_BASE + SEQ_BYTES * s;
        d[1].addr_hi = 0;
        d[1].len = bytes;
        d[1].flags = DESC_F_NEXT | (type == T_IN ? DESC_F_WRITE : 0);
        d[1].next = (u16)(3 * s + 2);
        d[2].addr_lo = STATUS_BASE + s;
        d[2].addr_hi = 0;
        d[2].len = 1;
        d[2].flags = DESC_F_WRITE;
        d[2].next = 0;
    }
}

static u32 notifications;

static void notify(void)
{
    __asm__ volatile("" ::: "memory");
    if (!(used[0] & USED_F_NO_NOTIFY)) {
        outw(io + VIO_QUEUE_NOTIFY, 0);
        notifications++;
    }
}

/* One request with the whole queue to itself (every earlier one completed), waited for;
 * used for the closing flush. */
static u8 single_request(u32 type)
{
    volatile struct req_header *h = (volatile struct req_header *)HEADER_BASE;
    volatile u8 *status = (volatile u8 *)STATUS_BASE;
    u16 avail_idx = avail[1], used_seen = used[1];
    h->type = type;
    h->sector = 0;
    *status = 0xFF;
    descs[0].next = 2; /* header straight to status: no data */
    avail[2 + (avail_idx & (qsize - 1))] = 0;
    __asm__ volatile("" ::: "memory");
    avail[1] = avail_idx + 1;
    notify();
    while (used[1] == used_seen)
        cpu_relax();
    return *status;
}

/* What measure() runs, set at CPL 0 before it; shared with ring 3 through memory. */
static struct {
    u16 pm;
    u32 count, depth, step, blocks, random, pm_every_spins;
    u32 ticks; /* the result */
} job;

/* The timed submit/poll loop: the first `depth` requests, then each completion refills its
 * slot with the next request, one avail index update and (unless the device asked for none)
 * one notification per batch of completions. */
static void measure(void)
{
    volatile u8 *status = (volatile u8 *)STATUS_BASE;
    volatile u32 *sectors = (volatile u32 *)HEADER_BASE + 2; /* low word of header s: [4 s] */
    u32 mask = qsize - 1;
    u32 next_block = 0, lcg = 12345;
    u16 avail_idx = 0, used_seen = 0;
    u32 submitted = 0, completed = 0, ticks = 0, spins = 0, pm_at = 0;
    u32 count = job.count, depth = job.depth, step = job.step, blocks = job.blocks;
    u16 pm = job.pm;

    for (; submitted < depth && submitted < count; submitted++) {
        u32 block;
        if (job.random) {
            lcg = lcg * 1664525u + 1013904223u;
            block = (lcg >> 4) % blocks;
        } else {
            block = next_block;
            next_block = next_block + 1 == blocks ? 0 : next_block + 1;
        }
        sectors[4 * submitted] = block * step;
        status[submitted] = 0xFF;
        avail[2 + (avail_idx & mask)] = (u16)(3 * submitted);
        avail_idx++;
    }
    u32 last = inl(pm) & 0xFFFFFF;
    __asm__ volatile("" ::: "memory");
    avail[1] = avail_idx;
    notify();

    while (completed < count) {
        u16 now = used[1];
        if (now == used_seen) {
            cpu_relax();
            if (++spins == job.pm_every_spins) {
                u32 t = inl(pm) & 0xFFFFFF;
                ticks += (t - last) & 0xFFFFFF;
                last = t;
                spins = 0;
            }
            continue;
        }
        while (used_seen != now) {
            u32 head = *(volatile u32 *)((u32)used + 4 + 8 * (used_seen & mask));
            used_seen++;
            completed++;
            u32 s = head / 3;
            if (s >= depth || head != 3 * s)
                fail("blkbench: used ring names a chain that was not submitted");
            if (status[s] != 0)
                fail("blkbench: request failed");
            if (submitted < count) {
                u32 block;
                if (job.random) {
                    lcg = lcg * 1664525u + 1013904223u;
                    block = (lcg >> 4) % blocks;
                } else {
                    block = next_block;
                    next_block = next_block + 1 == blocks ? 0 : next_block + 1;
                }
                sectors[4 * s] = block * step;
                status[s] = 0xFF;
                avail[2 + (avail_idx & mask)] = (u16)head;
                avail_idx++;
                submitted++;
            }
        }
        __asm__ volatile("" ::: "memory");
        avail[1] = avail_idx;
        notify();
        if (completed - pm_at >= PM_EVERY_COMPLETIONS) {
            u32 t = inl(pm) & 0xFFFFFF;
            ticks += (t - last) & 0xFFFFFF;
            last = t;
            pm_at = completed;
            spins = 0;
        }
    }
    ticks += (inl(pm) - last) & 0xFFFFFF;
    job.ticks = ticks;
}

static u32 ring3_stack[2048] __attribute__((aligned(16)));

static void measure_then_leave(void)
{
    measure();
    ring3_leave();
}

/* Runs measure() at CPL 3, natively on the build machines (ring3.h): long mode is turned on
 * by a ring3_wait() that returns at once, then ring3_run() calls the loop. The 8259s are
 * masked first, so that a timer IRQ that SeaBIOS left running under QEMU cannot arrive
 * (vector 8 would read as an exception); the queue raises none (NO_INTERRUPT). */
static void run_in_ring3(void)
{
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    ring3_wait(0x20, 0, 0);
    ring3_run(measure_then_leave, (u32)(ring3_stack + 2048) - 4);
    u32 interrupts = 0;
    for (u32 v = 32; v < 256; v++)
        interrupts += ring3_count[v];
    puts("blkbench interrupts in ring 3 ");
    print_dec(interrupts);
    putc('\n');
    if (ring3_faulted) {
        puts("FAIL blkbench: exception ");
        print_dec(ring3_fault_vector);
        puts(" in ring 3 at ");
        print_hex(ring3_fault_rip, 8);
        putc('\n');
        poweroff();
    }
}

void test_blkbench(const struct mb_info *mbi)
{
    (void)mbi;
    const char *mode = cmdline_after("blkbench");
    u32 type, bytes, random;
    if (streq(mode, "seqread")) {
        type = T_IN, bytes = SEQ_BYTES, random = 0;
    } else if (streq(mode, "seqwrite")) {
        type = T_OUT, bytes = SEQ_BYTES, random = 0;
    } else if (streq(mode, "randread")) {
        type = T_IN, bytes = RAND_BYTES, random = 1;
    } else if (streq(mode, "randwrite")) {
        type = T_OUT, bytes = RAND_BYTES, random = 1;
    } else {
        fail("blkbench: MODE must be seqread, seqwrite, randread or randwrite");
    }
    u32 count = parse_u32(cmdline_after(mode));
    u32 depth = MAX_DEPTH;
    if (cmdline_has("qd"))
        depth = parse_u32(cmdline_after("qd"));
    if (!count || !depth || depth > MAX_DEPTH)
        fail("blkbench: COUNT must be positive and qd 1-32");

    u16 pm = pm_timer_port();
    no_flush = cmdline_has("noflush");
    legacy_start(virtio_find_device(0x10011AF4u, "blkbench: no virtio-blk 1af4:1001 on bus 0"));
    u32 capacity = capacity_sectors();
    u32 step = bytes / 512;
    if (capacity < step * depth)
        fail("blkbench: disk too small");
    u32 blocks = capacity / step; /* request-sized blocks on the disk */
    puts("blkbench queue ");
    print_dec(qsize);
    puts(" capacity ");
    print_dec(capacity);
    puts(" pm port ");
    print_hex(pm, 4);
    putc('\n');
    build_chains(depth, type, bytes);

    job.pm = pm;
    job.count = count;
    job.depth = depth;
    job.step = step;
    job.blocks = blocks;
    job.random = random;
    if (cmdline_has("ring0")) {
        job.pm_every_spins = PM_EVERY_SPINS_RING0;
        measure();
    } else {
        job.pm_every_spins = PM_EVERY_SPINS_RING3;
        run_in_ring3();
    }
    u32 ticks = job.ticks;

    puts("blkbench ");
    puts(mode);
    puts(" reqs ");
    print_dec(count);
    puts(" bytes ");
    print_dec(bytes);
    puts(" qd ");
    print_dec(depth);
    puts(" ticks ");
    print_dec(ticks);
    puts(" notifies ");
    print_dec(notifications);
    puts(job.pm_every_spins == PM_EVERY_SPINS_RING0 ? " ring 0" : " ring 3");
    putc('\n');

    if (type == T_OUT && !no_flush) {
        /* Untimed: both VMMs write through the host page cache; the flush only proves the
         * request path, it is not part of the figure. */
        if (single_request(T_FLUSH) != 0)
            fail("blkbench: flush failed");
        println("blkbench flush ok");
    }
    poweroff();
}
