//! The doorbell service on KVM: each registered notify address gets an eventfd that KVM
//! signals on a guest write (KVM_IOEVENTFD), and one thread waits on all of them and rings
//! the device, so queue notifications never reach the vCPU exit loop.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::lock;
use crate::devices::doorbell::{Doorbell, DoorbellId, Doorbells};
use crate::devices::pci::PciDevice;
use crate::hv::Vm;

struct Registration {
    fd: EventFd,
    doorbell: Doorbell,
    target: Weak<Mutex<dyn PciDevice>>,
    queue: u16,
}

/// Eventfd doorbells served by one thread for the whole machine.
pub struct DoorbellServer {
    vm: Arc<dyn Vm>,
    epoll: Epoll,
    registrations: Mutex<HashMap<u64, Registration>>,
    next_id: AtomicU64,
}

impl DoorbellServer {
    /// Starts the serving thread. It lives as long as the process, like the vCPUs.
    pub fn start(vm: Arc<dyn Vm>) -> io::Result<Arc<Self>> {
        let server = Arc::new(DoorbellServer {
            vm,
            epoll: Epoll::new()?,
            registrations: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let serving = server.clone();
        std::thread::Builder::new()
            .name("doorbells".into())
            .spawn(move || serving.serve())?;
        Ok(server)
    }

    fn serve(&self) {
        let mut events = [EpollEvent::default(); 16];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("doorbell thread stops: epoll_wait: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                self.ring(event.data());
            }
        }
    }

    fn ring(&self, id: u64) {
        let (target, queue) = {
            let registrations = lock(&self.registrations);
            let Some(registration) = registrations.get(&id) else {
                return; // unregistered since the write
            };
            // Drains the count: one service pass covers every write since the last.
            let _ = registration.fd.read();
            (registration.target.clone(), registration.queue)
        };
        // The registry lock is released first: the device calls back into it while locked.
        if let Some(device) = target.upgrade() {
            lock(&device).ring_doorbell(queue);
        }
    }
}

impl Doorbells for DoorbellServer {
    fn register(
        &self,
        doorbell: Doorbell,
        target: Weak<Mutex<dyn PciDevice>>,
        queue: u16,
    ) -> Option<DoorbellId> {
        let fd = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| log::trace!("doorbell {doorbell:?}: eventfd: {e}"))
            .ok()?;
        if let Err(e) = self.vm.register_doorbell(fd.as_raw_fd(), doorbell) {
            log::trace!("doorbell {doorbell:?} stays a VM exit: {e}");
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let added = self.epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, id),
        );
        if let Err(e) = added {
            log::trace!("doorbell {doorbell:?} stays a VM exit: epoll: {e}");
            let _ = self.vm.unregister_doorbell(fd.as_raw_fd(), doorbell);
            return None;
        }
        let registration = Registration {
            fd,
            doorbell,
            target,
            queue,
        };
        lock(&self.registrations).insert(id, registration);
        Some(DoorbellId(id))
    }

    fn unregister(&self, id: DoorbellId) {
        let Some(registration) = lock(&self.registrations).remove(&id.0) else {
            return;
        };
        let fd = registration.fd.as_raw_fd();
        if let Err(e) = self.vm.unregister_doorbell(fd, registration.doorbell) {
            log::trace!("doorbell {:?}: {e}", registration.doorbell);
        }
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::{ConfigSpace, PciIds};
    use crate::hv::kvm::tests_support::{real_mode_vm, start_real_mode_vcpu};
    use crate::hv::VmExit;
    use std::sync::mpsc;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    /// Reports each ring, and each write that came the exit path instead.
    struct Probe {
        config: ConfigSpace,
        rings: mpsc::Sender<u16>,
    }

    impl PciDevice for Probe {
        fn config_space(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_space_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn ring_doorbell(&mut self, queue: u16) {
            let _ = self.rings.send(queue);
        }
    }

    #[test]
    fn a_doorbell_write_rings_the_device_without_a_vm_exit() {
        let Some((_kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        let server = DoorbellServer::start(vm.clone()).unwrap();
        let (rings, rung) = mpsc::channel();
        let probe: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(Probe {
            config: ConfigSpace::new(PciIds {
                vendor: 0x1af4,
                device: 0x1000,
                class: 0,
                subclass: 0,
                prog_if: 0,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
            rings,
        }));
        let queue1 = Doorbell::Port16 {
            port: 0x510,
            value: 1,
        };
        let id = server
            .register(queue1, Arc::downgrade(&probe), 1)
            .expect("KVM takes the doorbell");
        // mov dx,0x510; mov ax,1; out dx,ax (the doorbell); mov ax,0; out dx,ax (not it);
        // then the doorbell again after it was unregistered.
        let code = [
            0xba, 0x10, 0x05, 0xb8, 0x01, 0x00, 0xef, 0xb8, 0x00, 0x00, 0xef, 0xb8, 0x01, 0x00,
            0xef,
        ];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x1000);
        match vcpu.run().unwrap() {
            VmExit::IoOut { port, data, .. } => {
                assert_eq!((port, data), (0x510, &[0u8, 0][..]), "the first exit")
            }
            other => panic!("unexpected exit {other:?}"),
        }
        assert_eq!(rung.recv_timeout(Duration::from_secs(5)), Ok(1));

        server.unregister(id);
        match vcpu.run().unwrap() {
            VmExit::IoOut { port, data, .. } => {
                assert_eq!((port, data), (0x510, &[1u8, 0][..]), "an exit again")
            }
            other => panic!("unexpected exit {other:?}"),
        }
        assert!(rung.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
