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
