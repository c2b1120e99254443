//! The AHCI command layer, as a model with no hypervisor or MMIO in it: given a port's
//! command list and a slot, read the command header, the command FIS and the PRD table from
//! guest memory, run the ATA or ATAPI command on the drive, and say what to post back
//! (D2H register FIS, PIO setup FIS, byte count). The HBA/port register model (PxCI, PxIS,
//! interrupts) sits on top of this.
//!
//! Everything read from guest memory is untrusted: a bad header, FIS or PRD table ends the
//! command with an error status (ABRT), never a panic or a host-memory access.

pub mod atapi;
pub mod fis;
pub mod hba;
pub mod identify;
pub mod prd;

use crate::block::BlockBackend;
use crate::memory::GuestMemory;
use fis::{d2h_fis, pio_setup_fis, H2dFis, FIS_LEN, RX_D2H_OFFSET, RX_PIO_SETUP_OFFSET};
use prd::{CommandHeader, PrdTable, ACMD_OFFSET};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

/// ATA status register bits.
pub const ATA_S_ERR: u8 = 0x01;
pub const ATA_S_DRQ: u8 = 0x08;
pub const ATA_S_DSC: u8 = 0x10;
pub const ATA_S_DRDY: u8 = 0x40;
/// ATA error register bits.
pub const ATA_E_ABRT: u8 = 0x04;
pub const ATA_E_IDNF: u8 = 0x10;
pub const ATA_E_UNC: u8 = 0x40;

const STATUS_OK: u8 = ATA_S_DRDY | ATA_S_DSC;
const STATUS_ERR: u8 = ATA_S_DRDY | ATA_S_ERR;

/// Device signatures (PxSIG) after reset.
pub const SIGNATURE_ATA: u32 = 0x0000_0101;
pub const SIGNATURE_ATAPI: u32 = 0xEB14_0101;

/// ATA commands handled.
mod cmd {
    pub const NOP: u8 = 0x00;
    pub const DEVICE_RESET: u8 = 0x08;
    pub const READ_SECTORS: u8 = 0x20;
    pub const READ_SECTORS_EXT: u8 = 0x24;
    pub const READ_DMA_EXT: u8 = 0x25;
    pub const READ_MULTIPLE_EXT: u8 = 0x29;
    pub const WRITE_SECTORS: u8 = 0x30;
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    pub const WRITE_DMA_EXT: u8 = 0x35;
    pub const WRITE_MULTIPLE_EXT: u8 = 0x39;
    pub const WRITE_DMA_FUA_EXT: u8 = 0x3D;
    pub const READ_VERIFY: u8 = 0x40;
    pub const READ_VERIFY_EXT: u8 = 0x42;
    pub const PACKET: u8 = 0xA0;
    pub const IDENTIFY_PACKET_DEVICE: u8 = 0xA1;
    pub const READ_MULTIPLE: u8 = 0xC4;
    pub const WRITE_MULTIPLE: u8 = 0xC5;
    pub const SET_MULTIPLE_MODE: u8 = 0xC6;
    pub const READ_DMA: u8 = 0xC8;
    pub const WRITE_DMA: u8 = 0xCA;
    pub const STANDBY_IMMEDIATE: u8 = 0xE0;
    pub const IDLE_IMMEDIATE: u8 = 0xE1;
    pub const STANDBY: u8 = 0xE2;
    pub const IDLE: u8 = 0xE3;
    pub const CHECK_POWER_MODE: u8 = 0xE5;
    pub const FLUSH_CACHE: u8 = 0xE7;
    pub const FLUSH_CACHE_EXT: u8 = 0xEA;
    pub const IDENTIFY_DEVICE: u8 = 0xEC;
    pub const SET_FEATURES: u8 = 0xEF;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveKind {
    /// ahci-hd
    Disk,
    /// ahci-cd (ATAPI, 2048-byte sectors)
    Cdrom,
}

/// What a command produced, for the port to post and signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Final ATA status and error (the port's PxTFD).
    pub status: u8,
    pub error: u8,
    /// Bytes moved through the PRD table (already written to PRDBC when possible).
    pub bytes_transferred: u32,
    /// Goes to the received-FIS area at +0x40.
    pub d2h: [u8; FIS_LEN],
    /// For PIO data-in commands: goes to the received-FIS area at +0x20.
    pub pio_setup: Option<[u8; FIS_LEN]>,
    /// A device control FIS with SRST set: the port should soft-reset the drive.
    pub soft_reset: bool,
}

impl CommandOutcome {
    pub fn is_error(&self) -> bool {
        self.status & ATA_S_ERR != 0
    }

    /// Posts the FISes into the port's received-FIS area at `fis_base` (PxFB), if the
    /// guest put it in RAM.
    pub fn post(&self, mem: &GuestMemory, fis_base: u64) {
        if let Some(pio) = &self.pio_setup {
            if let Some(at) = fis_base.checked_add(RX_PIO_SETUP_OFFSET) {
                let _ = mem.write_slice(pio, GuestAddress(at));
            }
        }
        if let Some(at) = fis_base.checked_add(RX_D2H_OFFSET) {
            let _ = mem.write_slice(&self.d2h, GuestAddress(at));
        }
    }
}

/// The drive behind one AHCI port.
pub struct AhciDrive {
    kind: DriveKind,
    disk: Arc<dyn BlockBackend>,
    sense: atapi::Sense,
}

impl AhciDrive {
    pub fn new(kind: DriveKind, disk: Arc<dyn BlockBackend>) -> Self {
        AhciDrive {
            kind,
            disk,
            sense: atapi::Sense::NONE,
        }
    }

    pub fn kind(&self) -> DriveKind {
        self.kind
    }

    /// PxSIG after reset.
    pub fn signature(&self) -> u32 {
        match self.kind {
            DriveKind::Disk => SIGNATURE_ATA,
            DriveKind::Cdrom => SIGNATURE_ATAPI,
        }
    }

    /// Runs the command in `slot` of the command list at `list_base` (PxCLB) and writes
    /// the byte count back into its header.
    pub fn execute(&mut self, mem: &GuestMemory, list_base: u64, slot: u8) -> CommandOutcome {
        let empty = [0u8; FIS_LEN];
        let header = match CommandHeader::read(mem, list_base, slot) {
            Ok(h) => h,
            Err(_) => return abort(&empty),
        };
        let outcome = self.execute_header(mem, &header);
        let _ = CommandHeader::write_byte_count(mem, list_base, slot, outcome.bytes_transferred);
        outcome
    }

    /// Runs the command a decoded header points at.
    pub fn execute_header(&mut self, mem: &GuestMemory, header: &CommandHeader) -> CommandOutcome {
        let mut raw = [0u8; 64];
        let fis_len = header.fis_len.min(raw.len());
        if fis_len < FIS_LEN
            || mem
                .read_slice(&mut raw[..fis_len], GuestAddress(header.table))
                .is_err()
        {
            return abort(&[0u8; FIS_LEN]);
        }
        let fis = match H2dFis::parse(&raw[..fis_len]) {
            Ok(fis) => fis,
            Err(_) => return abort(&[0u8; FIS_LEN]),
        };
        if !fis.is_command {
            return CommandOutcome {
                soft_reset: fis.control & 0x04 != 0,
                ..done(STATUS_OK, 0, &fis.raw, 0, 0)
            };
        }
        let prdt = PrdTable::of(header);
        match (self.kind, fis.command) {
            (DriveKind::Cdrom, cmd::PACKET) => {
                let mut packet = [0u8; 16];
                let at = header.table.checked_add(ACMD_OFFSET);
                let read = at.map(|at| mem.read_slice(&mut packet, GuestAddress(at)));
                if !matches!(read, Some(Ok(()))) {
                    return abort(&fis.raw);
                }
                atapi::execute(self, mem, &prdt, &fis, &packet)
            }
            (DriveKind::Cdrom, cmd::IDENTIFY_PACKET_DEVICE) => {
                let data = identify::identify_packet_device(&*self.disk);
                pio_in(mem, &prdt, &fis, &data)
            }
            (DriveKind::Cdrom, cmd::IDENTIFY_DEVICE) => {
                // An ATAPI device answers IDENTIFY DEVICE by aborting with its signature.
                let mut regs = fis.raw;
                regs[4..7].copy_from_slice(&[0x01, 0x14, 0xEB]);
                done(STATUS_ERR, ATA_E_ABRT, &regs, 1, 0)
            }
            (DriveKind::Cdrom, cmd::DEVICE_RESET) => {
                let mut regs = fis.raw;
                regs[4..7].copy_from_slice(&[0x01, 0x14, 0xEB]);
                self.sense = atapi::Sense::NONE;
                done(STATUS_OK, 0, &regs, 1, 0)
            }
            (DriveKind::Cdrom, cmd::CHECK_POWER_MODE) => done(STATUS_OK, 0, &fis.raw, 0xFF, 0),
            (DriveKind::Cdrom, cmd::SET_FEATURES) => done(STATUS_OK, 0, &fis.raw, 0, 0),
            (DriveKind::Cdrom, _) => abort(&fis.raw),
            (DriveKind::Disk, command) => self.ata(mem, &prdt, &fis, command),
        }
    }

    fn ata(
        &mut self,
        mem: &GuestMemory,
        prdt: &PrdTable,
        fis: &H2dFis,
        command: u8,
    ) -> CommandOutcome {
        use cmd::*;
        match command {
            READ_DMA | READ_SECTORS | READ_MULTIPLE => {
                self.rw(mem, prdt, fis, fis.lba28(), fis.count28(), false)
            }
            READ_DMA_EXT | READ_SECTORS_EXT | READ_MULTIPLE_EXT => {
                self.rw(mem, prdt, fis, fis.lba48, fis.count48(), false)
            }
            WRITE_DMA | WRITE_SECTORS | WRITE_MULTIPLE => {
                self.rw(mem, prdt, fis, fis.lba28(), fis.count28(), true)
            }
            WRITE_DMA_EXT | WRITE_SECTORS_EXT | WRITE_MULTIPLE_EXT | WRITE_DMA_FUA_EXT => {
                let outcome = self.rw(mem, prdt, fis, fis.lba48, fis.count48(), true);
                if command == WRITE_DMA_FUA_EXT && !outcome.is_error() && self.disk.flush().is_err()
                {
                    return done(STATUS_ERR, ATA_E_ABRT, &fis.raw, fis.count, 0);
                }
                outcome
            }
            READ_VERIFY | READ_VERIFY_EXT => {
                let (lba, count) = if command == READ_VERIFY {
                    (fis.lba28(), fis.count28())
                } else {
                    (fis.lba48, fis.count48())
                };
                match self.byte_range(lba, count) {
                    Some(_) => done(STATUS_OK, 0, &fis.raw, fis.count, 0),
                    None => done(STATUS_ERR, ATA_E_IDNF, &fis.raw, fis.count, 0),
                }
            }
            FLUSH_CACHE | FLUSH_CACHE_EXT => match self.disk.flush() {
                Ok(()) => done(STATUS_OK, 0, &fis.raw, fis.count, 0),
                Err(_) => done(STATUS_ERR, ATA_E_ABRT, &fis.raw, fis.count, 0),
            },
            IDENTIFY_DEVICE => {
                let data = identify::identify_device(&*self.disk);
                pio_in(mem, prdt, fis, &data)
            }
            SET_FEATURES | SET_MULTIPLE_MODE | STANDBY_IMMEDIATE | IDLE_IMMEDIATE | STANDBY
            | IDLE => done(STATUS_OK, 0, &fis.raw, fis.count, 0),
            CHECK_POWER_MODE => done(STATUS_OK, 0, &fis.raw, 0xFF, 0),
            NOP | PACKET | IDENTIFY_PACKET_DEVICE => abort(&fis.raw),
            _ => abort(&fis.raw),
        }
    }

    /// Byte offset and length of `count` sectors at `lba`, if they lie on the disk.
    fn byte_range(&self, lba: u64, count: u32) -> Option<(u64, u64)> {
        let sector = u64::from(self.disk.logical_sector_size());
        let offset = lba.checked_mul(sector)?;
        let len = u64::from(count).checked_mul(sector)?;
        crate::block::check_range(offset, len, self.disk.size()).ok()?;
        Some((offset, len))
    }

    /// A disk READ or WRITE through the PRD table.
    fn rw(
        &mut self,
        mem: &GuestMemory,
        prdt: &PrdTable,
        fis: &H2dFis,
        lba: u64,
        count: u32,
        write: bool,
    ) -> CommandOutcome {
        let Some((mut offset, len)) = self.byte_range(lba, count) else {
            return done(STATUS_ERR, ATA_E_IDNF | ATA_E_ABRT, &fis.raw, fis.count, 0);
        };
        if write && self.disk.is_read_only() {
            return abort(&fis.raw);
        }
        let disk = &self.disk;
        let result = prdt.for_each_slice(mem, len, |slice| {
            let r = if write {
                disk.write_from(offset, slice)
            } else {
                disk.read_to(offset, slice)
            };
            offset += slice.len() as u64;
            r.map_err(|_| prd::PrdError::OutsideMemory(0))
        });
        match result {
            Ok(()) => done(STATUS_OK, 0, &fis.raw, fis.count, len as u32),
            Err(_) => {
                let error = if write {
                    ATA_E_ABRT
                } else {
                    ATA_E_UNC | ATA_E_ABRT
                };
                done(STATUS_ERR, error, &fis.raw, fis.count, 0)
            }
        }
    }
}

/// A successful or failed command's outcome, with the task-file registers of `regs`.
fn done(status: u8, error: u8, regs: &[u8; FIS_LEN], count: u16, bytes: u32) -> CommandOutcome {
    CommandOutcome {
        status,
        error,
        bytes_transferred: bytes,
        d2h: d2h_fis(status, error, regs, count),
        pio_setup: None,
        soft_reset: false,
    }
}

fn abort(regs: &[u8; FIS_LEN]) -> CommandOutcome {
    let count = u16::from_le_bytes([regs[12], regs[13]]);
    done(STATUS_ERR, ATA_E_ABRT, regs, count, 0)
}

/// A PIO data-in command (IDENTIFY): data through the PRDs, then PIO setup and D2H FISes.
fn pio_in(mem: &GuestMemory, prdt: &PrdTable, fis: &H2dFis, data: &[u8]) -> CommandOutcome {
    match prdt.copy_to_guest(mem, data) {
        Ok(n) if n as usize == data.len() => CommandOutcome {
            pio_setup: Some(pio_setup_fis(STATUS_OK, &fis.raw, data.len() as u16)),
            ..done(STATUS_OK, 0, &fis.raw, fis.count, n)
        },
        _ => abort(&fis.raw),
    }
}

/// Fuzz entry point: `data` fills the start of a 64 KiB guest (command list at 0, so the
/// first 32 bytes are the command header); the command in slot 0 then runs against a disk
/// and a CD drive, each on a small in-memory disk. Must never panic.
pub fn fuzz_command(data: &[u8]) {
    use crate::block::MemDisk;
    const MEM: usize = 64 * 1024;
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let len = data.len().min(MEM);
    let _ = mem.write_slice(&data[..len], GuestAddress(0));
    for (kind, sector) in [(DriveKind::Disk, 512), (DriveKind::Cdrom, 2048)] {
        let disk: Arc<dyn BlockBackend> = Arc::new(MemDisk::new(16 * 2048, sector, false));
        let mut drive = AhciDrive::new(kind, disk);
        let outcome = drive.execute(&mem, 0, 0);
        outcome.post(&mem, 0x8000);
        // A second command sees any sense data the first one left.
        let _ = drive.execute(&mem, 0, 1);
    }
}

#[cfg(test)]
mod tests;
