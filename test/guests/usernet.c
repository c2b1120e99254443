/* An IPv4 client over virtio-net for the user-mode network back ends (the built-in libslirp
 * network, passt): legacy interface, interrupts off, the used rings polled.
 *   usernet port P [fwd G] [tcp T]
 * 1. DHCP: DISCOVER, OFFER, REQUEST, ACK; prints the address and the router.
 * 2. ARP for the router; prints its MAC.
 * 3. A UDP datagram from port 4000 to the router's port P (the host's 127.0.0.1:P) and the
 *    host's reply back.
 * 4. fwd G: a datagram forwarded from the host to our UDP port G, echoed back.
 * 5. tcp T: a host connection forwarded to our TCP port T: SYN answered, the host's data
 *    acknowledged and answered, then FIN.
 * ARP requests for our address are answered throughout. Prints "usernet ok" at the end. */
#include "tests.h"
#include "virtio_common.h"

#define WHO "usernet"
#define QUEUE_SIZE 1024
#define RING_BYTES 32768
#define USED_OFFSET 20480
#define RX_BUFS 16
#define BUF_LEN 2048
#define HDR 10 /* legacy virtio-net header, no MRG_RXBUF */
#define SPINS 40000000u
#define XID 0x78687976u

static u8 rings[2][RING_BYTES] __attribute__((aligned(4096)));
static u8 rx_bufs[RX_BUFS][BUF_LEN] __attribute__((aligned(64)));
static u8 tx_buf[BUF_LEN] __attribute__((aligned(64)));
static u8 mac[6], router_mac[6];
static u8 my_ip[4], router[4], server_id[4];
static u16 io, rx_avail, rx_seen, tx_count;

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = v & 0xFF; }
static void put32(u8 *p, u32 v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static int same(const u8 *a, const u8 *b, u32 n)
{
    for (u32 i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

static u32 sum16(const u8 *p, u32 n, u32 sum)
{
    for (u32 i = 0; i + 1 < n; i += 2)
        sum += be16(p + i);
    if (n & 1)
        sum += (u32)p[n - 1] << 8;
    return sum;
}

static u16 fold(u32 sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (u16)~sum;
}

static void print_ip(const u8 *ip)
{
    for (int i = 0; i < 4; i++) {
        print_dec(ip[i]);
        if (i < 3)
            putc('.');
    }
}

static void print_mac(const u8 *m)
{
    for (int i = 0; i < 6; i++) {
        print_hex(m[i], 2);
        if (i < 5)
            putc(':');
    }
}

static u32 parse_dec(const char *s)
{
    u32 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u32)(*s++ - '0');
    return v;
}

static void post_rx(u16 buf)
{
    virtq_set_desc(rings[0], buf, (u32)rx_bufs[buf], BUF_LEN, DESC_F_WRITE);
    virtq_publish(rings[0], QUEUE_SIZE, rx_avail++, buf);
}

/* ---- frames out ---- */

static u8 *tx_frame(const u8 *dst, u16 type)
{
    memset(tx_buf, 0, HDR);
    u8 *f = tx_buf + HDR;
    memcpy(f, dst, 6);
    memcpy(f + 6, mac, 6);
    put16(f + 12, type);
    return f + 14;
}

static void transmit(u32 l3_len)
{
    /* No padding to Ethernet's 60 bytes: a virtual NIC needs none (Linux's driver pads
     * nothing either), and some stacks (passt 2023) count the pad as TCP payload. */
    u32 len = HDR + 14 + l3_len;
    virtq_set_desc(rings[1], 0, (u32)tx_buf, len, 0);
    virtq_publish(rings[1], QUEUE_SIZE, tx_count, 0);
    tx_count++;
    outw(io + VIO_QUEUE_NOTIFY, 1);
    virtq_wait_used(rings[1], QUEUE_SIZE, USED_OFFSET, tx_count, SPINS, "usernet: frame not sent");
}

/* Fills an IPv4 header for `payload` bytes of `proto` and returns where the payload goes. */
static u8 *ip_header(u8 *ip, const u8 *src, const u8 *dst, u8 proto, u32 payload)
{
    memset(ip, 0, 20);
    ip[0] = 0x45;
    put16(ip + 2, (u16)(20 + payload));
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto;
    memcpy(ip + 12, src, 4);
    memcpy(ip + 16, dst, 4);
    put16(ip + 10, fold(sum16(ip, 20, 0)));
    return ip + 20;
}

/* UDP without a checksum (zero: allowed over IPv4). */
static void send_udp(const u8 *dst_mac, const u8 *src, u16 sport, const u8 *dst, u16 dport,
                     const u8 *data, u32 n)
{
    u8 *udp = ip_header(tx_frame(dst_mac, 0x0800), src, dst, 17, 8 + n);
    put16(udp, sport);
    put16(udp + 2, dport);
    put16(udp + 4, (u16)(8 + n));
    put16(udp + 6, 0);
    memcpy(udp + 8, data, n);
    transmit(20 + 8 + n);
}

static void send_tcp(const u8 *src, u16 sport, const u8 *dst, u16 dport, u32 seq, u32 ack,
                     u8 flags, const char *data, u32 n)
{
    u8 *tcp = ip_header(tx_frame(router_mac, 0x0800), src, dst, 6, 20 + n);
    memset(tcp, 0, 20);
    put16(tcp, sport);
    put16(tcp + 2, dport);
    put32(tcp + 4, seq);
    put32(tcp + 8, ack);
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    put16(tcp + 14, 8192);
    memcpy(tcp + 20, data, n);
    u8 pseudo[12];
    memcpy(pseudo, src, 4);
    memcpy(pseudo + 4, dst, 4);
    pseudo[8] = 0;
    pseudo[9] = 6;
    put16(pseudo + 10, (u16)(20 + n));
    put16(tcp + 16, fold(sum16(tcp, 20 + n, sum16(pseudo, 12, 0))));
    transmit(20 + 20 + n);
}

static void send_arp(u16 op, const u8 *tha, const u8 *tpa, const u8 *eth_dst)
{
    u8 *a = tx_frame(eth_dst, 0x0806);
    put16(a, 1);
    put16(a + 2, 0x0800);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, mac, 6);
    memcpy(a + 14, my_ip, 4);
    memcpy(a + 18, tha, 6);
    memcpy(a + 24, tpa, 4);
    transmit(28);
}

static void send_dhcp(u8 type)
{
    static const u8 bcast_mac[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
    static const u8 zero_ip[4] = { 0, 0, 0, 0 }, bcast_ip[4] = { 255, 255, 255, 255 };
    static u8 b[300];
    memset(b, 0, sizeof(b));
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    put32(b + 4, XID);
    b[10] = 0x80; /* replies broadcast: no address yet */
    memcpy(b + 28, mac, 6);
    put32(b + 236, 0x63825363);
    u8 *o = b + 240;
    *o++ = 53; *o++ = 1; *o++ = type;
    if (type == 3) {
        *o++ = 50; *o++ = 4; memcpy(o, my_ip, 4); o += 4;
        *o++ = 54; *o++ = 4; memcpy(o, server_id, 4); o += 4;
    }
    *o++ = 255;
    send_udp(bcast_mac, zero_ip, 68, bcast_ip, 67, b, (u32)(o - b));
}

/* ---- frames in ---- */

/* The next received frame (after answering ARP requests for us), or 0 after `spins_max`. */
static u8 *receive_within(u32 *len, u32 spins_max)
{
    volatile u16 *used = (volatile u16 *)(rings[0] + USED_OFFSET);
    for (u32 spins = 0;; spins++) {
        if (used[1] == rx_seen) {
            if (spins > spins_max)
                return 0;
            cpu_relax();
            continue;
        }
        volatile u32 *elem = (volatile u32 *)(rings[0] + USED_OFFSET + 4 + 8 * (rx_seen % QUEUE_SIZE));
        u16 buf = (u16)elem[0];
        u32 n = elem[1];
        rx_seen++;
        if (buf >= RX_BUFS || n < HDR + 14 || n > BUF_LEN)
            fail("usernet: bad used element");
        static u8 frame[BUF_LEN];
        memcpy(frame, rx_bufs[buf] + HDR, n - HDR);
        post_rx(buf);
        outw(io + VIO_QUEUE_NOTIFY, 0);
        u8 *a = frame + 14;
        if (be16(frame + 12) == 0x0806 && n - HDR >= 42 && be16(a + 6) == 1 && same(a + 24, my_ip, 4)) {
            send_arp(2, a + 8, a + 14, a + 8);
            continue;
        }
        *len = n - HDR;
        return frame;
    }
}

/* The next received frame, or fails after SPINS. */
static u8 *receive(u32 *len, const char *what)
{
    u8 *f = receive_within(len, SPINS);
    if (!f)
        fail(what);
    return f;
}

/* Requests (DHCP, ARP) are sent again this often while no answer comes, as real clients do. */
#define RETRY_SPINS (SPINS / 8)
#define TRIES 8

/* The UDP payload of an IPv4/UDP frame to our port `port`, or 0. */
static u8 *udp_to(u8 *f, u32 len, u16 port, u32 *n, u8 **ip_out)
{
    if (len < 14 + 28 || be16(f + 12) != 0x0800 || f[14 + 9] != 17 || (f[14] & 0xF) != 5)
        return 0;
    u8 *udp = f + 34;
    u32 ulen = be16(udp + 4);
    if (be16(udp + 2) != port || ulen < 8 || 34 + ulen > len)
        return 0;
    *n = ulen - 8;
    if (ip_out)
        *ip_out = f + 14;
    return udp + 8;
}

static const u8 *dhcp_option(const u8 *b, u32 n, u8 code)
{
    for (u32 i = 240; i + 1 < n;) {
        if (b[i] == 0) { i++; continue; }
        if (b[i] == 255)
            break;
        if (b[i] == code && i + 2 + b[i + 1] <= n)
            return b + i + 2;
        i += 2 + b[i + 1];
    }
    return 0;
}

static void dhcp(void)
{
    for (int step = 0; step < 2; step++) {
        int tries = 0;
        send_dhcp(step == 0 ? 1 : 3);
        for (;;) {
            u32 len, n;
            u8 *f = receive_within(&len, RETRY_SPINS);
            if (!f) {
                if (++tries == TRIES)
                    fail(step == 0 ? "usernet: no DHCP offer" : "usernet: no DHCP ack");
                send_dhcp(step == 0 ? 1 : 3);
                continue;
            }
            u8 *b = udp_to(f, len, 68, &n, 0);
            if (!b || n < 244 || b[0] != 2 || be32(b + 4) != XID)
                continue;
            const u8 *type = dhcp_option(b, n, 53);
            if (!type || *type != (step == 0 ? 2 : 5))
                continue;
            memcpy(my_ip, b + 16, 4);
            const u8 *sid = dhcp_option(b, n, 54), *rt = dhcp_option(b, n, 3);
            if (sid)
                memcpy(server_id, sid, 4);
            if (rt)
                memcpy(router, rt, 4);
            break;
        }
    }
    puts("usernet dhcp ");
    print_ip(my_ip);
    puts(" router ");
    print_ip(router);
    putc('\n');
}

static void arp_router(void)
{
    static const u8 zero_mac[6] = { 0, 0, 0, 0, 0, 0 };
    static const u8 bcast_mac[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
    int tries = 0;
    send_arp(1, zero_mac, router, bcast_mac);
    for (;;) {
        u32 len;
        u8 *f = receive_within(&len, RETRY_SPINS);
        if (!f) {
            if (++tries == TRIES)
                fail("usernet: no ARP reply");
            send_arp(1, zero_mac, router, bcast_mac);
            continue;
        }
        u8 *a = f + 14;
        if (be16(f + 12) == 0x0806 && len >= 42 && be16(a + 6) == 2 && same(a + 14, router, 4)) {
            memcpy(router_mac, a + 8, 6);
            break;
        }
    }
    puts("usernet arp ");
    print_ip(router);
    puts(" is ");
    print_mac(router_mac);
    putc('\n');
}

static void print_payload(const char *what, const u8 *p, u32 n)
{
    puts(what);
    for (u32 i = 0; i < n && p[i] >= 0x20 && p[i] < 0x7F; i++)
        putc((char)p[i]);
    putc('\n');
}

static void udp_to_host(u16 port)
{
    static const char msg[] = "xhyve-usernet guest";
    int tries = 0;
    send_udp(router_mac, my_ip, 4000, router, port, (const u8 *)msg, sizeof(msg) - 1);
    println("usernet udp sent");
    for (;;) {
        u32 len, n;
        u8 *f = receive_within(&len, RETRY_SPINS);
        if (!f) {
            if (++tries == TRIES)
                fail("usernet: no UDP reply from the host");
            send_udp(router_mac, my_ip, 4000, router, port, (const u8 *)msg, sizeof(msg) - 1);
            continue;
        }
        u8 *p = udp_to(f, len, 4000, &n, 0);
        if (p) {
            print_payload("usernet udp reply ", p, n);
            return;
        }
    }
}

static void udp_forward(u16 port)
{
    static const char msg[] = "xhyve-usernet fwd reply";
    for (;;) {
        u32 len, n;
        u8 *ip;
        u8 *f = receive(&len, "usernet: no forwarded datagram");
        u8 *p = udp_to(f, len, port, &n, &ip);
        if (!p)
            continue;
        print_payload("usernet fwd got ", p, n);
        send_udp(router_mac, my_ip, port, ip + 12, be16(ip + 20), (const u8 *)msg, sizeof(msg) - 1);
        return;
    }
}

static void tcp_forward(u16 port)
{
    static const char msg[] = "xhyve-usernet tcp reply";
    u8 peer[4];
    u16 peer_port = 0;
    u32 seq = 1000, ack = 0;
    int established = 0;
    for (;;) {
        u32 len;
        u8 *f = receive(&len, established ? "usernet: no TCP data" : "usernet: no TCP SYN");
        u8 *ip = f + 14;
        if (len < 54 || be16(f + 12) != 0x0800 || ip[9] != 6 || (ip[0] & 0xF) != 5)
            continue;
        u8 *tcp = ip + 20;
        u32 total = be16(ip + 2), off = (u32)(tcp[12] >> 4) * 4;
        if (be16(tcp + 2) != port || total > len - 14 || off < 20 || 20 + off > total)
            continue;
        u8 flags = tcp[13];
        if (flags & 0x02) { /* SYN (again, if our SYN-ACK was lost) */
            memcpy(peer, ip + 12, 4);
            peer_port = be16(tcp);
            ack = be32(tcp + 4) + 1;
            send_tcp(my_ip, port, peer, peer_port, seq, ack, 0x12, "", 0);
            if (!established)
                println("usernet tcp syn answered");
            established = 1;
            continue;
        }
        u32 n = total - 20 - off;
        if (!established || n == 0 || be16(tcp) != peer_port)
            continue;
        print_payload("usernet tcp got ", tcp + off, n);
        ack = be32(tcp + 4) + n;
        seq++;
        send_tcp(my_ip, port, peer, peer_port, seq, ack, 0x18, msg, sizeof(msg) - 1);
        seq += sizeof(msg) - 1;
        send_tcp(my_ip, port, peer, peer_port, seq, ack, 0x11, "", 0);
        return;
    }
}

void test_usernet(const struct mb_info *mbi)
{
    (void)mbi;
    u32 slot = virtio_find_device(0x10001AF4u, "usernet: no virtio-net on bus 0");
    io = virtio_pci_enable(slot, WHO);
    u32 features = virtio_legacy_begin(io);
    if (!(features & (1u << 5)))
        fail("usernet: no MAC offered");
    outl(io + VIO_GUEST_FEATURES, 1u << 5);
    for (int i = 0; i < 6; i++)
        mac[i] = inb(io + VIO_CONFIG + i);
    for (u16 q = 0; q < 2; q++)
        virtio_legacy_queue(io, WHO, q, QUEUE_SIZE, (u32)rings[q]);
    outb(io + VIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
    for (u16 b = 0; b < RX_BUFS; b++)
        post_rx(b);
    outw(io + VIO_QUEUE_NOTIFY, 0);
    puts("usernet mac ");
    print_mac(mac);
    putc('\n');

    dhcp();
    arp_router();
    u32 port = parse_dec(cmdline_after("port"));
    if (port)
        udp_to_host((u16)port);
    u32 fwd = parse_dec(cmdline_after("fwd"));
    if (fwd) {
        println("usernet fwd ready");
        udp_forward((u16)fwd);
    }
    u32 tcp = parse_dec(cmdline_after("tcp"));
    if (tcp) {
        println("usernet tcp ready");
        tcp_forward((u16)tcp);
    }
    println("usernet ok");
    poweroff();
}
