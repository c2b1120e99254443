/* A minimal virtio-net driver, interrupts off. Sends one Ethernet frame (ethertype 0x88B5,
 * the IEEE's local experimental type, payload "xhyve-net guest") and waits for a frame of
 * the same type from the host, which it prints.
 *   virtio-net intx : legacy I/O BAR; completions seen as the virtio ISR status and the
 *                     IOAPIC-routed vector pending in the LAPIC IRR.
 *   virtio-net msix : modern memory BAR; the transmit vector held pending (PBA) while
 *                     masked, then pending in the LAPIC IRR; the receive vector pending in
 *                     the IRR.
 * Prints "virtio-net ok" when every check passes; anything else is a FAIL line. */
#include "tests.h"
#include "ring3.h"
#include "virtio_common.h"

#define WHO "virtio-net"
#define INTX_VECTOR 0x62
#define RX_VECTOR 0x63
#define TX_VECTOR 0x64
#define QUEUE_SIZE 1024
#define RING_BYTES 32768
#define USED_OFFSET 20480 /* descriptors and available ring, rounded up to 4 KiB */
#define BUF_LEN 2048
#define ETHERTYPE 0x88B5
#define F_MAC (1u << 5)
#define F_STATUS (1u << 16)

static u8 rings[2][RING_BYTES] __attribute__((aligned(4096)));
static u8 rx_buf[BUF_LEN] __attribute__((aligned(64)));
static u8 tx_buf[BUF_LEN] __attribute__((aligned(64)));
static u8 mac[6];
static u32 header_len;
static u16 rx_posted;
static u16 io; /* legacy I/O BAR */

/* The network thread writes the used ring, then raises the interrupt: allow it a moment. */
static int irr_pending_soon(u32 vector)
{
    for (u32 spins = 0; spins < 200000; spins++)
        if (irr_pending(vector))
            return 1;
    return 0;
}

static int isr_queue_bit_soon(u16 isr_port)
{
    for (u32 spins = 0; spins < 200000; spins++)
        if (inb(isr_port) & 1)
            return 1;
    return 0;
}

/* Puts one buffer in descriptor 0 of queue `q` and publishes it as entry `n`. */
static void offer(int q, u16 n, u8 *buf, u32 len, u32 flags)
{
    virtq_set_desc(rings[q], 0, (u32)buf, len, flags);
    virtq_publish(rings[q], QUEUE_SIZE, n, 0);
}

/* Waits until queue `q` has used `count` buffers; returns the length of the last. */
static u32 wait_used(int q, u16 count, u32 spins_max, const char *what)
{
    volatile u32 *elem = virtq_wait_used(rings[q], QUEUE_SIZE, USED_OFFSET, count, spins_max, what);
    if (elem[0] != 0)
        fail("virtio-net: used element names another descriptor");
    return elem[1];
}

static void print_mac_and_link(u16 status)
{
    puts("virtio-net mac ");
    for (int i = 0; i < 6; i++) {
        print_hex(mac[i], 2);
        if (i < 5)
            putc(':');
    }
    putc('\n');
    if (!(status & 1))
        fail("virtio-net: link down");
    println("virtio-net link up");
}

static u32 build_frame(void)
{
    static const char payload[] = "xhyve-net guest";
    u8 *f = tx_buf + header_len;
    memset(tx_buf, 0, header_len);
    memset(f, 0xFF, 6);
    memcpy(f + 6, mac, 6);
    f[12] = ETHERTYPE >> 8;
    f[13] = ETHERTYPE & 0xFF;
    memcpy(f + 14, payload, sizeof(payload));
    return header_len + 14 + sizeof(payload);
}

/* `ring3` on the command line: the receive interrupt is taken while waiting in ring 3 with
 * interrupts on (ring3.h). INTx handlers mask the level pin before their EOI; the line stays
 * high until the ISR read. rx_vector and intx_gsi are set by run_intx/run_msix. */
static u32 rx_vector, intx_gsi, rx_runs;

static u32 rx_actions(void)
{
    return R3_EOI_LAPIC | (rx_vector == INTX_VECTOR ? R3_MASK_PIN : 0);
}

static void arm_rx_interrupt(void)
{
    ring3_handle(rx_vector, rx_actions(), intx_gsi, 1);
    if (rx_vector == INTX_VECTOR)
        ioapic_write_rte_low(intx_gsi, INTX_VECTOR | IOAPIC_LEVEL);
}

/* Posts receive buffers until one holds our ethertype (the host may send others first). */
static void receive(void (*notify_rx)(void), void (*check_rx_irq)(void))
{
    int ring3 = cmdline_has("ring3");
    if (ring3) {
        /* Take what the transmit left pending first (INTx shares its vector; MSI-X's transmit
         * vector, left unmasked, must be EOId too, or its in-service bit holds back the
         * receive vector of the same priority class). */
        ring3_handle(TX_VECTOR, R3_EOI_LAPIC, 0, 0);
        ring3_handle(rx_vector, rx_actions(), intx_gsi, 1);
        ring3_wait(rx_vector, 1, 100);
    }
    for (int tries = 0; tries < 16; tries++) {
        memset(rx_buf, 0, BUF_LEN);
        offer(0, rx_posted, rx_buf, BUF_LEN, DESC_F_WRITE);
        rx_posted++;
        if (ring3)
            arm_rx_interrupt();
        notify_rx();
        if (ring3)
            rx_runs = ring3_wait(rx_vector, 1, 30000);
        u32 len = wait_used(0, rx_posted, 20000000u, "virtio-net: no frame received");
        u8 *f = rx_buf + header_len;
        if (len < header_len + 14 || f[12] != (ETHERTYPE >> 8) || f[13] != (ETHERTYPE & 0xFF)) {
            if (rx_vector == INTX_VECTOR)
                (void)inb(io + VIO_ISR); /* lower the line for the next try */
            continue;
        }
        if (ring3) {
            puts("virtio-net ring3 rx handler runs ");
            print_dec(rx_runs);
            putc('\n');
            if (!rx_runs)
                fail("virtio-net: no receive interrupt in ring 3");
            if (rx_vector == INTX_VECTOR)
                check_rx_irq(); /* the ISR bit */
        } else {
            check_rx_irq();
        }
        puts("virtio-net got ");
        for (u32 i = header_len + 14; i < len && rx_buf[i] >= 0x20 && rx_buf[i] < 0x7F; i++)
            putc(rx_buf[i]);
        putc('\n');
        for (int i = 0; i < 6; i++)
            if (f[i] != mac[i])
                fail("virtio-net: frame not addressed to our MAC");
        return;
    }
    fail("virtio-net: only foreign frames received");
}

/* ---- legacy interface, INTx ---- */

static void legacy_notify_rx(void) { outw(io + VIO_QUEUE_NOTIFY, 0); }

static void legacy_check_rx_irq(void)
{
    if (!isr_queue_bit_soon(io + VIO_ISR))
        fail("virtio-net: ISR queue bit not set after receive");
    println("virtio-net rx isr 01");
}

static void run_intx(u32 slot, u16 legacy_io)
{
    io = legacy_io;
    u32 gsi = cfg_read8(slot, 0x3C);
    intx_gsi = gsi;
    rx_vector = INTX_VECTOR;
    lapic_enable();
    ioapic_route_level(gsi, INTX_VECTOR);

    u32 features = virtio_legacy_begin(io);
    if ((features & (F_MAC | F_STATUS)) != (F_MAC | F_STATUS))
        fail("virtio-net: MAC or STATUS not offered");
    outl(io + VIO_GUEST_FEATURES, F_MAC | F_STATUS);
    header_len = 10;
    for (int i = 0; i < 6; i++)
        mac[i] = inb(io + VIO_CONFIG + i);
    print_mac_and_link(inw(io + VIO_CONFIG + 6));
    for (u16 q = 0; q < 2; q++)
        virtio_legacy_queue(io, WHO, q, QUEUE_SIZE, (u32)rings[q]);
    outb(io + VIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);

    offer(1, 0, tx_buf, build_frame(), 0);
    outw(io + VIO_QUEUE_NOTIFY, 1);
    wait_used(1, 1, 20000000u, "virtio-net: frame not sent");
    println("virtio-net sent");
    if (!irr_pending_soon(INTX_VECTOR))
        fail("virtio-net: INTx vector not pending in the LAPIC IRR");
    println("virtio-net intx irq pending");
    if (!isr_queue_bit_soon(io + VIO_ISR))
        fail("virtio-net: ISR queue bit not set after transmit");
    println("virtio-net tx isr 01");
    receive(legacy_notify_rx, legacy_check_rx_irq);
}

/* ---- modern interface, MSI-X ---- */

static u32 notify_at[2];

static void modern_notify(u16 q)
{
    mmio_write16(notify_at[q], q);
}

static void modern_notify_rx(void) { modern_notify(0); }

static void modern_check_rx_irq(void)
{
    if (!irr_pending_soon(RX_VECTOR))
        fail("virtio-net: receive MSI-X vector not pending in the LAPIC IRR");
    println("virtio-net rx msix irq pending");
}

static void run_msix(u32 slot)
{
    struct virtio_modern m;
    virtio_modern_find(slot, &m);
    if (!m.common || !m.notify || !m.device_cfg || !m.msix_cap)
        fail("virtio-net: missing common/notify/device/MSI-X capability");
    u32 table = m.msix_table, pba = m.msix_pba;
    rx_vector = RX_VECTOR;
    lapic_enable();

    (void)virtio_modern_begin(&m, WHO);
    virtio_modern_accept(&m, WHO, F_MAC | F_STATUS);
    header_len = 12;
    for (int i = 0; i < 6; i++)
        mac[i] = mmio_read8(m.device_cfg + i);
    print_mac_and_link(mmio_read16(m.device_cfg + 6));

    /* Entry 0: receive, unmasked. Entry 1: transmit, masked for now. */
    virtio_msix_entry(&m, 0, 0, RX_VECTOR, 0);
    virtio_msix_entry(&m, 1, 0, TX_VECTOR, 1);
    virtio_msix_enable(slot, &m);
    for (u16 q = 0; q < 2; q++)
        notify_at[q] = virtio_modern_queue(&m, WHO, q, QUEUE_SIZE, (u32)rings[q], USED_OFFSET);
    virtio_modern_driver_ok(&m);

    offer(1, 0, tx_buf, build_frame(), 0);
    modern_notify(1);
    wait_used(1, 1, 20000000u, "virtio-net: frame not sent");
    println("virtio-net sent");
    /* The used ring is written before the interrupt: give the network thread a moment. */
    for (u32 spins = 0; !(mmio_read32(pba) & 2); spins++)
        if (spins > 200000)
            fail("virtio-net: masked transmit vector not pending in the PBA");
    if (irr_pending(TX_VECTOR))
        fail("virtio-net: masked MSI-X vector reached the LAPIC");
    println("virtio-net tx msix pending while masked");
    mmio_write32(table + 16 + 12, 0);
    if (!irr_pending(TX_VECTOR))
        fail("virtio-net: transmit MSI-X vector not pending in the LAPIC IRR");
    println("virtio-net tx msix irq pending");
    receive(modern_notify_rx, modern_check_rx_irq);
}

void test_virtio_net(const struct mb_info *mbi)
{
    (void)mbi;
    u32 slot = virtio_find_device(0x10001AF4u, "virtio-net: no 1af4:1000 on bus 0");
    u16 legacy_io = virtio_pci_enable(slot, WHO);
    if (cmdline_has("msix"))
        run_msix(slot);
    else
        run_intx(slot, legacy_io);
    println("virtio-net ok");
    poweroff();
}
