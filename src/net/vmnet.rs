//! macOS vmnet (`-s N,virtio-net[,mac=...]`): Ethernet frames through vmnet.framework's
//! shared (NAT) mode, as xhyve does.
//!
//! vmnet is asynchronous: `vmnet_start_interface` answers on a dispatch queue through an
//! Apple block, and "packets available" is another block that vmnet calls on a queue of
//! ours. [`Vmnet::set_packet_callback`] turns that block into a plain closure, which the
//! virtio-net device uses to wake its network thread; `vmnet_read`/`vmnet_write` never
//! block, so [`NetBackend`] maps onto them directly.
//!
//! The interface id is the `-U` UUID (random without `-U`), so vmnet hands the same guest
//! the same MAC address every run. It is passed in the byte layout xhyve passes (see
//! [`xhyve_interface_id`]), so a UUID keeps the MAC it had under xhyve. The C declarations
//! are in `vendor-headers/vmnet/vmnet.h`. Everything but the framework calls is portable and
//! tested on Linux.

use crate::net::MacAddr;

/// `vmnet_return_t` values (vmnet.h).
pub const VMNET_SUCCESS: u32 = 1000;
pub const VMNET_FAILURE: u32 = 1001;
/// `operating_modes_t`: NAT through the host, guests see each other and the outside world.
pub const VMNET_SHARED_MODE: u64 = 1001;
/// `interface_event_t`.
pub const VMNET_INTERFACE_PACKETS_AVAILABLE: u32 = 1 << 0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmnetError {
    #[error(
        "virtio-net: vmnet failed (status {0}): run as root or sign with com.apple.vm.networking"
    )]
    Start(u32),
    #[error("virtio-net: vmnet did not answer within {0} seconds")]
    NoAnswer(u64),
    #[error("virtio-net: vmnet gave MAC address \"{0}\", expected xx:xx:xx:xx:xx:xx")]
    BadMac(String),
    #[error("virtio-net: vmnet refused the packet callback (status {0})")]
    Callback(u32),
}

/// What vmnet reports about an interface it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceParams {
    /// The MAC vmnet assigned; the guest's unless `mac=` overrides it.
    pub mac: MacAddr,
    pub mtu: u64,
    /// The largest frame vmnet reads or writes; `vmnet_read` needs buffers this large.
    pub max_packet_size: usize,
}

/// Parses the MAC string vmnet returns. vmnet drops leading zeros (`2:a:...`), which
/// xhyve's `%hhx` scan accepts too.
pub fn parse_vmnet_mac(text: &str) -> Result<MacAddr, VmnetError> {
    text.parse()
        .map_err(|_| VmnetError::BadMac(text.to_string()))
}

/// The interface id xhyve gives vmnet for `uuid` (bytes in textual order).
///
/// xhyve scans the UUID into a `struct uuid` (u32 time_low, u16 time_mid, u16
/// time_hi_and_version, then bytes) and hands that memory to vmnet as the 16-byte id. On a
/// little-endian Mac the first three fields are therefore byte-reversed; doing the same
/// keeps every guest's vmnet MAC (and DHCP lease) when it moves from xhyve to xhyve-rs.
pub fn xhyve_interface_id(uuid: [u8; 16]) -> [u8; 16] {
    let mut id = uuid;
    id[0..4].reverse();
    id[4..6].reverse();
    id[6..8].reverse();
    id
}

/// Gives up root after vmnet started, as xhyve does: tools install xhyve setuid root only so
/// that vmnet works (docker-machine-driver-xhyve), and everything after (disk images, pidfile,
/// the guest itself) should run as the user who started it. Group first, then user (CERT
/// POS36-C). Does nothing unless effectively root.
pub fn drop_privileges() -> std::io::Result<()> {
    // SAFETY: these calls take and return plain integers and touch no memory of ours.
    unsafe {
        if libc::geteuid() != 0 && libc::getegid() != 0 {
            return Ok(());
        }
        if libc::setgid(libc::getgid()) == -1 || libc::setuid(libc::getuid()) == -1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The guest's MAC: `mac=` if given, else the one vmnet assigned.
pub fn guest_mac(vmnet: MacAddr, override_mac: Option<MacAddr>) -> MacAddr {
    override_mac.unwrap_or(vmnet)
}

#[cfg(target_os = "macos")]
pub use framework::Vmnet;

#[cfg(target_os = "macos")]
mod framework {
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::io;
    use std::ptr;
    use std::sync::mpsc;
    use std::time::Duration;

    use block2::{Block, RcBlock};

    use super::*;
    use crate::net::NetBackend;

    type XpcObject = *mut c_void;
    type DispatchQueue = *mut c_void;
    type InterfaceRef = *mut c_void;

    /// `struct vmpktdesc`.
    #[repr(C)]
    struct VmPktDesc {
        vm_pkt_size: usize,
        vm_pkt_iov: *mut libc::iovec,
        vm_pkt_iovcnt: u32,
        vm_flags: u32,
    }

    // libxpc and libdispatch are part of libSystem; vmnet is linked by build.rs.
    extern "C" {
        fn xpc_dictionary_create(
            keys: *const *const c_char,
            values: *const XpcObject,
            count: usize,
        ) -> XpcObject;
        fn xpc_dictionary_set_uint64(dictionary: XpcObject, key: *const c_char, value: u64);
        fn xpc_dictionary_set_uuid(dictionary: XpcObject, key: *const c_char, uuid: *const u8);
        fn xpc_dictionary_get_uint64(dictionary: XpcObject, key: *const c_char) -> u64;
        fn xpc_dictionary_get_string(dictionary: XpcObject, key: *const c_char) -> *const c_char;
        fn xpc_release(object: XpcObject);

        fn dispatch_queue_create(label: *const c_char, attr: *mut c_void) -> DispatchQueue;
        fn dispatch_release(object: *mut c_void);

        static vmnet_operation_mode_key: *const c_char;
        static vmnet_interface_id_key: *const c_char;
        static vmnet_mac_address_key: *const c_char;
        static vmnet_mtu_key: *const c_char;
        static vmnet_max_packet_size_key: *const c_char;

        fn vmnet_start_interface(
            interface_desc: XpcObject,
            queue: DispatchQueue,
            handler: &Block<dyn Fn(u32, XpcObject)>,
        ) -> InterfaceRef;
        fn vmnet_stop_interface(
            interface: InterfaceRef,
            queue: DispatchQueue,
            handler: &Block<dyn Fn(u32)>,
        ) -> u32;
        fn vmnet_interface_set_event_callback(
            interface: InterfaceRef,
            event_mask: u32,
            queue: DispatchQueue,
            callback: &Block<dyn Fn(u32, XpcObject)>,
        ) -> u32;
        fn vmnet_read(interface: InterfaceRef, packets: *mut VmPktDesc, count: *mut c_int) -> u32;
        fn vmnet_write(interface: InterfaceRef, packets: *mut VmPktDesc, count: *mut c_int) -> u32;
    }

    /// How long to wait for vmnet to start or stop an interface (xhyve waits for ever; a
    /// stuck vmnet daemon should end in an error, not a hang).
    const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

    /// A started vmnet interface in shared mode.
    pub struct Vmnet {
        interface: InterfaceRef,
        /// Where vmnet runs the start/stop answers and the packet callback.
        queue: DispatchQueue,
        params: InterfaceParams,
        /// Kept alive for as long as vmnet may call it.
        packet_callback: Option<RcBlock<dyn Fn(u32, XpcObject)>>,
    }

    // SAFETY: the interface and queue are thread-safe framework objects (vmnet_read/write may
    // be called from any thread, dispatch queues are reference counted atomically), and the
    // only block we hold captures a `Send + Sync` closure; Block_release is atomic.
    unsafe impl Send for Vmnet {}

    impl Vmnet {
        /// Starts a shared-mode interface whose id is `interface_id` (see
        /// [`xhyve_interface_id`]) and waits for vmnet's answer.
        pub fn start(interface_id: [u8; 16]) -> Result<Vmnet, VmnetError> {
            // SAFETY: the label is a NUL-terminated literal; a NULL attribute asks for a
            // serial queue. The queue is released in Drop (or on the error paths below).
            let queue =
                unsafe { dispatch_queue_create(c"org.xhyve-rs.vmnet".as_ptr(), ptr::null_mut()) };
            if queue.is_null() {
                return Err(VmnetError::Start(VMNET_FAILURE));
            }
            let (answer, answered) = mpsc::sync_channel::<Result<InterfaceParams, VmnetError>>(1);
            let handler: RcBlock<dyn Fn(u32, XpcObject)> =
                RcBlock::new(move |status: u32, params: XpcObject| {
                    let reply = if status != VMNET_SUCCESS || params.is_null() {
                        Err(VmnetError::Start(status))
                    } else {
                        // SAFETY: vmnet passes a live dictionary, valid during this call.
                        unsafe { read_params(params) }
                    };
                    let _ = answer.try_send(reply);
                });
            // SAFETY: an empty dictionary from xpc, filled with keys vmnet exports; `id`
            // is 16 bytes as xpc_dictionary_set_uuid reads. vmnet copies what it keeps of
            // the dictionary and the block, so both may go after the call.
            let interface = unsafe {
                let desc = xpc_dictionary_create(ptr::null(), ptr::null(), 0);
                xpc_dictionary_set_uint64(desc, vmnet_operation_mode_key, VMNET_SHARED_MODE);
                xpc_dictionary_set_uuid(desc, vmnet_interface_id_key, interface_id.as_ptr());
                let interface = vmnet_start_interface(desc, queue, &handler);
                xpc_release(desc);
                interface
            };
            let reply = answered
                .recv_timeout(ANSWER_TIMEOUT)
                .unwrap_or(Err(VmnetError::NoAnswer(ANSWER_TIMEOUT.as_secs())));
            let params = match reply {
                Ok(params) if !interface.is_null() => params,
                other => {
                    let error = other.err().unwrap_or(VmnetError::Start(VMNET_FAILURE));
                    if !matches!(error, VmnetError::NoAnswer(_)) {
                        // SAFETY: vmnet has answered, so nothing of ours runs on the queue
                        // any more. Without an answer the queue is leaked instead.
                        unsafe { dispatch_release(queue) };
                    }
                    return Err(error);
                }
            };
            Ok(Vmnet {
                interface,
                queue,
                params,
                packet_callback: None,
            })
        }

        pub fn params(&self) -> InterfaceParams {
            self.params
        }

        /// Calls `wake` (on a vmnet queue thread) whenever frames are waiting to be read.
        pub fn set_packet_callback(
            &mut self,
            wake: Box<dyn Fn() + Send + Sync>,
        ) -> Result<(), VmnetError> {
            let callback: RcBlock<dyn Fn(u32, XpcObject)> =
                RcBlock::new(move |_events: u32, _event: XpcObject| wake());
            // SAFETY: the interface is started; vmnet copies the block, and we keep our own
            // reference until Drop stops the interface.
            let status = unsafe {
                vmnet_interface_set_event_callback(
                    self.interface,
                    VMNET_INTERFACE_PACKETS_AVAILABLE,
                    self.queue,
                    &callback,
                )
            };
            if status != VMNET_SUCCESS {
                return Err(VmnetError::Callback(status));
            }
            self.packet_callback = Some(callback);
            Ok(())
        }
    }

    /// # Safety
    /// `params` must be the live dictionary of a successful `vmnet_start_interface` answer.
    unsafe fn read_params(params: XpcObject) -> Result<InterfaceParams, VmnetError> {
        // SAFETY: per the contract; the string belongs to the dictionary and is copied out
        // before the call returns.
        let (mac, mtu, max_packet_size) = unsafe {
            let mac = xpc_dictionary_get_string(params, vmnet_mac_address_key);
            let mac = if mac.is_null() {
                String::new()
            } else {
                CStr::from_ptr(mac).to_string_lossy().into_owned()
            };
            (
                mac,
                xpc_dictionary_get_uint64(params, vmnet_mtu_key),
                xpc_dictionary_get_uint64(params, vmnet_max_packet_size_key),
            )
        };
        Ok(InterfaceParams {
            mac: parse_vmnet_mac(&mac)?,
            mtu,
            max_packet_size: usize::try_from(max_packet_size).unwrap_or(usize::MAX),
        })
    }

    impl NetBackend for Vmnet {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            if frame.len() > self.params.max_packet_size {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            let mut iov = libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            };
            let mut packet = VmPktDesc {
                vm_pkt_size: frame.len(),
                vm_pkt_iov: &mut iov,
                vm_pkt_iovcnt: 1,
                vm_flags: 0,
            };
            let mut count: c_int = 1;
            // SAFETY: one descriptor naming one iovec over `frame`, all live for the call;
            // vmnet only reads the frame on write.
            let status = unsafe { vmnet_write(self.interface, &mut packet, &mut count) };
            match (status, count) {
                (VMNET_SUCCESS, 1..) => Ok(()),
                (VMNET_SUCCESS, _) => Err(io::ErrorKind::WouldBlock.into()),
                _ => Err(io::ErrorKind::Other.into()),
            }
        }

        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // vmnet fails a read whose buffer could not hold its largest packet.
            if buf.len() < self.params.max_packet_size {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut packet = VmPktDesc {
                vm_pkt_size: buf.len(),
                vm_pkt_iov: &mut iov,
                vm_pkt_iovcnt: 1,
                vm_flags: 0,
            };
            let mut count: c_int = 1;
            // SAFETY: one descriptor naming one iovec over `buf`, all live and writable for
            // the call; vmnet writes at most `vm_pkt_size` bytes.
            let status = unsafe { vmnet_read(self.interface, &mut packet, &mut count) };
            match (status, count) {
                (VMNET_SUCCESS, 1..) => Ok(packet.vm_pkt_size.min(buf.len())),
                (VMNET_SUCCESS, _) => Err(io::ErrorKind::WouldBlock.into()),
                _ => Err(io::ErrorKind::Other.into()),
            }
        }
    }

    impl Drop for Vmnet {
        fn drop(&mut self) {
            let (done, stopped) = mpsc::sync_channel::<u32>(1);
            let handler: RcBlock<dyn Fn(u32)> = RcBlock::new(move |status: u32| {
                let _ = done.try_send(status);
            });
            // SAFETY: the interface was started and is stopped once, here.
            let status = unsafe { vmnet_stop_interface(self.interface, self.queue, &handler) };
            if status == VMNET_SUCCESS && stopped.recv_timeout(ANSWER_TIMEOUT).is_ok() {
                // SAFETY: the interface is stopped, so vmnet queues nothing more on it; the
                // packet callback (dropped after this) can no longer run.
                unsafe { dispatch_release(self.queue) };
            }
            // Otherwise the queue is leaked: a late callback must still find it.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmnet_macs_parse_with_or_without_leading_zeros() {
        assert_eq!(
            parse_vmnet_mac("2:a:b3:4:0:ff").unwrap(),
            MacAddr([0x02, 0x0a, 0xb3, 0x04, 0x00, 0xff])
        );
        assert_eq!(
            parse_vmnet_mac("ce:ab:01:02:03:04").unwrap(),
            MacAddr([0xce, 0xab, 1, 2, 3, 4])
        );
        for bad in [
            "",
            "ce:ab:01:02:03",
            "ce:ab:01:02:03:04:05",
            "ce:ab:01:02:03:zz",
        ] {
            assert_eq!(
                parse_vmnet_mac(bad).unwrap_err(),
                VmnetError::BadMac(bad.to_string())
            );
        }
    }

    #[test]
    fn interface_id_has_xhyve_struct_uuid_layout() {
        // -U 01234567-89ab-cdef-0123-456789abcdef, bytes in textual order.
        let text_order = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(
            xhyve_interface_id(text_order),
            [
                0x67, 0x45, 0x23, 0x01, 0xab, 0x89, 0xef, 0xcd, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ]
        );
    }

    #[test]
    fn mac_option_overrides_the_vmnet_mac() {
        let vmnet = MacAddr([0xce, 0, 0, 0, 0, 1]);
        let chosen = MacAddr([0x02, 0, 0, 0, 0, 2]);
        assert_eq!(guest_mac(vmnet, None), vmnet);
        assert_eq!(guest_mac(vmnet, Some(chosen)), chosen);
    }

    #[test]
    fn a_setuid_root_process_drops_to_the_real_user() {
        // SAFETY: plain integer getter.
        if unsafe { libc::geteuid() } != 0 {
            // Not root: nothing to drop, and the call must leave the process alone.
            drop_privileges().unwrap();
            return;
        }
        // As root, a child turns itself into what a setuid-root xhyve run by user 1000 is
        // (real ids 1000, effective 0), drops, and reports the effective ids by exit code.
        // SAFETY: the child only calls async-signal-safe id functions and _exit.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            // SAFETY: as above; the child never returns into the test harness.
            unsafe {
                let setuid_like = libc::setregid(1000, 0) == 0 && libc::setreuid(1000, 0) == 0;
                let code = if !setuid_like || libc::geteuid() != 0 {
                    10
                } else if drop_privileges().is_err() {
                    11
                } else if (libc::geteuid(), libc::getegid()) != (1000, 1000) {
                    12
                } else {
                    0
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a live int.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "10 setup, 11 error, 12 still root"
        );
    }

    #[test]
    fn start_failure_says_how_to_fix_it() {
        assert_eq!(
            VmnetError::Start(1001).to_string(),
            "virtio-net: vmnet failed (status 1001): run as root or sign with com.apple.vm.networking"
        );
    }
}
