use super::*;
use crate::block::test_util::TempImage;
use crate::block::{BlockOptions, MemDisk, RawImage};

const CLB: u64 = 0x1000;
const TABLE: u64 = 0x2000;
const DATA: u64 = 0x10000;
const FB: u64 = 0x3000;

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

/// Puts a command in slot 0: header, H2D FIS, optional ATAPI packet, and PRDs.
fn command(mem: &GuestMemory, command: u8, lba: u64, count: u16, prds: &[(u64, u32)]) {
    let dw0 = 5u32 | (prds.len() as u32) << 16;
    mem.write_obj(dw0, GuestAddress(CLB)).unwrap();
    mem.write_obj(0xFFFF_FFFFu32, GuestAddress(CLB + 4))
        .unwrap();
    mem.write_obj(TABLE, GuestAddress(CLB + 8)).unwrap();
    let mut fis = [0u8; 20];
    fis[0] = 0x27;
    fis[1] = 0x80;
    fis[2] = command;
    for i in 0..3 {
        fis[4 + i] = (lba >> (8 * i)) as u8;
        fis[8 + i] = (lba >> (24 + 8 * i)) as u8;
    }
    fis[7] = 0x40;
    fis[12..14].copy_from_slice(&count.to_le_bytes());
    mem.write_slice(&fis, GuestAddress(TABLE)).unwrap();
    for (i, (addr, len)) in prds.iter().enumerate() {
        let at = TABLE + 0x80 + 16 * i as u64;
        mem.write_obj(*addr, GuestAddress(at)).unwrap();
        mem.write_obj(len - 1, GuestAddress(at + 12)).unwrap();
    }
}

fn packet(mem: &GuestMemory, cdb: &[u8], prds: &[(u64, u32)]) {
    command(mem, 0xA0, 0, 0, prds);
    let mut acmd = [0u8; 16];
    acmd[..cdb.len()].copy_from_slice(cdb);
    mem.write_slice(&acmd, GuestAddress(TABLE + 0x40)).unwrap();
}

fn prdbc(mem: &GuestMemory) -> u32 {
    mem.read_obj(GuestAddress(CLB + 4)).unwrap()
}

fn disk_drive(data: Vec<u8>, ro: bool) -> (AhciDrive, Arc<MemDisk>) {
    let disk = Arc::new(MemDisk::from_bytes(data, 512, ro));
    (AhciDrive::new(DriveKind::Disk, disk.clone()), disk)
}

#[test]
fn read_dma_ext_fills_the_prds() {
    let mem = memory();
    let image: Vec<u8> = (0..64 * 512u32)
        .map(|i| (i / 512) as u8 ^ i as u8)
        .collect();
    let (mut drive, _) = disk_drive(image.clone(), false);
    command(&mem, 0x25, 4, 3, &[(DATA, 1000), (DATA + 0x4000, 536)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!((out.status, out.error), (0x50, 0));
    assert_eq!(out.bytes_transferred, 1536);
    assert_eq!(prdbc(&mem), 1536);
    let mut got = vec![0u8; 1536];
    mem.read_slice(&mut got[..1000], GuestAddress(DATA))
        .unwrap();
    mem.read_slice(&mut got[1000..], GuestAddress(DATA + 0x4000))
        .unwrap();
    assert_eq!(got, &image[2048..3584]);
    out.post(&mem, FB);
    let d2h: [u8; 20] = mem.read_obj(GuestAddress(FB + 0x40)).unwrap();
    assert_eq!(&d2h[..4], &[0x34, 0x40, 0x50, 0]);
}

#[test]
fn write_dma_then_flush() {
    let mem = memory();
    let (mut drive, disk) = disk_drive(vec![0; 32 * 512], false);
    mem.write_slice(&[0xC3; 1024], GuestAddress(DATA)).unwrap();
    command(&mem, 0xCA, 7, 2, &[(DATA, 1024)]);
    let out = drive.execute(&mem, CLB, 0);
    assert!(!out.is_error());
    assert_eq!(out.bytes_transferred, 1024);
    let d = disk.contents();
    assert!(d[3584..4608].iter().all(|&b| b == 0xC3));
    assert!(d[..3584].iter().chain(&d[4608..]).all(|&b| b == 0));
    command(&mem, 0xEA, 0, 0, &[]);
    assert_eq!(drive.execute(&mem, CLB, 0).status, 0x50);
}

#[test]
fn out_of_range_and_read_only_abort() {
    let mem = memory();
    let (mut drive, disk) = disk_drive(vec![0; 8 * 512], true);
    command(&mem, 0x25, 7, 2, &[(DATA, 1024)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!((out.status, out.error & ATA_E_IDNF), (0x41, ATA_E_IDNF));
    command(&mem, 0x25, u64::MAX >> 16, 1, &[(DATA, 512)]);
    assert!(drive.execute(&mem, CLB, 0).is_error());
    mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
    command(&mem, 0x35, 0, 1, &[(DATA, 512)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!((out.status, out.error), (0x41, ATA_E_ABRT));
    assert!(disk.contents().iter().all(|&b| b == 0));
}

#[test]
fn bad_prd_tables_and_fises_abort() {
    let mem = memory();
    let (mut drive, disk) = disk_drive(vec![0; 64 * 512], false);
    // Too short for the transfer; nothing is written.
    mem.write_slice(&[9; 1024], GuestAddress(DATA)).unwrap();
    command(&mem, 0x35, 0, 2, &[(DATA, 512)]);
    assert!(drive.execute(&mem, CLB, 0).is_error());
    assert!(disk.contents().iter().all(|&b| b == 0));
    // No PRDs at all.
    command(&mem, 0x25, 0, 1, &[]);
    assert!(drive.execute(&mem, CLB, 0).is_error());
    // Buffers beyond guest RAM.
    command(&mem, 0x25, 0, 8, &[(0x20_0000 - 512, 4096)]);
    assert!(drive.execute(&mem, CLB, 0).is_error());
    command(&mem, 0x25, 0, 1, &[(u64::MAX - 1, 512)]);
    assert!(drive.execute(&mem, CLB, 0).is_error());
    // A wrong FIS type, a too-short FIS length, a command table outside memory.
    command(&mem, 0x25, 0, 1, &[(DATA, 512)]);
    mem.write_obj(0x34u8, GuestAddress(TABLE)).unwrap();
    assert!(drive.execute(&mem, CLB, 0).is_error());
    command(&mem, 0x25, 0, 1, &[(DATA, 512)]);
    mem.write_obj(4u32 | 1 << 16, GuestAddress(CLB)).unwrap();
    assert!(drive.execute(&mem, CLB, 0).is_error());
    mem.write_obj(0xFFFF_FF80u64, GuestAddress(CLB + 8))
        .unwrap();
    mem.write_obj(5u32 | 1 << 16, GuestAddress(CLB)).unwrap();
    assert!(drive.execute(&mem, CLB, 0).is_error());
    // A command list outside memory.
    assert!(drive.execute(&mem, u64::MAX - 8, 3).is_error());
    // Unknown command.
    command(&mem, 0xB0, 0, 0, &[]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!((out.status, out.error), (0x41, ATA_E_ABRT));
}

#[test]
fn identify_device_uses_pio_setup() {
    let mem = memory();
    let (mut drive, _) = disk_drive(vec![0; 1 << 20], false);
    command(&mem, 0xEC, 0, 0, &[(DATA, 512)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!(out.status, 0x50);
    assert_eq!(out.bytes_transferred, 512);
    let pio = out.pio_setup.expect("PIO setup FIS");
    assert_eq!((pio[0], pio[15]), (0x5F, 0x50));
    let mut id = [0u8; 512];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(u16::from_le_bytes([id[200], id[201]]), 2048); // word 100: sectors
    out.post(&mem, FB);
    let posted: [u8; 20] = mem.read_obj(GuestAddress(FB + 0x20)).unwrap();
    assert_eq!(posted, pio);
}

#[test]
fn device_control_fis_requests_soft_reset() {
    let mem = memory();
    let (mut drive, _) = disk_drive(vec![0; 4096], false);
    command(&mem, 0, 0, 0, &[]);
    mem.write_obj(0u8, GuestAddress(TABLE + 1)).unwrap();
    mem.write_obj(0x04u8, GuestAddress(TABLE + 15)).unwrap();
    let out = drive.execute(&mem, CLB, 0);
    assert!(out.soft_reset && !out.is_error());
}

fn cd(data: Vec<u8>) -> AhciDrive {
    AhciDrive::new(
        DriveKind::Cdrom,
        Arc::new(MemDisk::from_bytes(data, 2048, true)),
    )
}

#[test]
fn atapi_drive_identifies_itself() {
    let mem = memory();
    let mut drive = cd(vec![0; 8 * 2048]);
    assert_eq!(drive.signature(), SIGNATURE_ATAPI);
    command(&mem, 0xEC, 0, 0, &[(DATA, 512)]);
    let out = drive.execute(&mem, CLB, 0);
    assert!(out.is_error());
    assert_eq!(&out.d2h[4..7], &[0x01, 0x14, 0xEB]);
    command(&mem, 0xA1, 0, 0, &[(DATA, 512)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!((out.status, out.bytes_transferred), (0x50, 512));
    assert_eq!(mem.read_obj::<u16>(GuestAddress(DATA)).unwrap(), 0x85C0);
}

#[test]
fn atapi_inquiry_capacity_and_unit_ready() {
    let mem = memory();
    let mut drive = cd(vec![0; 100 * 2048]);
    packet(&mem, &[0x00], &[]);
    assert_eq!(drive.execute(&mem, CLB, 0).status, 0x50);

    packet(&mem, &[0x12, 0, 0, 0, 36], &[(DATA, 512)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!(out.bytes_transferred, 36);
    let mut inq = [0u8; 36];
    mem.read_slice(&mut inq, GuestAddress(DATA)).unwrap();
    assert_eq!(inq[0], 5);
    assert_eq!(&inq[16..29], b"BHYVE DVD-ROM");
    // The allocation length cuts the answer.
    packet(&mem, &[0x12, 0, 0, 0, 5], &[(DATA, 512)]);
    assert_eq!(drive.execute(&mem, CLB, 0).bytes_transferred, 5);

    packet(&mem, &[0x25], &[(DATA, 8)]);
    drive.execute(&mem, CLB, 0);
    let mut cap = [0u8; 8];
    mem.read_slice(&mut cap, GuestAddress(DATA)).unwrap();
    assert_eq!(cap, [0, 0, 0, 99, 0, 0, 8, 0]);
}

#[test]
fn atapi_errors_leave_sense_data() {
    let mem = memory();
    let mut drive = cd(vec![0; 10 * 2048]);
    packet(&mem, &[0xFF], &[]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!((out.status, out.error), (0x41, 0x50));
    packet(&mem, &[0x03, 0, 0, 0, 18], &[(DATA, 18)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!(out.bytes_transferred, 18);
    let mut sense = [0u8; 18];
    mem.read_slice(&mut sense, GuestAddress(DATA)).unwrap();
    assert_eq!((sense[0], sense[2], sense[12]), (0x70, 5, 0x20));

    // Reading past the end: LBA out of range.
    packet(&mem, &[0x28, 0, 0, 0, 0, 9, 0, 0, 2], &[(DATA, 4096)]);
    assert!(drive.execute(&mem, CLB, 0).is_error());
    packet(&mem, &[0x03, 0, 0, 0, 18], &[(DATA, 18)]);
    drive.execute(&mem, CLB, 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 12)).unwrap(), 0x21);
    // READ(12) whose count overflows the LBA.
    packet(
        &mem,
        &[0xA8, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        &[(DATA, 4096)],
    );
    assert!(drive.execute(&mem, CLB, 0).is_error());
}

#[test]
fn atapi_toc_mode_sense_configuration_and_events() {
    let mem = memory();
    let mut drive = cd(vec![0; 300 * 2048]);
    packet(&mem, &[0x43, 0, 0, 0, 0, 0, 0, 0, 100], &[(DATA, 512)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!(out.bytes_transferred, 20);
    let mut toc = [0u8; 20];
    mem.read_slice(&mut toc, GuestAddress(DATA)).unwrap();
    assert_eq!((toc[6], toc[14]), (1, 0xAA));
    assert_eq!(&toc[16..20], &300u32.to_be_bytes());

    packet(&mem, &[0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 255], &[(DATA, 512)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!(out.bytes_transferred, 36);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 8)).unwrap(), 0x2A);
    packet(&mem, &[0x5A, 0, 0x05, 0, 0, 0, 0, 0, 255], &[(DATA, 512)]);
    assert!(drive.execute(&mem, CLB, 0).is_error());

    packet(&mem, &[0x46, 0, 0, 0, 0, 0, 0, 0, 255], &[(DATA, 512)]);
    assert_eq!(drive.execute(&mem, CLB, 0).bytes_transferred, 16);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 7)).unwrap(), 0x08);

    packet(&mem, &[0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8], &[(DATA, 8)]);
    assert_eq!(drive.execute(&mem, CLB, 0).bytes_transferred, 8);
    packet(&mem, &[0x4A, 0, 0, 0, 0x10, 0, 0, 0, 8], &[(DATA, 8)]);
    assert!(drive.execute(&mem, CLB, 0).is_error());
}

/// An ISO 9660 image made by xorriso, read through ATAPI READ(10): the primary volume
/// descriptor at sector 16 and a file's bytes.
#[test]
fn reads_an_iso_made_by_xorriso() {
    let img = TempImage::new("iso", 0);
    let root = img.dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let content: Vec<u8> = (0..5000u32).map(|i| (i % 97) as u8).collect();
    std::fs::write(root.join("HELLO.TXT"), &content).unwrap();
    let iso = img.dir.join("cd.iso");
    let made = std::process::Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "XHYVETEST", "-o"])
        .arg(&iso)
        .arg(&root)
        .status();
    match made {
        Ok(s) if s.success() => {}
        _ => {
            if std::env::var_os("XHYVE_REQUIRE_XORRISO").is_some() {
                panic!("xorriso is required (apt-get install xorriso)");
            }
            eprintln!("skipping: xorriso not installed");
            return;
        }
    }
    let options = BlockOptions::parse(&format!("{},ro", iso.display())).unwrap();
    let disk = Arc::new(RawImage::open(&options).unwrap());
    let mut drive = AhciDrive::new(DriveKind::Cdrom, disk);
    let mem = memory();

    packet(&mem, &[0x28, 0, 0, 0, 0, 16, 0, 0, 1], &[(DATA, 2048)]);
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!((out.status, out.bytes_transferred), (0x50, 2048));
    let mut pvd = [0u8; 2048];
    mem.read_slice(&mut pvd, GuestAddress(DATA)).unwrap();
    assert_eq!(&pvd[0..6], b"\x01CD001");
    assert_eq!(&pvd[40..49], b"XHYVETEST");

    // Root directory record (PVD offset 156): extent at 158 (LE u32).
    let root_lba = u32::from_le_bytes(pvd[158..162].try_into().unwrap());
    let cdb_for = |lba: u32, n: u16| {
        let l = lba.to_be_bytes();
        let c = n.to_be_bytes();
        [0x28, 0, l[0], l[1], l[2], l[3], 0, c[0], c[1]]
    };
    packet(&mem, &cdb_for(root_lba, 1), &[(DATA, 2048)]);
    assert!(!drive.execute(&mem, CLB, 0).is_error());
    let mut dir = [0u8; 2048];
    mem.read_slice(&mut dir, GuestAddress(DATA)).unwrap();
    let mut at = 0usize;
    let mut file = None;
    while at < dir.len() && dir[at] != 0 {
        let rec = &dir[at..at + dir[at] as usize];
        let name_len = rec[32] as usize;
        if rec[33..33 + name_len].starts_with(b"HELLO.TXT") {
            let lba = u32::from_le_bytes(rec[2..6].try_into().unwrap());
            let size = u32::from_le_bytes(rec[10..14].try_into().unwrap());
            file = Some((lba, size));
        }
        at += rec.len();
    }
    let (lba, size) = file.expect("HELLO.TXT in the root directory");
    assert_eq!(size, 5000);
    // Three sectors, split over two PRDs at an odd boundary.
    packet(
        &mem,
        &cdb_for(lba, 3),
        &[(DATA, 3000), (DATA + 0x8000, 3144)],
    );
    let out = drive.execute(&mem, CLB, 0);
    assert_eq!(out.bytes_transferred, 6144);
    let mut got = vec![0u8; 6144];
    mem.read_slice(&mut got[..3000], GuestAddress(DATA))
        .unwrap();
    mem.read_slice(&mut got[3000..], GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(&got[..5000], &content[..]);
}

/// A deterministic mini-fuzz of the command parser.
#[test]
fn random_commands_never_panic() {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..400 {
        let mut data = vec![0u8; 1024];
        data.iter_mut().for_each(|b| *b = next() as u8);
        // Keep the command table near the start so the FIS and PRDs are random, not absent.
        data[8..12].copy_from_slice(&(0x100u32 + (round % 4) * 0x80).to_le_bytes());
        data[12..16].fill(0);
        data[0] = 5 + (round % 12) as u8;
        data[2] = (round % 8) as u8;
        data[3] = 0;
        let table = 0x100 + (round as usize % 4) * 0x80;
        data[table] = 0x27;
        data[table + 1] |= 0x80;
        fuzz_command(&data);
    }
}
