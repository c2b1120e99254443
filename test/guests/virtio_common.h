/* What the virtio drivers (virtio.c, virtio_blk.c, net.c, blkbench.c) share: finding the
 * device, the LAPIC and IOAPIC setup for INTx, the legacy and modern (1.x) interfaces'
 * negotiation and queue setup, and the split ring's available and used sides.
 * `who` names the driver in FAIL lines ("FAIL <who>: <why>"). */
#ifndef GUEST_VIRTIO_COMMON_H
#define GUEST_VIRTIO_COMMON_H
#include "lib.h"

#define IOAPIC 0xFEC00000u
#define IOAPIC_LEVEL (1u << 15)

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

/* Legacy (0.9.5) I/O BAR registers. */
#define VIO_HOST_FEATURES 0x00
#define VIO_GUEST_FEATURES 0x04
#define VIO_QUEUE_PFN 0x08
#define VIO_QUEUE_NUM 0x0C
#define VIO_QUEUE_SEL 0x0E
#define VIO_QUEUE_NOTIFY 0x10
#define VIO_STATUS 0x12
#define VIO_ISR 0x13
#define VIO_CONFIG 0x14

/* "FAIL <who>: <why>", then power off. */
void fail_in(const char *who, const char *why) __attribute__((noreturn));

/* The bus 0 slot whose vendor/device dword is `id`, or FAIL `missing`. */
u32 virtio_find_device(u32 id, const char *missing);

/* Turns on I/O, memory and bus mastering; FAIL unless BAR 0 (legacy I/O) and BAR 2 (modern
 * memory) are assigned. Returns the legacy I/O base. */
u16 virtio_pci_enable(u32 slot, const char *who);

/* LAPIC software enable, spurious vector 0xFF. */
void lapic_enable(void);
/* IOAPIC pin `gsi`: the low dword of its redirection entry. */
void ioapic_write_rte_low(u32 gsi, u32 low);
/* IOAPIC pin `gsi` -> `vector`, fixed, level, active high, destination APIC 0, unmasked. */
void ioapic_route_level(u32 gsi, u32 vector);

/* Legacy interface: reset, ACKNOWLEDGE|DRIVER; returns the device's features. */
u32 virtio_legacy_begin(u16 io);
/* Legacy interface: checks queue `q` has `size` entries and places its ring at `ring`
 * (4 KiB aligned, the legacy layout). */
void virtio_legacy_queue(u16 io, const char *who, u16 q, u16 size, u32 ring);

/* The modern interface, as its PCI capabilities place it in BAR 2, and MSI-X. Each field is
 * 0 when its capability is missing; `outside_bar2` is set when a virtio capability names
 * another BAR. */
struct virtio_modern {
    u32 common, notify, notify_mult, device_cfg;
    u32 msix_cap, msix_table, msix_pba;
    int outside_bar2;
};
void virtio_modern_find(u32 slot, struct virtio_modern *m);
/* Reset, ACKNOWLEDGE|DRIVER, FAIL unless VERSION_1 is offered; returns feature bits 0-31. */
u32 virtio_modern_begin(const struct virtio_modern *m, const char *who);
/* Accepts VERSION_1 and `features` (bits 0-31), then FEATURES_OK, which must stick. */
void virtio_modern_accept(const struct virtio_modern *m, const char *who, u32 features);
/* MSI-X table entry `entry`: fixed delivery of `vector` to APIC ID `apic`. */
void virtio_msix_entry(const struct virtio_modern *m, u32 entry, u32 apic, u32 vector, int masked);
void virtio_msix_enable(u32 slot, const struct virtio_modern *m);
/* Sets queue `q` up on MSI-X entry `q`: checks it has `size` entries, places the descriptors
 * at `ring`, the available ring after them, the used ring at ring + used_offset, enables
 * it; returns its notify address. */
u32 virtio_modern_queue(const struct virtio_modern *m, const char *who, u16 q, u16 size, u32 ring,
                        u32 used_offset);
void virtio_modern_driver_ok(const struct virtio_modern *m);

/* Split ring of `size` entries at `ring`: descriptor `index` (next = index + 1). */
void virtq_set_desc(u8 *ring, u32 index, u32 addr, u32 len, u32 flags);
/* Publishes chain `head` as available entry `n` (so the index becomes n + 1). */
void virtq_publish(u8 *ring, u16 size, u16 n, u16 head);
/* Waits until the used index reaches `count` (FAIL `timeout` after `spins_max` polls);
 * returns the last used element: [0] = chain head, [1] = length written. */
volatile u32 *virtq_wait_used(u8 *ring, u16 size, u32 used_offset, u16 count, u32 spins_max,
                              const char *timeout);

#endif
