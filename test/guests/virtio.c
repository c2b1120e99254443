/* A minimal virtio-rnd driver, interrupts off. Two ways:
 *   virtio-rnd intx : the legacy (0.9.5) I/O BAR interface, completion seen as the virtio
 *                     ISR status and as the IOAPIC-routed vector pending in the LAPIC IRR.
 *   virtio-rnd msix : the modern (1.x) interface in the memory BAR, completion first held
 *                     as a pending bit while the MSI-X vector is masked, then, unmasked,
 *                     pending in the LAPIC IRR.
 *   virtio-rnd msix ap : as msix, but the MSI-X message names APIC ID 1, where cpu1 waits in
 *                     real mode: its handler runs, and nothing is pending at the BSP.
 * Prints "virtio-rnd ok" when every check passes; anything else is a FAIL line. */
#include "tests.h"
#include "ring3.h"

#define IOAPIC 0xFEC00000u
#define INTX_VECTOR 0x52
#define MSIX_VECTOR 0x51
#define QUEUE_SIZE 64
#define BUF_LEN 64

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define DESC_F_WRITE 2

/* Queue memory: descriptors, available ring, used ring at the next 4 KiB (legacy layout). */
static u8 ring[8192] __attribute__((aligned(4096)));
static u8 buf[BUF_LEN] __attribute__((aligned(64)));




static u32 find_device(void)
{
    for (u32 slot = 0; slot < 32; slot++)
        if (cfg_read32(slot, 0) == 0x10051AF4u)
            return slot;
    fail("virtio-rnd: no 1af4:1005 on bus 0");
}

/* One device-writable buffer in descriptor 0, published as available entry `n`. */
static void offer_buffer(u16 n)
{
    volatile u32 *desc = (volatile u32 *)ring;
    desc[0] = (u32)buf;
    desc[1] = 0;
    desc[2] = BUF_LEN;
    desc[3] = DESC_F_WRITE; /* flags 2, next 0 */
    volatile u16 *avail = (volatile u16 *)(ring + 16 * QUEUE_SIZE);
    avail[2 + n % QUEUE_SIZE] = 0;
    __asm__ volatile("" ::: "memory");
    avail[1] = n + 1;
}

static void wait_used(u16 count)
{
    volatile u16 *used = (volatile u16 *)(ring + 4096);
    for (u32 spins = 0; used[1] != count; spins++)
        if (spins > 2000000)
            fail("virtio-rnd: no used buffer");
    volatile u32 *elem = (volatile u32 *)(ring + 4096 + 4 + 8 * ((count - 1) % QUEUE_SIZE));
    if (elem[0] != 0 || elem[1] != BUF_LEN)
        fail("virtio-rnd: bad used element");
}

static void check_entropy(void)
{
    int varied = 0;
    for (int i = 1; i < BUF_LEN; i++)
        varied |= buf[i] != buf[0];
    if (!varied)
        fail("virtio-rnd: all bytes equal");
    puts("virtio-rnd bytes ");
    for (int i = 0; i < 8; i++)
        print_hex(buf[i], 2);
    putc('\n');
}

static void lapic_enable(void)
{
    mmio_write32(LAPIC + 0xF0, 0x1FF);
}

static void report_ring3_runs(u32 runs)
{
    puts("virtio ring3 handler runs ");
    print_dec(runs);
    putc('\n');
    if (!runs)
        fail("virtio-rnd: no interrupt taken in ring 3");
}

static void run_intx(u32 slot, u32 bar0)
{
    u16 io = bar0 & ~3u;
    u32 gsi = cfg_read8(slot, 0x3C);
    puts("virtio intx gsi ");
    print_dec(gsi);
    putc('\n');
    lapic_enable();
    mmio_write32(IOAPIC, 0x10 + 2 * gsi + 1);
    mmio_write32(IOAPIC + 0x10, 0);
    mmio_write32(IOAPIC, 0x10 + 2 * gsi);
    mmio_write32(IOAPIC + 0x10, INTX_VECTOR | (1u << 15)); /* level, active high */

    outb(io + 0x12, 0);
    outb(io + 0x12, STATUS_ACK | STATUS_DRIVER);
    (void)inl(io + 0x00);
    outl(io + 0x04, 0);
    outw(io + 0x0E, 0);
    if (inw(io + 0x0C) != QUEUE_SIZE)
        fail("virtio-rnd: legacy queue size is not 64");
    offer_buffer(0);
    outl(io + 0x08, (u32)ring >> 12);
    outb(io + 0x12, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
    if (inb(io + 0x13) != 0)
        fail("virtio-rnd: ISR set before any request");
    outw(io + 0x10, 0);
    wait_used(1);
    check_entropy();
    if (!irr_pending(INTX_VECTOR))
        fail("virtio-rnd: INTx vector not pending in the LAPIC IRR");
    println("virtio intx irq pending");
    u8 isr = inb(io + 0x13);
    puts("virtio isr ");
    print_hex(isr, 2);
    putc('\n');
    if (!(isr & 1))
        fail("virtio-rnd: ISR queue bit not set");
    if (inb(io + 0x13) != 0)
        fail("virtio-rnd: ISR not cleared by reading it");
    if (!cmdline_has("ring3"))
        return;
    /* A second request, its interrupt taken in ring 3. The handler masks the level pin
     * before its EOI: the line stays high until the ISR read below. */
    u32 actions = R3_EOI_LAPIC | R3_MASK_PIN;
    ring3_handle(INTX_VECTOR, actions, gsi, 1);
    ring3_wait(INTX_VECTOR, 1, 100); /* takes the first request's, pending since */
    mmio_write32(IOAPIC, 0x10 + 2 * gsi);
    mmio_write32(IOAPIC + 0x10, INTX_VECTOR | (1u << 15));
    ring3_handle(INTX_VECTOR, actions, gsi, 1);
    offer_buffer(1);
    outw(io + 0x10, 0);
    report_ring3_runs(ring3_wait(INTX_VECTOR, 1, 5000));
    wait_used(2);
    puts("virtio ring3 isr ");
    print_hex(inb(io + 0x13), 2);
    putc('\n');
}

static void run_msix(u32 slot, u32 bar2)
{
    u32 mem = bar2 & ~0xFu;
    u32 common = 0, notify = 0, notify_mult = 0, table = 0, pba = 0, msix_cap = 0;
    for (u32 cap = cfg_read8(slot, 0x34); cap; cap = cfg_read8(slot, cap + 1)) {
        u8 id = cfg_read8(slot, cap);
        if (id == 0x11) {
            msix_cap = cap;
            u32 t = cfg_read32(slot, cap + 4), p = cfg_read32(slot, cap + 8);
            u32 tbar = cfg_read32(slot, 0x10 + 4 * (t & 7)) & ~0xFu;
            u32 pbar = cfg_read32(slot, 0x10 + 4 * (p & 7)) & ~0xFu;
            table = tbar + (t & ~7u);
            pba = pbar + (p & ~7u);
        } else if (id == 0x09) {
            u8 type = cfg_read8(slot, cap + 3);
            u32 off = cfg_read32(slot, cap + 8);
            if (cfg_read8(slot, cap + 4) != 2)
                fail("virtio-rnd: capability not in BAR 2");
            if (type == 1)
                common = mem + off;
            if (type == 2) {
                notify = mem + off;
                notify_mult = cfg_read32(slot, cap + 16);
            }
        }
    }
    if (!common || !notify || !msix_cap)
        fail("virtio-rnd: missing common/notify/MSI-X capability");
    (void)notify_mult;
    lapic_enable();
    int to_ap = cmdline_has("ap") && !cmdline_has("ring3");
    volatile u32 *ap_count = to_ap ? rm_ap_start() : 0;
    u32 vector = to_ap ? RM_AP_VECTOR : MSIX_VECTOR;

    mmio_write8(common + 0x14, 0);
    mmio_write8(common + 0x14, STATUS_ACK | STATUS_DRIVER);
    mmio_write32(common + 0x00, 1);
    if (!(mmio_read32(common + 0x04) & 1))
        fail("virtio-rnd: VERSION_1 not offered");
    mmio_write32(common + 0x08, 1);
    mmio_write32(common + 0x0C, 1); /* VERSION_1 only */
    mmio_write32(common + 0x08, 0);
    mmio_write32(common + 0x0C, 0);
    mmio_write8(common + 0x14, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(mmio_read8(common + 0x14) & STATUS_FEATURES_OK))
        fail("virtio-rnd: FEATURES_OK refused");

    /* Vector 0: the LAPIC, fixed delivery, masked for now. */
    mmio_write32(table + 0, LAPIC | (to_ap ? 1u << 12 : 0)); /* destination APIC ID */
    mmio_write32(table + 4, 0);
    mmio_write32(table + 8, vector);
    mmio_write32(table + 12, 1);
    cfg_write16(slot, msix_cap + 2, 0x8000); /* MSI-X enable */

    mmio_write16(common + 0x16, 0);
    if (mmio_read16(common + 0x18) != QUEUE_SIZE)
        fail("virtio-rnd: modern queue size is not 64");
    mmio_write16(common + 0x1A, 0);
    if (mmio_read16(common + 0x1A) != 0)
        fail("virtio-rnd: queue vector 0 refused");
    mmio_write32(common + 0x20, (u32)ring);
    mmio_write32(common + 0x24, 0);
    mmio_write32(common + 0x28, (u32)ring + 16 * QUEUE_SIZE);
    mmio_write32(common + 0x2C, 0);
    mmio_write32(common + 0x30, (u32)ring + 4096);
    mmio_write32(common + 0x34, 0);
    mmio_write16(common + 0x1C, 1);
    u16 notify_off = mmio_read16(common + 0x1E);
    mmio_write8(common + 0x14, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);

    offer_buffer(0);
    mmio_write16(notify + notify_off * notify_mult, 0);
    wait_used(1);
    check_entropy();
    if (!(mmio_read32(pba) & 1))
        fail("virtio-rnd: masked MSI-X vector not pending in the PBA");
    if (irr_pending(vector) || (to_ap && *ap_count))
        fail("virtio-rnd: masked MSI-X vector reached a LAPIC");
    println("virtio msix pending while masked");
    mmio_write32(table + 12, 0);
    if (mmio_read32(pba) & 1)
        fail("virtio-rnd: PBA bit still set after unmasking");
    if (to_ap) {
        puts("virtio msix handled on cpu1 ");
        print_dec(rm_ap_wait_count(ap_count, 1));
        putc('\n');
        if (irr_pending(vector))
            fail("virtio-rnd: MSI-X for APIC 1 pending at the BSP");
        return;
    }
    if (!irr_pending(MSIX_VECTOR))
        fail("virtio-rnd: MSI-X vector not pending in the LAPIC IRR");
    println("virtio msix irq pending");
    if (!cmdline_has("ring3"))
        return;
    /* A second request, unmasked: the message names APIC 0, whose handler counts it. */
    ring3_handle(MSIX_VECTOR, R3_EOI_LAPIC, 0, 0);
    ring3_wait(MSIX_VECTOR, 1, 100); /* takes the first request's, pending since */
    ring3_handle(MSIX_VECTOR, R3_EOI_LAPIC, 0, 0);
    offer_buffer(1);
    mmio_write16(notify + notify_off * notify_mult, 0);
    report_ring3_runs(ring3_wait(MSIX_VECTOR, 1, 5000));
    wait_used(2);
    if (mmio_read32(pba) & 1)
        fail("virtio-rnd: PBA bit set for an unmasked vector");
    if (!cmdline_has("ap"))
        return;
    /* A third request, the message retargeted to APIC ID 1, where cpu1 waits in ring 3 of
     * long mode: its handler runs there, and nothing arrives at the BSP. */
    lm_ap_start(RM_AP_VECTOR, 1, R3_SAMPLE_CPU | R3_EOI_LAPIC);
    mmio_write32(table + 12, 1);
    mmio_write32(table + 0, LAPIC | (1u << 12));
    mmio_write32(table + 8, RM_AP_VECTOR);
    mmio_write32(table + 12, 0);
    offer_buffer(2);
    mmio_write16(notify + notify_off * notify_mult, 0);
    puts("virtio msix ring3 handled on cpu1 ");
    print_dec(lm_ap_wait_count(RM_AP_VECTOR, 1));
    puts(" apic ");
    print_dec(ring3_cpu_seen[RM_AP_VECTOR]);
    putc('\n');
    wait_used(3);
    if (irr_pending(RM_AP_VECTOR))
        fail("virtio-rnd: MSI-X for APIC 1 pending at the BSP");
}

void test_virtio_rnd(const struct mb_info *mbi)
{
    (void)mbi;
    u32 slot = find_device();
    cfg_write16(slot, 0x04, 0x0007); /* I/O, memory, bus master */
    u32 bar0 = cfg_read32(slot, 0x10), bar2 = cfg_read32(slot, 0x18);
    if (!(bar0 & 1) || !bar2)
        fail("virtio-rnd: BARs not assigned");
    if (cmdline_has("msix"))
        run_msix(slot, bar2);
    else
        run_intx(slot, bar0);
    println("virtio-rnd ok");
    poweroff();
}
