//! Intel MultiProcessor Specification 1.4 table: the floating pointer at 0xF0000 and the
//! configuration table right after it. Guests that ignore ACPI (or run with `acpi=off`) find
//! the CPUs and the interrupt routing here; it says the same as the MADT and the `_PRT`.

use super::{
    check_fits, checksum, write_bytes, MachineDescription, PutLe, TablesError, MPTABLE_END,
    MPTABLE_START, SCI_IRQ, TIMER_GSI,
};
use crate::arch::x86_64::layout::{IOAPIC_BASE, LAPIC_BASE};
use crate::memory::GuestMemory;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV_1_4: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Local APIC version reported for every vCPU (an integrated xAPIC).
const LAPIC_VERSION: u8 = 0x14;
/// Family 6 signature and CPUID.1:EDX FPU|APIC: only informative, guests read CPUID.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;

const PCI_BUS_ID: u8 = 0;
const ISA_BUS_ID: u8 = 1;

/// Interrupt types of I/O and local interrupt entries.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

/// Polarity (bits 0-1) and trigger mode (bits 2-3): "conforms to the bus" is 0.
const CONFORMS: u16 = 0;
const ACTIVE_HIGH: u16 = 0b01;
const ACTIVE_LOW: u16 = 0b11;
const LEVEL: u16 = 0b11 << 2;

/// Destination LAPIC id meaning "every local APIC".
const ALL_LAPICS: u8 = 0xFF;

/// Writes the floating pointer at `MPTABLE_START` and the configuration table after it.
pub fn write_mptable(mem: &GuestMemory, m: &MachineDescription) -> Result<(), TablesError> {
    m.validate()?;
    let table_addr = MPTABLE_START + FLOATING_POINTER_LEN as u64;
    let table = config_table(m);
    check_fits(
        "MP table",
        MPTABLE_START,
        FLOATING_POINTER_LEN + table.len(),
        MPTABLE_END,
    )?;
    let pointer = floating_pointer(table_addr);
    write_bytes(mem, "MP floating pointer", MPTABLE_START, &pointer)?;
    write_bytes(mem, "MP configuration table", table_addr, &table)
}

fn floating_pointer(table_addr: u64) -> [u8; FLOATING_POINTER_LEN] {
    let mut p = [0u8; FLOATING_POINTER_LEN];
    p[0..4].copy_from_slice(b"_MP_");
    // The table sits in the BIOS area, below 1 MiB.
    p[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    p[8] = 1; // length in 16-byte units
    p[9] = SPEC_REV_1_4;
    // Feature bytes stay 0: a configuration table is present, and there is no IMCR, so the
    // PIC reaches the BSP in virtual wire mode through LINT0.
    p[10] = checksum(&p);
    p
}

fn config_table(m: &MachineDescription) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    let mut add = |entries: &mut Vec<u8>, entry: &[u8]| {
        entries.extend_from_slice(entry);
        count += 1;
    };

    for cpu in 0..m.vcpus {
        let mut e = vec![ENTRY_PROCESSOR, cpu, LAPIC_VERSION];
        e.push(if cpu == 0 {
            CPU_ENABLED | CPU_BOOTSTRAP
        } else {
            CPU_ENABLED
        });
        e.put_u32(CPU_SIGNATURE);
        e.put_u32(CPU_FEATURES);
        e.extend_from_slice(&[0; 8]);
        add(&mut entries, &e);
    }
    add(&mut entries, &bus(PCI_BUS_ID, b"PCI   "));
    add(&mut entries, &bus(ISA_BUS_ID, b"ISA   "));

    let ioapic_id = m.ioapic_id();
    let mut e = vec![ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED];
    e.put_u32(IOAPIC_BASE as u32);
    add(&mut entries, &e);

    let io_int = |kind: u8, flags: u16, bus: u8, irq: u8, pin: u8| {
        let mut e = vec![ENTRY_IO_INTERRUPT, kind];
        e.put_u16(flags);
        e.extend_from_slice(&[bus, irq, ioapic_id, pin]);
        e
    };
    // The 8259 reaches IOAPIC pin 0 as ExtINT; the PIT's IRQ 0 is pin 2, so IRQ 2 (the
    // cascade) has no entry of its own.
    add(
        &mut entries,
        &io_int(INT_EXTINT, CONFORMS, ISA_BUS_ID, 0, 0),
    );
    for irq in 0..16u8 {
        if irq == 2 {
            continue;
        }
        let pin = if irq == 0 { TIMER_GSI as u8 } else { irq };
        let flags = if irq == SCI_IRQ {
            ACTIVE_HIGH | LEVEL
        } else {
            CONFORMS
        };
        add(
            &mut entries,
            &io_int(INT_VECTORED, flags, ISA_BUS_ID, irq, pin),
        );
    }
    for route in &m.pci_intx {
        // validate() keeps slot < 32, pin < 4 and gsi < 24.
        let source = route.slot << 2 | route.pin;
        add(
            &mut entries,
            &io_int(
                INT_VECTORED,
                ACTIVE_LOW | LEVEL,
                PCI_BUS_ID,
                source,
                route.gsi as u8,
            ),
        );
    }

    for (kind, lint) in [(INT_EXTINT, 0u8), (INT_NMI, 1u8)] {
        let mut e = vec![ENTRY_LOCAL_INTERRUPT, kind];
        e.put_u16(CONFORMS);
        e.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
        add(&mut entries, &e);
    }

    let mut t = Vec::with_capacity(HEADER_LEN + entries.len());
    t.extend_from_slice(b"PCMP");
    t.put_u16((HEADER_LEN + entries.len()) as u16);
    t.push(SPEC_REV_1_4);
    t.push(0); // checksum, below
    t.extend_from_slice(b"XHYVE   ");
    t.extend_from_slice(b"xhyve       ");
    t.put_u32(0); // no OEM table
    t.put_u16(0);
    t.put_u16(count);
    t.put_u32(LAPIC_BASE as u32);
    t.put_u16(0); // no extended entries
    t.push(0);
    t.push(0);
    debug_assert_eq!(t.len(), HEADER_LEN);
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

fn bus(id: u8, kind: &[u8; 6]) -> Vec<u8> {
    let mut e = vec![ENTRY_BUS, id];
    e.extend_from_slice(kind);
    e
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::PciIntxRoute;
    use super::*;

    struct Parsed {
        cpus: Vec<(u8, u8)>, // (apic id, flags)
        buses: Vec<(u8, String)>,
        ioapics: Vec<(u8, u8, u32)>, // (id, flags, address)
        io_ints: Vec<[u8; 8]>,
        local_ints: Vec<[u8; 8]>,
        lapic: u32,
    }

    fn parse(mem: &GuestMemory) -> Parsed {
        let fp = read(mem, MPTABLE_START, 16);
        assert_eq!(&fp[0..4], b"_MP_");
        assert!(sums_to_zero(&fp), "floating pointer checksum");
        assert_eq!(fp[8], 1);
        assert_eq!(fp[9], 4);
        let addr = u32_at(&fp, 4) as u64;
        let header = read(mem, addr, HEADER_LEN);
        assert_eq!(&header[0..4], b"PCMP");
        let len = u16_at(&header, 4) as usize;
        let table = read(mem, addr, len);
        assert!(sums_to_zero(&table), "configuration table checksum");
        let count = u16_at(&table, 34);
        let mut p = Parsed {
            cpus: vec![],
            buses: vec![],
            ioapics: vec![],
            io_ints: vec![],
            local_ints: vec![],
            lapic: u32_at(&table, 36),
        };
        let mut off = HEADER_LEN;
        let mut last_type = 0;
        for _ in 0..count {
            let kind = table[off];
            assert!(kind >= last_type, "entries must be sorted by type");
            last_type = kind;
            let size = if kind == ENTRY_PROCESSOR { 20 } else { 8 };
            let e = &table[off..off + size];
            match kind {
                ENTRY_PROCESSOR => p.cpus.push((e[1], e[3])),
                ENTRY_BUS => p
                    .buses
                    .push((e[1], String::from_utf8(e[2..8].to_vec()).unwrap())),
                ENTRY_IOAPIC => p.ioapics.push((e[1], e[3], u32_at(e, 4))),
                ENTRY_IO_INTERRUPT => p.io_ints.push(e.try_into().unwrap()),
                ENTRY_LOCAL_INTERRUPT => p.local_ints.push(e.try_into().unwrap()),
                other => panic!("unknown entry type {other}"),
            }
            off += size;
        }
        assert_eq!(off, len, "entry count and table length agree");
        p
    }

    #[test]
    fn describes_cpus_buses_and_ioapic() {
        let m = machine(4, 128 << 20);
        let mem = memory_for(&m);
        write_mptable(&mem, &m).unwrap();
        let p = parse(&mem);
        assert_eq!(p.lapic, 0xFEE0_0000);
        assert_eq!(p.cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(
            p.buses,
            vec![(0, "PCI   ".to_string()), (1, "ISA   ".to_string())]
        );
        assert_eq!(p.ioapics, vec![(4, 1, 0xFEC0_0000)]);
        assert_eq!(p.local_ints.len(), 2);
        // ExtINT on LINT0, NMI on LINT1, to every LAPIC.
        assert_eq!(p.local_ints[0][1], INT_EXTINT);
        assert_eq!(p.local_ints[0][7], 0);
        assert_eq!(p.local_ints[1][1], INT_NMI);
        assert_eq!(p.local_ints[1][7], 1);
        assert!(p.local_ints.iter().all(|e| e[6] == 0xFF));
    }

    #[test]
    fn routes_isa_irqs_like_the_madt() {
        let m = machine(2, 64 << 20);
        let mem = memory_for(&m);
        write_mptable(&mem, &m).unwrap();
        let p = parse(&mem);
        // ExtINT + IRQ0 + IRQ1,3..15
        assert_eq!(p.io_ints.len(), 16);
        let isa: Vec<_> = p.io_ints.iter().filter(|e| e[4] == ISA_BUS_ID).collect();
        assert!(isa.iter().all(|e| e[6] == 2), "destination is the IOAPIC");
        let extint = isa.iter().find(|e| e[1] == INT_EXTINT).unwrap();
        assert_eq!((extint[5], extint[7]), (0, 0));
        let pin_of = |irq: u8| {
            isa.iter()
                .find(|e| e[1] == INT_VECTORED && e[5] == irq)
                .map(|e| (e[7], u16_at(&e[..], 2)))
        };
        assert_eq!(pin_of(0), Some((2, 0)));
        assert_eq!(pin_of(2), None);
        assert_eq!(pin_of(4), Some((4, 0)));
        assert_eq!(pin_of(9), Some((9, 0b1101)), "SCI is level, active high");
        assert_eq!(pin_of(15), Some((15, 0)));
    }

    #[test]
    fn routes_every_pci_intx() {
        let m = MachineDescription {
            pci_intx: vec![route(2, 0, 16), route(5, 1, 17), route(31, 3, 23)],
            ..machine(1, 64 << 20)
        };
        let mem = memory_for(&m);
        write_mptable(&mem, &m).unwrap();
        let p = parse(&mem);
        let pci: Vec<_> = p
            .io_ints
            .iter()
            .filter(|e| e[4] == PCI_BUS_ID)
            .map(|e| (e[5], e[6], e[7], u16_at(&e[..], 2)))
            .collect();
        assert_eq!(
            pci,
            vec![
                (2 << 2, 1, 16, 0b1111),
                (5 << 2 | 1, 1, 17, 0b1111),
                (31 << 2 | 3, 1, 23, 0b1111),
            ]
        );
    }

    #[test]
    fn many_cpus_fit_and_bad_routes_are_refused() {
        let m = machine(254, 64 << 20);
        let mem = memory_for(&m);
        write_mptable(&mem, &m).unwrap();
        assert_eq!(parse(&mem).cpus.len(), 254);

        let m = MachineDescription {
            pci_intx: vec![PciIntxRoute {
                bus: 0,
                slot: 3,
                pin: 0,
                gsi: 40,
            }],
            ..machine(1, 64 << 20)
        };
        assert!(matches!(
            write_mptable(&mem, &m),
            Err(TablesError::PciGsi(40))
        ));
    }
}
