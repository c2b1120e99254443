//! The muxer against real Unix sockets in a temporary directory, with the guest side played
//! by packets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vmm_sys_util::tempdir::TempDir;

use super::*;

const CID: u64 = 3;

fn muxer(forwards: Vec<u32>) -> (TempDir, Muxer) {
    let tmp = TempDir::new_with_prefix("/tmp/xv-").unwrap();
    let m = Muxer::new(VsockConfig {
        guest_cid: CID,
        dir: tmp.as_path().into(),
        guest_forwards: forwards,
    })
    .unwrap();
    (tmp, m)
}

fn guest(
    op: u16,
    src_port: u32,
    dst_port: u32,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: &[u8],
) -> Vec<u8> {
    let mut p = Vec::new();
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: data.len() as u32,
        ty: TYPE_STREAM,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    }
    .write(&mut p);
    p.extend_from_slice(data);
    p
}

/// Polls until the muxer has a packet for the guest (or fails after 5 s).
fn rx(m: &mut Muxer) -> (Header, Vec<u8>) {
    let start = Instant::now();
    loop {
        if let Some(p) = m.next_rx() {
            let (h, d) = Header::parse_packet(&p).unwrap();
            return (h, d.to_vec());
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no packet for the guest"
        );
        m.poll_host();
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn guest_connects_to_a_host_service_and_data_flows_both_ways() {
    let (tmp, mut m) = muxer(vec![]);
    let svc = UnixListener::bind(tmp.as_path().join("00000002.00000400")).unwrap();
    m.handle_guest(&guest(op::REQUEST, 5000, 0x400, 0, 4096, 0, &[]))
        .unwrap();
    let (h, _) = rx(&mut m);
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.dst_cid, h.buf_alloc),
        (op::RESPONSE, 0x400, 5000, CID, BUF_ALLOC)
    );
    let (mut host, _) = svc.accept().unwrap();
    m.handle_guest(&guest(op::RW, 5000, 0x400, 0, 4096, 0, b"ping"))
        .unwrap();
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    // Host -> guest, limited by the guest's 4096-byte credit.
    host.write_all(&[7u8; 10000]).unwrap();
    let mut got = 0;
    while got < 4096 {
        let (h, d) = rx(&mut m);
        assert_eq!(h.op, op::RW);
        got += d.len();
    }
    assert_eq!(got, 4096);
    m.poll_host();
    assert!(!m.has_rx(), "sent past the guest's credit");
    // The guest consumed it all: more flows.
    m.handle_guest(&guest(op::CREDIT_UPDATE, 5000, 0x400, 0, 4096, 4096, &[]))
        .unwrap();
    let (h, d) = rx(&mut m);
    assert_eq!(h.op, op::RW);
    assert!(!d.is_empty() && d.len() <= 4096);
    // Host closes: the guest hears SHUTDOWN, answers RST, the connection goes.
    drop(host);
    let mut seen = d.len();
    m.handle_guest(&guest(
        op::CREDIT_UPDATE,
        5000,
        0x400,
        0,
        4096,
        4096 + seen as u32,
        &[],
    ))
    .unwrap();
    loop {
        let (h, d) = rx(&mut m);
        if h.op == op::SHUTDOWN {
            break;
        }
        seen += d.len();
        assert_eq!(h.op, op::RW);
        m.handle_guest(&guest(
            op::CREDIT_UPDATE,
            5000,
            0x400,
            0,
            4096,
            4096 + seen as u32,
            &[],
        ))
        .unwrap();
    }
    assert_eq!(seen, 10000 - 4096);
    m.handle_guest(&guest(op::RST, 5000, 0x400, 0, 0, 0, &[]))
        .unwrap();
    assert_eq!(m.connections(), 0);
}

#[test]
fn unknown_ports_and_connections_get_rst() {
    let (_tmp, mut m) = muxer(vec![]);
    m.handle_guest(&guest(op::REQUEST, 5000, 0x999, 0, 4096, 0, &[]))
        .unwrap();
    let (h, _) = rx(&mut m);
    assert_eq!((h.op, h.dst_port), (op::RST, 5000));
    m.handle_guest(&guest(op::RW, 5001, 0x999, 0, 4096, 0, b"x"))
        .unwrap();
    assert_eq!(rx(&mut m).0.op, op::RST);
    // Wrong source CID: RST, addressed back to the sender.
    let mut p = guest(op::REQUEST, 1, 2, 0, 0, 0, &[]);
    p[0] = 9;
    m.handle_guest(&p).unwrap();
    let (h, _) = rx(&mut m);
    assert_eq!((h.op, h.dst_cid), (op::RST, 9));
    // An RST to nothing is not answered.
    m.handle_guest(&guest(op::RST, 5, 6, 0, 0, 0, &[])).unwrap();
    m.poll_host();
    assert!(!m.has_rx());
    assert!(m.handle_guest(&[0u8; 10]).is_err());
    assert_eq!(m.connections(), 0);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let (tmp, mut m) = muxer(vec![]);
    let _svc = UnixListener::bind(tmp.as_path().join("00000002.00000010")).unwrap();
    m.handle_guest(&guest(op::REQUEST, 7, 0x10, 0, 4096, 0, &[]))
        .unwrap();
    assert_eq!(rx(&mut m).0.op, op::RESPONSE);
    // Nobody reads the host socket: its buffer fills, then ours, then the guest overruns.
    let chunk = vec![1u8; 60000];
    let mut reset = false;
    for _ in 0..200 {
        m.handle_guest(&guest(op::RW, 7, 0x10, 0, 4096, 0, &chunk))
            .unwrap();
        if let Some(p) = m.next_rx() {
            let h = Header::parse(&p).unwrap();
            if h.op == op::RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset);
    assert_eq!(m.connections(), 0);
}

#[test]
fn host_connects_to_forwarded_guest_ports_and_through_connect() {
    let (tmp, mut m) = muxer(vec![0x8080]);
    let dir = tmp.as_path();
    assert_eq!(
        std::fs::read_link(dir.join("guest.00008080"))
            .unwrap()
            .to_str(),
        Some("00000003.00008080")
    );
    // Through the forwarded socket (by its symlink, as clients use it).
    let mut host = UnixStream::connect(dir.join("guest.00008080")).unwrap();
    let (h, _) = rx(&mut m);
    assert_eq!((h.op, h.dst_port, h.dst_cid), (op::REQUEST, 0x8080, CID));
    let hp = h.src_port;
    m.handle_guest(&guest(op::RESPONSE, 0x8080, hp, 0, 65536, 0, &[]))
        .unwrap();
    host.write_all(b"hello guest").unwrap();
    let (h, d) = rx(&mut m);
    assert_eq!((h.op, d.as_slice()), (op::RW, &b"hello guest"[..]));
    m.handle_guest(&guest(op::RW, 0x8080, hp, 0, 65536, 11, b"hello host"))
        .unwrap();
    let mut b = [0u8; 10];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello host");
    // Through `connect` with an explicit address line.
    let mut c = UnixStream::connect(dir.join("connect")).unwrap();
    c.write_all(format!("{}\n", socket_name(CID, 22)).as_bytes())
        .unwrap();
    let (h, _) = rx(&mut m);
    assert_eq!((h.op, h.dst_port), (op::REQUEST, 22));
    assert_ne!(h.src_port, hp);
    // The guest refuses: the host stream is closed.
    m.handle_guest(&guest(op::RST, 22, h.src_port, 0, 0, 0, &[]))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap(), 0);
    // A line for another CID is dropped.
    let mut bad = UnixStream::connect(dir.join("connect")).unwrap();
    bad.write_all(format!("{}\n", socket_name(77, 22)).as_bytes())
        .unwrap();
    for _ in 0..20 {
        m.poll_host();
    }
    assert!(!m.has_rx());
    assert_eq!(m.connections(), 1);
}

#[test]
fn configuration_is_checked() {
    let tmp = TempDir::new_with_prefix("/tmp/xv-").unwrap();
    for cid in [0, 1, 2, u32::MAX as u64] {
        assert!(matches!(
            Muxer::new(VsockConfig {
                guest_cid: cid,
                dir: tmp.as_path().into(),
                guest_forwards: vec![]
            }),
            Err(VsockError::BadCid(_))
        ));
    }
    let long = tmp.as_path().join("x".repeat(100));
    assert!(matches!(
        Muxer::new(VsockConfig {
            guest_cid: 3,
            dir: long,
            guest_forwards: vec![]
        }),
        Err(VsockError::PathTooLong(_))
    ));
    assert_eq!(parse_connect_line(b"00000003.00000016\n"), Some((3, 22)));
    assert_eq!(parse_connect_line(b"3.22\n"), None);
    assert_eq!(parse_connect_line(b"00000003:00000016\n"), None);
}

#[test]
fn packets_are_split_to_fit_the_guest_buffers() {
    let (tmp, mut m) = muxer(vec![]);
    let svc = UnixListener::bind(tmp.as_path().join("00000002.00000001")).unwrap();
    m.handle_guest(&guest(op::REQUEST, 9, 1, 0, 1 << 20, 0, &[]))
        .unwrap();
    assert_eq!(rx(&mut m).0.op, op::RESPONSE);
    let (mut host, _) = svc.accept().unwrap();
    let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < data.len() && start.elapsed() < Duration::from_secs(5) {
        m.poll_host();
        while let Some(p) = m.next_rx_within(HEADER_LEN + 1000) {
            assert!(p.len() <= HEADER_LEN + 1000);
            let (h, d) = Header::parse_packet(&p).unwrap();
            assert_eq!((h.op, h.len as usize), (op::RW, d.len()));
            got.extend_from_slice(d);
        }
    }
    assert_eq!(got, data);
    // No room for even a header: nothing is taken.
    host.write_all(b"x").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    m.poll_host();
    assert!(m.next_rx_within(HEADER_LEN).is_none());
    assert!(m.next_rx_within(HEADER_LEN + 1).is_some());
}

#[test]
fn reset_closes_every_connection() {
    let (tmp, mut m) = muxer(vec![]);
    let svc = UnixListener::bind(tmp.as_path().join("00000002.00000009")).unwrap();
    m.handle_guest(&guest(op::REQUEST, 1, 9, 0, 4096, 0, &[]))
        .unwrap();
    let (mut host, _) = svc.accept().unwrap();
    assert_eq!(m.connections(), 1);
    m.reset();
    assert_eq!(m.connections(), 0);
    assert!(!m.has_rx());
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0, "the host peer sees EOF");
    // The same ports connect again after the reset.
    m.handle_guest(&guest(op::REQUEST, 1, 9, 0, 4096, 0, &[]))
        .unwrap();
    assert_eq!(rx(&mut m).0.op, op::RESPONSE);
}

/// The guest writes more than the host socket takes at once and closes (SHUTDOWN, both
/// directions) before the host has read it: everything still reaches the host, then EOF, and
/// only then does the guest get the RST that ends the connection. (A guest closing right after
/// its last write is what `vsock-echo listen` does in tests/linux_sharedfs.rs.)
#[test]
fn guest_close_delivers_pending_data_before_the_reset() {
    let (tmp, mut m) = muxer(vec![]);
    let svc = UnixListener::bind(tmp.as_path().join("00000002.00000400")).unwrap();
    m.handle_guest(&guest(op::REQUEST, 5000, 0x400, 0, 4096, 0, &[]))
        .unwrap();
    assert_eq!(rx(&mut m).0.op, op::RESPONSE);
    let (mut host, _) = svc.accept().unwrap();
    // Fill the host socket until data waits in the muxer (never more than our credit).
    let mut sent = Vec::new();
    let mut n = 0u32;
    while !m
        .poll_interest()
        .iter()
        .any(|&(_, ev)| ev & libc::POLLOUT != 0)
    {
        let chunk: Vec<u8> = (0..4096u32).map(|i| (i + n) as u8).collect();
        n += 1;
        m.handle_guest(&guest(op::RW, 5000, 0x400, 0, 4096, 0, &chunk))
            .unwrap();
        sent.extend_from_slice(&chunk);
        assert!(sent.len() < 64 << 20, "the host socket never filled up");
    }
    m.handle_guest(&guest(
        op::SHUTDOWN,
        5000,
        0x400,
        SHUTDOWN_RCV | SHUTDOWN_SEND,
        4096,
        0,
        &[],
    ))
    .unwrap();
    while let Some(p) = m.next_rx() {
        let (h, _) = Header::parse_packet(&p).unwrap();
        assert_ne!(
            h.op,
            op::RST,
            "reset before the guest's data reached the host"
        );
    }
    assert_eq!(m.connections(), 1);
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        got
    });
    let start = Instant::now();
    let mut rst = false;
    while !rst {
        assert!(start.elapsed() < Duration::from_secs(10), "no reset");
        m.poll_host();
        while let Some(p) = m.next_rx() {
            rst |= Header::parse_packet(&p).unwrap().0.op == op::RST;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let got = reader.join().unwrap();
    assert!(
        got == sent,
        "host got {} of {} bytes",
        got.len(),
        sent.len()
    );
    assert_eq!(m.connections(), 0);
}
