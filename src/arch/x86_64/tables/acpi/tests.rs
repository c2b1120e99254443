//! Two kinds of checks: our own parse of the tables in guest memory (pointers, checksums,
//! layout), and `iasl -d` (ACPICA's disassembler, package acpica-tools) as an independent
//! reader whose output we assert on. The iasl tests fail when iasl is missing.

use super::super::test_support::*;
use super::*;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The tables found by following the RSDP, as a guest would.
struct Found {
    rsdp_addr: u64,
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    /// XSDT entries in order: (signature, address, bytes).
    tables: Vec<(String, u64, Vec<u8>)>,
    dsdt: (u64, Vec<u8>),
    facs: (u64, Vec<u8>),
}

impl Found {
    fn table(&self, signature: &str) -> &[u8] {
        &self
            .tables
            .iter()
            .find(|(s, _, _)| s == signature)
            .unwrap_or_else(|| panic!("no {signature} in the XSDT"))
            .2
    }

    fn signatures(&self) -> Vec<&str> {
        self.tables.iter().map(|(s, _, _)| s.as_str()).collect()
    }
}

fn read_table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
    assert!(
        (ACPI_START..ACPI_END).contains(&addr),
        "table at {addr:#x} outside the ACPI range"
    );
    let header = read(mem, addr, 36);
    let len = u32_at(&header, 4) as usize;
    assert!(addr + len as u64 <= ACPI_END, "table at {addr:#x} overruns");
    let table = read(mem, addr, len);
    let signature = String::from_utf8_lossy(&table[0..4]).into_owned();
    assert!(sums_to_zero(&table), "{signature} checksum");
    table
}

fn find_tables(mem: &GuestMemory, rsdp_addr: u64) -> Found {
    assert!((0xE_0000..0x10_0000).contains(&rsdp_addr));
    assert_eq!(rsdp_addr % 16, 0, "the RSDP is found on 16-byte boundaries");
    let rsdp = read(mem, rsdp_addr, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    assert!(sums_to_zero(&rsdp[0..20]), "RSDP checksum");
    assert!(sums_to_zero(&rsdp), "RSDP extended checksum");
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = read_table(mem, xsdt_addr);
    assert_eq!(&xsdt[0..4], b"XSDT");
    let tables: Vec<_> = xsdt[36..]
        .chunks(8)
        .map(|entry| {
            let addr = u64::from_le_bytes(entry.try_into().unwrap());
            let table = read_table(mem, addr);
            (
                String::from_utf8_lossy(&table[0..4]).into_owned(),
                addr,
                table,
            )
        })
        .collect();
    let fadt = &tables.iter().find(|(s, _, _)| s == "FACP").unwrap().2;
    let dsdt_addr = u64_at(fadt, 140);
    assert_eq!(
        u64::from(u32_at(fadt, 40)),
        dsdt_addr,
        "DSDT and X_DSDT agree"
    );
    let facs_addr = u64_at(fadt, 132);
    assert_eq!(
        u64::from(u32_at(fadt, 36)),
        facs_addr,
        "FACS pointers agree"
    );
    assert_eq!(facs_addr % 64, 0, "FACS alignment");
    let facs = read(mem, facs_addr, 64);
    assert_eq!(&facs[0..4], b"FACS");
    let dsdt = read_table(mem, dsdt_addr);
    assert_eq!(&dsdt[0..4], b"DSDT");
    Found {
        rsdp_addr,
        rsdp,
        xsdt,
        tables,
        dsdt: (dsdt_addr, dsdt),
        facs: (facs_addr, facs),
    }
}

fn sparse_machine() -> MachineDescription {
    MachineDescription {
        pci_intx: vec![route(2, 0, 16), route(5, 1, 17), route(31, 3, 23)],
        ..machine(4, 6 << 30)
    }
}

fn build(m: &MachineDescription) -> Found {
    let mem = memory_for(m);
    let rsdp = write_acpi(&mem, m).unwrap();
    find_tables(&mem, rsdp)
}

#[test]
fn rsdp_leads_to_every_table_with_valid_checksums() {
    let found = build(&sparse_machine());
    assert_eq!(found.rsdp_addr, ACPI_START);
    assert_eq!(found.signatures(), vec!["FACP", "APIC", "HPET", "MCFG"]);
    // Nothing overlaps: every table starts after the previous one ends.
    let mut spans: Vec<(u64, u64)> = found
        .tables
        .iter()
        .map(|(_, a, t)| (*a, *a + t.len() as u64))
        .collect();
    spans.push((found.rsdp_addr, found.rsdp_addr + found.rsdp.len() as u64));
    spans.push((
        u64_at(&found.rsdp, 24),
        u64_at(&found.rsdp, 24) + found.xsdt.len() as u64,
    ));
    spans.push((found.dsdt.0, found.dsdt.0 + found.dsdt.1.len() as u64));
    spans.push((found.facs.0, found.facs.0 + 64));
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "{pair:x?} overlap");
    }
}

#[test]
fn hpet_table_only_with_hpet() {
    let m = MachineDescription {
        hpet: false,
        ..sparse_machine()
    };
    let found = build(&m);
    assert_eq!(found.signatures(), vec!["FACP", "APIC", "MCFG"]);
    assert!(!found.dsdt.1.windows(4).any(|w| w == b"HPET"));
    let with = build(&sparse_machine());
    assert!(with.dsdt.1.windows(4).any(|w| w == b"HPET"));
}

#[test]
fn madt_lists_each_vcpu_and_the_ioapic() {
    let found = build(&sparse_machine());
    let madt = found.table("APIC");
    assert_eq!(u32_at(madt, 36), 0xFEE0_0000);
    let mut off = 44;
    let mut lapics = Vec::new();
    let mut ioapics = Vec::new();
    while off < madt.len() {
        let (kind, len) = (madt[off], madt[off + 1] as usize);
        match kind {
            0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
            1 => ioapics.push((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8))),
            _ => {}
        }
        off += len;
    }
    assert_eq!(off, madt.len());
    assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
    assert_eq!(ioapics, vec![(4, 0xFEC0_0000, 0)]);
}

#[test]
fn the_most_vcpus_and_routes_fit() {
    let routes = (0..32u8)
        .flat_map(|slot| (0..4u8).map(move |pin| route(slot, pin, 16 + u32::from(slot + pin) % 8)))
        .collect();
    let m = MachineDescription {
        pci_intx: routes,
        com2: true,
        ..machine(254, 64 << 20)
    };
    let found = build(&m);
    assert_eq!(found.table("APIC").len(), 44 + 254 * 8 + 12 + 2 * 10 + 6);
}

#[test]
fn refuses_what_it_cannot_describe() {
    let m = MachineDescription {
        pci_intx: vec![route(3, 0, 24)],
        ..machine(1, 64 << 20)
    };
    let mem = memory_for(&m);
    assert_eq!(
        write_acpi(&mem, &m).unwrap_err().to_string(),
        "invalid PCI INTx GSI 24: the IOAPIC has GSIs 0-23"
    );
    let m = machine(0, 64 << 20);
    assert!(matches!(
        write_acpi(&mem, &m),
        Err(TablesError::VcpuCount(0))
    ));
}

#[test]
fn pci_windows_follow_ram() {
    let small = machine(1, 1 << 30);
    assert_eq!(pci_mmio32_window(&small), (0xC000_0000, 0xDFFF_FFFF));
    assert_eq!(pci_mmio64_window(&small), (4 << 30, (36 << 30) - 1));
    let big = machine(1, 6 << 30);
    assert_eq!(pci_mmio32_window(&big), (0xC000_0000, 0xDFFF_FFFF));
    assert_eq!(pci_mmio64_window(&big), (7 << 30, (39 << 30) - 1));
}

// ---- iasl ----

static SCRATCH: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory for one disassembly, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xhyve-iasl-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_iasl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = match Command::new("iasl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run iasl ({e}): the ACPI tests need ACPICA's disassembler; \
             install it with `apt-get install acpica-tools`"
        ),
    };
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl {args:?} failed:\n{log}");
    log
}

/// Disassembles one table with `iasl -d` and returns the .dsl text. Fails on any checksum
/// complaint, in iasl's log or in the listing.
fn disassemble(name: &str, bytes: &[u8]) -> String {
    let scratch = Scratch::new();
    let dat = format!("{name}.dat");
    std::fs::write(scratch.0.join(&dat), bytes).unwrap();
    let log = run_iasl(&scratch.0, &["-d", &dat]);
    let dsl = std::fs::read_to_string(scratch.0.join(format!("{name}.dsl")))
        .unwrap_or_else(|e| panic!("iasl wrote no listing for {name} ({e}):\n{log}"));
    assert!(
        !log.contains("Incorrect checksum") && !dsl.contains("Incorrect checksum"),
        "iasl reports a bad checksum in {name}:\n{log}"
    );
    dsl
}

/// Values of `[off dec len]  Name : value` lines of a data-table listing, in order; each
/// value is its first word (no trailing description).
fn fields(dsl: &str, name: &str) -> Vec<String> {
    dsl.lines()
        .filter_map(|line| {
            let rest = line.split_once(']')?.1;
            let (key, value) = rest.split_once(" : ")?;
            (key.trim() == name).then(|| value.split_whitespace().next().unwrap_or("").to_owned())
        })
        .collect()
}

fn field(dsl: &str, name: &str) -> String {
    let values = fields(dsl, name);
    assert_eq!(values.len(), 1, "{name} appears {} times", values.len());
    values[0].clone()
}

/// The value of a decoded flag line such as `Processor Enabled : 1` (no `[...]` prefix).
fn flag_values(dsl: &str, name: &str) -> Vec<String> {
    dsl.lines()
        .filter(|line| !line.trim_start().starts_with('['))
        .filter_map(|line| {
            let (key, value) = line.split_once(" : ")?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
        .collect()
}

#[test]
fn iasl_flags_a_corrupted_table() {
    // Proves that disassemble() can fail: a real checksum error must not pass.
    let found = build(&sparse_machine());
    let mut madt = found.table("APIC").to_vec();
    madt[40] ^= 0x10;
    let result = std::panic::catch_unwind(|| disassemble("corrupt", &madt));
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("bad checksum"), "{message}");
}

#[test]
fn iasl_reads_the_madt() {
    let found = build(&sparse_machine());
    let dsl = disassemble("apic", found.table("APIC"));
    assert_eq!(field(&dsl, "Signature"), "\"APIC\"");
    assert_eq!(field(&dsl, "Local Apic Address"), "FEE00000");
    assert_eq!(flag_values(&dsl, "PC-AT Compatibility"), vec!["1"]);
    assert_eq!(fields(&dsl, "Local Apic ID"), vec!["00", "01", "02", "03"]);
    assert_eq!(
        fields(&dsl, "Processor ID"),
        vec!["00", "01", "02", "03", "FF"]
    );
    assert_eq!(flag_values(&dsl, "Processor Enabled"), vec!["1"; 4]);
    assert_eq!(field(&dsl, "I/O Apic ID"), "04");
    assert_eq!(fields(&dsl, "Address"), vec!["FEC00000"]);
    // IOAPIC GSI base, then the two overrides' GSIs.
    assert_eq!(
        fields(&dsl, "Interrupt"),
        vec!["00000000", "00000002", "00000009"]
    );
    assert_eq!(fields(&dsl, "Source"), vec!["00", "09"]);
    assert_eq!(flag_values(&dsl, "Polarity"), vec!["0", "1", "0"]);
    assert_eq!(flag_values(&dsl, "Trigger Mode"), vec!["0", "3", "0"]);
    assert_eq!(field(&dsl, "Interrupt Input LINT"), "01");
}

#[test]
fn iasl_reads_the_fadt() {
    let found = build(&sparse_machine());
    let dsl = disassemble("facp", found.table("FACP"));
    let dsdt = format!("{:08X}", found.dsdt.0);
    let facs = format!("{:08X}", found.facs.0);
    assert_eq!(field(&dsl, "Revision"), "06");
    assert_eq!(
        fields(&dsl, "DSDT Address"),
        vec![dsdt.clone(), format!("00000000{dsdt}")]
    );
    assert_eq!(
        fields(&dsl, "FACS Address"),
        vec![facs.clone(), format!("00000000{facs}")]
    );
    assert_eq!(field(&dsl, "SCI Interrupt"), "0009");
    assert_eq!(field(&dsl, "SMI Command Port"), "000000B2");
    assert_eq!(field(&dsl, "ACPI Enable Value"), "A0");
    assert_eq!(field(&dsl, "ACPI Disable Value"), "A1");
    assert_eq!(field(&dsl, "PM1A Event Block Address"), "00000400");
    assert_eq!(field(&dsl, "PM1 Event Block Length"), "04");
    assert_eq!(field(&dsl, "PM1A Control Block Address"), "00000404");
    assert_eq!(field(&dsl, "PM1 Control Block Length"), "02");
    assert_eq!(field(&dsl, "PM Timer Block Address"), "00000408");
    assert_eq!(field(&dsl, "PM Timer Block Length"), "04");
    assert_eq!(field(&dsl, "RTC Century Index"), "32");
    assert_eq!(field(&dsl, "Value to cause reset"), "06");
    let flag = |name: &str| flag_values(&dsl, name);
    assert_eq!(flag("32-bit PM Timer (V1)"), vec!["1"]);
    assert_eq!(flag("Reset Register Supported (V2)"), vec!["1"]);
    assert_eq!(flag("Control Method Power Button (V1)"), vec!["0"]);
    assert_eq!(flag("Hardware Reduced (V5)"), vec!["0"]);
    assert_eq!(flag("8042 Present on ports 60/64 (V2)"), vec!["1"]);
    assert_eq!(flag("Legacy Devices Supported (V2)"), vec!["1"]);
    // Generic addresses in order: reset register, X_PM1a_EVT, X_PM1b_EVT (unused),
    // X_PM1a_CNT, ..., X_PM_TMR.
    let space = fields(&dsl, "Space ID");
    let address = fields(&dsl, "Address");
    let width = fields(&dsl, "Bit Width");
    assert_eq!(
        (&*space[0], &*address[0], &*width[0]),
        ("01", "0000000000000CF9", "08")
    );
    assert_eq!(
        (&*space[1], &*address[1], &*width[1]),
        ("01", "0000000000000400", "20")
    );
    assert_eq!(
        (&*space[3], &*address[3], &*width[3]),
        ("01", "0000000000000404", "10")
    );
    assert_eq!(
        (&*space[6], &*address[6], &*width[6]),
        ("01", "0000000000000408", "20")
    );
}

#[test]
fn iasl_reads_mcfg_hpet_xsdt_and_facs() {
    let found = build(&sparse_machine());
    let mcfg = disassemble("mcfg", found.table("MCFG"));
    assert_eq!(field(&mcfg, "Base Address"), "00000000E0000000");
    assert_eq!(field(&mcfg, "Start Bus Number"), "00");
    assert_eq!(field(&mcfg, "End Bus Number"), "00");

    let hpet = disassemble("hpet", found.table("HPET"));
    assert_eq!(field(&hpet, "Address"), "00000000FED00000");
    assert_eq!(field(&hpet, "Hardware Block ID"), "8086A201"); // three comparators

    let xsdt = disassemble("xsdt", &found.xsdt);
    let addresses: Vec<String> = found
        .tables
        .iter()
        .map(|(_, a, _)| format!("{a:016X}"))
        .collect();
    let listed: Vec<String> = (0..addresses.len())
        .map(|i| field(&xsdt, &format!("ACPI Table Address   {i}")))
        .collect();
    assert_eq!(listed, addresses);

    let facs = disassemble("facs", &found.facs.1);
    assert_eq!(field(&facs, "Signature"), "\"FACS\"");
    assert_eq!(field(&facs, "Length"), "00000040");
}

/// Disassembles the DSDT, checks it, and recompiles the listing: iasl must accept its own
/// output without errors or warnings.
fn dsdt_listing(m: &MachineDescription) -> String {
    let found = build(m);
    let dsl = disassemble("dsdt", &found.dsdt.1);
    let scratch = Scratch::new();
    std::fs::write(scratch.0.join("dsdt.dsl"), &dsl).unwrap();
    let log = run_iasl(&scratch.0, &["-p", "recompiled", "dsdt.dsl"]);
    assert!(
        log.contains("0 Errors, 0 Warnings"),
        "the DSDT listing does not recompile cleanly:\n{log}"
    );
    dsl
}

/// Collapses whitespace so that multi-line ASL can be matched against one-line patterns.
fn squeeze(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn iasl_reads_the_dsdt() {
    let dsl = dsdt_listing(&sparse_machine());
    let asl = squeeze(&dsl);
    assert!(
        asl.contains("Name (_S5, Package (0x04) { 0x05, 0x05, Zero, Zero })"),
        "{asl}"
    );
    assert!(
        asl.contains("Device (PCI0) { Name (_HID, EisaId (\"PNP0A08\")"),
        "{asl}"
    );
    assert!(asl.contains("Name (_CID, EisaId (\"PNP0A03\")"));
    assert!(asl.contains("Name (_SEG, Zero)"));
    assert!(asl.contains("Name (_BBN, Zero)"));
    // One _PRT entry per route, sparse slots included.
    assert!(
        asl.contains(
            "Name (_PRT, Package (0x03) { \
             Package (0x04) { 0x0002FFFF, Zero, Zero, 0x10 }, \
             Package (0x04) { 0x0005FFFF, One, Zero, 0x11 }, \
             Package (0x04) { 0x001FFFFF, 0x03, Zero, 0x17 } })"
        ),
        "{asl}"
    );
    // Windows: bus 0 only, config ports, I/O, 32-bit up to the ECAM, 64-bit after high RAM.
    assert!(
        asl.contains("0x0000, 0x0000, 0x0000, 0x0000, 0x0001, ,, )"),
        "{asl}"
    );
    assert!(asl.contains("IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, )"));
    assert!(asl.contains("0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8,"));
    assert!(asl.contains("0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300,"));
    assert!(asl.contains("0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000,"));
    assert!(asl.contains(
        "0x0000000000000000, 0x00000001C0000000, 0x00000009BFFFFFFF, \
         0x0000000000000000, 0x0000000800000000,"
    ));
    // The ISA bridge at the LPC slot, with the RTC and COM1 only.
    assert!(
        asl.contains("Device (ISA) { Name (_ADR, 0x001F0000)"),
        "{asl}"
    );
    assert!(asl.contains(
        "Device (COM1) { Name (_HID, EisaId (\"PNP0501\") /* 16550A-compatible COM Serial Port */) \
         Name (_UID, One) Name (_CRS, ResourceTemplate () \
         { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, ) IRQNoFlags () {4} }) }"
    ), "{asl}");
    assert!(!asl.contains("COM2"));
    assert!(
        asl.contains(
            "Device (RTC) { Name (_HID, EisaId (\"PNP0B00\") /* AT Real-Time Clock */) \
         Name (_CRS, ResourceTemplate () \
         { IO (Decode16, 0x0070, 0x0070, 0x01, 0x02, ) IRQNoFlags () {8} }) }"
        ),
        "{asl}"
    );
    // The ECAM is reserved as a motherboard resource.
    assert!(
        asl.contains("Memory32Fixed (ReadWrite, 0xE0000000, 0x00100000, )"),
        "{asl}"
    );
    assert!(asl.contains("Device (HPET)"));
}

#[test]
fn iasl_reads_the_dsdt_without_lpc_or_com1() {
    let m = MachineDescription {
        lpc_slot: None,
        com1: false,
        com2: true,
        hpet: false,
        pci_intx: vec![],
        ..machine(1, 64 << 20)
    };
    let asl = squeeze(&dsdt_listing(&m));
    assert!(
        asl.contains("Device (ISA) { Name (_HID, EisaId (\"PNP0A06\")"),
        "{asl}"
    );
    assert!(asl.contains("Device (COM2)"));
    assert!(asl.contains("IRQNoFlags () {3}"));
    assert!(!asl.contains("COM1"));
    assert!(!asl.contains("Device (HPET)"));
    assert!(asl.contains("Name (_PRT, Package (0x00) {})"), "{asl}");
    // Without high RAM, the 64-bit window starts at 4 GiB.
    assert!(
        asl.contains("0x0000000100000000, 0x00000008FFFFFFFF,"),
        "{asl}"
    );
}
