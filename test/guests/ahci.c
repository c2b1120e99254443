/* A minimal AHCI driver for port 0 of the first 8086:2821 function, interrupts off.
 *   ahci-hd [msi] : IDENTIFY DEVICE, then READ DMA EXT of LBA 1; prints the sector count,
 *                   the first 16 bytes and a checksum of the sector. Then WRITE DMA EXT of
 *                   LBA 2 (byte i = i ^ 0xA5) and FLUSH CACHE EXT, for the host to check.
 *   ahci-cd [msi] : ATAPI READ(10) of block 16 of an ISO (the primary volume descriptor);
 *                   prints its volume identifier.
 * After each command it checks PxTFD, PxIS.DHRS, IS bit 0 and the interrupt: the vector
 * pending in the LAPIC IRR, routed through the IOAPIC (INTx) or sent as MSI.
 * Prints "ahci ok" when every check passes; anything else is a FAIL line. */
#include "tests.h"
#include "ring3.h"

#define IOAPIC 0xFEC00000u
#define INTX_VECTOR 0x53
#define MSI_VECTOR 0x54

/* Port 0 registers, from the ABAR. */
#define P_CLB 0x100
#define P_CLBU 0x104
#define P_FB 0x108
#define P_FBU 0x10C
#define P_IS 0x110
#define P_IE 0x114
#define P_CMD 0x118
#define P_TFD 0x120
#define P_SIG 0x124
#define P_SSTS 0x128
#define P_SERR 0x130
#define P_CI 0x138

static u8 cmd_list[1024] __attribute__((aligned(1024)));
static u8 rx_fis[256] __attribute__((aligned(256)));
static u8 cmd_table[256] __attribute__((aligned(128)));
static u8 data[2048] __attribute__((aligned(4096)));

static u32 abar;
static u32 vector;
static u32 intx_gsi;
static int msi;


static u32 rd(u32 reg) { return mmio_read32(abar + reg); }
static void wr(u32 reg, u32 v) { mmio_write32(abar + reg, v); }


static u32 find_ahci(void)
{
    for (u32 slot = 0; slot < 32; slot++)
        if (cfg_read32(slot, 0) == 0x28218086u)
            return slot;
    fail("ahci: no 8086:2821 on bus 0");
}

static void route_interrupt(u32 slot)
{
    mmio_write32(LAPIC + 0xF0, 0x1FF);
    if (cmdline_has("msi")) {
        u32 cap = cfg_read8(slot, 0x34);
        while (cap && cfg_read8(slot, cap) != 0x05)
            cap = cfg_read8(slot, cap + 1);
        if (!cap)
            fail("ahci: no MSI capability");
        cfg_write32(slot, cap + 4, LAPIC);
        cfg_write32(slot, cap + 8, 0);
        cfg_write16(slot, cap + 12, MSI_VECTOR);
        cfg_write16(slot, cap + 2, 1);
        vector = MSI_VECTOR;
        msi = 1;
        println("ahci msi enabled");
    } else {
        u32 gsi = cfg_read8(slot, 0x3C);
        intx_gsi = gsi;
        mmio_write32(IOAPIC, 0x10 + 2 * gsi + 1);
        mmio_write32(IOAPIC + 0x10, 0);
        mmio_write32(IOAPIC, 0x10 + 2 * gsi);
        mmio_write32(IOAPIC + 0x10, INTX_VECTOR | (1u << 15)); /* level, active high */
        vector = INTX_VECTOR;
        puts("ahci intx gsi ");
        print_dec(gsi);
        putc('\n');
    }
}

static void start_port(void)
{
    if (!(rd(0x0C) & 1))
        fail("ahci: port 0 not implemented");
    wr(0x04, 1u << 31); /* AE */
    wr(P_CMD, 0);
    for (u32 spins = 0; rd(P_CMD) & ((1u << 15) | (1u << 14)); spins++)
        if (spins > 100000)
            fail("ahci: port does not stop");
    if ((rd(P_SSTS) & 0xF) != 3)
        fail("ahci: no device on port 0");
    wr(P_CLB, (u32)cmd_list);
    wr(P_CLBU, 0);
    wr(P_FB, (u32)rx_fis);
    wr(P_FBU, 0);
    wr(P_SERR, 0xFFFFFFFFu);
    wr(P_IS, 0xFFFFFFFFu);
    wr(0x08, 0xFFFFFFFFu);
    wr(P_IE, 0xFFFFFFFFu);
    wr(P_CMD, (1u << 4) | 1u); /* FRE, ST */
    wr(0x04, (1u << 31) | 2u); /* AE, IE */
    if (irr_pending(vector))
        fail("ahci: interrupt pending before any command");
}

/* Slot 0: an H2D register FIS with `command`, one PRD over `len` bytes of `data`. */
static void issue(u8 command, u32 lba, u16 count, u32 len, int atapi)
{
    memset(cmd_list, 0, 32);
    memset(cmd_table, 0, sizeof(cmd_table));
    memset(data, 0, sizeof(data));
    memset(rx_fis, 0, sizeof(rx_fis));
    volatile u32 *hdr = (volatile u32 *)cmd_list;
    int write = command == 0x35;
    hdr[0] = 5 | (atapi ? 1u << 5 : 0) | (write ? 1u << 6 : 0) | (1u << 16);
    hdr[1] = 0;
    hdr[2] = (u32)cmd_table;
    hdr[3] = 0;
    u8 *fis = cmd_table;
    fis[0] = 0x27;
    fis[1] = 0x80;
    fis[2] = command;
    fis[4] = lba;
    fis[5] = lba >> 8;
    fis[6] = lba >> 16;
    fis[7] = 0x40;
    fis[8] = lba >> 24;
    fis[12] = count;
    fis[13] = count >> 8;
    volatile u32 *prd = (volatile u32 *)(cmd_table + 0x80);
    prd[0] = (u32)data;
    prd[1] = 0;
    prd[3] = len - 1;
    __asm__ volatile("" ::: "memory");
}

static void run_and_check(const char *what)
{
    wr(P_CI, 1);
    for (u32 spins = 0; rd(P_CI) & 1; spins++)
        if (spins > 1000000)
            fail("ahci: command never completed");
    u32 tfd = rd(P_TFD);
    if (tfd & 0x89) {
        puts("FAIL ahci: TFD ");
        print_hex(tfd, 8);
        puts(" after ");
        println(what);
        poweroff();
    }
    if (!(rd(P_IS) & 1))
        fail("ahci: PxIS.DHRS not set");
    if (!(rd(0x08) & 1))
        fail("ahci: IS bit 0 not set");
    if (rx_fis[0x40] != 0x34)
        fail("ahci: no D2H FIS in the received-FIS area");
    if (!irr_pending(vector))
        fail("ahci: interrupt vector not pending in the LAPIC IRR");
    puts("ahci irq pending after ");
    println(what);
    wr(P_IS, 0xFFFFFFFFu);
    wr(0x08, 1);
    if (rd(0x08) & 1)
        fail("ahci: IS bit 0 stays set after PxIS was cleared");
}

static void run_hd(void)
{
    if (rd(P_SIG) != 0x101)
        fail("ahci-hd: signature is not ATA");
    issue(0xEC, 0, 1, 512, 0);
    run_and_check("identify");
    if (*(volatile u32 *)(cmd_list + 4) != 512)
        fail("ahci-hd: PRDBC is not 512 after IDENTIFY");
    u32 sectors = data[120] | data[121] << 8 | data[122] << 16 | (u32)data[123] << 24;
    puts("ahci-hd sectors ");
    print_dec(sectors);
    putc('\n');

    issue(0x25, 1, 1, 512, 0);
    run_and_check("read");
    puts("ahci-hd lba1 ");
    for (int i = 0; i < 16; i++)
        print_hex(data[i], 2);
    putc('\n');
    u32 sum = 0;
    for (int i = 0; i < 512; i++)
        sum = sum * 31 + data[i];
    puts("ahci-hd lba1 sum ");
    print_hex(sum, 8);
    putc('\n');

    issue(0x35, 2, 1, 512, 0);
    for (int i = 0; i < 512; i++)
        data[i] = (u8)(i ^ 0xA5);
    run_and_check("write");
    if (*(volatile u32 *)(cmd_list + 4) != 512)
        fail("ahci-hd: PRDBC is not 512 after WRITE DMA EXT");
    issue(0xEA, 0, 0, 512, 0);
    run_and_check("flush");
}

static void run_cd(void)
{
    if (rd(P_SIG) != 0xEB140101u)
        fail("ahci-cd: signature is not ATAPI");
    issue(0xA0, 0, 0, 2048, 1);
    u8 *cdb = cmd_table + 0x40;
    cdb[0] = 0x28; /* READ(10) */
    cdb[5] = 16;   /* block 16: the primary volume descriptor */
    cdb[8] = 1;
    run_and_check("read10");
    if (data[0] != 1 || data[1] != 'C' || data[2] != 'D' || data[3] != '0' || data[4] != '0' || data[5] != '1')
        fail("ahci-cd: block 16 is not a primary volume descriptor");
    char volume[33];
    int n = 32;
    memcpy(volume, data + 40, 32);
    while (n > 0 && volume[n - 1] == ' ')
        n--;
    volume[n] = 0;
    puts("ahci-cd volume ");
    println(volume);
}

/* One more READ DMA EXT of LBA 1, its completion interrupt taken while waiting in ring 3
 * with interrupts on (ring3.h). The INTx handler masks the level pin before its EOI: the
 * line stays high until PxIS and IS are cleared below. */
static void read_in_ring3(void)
{
    u32 actions = R3_EOI_LAPIC | (msi ? 0 : R3_MASK_PIN);
    ring3_handle(vector, actions, intx_gsi, 1);
    ring3_wait(vector, 1, 100); /* takes what the earlier commands left pending */
    if (!msi) {
        mmio_write32(IOAPIC, 0x10 + 2 * intx_gsi);
        mmio_write32(IOAPIC + 0x10, INTX_VECTOR | (1u << 15));
    }
    ring3_handle(vector, actions, intx_gsi, 1);
    issue(0x25, 1, 1, 512, 0);
    wr(P_CI, 1);
    u32 runs = ring3_wait(vector, 1, 5000);
    for (u32 spins = 0; rd(P_CI) & 1; spins++)
        if (spins > 1000000)
            fail("ahci: command never completed");
    puts("ahci ring3 handler runs ");
    print_dec(runs);
    putc('\n');
    if (!runs)
        fail("ahci: no completion interrupt in ring 3");
    if (!(rd(P_IS) & 1))
        fail("ahci: PxIS.DHRS not set after the ring-3 read");
    wr(P_IS, 0xFFFFFFFFu);
    wr(0x08, 1);
    u32 sum = 0;
    for (int i = 0; i < 512; i++)
        sum = sum * 31 + data[i];
    puts("ahci ring3 lba1 sum ");
    print_hex(sum, 8);
    putc('\n');
}

void test_ahci(const struct mb_info *mbi)
{
    (void)mbi;
    u32 slot = find_ahci();
    if (cfg_read32(slot, 8) >> 8 != 0x010601)
        fail("ahci: class is not 01/06/01");
    cfg_write16(slot, 0x04, 0x0006); /* memory, bus master */
    abar = cfg_read32(slot, 0x24) & ~0xFu;
    if (!abar)
        fail("ahci: BAR 5 not assigned");
    route_interrupt(slot);
    start_port();
    if (cmdline_has("ahci-cd"))
        run_cd();
    else
        run_hd();
    if (cmdline_has("ring3"))
        read_in_ring3();
    println("ahci ok");
    poweroff();
}
