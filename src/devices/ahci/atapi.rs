//! ATAPI PACKET commands for ahci-cd (MMC-6, the minimum a guest needs to find and read an
//! ISO 9660 image): TEST UNIT READY, REQUEST SENSE, INQUIRY, READ CAPACITY, READ(10)/(12),
//! READ TOC, MODE SENSE(10), GET CONFIGURATION, GET EVENT STATUS NOTIFICATION, START STOP
//! UNIT, PREVENT ALLOW MEDIUM REMOVAL. Anything else is CHECK CONDITION / ILLEGAL REQUEST.

use super::fis::{d2h_fis, H2dFis};
use super::prd::PrdTable;
use super::{AhciDrive, CommandOutcome, ATA_S_DRDY, ATA_S_DSC, ATA_S_ERR};
use crate::memory::GuestMemory;

/// CD sector size.
pub const CD_SECTOR: u64 = 2048;

/// Sense data left by the last command, for REQUEST SENSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
}

impl Sense {
    pub const NONE: Sense = Sense { key: 0, asc: 0 };
    const ILLEGAL_OPCODE: Sense = Sense { key: 5, asc: 0x20 };
    const LBA_OUT_OF_RANGE: Sense = Sense { key: 5, asc: 0x21 };
    const INVALID_FIELD: Sense = Sense { key: 5, asc: 0x24 };
    const READ_ERROR: Sense = Sense { key: 3, asc: 0x11 };
}

mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS: u8 = 0x4A;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const READ_12: u8 = 0xA8;
}

/// Interrupt reason in the count register at completion: I/O and C/D.
const COMPLETION_REASON: u16 = 0x03;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn good(fis: &H2dFis, bytes: u32) -> CommandOutcome {
    let status = ATA_S_DRDY | ATA_S_DSC;
    CommandOutcome {
        status,
        error: 0,
        bytes_transferred: bytes,
        d2h: d2h_fis(status, 0, &fis.raw, COMPLETION_REASON),
        pio_setup: None,
        soft_reset: false,
    }
}

fn check_condition(drive: &mut AhciDrive, fis: &H2dFis, sense: Sense) -> CommandOutcome {
    drive.sense = sense;
    let status = ATA_S_DRDY | ATA_S_ERR;
    let error = sense.key << 4;
    CommandOutcome {
        status,
        error,
        bytes_transferred: 0,
        d2h: d2h_fis(status, error, &fis.raw, COMPLETION_REASON),
        pio_setup: None,
        soft_reset: false,
    }
}

/// Sends a small response, cut to the allocation length and to what the PRDs hold.
fn respond(
    drive: &mut AhciDrive,
    mem: &GuestMemory,
    prdt: &PrdTable,
    fis: &H2dFis,
    data: &[u8],
    alloc_len: usize,
) -> CommandOutcome {
    let len = data.len().min(alloc_len);
    match prdt.copy_to_guest(mem, &data[..len]) {
        Ok(n) => {
            drive.sense = Sense::NONE;
            good(fis, n)
        }
        Err(_) => check_condition(drive, fis, Sense::INVALID_FIELD),
    }
}

/// Runs one PACKET command (`packet` is the 12/16-byte ACMD).
pub fn execute(
    drive: &mut AhciDrive,
    mem: &GuestMemory,
    prdt: &PrdTable,
    fis: &H2dFis,
    packet: &[u8; 16],
) -> CommandOutcome {
    let sectors = drive.disk.size() / CD_SECTOR;
    match packet[0] {
        op::TEST_UNIT_READY | op::START_STOP_UNIT | op::PREVENT_ALLOW => {
            drive.sense = Sense::NONE;
            good(fis, 0)
        }
        op::REQUEST_SENSE => {
            let mut data = [0u8; 18];
            data[0] = 0x70;
            data[2] = drive.sense.key;
            data[7] = 10;
            data[12] = drive.sense.asc;
            respond(drive, mem, prdt, fis, &data, usize::from(packet[4]))
        }
        op::INQUIRY => {
            if packet[1] & 1 != 0 {
                return check_condition(drive, fis, Sense::INVALID_FIELD);
            }
            let mut data = [0u8; 36];
            data[0] = 0x05; // CD/DVD
            data[1] = 0x80; // removable
            data[2] = 0x05; // SPC-3
            data[3] = 0x32; // ATAPI response format 2
            data[4] = 31;
            data[8..16].copy_from_slice(b"BHYVE   ");
            data[16..32].copy_from_slice(b"BHYVE DVD-ROM   ");
            data[32..36].copy_from_slice(b"001 ");
            respond(
                drive,
                mem,
                prdt,
                fis,
                &data,
                usize::from(be16(&packet[3..5])),
            )
        }
        op::READ_CAPACITY => {
            let mut data = [0u8; 8];
            let last = sectors.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
            data[0..4].copy_from_slice(&last.to_be_bytes());
            data[4..8].copy_from_slice(&(CD_SECTOR as u32).to_be_bytes());
            respond(drive, mem, prdt, fis, &data, data.len())
        }
        op::READ_10 | op::READ_12 => {
            let lba = u64::from(be32(&packet[2..6]));
            let count = if packet[0] == op::READ_10 {
                u64::from(be16(&packet[7..9]))
            } else {
                u64::from(be32(&packet[6..10]))
            };
            read(drive, mem, prdt, fis, lba, count, sectors)
        }
        op::READ_TOC => read_toc(drive, mem, prdt, fis, packet, sectors),
        op::MODE_SENSE_10 => mode_sense(drive, mem, prdt, fis, packet),
        op::GET_CONFIGURATION => {
            let mut data = [0u8; 16];
            data[0..4].copy_from_slice(&12u32.to_be_bytes());
            data[6..8].copy_from_slice(&0x0008u16.to_be_bytes()); // current: CD-ROM
                                                                  // Feature 0 (profile list): one profile, CD-ROM, current.
            data[10] = 0x03;
            data[11] = 4;
            data[12..14].copy_from_slice(&0x0008u16.to_be_bytes());
            data[14] = 0x01;
            respond(
                drive,
                mem,
                prdt,
                fis,
                &data,
                usize::from(be16(&packet[7..9])),
            )
        }
        op::GET_EVENT_STATUS => {
            if packet[1] & 1 == 0 {
                // Only polled operation exists on this bus.
                return check_condition(drive, fis, Sense::INVALID_FIELD);
            }
            // Media class: no change, media present.
            let data = [0, 6, 0x04, 0x10, 0, 0x02, 0, 0];
            respond(
                drive,
                mem,
                prdt,
                fis,
                &data,
                usize::from(be16(&packet[7..9])),
            )
        }
        _ => check_condition(drive, fis, Sense::ILLEGAL_OPCODE),
    }
}

fn read(
    drive: &mut AhciDrive,
    mem: &GuestMemory,
    prdt: &PrdTable,
    fis: &H2dFis,
    lba: u64,
    count: u64,
    sectors: u64,
) -> CommandOutcome {
    if lba.checked_add(count).is_none_or(|end| end > sectors) {
        return check_condition(drive, fis, Sense::LBA_OUT_OF_RANGE);
    }
    let len = count * CD_SECTOR;
    if len > u64::from(u32::MAX) {
        return check_condition(drive, fis, Sense::INVALID_FIELD);
    }
    let mut offset = lba * CD_SECTOR;
    let disk = &drive.disk;
    let result = prdt.for_each_slice(mem, len, |slice| {
        let r = disk.read_to(offset, slice);
        offset += slice.len() as u64;
        r.map_err(|_| super::prd::PrdError::OutsideMemory(0))
    });
    match result {
        Ok(()) => {
            drive.sense = Sense::NONE;
            good(fis, len as u32)
        }
        Err(super::prd::PrdError::TooShort { .. }) => {
            check_condition(drive, fis, Sense::INVALID_FIELD)
        }
        Err(_) => check_condition(drive, fis, Sense::READ_ERROR),
    }
}

/// LBA as READ TOC reports it: plain, or minutes/seconds/frames with the 2 s lead-in.
fn toc_address(lba: u64, msf: bool) -> [u8; 4] {
    if !msf {
        return (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes();
    }
    let frames = lba + 150;
    let minutes = (frames / (75 * 60)).min(255) as u8;
    [0, minutes, (frames / 75 % 60) as u8, (frames % 75) as u8]
}

fn read_toc(
    drive: &mut AhciDrive,
    mem: &GuestMemory,
    prdt: &PrdTable,
    fis: &H2dFis,
    packet: &[u8; 16],
    sectors: u64,
) -> CommandOutcome {
    let msf = packet[1] & 0x02 != 0;
    let alloc = usize::from(be16(&packet[7..9]));
    let format = match packet[2] & 0x0F {
        0 => packet[9] >> 6, // older drives put the format in the control byte
        f => f,
    };
    match format {
        0 => {
            // One data track, then the lead-out.
            let mut data = [0u8; 20];
            data[0..2].copy_from_slice(&18u16.to_be_bytes());
            data[2] = 1;
            data[3] = 1;
            data[5] = 0x14;
            data[6] = 1;
            data[8..12].copy_from_slice(&toc_address(0, msf));
            data[13] = 0x14;
            data[14] = 0xAA;
            data[16..20].copy_from_slice(&toc_address(sectors, msf));
            respond(drive, mem, prdt, fis, &data, alloc)
        }
        1 => {
            // Session information: one session starting at track 1.
            let mut data = [0u8; 12];
            data[0..2].copy_from_slice(&10u16.to_be_bytes());
            data[2] = 1;
            data[3] = 1;
            data[5] = 0x14;
            data[6] = 1;
            data[8..12].copy_from_slice(&toc_address(0, msf));
            respond(drive, mem, prdt, fis, &data, alloc)
        }
        _ => check_condition(drive, fis, Sense::INVALID_FIELD),
    }
}

fn mode_sense(
    drive: &mut AhciDrive,
    mem: &GuestMemory,
    prdt: &PrdTable,
    fis: &H2dFis,
    packet: &[u8; 16],
) -> CommandOutcome {
    const ERROR_RECOVERY: [u8; 12] = [0x01, 0x0A, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0];
    // CD capabilities: reads CD-R/RW, DVD-ROM; tray loader with eject.
    const CAPABILITIES: [u8; 28] = [
        0x2A, 0x1A, 0x3B, 0, 0x71, 0x60, 0x29, 0, 0x02, 0xC2, 0, 2, 0x02, 0, 0x02, 0xC2, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let page = packet[2] & 0x3F;
    let mut data = [0u8; 8 + ERROR_RECOVERY.len() + CAPABILITIES.len()];
    let mut len = 8;
    if page == 0x01 || page == 0x3F {
        data[len..len + ERROR_RECOVERY.len()].copy_from_slice(&ERROR_RECOVERY);
        len += ERROR_RECOVERY.len();
    }
    if page == 0x2A || page == 0x3F {
        data[len..len + CAPABILITIES.len()].copy_from_slice(&CAPABILITIES);
        len += CAPABILITIES.len();
    }
    if len == 8 || packet[2] >> 6 == 3 {
        // Unknown page, or saved values (which a CD drive does not have).
        return check_condition(drive, fis, Sense::INVALID_FIELD);
    }
    data[0..2].copy_from_slice(&((len - 2) as u16).to_be_bytes());
    let alloc = usize::from(be16(&packet[7..9]));
    let response = &data[..len];
    respond(drive, mem, prdt, fis, response, alloc)
}
