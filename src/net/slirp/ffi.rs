//! Declarations of the libslirp 4.x C API that [`super`] uses, written from `libslirp.h`
//! (Debian `libslirp-dev` 4.7.0; Homebrew `libslirp`). Our own rather than `libslirp-sys`:
//! that crate runs pkg-config unconditionally in its build script (which fails when
//! type-checking for macOS from Linux) and stops at the 4.2 API (no `disable_dns`).
//! `build.rs` links `-lslirp`.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, in6_addr, in_addr, size_t, sockaddr_in, sockaddr_in6, ssize_t};

/// The opaque stack.
#[repr(C)]
pub struct Slirp {
    _private: [u8; 0],
}

pub const SLIRP_POLL_IN: c_int = 1 << 0;
pub const SLIRP_POLL_OUT: c_int = 1 << 1;
pub const SLIRP_POLL_PRI: c_int = 1 << 2;
pub const SLIRP_POLL_ERR: c_int = 1 << 3;
pub const SLIRP_POLL_HUP: c_int = 1 << 4;

pub type SlirpWriteCb =
    unsafe extern "C" fn(buf: *const c_void, len: size_t, opaque: *mut c_void) -> ssize_t;
pub type SlirpTimerCb = unsafe extern "C" fn(opaque: *mut c_void);
pub type SlirpAddPollCb =
    unsafe extern "C" fn(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int;
pub type SlirpGetREventsCb = unsafe extern "C" fn(idx: c_int, opaque: *mut c_void) -> c_int;
/// `SlirpTimerId` (a C enum: an int).
pub type SlirpTimerId = c_int;

/// `SlirpCb`: every field the application must fill. `timer_new_opaque` (config version 4)
/// lets the stack name its timers; we still give `timer_new` for older libraries.
#[repr(C)]
pub struct SlirpCb {
    pub send_packet: SlirpWriteCb,
    pub guest_error: unsafe extern "C" fn(msg: *const c_char, opaque: *mut c_void),
    pub clock_get_ns: unsafe extern "C" fn(opaque: *mut c_void) -> i64,
    pub timer_new: unsafe extern "C" fn(
        cb: SlirpTimerCb,
        cb_opaque: *mut c_void,
        opaque: *mut c_void,
    ) -> *mut c_void,
    pub timer_free: unsafe extern "C" fn(timer: *mut c_void, opaque: *mut c_void),
    pub timer_mod:
        unsafe extern "C" fn(timer: *mut c_void, expire_time_ms: i64, opaque: *mut c_void),
    pub register_poll_fd: unsafe extern "C" fn(fd: c_int, opaque: *mut c_void),
    pub unregister_poll_fd: unsafe extern "C" fn(fd: c_int, opaque: *mut c_void),
    pub notify: unsafe extern "C" fn(opaque: *mut c_void),
    pub init_completed: Option<unsafe extern "C" fn(slirp: *mut Slirp, opaque: *mut c_void)>,
    pub timer_new_opaque: Option<
        unsafe extern "C" fn(
            id: SlirpTimerId,
            cb_opaque: *mut c_void,
            opaque: *mut c_void,
        ) -> *mut c_void,
    >,
}

/// `SlirpConfig` up to version 4 (libslirp 4.7). Older libraries read only the fields of
/// the version we announce, so `version` must stay the lowest that has what we use.
#[repr(C)]
pub struct SlirpConfig {
    pub version: u32,
    pub restricted: c_int,
    pub in_enabled: bool,
    pub vnetwork: in_addr,
    pub vnetmask: in_addr,
    pub vhost: in_addr,
    pub in6_enabled: bool,
    pub vprefix_addr6: in6_addr,
    pub vprefix_len: u8,
    pub vhost6: in6_addr,
    pub vhostname: *const c_char,
    pub tftp_server_name: *const c_char,
    pub tftp_path: *const c_char,
    pub bootfile: *const c_char,
    pub vdhcp_start: in_addr,
    pub vnameserver: in_addr,
    pub vnameserver6: in6_addr,
    pub vdnssearch: *mut *const c_char,
    pub vdomainname: *const c_char,
    pub if_mtu: size_t,
    pub if_mru: size_t,
    pub disable_host_loopback: bool,
    pub enable_emu: bool,
    // version 2
    pub outbound_addr: *mut sockaddr_in,
    pub outbound_addr6: *mut sockaddr_in6,
    // version 3
    pub disable_dns: bool,
    // version 4
    pub disable_dhcp: bool,
}

extern "C" {
    pub fn slirp_new(
        cfg: *const SlirpConfig,
        callbacks: *const SlirpCb,
        opaque: *mut c_void,
    ) -> *mut Slirp;
    pub fn slirp_cleanup(slirp: *mut Slirp);
    pub fn slirp_pollfds_fill(
        slirp: *mut Slirp,
        timeout: *mut u32,
        add_poll: SlirpAddPollCb,
        opaque: *mut c_void,
    );
    pub fn slirp_pollfds_poll(
        slirp: *mut Slirp,
        select_error: c_int,
        get_revents: SlirpGetREventsCb,
        opaque: *mut c_void,
    );
    pub fn slirp_input(slirp: *mut Slirp, pkt: *const u8, pkt_len: c_int);
    pub fn slirp_handle_timer(slirp: *mut Slirp, id: SlirpTimerId, cb_opaque: *mut c_void);
    pub fn slirp_add_hostfwd(
        slirp: *mut Slirp,
        is_udp: c_int,
        host_addr: in_addr,
        host_port: c_int,
        guest_addr: in_addr,
        guest_port: c_int,
    ) -> c_int;
    pub fn slirp_version_string() -> *const c_char;
}
