/* reset-api: a guest the control API resets (tests/guest_rest.rs). Interrupts off.
 *
 * Each boot counts itself in RAM that neither the loader nor the firmware tables touch (a
 * PC's reset keeps RAM), prints what firmware left in the virtio-blk function's
 * configuration space and the device's status (00 when the device was reset), then drives
 * the device from status 0 to DRIVER_OK over the legacy interface: it reads sector 1 (what
 * the previous boot wrote, through the same image) and writes this boot's number there.
 * With "smp" it starts cpu1 (reset_ap.S), which counts for ever; a later boot first checks
 * that the counter stands still (the reset stopped the AP), then starts it again.
 *
 * Boot 1 then moves the device's I/O BAR and turns on INTx-disable (a reset must undo
 * both), prints "reset-api ready" and spins until the API resets the machine. Boot 2 prints
 * "reset-api done" and resets through 0xCF9, which ends xhyve with exit code 0. */
#include "tests.h"
#include "virtio_common.h"

#define WHO "reset-api"
#define BOOT_RECORD 0x00F00000u
#define BOOT_MAGIC 0x52535431u
#define QUEUE_SIZE 128
#define USED_OFFSET 4096
#define T_IN 0
#define T_OUT 1

#define RESET_AP_BASE 0x9000u
#define LAPIC_ICR_LOW 0xFEE00300u
#define LAPIC_ICR_HIGH 0xFEE00310u
#define ICR_PENDING (1u << 12)
#define ICR_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)

extern const u8 reset_ap_start[], reset_ap_end[];
extern const u32 reset_ap_ready_offset, reset_ap_count_offset;

struct req_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

static u8 ring[8192] __attribute__((aligned(4096)));
static u8 data[512] __attribute__((aligned(512)));
static struct req_header header __attribute__((aligned(16)));
static volatile u8 status;
static u16 published;

static void spin(u32 n)
{
    for (volatile u32 i = 0; i < n; i++)
        cpu_relax();
}

static u8 request(u16 io, u32 type, u64 sector)
{
    header.type = type;
    header.reserved = 0;
    header.sector = sector;
    status = 0xFF;
    virtq_set_desc(ring, 0, (u32)&header, sizeof header, DESC_F_NEXT);
    virtq_set_desc(ring, 1, (u32)data, sizeof data,
                   DESC_F_NEXT | (type == T_IN ? DESC_F_WRITE : 0));
    virtq_set_desc(ring, 2, (u32)&status, 1, DESC_F_WRITE);
    virtq_publish(ring, QUEUE_SIZE, published, 0);
    published++;
    __asm__ volatile("" ::: "memory");
    outw(io + VIO_QUEUE_NOTIFY, 0);
    virtq_wait_used(ring, QUEUE_SIZE, USED_OFFSET, published, 5000000u,
                    "reset-api: request not completed");
    return status;
}

static void print_line_hex(const char *what, u32 v, int digits)
{
    puts("reset-api ");
    puts(what);
    putc(' ');
    print_hex(v, digits);
    putc('\n');
}

static void send_ipi(u32 command)
{
    mmio_write32(LAPIC_ICR_HIGH, 1u << 24);
    mmio_write32(LAPIC_ICR_LOW, command);
    for (u32 i = 0; i < 20000u; i++)
        if (!(mmio_read32(LAPIC_ICR_LOW) & ICR_PENDING))
            break;
}

static void check_and_start_cpu1(u32 boot)
{
    volatile u32 *ready = (volatile u32 *)(RESET_AP_BASE + reset_ap_ready_offset);
    volatile u32 *counter = (volatile u32 *)(RESET_AP_BASE + reset_ap_count_offset);
    if (boot > 1) {
        /* Left counting by the previous boot: a reset AP waits for INIT/SIPI instead. */
        u32 before = *counter;
        spin(200000u);
        if (*counter != before)
            fail("reset-api: cpu1 still runs after the reset");
        println("reset-api cpu1 stopped");
    }
    memcpy((void *)RESET_AP_BASE, reset_ap_start, (u32)(reset_ap_end - reset_ap_start));
    *ready = 0;
    *counter = 0;
    send_ipi(ICR_INIT | ICR_ASSERT);
    spin(20000u);
    send_ipi(ICR_STARTUP | ICR_ASSERT | (RESET_AP_BASE >> 12));
    for (u32 i = 0; i < 3000000u && !*ready; i++)
        cpu_relax();
    if (!*ready)
        fail("reset-api: cpu1 did not start");
    u32 first = *counter;
    for (u32 i = 0; i < 3000000u && *counter == first; i++)
        cpu_relax();
    if (*counter == first)
        fail("reset-api: cpu1 does not count");
    println("reset-api cpu1 counting");
}

void test_reset_api(const struct mb_info *mbi)
{
    (void)mbi;
    volatile u32 *record = (volatile u32 *)BOOT_RECORD;
    u32 boot = record[0] == BOOT_MAGIC ? record[1] + 1 : 1;
    record[0] = BOOT_MAGIC;
    record[1] = boot;
    puts("reset-api boot ");
    print_dec(boot);
    putc('\n');

    u32 slot = virtio_find_device(0x10011AF4u, "reset-api: no 1af4:1001 on bus 0");
    print_line_hex("command", cfg_read32(slot, 0x04) & 0xFFFF, 4);
    u32 bar0 = cfg_read32(slot, 0x10);
    print_line_hex("bar0", bar0, 8);
    print_line_hex("msix control", cfg_read32(slot, 0x40) >> 16, 4);
    u16 io = bar0 & ~3u;
    print_line_hex("status", inb(io + VIO_STATUS), 2);
    outw(io + VIO_QUEUE_SEL, 0);
    print_line_hex("queue pfn", inl(io + VIO_QUEUE_PFN), 8);

    if (cmdline_has("smp"))
        check_and_start_cpu1(boot);

    virtio_legacy_begin(io);
    outl(io + VIO_GUEST_FEATURES, 0);
    virtio_legacy_queue(io, WHO, 0, QUEUE_SIZE, (u32)ring);
    outb(io + VIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
    if (request(io, T_IN, 1) != 0)
        fail("reset-api: read of sector 1 failed");
    puts("reset-api sector1 was ");
    for (int i = 0; i < 8; i++)
        putc(data[i] >= 0x20 && data[i] < 0x7F ? data[i] : '.');
    putc('\n');
    memset(data, 0, sizeof data);
    memcpy(data, "boot ", 5);
    data[5] = '0' + (boot % 10);
    if (request(io, T_OUT, 1) != 0)
        fail("reset-api: write of sector 1 failed");
    println("reset-api io ok");

    if (boot == 1) {
        /* What a reset must undo: the I/O BAR moved, INTx disabled. */
        cfg_write16(slot, 0x04, 0x0000);
        cfg_write32(slot, 0x10, 0x3000);
        cfg_write16(slot, 0x04, 0x0407);
        println("reset-api ready");
        for (;;)
            cpu_relax();
    }
    println("reset-api done");
    reset();
}
