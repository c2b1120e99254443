//! The virtio PCI transport, transitional: the virtio 1.x ("modern") interface through
//! vendor capabilities in a memory BAR, and the 0.9.5 ("legacy") register block in an I/O BAR
//! that xhyve offered, over one set of queues.
//!
//! BAR 0: legacy I/O registers. BAR 1: MSI-X table (0) and PBA (0x800), absent with `-W`,
//! which gives a single-vector MSI capability instead. BAR 2: modern common configuration
//! (0x0000), ISR (0x1000), device configuration (0x2000), notifications (0x3000, 4 bytes per
//! queue). Without MSI or MSI-X the function raises INTx (pin A) on its slot's GSI.
//!
//! A guest must not be able to hurt the VMM: queue errors put the device in
//! DEVICE_NEEDS_RESET and stop it until the driver resets it.
//!
//! Each queue has its own lock and notifier, and the interrupt state ([`Signals`]) its own
//! lock, all shared with the device's thread from activation on: the device serves and
//! completes requests without ever taking the transport's lock. A doorbell only rings the
//! queue's notifier (an ioeventfd registered with the hypervisor needs not even that).

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};

use super::{
    Activation, ActiveQueue, QueueError, SharedQueue, VirtioDevice, VirtioInterrupt,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET, VIRTIO_PCI_VENDOR,
};
use crate::devices::bus::lock;
use crate::devices::doorbell::{Doorbell, DoorbellId, Doorbells};
use crate::devices::event_loop::Notifier;
use crate::devices::irq::{InterruptLine, MsiSender};
use crate::devices::pci::msi::Msi;
use crate::devices::pci::msix::Msix;
use crate::devices::pci::{
    BarKind, BarSpec, ConfigSpace, ConfigSpaceError, PciDevice, PciIds, COMMAND_INTX_DISABLE,
};
use crate::memory::GuestMemory;

pub const LEGACY_BAR: usize = 0;
pub const MSIX_BAR: usize = 1;
pub const MODERN_BAR: usize = 2;

const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_PBA_OFFSET: u32 = 0x800;
const MODERN_BAR_SIZE: u64 = 0x4000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const ISR_SIZE: u64 = 4;
const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
const DEVICE_CONFIG_MAX: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;

/// "No vector" in the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xFFFF;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

const CAP_ID_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Legacy register offsets (virtio 0.9.5, "Virtio Header").
mod legacy {
    pub const DEVICE_FEATURES: u64 = 0x00;
    pub const DRIVER_FEATURES: u64 = 0x04;
    pub const QUEUE_PFN: u64 = 0x08;
    pub const QUEUE_SIZE: u64 = 0x0C;
    pub const QUEUE_SELECT: u64 = 0x0E;
    pub const QUEUE_NOTIFY: u64 = 0x10;
    pub const STATUS: u64 = 0x12;
    pub const ISR: u64 = 0x13;
    pub const CONFIG_VECTOR: u64 = 0x14;
    pub const QUEUE_VECTOR: u64 = 0x16;
    /// Device configuration starts here without MSI-X, and 4 bytes later with it.
    pub const CONFIG: u64 = 0x14;
    pub const CONFIG_MSIX: u64 = 0x18;
    pub const QUEUE_ALIGN: u64 = 4096;
    pub const PFN_SHIFT: u32 = 12;
}

/// What the transport needs from the machine.
pub struct VirtioPciResources {
    pub memory: GuestMemory,
    pub msi: Arc<dyn MsiSender>,
    /// The slot's INTA# line.
    pub intx: Arc<dyn InterruptLine>,
    /// `-W`: a single-vector MSI capability instead of MSI-X.
    pub single_msi: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("virtio device: {0}")]
    Config(#[from] ConfigSpaceError),
    #[error("virtio device: queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    #[error("virtio device: cannot create a queue notifier: {0}")]
    Notifier(#[source] std::io::Error),
}

/// The interrupt state of the function: what the device's thread needs to raise an
/// interrupt, under its own lock.
struct Signals {
    /// A mirror of configuration space, refreshed on every guest write to it: the MSI and
    /// MSI-X capabilities and the command register's INTx-disable bit live there.
    config: ConfigSpace,
    msix: Option<Msix>,
    msi: Option<Msi>,
    isr: u8,
    /// Whether INTx is asserted, so the line is only driven on a change.
    intx_high: bool,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    /// The driver broke the rules; DEVICE_NEEDS_RESET until it resets the device.
    needs_reset: bool,
}

/// The function's interrupts, shared by the transport and the device's thread.
pub struct InterruptState {
    signals: Mutex<Signals>,
    msi_sender: Arc<dyn MsiSender>,
    intx: Arc<dyn InterruptLine>,
    device_type: u16,
}

impl InterruptState {
    fn lock(&self) -> MutexGuard<'_, Signals> {
        lock(&self.signals)
    }

    /// Raises the interrupt for `vector` (MSI-X), or the single MSI, or INTx with `isr_bit`.
    fn signal(&self, signals: &mut Signals, vector: u16, isr_bit: u8) {
        signals.isr |= isr_bit;
        if let Some(msix) = signals.msix.as_mut() {
            if msix.enabled(&signals.config) {
                if vector != NO_VECTOR {
                    msix.notify(&signals.config, vector);
                }
                return;
            }
        }
        if let Some(msi) = &signals.msi {
            if msi.enabled(&signals.config) {
                let (address, data) = msi.message(&signals.config);
                self.msi_sender.send_msi(address, data);
                return;
            }
        }
        if signals.config.command() & COMMAND_INTX_DISABLE == 0 {
            self.set_intx(signals, true);
        }
    }

    fn set_intx(&self, signals: &mut Signals, high: bool) {
        if signals.intx_high != high {
            signals.intx_high = high;
            self.intx.set_level(high);
        }
    }

    fn read_isr(&self) -> u8 {
        let mut signals = self.lock();
        let isr = std::mem::take(&mut signals.isr);
        self.set_intx(&mut signals, false);
        isr
    }

    fn needs_reset(&self) -> bool {
        self.lock().needs_reset
    }

    fn msix_enabled(&self) -> bool {
        let signals = self.lock();
        signals
            .msix
            .as_ref()
            .is_some_and(|m| m.enabled(&signals.config))
    }

    fn reset(&self) {
        let mut signals = self.lock();
        signals.isr = 0;
        self.set_intx(&mut signals, false);
        signals.config_vector = NO_VECTOR;
        signals.queue_vectors.fill(NO_VECTOR);
        signals.needs_reset = false;
    }
}

impl VirtioInterrupt for InterruptState {
    fn signal_used_queue(&self, index: usize) {
        let mut signals = self.lock();
        if signals.needs_reset {
            return;
        }
        let vector = signals
            .queue_vectors
            .get(index)
            .copied()
            .unwrap_or(NO_VECTOR);
        self.signal(&mut signals, vector, ISR_QUEUE);
    }

    fn queue_error(&self, why: &QueueError) {
        log::trace!("virtio device type {}: {why}", self.device_type);
        let mut signals = self.lock();
        if !signals.needs_reset {
            signals.needs_reset = true;
            let vector = signals.config_vector;
            self.signal(&mut signals, vector, ISR_CONFIG);
        }
    }
}

/// A virtio device model on a PCI function.
pub struct VirtioPci<D: VirtioDevice> {
    config: ConfigSpace,
    device: D,
    memory: GuestMemory,
    queues: Vec<SharedQueue>,
    /// One per queue, for the device's lifetime: a doorbell rings it.
    notifiers: Vec<Arc<Notifier>>,
    interrupt: Arc<InterruptState>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    /// The device holds its queues (DRIVER_OK until the next reset).
    active: bool,
    doorbells: Option<DoorbellService>,
}

/// The VMM's doorbell service and what this function registered with it.
struct DoorbellService {
    service: Arc<dyn Doorbells>,
    /// The legacy I/O and modern memory BAR bases the registrations were made for.
    bases: Option<(Option<u64>, Option<u64>)>,
    /// Which queues were ready when the registrations were made: a queue the driver enables
    /// after DRIVER_OK (legacy drivers may) needs its own.
    ready: Vec<bool>,
    registered: Vec<DoorbellId>,
}

impl<D: VirtioDevice> VirtioPci<D> {
    pub fn new(device: D, resources: VirtioPciResources) -> Result<Self, VirtioPciError> {
        let (class, subclass, prog_if) = device.pci_class();
        let mut config = ConfigSpace::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: pci_device_id(device.device_type()),
            class,
            subclass,
            prog_if,
            revision: 0,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: device.device_type(),
        });
        let gsi = resources.intx.gsi();
        config.init(0x3C, &[gsi as u8, 1]); // interrupt line (the GSI, as bhyve), pin INTA#

        let queue_count = device.queue_max_sizes().len() as u16;
        let mut queues = Vec::new();
        let mut notifiers = Vec::new();
        for &size in device.queue_max_sizes() {
            let queue = Queue::new(size).map_err(|_| VirtioPciError::QueueSize(size))?;
            queues.push(Arc::new(Mutex::new(queue)));
            notifiers.push(Notifier::new().map_err(VirtioPciError::Notifier)?);
        }
        let config_size = device.config_size().min(DEVICE_CONFIG_MAX);
        let legacy_size = (legacy::CONFIG_MSIX + config_size)
            .next_power_of_two()
            .clamp(32, 256);
        config.add_bar(
            LEGACY_BAR,
            BarSpec {
                kind: BarKind::Io,
                size: legacy_size,
            },
        )?;
        let (msix, msi) = if resources.single_msi {
            (None, Some(Msi::new(&mut config)?))
        } else {
            config.add_bar(
                MSIX_BAR,
                BarSpec {
                    kind: BarKind::Memory32,
                    size: MSIX_BAR_SIZE,
                },
            )?;
            let vectors = queue_count + 1;
            let msix = Msix::new(
                &mut config,
                vectors,
                MSIX_BAR,
                0,
                MSIX_PBA_OFFSET,
                resources.msi.clone(),
            )?;
            (Some(msix), None)
        };
        config.add_bar(
            MODERN_BAR,
            BarSpec {
                kind: BarKind::Memory32,
                size: MODERN_BAR_SIZE,
            },
        )?;
        add_virtio_cap(&mut config, CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, None)?;
        add_virtio_cap(
            &mut config,
            CFG_NOTIFY,
            NOTIFY_OFFSET,
            u64::from(queue_count.max(1)) * u64::from(NOTIFY_MULTIPLIER),
            Some(NOTIFY_MULTIPLIER),
        )?;
        add_virtio_cap(&mut config, CFG_ISR, ISR_OFFSET, ISR_SIZE, None)?;
        if config_size > 0 {
            add_virtio_cap(
                &mut config,
                CFG_DEVICE,
                DEVICE_CONFIG_OFFSET,
                config_size,
                None,
            )?;
        }
        let interrupt = Arc::new(InterruptState {
            signals: Mutex::new(Signals {
                config: config.clone(),
                msix,
                msi,
                isr: 0,
                intx_high: false,
                queue_vectors: vec![NO_VECTOR; queues.len()],
                config_vector: NO_VECTOR,
                needs_reset: false,
            }),
            msi_sender: resources.msi,
            intx: resources.intx,
            device_type: device.device_type(),
        });
        Ok(VirtioPci {
            config,
            device,
            memory: resources.memory,
            queues,
            notifiers,
            interrupt,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            active: false,
            doorbells: None,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register, DEVICE_NEEDS_RESET included.
    pub fn status(&self) -> u8 {
        if self.interrupt.needs_reset() {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The interrupt state the device's thread signals through.
    pub fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.interrupt.clone()
    }

    fn offered_features(&self) -> u64 {
        self.device.device_features() | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1
    }

    /// A doorbell write that came as a VM exit. The trace line lets tests see which path
    /// doorbells take.
    fn notify_queue_on_exit(&mut self, index: u16) {
        log::trace!("virtio doorbell {index} by VM exit");
        self.notify_queue(index);
    }

    /// The driver rang the doorbell of queue `index`: wake the device's thread. A legacy
    /// driver may ring a ready queue before DRIVER_OK (old Linux virtio-blk reads its
    /// partition table during probe); as before, that queue is served, so the ring
    /// activates the device.
    pub fn notify_queue(&mut self, index: u16) {
        let Some(notifier) = self.notifiers.get(usize::from(index)) else {
            return;
        };
        notifier.notify();
        if !self.active && self.selected_ready(usize::from(index)) {
            self.activate();
        }
    }

    fn selected_ready(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|q| lock(q).ready())
    }

    /// DRIVER_OK: hands the device its queues, notifiers, interrupt and memory.
    fn activate(&mut self) {
        if self.active {
            return;
        }
        let activation = Activation {
            memory: self.memory.clone(),
            queues: self
                .queues
                .iter()
                .zip(&self.notifiers)
                .map(|(queue, notifier)| ActiveQueue {
                    queue: queue.clone(),
                    notifier: notifier.clone(),
                })
                .collect(),
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                log::warn!("virtio device type {}: {e}", self.device.device_type());
                let error = QueueError::Activate(e);
                self.interrupt.queue_error(&error);
            }
        }
    }

    /// Keeps the doorbell registrations in step with the driver and the BARs: every ready
    /// queue's notify addresses while the driver is running, at the BARs' current places.
    fn sync_doorbells(&mut self) {
        let Some(doorbells) = self.doorbells.as_mut() else {
            return;
        };
        let wanted = (self.status & STATUS_DRIVER_OK != 0).then(|| {
            let mut io = None;
            let mut memory = None;
            for bar in self.config.decoded_bars() {
                match bar.index {
                    LEGACY_BAR => io = Some(bar.base),
                    MODERN_BAR => memory = Some(bar.base),
                    _ => {}
                }
            }
            (io, memory)
        });
        let same_queues = doorbells.ready.len() == self.queues.len()
            && doorbells
                .ready
                .iter()
                .zip(&self.queues)
                .all(|(was, queue)| *was == lock(queue).ready());
        if wanted == doorbells.bases && (wanted.is_none() || same_queues) {
            return;
        }
        for id in doorbells.registered.drain(..) {
            doorbells.service.unregister(id);
        }
        doorbells.bases = wanted;
        doorbells.ready.clear();
        doorbells
            .ready
            .extend(self.queues.iter().map(|queue| lock(queue).ready()));
        let Some((io, memory)) = wanted else {
            return;
        };
        for (index, (queue, notifier)) in self.queues.iter().zip(&self.notifiers).enumerate() {
            let Ok(index) = u16::try_from(index) else {
                break;
            };
            if !lock(queue).ready() {
                continue;
            }
            let port = io
                .and_then(|base| u16::try_from(base + legacy::QUEUE_NOTIFY).ok())
                .map(|port| Doorbell::Port16 { port, value: index });
            let mmio = memory.map(|base| Doorbell::Mmio {
                addr: base + NOTIFY_OFFSET + u64::from(index) * u64::from(NOTIFY_MULTIPLIER),
            });
            for doorbell in [port, mmio].into_iter().flatten() {
                if let Some(id) = doorbells.service.register(doorbell, notifier.fd()) {
                    doorbells.registered.push(id);
                }
            }
        }
    }

    fn device_reset(&mut self) {
        // First the device: it returns once its thread has stopped, so nothing touches the
        // queues or raises an interrupt after this.
        self.device.reset();
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.interrupt.reset();
        for queue in &self.queues {
            lock(queue).reset();
        }
        for notifier in &self.notifiers {
            notifier.drain();
        }
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.device_reset();
            self.sync_doorbells();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & !self.offered_features() != 0 {
            value &= !STATUS_FEATURES_OK;
        }
        if newly & STATUS_DRIVER_OK != 0 {
            self.apply_features();
        }
        // NEEDS_RESET is the device's to set (in the interrupt state); the driver cannot
        // clear it but by a reset.
        self.status = value & !STATUS_NEEDS_RESET;
        self.sync_doorbells();
        if newly & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn apply_features(&mut self) {
        let event_idx = self.driver_features & F_RING_EVENT_IDX != 0;
        for queue in &self.queues {
            lock(queue).set_event_idx(event_idx);
        }
    }

    fn read_isr(&mut self) -> u8 {
        self.interrupt.read_isr()
    }

    fn selected_queue(&self) -> Option<MutexGuard<'_, Queue>> {
        self.queues
            .get(usize::from(self.queue_select))
            .map(|q| lock(q))
    }

    // ---- legacy (I/O BAR) ----

    fn legacy_config_offset(&self) -> u64 {
        if self.interrupt.msix_enabled() {
            legacy::CONFIG_MSIX
        } else {
            legacy::CONFIG
        }
    }

    fn legacy_read(&mut self, offset: u64, data: &mut [u8]) {
        let config_at = self.legacy_config_offset();
        if offset >= config_at {
            self.device.read_config(offset - config_at, data);
            return;
        }
        let queue_select = usize::from(self.queue_select);
        let value: u32 = match (offset, data.len()) {
            (legacy::DEVICE_FEATURES, 4) => self.offered_features() as u32,
            (legacy::DRIVER_FEATURES, 4) => self.driver_features as u32,
            (legacy::QUEUE_PFN, 4) => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> legacy::PFN_SHIFT) as u32),
            (legacy::QUEUE_SIZE, 2) => self.selected_queue().map_or(0, |q| q.max_size().into()),
            (legacy::QUEUE_SELECT, 2) => self.queue_select.into(),
            (legacy::STATUS, 1) => self.status().into(),
            (legacy::ISR, 1) => self.read_isr().into(),
            (legacy::CONFIG_VECTOR, 2) => self.interrupt.lock().config_vector.into(),
            (legacy::QUEUE_VECTOR, 2) => self.queue_vector(queue_select).into(),
            _ => 0,
        };
        put(data, value);
    }

    fn legacy_write(&mut self, offset: u64, data: &[u8]) {
        let config_at = self.legacy_config_offset();
        if offset >= config_at {
            self.device.write_config(offset - config_at, data);
            return;
        }
        let value = get(data);
        match (offset, data.len()) {
            (legacy::DRIVER_FEATURES, 4) => {
                self.driver_features = u64::from(value) & self.offered_features();
                self.apply_features();
            }
            (legacy::QUEUE_PFN, 4) => {
                self.legacy_set_pfn(value);
                self.sync_doorbells();
            }
            (legacy::QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (legacy::QUEUE_NOTIFY, 2) => self.notify_queue_on_exit(value as u16),
            (legacy::STATUS, 1) => self.set_status(value as u8),
            (legacy::CONFIG_VECTOR, 2) => self.set_config_vector(value as u16),
            (legacy::QUEUE_VECTOR, 2) => self.set_queue_vector(value as u16),
            _ => {}
        }
    }

    /// A legacy queue is one physically contiguous area: descriptors, the available ring,
    /// then the used ring at the next 4 KiB boundary.
    fn legacy_set_pfn(&mut self, pfn: u32) {
        let event_idx = self.driver_features & F_RING_EVENT_IDX != 0;
        let Some(mut queue) = self.selected_queue() else {
            return;
        };
        if pfn == 0 {
            queue.reset();
            return;
        }
        let size = u64::from(queue.max_size());
        let desc = u64::from(pfn) << legacy::PFN_SHIFT;
        let avail = desc + 16 * size;
        let used = (avail + 6 + 2 * size).next_multiple_of(legacy::QUEUE_ALIGN);
        let max_size = queue.max_size();
        queue.set_size(max_size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
    }

    /// A vector past the MSI-X table reads back as NO_VECTOR, telling the driver to give up.
    fn checked_vector(signals: &Signals, vector: u16) -> u16 {
        match &signals.msix {
            Some(msix) if vector < msix.vectors() => vector,
            _ => NO_VECTOR,
        }
    }

    fn queue_vector(&self, index: usize) -> u16 {
        let signals = self.interrupt.lock();
        signals
            .queue_vectors
            .get(index)
            .copied()
            .unwrap_or(NO_VECTOR)
    }

    fn set_queue_vector(&mut self, vector: u16) {
        let mut signals = self.interrupt.lock();
        let vector = Self::checked_vector(&signals, vector);
        if let Some(v) = signals
            .queue_vectors
            .get_mut(usize::from(self.queue_select))
        {
            *v = vector;
        }
    }

    fn set_config_vector(&mut self, vector: u16) {
        let mut signals = self.interrupt.lock();
        signals.config_vector = Self::checked_vector(&signals, vector);
    }

    // ---- modern (memory BAR) ----

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let queue_select = usize::from(self.queue_select);
        let status = self.status();
        let config_vector = self.interrupt.lock().config_vector;
        let queue_vector = self.queue_vector(queue_select);
        let queue = self.selected_queue();
        let half = |v: u64, high: bool| if high { (v >> 32) as u32 } else { v as u32 };
        let value: u32 = match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select,
            (0x04, 4) => match self.device_feature_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            (0x08, 4) => self.driver_feature_select,
            (0x0C, 4) => match self.driver_feature_select {
                0 => self.driver_features as u32,
                1 => (self.driver_features >> 32) as u32,
                _ => 0,
            },
            (0x10, 2) => config_vector.into(),
            (0x12, 2) => self.queues.len() as u32,
            (0x14, 1) => status.into(),
            (0x15, 1) => 0, // config generation: the configuration never changes
            (0x16, 2) => self.queue_select.into(),
            (0x18, 2) => queue.as_ref().map_or(0, |q| q.size().into()),
            (0x1A, 2) => queue_vector.into(),
            (0x1C, 2) => queue.as_ref().map_or(0, |q| q.ready().into()),
            (0x1E, 2) => self.queue_select.into(), // queue_notify_off
            (0x20 | 0x24, 4) => queue
                .as_ref()
                .map_or(0, |q| half(q.desc_table(), offset == 0x24)),
            (0x28 | 0x2C, 4) => queue
                .as_ref()
                .map_or(0, |q| half(q.avail_ring(), offset == 0x2C)),
            (0x30 | 0x34, 4) => queue
                .as_ref()
                .map_or(0, |q| half(q.used_ring(), offset == 0x34)),
            _ => 0,
        };
        drop(queue);
        put(data, value);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = get(data);
        // Queue configuration is frozen once the driver is running.
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value,
            (0x08, 4) => self.driver_feature_select = value,
            (0x0C, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xFFFF_FFFF) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xFFFF_FFFF) | u64::from(value) << 32
                    }
                    _ => {}
                }
            }
            (0x10, 2) => self.set_config_vector(value as u16),
            (0x14, 1) => self.set_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if configurable => {
                if let Some(mut q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            (0x1A, 2) => self.set_queue_vector(value as u16),
            (0x1C, 2) if configurable && value == 1 => {
                if let Some(mut q) = self.selected_queue() {
                    q.set_ready(true);
                }
                self.sync_doorbells();
            }
            (0x20..=0x34, 4) if configurable => {
                let Some(mut q) = self.selected_queue() else {
                    return;
                };
                let (low, high) = if offset % 8 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                match offset & !7 {
                    0x20 => q.set_desc_table_address(low, high),
                    0x28 => q.set_avail_ring_address(low, high),
                    _ => q.set_used_ring_address(low, high),
                }
            }
            _ => {}
        }
    }

    fn modern_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.common_read(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + ISR_SIZE).contains(&o) => {
                data.fill(0);
                if o == ISR_OFFSET {
                    data[0] = self.read_isr();
                }
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_MAX).contains(&o) => {
                self.device.read_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn modern_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_MAX).contains(&o) => {
                self.device.write_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if o >= NOTIFY_OFFSET => {
                let slot = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                if let Ok(index) = u16::try_from(slot) {
                    self.notify_queue_on_exit(index);
                }
            }
            _ => {}
        }
    }
}

/// The transitional PCI device ID legacy drivers match (virtio 1.x, 4.1.2.1); types without
/// one get the modern ID 0x1040 + type.
fn pci_device_id(device_type: u16) -> u16 {
    match device_type {
        1 => 0x1000, // network
        2 => 0x1001, // block
        5 => 0x1002, // balloon
        3 => 0x1003, // console
        8 => 0x1004, // SCSI host
        4 => 0x1005, // entropy source
        9 => 0x1009, // 9P transport
        other => 0x1040 + other,
    }
}

/// A virtio vendor-specific capability pointing into the modern BAR.
fn add_virtio_cap(
    config: &mut ConfigSpace,
    cfg_type: u8,
    offset: u64,
    length: u64,
    notify_multiplier: Option<u32>,
) -> Result<u16, ConfigSpaceError> {
    let mut body = [0u8; 18];
    let len = if notify_multiplier.is_some() { 20 } else { 16 };
    body[0] = len as u8; // cap_len, counting ID and next
    body[1] = cfg_type;
    body[2] = MODERN_BAR as u8;
    body[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
    body[10..14].copy_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = notify_multiplier {
        body[14..18].copy_from_slice(&m.to_le_bytes());
    }
    config.add_capability(CAP_ID_VENDOR, &body[..len - 2])
}

/// Little-endian value of a 1-, 2- or 4-byte access.
fn get(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn put(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    for (i, out) in data.iter_mut().enumerate() {
        *out = bytes.get(i).copied().unwrap_or(0);
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config_space(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        {
            let mut signals = self.interrupt.lock();
            let signals = &mut *signals;
            signals.config.copy_registers_from(&self.config);
            if let Some(msix) = signals.msix.as_mut() {
                if msix.covers(offset, data.len()) {
                    msix.deliver_unmasked(&signals.config);
                }
            }
        }
        self.sync_doorbells();
    }

    /// What a driver's status 0 does (the device's thread stops after the request in
    /// flight, queues and doorbells are released), plus what status 0 leaves alone and a
    /// power cycle does not: the MSI-X table and PBA, and configuration space.
    fn reset(&mut self, power_on: &ConfigSpace) {
        self.device_reset();
        self.config.copy_registers_from(power_on);
        {
            let mut signals = self.interrupt.lock();
            let signals = &mut *signals;
            signals.config.copy_registers_from(&self.config);
            if let Some(msix) = signals.msix.as_mut() {
                msix.reset();
            }
        }
        self.sync_doorbells();
    }

    fn attach_doorbells(&mut self, service: Arc<dyn Doorbells>) {
        self.doorbells = Some(DoorbellService {
            service,
            bases: None,
            ready: Vec::new(),
            registered: Vec::new(),
        });
        self.sync_doorbells();
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            LEGACY_BAR => self.legacy_read(offset, data),
            MSIX_BAR => match &self.interrupt.lock().msix {
                Some(msix) => msix.read(offset, data),
                None => data.fill(0xFF),
            },
            MODERN_BAR => self.modern_read(offset, data),
            _ => data.fill(0xFF),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            LEGACY_BAR => self.legacy_write(offset, data),
            MSIX_BAR => {
                let mut signals = self.interrupt.lock();
                let signals = &mut *signals;
                if let Some(msix) = signals.msix.as_mut() {
                    msix.write(&signals.config, offset, data);
                }
            }
            MODERN_BAR => self.modern_write(offset, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_ring::Ring;
    use super::*;
    use crate::devices::irq::test_util::RecordingLine;
    use crate::devices::pci::msix::tests::RecordingMsi;
    use crate::devices::virtio::rnd::VirtioRnd;
    use crate::devices::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER};
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2;

    /// Waits up to 5 s for the device's thread to get `what` done.
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    struct Rig {
        dev: VirtioPci<VirtioRnd>,
        mem: GuestMemory,
        line: Arc<RecordingLine>,
        msi: Arc<RecordingMsi>,
    }

    fn rig(single_msi: bool) -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let line = Arc::new(RecordingLine {
            gsi: 20,
            ..Default::default()
        });
        let msi = Arc::new(RecordingMsi::default());
        let dev = VirtioPci::new(
            VirtioRnd::new().unwrap(),
            VirtioPciResources {
                memory: mem.clone(),
                msi: msi.clone(),
                intx: line.clone(),
                single_msi,
            },
        )
        .unwrap();
        Rig {
            dev,
            mem,
            line,
            msi,
        }
    }

    impl Rig {
        fn io_w(&mut self, offset: u64, value: u32, len: usize) {
            self.dev
                .write_bar(LEGACY_BAR, offset, &value.to_le_bytes()[..len]);
        }
        fn io_r(&mut self, offset: u64, len: usize) -> u32 {
            let mut d = [0u8; 4];
            self.dev.read_bar(LEGACY_BAR, offset, &mut d[..len]);
            u32::from_le_bytes(d)
        }
        fn mem_w(&mut self, offset: u64, value: u32, len: usize) {
            self.dev
                .write_bar(MODERN_BAR, offset, &value.to_le_bytes()[..len]);
        }
        fn mem_r(&mut self, offset: u64, len: usize) -> u32 {
            let mut d = [0u8; 4];
            self.dev.read_bar(MODERN_BAR, offset, &mut d[..len]);
            u32::from_le_bytes(d)
        }
        fn levels(&self) -> Vec<bool> {
            self.line.levels.lock().unwrap().clone()
        }
        /// Modern bring-up of queue 0 on `ring`, with `features` (both halves).
        fn modern_setup(&mut self, ring: &Ring, features: u64) {
            self.mem_w(0x14, 0, 1);
            self.mem_w(0x14, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
            for half in 0..2u32 {
                self.mem_w(0x08, half, 4);
                self.mem_w(0x0C, (features >> (32 * half)) as u32, 4);
            }
            let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            self.mem_w(0x14, u32::from(s), 1);
            self.mem_w(0x16, 0, 2);
            self.mem_w(0x18, u32::from(ring.size), 2);
            self.mem_w(0x20, ring.desc as u32, 4);
            self.mem_w(0x28, ring.avail as u32, 4);
            self.mem_w(0x30, ring.used as u32, 4);
            self.mem_w(0x1C, 1, 2);
            self.mem_w(0x14, u32::from(s | STATUS_DRIVER_OK), 1);
        }
    }

    /// Records what a device registers, as the VMM's doorbell service would see it.
    #[derive(Default)]
    struct RecordingDoorbells {
        active: Mutex<Vec<(DoorbellId, Doorbell, std::os::fd::RawFd)>>,
        next: Mutex<u64>,
    }

    impl RecordingDoorbells {
        fn active(&self) -> Vec<(Doorbell, std::os::fd::RawFd)> {
            let mut v: Vec<_> = self
                .active
                .lock()
                .unwrap()
                .iter()
                .map(|a| (a.1, a.2))
                .collect();
            v.sort_by_key(|a| format!("{a:?}"));
            v
        }
    }

    impl Doorbells for RecordingDoorbells {
        fn register(&self, doorbell: Doorbell, fd: std::os::fd::RawFd) -> Option<DoorbellId> {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            let id = DoorbellId(*next);
            self.active.lock().unwrap().push((id, doorbell, fd));
            Some(id)
        }
        fn unregister(&self, id: DoorbellId) {
            let mut active = self.active.lock().unwrap();
            let before = active.len();
            active.retain(|a| a.0 != id);
            assert_eq!(active.len() + 1, before, "unregistered {id:?} twice");
        }
    }

    #[test]
    fn doorbells_follow_driver_ok_bar_moves_and_reset() {
        let mut r = rig(false);
        let service = Arc::new(RecordingDoorbells::default());
        let config = r.dev.config_space_mut();
        config.set_bar_address(LEGACY_BAR, 0xC000);
        config.set_bar_address(MODERN_BAR, 0xE000_0000);
        r.dev.attach_doorbells(service.clone());
        let q0 = r.dev.notifiers[0].fd();
        let command = (crate::devices::pci::COMMAND_IO_SPACE
            | crate::devices::pci::COMMAND_MEMORY_SPACE)
            .to_le_bytes();
        r.dev.write_config(0x04, &command);
        assert!(service.active().is_empty(), "nothing before DRIVER_OK");

        let ring = Ring::new(&r.mem, 0x10000, 8);
        r.modern_setup(&ring, F_VERSION_1);
        let port = Doorbell::Port16 {
            port: 0xC010,
            value: 0,
        };
        assert_eq!(
            service.active(),
            vec![(Doorbell::Mmio { addr: 0xE000_3000 }, q0), (port, q0)]
        );

        r.dev
            .write_config(0x10 + 4 * MODERN_BAR as u16, &0xD000_0000u32.to_le_bytes());
        assert_eq!(
            service.active(),
            vec![(Doorbell::Mmio { addr: 0xD000_3000 }, q0), (port, q0)],
            "the MMIO doorbell moves with the BAR"
        );

        r.dev
            .write_config(0x04, &crate::devices::pci::COMMAND_IO_SPACE.to_le_bytes());
        assert_eq!(service.active(), vec![(port, q0)], "memory decoding off");

        r.mem_w(0x14, 0, 1);
        assert!(service.active().is_empty(), "a reset drops every doorbell");
    }

    #[test]
    fn a_queue_enabled_after_driver_ok_gets_its_doorbell() {
        let mut r = rig(false);
        let service = Arc::new(RecordingDoorbells::default());
        r.dev.config_space_mut().set_bar_address(LEGACY_BAR, 0xC000);
        r.dev.attach_doorbells(service.clone());
        let q0 = r.dev.notifiers[0].fd();
        r.dev
            .write_config(0x04, &crate::devices::pci::COMMAND_IO_SPACE.to_le_bytes());
        r.io_w(0x12, u32::from(STATUS_DRIVER_OK | 3), 1);
        assert!(service.active().is_empty(), "no queue is ready yet");

        r.io_w(0x0E, 0, 2);
        r.io_w(0x08, 0x4, 4); // legacy drivers may set a queue up while running
        let port = Doorbell::Port16 {
            port: 0xC010,
            value: 0,
        };
        assert_eq!(service.active(), vec![(port, q0)]);

        r.io_w(0x08, 0, 4);
        assert!(
            service.active().is_empty(),
            "a queue torn down loses its doorbell"
        );
    }

    #[test]
    fn capabilities_point_into_the_modern_bar() {
        let r = rig(false);
        let config = r.dev.config_space();
        let mut types = Vec::new();
        let mut cap = config.read_u32(0x34) as u16 & 0xFF;
        while cap != 0 {
            let id = config.read_u32(cap) as u8;
            if id == CAP_ID_VENDOR {
                let cfg_type = (config.read_u32(cap) >> 24) as u8;
                assert_eq!(config.read_u32(cap + 4) & 0xFF, MODERN_BAR as u32);
                types.push((cfg_type, config.read_u32(cap + 8)));
            } else {
                types.push((id, 0));
            }
            cap = (config.read_u32(cap) >> 8) as u16 & 0xFF;
        }
        assert_eq!(
            types,
            vec![(0x11, 0), (1, 0), (2, 0x3000), (3, 0x1000)],
            "MSI-X, common, notify, ISR (no device config for rnd)"
        );
    }

    #[test]
    fn legacy_driver_gets_entropy_and_an_intx_interrupt() {
        let mut r = rig(false);
        assert_eq!(r.io_r(0x00, 4) as u64 & F_VERSION_1, 0);
        assert_ne!(r.io_r(0x00, 4) as u64 & F_RING_INDIRECT_DESC, 0);
        r.io_w(0x12, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        r.io_w(0x04, 0, 4);
        r.io_w(0x0E, 0, 2);
        assert_eq!(r.io_r(0x0C, 2), 64);
        let mut ring = Ring::new(&r.mem, 0x4000, 64);
        ring.add_chain(&r.mem, &[(0x10000, 32, WRITE)]);
        r.io_w(0x08, 0x4, 4);
        assert_eq!(r.io_r(0x08, 4), 4);
        r.io_w(0x12, u32::from(STATUS_DRIVER_OK | 3), 1);
        r.io_w(0x10, 0, 2);
        wait_until("the entropy", || ring.used(&r.mem).len() == 1);
        assert_eq!(ring.used(&r.mem), vec![(0, 32)]);
        wait_until("INTx", || !r.levels().is_empty());
        assert_eq!(r.levels(), vec![true]);
        assert_eq!(r.io_r(0x13, 1), 1);
        assert_eq!(r.levels(), vec![true, false], "reading ISR lowers INTx");
        assert_eq!(r.io_r(0x13, 1), 0);
        assert!(r.msi.0.lock().unwrap().is_empty());
    }

    #[test]
    fn intx_disable_in_the_command_register_silences_the_line() {
        let mut r = rig(false);
        r.dev
            .write_config(0x04, &COMMAND_INTX_DISABLE.to_le_bytes());
        let mut ring = Ring::new(&r.mem, 0x4000, 64);
        ring.add_chain(&r.mem, &[(0x10000, 32, WRITE)]);
        r.io_w(0x08, 0x4, 4);
        r.io_w(0x10, 0, 2);
        wait_until("the entropy", || ring.used(&r.mem).len() == 1);
        wait_until("the ISR", || r.dev.interrupt.lock().isr != 0);
        assert!(r.levels().is_empty());
        assert_eq!(r.io_r(0x13, 1), 1, "the ISR still says why");
    }

    #[test]
    fn modern_driver_with_msix_and_event_index() {
        let mut r = rig(false);
        // Program MSI-X vector 1 and enable MSI-X.
        r.dev.write_bar(MSIX_BAR, 16, &0xFEE0_0000u64.to_le_bytes());
        r.dev.write_bar(MSIX_BAR, 24, &0x61u32.to_le_bytes());
        r.dev.write_bar(MSIX_BAR, 28, &0u32.to_le_bytes());
        r.dev.write_config(0x42, &0x8000u16.to_le_bytes());
        let mut ring = Ring::new(&r.mem, 0x4000, 16);
        r.modern_setup(&ring, F_VERSION_1 | F_RING_EVENT_IDX);
        assert_eq!(
            r.mem_r(0x14, 1) as u8 & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        r.mem_w(0x1A, 1, 2);
        assert_eq!(r.mem_r(0x1A, 2), 1);
        r.mem_w(0x1A, 9, 2);
        assert_eq!(r.mem_r(0x1A, 2), u32::from(NO_VECTOR), "past the table");
        r.mem_w(0x1A, 1, 2);
        assert_eq!(r.mem_r(0x12, 2), 1, "one queue");
        assert_eq!(r.mem_r(0x20, 4), 0x4000);

        // used_event = 0 in the avail ring: the driver wants an interrupt after the first.
        ring.add_chain(&r.mem, &[(0x10000, 16, WRITE)]);
        r.mem_w(NOTIFY_OFFSET, 0, 2);
        wait_until("the MSI", || !r.msi.0.lock().unwrap().is_empty());
        assert_eq!(*r.msi.0.lock().unwrap(), vec![(0xFEE0_0000, 0x61)]);
        // used_event still 0: the second completion needs no interrupt.
        ring.add_chain(&r.mem, &[(0x10000, 16, WRITE)]);
        r.mem_w(NOTIFY_OFFSET, 0, 2);
        wait_until("the second", || ring.used(&r.mem).len() == 2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            r.msi.0.lock().unwrap().len(),
            1,
            "event index suppressed it"
        );
        assert!(r.levels().is_empty(), "no INTx with MSI-X on");
    }

    #[test]
    fn a_machine_reset_returns_the_function_to_power_on() {
        let mut r = rig(false);
        let service = Arc::new(RecordingDoorbells::default());
        let config = r.dev.config_space_mut();
        config.set_bar_address(LEGACY_BAR, 0xC000);
        config.set_bar_address(MODERN_BAR, 0xE000_0000);
        config.init(0x04, &0x0003u16.to_le_bytes());
        let power_on = r.dev.config_space().clone();
        r.dev.attach_doorbells(service.clone());
        // A running driver: MSI-X on with vector 1 programmed, queue 0 live.
        r.dev.write_bar(MSIX_BAR, 16, &0xFEE0_0000u64.to_le_bytes());
        r.dev.write_bar(MSIX_BAR, 24, &0x61u32.to_le_bytes());
        r.dev.write_bar(MSIX_BAR, 28, &0u32.to_le_bytes());
        r.dev.write_config(0x42, &0x8000u16.to_le_bytes());
        r.dev.write_config(0x04, &0x0407u16.to_le_bytes());
        let mut ring = Ring::new(&r.mem, 0x4000, 16);
        r.modern_setup(&ring, F_VERSION_1);
        r.mem_w(0x1A, 1, 2);
        ring.add_chain(&r.mem, &[(0x10000, 16, WRITE)]);
        r.mem_w(NOTIFY_OFFSET, 0, 2);
        wait_until("the entropy", || ring.used(&r.mem).len() == 1);
        assert!(!service.active().is_empty());

        PciDevice::reset(&mut r.dev, &power_on);
        assert!(!r.dev.active, "the device's thread stopped");
        assert!(service.active().is_empty(), "doorbells released");
        assert_eq!(r.mem_r(0x14, 1), 0, "device status 0");
        assert_eq!(r.mem_r(0x20, 4), 0, "queue 0 torn down");
        assert_eq!(r.mem_r(0x1A, 2), u32::from(NO_VECTOR));
        assert_eq!(r.dev.config_space().command(), 0x0003);
        assert_eq!(r.dev.config_space().read_u16(0x42) & 0x8000, 0, "MSI-X off");
        let entry: Vec<u32> = (0..4)
            .map(|i| {
                let mut d = [0u8; 4];
                r.dev.read_bar(MSIX_BAR, 16 + 4 * i, &mut d);
                u32::from_le_bytes(d)
            })
            .collect();
        assert_eq!(entry, vec![0, 0, 0, 1], "vector 1 clear and masked");
        assert!(!r.dev.interrupt.msix_enabled());

        // A driver brings it up again from scratch, and it serves.
        let mut ring = Ring::new(&r.mem, 0x8000, 16);
        r.modern_setup(&ring, F_VERSION_1);
        ring.add_chain(&r.mem, &[(0x10000, 16, WRITE)]);
        r.mem_w(NOTIFY_OFFSET, 0, 2);
        wait_until("entropy after the reset", || ring.used(&r.mem).len() == 1);
    }

    #[test]
    fn features_the_device_did_not_offer_are_refused() {
        let mut r = rig(false);
        let ring = Ring::new(&r.mem, 0x4000, 16);
        r.modern_setup(&ring, F_VERSION_1 | 1 << 40);
        assert_eq!(r.mem_r(0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn a_bad_chain_sets_needs_reset_until_the_driver_resets() {
        let mut r = rig(false);
        let mut ring = Ring::new(&r.mem, 0x4000, 16);
        r.modern_setup(&ring, F_VERSION_1);
        ring.add_chain(&r.mem, &[(0x7000_0000, 16, WRITE)]);
        r.mem_w(NOTIFY_OFFSET, 0, 2);
        wait_until("needs-reset", || r.dev.status() & STATUS_NEEDS_RESET != 0);
        assert_eq!(r.levels(), vec![true], "config-change interrupt");
        assert_eq!(r.mem_r(ISR_OFFSET, 1), u32::from(ISR_CONFIG));
        // Further doorbells are ignored, even with a good buffer.
        ring.add_chain(&r.mem, &[(0x10000, 16, WRITE)]);
        r.mem_w(NOTIFY_OFFSET, 0, 2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(ring.used(&r.mem).is_empty());
        // The driver cannot clear NEEDS_RESET but by writing 0.
        r.mem_w(0x14, 0x0F, 1);
        assert_ne!(r.dev.status() & STATUS_NEEDS_RESET, 0);
        r.mem_w(0x14, 0, 1);
        assert_eq!(r.dev.status(), 0);
        assert_eq!(r.mem_r(0x1C, 2), 0, "queues reset");
    }

    #[test]
    fn queue_addresses_outside_ram_are_contained() {
        let mut r = rig(false);
        r.mem_w(0x14, 3, 1);
        r.mem_w(0x20, 0xFFFF_F000, 4);
        r.mem_w(0x24, 0xFFFF_FFFF, 4);
        r.mem_w(0x28, 0xFFFF_F000, 4);
        r.mem_w(0x2C, 0xFFFF_FFFF, 4);
        r.mem_w(0x1C, 1, 2);
        r.mem_w(0x14, 0x0F, 1);
        r.mem_w(NOTIFY_OFFSET, 0, 2);
        wait_until("needs-reset", || r.dev.status() & STATUS_NEEDS_RESET != 0);
        // Doorbells for queues that do not exist, and odd access sizes, do nothing.
        let mut r = rig(false);
        r.mem_w(NOTIFY_OFFSET + 4 * 100, 100, 2);
        r.io_w(0x10, 7, 2);
        r.io_w(0x00, 0xFFFF_FFFF, 1);
        assert_eq!(r.mem_r(0x0FFF, 1), 0);
        assert_eq!(r.dev.status(), 0);
    }

    #[test]
    fn single_msi_with_w() {
        let mut r = rig(true);
        assert!(r.dev.config_space().bar(MSIX_BAR).is_none());
        assert_eq!(
            r.dev.config_space().read_u32(0x40) & 0xFF,
            0x05,
            "MSI capability"
        );
        r.dev.write_config(0x44, &0xFEE0_0000u32.to_le_bytes());
        r.dev.write_config(0x4C, &0x41u16.to_le_bytes());
        r.dev.write_config(0x42, &1u16.to_le_bytes());
        let mut ring = Ring::new(&r.mem, 0x4000, 16);
        r.modern_setup(&ring, F_VERSION_1);
        ring.add_chain(&r.mem, &[(0x10000, 16, WRITE)]);
        r.mem_w(NOTIFY_OFFSET, 0, 2);
        wait_until("the MSI", || !r.msi.0.lock().unwrap().is_empty());
        assert_eq!(*r.msi.0.lock().unwrap(), vec![(0xFEE0_0000, 0x41)]);
        assert!(r.levels().is_empty());
    }

    #[test]
    fn legacy_config_moves_with_msix() {
        let mut r = rig(false);
        assert_eq!(r.dev.legacy_config_offset(), legacy::CONFIG);
        r.dev.write_config(0x42, &0x8000u16.to_le_bytes());
        assert_eq!(r.dev.legacy_config_offset(), legacy::CONFIG_MSIX);
        r.io_w(0x14, 0, 2);
        assert_eq!(r.io_r(0x14, 2), 0, "config vector 0");
        r.io_w(0x16, 1, 2);
        assert_eq!(r.io_r(0x16, 2), 1, "queue vector 1");
        let _ = r.mem.read_obj::<u8>(GuestAddress(0));
    }
}

/// A split virtqueue laid out by hand in guest memory, for device unit tests.
#[cfg(test)]
pub(crate) mod test_ring {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use crate::memory::GuestMemory;

    pub struct Ring {
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        pub size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Ring {
        pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Ring {
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
            let zero = vec![0u8; (used + 6 + 8 * u64::from(size) - base) as usize];
            mem.write_slice(&zero, GuestAddress(base)).unwrap();
            Ring {
                desc,
                avail,
                used,
                size,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        pub fn write_desc(&self, mem: &GuestMemory, index: u16, d: (u64, u32, u16), next: u16) {
            let at = self.desc + 16 * u64::from(index);
            mem.write_obj(d.0, GuestAddress(at)).unwrap();
            mem.write_obj(d.1, GuestAddress(at + 8)).unwrap();
            mem.write_obj(d.2, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }

        /// Puts `head` in the available ring and bumps its index.
        pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Adds a chain of (addr, len, flags) descriptors, linked in order.
        pub fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) {
            let head = self.next_desc;
            for (i, d) in descs.iter().enumerate() {
                let index = self.next_desc;
                let next = if i + 1 < descs.len() { index + 1 } else { 0 };
                self.write_desc(mem, index, *d, next);
                self.next_desc += 1;
            }
            self.publish(mem, head);
        }

        /// A queue configured on this ring, ready.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_desc_table_address(Some(self.desc as u32), Some(0));
            q.set_avail_ring_address(Some(self.avail as u32), Some(0));
            q.set_used_ring_address(Some(self.used as u32), Some(0));
            q.set_ready(true);
            q
        }

        /// The used ring's (id, len) entries so far.
        pub fn used(&self, mem: &GuestMemory) -> Vec<(u32, u32)> {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            (0..idx)
                .map(|i| {
                    let at = self.used + 4 + 8 * u64::from(i % self.size);
                    (
                        mem.read_obj(GuestAddress(at)).unwrap(),
                        mem.read_obj(GuestAddress(at + 4)).unwrap(),
                    )
                })
                .collect()
        }
    }
}
