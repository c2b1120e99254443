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
#include "virtio_common.h"

#define WHO "virtio-rnd"
#define INTX_VECTOR 0x52
#define MSIX_VECTOR 0x51
#define QUEUE_SIZE 64
#define BUF_LEN 64
#define USED_OFFSET 4096

/* Queue memory: descriptors, available ring, used ring at the next 4 KiB (legacy layout). */
static u8 ring[8192] __attribute__((aligned(4096)));
static u8 buf[BUF_LEN] __attribute__((aligned(64)));

/* One device-writable buffer in descriptor 0, published as available entry `n`. */
static void offer_buffer(u16 n)
{
    virtq_set_desc(ring, 0, (u32)buf, BUF_LEN, DESC_F_WRITE);
    virtq_publish(ring, QUEUE_SIZE, n, 0);
}

static void wait_used(u16 count)
{
    volatile u32 *elem =
        virtq_wait_used(ring, QUEUE_SIZE, USED_OFFSET, count, 2000000, "virtio-rnd: no used buffer");
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

static void report_ring3_runs(u32 runs)
{
    puts("virtio ring3 handler runs ");
    print_dec(runs);
    putc('\n');
    if (!runs)
        fail("virtio-rnd: no interrupt taken in ring 3");
}

static void run_intx(u32 slot, u16 io)
{
    u32 gsi = cfg_read8(slot, 0x3C);
    puts("virtio intx gsi ");
    print_dec(gsi);
    putc('\n');
    lapic_enable();
    ioapic_route_level(gsi, INTX_VECTOR);

    (void)virtio_legacy_begin(io);
    outl(io + VIO_GUEST_FEATURES, 0);
    offer_buffer(0);
    virtio_legacy_queue(io, WHO, 0, QUEUE_SIZE, (u32)ring);
    outb(io + VIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
    if (inb(io + VIO_ISR) != 0)
        fail("virtio-rnd: ISR set before any request");
    outw(io + VIO_QUEUE_NOTIFY, 0);
    wait_used(1);
    check_entropy();
    if (!irr_pending(INTX_VECTOR))
        fail("virtio-rnd: INTx vector not pending in the LAPIC IRR");
    println("virtio intx irq pending");
    u8 isr = inb(io + VIO_ISR);
    puts("virtio isr ");
    print_hex(isr, 2);
    putc('\n');
    if (!(isr & 1))
        fail("virtio-rnd: ISR queue bit not set");
    if (inb(io + VIO_ISR) != 0)
        fail("virtio-rnd: ISR not cleared by reading it");
    if (!cmdline_has("ring3"))
        return;
    /* A second request, its interrupt taken in ring 3. The handler masks the level pin
     * before its EOI: the line stays high until the ISR read below. */
    u32 actions = R3_EOI_LAPIC | R3_MASK_PIN;
    ring3_handle(INTX_VECTOR, actions, gsi, 1);
    ring3_wait(INTX_VECTOR, 1, 100); /* takes the first request's, pending since */
    ioapic_write_rte_low(gsi, INTX_VECTOR | IOAPIC_LEVEL);
    ring3_handle(INTX_VECTOR, actions, gsi, 1);
    offer_buffer(1);
    outw(io + VIO_QUEUE_NOTIFY, 0);
    report_ring3_runs(ring3_wait(INTX_VECTOR, 1, 5000));
    wait_used(2);
    puts("virtio ring3 isr ");
    print_hex(inb(io + VIO_ISR), 2);
    putc('\n');
}

static void run_msix(u32 slot)
{
    struct virtio_modern m;
    virtio_modern_find(slot, &m);
    if (m.outside_bar2)
        fail("virtio-rnd: capability not in BAR 2");
    if (!m.common || !m.notify || !m.msix_cap)
        fail("virtio-rnd: missing common/notify/MSI-X capability");
    u32 table = m.msix_table, pba = m.msix_pba;
    lapic_enable();
    int to_ap = cmdline_has("ap") && !cmdline_has("ring3");
    volatile u32 *ap_count = to_ap ? rm_ap_start() : 0;
    u32 vector = to_ap ? RM_AP_VECTOR : MSIX_VECTOR;

    (void)virtio_modern_begin(&m, WHO);
    virtio_modern_accept(&m, WHO, 0); /* VERSION_1 only */

    /* Vector 0: the LAPIC, fixed delivery, masked for now. */
    virtio_msix_entry(&m, 0, to_ap ? 1 : 0, vector, 1);
    virtio_msix_enable(slot, &m);
    u32 notify = virtio_modern_queue(&m, WHO, 0, QUEUE_SIZE, (u32)ring, USED_OFFSET);
    virtio_modern_driver_ok(&m);

    offer_buffer(0);
    mmio_write16(notify, 0);
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
    mmio_write16(notify, 0);
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
    virtio_msix_entry(&m, 0, 1, RM_AP_VECTOR, 0);
    offer_buffer(2);
    mmio_write16(notify, 0);
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
    u32 slot = virtio_find_device(0x10051AF4u, "virtio-rnd: no 1af4:1005 on bus 0");
    u16 legacy_io = virtio_pci_enable(slot, WHO);
    if (cmdline_has("msix"))
        run_msix(slot);
    else
        run_intx(slot, legacy_io);
    println("virtio-rnd ok");
    poweroff();
}
