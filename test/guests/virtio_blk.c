/* A minimal virtio-blk driver, interrupts off. Command-line words:
 *   virtio-blk intx : the legacy (0.9.5) I/O BAR interface; the first completion is seen as
 *                     the IOAPIC-routed vector pending in the LAPIC IRR and the ISR status.
 *   virtio-blk msix : the modern (1.x) interface; every completion is held as a pending bit
 *                     while the MSI-X vector is masked, then, unmasked, pending in the IRR.
 *   ro              : the disk is read-only: expect the RO feature and IOERR for a write.
 * The host test prepares the image (a pattern in sector 0, data at 1 MiB) and checks it
 * afterwards. Prints "virtio-blk ok" when every check passes; anything else is a FAIL. */
#include "tests.h"
#include "ring3.h"
#include "virtio_common.h"

#define WHO "virtio-blk"
#define INTX_VECTOR 0x53
#define MSIX_VECTOR 0x54
#define QUEUE_SIZE 128
#define USED_OFFSET 4096
#define SPIN_LIMIT 5000000u

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_OK 0
#define S_IOERR 1

#define F_RO (1u << 5)
#define F_BLK_SIZE (1u << 6)
#define F_FLUSH (1u << 9)
#define F_DISCARD (1u << 13)
#define F_WRITE_ZEROES (1u << 14)

/* Where the host test put its data, in 512-byte sectors. */
#define WRITE_SECTOR 16
#define ZERO_SECTOR 20
#define DISCARD_SECTOR 2048
#define DISCARD_SECTORS 2048

struct req_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

struct segment {
    u64 sector;
    u32 sectors;
    u32 flags;
};

static u8 ring[8192] __attribute__((aligned(4096)));
static u8 data[4096] __attribute__((aligned(4096)));
static struct req_header header __attribute__((aligned(16)));
static struct segment segment __attribute__((aligned(16)));
static volatile u8 status;
static u16 published;

static int msix_mode;
static u16 legacy_io;
static u32 notify_addr, device_cfg, msix_table, msix_pba;

/* The IRR bit is set by the I/O thread, a moment after the used ring: poll for it. */
static int irr_pending_soon(u32 vector)
{
    for (u32 spins = 0; spins < 200000; spins++)
        if (irr_pending(vector))
            return 1;
    return 0;
}

/* Publishes one request (header, optional data, status) and rings the doorbell. */
static void submit(u32 type, u64 sector, void *buf, u32 len, int device_writes)
{
    header.type = type;
    header.reserved = 0;
    header.sector = sector;
    status = 0xFF;
    u32 n = 0;
    virtq_set_desc(ring, n++, (u32)&header, sizeof header, DESC_F_NEXT);
    if (len)
        virtq_set_desc(ring, n++, (u32)buf, len, DESC_F_NEXT | (device_writes ? DESC_F_WRITE : 0));
    virtq_set_desc(ring, n++, (u32)&status, 1, DESC_F_WRITE);
    virtq_publish(ring, QUEUE_SIZE, published, 0);
    published++;
    __asm__ volatile("" ::: "memory");
    if (msix_mode)
        mmio_write16(notify_addr, 0);
    else
        outw(legacy_io + VIO_QUEUE_NOTIFY, 0);
}

/* Waits for the used entry of the last submitted request; returns its status. */
static u8 wait_completion(void)
{
    volatile u32 *elem = virtq_wait_used(ring, QUEUE_SIZE, USED_OFFSET, published, SPIN_LIMIT,
                                         "virtio-blk: request not completed");
    if (elem[0] != 0)
        fail("virtio-blk: used element names another chain");
    return status;
}

static u8 request(u32 type, u64 sector, void *buf, u32 len, int device_writes)
{
    submit(type, sector, buf, len, device_writes);
    return wait_completion();
}

static void expect(u8 got, u8 want, const char *what)
{
    if (got != want) {
        puts("virtio-blk: status ");
        print_hex(got, 2);
        puts(" for ");
        println(what);
        fail("virtio-blk: unexpected request status");
    }
}

static u8 config8(u32 off)
{
    if (msix_mode)
        return mmio_read8(device_cfg + off);
    return inb(legacy_io + VIO_CONFIG + off);
}

static u32 config32(u32 off)
{
    u32 v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | config8(off + i);
    return v;
}

static u32 intx_gsi;

static u32 legacy_start(u32 slot)
{
    legacy_io = cfg_read32(slot, 0x10) & ~3u;
    u32 gsi = cfg_read8(slot, 0x3C);
    intx_gsi = gsi;
    lapic_enable();
    ioapic_route_level(gsi, INTX_VECTOR);

    u32 features = virtio_legacy_begin(legacy_io);
    outl(legacy_io + VIO_GUEST_FEATURES,
         features & (F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES));
    virtio_legacy_queue(legacy_io, WHO, 0, QUEUE_SIZE, (u32)ring);
    outb(legacy_io + VIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
    return features;
}

static u32 modern_start(u32 slot)
{
    struct virtio_modern m;
    virtio_modern_find(slot, &m);
    if (!m.common || !m.notify || !m.device_cfg || !m.msix_cap)
        fail("virtio-blk: missing common/notify/device/MSI-X capability");
    device_cfg = m.device_cfg;
    msix_table = m.msix_table;
    msix_pba = m.msix_pba;
    lapic_enable();

    u32 features = virtio_modern_begin(&m, WHO);
    virtio_modern_accept(&m, WHO, features & (F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES));

    /* Vector 0: the LAPIC, fixed delivery, masked until the end. */
    virtio_msix_entry(&m, 0, 0, MSIX_VECTOR, 1);
    virtio_msix_enable(slot, &m);
    notify_addr = virtio_modern_queue(&m, WHO, 0, QUEUE_SIZE, (u32)ring, USED_OFFSET);
    virtio_modern_driver_ok(&m);
    return features;
}

static void check_first_interrupt(void)
{
    if (msix_mode) {
        if (!(mmio_read32(msix_pba) & 1))
            fail("virtio-blk: masked MSI-X vector not pending in the PBA");
        if (irr_pending(MSIX_VECTOR))
            fail("virtio-blk: masked MSI-X vector reached the LAPIC");
        println("virtio-blk msix pending while masked");
        return;
    }
    if (!irr_pending_soon(INTX_VECTOR))
        fail("virtio-blk: INTx vector not pending in the LAPIC IRR");
    println("virtio-blk intx irq pending");
    u8 isr = inb(legacy_io + VIO_ISR);
    puts("virtio-blk isr ");
    print_hex(isr, 2);
    putc('\n');
    if (!(isr & 1))
        fail("virtio-blk: ISR queue bit not set");
}

static void print_bytes(const char *label, const u8 *p, int n)
{
    puts(label);
    for (int i = 0; i < n; i++)
        print_hex(p[i], 2);
    putc('\n');
}

static int all_zero(const u8 *p, u32 n)
{
    for (u32 i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* "bench": BENCH_READS sequential 4 KiB reads, one in flight, for doorbell and completion
 * latency; the host times the run, the TSC count is for comparing runs on one host. */
#define BENCH_READS 20000u
static void bench_reads(void)
{
    u32 sectors = config32(0);
    u64 start = rdtsc();
    for (u32 i = 0; i < BENCH_READS; i++)
        expect(request(T_IN, (u64)((i * 8u) % (sectors - 8)), data, sizeof data, 1), S_OK,
               "bench read");
    u64 cycles = rdtsc() - start;
    /* 32-bit guest without 64-bit division: the host divides. */
    puts("virtio-blk bench reads ");
    print_dec(BENCH_READS);
    puts(" tsc ");
    print_hex(cycles, 16);
    putc('\n');
}

/* "stress": writes until the host kills the VM (the crash-consistency test). Write k fills
 * slot k % STRESS_SLOTS (4 KiB each, from 2 MiB) with the byte k, its first word k; after
 * every STRESS_FLUSH_EVERY writes a flush, then "virtio-blk flushed K": writes 0..K-1 are
 * durable. */
#define STRESS_SECTOR 4096u
#define STRESS_SLOTS 64u
#define STRESS_FLUSH_EVERY 4u
static void stress_writes(void)
{
    for (u32 k = 0;; k++) {
        memset(data, (int)(k & 0xff), sizeof data);
        data[0] = (u8)k;
        data[1] = (u8)(k >> 8);
        data[2] = (u8)(k >> 16);
        data[3] = (u8)(k >> 24);
        expect(request(T_OUT, STRESS_SECTOR + (u64)(k % STRESS_SLOTS) * 8, data, sizeof data, 0),
               S_OK, "stress write");
        if (k % STRESS_FLUSH_EVERY == STRESS_FLUSH_EVERY - 1) {
            expect(request(T_FLUSH, 0, 0, 0, 0), S_OK, "stress flush");
            puts("virtio-blk flushed ");
            print_dec(k + 1);
            putc('\n');
        }
    }
}

static void route_intx(u32 masked)
{
    ioapic_write_rte_low(intx_gsi, INTX_VECTOR | IOAPIC_LEVEL | (masked << 16));
}

/* One more read, its completion interrupt taken while waiting in ring 3 with interrupts on
 * (ring3.h). The INTx handler masks its level pin before the EOI, as the line stays high
 * until the ISR read back here. */
static void completion_in_ring3(void)
{
    u32 vector = msix_mode ? MSIX_VECTOR : INTX_VECTOR;
    u32 actions = R3_EOI_LAPIC | (msix_mode ? 0 : R3_MASK_PIN);
    /* First take what the earlier requests left pending with interrupts off. */
    if (!msix_mode)
        (void)inb(legacy_io + VIO_ISR);
    ring3_handle(vector, actions, intx_gsi, 1);
    ring3_wait(vector, 1, 100);
    if (!msix_mode)
        route_intx(0);
    ring3_handle(vector, actions, intx_gsi, 1);
    memset(data, 0, sizeof data);
    submit(T_IN, 0, data, 512, 1);
    u32 runs = ring3_wait(vector, 1, 5000);
    expect(wait_completion(), S_OK, "read in ring 3");
    puts("virtio-blk ring3 handler runs ");
    print_dec(runs);
    putc('\n');
    if (!runs)
        fail("virtio-blk: no completion interrupt in ring 3");
    if (!msix_mode) {
        u8 isr = inb(legacy_io + VIO_ISR);
        puts("virtio-blk ring3 isr ");
        print_hex(isr, 2);
        putc('\n');
        route_intx(0);
    }
    print_bytes("virtio-blk ring3 sector0 ", data, 8);
}

void test_virtio_blk(const struct mb_info *mbi)
{
    (void)mbi;
    u32 slot = virtio_find_device(0x10011AF4u, "virtio-blk: no 1af4:1001 on bus 0");
    cfg_write16(slot, 0x04, 0x0007); /* I/O, memory, bus master */
    msix_mode = cmdline_has("msix");
    int read_only = cmdline_has("ro");
    u32 features = msix_mode ? modern_start(slot) : legacy_start(slot);
    puts("virtio-blk features ");
    print_hex(features, 8);
    putc('\n');
    if (!!(features & F_RO) != read_only)
        fail("virtio-blk: RO feature does not match the disk");
    if ((features & (F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_BLK_SIZE)) !=
        (F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_BLK_SIZE))
        fail("virtio-blk: FLUSH/DISCARD/WRITE_ZEROES/BLK_SIZE not offered");
    puts("virtio-blk capacity ");
    print_dec(config32(0));
    puts(" blk_size ");
    print_dec(config32(20));
    putc('\n');
    puts("virtio-blk seg_max ");
    print_dec(config32(12));
    puts(" phys_exp ");
    print_dec(config8(24));
    puts(" max_discard_seg ");
    print_dec(config32(40));
    puts(" max_zeroes_seg ");
    print_dec(config32(52));
    putc('\n');

    if (cmdline_has("stress"))
        stress_writes();

    /* GET_ID: the serial, NUL-padded to 20 bytes. */
    memset(data, 0, sizeof data);
    expect(request(T_GET_ID, 0, data, 20, 1), S_OK, "GET_ID");
    check_first_interrupt();
    data[20] = 0;
    puts("virtio-blk id ");
    println((const char *)data);

    memset(data, 0, sizeof data);
    expect(request(T_IN, 0, data, 512, 1), S_OK, "read sector 0");
    print_bytes("virtio-blk sector0 ", data, 8);

    for (u32 i = 0; i < sizeof data; i++)
        data[i] = (u8)(i * 7 + 1);
    if (read_only) {
        expect(request(T_OUT, WRITE_SECTOR, data, sizeof data, 0), S_IOERR, "write to ro");
        println("virtio-blk ro write ioerr");
        segment.sector = DISCARD_SECTOR;
        segment.sectors = DISCARD_SECTORS;
        segment.flags = 0;
        expect(request(T_DISCARD, 0, &segment, sizeof segment, 0), S_IOERR, "discard on ro");
        println("virtio-blk ro discard ioerr");
    } else {
        expect(request(T_OUT, WRITE_SECTOR, data, sizeof data, 0), S_OK, "write");
        memset(data, 0, sizeof data);
        expect(request(T_IN, WRITE_SECTOR, data, sizeof data, 1), S_OK, "read back");
        for (u32 i = 0; i < sizeof data; i++)
            if (data[i] != (u8)(i * 7 + 1))
                fail("virtio-blk: read back differs from what was written");
        println("virtio-blk write read back");
        expect(request(T_FLUSH, 0, 0, 0, 0), S_OK, "flush");
        println("virtio-blk flush ok");

        segment.sector = ZERO_SECTOR;
        segment.sectors = 2;
        segment.flags = 0;
        expect(request(T_WRITE_ZEROES, 0, &segment, sizeof segment, 0), S_OK, "write zeroes");
        segment.sector = DISCARD_SECTOR;
        segment.sectors = DISCARD_SECTORS;
        expect(request(T_DISCARD, 0, &segment, sizeof segment, 0), S_OK, "discard");
        memset(data, 0xEE, sizeof data);
        expect(request(T_IN, DISCARD_SECTOR, data, sizeof data, 1), S_OK, "read discarded");
        if (!all_zero(data, sizeof data))
            fail("virtio-blk: discarded sectors do not read as zeroes");
        println("virtio-blk discard ok");
        expect(request(T_FLUSH, 0, 0, 0, 0), S_OK, "flush");
    }

    /* Past the end of the disk: an error status, not a crash. */
    expect(request(T_IN, config32(0), data, 512, 1), S_IOERR, "read past the end");
    expect(request(99, 0, 0, 0, 0), 2, "unknown request type");

    if (cmdline_has("bench"))
        bench_reads();

    if (msix_mode) {
        mmio_write32(msix_table + 12, 0);
        if (mmio_read32(msix_pba) & 1)
            fail("virtio-blk: PBA bit still set after unmasking");
        if (!irr_pending(MSIX_VECTOR))
            fail("virtio-blk: MSI-X vector not pending in the LAPIC IRR");
        println("virtio-blk msix irq pending");
    }
    if (cmdline_has("ring3"))
        completion_in_ring3();
    println("virtio-blk ok");
    poweroff();
}
