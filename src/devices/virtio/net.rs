//! virtio-net (`-s N,virtio-tap,tapN[,mac=...]` on Linux, `-s N,virtio-net[,...]` over vmnet
//! on macOS, the built-in user network (libslirp) or a daemon's socket): an Ethernet card
//! over a [`NetBackend`].
//!
//! Queue 0 receives (host to guest), queue 1 transmits. The device offers its MAC, link
//! status and MTU (1500) in configuration space and no offloads, so every frame is a plain Ethernet frame
//! behind a virtio-net header that is all zero (plus `num_buffers = 1` where the header has
//! it). The frames move on the device's thread ([`QueueWorker`]): the doorbell only wakes
//! it, so a vCPU never waits for the host's network stack. The thread also waits on the
//! back end: a tap's descriptor (Linux), or the notifier vmnet's packet callback rings.

use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::pci::{VirtioPciError, VirtioPciResources};
use super::queue_worker::{Backend, QueueWorker, VirtioQueues};
use super::{ActivateError, Activation, QueueError, VirtioDevice, F_VERSION_1};
use crate::config::VmConfig;
use crate::devices::pci::PciAddress;
use crate::devices::{BuiltDevice, DeviceHandle};
use crate::memory::GuestMemory;
use crate::net::{MacAddr, NetBackend, NetOptions, TapOptions};

const DEVICE_TYPE_NET: u16 = 1;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// bhyve's ring size for virtio-net.
pub const QUEUE_SIZE: u16 = 1024;

/// Feature bits (virtio 1.x, 5.1.3).
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_STATUS: u64 = 1 << 16;
const F_MRG_RXBUF: u64 = 1 << 15;

/// `status` in configuration space: the link is up.
const STATUS_LINK_UP: u16 = 1;
/// The largest MTU the device tells the driver (`mtu` in configuration space, F_MTU).
/// Without MRG_RXBUF or guest offloads, Linux sizes its receive buffers for a 1500-byte MTU
/// at probe time; without F_MTU it would still accept any MTU later (a DHCP server's option
/// 26: passt hands out 65520), send its peers an MSS to match, and then drop every frame
/// longer than its buffers ("rx error: len ... exceeds max size"). Announcing the MTU the
/// buffers hold makes it refuse the larger one instead, so TCP keeps working.
pub const MTU: u16 = 1500;
/// Configuration space: mac[6], status (u16), max_virtqueue_pairs (u16, unused without
/// F_MQ), mtu (u16).
const CONFIG_SIZE: usize = 12;

/// The header without `num_buffers` (legacy drivers without MRG_RXBUF), and with it.
const HEADER_LEGACY: usize = 10;
const HEADER_MODERN: usize = 12;
/// The largest frame moved: a 64 KiB IP packet behind an Ethernet header (with VLAN tag).
pub const MAX_FRAME: usize = 65536 + 18;

/// PCI class 0x02 (network controller), subclass 0x00 (Ethernet).
const PCI_CLASS_ETHERNET: (u8, u8, u8) = (0x02, 0x00, 0x00);

/// Frame and drop counts, for diagnostics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames the guest gave a buffer too small for, delivered truncated.
    pub rx_truncated: u64,
    /// Transmit chains longer than [`MAX_FRAME`] or whose frame the host refused.
    pub tx_dropped: u64,
}

/// The device: its MAC, and the worker that moves its frames.
pub struct VirtioNet<B: NetBackend + 'static> {
    mac: MacAddr,
    worker: QueueWorker<NetQueues<B>>,
}

impl<B: NetBackend + 'static> VirtioNet<B> {
    /// A card on `backend`, whose readiness `source` signals (none: only doorbells wake it).
    pub fn new(backend: B, mac: MacAddr, source: Option<Backend>) -> io::Result<Self> {
        let mut queues = NetQueues::new(backend, mac);
        queues.source = source;
        Ok(VirtioNet {
            mac,
            worker: QueueWorker::new("virtio-net", queues)?,
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Frame counts, while the device is not active (its thread holds them otherwise).
    pub fn stats(&self) -> Option<NetStats> {
        self.worker.idle().map(|q| q.stats)
    }
}

/// What the device's thread runs: the back end and the frame buffer.
pub struct NetQueues<B: NetBackend> {
    backend: B,
    /// Where the back end signals readiness.
    source: Option<Backend>,
    header_len: usize,
    /// One frame with room for the header in front; allocated once.
    frame: Vec<u8>,
    /// The last receive pass stopped because the back end had no frame left.
    rx_idle: bool,
    /// The back end holds a frame the guest has no buffer for: stop listening to it until
    /// the guest's next receive doorbell (else its readiness would spin the thread).
    rx_blocked: bool,
    stats: NetStats,
}

impl<B: NetBackend> NetQueues<B> {
    pub fn new(backend: B, _mac: MacAddr) -> Self {
        NetQueues {
            backend,
            source: None,
            header_len: HEADER_LEGACY,
            frame: vec![0; HEADER_MODERN + MAX_FRAME],
            rx_idle: false,
            rx_blocked: false,
            stats: NetStats::default(),
        }
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Moves waiting host frames into the guest's receive buffers, until either runs out.
    fn receive(&mut self, queue: &mut Queue, memory: &GuestMemory) -> Result<bool, QueueError> {
        let mut used = false;
        self.rx_idle = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.iter(memory)?.next() else {
                break;
            };
            let header = self.header_len;
            let len = match self.backend.recv(&mut self.frame[header..]) {
                Ok(len) => len,
                Err(e) => {
                    // No frame (or a broken back end): the buffer goes back for later.
                    queue.go_to_previous_position();
                    self.rx_idle = true;
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::trace!("virtio-net receive: {e}");
                    }
                    break;
                }
            };
            self.frame[..header].fill(0);
            if header == HEADER_MODERN {
                self.frame[10] = 1; // num_buffers
            }
            let head = chain.head_index();
            let total = header + len;
            let mut written = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    return Err(QueueError::NotWritable { head });
                }
                let n = (desc.len() as usize).min(total - written);
                write_guest(memory, desc.addr(), &self.frame[written..written + n])?;
                written += n;
                if written == total {
                    break;
                }
            }
            if written < total {
                self.stats.rx_truncated += 1;
            }
            self.stats.rx_frames += 1;
            queue.add_used(memory, head, written as u32)?;
            used = true;
        }
        Ok(used)
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&mut self, queue: &mut Queue, memory: &GuestMemory) -> Result<bool, QueueError> {
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.iter(memory)?.next() else {
                break;
            };
            let head = chain.head_index();
            let mut len = 0usize;
            let mut oversized = false;
            for desc in chain {
                if desc.is_write_only() {
                    continue; // nothing for the device to write on transmit
                }
                let n = desc.len() as usize;
                if len + n > self.frame.len() {
                    oversized = true;
                    break;
                }
                read_guest(memory, desc.addr(), &mut self.frame[len..len + n])?;
                len += n;
            }
            let header = self.header_len;
            if oversized || len < header {
                self.stats.tx_dropped += 1;
            } else if let Err(e) = self.backend.send(&self.frame[header..len]) {
                log::trace!("virtio-net transmit: {e}");
                self.stats.tx_dropped += 1;
            } else {
                self.stats.tx_frames += 1;
            }
            queue.add_used(memory, head, 0)?;
            used = true;
        }
        Ok(used)
    }
}

fn outside(addr: GuestAddress, len: usize) -> QueueError {
    QueueError::OutsideRam {
        addr: addr.0,
        len: len as u64,
    }
}

fn write_guest(memory: &GuestMemory, addr: GuestAddress, data: &[u8]) -> Result<(), QueueError> {
    addr.checked_add(data.len() as u64)
        .ok_or_else(|| outside(addr, data.len()))?;
    memory
        .write_slice(data, addr)
        .map_err(|_| outside(addr, data.len()))
}

fn read_guest(memory: &GuestMemory, addr: GuestAddress, data: &mut [u8]) -> Result<(), QueueError> {
    addr.checked_add(data.len() as u64)
        .ok_or_else(|| outside(addr, data.len()))?;
    memory
        .read_slice(data, addr)
        .map_err(|_| outside(addr, data.len()))
}

impl<B: NetBackend + 'static> VirtioDevice for VirtioNet<B> {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_NET
    }

    fn pci_class(&self) -> (u8, u8, u8) {
        PCI_CLASS_ETHERNET
    }

    fn device_features(&self) -> u64 {
        F_MAC | F_STATUS | F_MTU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_size(&self) -> u64 {
        CONFIG_SIZE as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&MTU.to_le_bytes());
        for (i, out) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *out = at.and_then(|a| config.get(a)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.worker.activate(activation)
    }

    fn reset(&mut self) {
        self.worker.reset();
    }

    fn handle(&self) -> Option<Box<dyn DeviceHandle>> {
        Some(self.worker.handle())
    }
}

impl<B: NetBackend + 'static> VirtioQueues for NetQueues<B> {
    fn set_features(&mut self, features: u64) {
        self.header_len = if features & (F_VERSION_1 | F_MRG_RXBUF) != 0 {
            HEADER_MODERN
        } else {
            HEADER_LEGACY
        };
    }

    fn backend(&self) -> Option<(Backend, usize)> {
        let source = match self.source.as_ref()? {
            #[cfg(unix)]
            Backend::Fd(fd) => Backend::Fd(*fd),
            Backend::Notifier(n) => Backend::Notifier(n.clone()),
        };
        Some((source, RX_QUEUE))
    }

    fn wants_backend(&self) -> bool {
        !self.rx_blocked
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        // Serve, then ask the driver to ring again (event index) and serve what slipped in
        // meanwhile; bounded so a busy guest cannot hold the thread for ever.
        for _ in 0..4 {
            used |= match index {
                RX_QUEUE => self.receive(queue, memory)?,
                TX_QUEUE => self.transmit(queue, memory)?,
                _ => return Ok(false),
            };
            let more_buffers = queue.enable_notification(memory)?;
            if index == RX_QUEUE {
                // Out of guest buffers with frames left on the host: wait for a doorbell.
                self.rx_blocked = !more_buffers && !self.rx_idle;
            }
            if !more_buffers || (index == RX_QUEUE && self.rx_idle) {
                break;
            }
        }
        Ok(used)
    }
}

/// Why a network device could not be built or its MAC told.
#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    #[error(transparent)]
    Transport(#[from] VirtioPciError),
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Tap(#[from] crate::net::tap::TapError),
    #[error(transparent)]
    Vmnet(#[from] crate::net::vmnet::VmnetError),
    #[error("{device}: network thread: {source}")]
    Thread {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("virtio-net: cannot drop root after starting vmnet: {0}")]
    DropPrivileges(#[source] io::Error),
    #[error("virtio-net: vmnet packets of up to {0} bytes exceed the device's {MAX_FRAME}")]
    PacketTooLarge(usize),
    #[error("virtio-tap needs Linux tap devices; on macOS use virtio-net (vmnet)")]
    NoTap,
    #[error("virtio-net: vmnet needs macOS")]
    NoVmnet,
    #[error(transparent)]
    User(#[from] crate::net::slirp::SlirpError),
    #[error("virtio-net: {0}")]
    Socket(#[from] crate::net::socket::SocketError),
}

/// Builds `-s ...,virtio-tap,tapN[,mac=...]`: opens the tap and starts the network thread,
/// which the returned handle owns.
#[cfg(target_os = "linux")]
pub fn build_virtio_tap(
    address: PciAddress,
    options: &TapOptions,
    uuid: Option<[u8; 16]>,
    transport: VirtioPciResources,
) -> Result<BuiltDevice, NetDeviceError> {
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};

    use super::pci::VirtioPci;

    let tap = crate::net::tap::Tap::open(&options.name)?;
    let fd = tap.as_raw_fd();
    let mac = crate::config::tap_mac(uuid, address, options);
    let net = VirtioNet::new(tap, mac, Some(Backend::Fd(fd))).map_err(|source| {
        NetDeviceError::Thread {
            device: format!("virtio-tap {}", options.name),
            source,
        }
    })?;
    let handle = net.worker.handle();
    let device = Arc::new(Mutex::new(VirtioPci::new(net, transport)?));
    Ok(BuiltDevice {
        function: device,
        handle: Some(handle),
    })
}

/// Tap devices are Linux's; macOS has vmnet (`virtio-net`).
#[cfg(not(target_os = "linux"))]
pub fn build_virtio_tap(
    _address: PciAddress,
    _options: &TapOptions,
    _uuid: Option<[u8; 16]>,
    _transport: VirtioPciResources,
) -> Result<BuiltDevice, NetDeviceError> {
    Err(NetDeviceError::NoTap)
}

/// Builds `-s ...,virtio-net[,...]`: the back end its options name (vmnet, the built-in
/// network, or a daemon's socket) and the network thread, which the returned handle owns.
/// The built-in network's stack thread belongs to the handle and ends at shutdown.
pub fn build_virtio_net(
    address: PciAddress,
    options: &NetOptions,
    uuid: Option<[u8; 16]>,
    transport: VirtioPciResources,
) -> Result<BuiltDevice, NetDeviceError> {
    use crate::net::dhcp::LeaseSnoop;
    use crate::net::options::NetBackendKind;
    use crate::net::slirp::{UserNet, UserNetHandle};
    use crate::net::socket::{DgramSocket, StreamSocket};

    if options.uses_vmnet() {
        return build_vmnet(options, uuid, transport);
    }
    let mac = crate::config::net_mac(uuid, address, options);
    match &options.backend {
        NetBackendKind::Default | NetBackendKind::User(_) => {
            let user = match &options.backend {
                NetBackendKind::User(user) => user.clone(),
                _ => Default::default(),
            };
            let (stack, link) = UserNet::start(&user, mac)?;
            let mut built = fd_device(link, mac, transport, "virtio-net user")?;
            // The handle owns the stack: it is stopped and joined at shutdown.
            built.handle = built
                .handle
                .map(|inner| Box::new(UserNetHandle::new(inner, stack)) as Box<dyn DeviceHandle>);
            Ok(built)
        }
        NetBackendKind::Stream(path) => {
            let socket = StreamSocket::connect(path)?;
            log::info!("virtio-net: frames over {} (stream)", path.display());
            let backend = LeaseSnoop::new(socket, mac, "virtio-net socket");
            fd_device(backend, mac, transport, "virtio-net socket")
        }
        NetBackendKind::Dgram { path, local } => {
            let socket = DgramSocket::connect(path, local.as_deref())?;
            log::info!("virtio-net: frames over {} (datagrams)", path.display());
            let backend = LeaseSnoop::new(socket, mac, "virtio-net dgram");
            fd_device(backend, mac, transport, "virtio-net dgram")
        }
    }
}

/// A device over a back end whose descriptor polls readable when frames wait.
fn fd_device<B: NetBackend + std::os::fd::AsRawFd + 'static>(
    backend: B,
    mac: MacAddr,
    transport: VirtioPciResources,
    what: &str,
) -> Result<BuiltDevice, NetDeviceError> {
    use std::sync::{Arc, Mutex};

    use super::pci::VirtioPci;

    let fd = backend.as_raw_fd();
    let net = VirtioNet::new(backend, mac, Some(Backend::Fd(fd))).map_err(|source| {
        NetDeviceError::Thread {
            device: what.into(),
            source,
        }
    })?;
    let handle = net.worker.handle();
    let device = Arc::new(Mutex::new(VirtioPci::new(net, transport)?));
    Ok(BuiltDevice {
        function: device,
        handle: Some(handle),
    })
}

/// vmnet in shared (NAT) mode, as xhyve: a vmnet interface whose id is the `-U` UUID, and
/// the network thread, which the returned handle owns.
#[cfg(target_os = "macos")]
fn build_vmnet(
    options: &NetOptions,
    uuid: Option<[u8; 16]>,
    transport: VirtioPciResources,
) -> Result<BuiltDevice, NetDeviceError> {
    use std::sync::{Arc, Mutex};

    use super::pci::VirtioPci;
    use crate::net::vmnet;

    let mut backend = vmnet::Vmnet::start(vmnet_interface_id(uuid))?;
    vmnet::drop_privileges().map_err(NetDeviceError::DropPrivileges)?;
    let params = backend.params();
    if params.max_packet_size > MAX_FRAME {
        // vmnet_read refuses buffers smaller than its largest packet.
        return Err(NetDeviceError::PacketTooLarge(params.max_packet_size));
    }
    let thread_error = |source| NetDeviceError::Thread {
        device: "virtio-net".into(),
        source,
    };
    let packets = crate::devices::event_loop::Notifier::new().map_err(thread_error)?;
    let callback = packets.clone();
    backend.set_packet_callback(Box::new(move || callback.notify()))?;
    let mac = vmnet::guest_mac(params.mac, options.mac);
    let net =
        VirtioNet::new(backend, mac, Some(Backend::Notifier(packets))).map_err(thread_error)?;
    let handle = net.worker.handle();
    let device = Arc::new(Mutex::new(VirtioPci::new(net, transport)?));
    Ok(BuiltDevice {
        function: device,
        handle: Some(handle),
    })
}

/// vmnet exists only on macOS (where `uses_vmnet` can be true).
#[cfg(not(target_os = "macos"))]
fn build_vmnet(
    _options: &NetOptions,
    _uuid: Option<[u8; 16]>,
    _transport: VirtioPciResources,
) -> Result<BuiltDevice, NetDeviceError> {
    Err(NetDeviceError::NoVmnet)
}

/// vmnet's interface id: the `-U` UUID as xhyve passes it (so the vmnet MAC stays the one
/// xhyve got), or a random one without `-U` (a new MAC every run, as in xhyve).
#[cfg(target_os = "macos")]
fn vmnet_interface_id(uuid: Option<[u8; 16]>) -> [u8; 16] {
    match uuid {
        Some(uuid) => crate::net::vmnet::xhyve_interface_id(uuid),
        None => {
            let mut random = [0u8; 16];
            // SAFETY: arc4random_buf fills exactly the 16 bytes it is given and cannot fail.
            unsafe { libc::arc4random_buf(random.as_mut_ptr().cast(), random.len()) };
            random
        }
    }
}

/// What `-M` prints: the first network device's MAC, or `None` without one. A vmnet device
/// without `mac=` learns its MAC by starting the vmnet interface, as xhyve does (so `-M`
/// then needs root or the vmnet entitlement too); everything else comes from the command
/// line alone, and no tap is opened.
pub fn mac_to_print(config: &VmConfig) -> Result<Option<MacAddr>, NetDeviceError> {
    if let Some(mac) = config.first_nic_mac() {
        return Ok(Some(mac));
    }
    match config.first_nic() {
        Some(_vmnet) => vmnet_mac(config.uuid),
        None => Ok(None),
    }
}

#[cfg(target_os = "macos")]
fn vmnet_mac(uuid: Option<[u8; 16]>) -> Result<Option<MacAddr>, NetDeviceError> {
    let backend = crate::net::vmnet::Vmnet::start(vmnet_interface_id(uuid))?;
    Ok(Some(backend.params().mac))
}

#[cfg(not(target_os = "macos"))]
fn vmnet_mac(_uuid: Option<[u8; 16]>) -> Result<Option<MacAddr>, NetDeviceError> {
    Err(NetDeviceError::NoVmnet)
}

#[cfg(test)]
mod tests;
