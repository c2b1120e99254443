//! Interrupt messages between APICs: what an MSI, an IOAPIC redirection entry or an IPI asks
//! for, and which local APICs it reaches.
//!
//! Every source (PCI MSI writes, the IOAPIC, a LAPIC's ICR) is turned into one
//! `InterruptRequest`; `select_targets` then picks the destination LAPICs from a snapshot of
//! their addressing state (`DestinationInfo`), so routing needs no locks on the LAPICs.

/// The fixed 1 MiB window that MSI writes target (Intel SDM vol. 3 10.11.1).
pub const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;
const MSI_ADDRESS_MASK: u64 = 0xFFF0_0000;

/// Most vCPUs a `CpuSet` can name.
pub const MAX_CPUS: usize = 64;

/// How the interrupt is delivered (ICR / redirection entry / MSI data bits 10:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit field; `None` for the reserved encoding 3.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits & 7 {
            0 => Some(Self::Fixed),
            1 => Some(Self::LowestPriority),
            2 => Some(Self::Smi),
            4 => Some(Self::Nmi),
            5 => Some(Self::Init),
            6 => Some(Self::StartUp),
            7 => Some(Self::ExtInt),
            _ => None,
        }
    }

    pub fn bits(self) -> u32 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::ExtInt => 7,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerMode {
    Edge,
    Level,
}

/// How `destination` is compared with each LAPIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationMode {
    /// Against the APIC ID.
    Physical,
    /// Against the logical destination register (flat or cluster model, or x2APIC cluster).
    Logical,
}

/// ICR destination shorthand (bits 19:18); sources other than an ICR always use `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shorthand {
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

impl Shorthand {
    pub fn from_bits(bits: u32) -> Self {
        match bits & 3 {
            0 => Self::None,
            1 => Self::SelfOnly,
            2 => Self::AllIncludingSelf,
            _ => Self::AllExcludingSelf,
        }
    }
}

/// One interrupt on its way to one or more local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptRequest {
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    pub destination_mode: DestinationMode,
    pub trigger_mode: TriggerMode,
    /// The level bit: false only for an INIT level de-assert IPI.
    pub assert: bool,
    pub shorthand: Shorthand,
    pub destination: u32,
    /// True when `destination` is a full 32-bit x2APIC destination (x2APIC ICR); false when
    /// it is the 8-bit xAPIC form (xAPIC ICR, IOAPIC, MSI), whose broadcast is 0xFF.
    pub wide_destination: bool,
}

impl InterruptRequest {
    /// A fixed, edge, physical interrupt to one APIC ID (8-bit form); a handy base for tests
    /// and for simple sources.
    pub fn fixed(vector: u8, apic_id: u8) -> Self {
        Self {
            vector,
            delivery_mode: DeliveryMode::Fixed,
            destination_mode: DestinationMode::Physical,
            trigger_mode: TriggerMode::Edge,
            assert: true,
            shorthand: Shorthand::None,
            destination: u32::from(apic_id),
            wide_destination: false,
        }
    }

    fn broadcast_destination(&self) -> u32 {
        if self.wide_destination {
            u32::MAX
        } else {
            0xFF
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsiError {
    #[error("MSI address {0:#x} is outside the 0xFEE00000 window")]
    BadAddress(u64),
    #[error("MSI data {0:#x} uses reserved delivery mode 3")]
    ReservedDeliveryMode(u32),
}

/// Decodes an MSI address/data pair (Intel SDM vol. 3 10.11).
///
/// The destination mode bit is honoured whatever the redirection hint says (Linux sends
/// logical MSIs with RH=0); RH=1 on a fixed interrupt asks for lowest-priority arbitration.
pub fn decode_msi(address: u64, data: u32) -> Result<InterruptRequest, MsiError> {
    if address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE {
        return Err(MsiError::BadAddress(address));
    }
    let redirection_hint = address & (1 << 3) != 0;
    let destination_mode = if address & (1 << 2) != 0 {
        DestinationMode::Logical
    } else {
        DestinationMode::Physical
    };
    let mut delivery_mode =
        DeliveryMode::from_bits(data >> 8).ok_or(MsiError::ReservedDeliveryMode(data))?;
    if redirection_hint && delivery_mode == DeliveryMode::Fixed {
        delivery_mode = DeliveryMode::LowestPriority;
    }
    let trigger_mode = if data & (1 << 15) != 0 {
        TriggerMode::Level
    } else {
        TriggerMode::Edge
    };
    Ok(InterruptRequest {
        vector: (data & 0xFF) as u8,
        delivery_mode,
        destination_mode,
        trigger_mode,
        // Edge-triggered messages always assert; for level ones the bit says which way.
        assert: trigger_mode == TriggerMode::Edge || data & (1 << 14) != 0,
        shorthand: Shorthand::None,
        destination: ((address >> 12) & 0xFF) as u32,
        wide_destination: false,
    })
}

/// What the router needs to know about one LAPIC, taken from `Lapic::destination_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationInfo {
    /// The APIC ID: 8-bit in xAPIC mode, 32-bit in x2APIC mode.
    pub apic_id: u32,
    pub x2apic: bool,
    /// The logical destination register as the guest sees it (xAPIC: ID in bits 31:24).
    pub logical_id: u32,
    /// xAPIC DFR model: true for cluster (0x0), false for flat (0xF).
    pub cluster_model: bool,
    /// IA32_APIC_BASE enable bit: a globally disabled APIC receives nothing.
    pub hardware_enabled: bool,
    /// SVR software enable: lowest-priority arbitration skips disabled APICs.
    pub software_enabled: bool,
    /// Task priority, for lowest-priority arbitration.
    pub task_priority: u8,
}

/// A set of vCPU indices (positions in the `DestinationInfo` slice), without allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSet(u64);

impl CpuSet {
    pub const EMPTY: CpuSet = CpuSet(0);

    pub fn insert(&mut self, cpu: usize) {
        if cpu < MAX_CPUS {
            self.0 |= 1 << cpu;
        }
    }

    pub fn contains(&self, cpu: usize) -> bool {
        cpu < MAX_CPUS && self.0 & (1 << cpu) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn bits(&self) -> u64 {
        self.0
    }

    /// The members, lowest index first.
    pub fn iter(&self) -> impl Iterator<Item = usize> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let cpu = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            Some(cpu)
        })
    }
}

/// Does `destination` (logical mode) name the LAPIC described by `cpu`?
fn logical_match(destination: u32, wide: bool, cpu: &DestinationInfo) -> bool {
    if cpu.x2apic {
        // x2APIC cluster model: 16-bit cluster ID, 16-bit member mask (SDM 10.12.10.2).
        let dest = if wide {
            destination
        } else {
            // An 8-bit xAPIC-format destination cannot name an x2APIC cluster beyond 0.
            destination & 0xFF
        };
        return dest >> 16 == cpu.logical_id >> 16 && dest & cpu.logical_id & 0xFFFF != 0;
    }
    let dest = destination & 0xFF;
    let ldr = (cpu.logical_id >> 24) & 0xFF;
    if cpu.cluster_model {
        dest >> 4 == ldr >> 4 && dest & ldr & 0xF != 0
    } else {
        dest & ldr != 0
    }
}

fn destination_match(request: &InterruptRequest, cpu: &DestinationInfo) -> bool {
    if request.destination == request.broadcast_destination() {
        return true;
    }
    // A 0xFF from an 8-bit source still broadcasts to x2APIC targets (KVM does the same).
    if !request.wide_destination && request.destination & 0xFF == 0xFF {
        return true;
    }
    match request.destination_mode {
        DestinationMode::Physical => {
            if request.wide_destination || cpu.x2apic {
                cpu.apic_id == request.destination
            } else {
                cpu.apic_id & 0xFF == request.destination & 0xFF
            }
        }
        DestinationMode::Logical => {
            logical_match(request.destination, request.wide_destination, cpu)
        }
    }
}

/// Picks the LAPICs `request` reaches.
///
/// `sender` is the vCPU index whose ICR sent an IPI (needed for shorthands; `None` for
/// MSIs and the IOAPIC). `lowest_priority_cursor` rotates ties in lowest-priority
/// arbitration so equal-priority CPUs share the load; the router owns it.
pub fn select_targets(
    request: &InterruptRequest,
    cpus: &[DestinationInfo],
    sender: Option<usize>,
    lowest_priority_cursor: &mut usize,
) -> CpuSet {
    let mut set = CpuSet::EMPTY;
    let count = cpus.len().min(MAX_CPUS);
    for (index, cpu) in cpus.iter().enumerate().take(count) {
        if !cpu.hardware_enabled {
            continue;
        }
        let hit = match request.shorthand {
            Shorthand::None => destination_match(request, cpu),
            Shorthand::SelfOnly => sender == Some(index),
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => sender != Some(index),
        };
        if hit {
            set.insert(index);
        }
    }
    if request.delivery_mode == DeliveryMode::LowestPriority && set.len() > 1 {
        set = lowest_priority(set, cpus, lowest_priority_cursor);
    }
    set
}

/// The routing state the VMM keeps: today only the lowest-priority rotation.
#[derive(Debug, Default, Clone)]
pub struct Router {
    lowest_priority_cursor: usize,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks the LAPICs `request` reaches; see `select_targets`.
    pub fn route(
        &mut self,
        request: &InterruptRequest,
        cpus: &[DestinationInfo],
        sender: Option<usize>,
    ) -> CpuSet {
        select_targets(request, cpus, sender, &mut self.lowest_priority_cursor)
    }
}

/// Narrows `candidates` to the one with the lowest task-priority class, preferring
/// software-enabled APICs and rotating among ties from `cursor`.
fn lowest_priority(candidates: CpuSet, cpus: &[DestinationInfo], cursor: &mut usize) -> CpuSet {
    let count = cpus.len().min(MAX_CPUS);
    if count == 0 {
        return CpuSet::EMPTY;
    }
    let start = *cursor % count;
    let mut best: Option<(bool, u8, usize)> = None;
    for step in 0..count {
        let index = (start + step) % count;
        if !candidates.contains(index) {
            continue;
        }
        let cpu = &cpus[index];
        let key = (!cpu.software_enabled, cpu.task_priority >> 4);
        if best.is_none_or(|(disabled, class, _)| key < (disabled, class)) {
            best = Some((key.0, key.1, index));
        }
    }
    match best {
        Some((_, _, index)) => {
            *cursor = index + 1;
            let mut set = CpuSet::EMPTY;
            set.insert(index);
            set
        }
        None => CpuSet::EMPTY,
    }
}

/// Where finished requests go: the VMM's router, or a `Vec` in tests.
pub trait DeliverySink {
    fn deliver(&mut self, request: InterruptRequest);
}

impl DeliverySink for Vec<InterruptRequest> {
    fn deliver(&mut self, request: InterruptRequest) {
        self.push(request);
    }
}

impl<F: FnMut(InterruptRequest)> DeliverySink for F {
    fn deliver(&mut self, request: InterruptRequest) {
        self(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xapic(id: u32) -> DestinationInfo {
        DestinationInfo {
            apic_id: id,
            x2apic: false,
            logical_id: 0,
            cluster_model: false,
            hardware_enabled: true,
            software_enabled: true,
            task_priority: 0,
        }
    }

    fn flat(id: u32, logical: u8) -> DestinationInfo {
        DestinationInfo {
            logical_id: u32::from(logical) << 24,
            ..xapic(id)
        }
    }

    fn x2(id: u32) -> DestinationInfo {
        DestinationInfo {
            apic_id: id,
            x2apic: true,
            logical_id: ((id >> 4) << 16) | (1 << (id & 0xF)),
            ..xapic(id)
        }
    }

    fn targets(request: &InterruptRequest, cpus: &[DestinationInfo]) -> Vec<usize> {
        let mut cursor = 0;
        select_targets(request, cpus, None, &mut cursor)
            .iter()
            .collect()
    }

    #[test]
    fn decodes_physical_fixed_msi() {
        let req = decode_msi(0xFEE0_3000, 0x0041).unwrap();
        assert_eq!(req.vector, 0x41);
        assert_eq!(req.destination, 3);
        assert_eq!(req.delivery_mode, DeliveryMode::Fixed);
        assert_eq!(req.destination_mode, DestinationMode::Physical);
        assert_eq!(req.trigger_mode, TriggerMode::Edge);
        assert!(req.assert);
        assert!(!req.wide_destination);
    }

    #[test]
    fn decodes_logical_lowest_priority_level_msi() {
        // RH=1, DM=1, dest 0x0F; data: level, assert, lowest priority, vector 0x55.
        let req = decode_msi(0xFEE0_F00C, 0xC155).unwrap();
        assert_eq!(req.destination, 0x0F);
        assert_eq!(req.destination_mode, DestinationMode::Logical);
        assert_eq!(req.delivery_mode, DeliveryMode::LowestPriority);
        assert_eq!(req.trigger_mode, TriggerMode::Level);
        assert!(req.assert);
        let deassert = decode_msi(0xFEE0_0000, 0x8055).unwrap();
        assert!(!deassert.assert);
    }

    #[test]
    fn redirection_hint_turns_fixed_into_lowest_priority() {
        let req = decode_msi(0xFEE0_1008, 0x0030).unwrap();
        assert_eq!(req.delivery_mode, DeliveryMode::LowestPriority);
        assert_eq!(req.destination_mode, DestinationMode::Physical);
        let nmi = decode_msi(0xFEE0_1008, 0x0400).unwrap();
        assert_eq!(nmi.delivery_mode, DeliveryMode::Nmi);
    }

    #[test]
    fn rejects_bad_msi() {
        assert_eq!(
            decode_msi(0xFED0_0000, 0x30),
            Err(MsiError::BadAddress(0xFED0_0000))
        );
        assert_eq!(
            decode_msi(0xFEE0_0000, 0x330),
            Err(MsiError::ReservedDeliveryMode(0x330))
        );
    }

    #[test]
    fn delivery_mode_bits_round_trip() {
        for bits in 0..8 {
            match DeliveryMode::from_bits(bits) {
                Some(mode) => assert_eq!(mode.bits(), bits),
                None => assert_eq!(bits, 3),
            }
        }
    }

    #[test]
    fn physical_destination_picks_one_apic_id() {
        let cpus = [xapic(0), xapic(1), xapic(2)];
        assert_eq!(targets(&InterruptRequest::fixed(0x30, 1), &cpus), vec![1]);
        assert!(targets(&InterruptRequest::fixed(0x30, 7), &cpus).is_empty());
        assert_eq!(
            targets(&InterruptRequest::fixed(0x30, 0xFF), &cpus),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn hardware_disabled_apic_receives_nothing() {
        let mut off = xapic(1);
        off.hardware_enabled = false;
        let cpus = [xapic(0), off];
        assert!(targets(&InterruptRequest::fixed(0x30, 1), &cpus).is_empty());
        assert_eq!(
            targets(&InterruptRequest::fixed(0x30, 0xFF), &cpus),
            vec![0]
        );
    }

    #[test]
    fn logical_flat_matches_any_shared_bit() {
        let cpus = [flat(0, 0x01), flat(1, 0x02), flat(2, 0x04)];
        let mut req = InterruptRequest::fixed(0x30, 0x05);
        req.destination_mode = DestinationMode::Logical;
        assert_eq!(targets(&req, &cpus), vec![0, 2]);
        req.destination = 0x08;
        assert!(targets(&req, &cpus).is_empty());
    }

    #[test]
    fn logical_cluster_needs_cluster_and_member() {
        let cluster = |id, ldr| DestinationInfo {
            cluster_model: true,
            ..flat(id, ldr)
        };
        let cpus = [cluster(0, 0x11), cluster(1, 0x12), cluster(2, 0x21)];
        let mut req = InterruptRequest::fixed(0x30, 0x13);
        req.destination_mode = DestinationMode::Logical;
        assert_eq!(targets(&req, &cpus), vec![0, 1]);
        req.destination = 0x21;
        assert_eq!(targets(&req, &cpus), vec![2]);
        req.destination = 0x31;
        assert!(targets(&req, &cpus).is_empty());
    }

    #[test]
    fn x2apic_physical_and_cluster_destinations() {
        let cpus = [x2(0), x2(1), x2(17)];
        let mut req = InterruptRequest::fixed(0x40, 0);
        req.wide_destination = true;
        req.destination = 17;
        assert_eq!(targets(&req, &cpus), vec![2]);
        req.destination_mode = DestinationMode::Logical;
        req.destination = 0x0000_0003; // cluster 0, members 0 and 1
        assert_eq!(targets(&req, &cpus), vec![0, 1]);
        req.destination = 0x0001_0002; // cluster 1, member 1 = APIC 17
        assert_eq!(targets(&req, &cpus), vec![2]);
        req.destination = u32::MAX;
        assert_eq!(targets(&req, &cpus), vec![0, 1, 2]);
    }

    #[test]
    fn shorthands_use_the_sender() {
        let cpus = [xapic(0), xapic(1), xapic(2)];
        let mut req = InterruptRequest::fixed(0x30, 0);
        let mut cursor = 0;
        req.shorthand = Shorthand::SelfOnly;
        assert_eq!(
            select_targets(&req, &cpus, Some(1), &mut cursor).bits(),
            0b010
        );
        req.shorthand = Shorthand::AllIncludingSelf;
        assert_eq!(
            select_targets(&req, &cpus, Some(1), &mut cursor).bits(),
            0b111
        );
        req.shorthand = Shorthand::AllExcludingSelf;
        assert_eq!(
            select_targets(&req, &cpus, Some(1), &mut cursor).bits(),
            0b101
        );
    }

    #[test]
    fn lowest_priority_picks_lowest_tpr_and_rotates_ties() {
        let mut cpus = [flat(0, 1), flat(1, 2), flat(2, 4)];
        cpus[0].task_priority = 0x20;
        let mut req = InterruptRequest::fixed(0x30, 0x07);
        req.destination_mode = DestinationMode::Logical;
        req.delivery_mode = DeliveryMode::LowestPriority;
        let mut cursor = 0;
        let first = select_targets(&req, &cpus, None, &mut cursor);
        let second = select_targets(&req, &cpus, None, &mut cursor);
        let third = select_targets(&req, &cpus, None, &mut cursor);
        assert_eq!(first.len(), 1);
        assert_eq!(first.iter().collect::<Vec<_>>(), vec![1]);
        assert_eq!(second.iter().collect::<Vec<_>>(), vec![2]);
        assert_eq!(third.iter().collect::<Vec<_>>(), vec![1]);
        // A software-disabled APIC only wins when nothing else matches.
        cpus[1].software_enabled = false;
        cpus[2].software_enabled = false;
        let only = select_targets(&req, &cpus, None, &mut cursor);
        assert_eq!(only.iter().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn cpu_set_ignores_out_of_range_indices() {
        let mut set = CpuSet::EMPTY;
        set.insert(MAX_CPUS);
        assert!(set.is_empty());
        set.insert(63);
        set.insert(0);
        assert!(set.contains(63));
        assert!(!set.contains(64));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 63]);
    }

    /// IOAPIC -> router -> LAPIC -> EOI -> IOAPIC, the path a level-triggered INTx takes.
    #[test]
    fn level_interrupt_round_trip_through_the_models() {
        use crate::intc::ioapic::IoApic;
        use crate::intc::lapic::{Accepted, Lapic, LapicConfig, LapicEvent};

        let mut lapics: Vec<Lapic> = (0..2)
            .map(|id| {
                let mut lapic = Lapic::new(LapicConfig {
                    apic_id: id,
                    bootstrap: id == 0,
                    x2apic_allowed: false,
                    tsc_hz: 1_000_000_000,
                });
                lapic.mmio_write(0xF0, &0x1FFu32.to_le_bytes(), 0);
                lapic
            })
            .collect();
        let mut ioapic = IoApic::new(0);
        let mut sent = Vec::new();
        // Pin 16: level, physical, vector 0x61, to APIC 1.
        ioapic.mmio_write(0x00, &0x31u32.to_le_bytes(), &mut sent);
        ioapic.mmio_write(0x10, &0x0100_0000u32.to_le_bytes(), &mut sent);
        ioapic.mmio_write(0x00, &0x30u32.to_le_bytes(), &mut sent);
        ioapic.mmio_write(0x10, &0x0000_8061u32.to_le_bytes(), &mut sent);
        ioapic.set_pin(16, true, &mut sent);
        assert_eq!(sent.len(), 1);

        let mut router = Router::new();
        let cpus: Vec<DestinationInfo> = lapics.iter().map(Lapic::destination_info).collect();
        let targets = router.route(&sent[0], &cpus, None);
        assert_eq!(targets.iter().collect::<Vec<_>>(), vec![1]);
        assert_eq!(lapics[1].deliver(&sent[0]), Accepted::Interrupt);
        assert_eq!(lapics[1].acknowledge(), Some(0x61));
        let LapicEvent::EoiBroadcast(vector) = lapics[1].mmio_write(0xB0, &[0; 4], 0) else {
            panic!("level EOI not broadcast");
        };
        sent.clear();
        ioapic.end_of_interrupt(vector, &mut sent);
        assert_eq!(sent.len(), 1, "pin still asserted: delivered again");
        ioapic.set_pin(16, false, &mut sent);
        lapics[1].deliver(&sent[0]);
        lapics[1].acknowledge();
        let LapicEvent::EoiBroadcast(vector) = lapics[1].mmio_write(0xB0, &[0; 4], 0) else {
            panic!("level EOI not broadcast");
        };
        sent.clear();
        ioapic.end_of_interrupt(vector, &mut sent);
        assert!(sent.is_empty());
    }

    #[test]
    fn ipi_from_one_lapic_reaches_another() {
        use crate::intc::lapic::{Accepted, Lapic, LapicConfig, LapicEvent};

        let config = |id| LapicConfig {
            apic_id: id,
            bootstrap: id == 0,
            x2apic_allowed: true,
            tsc_hz: 1_000_000_000,
        };
        let mut bsp = Lapic::new(config(0));
        let mut ap = Lapic::new(config(1));
        bsp.mmio_write(0x310, &0x0100_0000u32.to_le_bytes(), 0);
        let LapicEvent::Ipi(init) = bsp.mmio_write(0x300, &0x0000_4500u32.to_le_bytes(), 0) else {
            panic!("no INIT");
        };
        let mut router = Router::new();
        let cpus = [bsp.destination_info(), ap.destination_info()];
        assert_eq!(router.route(&init, &cpus, Some(0)).bits(), 0b10);
        assert_eq!(ap.deliver(&init), Accepted::Init);
        let LapicEvent::Ipi(sipi) = bsp.mmio_write(0x300, &0x0000_4610u32.to_le_bytes(), 0) else {
            panic!("no SIPI");
        };
        assert_eq!(ap.deliver(&sipi), Accepted::StartUp(0x10));
    }

    #[test]
    fn closures_and_vecs_are_sinks() {
        let mut seen = Vec::new();
        let mut sink = |r: InterruptRequest| seen.push(r.vector);
        sink.deliver(InterruptRequest::fixed(0x31, 0));
        let mut list: Vec<InterruptRequest> = Vec::new();
        list.deliver(InterruptRequest::fixed(0x32, 0));
        assert_eq!(seen, vec![0x31]);
        assert_eq!(list[0].vector, 0x32);
    }
}
