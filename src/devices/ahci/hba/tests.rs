use super::*;
use crate::block::MemDisk;
use crate::devices::irq::test_util::RecordingLine;
use crate::devices::pci::msix::tests::RecordingMsi;

const CLB: u64 = 0x1000;
const FB: u64 = 0x3000;
const TABLE: u64 = 0x4000;
const DATA: u64 = 0x10000;
const P: u64 = 0x100;

struct Rig {
    hba: AhciHba,
    mem: GuestMemory,
    line: Arc<RecordingLine>,
    msi: Arc<RecordingMsi>,
}

fn rig(kind: DriveKind, image: Vec<u8>) -> Rig {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    let line = Arc::new(RecordingLine {
        gsi: 21,
        ..Default::default()
    });
    let msi = Arc::new(RecordingMsi::default());
    let sector = if kind == DriveKind::Cdrom { 2048 } else { 512 };
    let disk = Arc::new(MemDisk::from_bytes(image, sector, kind == DriveKind::Cdrom));
    let hba = AhciHba::new(
        kind,
        disk,
        AhciResources {
            memory: mem.clone(),
            msi: msi.clone(),
            intx: line.clone(),
        },
    )
    .unwrap();
    Rig {
        hba,
        mem,
        line,
        msi,
    }
}

impl Rig {
    fn r(&mut self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.hba.read_bar(ABAR, offset, &mut d);
        u32::from_le_bytes(d)
    }
    fn w(&mut self, offset: u64, value: u32) {
        self.hba.write_bar(ABAR, offset, &value.to_le_bytes());
    }
    /// What a driver does before issuing: list and FIS areas, FIS receive and start on,
    /// port interrupts on, HBA interrupts on.
    fn start(&mut self) {
        self.w(P + px::CLB, CLB as u32);
        self.w(P + px::FB, FB as u32);
        self.w(P + px::IS, 0xFFFF_FFFF);
        self.w(P + px::IE, 0xFFFF_FFFF);
        self.w(P + px::CMD, CMD_FRE | CMD_ST);
        self.w(ghc::GHC, GHC_IE);
    }
    /// Issues `slots` and waits for the I/O thread to leave `left` issued.
    fn issue(&mut self, slots: u32, left: u32) {
        self.w(P + px::CI, slots);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.r(P + px::CI) != left {
            assert!(
                std::time::Instant::now() < deadline,
                "commands never completed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    fn levels(&self) -> Vec<bool> {
        self.line.levels.lock().unwrap().clone()
    }
    /// A command in `slot`: H2D FIS with `command`, LBA and count, one PRD.
    fn command(&self, slot: u64, command: u8, lba: u64, count: u16, buf: (u64, u32)) {
        let header = CLB + 32 * slot;
        let table = TABLE + 0x100 * slot;
        self.mem
            .write_obj(5u32 | 1 << 16, GuestAddress(header))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
        self.mem.write_obj(table, GuestAddress(header + 8)).unwrap();
        let mut fis = [0u8; 20];
        fis[0] = 0x27;
        fis[1] = 0x80;
        fis[2] = command;
        fis[4..7].copy_from_slice(&lba.to_le_bytes()[..3]);
        fis[7] = 0x40;
        fis[12..14].copy_from_slice(&count.to_le_bytes());
        self.mem.write_slice(&fis, GuestAddress(table)).unwrap();
        self.mem
            .write_obj(buf.0, GuestAddress(table + 0x80))
            .unwrap();
        self.mem
            .write_obj(buf.1 - 1, GuestAddress(table + 0x80 + 12))
            .unwrap();
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

#[test]
fn pci_identity_and_hba_registers() {
    let mut r = rig(DriveKind::Disk, vec![0; 64 * 512]);
    let cs = r.hba.config_space();
    assert_eq!(cs.read_u32(0), 0x2821_8086);
    assert_eq!(cs.read_u32(8) >> 8, 0x01_06_01);
    assert_eq!(cs.read_u16(0x3C), 0x0115, "INTA# on GSI 21");
    assert_eq!(cs.bar(ABAR).map(|b| b.size), Some(ABAR_SIZE));
    assert_eq!(r.r(ghc::CAP) & 0x1F, 0, "one port");
    assert_eq!(r.r(ghc::CAP) >> 8 & 0x1F, 31, "32 slots");
    assert_eq!(r.r(ghc::GHC), GHC_AE);
    assert_eq!(r.r(ghc::PI), 1);
    assert_eq!(r.r(ghc::VS), 0x0001_0300);
    assert_eq!(r.r(P + px::SIG), 0x101);
    assert_eq!(r.r(P + px::SSTS), SSTS_UP);
    assert_eq!(r.r(P + px::TFD), 0x50);
    // Byte reads see the register's bytes.
    let mut b = [0u8; 1];
    r.hba.read_bar(ABAR, ghc::VS + 2, &mut b);
    assert_eq!(b[0], 1);
    // AE cannot be cleared; IE is writable.
    r.w(ghc::GHC, GHC_IE);
    assert_eq!(r.r(ghc::GHC), GHC_AE | GHC_IE);
    r.w(ghc::GHC, 0);
    assert_eq!(r.r(ghc::GHC), GHC_AE);
}

#[test]
fn st_and_fre_drive_cr_and_fr_and_stop_discards_commands() {
    let mut r = rig(DriveKind::Disk, vec![0; 64 * 512]);
    r.w(P + px::CI, 1);
    assert_eq!(r.r(P + px::CI), 0, "CI ignored while stopped");
    r.w(P + px::CMD, CMD_FRE);
    assert_eq!(r.r(P + px::CMD) & (CMD_FR | CMD_CR), CMD_FR);
    r.w(P + px::CMD, CMD_FRE | CMD_ST);
    assert_eq!(r.r(P + px::CMD) & (CMD_FR | CMD_CR), CMD_FR | CMD_CR);
    r.w(P + px::SACT, 0x6);
    assert_eq!(r.r(P + px::SACT), 0x6);
    r.w(P + px::CMD, 0);
    assert_eq!(r.r(P + px::CMD) & (CMD_FR | CMD_CR), 0);
    assert_eq!(r.r(P + px::SACT), 0);
}

#[test]
fn read_dma_completes_posts_d2h_and_raises_intx() {
    let image = pattern(64 * 512);
    let mut r = rig(DriveKind::Disk, image.clone());
    r.start();
    r.w(P + px::IS, 0xFFFF_FFFF);
    r.w(ghc::IS, 1);
    assert!(!r.levels().contains(&true));
    r.command(3, 0xC8, 5, 2, (DATA, 1024));
    r.issue(1 << 3, 0);
    assert_eq!(r.r(P + px::CI), 0);
    let mut got = vec![0u8; 1024];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, &image[5 * 512..7 * 512]);
    let prdbc: u32 = r.mem.read_obj(GuestAddress(CLB + 3 * 32 + 4)).unwrap();
    assert_eq!(prdbc, 1024);
    let d2h: [u8; 4] = r.mem.read_obj(GuestAddress(FB + 0x40)).unwrap();
    assert_eq!(d2h, [0x34, 0x40, 0x50, 0]);
    assert_eq!(r.r(P + px::TFD), 0x50);
    assert_eq!(r.r(P + px::IS) & PXIS_DHRS, PXIS_DHRS);
    assert_eq!(r.r(ghc::IS), 1);
    assert_eq!(r.levels().last(), Some(&true));
    assert!(r.msi.0.lock().unwrap().is_empty());

    // The IS write alone does not lower the line while the port still has status set.
    r.w(ghc::IS, 1);
    assert_eq!(r.r(ghc::IS), 1);
    r.w(P + px::IS, 0xFFFF_FFFF);
    r.w(ghc::IS, 1);
    assert_eq!(r.r(ghc::IS), 0);
    assert_eq!(r.levels().last(), Some(&false));
}

#[test]
fn identify_sets_pss_and_fails_set_tfes() {
    let mut r = rig(DriveKind::Disk, vec![0; 64 * 512]);
    r.start();
    r.w(P + px::IS, 0xFFFF_FFFF);
    r.command(0, 0xEC, 0, 1, (DATA, 512));
    r.issue(1, 0);
    assert_eq!(
        r.r(P + px::IS) & (PXIS_PSS | PXIS_DHRS),
        PXIS_PSS | PXIS_DHRS
    );
    let words: [u16; 2] = r.mem.read_obj(GuestAddress(DATA + 60 * 2)).unwrap();
    assert_eq!(u32::from(words[0]) | u32::from(words[1]) << 16, 64);
    let pio: u8 = r.mem.read_obj(GuestAddress(FB + 0x20)).unwrap();
    assert_eq!(pio, 0x5F);

    // A read past the end fails; the slot after it is left issued.
    r.w(P + px::IS, 0xFFFF_FFFF);
    r.command(1, 0xC8, 100, 1, (DATA, 512));
    r.command(2, 0xC8, 0, 1, (DATA, 512));
    r.issue(0b110, 0b100);
    assert_eq!(r.r(P + px::IS) & PXIS_TFES, PXIS_TFES);
    assert_eq!(r.r(P + px::TFD) & 0x01, 0x01);
    assert_eq!(r.r(P + px::CI), 0b100);
}

#[test]
fn msi_is_sent_instead_of_intx() {
    let mut r = rig(DriveKind::Disk, vec![0; 64 * 512]);
    let cap = 0x40u16;
    r.hba.write_config(cap + 4, &0xFEE0_0000u32.to_le_bytes());
    r.hba.write_config(cap + 12, &0x0045u16.to_le_bytes());
    r.hba.write_config(cap + 2, &1u16.to_le_bytes());
    r.start();
    r.command(0, 0xC8, 0, 1, (DATA, 512));
    r.issue(1, 0);
    assert_eq!(r.msi.0.lock().unwrap().as_slice(), &[(0xFEE0_0000, 0x45)]);
    assert!(!r.levels().contains(&true));
}

#[test]
fn masked_port_interrupts_and_intx_disable_keep_the_line_low() {
    let mut r = rig(DriveKind::Disk, vec![0; 64 * 512]);
    r.start();
    r.w(P + px::IE, 0);
    r.w(P + px::IS, 0xFFFF_FFFF);
    r.w(ghc::IS, 1);
    r.command(0, 0xC8, 0, 1, (DATA, 512));
    r.issue(1, 0);
    assert_eq!(r.r(P + px::IS) & PXIS_DHRS, PXIS_DHRS);
    assert_eq!(r.r(ghc::IS), 0);
    assert!(!r.levels().contains(&true));
    // Disabling INTx in the command register while status is pending.
    r.hba.write_config(4, &(0x0006u16 | 1 << 10).to_le_bytes());
    r.w(P + px::IE, PXIS_DHRS);
    assert_eq!(r.r(ghc::IS), 1);
    assert!(!r.levels().contains(&true));
    r.hba.write_config(4, &0x0006u16.to_le_bytes());
    assert_eq!(r.levels().last(), Some(&true));
}

#[test]
fn comreset_and_soft_reset_send_the_signature() {
    let mut r = rig(DriveKind::Cdrom, vec![0; 16 * 2048]);
    assert_eq!(r.r(P + px::SIG), 0xEB14_0101);
    r.start();
    r.w(P + px::IS, 0xFFFF_FFFF);
    r.w(P + px::SCTL, 1);
    assert_eq!(r.r(P + px::SSTS) & 0xF, 0);
    r.w(P + px::SCTL, 0);
    assert_eq!(r.r(P + px::SSTS), SSTS_UP);
    assert_eq!(r.r(P + px::IS) & PXIS_PCS, PXIS_PCS);
    let d2h: [u8; 20] = r.mem.read_obj(GuestAddress(FB + 0x40)).unwrap();
    assert_eq!(d2h[0], 0x34);
    assert_eq!((d2h[4], d2h[5], d2h[6], d2h[12]), (0x01, 0x14, 0xEB, 0x01));

    // Soft reset: a control FIS with SRST, then one without.
    r.mem
        .write_slice(&[0u8; 20], GuestAddress(FB + 0x40))
        .unwrap();
    r.command(0, 0, 0, 0, (DATA, 512));
    r.mem
        .write_slice(&[0x27, 0x00, 0, 0], GuestAddress(TABLE))
        .unwrap();
    r.mem.write_obj(0x04u8, GuestAddress(TABLE + 15)).unwrap();
    r.issue(1, 0);
    let d2h: u8 = r.mem.read_obj(GuestAddress(FB + 0x40)).unwrap();
    assert_eq!(d2h, 0, "no FIS for the SRST-set half");
    r.mem.write_obj(0x00u8, GuestAddress(TABLE + 15)).unwrap();
    r.issue(1, 0);
    let d2h: [u8; 20] = r.mem.read_obj(GuestAddress(FB + 0x40)).unwrap();
    assert_eq!((d2h[0], d2h[5], d2h[6]), (0x34, 0x14, 0xEB));
}

#[test]
fn atapi_read10_through_the_port() {
    let image: Vec<u8> = (0..16 * 2048usize)
        .map(|i| (i / 2048) as u8 + 0x30)
        .collect();
    let mut r = rig(DriveKind::Cdrom, image);
    r.start();
    r.command(0, 0xA0, 0, 0, (DATA, 2048));
    let cdb = [0x28u8, 0, 0, 0, 0, 5, 0, 0, 1, 0, 0, 0];
    r.mem.write_slice(&cdb, GuestAddress(TABLE + 0x40)).unwrap();
    r.issue(1, 0);
    assert_eq!(r.r(P + px::TFD) & 0x01, 0);
    let mut got = [0u8; 2048];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|&b| b == 0x35));
}

#[test]
fn hba_reset_clears_state_and_odd_accesses_are_ignored() {
    let mut r = rig(DriveKind::Disk, vec![0; 64 * 512]);
    r.start();
    r.hba.write_bar(ABAR, P + px::CLB + 1, &[0xFF, 0xFF]);
    r.hba.write_bar(0, 0, &[0xFF; 4]);
    assert_eq!(r.r(P + px::CLB), CLB as u32);
    r.w(ghc::GHC, GHC_HR | GHC_IE);
    assert_eq!(r.r(ghc::GHC), GHC_AE);
    assert_eq!(r.r(P + px::CMD), 0);
    assert_eq!(r.r(P + px::CLB), 0);
    assert_eq!(r.r(P + px::SSTS), SSTS_UP);
    assert_eq!(r.r(0xFFC), 0);
}

/// A disk whose reads wait for the test's go-ahead and report the thread they ran on.
struct GatedDisk {
    inner: MemDisk,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    threads: std::sync::mpsc::SyncSender<Option<String>>,
}

impl BlockBackend for GatedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.inner.physical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn serial(&self) -> &[u8; crate::block::serial::SERIAL_LEN] {
        self.inner.serial()
    }
    fn read_to(
        &self,
        offset: u64,
        buf: &vm_memory::VolatileSlice<'_>,
    ) -> Result<(), crate::block::BlockError> {
        let name = std::thread::current().name().map(str::to_string);
        let _ = self.threads.send(name);
        let _ = self.gate.lock().unwrap().recv();
        self.inner.read_to(offset, buf)
    }
    fn write_from(
        &self,
        offset: u64,
        buf: &vm_memory::VolatileSlice<'_>,
    ) -> Result<(), crate::block::BlockError> {
        self.inner.write_from(offset, buf)
    }
    fn flush(&self) -> Result<(), crate::block::BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), crate::block::BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), crate::block::BlockError> {
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn commands_run_on_the_io_thread_and_a_stop_waits_for_the_running_one() {
    use std::sync::mpsc::{channel, sync_channel};
    use std::time::Duration;
    let (go, gate) = channel();
    let (threads_tx, threads) = sync_channel(4);
    let disk = Arc::new(GatedDisk {
        inner: MemDisk::from_bytes(pattern(64 * 512), 512, false),
        gate: std::sync::Mutex::new(gate),
        threads: threads_tx,
    });
    let mut r = rig(DriveKind::Disk, vec![0; 512]);
    r.hba = AhciHba::new(
        DriveKind::Disk,
        disk,
        AhciResources {
            memory: r.mem.clone(),
            msi: r.msi.clone(),
            intx: r.line.clone(),
        },
    )
    .unwrap();
    r.start();
    r.w(P + px::IS, 0xFFFF_FFFF);
    r.command(0, 0xC8, 0, 1, (DATA, 512));
    // The register write returns while the read is still blocked in the disk.
    r.w(P + px::CI, 1);
    let thread = threads.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(thread.as_deref(), Some("ahci-io"));
    assert_eq!(r.r(P + px::CI), 1);
    // Stopping the port: CI clears at once, CR only when the running command is done,
    // and that command's completion is dropped.
    r.w(P + px::CMD, CMD_FRE);
    assert_eq!(r.r(P + px::CI), 0);
    assert_eq!(r.r(P + px::CMD) & CMD_CR, CMD_CR);
    go.send(()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while r.r(P + px::CMD) & CMD_CR != 0 {
        assert!(std::time::Instant::now() < deadline, "CR never cleared");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.r(P + px::IS) & PXIS_DHRS, 0);
    assert!(!r.levels().contains(&true));

    // Restarted, the next command completes normally.
    r.w(P + px::CMD, CMD_FRE | CMD_ST);
    go.send(()).unwrap();
    r.issue(1, 0);
    assert_eq!(r.r(P + px::IS) & PXIS_DHRS, PXIS_DHRS);
    assert_eq!(r.levels().last(), Some(&true));
}

#[test]
fn several_slots_issued_at_once_all_complete() {
    let image = pattern(64 * 512);
    let mut r = rig(DriveKind::Disk, image.clone());
    r.start();
    for slot in 0..4u64 {
        r.command(slot, 0x25, 10 + slot, 1, (DATA + 0x1000 * slot, 512));
    }
    r.issue(0b1111, 0);
    for slot in 0..4usize {
        let mut got = [0u8; 512];
        r.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x1000 * slot as u64))
            .unwrap();
        assert_eq!(&got[..], &image[(10 + slot) * 512..(11 + slot) * 512]);
    }
    assert_eq!(r.r(P + px::TFD), 0x50);
    // Slots issued to a stopped port are not run.
    r.w(P + px::CMD, CMD_FRE);
    r.w(P + px::CI, 1);
    assert_eq!(r.r(P + px::CI), 0);
}

#[test]
fn a_machine_reset_puts_every_register_back_and_lowers_intx() {
    let image = pattern(64 * 512);
    let mut r = rig(DriveKind::Disk, image);
    let power_on = r.hba.config_space().clone();
    let fresh: Vec<u32> = [
        ghc::GHC,
        ghc::IS,
        P + px::CMD,
        P + px::IS,
        P + px::IE,
        P + px::TFD,
    ]
    .iter()
    .map(|&o| r.r(o))
    .collect();
    r.hba.write_config(0x04, &0x0406u16.to_le_bytes());
    r.start();
    r.w(P + px::IS, 0xFFFF_FFFF);
    r.w(ghc::IS, 1);
    r.hba.write_config(0x04, &0x0006u16.to_le_bytes());
    r.command(0, 0xC8, 5, 2, (DATA, 1024));
    r.issue(1, 0);
    assert_eq!(r.levels().last(), Some(&true), "a completion raised INTx");

    PciDevice::reset(&mut r.hba, &power_on);
    let after: Vec<u32> = [
        ghc::GHC,
        ghc::IS,
        P + px::CMD,
        P + px::IS,
        P + px::IE,
        P + px::TFD,
    ]
    .iter()
    .map(|&o| r.r(o))
    .collect();
    assert_eq!(after, fresh);
    assert_eq!(r.r(P + px::CLB), 0);
    assert_eq!(r.r(P + px::FB), 0);
    assert_eq!(r.levels().last(), Some(&false), "INTx lowered");
    assert_eq!(r.hba.config_space().command(), power_on.command());

    // A driver starts over and the drive answers.
    r.start();
    r.command(1, 0xC8, 5, 2, (DATA, 1024));
    r.issue(1 << 1, 0);
}
