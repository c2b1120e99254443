//! The built-in user-mode network (`virtio-net,user`; the plain `virtio-net` on Linux):
//! libslirp, the stack under QEMU's `-netdev user` and slirp4netns, run on a thread of its
//! own. No root, no tap, no daemon: the guest's TCP and UDP become the host process's own
//! sockets.
//!
//! The guest sees QEMU's network: 10.0.2.0/24, gateway 10.0.2.2 (which is the host's
//! loopback), DNS 10.0.2.3 (forwarded to the host's resolvers unless `dns=off`), and DHCP
//! handing out 10.0.2.15 first. IPv4 only for now.
//!
//! The stack thread owns the `Slirp` (libslirp is not thread-safe) and talks to the device
//! through a connected pair of Unix datagram sockets, one frame per datagram: the device side
//! is then an ordinary [`DgramSocket`] that the network thread polls like any daemon's
//! socket. The stack thread sleeps in poll(2) on its end, on libslirp's own sockets, and
//! until libslirp's next timer: no busy loop.

mod ffi;

use std::ffi::{c_char, c_int, c_void, CStr};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::dhcp::GuestLease;
use super::options::UserNetOptions;
use super::socket::DgramSocket;
use super::MacAddr;
use crate::devices::DeviceHandle;

/// QEMU's user-network addresses, which guests and users already know.
pub const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const NAMESERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
pub const DHCP_START: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The largest frame the stack takes from the guest (MTU 1500 behind an Ethernet header).
const MAX_GUEST_FRAME: usize = 1514 + 4;
/// Frames taken from the guest per wake-up before libslirp's sockets get a turn.
const FRAMES_PER_PASS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SlirpError {
    #[error("user network: cannot start libslirp")]
    New,
    #[error("user network: hostfwd {proto}:{host}: cannot bind on the host (in use?)")]
    HostFwd {
        proto: &'static str,
        host: SocketAddrV4,
    },
    #[error("user network: {0}")]
    Io(#[from] io::Error),
    #[error("user network: the stack thread ended before it started")]
    Thread,
}

/// The running stack. Dropping it stops the thread and joins it.
pub struct UserNet {
    /// Closing this wakes the thread with a hang-up: its signal to stop.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    lease: Arc<GuestLease>,
}

impl UserNet {
    /// Starts the stack for a guest whose MAC is `guest_mac`; returns it and the device's
    /// end of the frame link. Port forwards are bound before this returns, so a busy port is
    /// an error at start-up, not a surprise later.
    pub fn start(
        options: &UserNetOptions,
        guest_mac: MacAddr,
    ) -> Result<(UserNet, DgramSocket), SlirpError> {
        let (device_end, stack_end) = UnixDatagram::pair()?;
        let device_end = DgramSocket::from_socket(device_end)?;
        let stack_end = DgramSocket::from_socket(stack_end)?;
        let (stop_rx, stop_tx) = pipe()?;
        let lease = Arc::new(GuestLease::default());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let options = options.clone();
        let thread_lease = lease.clone();
        let thread = std::thread::Builder::new()
            .name("slirp".into())
            .spawn(move || {
                let stack = match Stack::new(&options, stack_end, stop_rx, guest_mac, thread_lease)
                {
                    Ok(stack) => stack,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                stack.run();
            })?;
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err(SlirpError::Thread),
        }
        log::info!(
            "virtio-net user: libslirp {} on {NETWORK}/24, gateway {GATEWAY}",
            version()
        );
        Ok((
            UserNet {
                stop: Some(stop_tx),
                thread: Some(thread),
                lease,
            },
            device_end,
        ))
    }

    /// The address the guest got from the built-in DHCP server, once it has one.
    pub fn guest_ip(&self) -> Option<Ipv4Addr> {
        self.lease.get()
    }

    pub fn lease(&self) -> Arc<GuestLease> {
        self.lease.clone()
    }

    /// Whether the stack thread is still running (it ends on a stop or a broken link).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// The device's handle for the built-in network: the worker's own handle, plus the stack,
/// which it stops and joins when the machine shuts down (libslirp then closes its sockets and
/// port forwards), instead of leaving it to run detached until the process exits.
pub struct UserNetHandle {
    inner: Box<dyn DeviceHandle>,
    stack: Option<UserNet>,
}

impl UserNetHandle {
    pub fn new(inner: Box<dyn DeviceHandle>, stack: UserNet) -> Self {
        UserNetHandle {
            inner,
            stack: Some(stack),
        }
    }
}

impl DeviceHandle for UserNetHandle {
    fn pause(&mut self) {
        self.inner.pause();
    }

    fn resume(&mut self) {
        self.inner.resume();
    }

    /// The device's thread goes quiet; the stack (the host side's NAT, DHCP server and port
    /// forwards) keeps running, as a home router does when a PC behind it resets: the
    /// guest's old connections time out there.
    fn reset(&mut self) {
        self.inner.reset();
    }

    fn shutdown(&mut self) {
        self.inner.shutdown();
        self.stack.take();
    }
}

impl Drop for UserNet {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            log::debug!("virtio-net user: the stack stopped");
        }
    }
}

/// libslirp's version string, e.g. "4.7.0".
pub fn version() -> String {
    // SAFETY: slirp_version_string returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(ffi::slirp_version_string()) }
        .to_string_lossy()
        .into_owned()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: pipe succeeded, so both are fresh descriptors that nothing else owns.
    let fds = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&fds.0, &fds.1] {
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(fds)
}

/// A libslirp timer: either a callback (`timer_new`) or an id for `slirp_handle_timer`.
struct Timer {
    callback: Option<ffi::SlirpTimerCb>,
    id: ffi::SlirpTimerId,
    cb_opaque: *mut c_void,
    /// Milliseconds on [`Context::clock_ms`]'s clock.
    expires: Option<i64>,
}

/// What the callbacks reach through libslirp's opaque pointer. Lives in a `Box` that outlives
/// the `Slirp`; touched only on the stack thread.
struct Context {
    /// Our end of the frame link to the device.
    link: DgramSocket,
    /// The poll set of the current pass: [link, stop, libslirp's...].
    pollfds: Vec<libc::pollfd>,
    /// Every live timer (boxed: libslirp holds their addresses).
    timers: Vec<*mut Timer>,
    epoch: Instant,
    guest_mac: MacAddr,
    lease: Arc<GuestLease>,
    slirp: *mut ffi::Slirp,
}

impl Context {
    fn clock_ns(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }

    fn clock_ms(&self) -> i64 {
        self.clock_ns() / 1_000_000
    }
}

struct Stack {
    /// Owns the context; raw so that callbacks may form short-lived references to it
    /// while no other reference exists (see the SAFETY notes).
    ctx: *mut Context,
    stop: OwnedFd,
}

// SAFETY: the stack is moved to its thread before use and never shared; the raw pointers
// it holds (the context, the Slirp, timers) are used only on that thread.
unsafe impl Send for Stack {}

const LINK: usize = 0;
const STOP: usize = 1;

impl Stack {
    fn new(
        options: &UserNetOptions,
        link: DgramSocket,
        stop: OwnedFd,
        guest_mac: MacAddr,
        lease: Arc<GuestLease>,
    ) -> Result<Stack, SlirpError> {
        let ctx = Box::into_raw(Box::new(Context {
            link,
            pollfds: Vec::new(),
            timers: Vec::new(),
            epoch: Instant::now(),
            guest_mac,
            lease,
            slirp: std::ptr::null_mut(),
        }));
        let stack = Stack { ctx, stop };
        let config = slirp_config(options);
        // SAFETY: `config` and `CALLBACKS` are live for the call (libslirp copies what it
        // keeps; CALLBACKS is static); `ctx` stays valid until `Stack::drop` has cleaned
        // the Slirp up.
        let slirp = unsafe { ffi::slirp_new(&config, &CALLBACKS, ctx.cast()) };
        if slirp.is_null() {
            return Err(SlirpError::New);
        }
        // SAFETY: no callback runs outside a libslirp call, so this is the only reference.
        unsafe { (*ctx).slirp = slirp };
        for fwd in &options.hostfwd {
            let guest = fwd.guest_addr.unwrap_or(DHCP_START);
            // SAFETY: a live Slirp; the addresses are plain values in network byte order.
            let rc = unsafe {
                ffi::slirp_add_hostfwd(
                    slirp,
                    c_int::from(fwd.udp),
                    in_addr(*fwd.host.ip()),
                    c_int::from(fwd.host.port()),
                    in_addr(guest),
                    c_int::from(fwd.guest_port),
                )
            };
            if rc != 0 {
                return Err(SlirpError::HostFwd {
                    proto: if fwd.udp { "udp" } else { "tcp" },
                    host: fwd.host,
                });
            }
            log::info!(
                "virtio-net user: forwarding {} {} to guest {guest}:{}",
                if fwd.udp { "udp" } else { "tcp" },
                fwd.host,
                fwd.guest_port
            );
        }
        Ok(stack)
    }

    fn slirp(&self) -> *mut ffi::Slirp {
        // SAFETY: read of a field while no callback runs (we are not inside libslirp).
        unsafe { (*self.ctx).slirp }
    }

    fn run(self) {
        let mut frame = vec![0u8; MAX_GUEST_FRAME];
        loop {
            let mut timeout: u32 = u32::MAX;
            {
                // SAFETY: no libslirp call is in progress, so no callback holds the context.
                let ctx = unsafe { &mut *self.ctx };
                ctx.pollfds.clear();
                for fd in [ctx.link.as_raw_fd(), self.stop.as_raw_fd()] {
                    ctx.pollfds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            // SAFETY: a live Slirp; add_poll receives our context, valid for the call.
            unsafe {
                ffi::slirp_pollfds_fill(self.slirp(), &mut timeout, add_poll, self.ctx.cast())
            };
            let wait_ms = {
                // SAFETY: as above; the fill call has returned.
                let ctx = unsafe { &mut *self.ctx };
                let now = ctx.clock_ms();
                let next_timer = ctx
                    .timers
                    .iter()
                    // SAFETY: every pointer in `timers` is a live Box until timer_free.
                    .filter_map(|&t| unsafe { (*t).expires })
                    .min()
                    .map(|at| (at - now).max(0));
                let slirp_ms = (timeout != u32::MAX).then_some(i64::from(timeout));
                match (next_timer, slirp_ms) {
                    (None, None) => -1,
                    (a, b) => a
                        .into_iter()
                        .chain(b)
                        .min()
                        .unwrap_or(0)
                        .min(i64::from(i32::MAX)) as c_int,
                }
            };
            let rc = {
                // SAFETY: as above.
                let ctx = unsafe { &mut *self.ctx };
                // SAFETY: `pollfds` is a live array of the length passed.
                unsafe {
                    libc::poll(
                        ctx.pollfds.as_mut_ptr(),
                        ctx.pollfds.len() as libc::nfds_t,
                        wait_ms,
                    )
                }
            };
            let poll_error =
                rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted;
            // SAFETY: a live Slirp; get_revents reads the pollfds this pass filled.
            unsafe {
                ffi::slirp_pollfds_poll(
                    self.slirp(),
                    c_int::from(poll_error),
                    get_revents,
                    self.ctx.cast(),
                )
            };
            let (link_ready, stop) = {
                // SAFETY: as above.
                let ctx = unsafe { &*self.ctx };
                let revents = |i: usize| if rc > 0 { ctx.pollfds[i].revents } else { 0 };
                (revents(LINK) != 0, revents(STOP) != 0)
            };
            if stop {
                return;
            }
            if link_ready && !self.take_guest_frames(&mut frame) {
                return;
            }
            self.fire_timers();
        }
    }

    /// Feeds the guest's frames to the stack; false when the device end is gone.
    fn take_guest_frames(&self, frame: &mut [u8]) -> bool {
        for _ in 0..FRAMES_PER_PASS {
            let got = {
                // SAFETY: no libslirp call is in progress.
                let ctx = unsafe { &*self.ctx };
                ctx.link.socket().recv(frame)
            };
            match got {
                // Zero bytes is a (pointless) empty datagram, not an end: datagram sockets
                // have none. An empty frame is ignored.
                Ok(0) => {}
                // SAFETY: a live Slirp; `frame[..n]` was just filled. libslirp parses the
                // frame defensively (it is the guest's); it may call send_packet meanwhile.
                Ok(n) => unsafe { ffi::slirp_input(self.slirp(), frame.as_ptr(), n as c_int) },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("virtio-net user: frame link: {e}");
                    return false;
                }
            }
        }
        true
    }

    fn fire_timers(&self) {
        loop {
            let due = {
                // SAFETY: no libslirp call is in progress.
                let ctx = unsafe { &*self.ctx };
                let now = ctx.clock_ms();
                ctx.timers
                    .iter()
                    .copied()
                    // SAFETY: every pointer in `timers` is live until timer_free.
                    .find(|&t| unsafe { (*t).expires.is_some_and(|at| at <= now) })
            };
            let Some(timer) = due else { return };
            // SAFETY: `timer` is live; disarm it before the callback, which may re-arm it or
            // free it (so it is not touched afterwards).
            unsafe {
                (*timer).expires = None;
                let (callback, id, cb_opaque) =
                    ((*timer).callback, (*timer).id, (*timer).cb_opaque);
                match callback {
                    Some(cb) => cb(cb_opaque),
                    None => ffi::slirp_handle_timer(self.slirp(), id, cb_opaque),
                }
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let slirp = self.slirp();
        if !slirp.is_null() {
            // SAFETY: a live Slirp, cleaned up once; it may free its timers through the
            // callbacks, which still find the context.
            unsafe { ffi::slirp_cleanup(slirp) };
        }
        // SAFETY: the context came from Box::into_raw in `new` and libslirp is gone, so no
        // callback can reach it any more; the timers left are ours to free.
        unsafe {
            let ctx = Box::from_raw(self.ctx);
            for timer in &ctx.timers {
                drop(Box::from_raw(*timer));
            }
        }
    }
}

fn in_addr(addr: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from(addr).to_be(),
    }
}

fn slirp_config(options: &UserNetOptions) -> ffi::SlirpConfig {
    // SAFETY: in6_addr is plain bytes; all zero is ::.
    let zero6: libc::in6_addr = unsafe { std::mem::zeroed() };
    ffi::SlirpConfig {
        // 3: the first with disable_dns; libslirp 4.5 and later read it.
        version: 3,
        restricted: c_int::from(options.restrict),
        in_enabled: true,
        vnetwork: in_addr(NETWORK),
        vnetmask: in_addr(NETMASK),
        vhost: in_addr(GATEWAY),
        in6_enabled: false,
        vprefix_addr6: zero6,
        vprefix_len: 0,
        vhost6: zero6,
        vhostname: std::ptr::null(),
        tftp_server_name: std::ptr::null(),
        tftp_path: std::ptr::null(),
        bootfile: std::ptr::null(),
        vdhcp_start: in_addr(DHCP_START),
        vnameserver: in_addr(NAMESERVER),
        vnameserver6: zero6,
        vdnssearch: std::ptr::null_mut(),
        vdomainname: std::ptr::null(),
        // 0: libslirp's defaults (1500).
        if_mtu: 0,
        if_mru: 0,
        disable_host_loopback: false,
        // The protocol-rewriting "emulation" (FTP, IRC...) is unsafe by libslirp's own word.
        enable_emu: false,
        outbound_addr: std::ptr::null_mut(),
        outbound_addr6: std::ptr::null_mut(),
        disable_dns: options.no_dns,
        disable_dhcp: false,
    }
}

static CALLBACKS: ffi::SlirpCb = ffi::SlirpCb {
    send_packet,
    guest_error,
    clock_get_ns,
    timer_new,
    timer_free,
    timer_mod,
    register_poll_fd,
    unregister_poll_fd,
    notify,
    init_completed: None,
    timer_new_opaque: Some(timer_new_opaque),
};

/// The context behind libslirp's opaque pointer.
///
/// # Safety
/// `opaque` must be the pointer given to slirp_new, and the caller must be inside a libslirp
/// call on the stack thread (so the stack holds no reference to the context meanwhile).
unsafe fn context<'a>(opaque: *mut c_void) -> &'a mut Context {
    // SAFETY: per the function's contract.
    unsafe { &mut *opaque.cast::<Context>() }
}

/// A frame from the stack to the guest.
unsafe extern "C" fn send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    // SAFETY: libslirp passes our opaque pointer and a frame of `len` readable bytes.
    let (ctx, frame) = unsafe {
        (
            context(opaque),
            std::slice::from_raw_parts(buf.cast::<u8>(), len),
        )
    };
    ctx.lease.observe(frame, ctx.guest_mac, "virtio-net user");
    match ctx.link.socket().send(frame) {
        Ok(n) => n as isize,
        // The device is not keeping up: drop, as libslirp allows (TCP resends).
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => len as isize,
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => len as isize,
        Err(_) => -1,
    }
}

unsafe extern "C" fn guest_error(msg: *const c_char, _opaque: *mut c_void) {
    // SAFETY: libslirp passes a NUL-terminated message.
    let msg = unsafe { CStr::from_ptr(msg) };
    log::debug!("virtio-net user: guest error: {}", msg.to_string_lossy());
}

unsafe extern "C" fn clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: called by libslirp with our opaque pointer.
    unsafe { context(opaque) }.clock_ns()
}

fn new_timer(
    ctx: &mut Context,
    callback: Option<ffi::SlirpTimerCb>,
    id: ffi::SlirpTimerId,
    cb_opaque: *mut c_void,
) -> *mut c_void {
    let timer = Box::into_raw(Box::new(Timer {
        callback,
        id,
        cb_opaque,
        expires: None,
    }));
    ctx.timers.push(timer);
    timer.cast()
}

unsafe extern "C" fn timer_new(
    cb: ffi::SlirpTimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    // SAFETY: called by libslirp with our opaque pointer.
    new_timer(unsafe { context(opaque) }, Some(cb), 0, cb_opaque)
}

unsafe extern "C" fn timer_new_opaque(
    id: ffi::SlirpTimerId,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    // SAFETY: called by libslirp with our opaque pointer.
    new_timer(unsafe { context(opaque) }, None, id, cb_opaque)
}

unsafe extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    // SAFETY: called by libslirp with our opaque pointer.
    let ctx = unsafe { context(opaque) };
    let timer = timer.cast::<Timer>();
    if let Some(at) = ctx.timers.iter().position(|&t| t == timer) {
        ctx.timers.swap_remove(at);
        // SAFETY: the pointer came from Box::into_raw in new_timer and is freed only here.
        drop(unsafe { Box::from_raw(timer) });
    }
}

unsafe extern "C" fn timer_mod(timer: *mut c_void, expire_time_ms: i64, opaque: *mut c_void) {
    // SAFETY: called by libslirp with our opaque pointer.
    let ctx = unsafe { context(opaque) };
    let timer = timer.cast::<Timer>();
    if ctx.timers.contains(&timer) {
        // SAFETY: a live timer of ours (checked above).
        unsafe { (*timer).expires = Some(expire_time_ms) };
    }
}

/// The poll set is rebuilt on every pass, so libslirp's registrations need no bookkeeping.
unsafe extern "C" fn register_poll_fd(_fd: c_int, _opaque: *mut c_void) {}
unsafe extern "C" fn unregister_poll_fd(_fd: c_int, _opaque: *mut c_void) {}
/// libslirp runs only on the stack thread, which looks again after every call: no kick needed.
unsafe extern "C" fn notify(_opaque: *mut c_void) {}

unsafe extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: called by slirp_pollfds_fill with the context we passed it.
    let ctx = unsafe { context(opaque) };
    let mut poll_events = 0;
    if events & ffi::SLIRP_POLL_IN != 0 {
        poll_events |= libc::POLLIN;
    }
    if events & ffi::SLIRP_POLL_OUT != 0 {
        poll_events |= libc::POLLOUT;
    }
    if events & ffi::SLIRP_POLL_PRI != 0 {
        poll_events |= libc::POLLPRI;
    }
    ctx.pollfds.push(libc::pollfd {
        fd,
        events: poll_events,
        revents: 0,
    });
    (ctx.pollfds.len() - 1) as c_int
}

unsafe extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: called by slirp_pollfds_poll with the context we passed it.
    let ctx = unsafe { context(opaque) };
    let Some(pollfd) = usize::try_from(idx).ok().and_then(|i| ctx.pollfds.get(i)) else {
        return 0;
    };
    let r = pollfd.revents;
    let mut events = 0;
    if r & libc::POLLIN != 0 {
        events |= ffi::SLIRP_POLL_IN;
    }
    if r & libc::POLLOUT != 0 {
        events |= ffi::SLIRP_POLL_OUT;
    }
    if r & libc::POLLPRI != 0 {
        events |= ffi::SLIRP_POLL_PRI;
    }
    if r & libc::POLLERR != 0 {
        events |= ffi::SLIRP_POLL_ERR;
    }
    if r & libc::POLLHUP != 0 {
        events |= ffi::SLIRP_POLL_HUP;
    }
    events
}

#[cfg(test)]
mod tests;
