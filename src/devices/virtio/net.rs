//! virtio-net (`-s N,virtio-tap,tapN[,mac=...]` on Linux, `-s N,virtio-net[,...]` over vmnet
//! on macOS, the built-in user network, or a daemon's socket): an Ethernet card over a
//! [`NetBackend`].
//!
//! Queue 0 receives (host to guest), queue 1 transmits. The device offers its MAC and link
//! status in configuration space and no offloads, so every frame is a plain Ethernet frame
//! behind a virtio-net header that is all zero (plus `num_buffers = 1` where the header has
//! it). On a real machine the frames move on a network thread ([`worker`]): the doorbell
//! only wakes it, so a vCPU never waits for the host's network stack. A tap's thread polls
//! its descriptor ([`worker`], Linux); vmnet has none, so its thread sleeps on a flag that
//! vmnet's packet callback and the doorbells set ([`signalled`]).

use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::pci::VirtioPciResources;
use super::{QueueError, VirtioDevice, F_VERSION_1};
use crate::cli::{PciDeviceConfig, VmConfig};
use crate::devices::pci::SharedPciDevice;
use crate::net::{MacAddr, NetBackend};
use crate::vmm::memory::GuestMemory;

pub mod signalled;
#[cfg(target_os = "linux")]
pub mod worker;

const DEVICE_TYPE_NET: u16 = 1;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// bhyve's ring size for virtio-net.
pub const QUEUE_SIZE: u16 = 1024;

/// Feature bits (virtio 1.x, 5.1.3).
pub const F_MAC: u64 = 1 << 5;
pub const F_STATUS: u64 = 1 << 16;
const F_MRG_RXBUF: u64 = 1 << 15;

/// `status` in configuration space: the link is up.
const STATUS_LINK_UP: u16 = 1;
/// Configuration space: mac[6], status (u16).
const CONFIG_SIZE: usize = 8;

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

pub struct VirtioNet<B: NetBackend> {
    backend: B,
    mac: MacAddr,
    header_len: usize,
    /// One frame with room for the header in front; allocated once.
    frame: Vec<u8>,
    /// Wakes the network thread instead of serving a queue on the vCPU thread.
    waker: Option<Box<dyn Fn() + Send>>,
    /// The last receive pass stopped because the back end had no frame left.
    rx_idle: bool,
    stats: NetStats,
}

impl<B: NetBackend> VirtioNet<B> {
    pub fn new(backend: B, mac: MacAddr) -> Self {
        VirtioNet {
            backend,
            mac,
            header_len: HEADER_LEGACY,
            frame: vec![0; HEADER_MODERN + MAX_FRAME],
            waker: None,
            rx_idle: false,
            stats: NetStats::default(),
        }
    }

    /// Doorbells will call `waker` (which must not block or allocate) and leave the queues
    /// to whoever it wakes.
    pub fn set_waker(&mut self, waker: Box<dyn Fn() + Send>) {
        self.waker = Some(waker);
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
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

impl<B: NetBackend> VirtioDevice for VirtioNet<B> {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_NET
    }

    fn pci_class(&self) -> (u8, u8, u8) {
        PCI_CLASS_ETHERNET
    }

    fn device_features(&self) -> u64 {
        F_MAC | F_STATUS
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
        for (i, out) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *out = at.and_then(|a| config.get(a)).copied().unwrap_or(0);
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.header_len = if features & (F_VERSION_1 | F_MRG_RXBUF) != 0 {
            HEADER_MODERN
        } else {
            HEADER_LEGACY
        };
    }

    fn wake(&mut self, _index: usize) -> bool {
        match &self.waker {
            Some(waker) => {
                waker();
                true
            }
            None => false,
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        // Serve, then ask the driver to ring again (event index) and serve what slipped in
        // meanwhile; bounded so a busy guest cannot hold the device lock for ever.
        for _ in 0..4 {
            used |= match index {
                RX_QUEUE => self.receive(queue, memory)?,
                TX_QUEUE => self.transmit(queue, memory)?,
                _ => return Ok(false),
            };
            let more_buffers = queue.enable_notification(memory)?;
            if !more_buffers || (index == RX_QUEUE && self.rx_idle) {
                break;
            }
        }
        Ok(used)
    }

    fn reset(&mut self) {
        self.header_len = HEADER_LEGACY;
    }
}

/// Builds `-s ...,virtio-tap,tapN[,mac=...]`: opens the tap and starts the network thread,
/// which runs for the life of the process.
#[cfg(target_os = "linux")]
pub fn build_virtio_tap(
    config: &PciDeviceConfig,
    uuid: Option<[u8; 16]>,
    transport: VirtioPciResources,
) -> Result<SharedPciDevice, String> {
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};

    use super::pci::VirtioPci;
    use crate::cli::{parse_tap_options, tap_mac};

    let options =
        parse_tap_options("virtio-tap", config.options.as_deref()).map_err(|e| e.to_string())?;
    let tap = crate::net::tap::Tap::open(&options.name).map_err(|e| e.to_string())?;
    let fd = tap.as_raw_fd();
    let net = VirtioNet::new(tap, tap_mac(uuid, config, &options));
    let device = VirtioPci::new(net, transport).map_err(|e| e.to_string())?;
    let device = Arc::new(Mutex::new(device));
    worker::NetWorker::spawn(device.clone(), fd)
        .map_err(|e| format!("virtio-tap {}: network thread: {e}", options.name))?
        .detach();
    Ok(device)
}

/// Tap devices are Linux's; macOS has vmnet (`virtio-net`).
#[cfg(not(target_os = "linux"))]
pub fn build_virtio_tap(
    _config: &PciDeviceConfig,
    _uuid: Option<[u8; 16]>,
    _transport: VirtioPciResources,
) -> Result<SharedPciDevice, String> {
    Err("virtio-tap needs Linux tap devices; on macOS use virtio-net (vmnet)".into())
}

/// Builds `-s ...,virtio-net[,...]`: the back end its options name (vmnet, the built-in
/// network, or a daemon's socket) and the network thread, which run for the life of the
/// process.
pub fn build_virtio_net(
    config: &PciDeviceConfig,
    uuid: Option<[u8; 16]>,
    transport: VirtioPciResources,
) -> Result<SharedPciDevice, String> {
    use crate::net::dhcp::LeaseSnoop;
    use crate::net::options::NetBackendKind;
    use crate::net::slirp::UserNet;
    use crate::net::socket::{DgramSocket, StreamSocket};

    let options = crate::cli::parse_vmnet_options("virtio-net", config.options.as_deref())
        .map_err(|e| e.to_string())?;
    if options.uses_vmnet() {
        return build_vmnet(options.mac, uuid, transport);
    }
    let mac = crate::cli::net_mac(uuid, config, &options);
    match options.backend {
        NetBackendKind::Default | NetBackendKind::User(_) => {
            let user = match options.backend {
                NetBackendKind::User(user) => user,
                _ => Default::default(),
            };
            let (stack, link) = UserNet::start(&user, mac).map_err(|e| e.to_string())?;
            stack.detach();
            spawn_polled(link, mac, transport, "user network")
        }
        NetBackendKind::Stream(path) => {
            let socket = StreamSocket::connect(&path).map_err(|e| format!("virtio-net: {e}"))?;
            log::info!("virtio-net: frames over {} (stream)", path.display());
            spawn_polled(
                LeaseSnoop::new(socket, mac, "virtio-net socket"),
                mac,
                transport,
                "socket",
            )
        }
        NetBackendKind::Dgram { path, local } => {
            let socket = DgramSocket::connect(&path, local.as_deref())
                .map_err(|e| format!("virtio-net: {e}"))?;
            log::info!("virtio-net: frames over {} (datagrams)", path.display());
            spawn_polled(
                LeaseSnoop::new(socket, mac, "virtio-net dgram"),
                mac,
                transport,
                "dgram",
            )
        }
    }
}

/// A device over a back end with a descriptor that polls readable when frames wait.
#[cfg(target_os = "linux")]
fn spawn_polled<B: NetBackend + std::os::fd::AsRawFd + 'static>(
    backend: B,
    mac: MacAddr,
    transport: VirtioPciResources,
    what: &str,
) -> Result<SharedPciDevice, String> {
    use std::sync::{Arc, Mutex};

    use super::pci::VirtioPci;

    let fd = backend.as_raw_fd();
    let device =
        VirtioPci::new(VirtioNet::new(backend, mac), transport).map_err(|e| e.to_string())?;
    let device = Arc::new(Mutex::new(device));
    worker::NetWorker::spawn(device.clone(), fd)
        .map_err(|e| format!("virtio-net {what}: network thread: {e}"))?
        .detach();
    Ok(device)
}

/// Elsewhere (no epoll): a reader thread queues the back end's frames and wakes the
/// callback-driven network thread, as vmnet's callback does.
#[cfg(not(target_os = "linux"))]
fn spawn_polled<B: NetBackend + std::os::fd::AsRawFd + 'static>(
    backend: B,
    mac: MacAddr,
    transport: VirtioPciResources,
    what: &str,
) -> Result<SharedPciDevice, String> {
    use std::sync::{Arc, Mutex};

    use super::pci::VirtioPci;

    let wakeup = signalled::Wakeup::new();
    let waker = wakeup.clone();
    let backend = crate::net::threaded::Threaded::spawn(backend, Box::new(move || waker.wake()))
        .map_err(|e| format!("virtio-net {what}: reader thread: {e}"))?;
    let device =
        VirtioPci::new(VirtioNet::new(backend, mac), transport).map_err(|e| e.to_string())?;
    let device = Arc::new(Mutex::new(device));
    signalled::SignalledWorker::spawn(device.clone(), wakeup)
        .map_err(|e| format!("virtio-net {what}: network thread: {e}"))?
        .detach();
    Ok(device)
}

/// vmnet in shared (NAT) mode, as xhyve: its interface id is the `-U` UUID.
#[cfg(target_os = "macos")]
fn build_vmnet(
    mac_option: Option<MacAddr>,
    uuid: Option<[u8; 16]>,
    transport: VirtioPciResources,
) -> Result<SharedPciDevice, String> {
    use std::sync::{Arc, Mutex};

    use super::pci::VirtioPci;
    use crate::net::vmnet;

    let mut backend = vmnet::Vmnet::start(vmnet_interface_id(uuid)).map_err(|e| e.to_string())?;
    vmnet::drop_privileges()
        .map_err(|e| format!("virtio-net: cannot drop root after starting vmnet: {e}"))?;
    let params = backend.params();
    if params.max_packet_size > MAX_FRAME {
        // vmnet_read refuses buffers smaller than its largest packet.
        return Err(format!(
            "virtio-net: vmnet packets of up to {} bytes exceed the device's {MAX_FRAME}",
            params.max_packet_size
        ));
    }
    let wakeup = signalled::Wakeup::new();
    let callback = wakeup.clone();
    backend
        .set_packet_callback(Box::new(move || callback.wake()))
        .map_err(|e| e.to_string())?;
    let mac = vmnet::guest_mac(params.mac, mac_option);
    let device =
        VirtioPci::new(VirtioNet::new(backend, mac), transport).map_err(|e| e.to_string())?;
    let device = Arc::new(Mutex::new(device));
    signalled::SignalledWorker::spawn(device.clone(), wakeup)
        .map_err(|e| format!("virtio-net: network thread: {e}"))?
        .detach();
    Ok(device)
}

/// vmnet exists only on macOS (where `uses_vmnet` can be true).
#[cfg(not(target_os = "macos"))]
fn build_vmnet(
    _mac: Option<MacAddr>,
    _uuid: Option<[u8; 16]>,
    _transport: VirtioPciResources,
) -> Result<SharedPciDevice, String> {
    Err("virtio-net: vmnet needs macOS".into())
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
pub fn mac_to_print(config: &VmConfig) -> Result<Option<MacAddr>, String> {
    if let Some(mac) = crate::cli::first_nic_mac(config) {
        return Ok(Some(mac));
    }
    match crate::cli::first_nic(config) {
        Some(_vmnet) => vmnet_mac(config.uuid),
        None => Ok(None),
    }
}

#[cfg(target_os = "macos")]
fn vmnet_mac(uuid: Option<[u8; 16]>) -> Result<Option<MacAddr>, String> {
    let backend =
        crate::net::vmnet::Vmnet::start(vmnet_interface_id(uuid)).map_err(|e| e.to_string())?;
    Ok(Some(backend.params().mac))
}

#[cfg(not(target_os = "macos"))]
fn vmnet_mac(_uuid: Option<[u8; 16]>) -> Result<Option<MacAddr>, String> {
    Err("virtio-net: vmnet needs macOS".into())
}

#[cfg(test)]
mod tests;
