/* Shared by the virtio drivers; see virtio_common.h. */
#include "virtio_common.h"

void fail_in(const char *who, const char *why)
{
    puts("FAIL ");
    puts(who);
    puts(": ");
    println(why);
    poweroff();
}

/* "FAIL <who>: <what> <n>" */
static void fail_in_dec(const char *who, const char *what, u32 n) __attribute__((noreturn));
static void fail_in_dec(const char *who, const char *what, u32 n)
{
    puts("FAIL ");
    puts(who);
    puts(": ");
    puts(what);
    print_dec(n);
    putc('\n');
    poweroff();
}

u32 virtio_find_device(u32 id, const char *missing)
{
    for (u32 slot = 0; slot < 32; slot++)
        if (cfg_read32(slot, 0) == id)
            return slot;
    fail(missing);
}

u16 virtio_pci_enable(u32 slot, const char *who)
{
    cfg_write16(slot, 0x04, 0x0007);
    u32 bar0 = cfg_read32(slot, 0x10), bar2 = cfg_read32(slot, 0x18);
    if (!(bar0 & 1) || !bar2)
        fail_in(who, "BARs not assigned");
    return bar0 & ~3u;
}

void lapic_enable(void)
{
    mmio_write32(LAPIC + 0xF0, 0x1FF);
}

void ioapic_write_rte_low(u32 gsi, u32 low)
{
    mmio_write32(IOAPIC, 0x10 + 2 * gsi);
    mmio_write32(IOAPIC + 0x10, low);
}

void ioapic_route_level(u32 gsi, u32 vector)
{
    mmio_write32(IOAPIC, 0x10 + 2 * gsi + 1);
    mmio_write32(IOAPIC + 0x10, 0);
    ioapic_write_rte_low(gsi, vector | IOAPIC_LEVEL);
}

u32 virtio_legacy_begin(u16 io)
{
    outb(io + VIO_STATUS, 0);
    outb(io + VIO_STATUS, STATUS_ACK | STATUS_DRIVER);
    return inl(io + VIO_HOST_FEATURES);
}

void virtio_legacy_queue(u16 io, const char *who, u16 q, u16 size, u32 ring)
{
    outw(io + VIO_QUEUE_SEL, q);
    if (inw(io + VIO_QUEUE_NUM) != size)
        fail_in_dec(who, "legacy queue size is not ", size);
    outl(io + VIO_QUEUE_PFN, ring >> 12);
}

#define PCI_CAP_MSIX 0x11
#define PCI_CAP_VENDOR 0x09
#define VIRTIO_CAP_COMMON 1
#define VIRTIO_CAP_NOTIFY 2
#define VIRTIO_CAP_DEVICE 4

/* The address `bir_offset` (BAR index in bits 0-2, offset above) names. */
static u32 bar_address(u32 slot, u32 bir_offset)
{
    return (cfg_read32(slot, 0x10 + 4 * (bir_offset & 7)) & ~0xFu) + (bir_offset & ~7u);
}

void virtio_modern_find(u32 slot, struct virtio_modern *m)
{
    memset(m, 0, sizeof *m);
    u32 mem = cfg_read32(slot, 0x18) & ~0xFu;
    for (u32 cap = cfg_read8(slot, 0x34); cap; cap = cfg_read8(slot, cap + 1)) {
        u8 id = cfg_read8(slot, cap);
        if (id == PCI_CAP_MSIX) {
            m->msix_cap = cap;
            m->msix_table = bar_address(slot, cfg_read32(slot, cap + 4));
            m->msix_pba = bar_address(slot, cfg_read32(slot, cap + 8));
        } else if (id == PCI_CAP_VENDOR) {
            u8 type = cfg_read8(slot, cap + 3);
            u32 at = mem + cfg_read32(slot, cap + 8);
            if (cfg_read8(slot, cap + 4) != 2)
                m->outside_bar2 = 1;
            if (type == VIRTIO_CAP_COMMON)
                m->common = at;
            if (type == VIRTIO_CAP_NOTIFY) {
                m->notify = at;
                m->notify_mult = cfg_read32(slot, cap + 16);
            }
            if (type == VIRTIO_CAP_DEVICE)
                m->device_cfg = at;
        }
    }
}

/* Common configuration registers. */
#define DEVICE_FEATURE_SELECT 0x00
#define DEVICE_FEATURE 0x04
#define DRIVER_FEATURE_SELECT 0x08
#define DRIVER_FEATURE 0x0C
#define DEVICE_STATUS 0x14
#define QUEUE_SELECT 0x16
#define QUEUE_SIZE_REG 0x18
#define QUEUE_MSIX_VECTOR 0x1A
#define QUEUE_ENABLE 0x1C
#define QUEUE_NOTIFY_OFF 0x1E
#define QUEUE_DESC 0x20
#define QUEUE_DRIVER 0x28
#define QUEUE_DEVICE 0x30

u32 virtio_modern_begin(const struct virtio_modern *m, const char *who)
{
    mmio_write8(m->common + DEVICE_STATUS, 0);
    mmio_write8(m->common + DEVICE_STATUS, STATUS_ACK | STATUS_DRIVER);
    mmio_write32(m->common + DEVICE_FEATURE_SELECT, 1);
    if (!(mmio_read32(m->common + DEVICE_FEATURE) & 1))
        fail_in(who, "VERSION_1 not offered");
    mmio_write32(m->common + DEVICE_FEATURE_SELECT, 0);
    return mmio_read32(m->common + DEVICE_FEATURE);
}

void virtio_modern_accept(const struct virtio_modern *m, const char *who, u32 features)
{
    mmio_write32(m->common + DRIVER_FEATURE_SELECT, 1);
    mmio_write32(m->common + DRIVER_FEATURE, 1); /* VERSION_1 */
    mmio_write32(m->common + DRIVER_FEATURE_SELECT, 0);
    mmio_write32(m->common + DRIVER_FEATURE, features);
    mmio_write8(m->common + DEVICE_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(mmio_read8(m->common + DEVICE_STATUS) & STATUS_FEATURES_OK))
        fail_in(who, "FEATURES_OK refused");
}

void virtio_msix_entry(const struct virtio_modern *m, u32 entry, u32 apic, u32 vector, int masked)
{
    u32 at = m->msix_table + 16 * entry;
    mmio_write32(at + 0, LAPIC | (apic << 12));
    mmio_write32(at + 4, 0);
    mmio_write32(at + 8, vector);
    mmio_write32(at + 12, masked ? 1 : 0);
}

void virtio_msix_enable(u32 slot, const struct virtio_modern *m)
{
    cfg_write16(slot, m->msix_cap + 2, 0x8000);
}

u32 virtio_modern_queue(const struct virtio_modern *m, const char *who, u16 q, u16 size, u32 ring,
                        u32 used_offset)
{
    u32 common = m->common;
    mmio_write16(common + QUEUE_SELECT, q);
    if (mmio_read16(common + QUEUE_SIZE_REG) != size)
        fail_in_dec(who, "modern queue size is not ", size);
    mmio_write16(common + QUEUE_MSIX_VECTOR, q);
    if (mmio_read16(common + QUEUE_MSIX_VECTOR) != q)
        fail_in_dec(who, "queue vector refused for queue ", q);
    mmio_write32(common + QUEUE_DESC, ring);
    mmio_write32(common + QUEUE_DESC + 4, 0);
    mmio_write32(common + QUEUE_DRIVER, ring + 16 * size);
    mmio_write32(common + QUEUE_DRIVER + 4, 0);
    mmio_write32(common + QUEUE_DEVICE, ring + used_offset);
    mmio_write32(common + QUEUE_DEVICE + 4, 0);
    mmio_write16(common + QUEUE_ENABLE, 1);
    return m->notify + mmio_read16(common + QUEUE_NOTIFY_OFF) * m->notify_mult;
}

void virtio_modern_driver_ok(const struct virtio_modern *m)
{
    mmio_write8(m->common + DEVICE_STATUS,
                STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}

void virtq_set_desc(u8 *ring, u32 index, u32 addr, u32 len, u32 flags)
{
    volatile u32 *desc = (volatile u32 *)(ring + 16 * index);
    desc[0] = addr;
    desc[1] = 0;
    desc[2] = len;
    desc[3] = flags | ((index + 1) << 16);
}

void virtq_publish(u8 *ring, u16 size, u16 n, u16 head)
{
    volatile u16 *avail = (volatile u16 *)(ring + 16 * size);
    avail[2 + n % size] = head;
    __asm__ volatile("" ::: "memory");
    avail[1] = n + 1;
}

volatile u32 *virtq_wait_used(u8 *ring, u16 size, u32 used_offset, u16 count, u32 spins_max,
                              const char *timeout)
{
    volatile u16 *used = (volatile u16 *)(ring + used_offset);
    for (u32 spins = 0; used[1] != count; spins++)
        if (spins > spins_max)
            fail(timeout);
    return (volatile u32 *)(ring + used_offset + 4 + 8 * ((count - 1) % size));
}
