//! PCI: configuration space, the device tree by (bus, slot, function), and the two ways a
//! guest reaches configuration space: I/O ports 0xCF8/0xCFC (mechanism #1) and ECAM (MMIO).
//!
//! Devices implement [`PciDevice`]: configuration space (with BARs and capabilities declared
//! in [`ConfigSpace`]) and the accesses to their BARs. The [`PciBus`] places BARs at start-up
//! and keeps the port and MMIO buses in step with what each function decodes as the guest
//! moves BARs or flips the command register.

mod config_space;
mod host_access;
pub mod hostbridge;
pub mod lpc;
pub mod msi;
pub mod msix;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

pub use config_space::{
    BarKind, BarSpec, ConfigSpace, ConfigSpaceError, DecodedBar, PciIds, BAR_COUNT,
    COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE,
    CONFIG_SPACE_SIZE, DECODE_REGISTERS, LEGACY_CONFIG_SPACE_SIZE,
};
pub use host_access::{PciConfigIo, PciEcam, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT};

use super::bus::{lock, Bus, BusDevice};
use super::doorbell::Doorbells;

/// The IOAPIC pin (GSI) of a slot's INTx pin (0 = INTA#): the usual swizzle over GSIs 16-23,
/// the routing the MP table and the DSDT's `_PRT` describe.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    16 + (u32::from(slot) + u32::from(pin)) % 8
}

/// A PCI function as the configuration-space accessors see it.
pub trait PciDevice: Send {
    fn config_space(&self) -> &ConfigSpace;
    fn config_space_mut(&mut self) -> &mut ConfigSpace;

    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`. Devices with side effects on
    /// configuration reads override this.
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config_space().read(offset, data);
    }

    /// Writes `data` at `offset`, honouring the read-only and write-1-to-clear bits.
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config_space_mut().write(offset, data);
    }

    /// Reads at `offset` inside BAR `bar`. Only called for BARs the function declared.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xFF);
    }

    /// Writes at `offset` inside BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }

    /// A machine reset: the function goes back to its power-on state, its configuration
    /// space to `power_on` (what start-up left: BARs at their assigned addresses, decoding
    /// on). A function with threads stops them first, after the request in flight. The bus
    /// remaps the BARs afterwards.
    fn reset(&mut self, power_on: &ConfigSpace) {
        self.config_space_mut().copy_registers_from(power_on);
    }

    /// Offers the VMM's doorbell service, which can make a guest write ring a notifier
    /// without a VM exit. Functions without queue doorbells ignore it.
    fn attach_doorbells(&mut self, doorbells: Arc<dyn Doorbells>) {
        let _ = doorbells;
    }
}

/// Puts one BAR of a function on the port or MMIO bus.
struct BarWindow {
    device: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

/// Where start-up places BARs: half-open `[start, end)` windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarWindows {
    pub io: (u64, u64),
    pub mem32: (u64, u64),
    pub mem64: (u64, u64),
}

impl BarWindows {
    /// xhyve's windows: I/O from 0x2000, 32-bit memory from the PCI hole up to ECAM, 64-bit
    /// memory in the 32 GiB after high RAM (the windows the DSDT publishes).
    pub fn for_memory(memory_bytes: u64) -> Self {
        use crate::arch::x86_64::layout::{
            highmem_size, HIGHMEM_BASE, PCI_ECAM_BASE, PCI_HOLE_START,
        };
        let high = HIGHMEM_BASE + highmem_size(memory_bytes);
        BarWindows {
            io: (0x2000, 0x1_0000),
            mem32: (PCI_HOLE_START, PCI_ECAM_BASE),
            mem64: (high, high + (32 << 30)),
        }
    }
}

/// The bus ranges one function has mapped, by BAR index.
type MappedBars = [Option<DecodedBar>; BAR_COUNT];

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// A function's position: bus 0-255, slot 0-31, function 0-7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

impl PciAddress {
    pub const MAX_SLOT: u8 = 31;
    pub const MAX_FUNCTION: u8 = 7;

    pub fn new(bus: u8, slot: u8, function: u8) -> Result<Self, PciError> {
        let addr = PciAddress {
            bus,
            slot,
            function,
        };
        if slot > Self::MAX_SLOT {
            return Err(PciError::BadSlot(addr));
        }
        if function > Self::MAX_FUNCTION {
            return Err(PciError::BadFunction(addr));
        }
        Ok(addr)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.bus, self.slot, self.function)
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("invalid PCI slot {0}: slot must be 0-31")]
    BadSlot(PciAddress),
    #[error("invalid PCI slot {0}: function must be 0-7")]
    BadFunction(PciAddress),
    #[error("PCI slot {0} is already in use")]
    Occupied(PciAddress),
    #[error("no room for BAR {bar} ({size:#x} bytes) of {addr}")]
    NoRoomForBar {
        addr: PciAddress,
        bar: usize,
        size: u64,
    },
}

/// Where the next BAR goes in each window (I/O, 32-bit, 64-bit memory), once placement
/// has begun: functions added later (hot-plug) are placed after the others.
struct Placement {
    next: [u64; 3],
    ends: [u64; 3],
}

/// All PCI functions of the machine, and the buses their BARs appear on. Functions can be
/// added while the guest runs (configuration accesses read the map under a read lock).
pub struct PciBus {
    devices: RwLock<BTreeMap<PciAddress, SharedPciDevice>>,
    placement: Mutex<Option<Placement>>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    mapped: Mutex<BTreeMap<PciAddress, MappedBars>>,
    /// Each function's configuration space once placed (BARs assigned, decoding on): what
    /// a machine reset restores.
    power_on: Mutex<BTreeMap<PciAddress, ConfigSpace>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus whose BARs go to private port and MMIO buses (for tests and tools).
    pub fn new() -> Self {
        Self::with_buses(Arc::new(Bus::new()), Arc::new(Bus::new()))
    }

    /// A bus whose I/O BARs appear on `io_bus` and memory BARs on `mmio_bus`.
    pub fn with_buses(io_bus: Arc<Bus>, mmio_bus: Arc<Bus>) -> Self {
        PciBus {
            devices: RwLock::new(BTreeMap::new()),
            placement: Mutex::new(None),
            io_bus,
            mmio_bus,
            mapped: Mutex::new(BTreeMap::new()),
            power_on: Mutex::new(BTreeMap::new()),
        }
    }

    fn devices(&self) -> RwLockReadGuard<'_, BTreeMap<PciAddress, SharedPciDevice>> {
        self.devices
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Places every declared BAR in `windows` (naturally aligned, in address order), enables
    /// decoding as firmware would, and maps the BARs on the buses. Functions added after
    /// this are placed as they come.
    pub fn allocate_bars(&self, windows: &BarWindows) -> Result<(), PciError> {
        let mut placement = Placement {
            next: [windows.io.0, windows.mem32.0, windows.mem64.0],
            ends: [windows.io.1, windows.mem32.1, windows.mem64.1],
        };
        let devices: Vec<_> = self
            .devices()
            .iter()
            .map(|(a, d)| (*a, d.clone()))
            .collect();
        for (addr, device) in &devices {
            place_bars(&mut placement, *addr, device)?;
        }
        *lock(&self.placement) = Some(placement);
        for (addr, device) in devices {
            self.record_power_on(addr, &device);
            self.update_mappings(addr);
        }
        Ok(())
    }

    fn record_power_on(&self, addr: PciAddress, device: &SharedPciDevice) {
        let config = lock(device).config_space().clone();
        lock(&self.power_on).insert(addr, config);
    }

    /// A machine reset: every function back to its power-on state and its configuration
    /// space as start-up (or a later `add`) placed it, the buses remapped to match. Each
    /// function's own reset waits for its threads; the caller has paused the vCPUs.
    pub fn reset(&self) {
        let devices: Vec<_> = self
            .devices()
            .iter()
            .map(|(a, d)| (*a, d.clone()))
            .collect();
        let power_on = lock(&self.power_on).clone();
        for (addr, device) in &devices {
            match power_on.get(addr) {
                Some(config) => lock(device).reset(config),
                // Never placed (no allocate_bars yet): its own state is all it has.
                None => {
                    let config = lock(device).config_space().clone();
                    lock(device).reset(&config);
                }
            }
        }
        for (addr, _) in &devices {
            // The multi-function bit is the slot's, not in any one snapshot.
            self.update_multifunction(addr.bus, addr.slot);
            self.update_mappings(*addr);
        }
    }

    /// Makes the buses match what the function at `addr` decodes now.
    fn update_mappings(&self, addr: PciAddress) {
        let Some(device) = self.devices().get(&addr).cloned() else {
            return;
        };
        let mut wanted: MappedBars = [None; BAR_COUNT];
        for bar in lock(&device).config_space().decoded_bars() {
            wanted[bar.index] = Some(bar);
        }
        let mut mapped = lock(&self.mapped);
        let current = mapped.entry(addr).or_insert([None; BAR_COUNT]);
        for index in 0..BAR_COUNT {
            if current[index] == wanted[index] {
                continue;
            }
            if let Some(old) = current[index].take() {
                self.bus_for(old.kind).remove(old.base, old.size);
            }
            if let Some(new) = wanted[index] {
                let window = Arc::new(Mutex::new(BarWindow {
                    device: device.clone(),
                    bar: index,
                }));
                // A guest may place a BAR over another device; it then stays unmapped.
                match self.bus_for(new.kind).insert(window, new.base, new.size) {
                    Ok(()) => current[index] = Some(new),
                    Err(e) => log::trace!("{addr} BAR {index}: {e}"),
                }
            }
        }
    }

    fn bus_for(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.io_bus,
            BarKind::Memory32 | BarKind::Memory64 => &self.mmio_bus,
        }
    }

    /// The BAR ranges currently on the buses for the function at `addr`.
    pub fn mapped_bars(&self, addr: PciAddress) -> Vec<DecodedBar> {
        lock(&self.mapped)
            .get(&addr)
            .map(|bars| bars.iter().flatten().copied().collect())
            .unwrap_or_default()
    }

    /// Adds a function. A slot with functions other than 0 gets the multi-function bit set
    /// in the header type of each of its functions.
    ///
    /// After [`PciBus::allocate_bars`] (a function added while the machine runs), its BARs
    /// are placed after the others' and mapped at once.
    pub fn add(&self, addr: PciAddress, device: SharedPciDevice) -> Result<(), PciError> {
        let addr = PciAddress::new(addr.bus, addr.slot, addr.function)?;
        if self.devices().contains_key(&addr) {
            return Err(PciError::Occupied(addr));
        }
        if let Some(placement) = lock(&self.placement).as_mut() {
            place_bars(placement, addr, &device)?;
        }
        {
            let mut devices = self
                .devices
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if devices.contains_key(&addr) {
                return Err(PciError::Occupied(addr));
            }
            devices.insert(addr, device);
        }
        self.update_multifunction(addr.bus, addr.slot);
        if lock(&self.placement).is_some() {
            if let Some(device) = self.get(addr) {
                self.record_power_on(addr, &device);
            }
            self.update_mappings(addr);
        }
        Ok(())
    }

    fn update_multifunction(&self, bus: u8, slot: u8) {
        let first = PciAddress {
            bus,
            slot,
            function: 0,
        };
        let last = PciAddress {
            function: PciAddress::MAX_FUNCTION,
            ..first
        };
        let devices = self.devices();
        let multi = devices.range(first..=last).any(|(a, _)| a.function > 0);
        for (_, dev) in devices.range(first..=last) {
            lock(dev).config_space_mut().set_multifunction(multi);
        }
    }

    pub fn get(&self, addr: PciAddress) -> Option<SharedPciDevice> {
        self.devices().get(&addr).cloned()
    }

    /// Every function's address, in order.
    pub fn addresses(&self) -> Vec<PciAddress> {
        self.devices().keys().copied().collect()
    }

    /// Reads configuration space; an absent function reads as all ones.
    pub fn read_config(&self, addr: PciAddress, offset: u16, data: &mut [u8]) {
        match self.get(addr) {
            Some(dev) => lock(&dev).read_config(offset, data),
            None => data.fill(0xFF),
        }
    }

    /// Writes configuration space; writes to an absent function are dropped. A write to the
    /// command register or a BAR remaps the function's BARs.
    pub fn write_config(&self, addr: PciAddress, offset: u16, data: &[u8]) {
        let Some(dev) = self.get(addr) else {
            return;
        };
        lock(&dev).write_config(offset, data);
        let end = offset.saturating_add(data.len() as u16);
        if offset < DECODE_REGISTERS.end && end > DECODE_REGISTERS.start {
            self.update_mappings(addr);
        }
    }
}

/// Places the BARs of the function at `addr` from `placement`'s cursors and turns on its
/// decoding, as firmware would.
fn place_bars(
    placement: &mut Placement,
    addr: PciAddress,
    device: &SharedPciDevice,
) -> Result<(), PciError> {
    let mut dev = lock(device);
    let config = dev.config_space_mut();
    let mut command = 0;
    for bar in 0..BAR_COUNT {
        let Some(spec) = config.bar(bar) else {
            continue;
        };
        let (window, enable) = match spec.kind {
            BarKind::Io => (0, COMMAND_IO_SPACE),
            BarKind::Memory32 => (1, COMMAND_MEMORY_SPACE),
            BarKind::Memory64 => (2, COMMAND_MEMORY_SPACE),
        };
        let no_room = PciError::NoRoomForBar {
            addr,
            bar,
            size: spec.size,
        };
        let base = placement.next[window]
            .checked_next_multiple_of(spec.size)
            .ok_or_else(|| no_room.clone())?;
        let end = base.checked_add(spec.size).ok_or_else(|| no_room.clone())?;
        if end > placement.ends[window] {
            return Err(no_room);
        }
        placement.next[window] = end;
        config.set_bar_address(bar, base);
        command |= enable;
    }
    if command != 0 {
        let value = config.command() | command;
        config.init(0x04, &value.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use crate::devices::pci::hostbridge::HostBridge;

    fn hostbridge() -> SharedPciDevice {
        Arc::new(Mutex::new(HostBridge::netapp()))
    }

    #[test]
    fn intx_swizzle_stays_on_the_pci_pins() {
        assert_eq!(intx_gsi(0, 0), 16);
        assert_eq!(intx_gsi(3, 1), 20);
        assert_eq!(intx_gsi(31, 3), 18);
    }

    fn read32(bus: &PciBus, addr: PciAddress, offset: u16) -> u32 {
        let mut d = [0u8; 4];
        bus.read_config(addr, offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn at(bus: u8, slot: u8, function: u8) -> PciAddress {
        PciAddress::new(bus, slot, function).unwrap()
    }

    #[test]
    fn multifunction_bit_follows_the_slot() {
        let bus = PciBus::new();
        bus.add(at(0, 3, 0), hostbridge()).unwrap();
        bus.add(at(0, 3, 2), Arc::new(Mutex::new(HostBridge::amd())))
            .unwrap();
        bus.add(at(0, 4, 0), hostbridge()).unwrap();
        let header = |a| (read32(&bus, a, 0x0C) >> 16) as u8;
        assert_eq!(header(at(0, 3, 0)), 0x80);
        assert_eq!(header(at(0, 3, 2)), 0x80);
        assert_eq!(header(at(0, 4, 0)), 0x00);
        assert_eq!(read32(&bus, at(0, 3, 2), 0), 0x7432_1022);
    }

    /// A function with an I/O BAR 0 and a 32-bit memory BAR 1 that echo the offset.
    struct BarDevice(ConfigSpace);
    impl PciDevice for BarDevice {
        fn config_space(&self) -> &ConfigSpace {
            &self.0
        }
        fn config_space_mut(&mut self) -> &mut ConfigSpace {
            &mut self.0
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
    }

    fn bar_device() -> SharedPciDevice {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1AF4,
            device: 0x1005,
            class: 0xFF,
            subclass: 0,
            prog_if: 0,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let spec = |kind, size| BarSpec { kind, size };
        config.add_bar(0, spec(BarKind::Io, 0x40)).unwrap();
        config.add_bar(1, spec(BarKind::Memory32, 0x1000)).unwrap();
        config.add_bar(2, spec(BarKind::Memory64, 0x4000)).unwrap();
        Arc::new(Mutex::new(BarDevice(config)))
    }

    fn windows() -> BarWindows {
        BarWindows {
            io: (0x2000, 0x10000),
            mem32: (0xC000_0000, 0xE000_0000),
            mem64: (0x1_0000_0000, 0x9_0000_0000),
        }
    }

    #[test]
    fn a_reset_puts_bars_and_command_back_where_start_up_left_them() {
        let io = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let bus = PciBus::with_buses(io.clone(), mmio.clone());
        bus.add(at(0, 3, 0), bar_device()).unwrap();
        bus.allocate_bars(&windows()).unwrap();
        let before: Vec<u32> = (0..0x40)
            .step_by(4)
            .map(|o| read32(&bus, at(0, 3, 0), o))
            .collect();
        // The guest turns decoding off, moves BAR 1 and sets the interrupt line.
        bus.write_config(at(0, 3, 0), 4, &[0x00, 0x00]);
        bus.write_config(at(0, 3, 0), 0x14, &0xD000_0000u32.to_le_bytes());
        bus.write_config(at(0, 3, 0), 0x3C, &[9]);
        bus.write_config(at(0, 3, 0), 4, &[0x03, 0x04]);
        assert_eq!(read32(&bus, at(0, 3, 0), 0x14), 0xD000_0000);
        let mut b = [0u8; 1];
        assert!(mmio.read(0xD000_0010, &mut b));

        bus.reset();
        let after: Vec<u32> = (0..0x40)
            .step_by(4)
            .map(|o| read32(&bus, at(0, 3, 0), o))
            .collect();
        assert_eq!(before, after);
        assert!(
            !mmio.read(0xD000_0010, &mut b),
            "the moved BAR left the bus"
        );
        assert!(
            mmio.read(0xC000_0010, &mut b),
            "BAR 1 is back at its start-up place"
        );
        assert!(io.read(0x2001, &mut b));
        assert_eq!(bus.mapped_bars(at(0, 3, 0)).len(), 3);
    }

    #[test]
    fn bars_are_allocated_mapped_moved_and_disabled() {
        let io = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let bus = PciBus::with_buses(io.clone(), mmio.clone());
        bus.add(at(0, 3, 0), bar_device()).unwrap();
        bus.add(at(0, 4, 0), bar_device()).unwrap();
        bus.allocate_bars(&windows()).unwrap();
        assert_eq!(read32(&bus, at(0, 3, 0), 0x10), 0x2001);
        assert_eq!(read32(&bus, at(0, 4, 0), 0x10), 0x2041);
        assert_eq!(read32(&bus, at(0, 3, 0), 0x14), 0xC000_0000);
        assert_eq!(read32(&bus, at(0, 4, 0), 0x14), 0xC000_1000);
        assert_eq!(read32(&bus, at(0, 3, 0), 0x18), 0x0000_0004);
        assert_eq!(read32(&bus, at(0, 3, 0), 0x1C), 0x1);
        assert_eq!(read32(&bus, at(0, 4, 0), 0x18), 0x0000_4004);
        assert_eq!(read32(&bus, at(0, 3, 0), 4) & 0x3, 0x3, "decoding enabled");
        let mut b = [0u8; 1];
        assert!(io.read(0x2045, &mut b));
        assert_eq!(b[0], 0x05);
        assert!(mmio.read(0xC000_1010, &mut b));
        assert_eq!(b[0], 0x10 | 0x10);
        assert!(mmio.read(0x1_0000_4001, &mut b));
        assert_eq!(b[0], 0x21);

        // Memory decoding off: the memory BARs leave the bus, the I/O BAR stays.
        bus.write_config(at(0, 3, 0), 4, &[0x01, 0x00]);
        assert!(!mmio.read(0xC000_0000, &mut b));
        assert!(io.read(0x2000, &mut b));
        assert_eq!(bus.mapped_bars(at(0, 3, 0)).len(), 1);

        // Sizing, then moving BAR 1 while decoding is off, then turning it back on.
        bus.write_config(at(0, 3, 0), 0x14, &[0xFF; 4]);
        assert_eq!(read32(&bus, at(0, 3, 0), 0x14), 0xFFFF_F000);
        bus.write_config(at(0, 3, 0), 0x14, &0xD000_0000u32.to_le_bytes());
        bus.write_config(at(0, 3, 0), 4, &[0x03, 0x00]);
        assert!(mmio.read(0xD000_0020, &mut b));
        assert_eq!(b[0], 0x30);
        assert!(!mmio.read(0xC000_0000, &mut b));

        // Moving while enabled remaps at once; a move onto another function's BAR is refused
        // by the bus and leaves this BAR unmapped rather than stealing the range.
        bus.write_config(at(0, 3, 0), 0x10, &0x3000u32.to_le_bytes());
        assert!(io.read(0x3001, &mut b));
        assert_eq!(b[0], 0x01);
        assert!(!io.read(0x2000, &mut b));
        bus.write_config(at(0, 3, 0), 0x10, &0x2040u32.to_le_bytes());
        assert!(io.read(0x2041, &mut b));
        assert_eq!(b[0], 0x01, "still the other function's BAR");
        assert!(!io.read(0x3001, &mut b));
        assert!(bus.mapped_bars(at(0, 3, 0)).iter().all(|m| m.index != 0));
    }

    #[test]
    fn a_function_added_after_placement_is_placed_after_the_others_and_mapped() {
        let io = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let bus = PciBus::with_buses(io.clone(), mmio.clone());
        bus.add(at(0, 3, 0), bar_device()).unwrap();
        bus.allocate_bars(&windows()).unwrap();
        bus.add(at(0, 4, 0), bar_device()).unwrap();
        assert_eq!(read32(&bus, at(0, 4, 0), 0x10), 0x2041);
        assert_eq!(read32(&bus, at(0, 4, 0), 0x14), 0xC000_1000);
        assert_eq!(bus.mapped_bars(at(0, 4, 0)).len(), 3);
        let mut b = [0u8; 1];
        assert!(io.read(0x2045, &mut b));
        assert_eq!(b[0], 0x05);
        assert_eq!(bus.addresses(), vec![at(0, 3, 0), at(0, 4, 0)]);
    }

    #[test]
    fn bar_allocation_fails_cleanly_when_the_window_is_full() {
        let bus = PciBus::new();
        bus.add(at(0, 3, 0), bar_device()).unwrap();
        let tiny = BarWindows {
            io: (0x2000, 0x2020),
            ..windows()
        };
        assert_eq!(
            bus.allocate_bars(&tiny).unwrap_err().to_string(),
            "no room for BAR 0 (0x40 bytes) of 0:3:0"
        );
    }

    #[test]
    fn rejects_bad_and_occupied_slots() {
        let bus = PciBus::new();
        let bad_slot = PciAddress {
            bus: 0,
            slot: 32,
            function: 0,
        };
        assert_eq!(
            bus.add(bad_slot, hostbridge()).unwrap_err().to_string(),
            "invalid PCI slot 0:32:0: slot must be 0-31"
        );
        let bad_function = PciAddress {
            function: 8,
            ..at(0, 1, 0)
        };
        assert!(matches!(
            bus.add(bad_function, hostbridge()),
            Err(PciError::BadFunction(_))
        ));
        bus.add(at(0, 1, 0), hostbridge()).unwrap();
        assert!(matches!(
            bus.add(at(0, 1, 0), hostbridge()),
            Err(PciError::Occupied(_))
        ));
    }

    #[test]
    fn absent_function_ignores_writes() {
        let bus = PciBus::new();
        bus.write_config(at(0, 5, 0), 0x04, &[0xFF, 0xFF]);
        assert_eq!(read32(&bus, at(0, 5, 0), 0x04), 0xFFFF_FFFF);
    }
}
