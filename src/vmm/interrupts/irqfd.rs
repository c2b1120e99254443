//! Interrupt file descriptors (KVM irqfd): MSIs raised by one eventfd write.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::lock;
use crate::devices::irq::MsiSender;
use crate::hv::{IrqfdSource, Vm};

/// Routes kept for one MSI sender; more distinct messages than this reuse the oldest.
const MSI_ROUTES: usize = 64;

/// One MSI message's irqfd. `key` is 0 while the slot is empty or being retargeted.
#[derive(Default)]
struct MsiRoute {
    key: AtomicU64,
    irqfd: OnceLock<(EventFd, u32)>,
}

/// MSIs through irqfds: each distinct message gets a KVM route and an eventfd the first time
/// a device sends it, so that later sends are one eventfd write. Devices send the message the
/// guest programmed (they read their MSI-X table or MSI capability when they signal, and do
/// not send while masked), so routes follow the guest's programming without the devices
/// knowing about routes.
pub struct IrqfdMsiSender {
    vm: Arc<dyn Vm>,
    routes: Box<[MsiRoute]>,
    used: AtomicUsize,
    /// The hypervisor refused a route: every later new message takes the ioctl at once.
    refused: AtomicBool,
    /// Serialises route creation and reuse; the sending path never takes it once a route exists.
    setup: Mutex<usize>,
}

impl IrqfdMsiSender {
    pub fn new(vm: Arc<dyn Vm>) -> Arc<Self> {
        Arc::new(IrqfdMsiSender {
            vm,
            routes: (0..MSI_ROUTES).map(|_| MsiRoute::default()).collect(),
            used: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
            setup: Mutex::new(0),
        })
    }

    fn signal(&self, key: u64) -> bool {
        let used = self.used.load(Ordering::Acquire).min(self.routes.len());
        self.routes[..used]
            .iter()
            .find(|route| route.key.load(Ordering::Acquire) == key)
            .and_then(|route| route.irqfd.get())
            .is_some_and(|(fd, _)| fd.write(1).is_ok())
    }

    /// First send of a message: a new route, or the oldest one pointed at this message.
    fn add_route(&self, key: u64, address: u64, data: u32) -> bool {
        if self.refused.load(Ordering::Relaxed) {
            return false;
        }
        let mut next_reuse = lock(&self.setup);
        if self.signal(key) {
            return true; // another thread made it meanwhile
        }
        let used = self.used.load(Ordering::Acquire);
        if let Some(route) = self.routes.get(used) {
            let Ok(fd) = EventFd::new(EFD_NONBLOCK) else {
                return false;
            };
            let source = IrqfdSource::Msi { address, data };
            let gsi = match self.vm.register_irqfd(fd.as_raw_fd(), source) {
                Ok(gsi) => gsi,
                Err(e) => {
                    log::debug!("MSIs stay on KVM_SIGNAL_MSI: {e}");
                    self.refused.store(true, Ordering::Relaxed);
                    return false;
                }
            };
            let _ = route.irqfd.set((fd, gsi));
            route.key.store(key, Ordering::Release);
            self.used.store(used + 1, Ordering::Release);
        } else {
            // Every route is taken: the guest reprogrammed vectors. A send racing this reuse
            // can reach the new message once (a spurious interrupt the driver tolerates).
            let Some(route) = self.routes.get(*next_reuse % self.routes.len()) else {
                return false;
            };
            *next_reuse = next_reuse.wrapping_add(1);
            let Some((_, gsi)) = route.irqfd.get() else {
                return false;
            };
            route.key.store(0, Ordering::Release);
            if let Err(e) = self.vm.retarget_irqfd(*gsi, address, data) {
                log::debug!("MSIs stay on KVM_SIGNAL_MSI: {e}");
                self.refused.store(true, Ordering::Relaxed);
                return false;
            }
            route.key.store(key, Ordering::Release);
        }
        self.signal(key)
    }
}

/// The cache key of a message: its 32-bit address and its data. `None` for messages the
/// cache does not hold (a high address, or the all-zero key that marks an empty slot).
fn msi_key(address: u64, data: u32) -> Option<u64> {
    let address = u32::try_from(address).ok()?;
    let key = u64::from(address) << 32 | u64::from(data);
    (key != 0).then_some(key)
}

impl MsiSender for IrqfdMsiSender {
    fn send_msi(&self, address: u64, data: u32) {
        let sent = msi_key(address, data)
            .is_some_and(|key| self.signal(key) || self.add_route(key, address, data));
        if !sent {
            if let Err(e) = self.vm.signal_msi(address, data) {
                log::trace!("MSI {address:#x}/{data:#x}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hv::{HvError, Vcpu};
    use std::os::fd::RawFd;

    /// Records what the senders ask of the hypervisor.
    #[derive(Default)]
    struct FakeVm {
        irqfds: Mutex<Vec<(RawFd, IrqfdSource)>>,
        retargets: Mutex<Vec<(u32, u64, u32)>>,
        ioctl_msis: Mutex<Vec<(u64, u32)>>,
        refuse: bool,
    }

    impl FakeVm {
        /// How many times the irqfd of registration `index` was written since the last look.
        fn signals(&self, index: usize) -> u64 {
            let fd = self.irqfds.lock().unwrap()[index].0;
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into a local from an eventfd the sender under test owns
            // and keeps open for the duration of the test.
            let n = unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
            if n == 8 {
                count
            } else {
                0
            }
        }
    }

    impl Vm for FakeVm {
        unsafe fn map_memory(&self, _: u32, _: u64, _: u64, _: *mut u8) -> Result<(), HvError> {
            Ok(())
        }
        fn create_vcpu(&self, _: u8) -> Result<Box<dyn Vcpu>, HvError> {
            Err(HvError::Unavailable)
        }
        fn set_irq_line(&self, _: u32, _: bool) -> Result<(), HvError> {
            Ok(())
        }
        fn signal_msi(&self, address: u64, data: u32) -> Result<(), HvError> {
            self.ioctl_msis.lock().unwrap().push((address, data));
            Ok(())
        }
        fn register_irqfd(&self, fd: RawFd, source: IrqfdSource) -> Result<u32, HvError> {
            if self.refuse {
                return Err(HvError::Unavailable);
            }
            let mut irqfds = self.irqfds.lock().unwrap();
            irqfds.push((fd, source));
            Ok(23 + irqfds.len() as u32)
        }
        fn retarget_irqfd(&self, route: u32, address: u64, data: u32) -> Result<(), HvError> {
            self.retargets.lock().unwrap().push((route, address, data));
            Ok(())
        }
    }

    #[test]
    fn a_message_gets_one_route_and_later_sends_only_write_its_eventfd() {
        let vm = Arc::new(FakeVm::default());
        let sender = IrqfdMsiSender::new(vm.clone());
        sender.send_msi(0xFEE0_0000, 0x41);
        sender.send_msi(0xFEE0_0000, 0x41);
        sender.send_msi(0xFEE0_1000, 0x42);
        let sources: Vec<_> = vm.irqfds.lock().unwrap().iter().map(|r| r.1).collect();
        assert_eq!(
            sources,
            vec![
                IrqfdSource::Msi {
                    address: 0xFEE0_0000,
                    data: 0x41
                },
                IrqfdSource::Msi {
                    address: 0xFEE0_1000,
                    data: 0x42
                }
            ]
        );
        assert_eq!((vm.signals(0), vm.signals(1)), (2, 1));
        assert!(vm.ioctl_msis.lock().unwrap().is_empty());
    }

    #[test]
    fn more_messages_than_routes_reuse_the_oldest_route() {
        let vm = Arc::new(FakeVm::default());
        let sender = IrqfdMsiSender::new(vm.clone());
        for vector in 0..MSI_ROUTES as u32 + 1 {
            sender.send_msi(0xFEE0_0000, 0x30 + vector);
        }
        assert_eq!(vm.irqfds.lock().unwrap().len(), MSI_ROUTES);
        let reused = 0x30 + MSI_ROUTES as u32;
        assert_eq!(
            *vm.retargets.lock().unwrap(),
            vec![(24, 0xFEE0_0000, reused)]
        );
        assert_eq!(
            vm.signals(0),
            2,
            "the first message's send, then the new one's"
        );
        sender.send_msi(0xFEE0_0000, 0x30);
        assert_eq!(
            vm.retargets.lock().unwrap().len(),
            2,
            "the old message was dropped"
        );
    }

    #[test]
    fn messages_without_a_route_use_the_ioctl() {
        let refusing = Arc::new(FakeVm {
            refuse: true,
            ..FakeVm::default()
        });
        let sender = IrqfdMsiSender::new(refusing.clone());
        sender.send_msi(0xFEE0_0000, 0x41);
        sender.send_msi(0xFEE0_0000, 0x41);
        assert_eq!(refusing.ioctl_msis.lock().unwrap().len(), 2);

        let vm = Arc::new(FakeVm::default());
        let sender = IrqfdMsiSender::new(vm.clone());
        sender.send_msi(0x1_FEE0_0000, 0x41); // beyond the key's 32-bit address
        assert_eq!(*vm.ioctl_msis.lock().unwrap(), vec![(0x1_FEE0_0000, 0x41)]);
        assert!(vm.irqfds.lock().unwrap().is_empty());
    }
}
