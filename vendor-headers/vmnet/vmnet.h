/*
 * The parts of macOS vmnet.framework (and the libxpc / libdispatch calls around it) that
 * xhyve-rs calls from src/net/vmnet.rs. Written by the xhyve-rs authors from Apple's public
 * vmnet reference (macOS 10.10 and later, SDK 10.15 era); declarations only, in our own
 * formatting. The Rust declarations in src/net/vmnet.rs must match these.
 */
#ifndef XHYVE_RS_VMNET_H
#define XHYVE_RS_VMNET_H

#include <stdint.h>
#include <stddef.h>
#include <sys/uio.h>

/* ---- libxpc: a reference-counted dictionary object ---------------------------------- */
typedef void *xpc_object_t;

xpc_object_t xpc_dictionary_create(const char *const *keys, const xpc_object_t *values,
                                   size_t count);
void xpc_dictionary_set_uint64(xpc_object_t dictionary, const char *key, uint64_t value);
void xpc_dictionary_set_string(xpc_object_t dictionary, const char *key, const char *value);
void xpc_dictionary_set_uuid(xpc_object_t dictionary, const char *key,
                             const unsigned char uuid[16]);
uint64_t xpc_dictionary_get_uint64(xpc_object_t dictionary, const char *key);
/* NULL when the key is missing; owned by the dictionary. */
const char *xpc_dictionary_get_string(xpc_object_t dictionary, const char *key);
void xpc_release(xpc_object_t object);

/* ---- libdispatch: the queues vmnet runs its blocks on ------------------------------- */
typedef void *dispatch_queue_t;
typedef void *dispatch_queue_attr_t; /* NULL: a serial queue */

dispatch_queue_t dispatch_queue_create(const char *label, dispatch_queue_attr_t attr);
void dispatch_release(void *object);

/* ---- vmnet ---------------------------------------------------------------------------- */
typedef uint32_t vmnet_return_t;
enum {
    VMNET_SUCCESS = 1000,
    VMNET_FAILURE = 1001,
    VMNET_MEM_FAILURE = 1002,
    VMNET_INVALID_ARGUMENT = 1003,
    VMNET_SETUP_INCOMPLETE = 1004,
    VMNET_INVALID_ACCESS = 1005,
    VMNET_PACKET_TOO_BIG = 1006,
    VMNET_BUFFER_EXHAUSTED = 1007,
    VMNET_TOO_MANY_PACKETS = 1008,
};

typedef uint32_t operating_modes_t;
enum {
    VMNET_HOST_MODE = 1000,
    VMNET_SHARED_MODE = 1001,
};

typedef uint32_t interface_event_t;
enum {
    VMNET_INTERFACE_PACKETS_AVAILABLE = 1 << 0,
};

typedef struct vmnet_interface *interface_ref;

/* One packet: its iovecs, and on return from vmnet_read its length. */
struct vmpktdesc {
    size_t vm_pkt_size;
    struct iovec *vm_pkt_iov;
    uint32_t vm_pkt_iovcnt;
    uint32_t vm_flags;
};

/* Dictionary keys (const char * variables exported by the framework). */
extern const char *vmnet_operation_mode_key;   /* uint64: operating_modes_t */
extern const char *vmnet_interface_id_key;     /* uuid: the same id gives the same MAC */
extern const char *vmnet_mac_address_key;      /* string "xx:xx:xx:xx:xx:xx" (reply) */
extern const char *vmnet_mtu_key;              /* uint64 (reply) */
extern const char *vmnet_max_packet_size_key;  /* uint64 (reply) */

/*
 * Blocks are Apple's C closures. The handler runs once on `queue` with the outcome and, on
 * success, a dictionary of the interface's parameters valid only during the call.
 */
interface_ref vmnet_start_interface(
    xpc_object_t interface_desc, dispatch_queue_t queue,
    void (^handler)(vmnet_return_t status, xpc_object_t interface_param));

vmnet_return_t vmnet_stop_interface(interface_ref interface, dispatch_queue_t queue,
                                    void (^handler)(vmnet_return_t status));

/* The callback runs on `queue` whenever an event of `event_mask` happens. */
vmnet_return_t vmnet_interface_set_event_callback(
    interface_ref interface, interface_event_t event_mask, dispatch_queue_t queue,
    void (^callback)(interface_event_t event_mask, xpc_object_t event));

/* *pktcnt: in, how many descriptors; out, how many packets moved. Never blocks. */
vmnet_return_t vmnet_read(interface_ref interface, struct vmpktdesc *packets, int *pktcnt);
vmnet_return_t vmnet_write(interface_ref interface, struct vmpktdesc *packets, int *pktcnt);

#endif
