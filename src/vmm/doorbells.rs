//! The doorbell service on KVM: a queue's notify address signals the queue's notifier (an
//! eventfd) straight from KVM (KVM_IOEVENTFD), so queue notifications never reach the vCPU
//! exit loop and no thread sits between the guest and the device's own thread.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::bus::lock;
use crate::devices::doorbell::{Doorbell, DoorbellId, Doorbells};
use crate::hv::Vm;

/// Registrations of notifier eventfds as KVM ioeventfds, for the whole machine.
pub struct DoorbellServer {
    vm: Arc<dyn Vm>,
    registrations: Mutex<HashMap<u64, (RawFd, Doorbell)>>,
    next_id: AtomicU64,
}

impl DoorbellServer {
    pub fn new(vm: Arc<dyn Vm>) -> Arc<Self> {
        Arc::new(DoorbellServer {
            vm,
            registrations: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }
}

impl Doorbells for DoorbellServer {
    fn register(&self, doorbell: Doorbell, notifier_fd: RawFd) -> Option<DoorbellId> {
        if let Err(e) = self.vm.register_doorbell(notifier_fd, doorbell) {
            log::trace!("doorbell {doorbell:?} stays a VM exit: {e}");
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.registrations).insert(id, (notifier_fd, doorbell));
        Some(DoorbellId(id))
    }

    fn unregister(&self, id: DoorbellId) {
        let Some((fd, doorbell)) = lock(&self.registrations).remove(&id.0) else {
            return;
        };
        if let Err(e) = self.vm.unregister_doorbell(fd, doorbell) {
            log::trace!("doorbell {doorbell:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::event_loop::Notifier;
    use crate::hv::kvm::tests_support::{real_mode_vm, start_real_mode_vcpu};
    use crate::hv::VmExit;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    /// Whether `notifier` becomes readable within `wait`, taking the ring if so.
    fn rung(notifier: &Notifier, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let mut fd = libc::pollfd {
                fd: notifier.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, read and written only by poll for this call.
            let ready = unsafe { libc::poll(&mut fd, 1, 10) };
            if ready > 0 {
                notifier.drain();
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    #[test]
    fn a_doorbell_write_rings_the_device_without_a_vm_exit() {
        let Some((_kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        let server = DoorbellServer::new(vm.clone());
        let notifier = Notifier::new().unwrap();
        let queue1 = Doorbell::Port16 {
            port: 0x510,
            value: 1,
        };
        let id = server
            .register(queue1, notifier.fd())
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
        assert!(rung(&notifier, Duration::from_secs(5)));

        server.unregister(id);
        match vcpu.run().unwrap() {
            VmExit::IoOut { port, data, .. } => {
                assert_eq!((port, data), (0x510, &[1u8, 0][..]), "an exit again")
            }
            other => panic!("unexpected exit {other:?}"),
        }
        assert!(!rung(&notifier, Duration::from_millis(100)));
    }
}
