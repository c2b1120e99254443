//! ACPI tables: RSDP, XSDT, FADT (+FACS), MADT, HPET, MCFG and a DSDT generated in AML.
//!
//! They are laid out from `ACPI_START` in that order, each 16-byte aligned (the FACS 64-byte
//! aligned, as the spec requires), and must end below `ACPI_END`.

use super::{
    align_up, check_fits, write_bytes, MachineDescription, TablesError, ACPI_END, ACPI_START,
    IOAPIC_PINS, SCI_IRQ, TIMER_GSI,
};
use crate::arch::x86_64::layout::{
    highmem_size, lowmem_size, HIGHMEM_BASE, HPET_BASE, IOAPIC_BASE, LAPIC_BASE, PCI_ECAM_BASE,
    PCI_ECAM_SIZE,
};
use crate::memory::GuestMemory;
use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name, Package,
    PackageBuilder, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};

const OEM_ID: [u8; 6] = *b"XHYVE ";
const OEM_REVISION: u32 = 1;

/// Fixed-hardware register blocks and values the power device implements.
pub const PM1A_EVT_BLK: u16 = 0x400;
pub const PM1A_CNT_BLK: u16 = 0x404;
pub const PM_TMR_BLK: u16 = 0x408;
pub const SMI_CMD: u16 = 0xB2;
pub const ACPI_ENABLE: u8 = 0xA0;
pub const ACPI_DISABLE: u8 = 0xA1;
pub const RESET_PORT: u16 = 0xCF9;
pub const RESET_VALUE: u8 = 0x06;
/// The SLP_TYP value of `\_S5`, which the VMM treats as power-off.
pub const S5_SLP_TYP: u8 = 5;
/// CMOS index of the RTC century byte.
const RTC_CENTURY_INDEX: u8 = 0x32;

const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;
const PM_TMR_LEN: u8 = 4;

/// IA-PC boot architecture flags: legacy (ISA) devices and an 8042 exist.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;

/// MADT flag: the machine also has dual 8259s, which the OS must mask when using APIC mode.
const MADT_PCAT_COMPAT: u32 = 1 << 0;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LAPIC_NMI: u8 = 4;
/// MPS INTI flags: polarity in bits 0-1, trigger mode in bits 2-3 (0 = conforms to the bus).
const INTI_CONFORMS: u16 = 0;
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0b01 | (0b11 << 2);
const ALL_PROCESSORS: u8 = 0xFF;

/// The HPET table repeats the emulated HPET's capabilities (timer count, vendor, widths).
const HPET_EVENT_TIMER_BLOCK_ID: u32 = crate::intc::hpet::HPET_BLOCK_ID;
const HPET_MMIO_LEN: u32 = 0x400;

/// The 64-bit PCI memory window that follows high RAM.
const PCI_MMIO64_SIZE: u64 = 32 << 30;
/// Lowest start of the 32-bit PCI memory window.
const PCI_MMIO32_MIN_START: u64 = 0xC000_0000;

/// Writes all ACPI tables and returns the RSDP's guest-physical address.
pub fn write_acpi(mem: &GuestMemory, m: &MachineDescription) -> Result<u64, TablesError> {
    m.validate()?;

    let dsdt = dsdt(m);
    let madt = madt(m);
    let mcfg = to_bytes(&mcfg());
    let hpet = m.hpet.then(hpet);

    let mut cursor = ACPI_START;
    let mut place = |len: usize, align: u64| {
        let addr = align_up(cursor, align);
        cursor = addr + len as u64;
        addr
    };
    let rsdp_addr = place(Rsdp::len(), 16);
    let xsdt_entries = if hpet.is_some() { 4 } else { 3 };
    let xsdt_addr = place(36 + 8 * xsdt_entries, 16);
    let fadt_addr = place(FADT::len(), 16);
    let madt_addr = place(madt.len(), 16);
    let hpet_addr = hpet.as_ref().map(|t| place(t.len(), 16));
    let mcfg_addr = place(mcfg.len(), 16);
    let facs_addr = place(FACS::len(), 64);
    let dsdt_addr = place(dsdt.len(), 16);
    check_fits(
        "ACPI tables",
        ACPI_START,
        (cursor - ACPI_START) as usize,
        ACPI_END,
    )?;

    let fadt = to_bytes(&fadt(dsdt_addr, facs_addr));
    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(addr) = hpet_addr {
        xsdt.add_entry(addr);
    }
    xsdt.add_entry(mcfg_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), 36 + 8 * xsdt_entries);

    write_bytes(
        mem,
        "RSDP",
        rsdp_addr,
        &to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
    )?;
    write_bytes(mem, "XSDT", xsdt_addr, &xsdt)?;
    write_bytes(mem, "FADT", fadt_addr, &fadt)?;
    write_bytes(mem, "MADT", madt_addr, madt.as_slice())?;
    if let (Some(addr), Some(table)) = (hpet_addr, &hpet) {
        write_bytes(mem, "HPET table", addr, table.as_slice())?;
    }
    write_bytes(mem, "MCFG", mcfg_addr, &mcfg)?;
    write_bytes(mem, "FACS", facs_addr, &to_bytes(&FACS::new()))?;
    write_bytes(mem, "DSDT", dsdt_addr, dsdt.as_slice())?;
    Ok(rsdp_addr)
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// AML already serialized. The crate's builders borrow their children, so helpers that build
/// a subtree hand it back in this form.
struct Serialized(Vec<u8>);

impl Aml for Serialized {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn serialize(aml: &dyn Aml) -> Serialized {
    Serialized(to_bytes(aml))
}

fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"XHYV    ";
    id[4..].copy_from_slice(signature);
    id
}

fn sdt(signature: &[u8; 4], revision: u8) -> Sdt {
    Sdt::new(
        *signature,
        36,
        revision,
        OEM_ID,
        oem_table_id(signature),
        OEM_REVISION,
    )
}

fn io_gas(port: u16, bytes: u8, access: AccessSize) -> GAS {
    GAS::new(GasSpace::SystemIo, bytes * 8, 0, access, u64::from(port))
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> FADT {
    let mut f = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .preferred_pm_profile(PmProfile::Unspecified)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No sleep button; the power button is a fixed feature (its flag bit stays clear).
        .flag(Flags::SlpButton)
        // RTC wake status is not in the PM1 event block.
        .flag(Flags::FixRtc)
        .flag(Flags::TmrValExt)
        .flag(Flags::ResetRegSup);
    // The tables sit below 1 MiB, so the 32-bit and 64-bit pointers can both be filled in.
    f.firmware_ctrl = (facs_addr as u32).into();
    f.x_firmware_ctrl = facs_addr.into();
    f.dsdt = (dsdt_addr as u32).into();
    f.x_dsdt = dsdt_addr.into();
    f.sci_int = u16::from(SCI_IRQ).into();
    f.smi_cmd = u32::from(SMI_CMD).into();
    f.acpi_enable = ACPI_ENABLE;
    f.acpi_disable = ACPI_DISABLE;
    f.pm1a_evt_blk = u32::from(PM1A_EVT_BLK).into();
    f.pm1a_cnt_blk = u32::from(PM1A_CNT_BLK).into();
    f.pm_tmr_blk = u32::from(PM_TMR_BLK).into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.pm1_cnt_len = PM1_CNT_LEN;
    f.pm_tmr_len = PM_TMR_LEN;
    f.x_pm1a_evt_blk = io_gas(PM1A_EVT_BLK, PM1_EVT_LEN, AccessSize::WordAccess);
    f.x_pm1a_cnt_blk = io_gas(PM1A_CNT_BLK, PM1_CNT_LEN, AccessSize::WordAccess);
    f.x_pm_tmr_blk = io_gas(PM_TMR_BLK, PM_TMR_LEN, AccessSize::DwordAccess);
    f.century = RTC_CENTURY_INDEX;
    f.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042).into();
    f.reset_reg = io_gas(RESET_PORT, 1, AccessSize::ByteAccess);
    f.reset_value = RESET_VALUE;
    f.finalize()
}

fn madt(m: &MachineDescription) -> Sdt {
    let mut t = sdt(b"APIC", 5);
    t.append_slice(&(LAPIC_BASE as u32).to_le_bytes());
    t.append_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..m.vcpus {
        t.append_slice(&to_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    t.append_slice(&to_bytes(&IoApic::new(
        m.ioapic_id(),
        IOAPIC_BASE as u32,
        0,
    )));
    t.append_slice(&interrupt_override(0, TIMER_GSI, INTI_CONFORMS));
    t.append_slice(&interrupt_override(
        SCI_IRQ,
        u32::from(SCI_IRQ),
        INTI_ACTIVE_HIGH_LEVEL,
    ));
    let mut nmi = vec![MADT_LAPIC_NMI, 6, ALL_PROCESSORS];
    nmi.extend_from_slice(&INTI_CONFORMS.to_le_bytes());
    nmi.push(1); // LINT1
    t.append_slice(&nmi);
    t
}

fn interrupt_override(irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut e = vec![MADT_INTERRUPT_OVERRIDE, 10, 0 /* ISA */, irq];
    e.extend_from_slice(&gsi.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e
}

fn hpet() -> Sdt {
    let mut t = sdt(b"HPET", 1);
    t.append_slice(&HPET_EVENT_TIMER_BLOCK_ID.to_le_bytes());
    t.append_slice(&to_bytes(&GAS::new(
        GasSpace::SystemMemory,
        64,
        0,
        AccessSize::Undefined,
        HPET_BASE,
    )));
    t.append_slice(&[0]); // HPET number
    t.append_slice(&0u16.to_le_bytes()); // minimum clock tick in periodic mode
    t.append_slice(&[0]); // no page protection
    t
}

/// Last bus number the ECAM window covers.
fn ecam_end_bus() -> u8 {
    ((PCI_ECAM_SIZE >> 20) - 1) as u8
}

fn mcfg() -> MCFG {
    let mut t = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
    t.add_ecam(PCI_ECAM_BASE, 0, 0, ecam_end_bus());
    t
}

/// ISA `IRQNoFlags` small resource descriptor (edge, active high, exclusive), which the AML
/// crate lacks; legacy OSes and Linux's PNP layer read it for COM and RTC.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22);
        sink.word(1u16 << self.0);
    }
}

/// The 32-bit PCI memory window: from the end of low RAM (at least 3 GiB) up to the ECAM.
fn pci_mmio32_window(m: &MachineDescription) -> (u32, u32) {
    let start = lowmem_size(m.memory_bytes).max(PCI_MMIO32_MIN_START);
    (start as u32, (PCI_ECAM_BASE - 1) as u32)
}

/// The 64-bit PCI memory window: 32 GiB right after high RAM (or from 4 GiB without it).
fn pci_mmio64_window(m: &MachineDescription) -> (u64, u64) {
    // validate() bounds memory_bytes, so this cannot overflow.
    let start = HIGHMEM_BASE + highmem_size(m.memory_bytes);
    (start, start + PCI_MMIO64_SIZE - 1)
}

fn dsdt(m: &MachineDescription) -> Sdt {
    let mut aml = Vec::new();

    let s5 = Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &0u8, &0u8]);
    Name::new(Path::new("_S5_"), &s5).to_aml_bytes(&mut aml);

    let pci0 = pci_root(m);
    let resources = motherboard_resources();
    let hpet = hpet_device();
    let mut sb: Vec<&dyn Aml> = vec![&pci0, &resources];
    if m.hpet {
        sb.push(&hpet);
    }
    Scope::new(Path::new("\\_SB_"), sb).to_aml_bytes(&mut aml);

    let mut t = sdt(b"DSDT", 2);
    t.append_slice(&aml);
    t
}

/// `\_SB.PCI0`: the host bridge, its resource windows, its INTx routing and the ISA bridge.
fn pci_root(m: &MachineDescription) -> Serialized {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
    let seg = Name::new(Path::new("_SEG"), &0u8);
    let bbn = Name::new(Path::new("_BBN"), &0u8);
    let uid = Name::new(Path::new("_UID"), &0u8);

    let buses = AddressSpace::<u16>::new_bus_number(0, u16::from(ecam_end_bus()));
    let config_ports = IO::new(0xCF8, 0xCF8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0x0000, 0x0CF7, None);
    let io_high = AddressSpace::<u16>::new_io(0x0D00, 0xFFFF, None);
    let (lo_start, lo_end) = pci_mmio32_window(m);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        lo_start,
        lo_end,
        None,
    );
    let (hi_start, hi_end) = pci_mmio64_window(m);
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        hi_start,
        hi_end,
        None,
    );
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![
            &buses,
            &config_ports,
            &io_low,
            &io_high,
            &mmio32,
            &mmio64,
        ]),
    );

    let mut prt = PackageBuilder::new();
    for route in &m.pci_intx {
        // All functions of the slot: the low 16 bits are 0xFFFF.
        let address = u32::from(route.slot) << 16 | 0xFFFF;
        let entry = Package::new(vec![&address, &route.pin, &0u8, &route.gsi]);
        prt.add_element(&entry);
    }
    let prt = Name::new(Path::new("_PRT"), &prt);
    debug_assert!(m.pci_intx.iter().all(|r| r.gsi < IOAPIC_PINS));

    let isa = isa_bridge(m);
    serialize(&Device::new(
        Path::new("PCI0"),
        vec![&hid, &cid, &seg, &bbn, &uid, &crs, &prt, &isa],
    ))
}

/// The LPC/ISA bridge and the legacy devices behind it.
fn isa_bridge(m: &MachineDescription) -> Serialized {
    let identity = match m.lpc_slot {
        Some(slot) => Name::new(Path::new("_ADR"), &(u32::from(slot) << 16)),
        // No LPC device on PCI: a generic container still groups the legacy devices.
        None => Name::new(Path::new("_HID"), &EISAName::new("PNP0A06")),
    };
    let com1 = uart("COM1", 1, 0x3F8, 4);
    let com2 = uart("COM2", 2, 0x2F8, 3);
    let rtc = legacy_device("RTC_", "PNP0B00", 0x70, 2, 8);
    let mut children: Vec<&dyn Aml> = vec![&identity, &rtc];
    if m.com1 {
        children.push(&com1);
    }
    if m.com2 {
        children.push(&com2);
    }
    serialize(&Device::new(Path::new("ISA_"), children))
}

fn uart(name: &str, uid: u8, port: u16, irq: u8) -> Serialized {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &uid);
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&IO::new(port, port, 1, 8), &IrqNoFlags(irq)]),
    );
    serialize(&Device::new(Path::new(name), vec![&hid, &uid, &crs]))
}

fn legacy_device(name: &str, hid: &str, port: u16, len: u8, irq: u8) -> Serialized {
    let hid = Name::new(Path::new("_HID"), &EISAName::new(hid));
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&IO::new(port, port, 1, len), &IrqNoFlags(irq)]),
    );
    serialize(&Device::new(Path::new(name), vec![&hid, &crs]))
}

/// Motherboard resources (PNP0C02): Linux accepts the MCFG's ECAM only when it is reserved
/// here or in the e820 map; the PM register block is claimed so nothing else lands on it.
fn motherboard_resources() -> Serialized {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C02"));
    let uid = Name::new(Path::new("_UID"), &1u8);
    let ecam = Memory32Fixed::new(true, PCI_ECAM_BASE as u32, PCI_ECAM_SIZE as u32);
    let pm = IO::new(PM1A_EVT_BLK, PM1A_EVT_BLK, 1, 0x0C);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&ecam, &pm]));
    serialize(&Device::new(Path::new("MBRS"), vec![&hid, &uid, &crs]))
}

fn hpet_device() -> Serialized {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0103"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&Memory32Fixed::new(
            false,
            HPET_BASE as u32,
            HPET_MMIO_LEN,
        )]),
    );
    serialize(&Device::new(Path::new("HPET"), vec![&hid, &uid, &crs]))
}

#[cfg(test)]
mod tests;
