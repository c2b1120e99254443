//! virtio-tap: the test guest's minimal virtio-net driver (`test/guests/net.c`) exchanges one
//! Ethernet frame each way with this test over a tap interface the test creates, with
//! interrupts off (completion interrupts read back from the virtio ISR, MSI-X PBA and LAPIC
//! IRR; the `ring3` variants take the receive interrupt in ring 3 of long mode). Traffic stays
//! on that tap: raw Ethernet frames of the local experimental type
//! 0x88B5, no IP addresses. Creating a tap needs root; without it the exchange tests skip,
//! or fail under `XHYVE_REQUIRE_KVM=1`.

// Linux tap and packet sockets: nothing here builds for macOS.
#![cfg(target_os = "linux")]

#[macro_use]
mod common;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Instant;

use common::{run_xhyve, Vm};
use xhyve::net::{derive_mac, MacAddr};

const UUID: &str = "6a1c7e4e-3b0f-4c55-9d7a-0b1e2f3a4b5c";
const ETHERTYPE: u16 = 0x88B5;
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xFE];

fn uuid_bytes() -> [u8; 16] {
    let hex: String = UUID.chars().filter(|c| *c != '-').collect();
    std::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
}

fn require_or_skip(why: &str) -> Option<TapGuard> {
    if std::env::var_os("XHYVE_REQUIRE_KVM").is_some_and(|v| v == "1") {
        panic!("XHYVE_REQUIRE_KVM=1 but the tap test cannot run: {why}");
    }
    eprintln!("note: skipping virtio-tap test: {why}");
    None
}

fn ip(args: &[&str]) -> io::Result<bool> {
    Ok(Command::new("ip").args(args).status()?.success())
}

/// A persistent tap interface, deleted when dropped.
struct TapGuard(String);

impl TapGuard {
    fn create(tag: &str) -> Option<TapGuard> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return require_or_skip("not root (creating a tap needs CAP_NET_ADMIN)");
        }
        let name = format!("xht{}{tag}", std::process::id() % 1_000_000);
        match ip(&["tuntap", "add", "dev", &name, "mode", "tap"]) {
            Ok(true) => {}
            Ok(false) => return require_or_skip("`ip tuntap add` failed"),
            Err(e) => return require_or_skip(&format!("cannot run `ip`: {e}")),
        }
        let tap = TapGuard(name);
        // No IPv6 chatter (router solicitations) on the test's tap.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.0),
            "1",
        );
        assert!(
            ip(&["link", "set", "dev", &tap.0, "up"]).unwrap(),
            "ip link set up"
        );
        Some(tap)
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", "dev", &self.0]);
    }
}

/// An AF_PACKET socket bound to one interface: every frame on it, both directions.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn open(ifname: &str) -> io::Result<PacketSocket> {
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(all),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let sock = PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a live sockaddr_ll and its size is passed with it.
        let rc = unsafe {
            libc::bind(
                sock.0.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a live timeval and its size is passed with it.
        unsafe {
            libc::setsockopt(
                sock.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(sock)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is readable for its length.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Waits for the guest's frame (from `guest_mac`, our ethertype) and answers it.
fn answer_the_guest(sock: &PacketSocket, guest_mac: MacAddr, vm: &mut common::Running) {
    let deadline = Instant::now() + common::GUEST_TIMEOUT;
    let mut buf = [0u8; 2048];
    loop {
        assert!(
            Instant::now() < deadline,
            "no frame from the guest\n{}",
            vm.stdout_so_far()
        );
        if vm.has_exited() {
            break; // the guest failed early; its output says why
        }
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => panic!("packet socket: {e}"),
        };
        let frame = &buf[..n];
        if n < 14 || frame[6..12] != guest_mac.0 || frame[12..14] != ETHERTYPE.to_be_bytes() {
            continue;
        }
        assert_eq!(&frame[..6], &[0xFF; 6], "broadcast");
        assert!(
            frame[14..].starts_with(b"xhyve-net guest"),
            "payload {:?}",
            &frame[14..]
        );
        let mut reply = Vec::new();
        reply.extend_from_slice(&guest_mac.0);
        reply.extend_from_slice(&HOST_MAC);
        reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
        reply.extend_from_slice(b"xhyve-net host");
        reply.resize(60, 0);
        sock.send(&reply).expect("send the reply on the tap");
        break;
    }
}

fn exchange(mode: common::IrqChip, driver: &str, tag: &str, mac_option: Option<&str>) {
    exchange_with(mode, driver, tag, mac_option, false);
}

/// `ring3`: the guest takes the receive interrupt while it waits in ring 3 of long mode with
/// interrupts on (test/guests/ring3.h) instead of reading it back from the controllers.
fn exchange_with(
    mode: common::IrqChip,
    driver: &str,
    tag: &str,
    mac_option: Option<&str>,
    ring3: bool,
) {
    // Both irqchip variants of a test run at once: each needs its own tap.
    let mode_tag = match mode {
        common::IrqChip::Kernel => "k",
        common::IrqChip::User => "u",
    };
    let Some(tap) = TapGuard::create(&format!("{tag}{mode_tag}")) else {
        return;
    };
    let sock = PacketSocket::open(&tap.0).expect("packet socket on the tap");
    let mut device = format!("3,virtio-tap,{}", tap.0);
    let guest_mac = match mac_option {
        Some(mac) => {
            device.push_str(&format!(",mac={mac}"));
            mac.parse().unwrap()
        }
        None => derive_mac(Some(uuid_bytes()), 0, 3, 0),
    };
    let cmdline = if ring3 {
        format!("virtio-net {driver} ring3")
    } else {
        format!("virtio-net {driver}")
    };
    let mut vm = Vm::multiboot(&cmdline)
        .pci(&["0:0,hostbridge", &device, "31,lpc"])
        .args(["-U", UUID])
        .irqchip(mode)
        .spawn();
    answer_the_guest(&sock, guest_mac, &mut vm);
    let out = vm.finish();
    out.assert_exit(1)
        .assert_line(&format!("virtio-net mac {guest_mac}"))
        .assert_line("virtio-net link up")
        .assert_line("virtio-net sent")
        .assert_line("virtio-net got xhyve-net host")
        .assert_line("virtio-net ok");
    if driver == "intx" {
        out.assert_line("virtio-net intx irq pending")
            .assert_line("virtio-net tx isr 01")
            .assert_line("virtio-net rx isr 01");
    } else {
        out.assert_line("virtio-net tx msix pending while masked")
            .assert_line("virtio-net tx msix irq pending");
        if !ring3 {
            out.assert_line("virtio-net rx msix irq pending");
        }
    }
    if ring3 {
        let runs: u32 = out
            .lines()
            .find_map(|l| {
                l.strip_prefix("virtio-net ring3 rx handler runs ")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no rx handler runs line\n{out}"));
        // MSI-X: exactly one. INTx: the handler masks the level pin before its EOI; KVM's
        // in-kernel IOAPIC on this host may deliver once more before that.
        let expected = if driver == "msix" { 1..=1 } else { 1..=2 };
        assert!(expected.contains(&runs), "{out}");
    }
}

guest_test!(virtio_tap_legacy_interface_with_intx, |mode| {
    exchange(mode, "intx", "i", None);
});

guest_test!(
    virtio_tap_modern_interface_with_msix_and_mac_option,
    |mode| {
        exchange(mode, "msix", "m", Some("02:00:00:aa:bb:cc"));
    }
);

guest_test!(
    virtio_tap_intx_receive_interrupt_is_taken_in_ring3,
    |mode| {
        exchange_with(mode, "intx", "ri", None, true);
    }
);

guest_test!(
    virtio_tap_msix_receive_interrupt_is_taken_in_ring3,
    |mode| {
        exchange_with(mode, "msix", "rm", None, true);
    }
);

#[test]
fn print_mac_shows_the_derived_mac_and_exits_0() {
    let out = run_xhyve([
        "-M",
        "-U",
        UUID,
        "-s",
        "0:0,hostbridge",
        "-s",
        "5,virtio-tap,tap9",
        "-f",
        "kexec,/nonexistent",
    ]);
    out.assert_exit(0)
        .assert_line(&format!("MAC: {}", derive_mac(Some(uuid_bytes()), 0, 5, 0)));
    let out = run_xhyve([
        "-M",
        "-s",
        "5,virtio-tap,tap9,mac=02:12:34:56:78:9a",
        "-f",
        "kexec,/nonexistent",
    ]);
    out.assert_exit(0).assert_line("MAC: 02:12:34:56:78:9a");
}

#[test]
fn a_tap_that_cannot_be_opened_is_a_clear_setup_error() {
    if !common::kvm_usable() {
        return;
    }
    // `lo` exists and is no tap: TUNSETIFF refuses it, root or not.
    let out = Vm::multiboot("poweroff")
        .pci(&["0:0,hostbridge", "3,virtio-tap,lo", "31,lpc"])
        .run();
    out.assert_exit(1);
    assert!(out.stderr.contains("cannot attach tap \"lo\""), "{out}");
    assert!(!out.stdout.contains("exit poweroff"), "{out}");
}
