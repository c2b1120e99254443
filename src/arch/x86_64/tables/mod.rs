//! Firmware tables that describe the machine to the guest: ACPI, MP table, SMBIOS.
//!
//! Everything goes into the BIOS area 0xE0000-0xFFFFF, which the loaders never touch and which
//! guests scan for the RSDP, the MP floating pointer and the SMBIOS entry point:
//!
//! | range             | contents                                          |
//! | ----------------- | ------------------------------------------------- |
//! | 0xE0000-0xEFFFF   | ACPI: RSDP, then XSDT, FADT, MADT, HPET, MCFG, FACS, DSDT |
//! | 0xF0000-0xF7FFF   | MP floating pointer, then the MP configuration table |
//! | 0xF8000-0xFFFFF   | SMBIOS entry point, then the structure table      |
//!
//! The three writers are independent; each fails with [`TablesError::DoesNotFit`] rather than
//! spill into its neighbour's range.

mod acpi;
mod mptable;
mod smbios;

pub use acpi::write_acpi;
/// The fixed-hardware ports and values the FADT and `\_S5` publish; the power device must
/// implement exactly these.
pub use acpi::{
    ACPI_DISABLE, ACPI_ENABLE, PM1A_CNT_BLK, PM1A_EVT_BLK, PM_TMR_BLK, RESET_PORT, RESET_VALUE,
    S5_SLP_TYP, SMI_CMD,
};
pub use mptable::write_mptable;
pub use smbios::write_smbios;

use crate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// ACPI tables live in [ACPI_START, ACPI_END).
pub const ACPI_START: u64 = 0xE_0000;
pub const ACPI_END: u64 = 0xF_0000;
/// The MP table lives in [MPTABLE_START, MPTABLE_END).
pub const MPTABLE_START: u64 = 0xF_0000;
pub const MPTABLE_END: u64 = 0xF_8000;
/// SMBIOS lives in [SMBIOS_START, SMBIOS_END).
pub const SMBIOS_START: u64 = 0xF_8000;
pub const SMBIOS_END: u64 = 0x10_0000;

/// Guest RAM sizes the tables accept. The upper bound keeps every derived address (high RAM
/// end, the 64-bit PCI window after it) far from overflow; x86 has 48-52 physical bits anyway.
const MIN_MEMORY: u64 = 1 << 20;
const MAX_MEMORY: u64 = 1 << 48;

// The three ranges stay apart and inside the BIOS area.
const _: () = assert!(ACPI_START >= 0xE_0000 && ACPI_END <= MPTABLE_START);
const _: () = assert!(MPTABLE_END <= SMBIOS_START && SMBIOS_END <= 0x10_0000);

/// Number of IOAPIC input pins (GSIs 0-23).
pub const IOAPIC_PINS: u32 = 24;
/// The ACPI SCI is ISA IRQ 9, wired to GSI 9, level-triggered, active high.
pub const SCI_IRQ: u8 = 9;
/// ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2.
pub const TIMER_GSI: u32 = 2;

/// One PCI INTx wire: device `slot` on `bus` asserting `pin` raises IOAPIC input `gsi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntxRoute {
    pub bus: u8,
    pub slot: u8,
    /// 0 = INTA .. 3 = INTD.
    pub pin: u8,
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDescription {
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// The `-U` UUID in textual byte order (as printed, first byte first).
    pub uuid: Option<[u8; 16]>,
    pub pci_intx: Vec<PciIntxRoute>,
    /// PCI slot of the LPC (ISA) bridge, if the machine has one: it becomes the `_ADR` of the
    /// DSDT's ISA bridge device. Without it the legacy devices sit in a generic container.
    pub lpc_slot: Option<u8>,
    pub com1: bool,
    pub com2: bool,
    pub hpet: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("invalid vCPU count {0}: the firmware tables describe 1-254 vCPUs")]
    VcpuCount(u8),
    #[error("invalid memory size {0} bytes: the firmware tables describe 1 MiB to 256 TiB")]
    MemorySize(u64),
    #[error("invalid PCI INTx route on bus {0}: only PCI bus 0 exists")]
    PciBus(u8),
    #[error("invalid PCI slot {0}: slot must be 0-31")]
    PciSlot(u8),
    #[error("invalid PCI INTx pin {0}: pin must be 0-3 (INTA-INTD)")]
    PciPin(u8),
    #[error("invalid PCI INTx GSI {0}: the IOAPIC has GSIs 0-23")]
    PciGsi(u32),
    #[error("{table} needs {size} bytes at {start:#x}, past its limit {limit:#x}")]
    DoesNotFit {
        table: &'static str,
        start: u64,
        size: u64,
        limit: u64,
    },
    #[error("cannot write {table} to guest address {addr:#x}: {source}")]
    GuestMemory {
        table: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl MachineDescription {
    /// Checks everything the tables encode in narrow fields, so that the builders never
    /// truncate a value silently.
    fn validate(&self) -> Result<(), TablesError> {
        // APIC id 255 is the broadcast id, and the IOAPIC takes id `vcpus`.
        if self.vcpus == 0 || self.vcpus == u8::MAX {
            return Err(TablesError::VcpuCount(self.vcpus));
        }
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&self.memory_bytes) {
            return Err(TablesError::MemorySize(self.memory_bytes));
        }
        if let Some(slot) = self.lpc_slot {
            check_slot(slot)?;
        }
        for route in &self.pci_intx {
            if route.bus != 0 {
                return Err(TablesError::PciBus(route.bus));
            }
            check_slot(route.slot)?;
            if route.pin > 3 {
                return Err(TablesError::PciPin(route.pin));
            }
            if route.gsi >= IOAPIC_PINS {
                return Err(TablesError::PciGsi(route.gsi));
            }
        }
        Ok(())
    }

    /// The IOAPIC's id: the first one after the vCPUs' local APIC ids.
    fn ioapic_id(&self) -> u8 {
        self.vcpus
    }
}

fn check_slot(slot: u8) -> Result<(), TablesError> {
    if slot > 31 {
        return Err(TablesError::PciSlot(slot));
    }
    Ok(())
}

/// The byte that makes `bytes` sum to zero (mod 256) when added to them.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Rounds `value` up to a multiple of `align` (a power of two).
fn align_up(value: u64, align: u64) -> u64 {
    (value + align - 1) & !(align - 1)
}

/// Fails unless `size` bytes at `start` end at or before `limit`.
fn check_fits(table: &'static str, start: u64, size: usize, limit: u64) -> Result<(), TablesError> {
    let size = size as u64;
    match start.checked_add(size) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(TablesError::DoesNotFit {
            table,
            start,
            size,
            limit,
        }),
    }
}

fn write_bytes(
    mem: &GuestMemory,
    table: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), TablesError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| TablesError::GuestMemory {
            table,
            addr,
            source,
        })
}

/// Little-endian field writers for the hand-built (MP, SMBIOS) tables.
trait PutLe {
    fn put_u16(&mut self, value: u16);
    fn put_u32(&mut self, value: u32);
    fn put_u64(&mut self, value: u64);
}

impl PutLe for Vec<u8> {
    fn put_u16(&mut self, value: u16) {
        self.extend_from_slice(&value.to_le_bytes());
    }
    fn put_u32(&mut self, value: u32) {
        self.extend_from_slice(&value.to_le_bytes());
    }
    fn put_u64(&mut self, value: u64) {
        self.extend_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod test_support {
    use super::*;
    use crate::memory::create_guest_memory;

    pub fn machine(vcpus: u8, memory_bytes: u64) -> MachineDescription {
        MachineDescription {
            vcpus,
            memory_bytes,
            uuid: None,
            pci_intx: Vec::new(),
            lpc_slot: Some(31),
            com1: true,
            com2: false,
            hpet: true,
        }
    }

    pub fn route(slot: u8, pin: u8, gsi: u32) -> PciIntxRoute {
        PciIntxRoute {
            bus: 0,
            slot,
            pin,
            gsi,
        }
    }

    /// Guest memory for `m`; small guests get real RAM, big ones only the low 3 GiB mapping
    /// (lazily committed), which is all the tables touch.
    pub fn memory_for(m: &MachineDescription) -> GuestMemory {
        create_guest_memory(m.memory_bytes.min(64 << 20)).unwrap()
    }

    pub fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    pub fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    pub fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn checksum_makes_the_sum_zero() {
        let mut bytes = vec![1u8, 2, 250, 77, 0];
        bytes[4] = checksum(&bytes);
        assert!(sums_to_zero(&bytes));
        assert_eq!(checksum(&[]), 0);
    }

    #[test]
    fn rejects_values_the_tables_cannot_encode() {
        let mut m = machine(0, 64 << 20);
        assert!(matches!(m.validate(), Err(TablesError::VcpuCount(0))));
        m.vcpus = 255;
        assert!(matches!(m.validate(), Err(TablesError::VcpuCount(255))));
        m.vcpus = 254;
        assert!(m.validate().is_ok());
        for size in [0, (1 << 20) - 1, (1 << 48) + 1, u64::MAX] {
            m.memory_bytes = size;
            assert!(matches!(m.validate(), Err(TablesError::MemorySize(s)) if s == size));
        }

        let cases = [
            (
                PciIntxRoute {
                    bus: 1,
                    ..route(2, 0, 16)
                },
                "bus 1",
            ),
            (route(32, 0, 16), "slot 32"),
            (route(3, 4, 16), "pin 4"),
            (route(3, 0, 24), "GSI 24"),
        ];
        for (bad, what) in cases {
            let m = MachineDescription {
                pci_intx: vec![route(1, 0, 16), bad],
                ..machine(1, 64 << 20)
            };
            let err = m.validate().unwrap_err().to_string();
            assert!(err.contains(what), "{err:?} should name {what}");
        }
        let m = MachineDescription {
            lpc_slot: Some(40),
            ..machine(1, 64 << 20)
        };
        assert_eq!(
            m.validate().unwrap_err().to_string(),
            "invalid PCI slot 40: slot must be 0-31"
        );
    }

    #[test]
    fn fit_check_catches_overflow_and_overrun() {
        assert!(check_fits("t", 0xF_0000, 0x8000, 0xF_8000).is_ok());
        assert!(check_fits("t", 0xF_0000, 0x8001, 0xF_8000).is_err());
        assert!(check_fits("t", u64::MAX, 2, u64::MAX).is_err());
    }

    #[test]
    fn all_three_coexist_and_agree_on_the_ioapic() {
        let m = MachineDescription {
            pci_intx: vec![route(3, 0, 16)],
            ..machine(3, 128 << 20)
        };
        let mem = memory_for(&m);
        // SMBIOS and the MP table first, so that an ACPI overrun would clobber them.
        write_smbios(&mem, &m).unwrap();
        write_mptable(&mem, &m).unwrap();
        let rsdp = write_acpi(&mem, &m).unwrap();

        let smbios = read(&mem, SMBIOS_START, 0x1F);
        assert_eq!(&smbios[0..4], b"_SM_");
        assert!(sums_to_zero(&smbios));
        let mp = read(&mem, MPTABLE_START, 16);
        assert_eq!(&mp[0..4], b"_MP_");
        assert!(sums_to_zero(&mp));
        assert_eq!(&read(&mem, rsdp, 8)[..], b"RSD PTR ");

        // The MP table's IOAPIC entry: after the header, 3 processors and 2 buses.
        let mp_table = u64::from(u32_at(&mp, 4));
        let ioapic = read(&mem, mp_table + 44 + 3 * 20 + 2 * 8, 8);
        assert_eq!(ioapic[0], 2, "IOAPIC entry type");
        let (mp_id, mp_addr) = (ioapic[1], u32_at(&ioapic, 4));

        // The MADT's IOAPIC entry: second table in the XSDT, after 3 local APICs.
        let xsdt = u64_at(&read(&mem, rsdp, 36), 24);
        let madt = u64_at(&read(&mem, xsdt, 52), 44);
        let entry = read(&mem, madt + 44 + 3 * 8, 12);
        assert_eq!(entry[0], 1, "MADT IOAPIC entry type");
        assert_eq!((entry[2], u32_at(&entry, 4)), (mp_id, mp_addr));
        assert_eq!((mp_id, mp_addr), (3, 0xFEC0_0000));
    }

    #[test]
    fn align_up_rounds_to_the_boundary() {
        assert_eq!(align_up(0xE_0024, 16), 0xE_0030);
        assert_eq!(align_up(0xE_0030, 16), 0xE_0030);
    }
}
