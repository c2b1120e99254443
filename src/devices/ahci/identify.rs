//! IDENTIFY DEVICE and IDENTIFY PACKET DEVICE data (ATA8-ACS 7.16, 7.17): 256 words that
//! tell the guest what the drive is and what it can do.

use crate::block::BlockBackend;

pub const IDENTIFY_LEN: usize = 512;
const FIRMWARE: &str = "001";
const DISK_MODEL: &str = "BHYVE SATA DISK";
const CD_MODEL: &str = "BHYVE SATA DVD ROM";

/// ATA strings: space-padded, two characters a word, the first in the high byte.
fn put_string(words: &mut [u16; 256], first: usize, len_words: usize, text: &[u8]) {
    for i in 0..len_words {
        let hi = text.get(2 * i).copied().unwrap_or(b' ');
        let lo = text.get(2 * i + 1).copied().unwrap_or(b' ');
        words[first + i] = u16::from(hi) << 8 | u16::from(lo);
    }
}

/// Word 255: signature 0xA5 and a checksum that makes all 512 bytes sum to zero.
fn finish(mut words: [u16; 256]) -> [u8; IDENTIFY_LEN] {
    words[255] = 0xA5;
    let sum = words[..255].iter().fold(0xA5u8, |acc, w| {
        acc.wrapping_add(*w as u8).wrapping_add((*w >> 8) as u8)
    });
    words[255] |= u16::from(sum.wrapping_neg()) << 8;
    let mut bytes = [0u8; IDENTIFY_LEN];
    for (chunk, w) in bytes.chunks_exact_mut(2).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    bytes
}

fn common(words: &mut [u16; 256], disk: &dyn BlockBackend, model: &str) {
    put_string(words, 10, 10, disk.serial());
    put_string(words, 23, 4, FIRMWARE.as_bytes());
    put_string(words, 27, 20, model.as_bytes());
    words[49] = 1 << 8 | 1 << 9 | 1 << 11; // DMA, LBA, IORDY
    words[53] = 0x0006; // words 64-70 and 88 are valid
    words[63] = 0x0007; // multiword DMA 0-2
    words[64] = 0x0003; // PIO 3-4
    words[65..=68].copy_from_slice(&[120, 120, 120, 120]);
    words[76] = 1 << 1 | 1 << 2; // SATA gen 1 and 2 (no NCQ)
    words[80] = 0x01F0; // ATA/ATAPI-4 to ATA8-ACS
    words[88] = 0x003F | 1 << 13; // UDMA 0-5, mode 5 selected
}

/// IDENTIFY DEVICE for a disk.
pub fn identify_device(disk: &dyn BlockBackend) -> [u8; IDENTIFY_LEN] {
    let mut w = [0u16; 256];
    let sectors = disk.sectors();
    w[0] = 0x0040; // fixed device
    w[1] = 16383;
    w[3] = 16;
    w[6] = 63;
    common(&mut w, disk, DISK_MODEL);
    w[47] = 0x8000 | 128;
    w[50] = 0x4000;
    w[59] = 0x0100 | 128;
    let lba28 = sectors.min(0x0FFF_FFFF) as u32;
    w[60] = lba28 as u16;
    w[61] = (lba28 >> 16) as u16;
    // Write cache, NOP; 48-bit, FLUSH CACHE, FLUSH CACHE EXT; both supported and enabled.
    w[82] = 1 << 5 | 1 << 14;
    w[83] = 0x4000 | 1 << 10 | 1 << 12 | 1 << 13;
    w[84] = 0x4000;
    w[85] = w[82];
    w[86] = 1 << 10 | 1 << 12 | 1 << 13;
    w[87] = 0x4000;
    for (i, word) in w[100..104].iter_mut().enumerate() {
        *word = (sectors >> (16 * i)) as u16;
    }
    let logical = disk.logical_sector_size();
    let physical = disk.physical_sector_size().max(logical);
    let ratio_log2 = (physical / logical).trailing_zeros() as u16;
    w[106] = 0x4000 | ratio_log2;
    if ratio_log2 > 0 {
        w[106] |= 1 << 13;
    }
    if logical > 512 {
        w[106] |= 1 << 12;
        let words = logical / 2;
        w[117] = words as u16;
        w[118] = (words >> 16) as u16;
    }
    w[217] = 1; // non-rotating
    finish(w)
}

/// IDENTIFY PACKET DEVICE for a CD drive.
pub fn identify_packet_device(disk: &dyn BlockBackend) -> [u8; IDENTIFY_LEN] {
    let mut w = [0u16; 256];
    // ATAPI, CD/DVD device type 5, removable, DRQ within 50 us, 12-byte packets.
    w[0] = 0x8000 | 5 << 8 | 1 << 7 | 2 << 5;
    common(&mut w, disk, CD_MODEL);
    w[82] = 1 << 4 | 1 << 14; // PACKET feature set, NOP
    w[85] = w[82];
    w[84] = 0x4000;
    w[87] = 0x4000;
    finish(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;

    fn word(id: &[u8; 512], n: usize) -> u16 {
        u16::from_le_bytes([id[2 * n], id[2 * n + 1]])
    }

    fn checksum_ok(id: &[u8; 512]) -> bool {
        id.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0 && id[510] == 0xA5
    }

    #[test]
    fn disk_identify_reports_size_and_features() {
        let disk = MemDisk::new(1 << 20, 512, false);
        let id = identify_device(&disk);
        assert!(checksum_ok(&id));
        assert_eq!(word(&id, 60) as u32 | (word(&id, 61) as u32) << 16, 2048);
        assert_eq!(word(&id, 100), 2048);
        assert_ne!(word(&id, 83) & 1 << 10, 0, "48-bit");
        assert_ne!(word(&id, 49) & 1 << 8, 0, "DMA");
        // Model: "BH" in word 27, high byte first.
        assert_eq!(word(&id, 27), u16::from_be_bytes(*b"BH"));
        assert_eq!(word(&id, 10), u16::from_be_bytes(*b"BH"));
        assert_eq!(word(&id, 106), 0x4000);
    }

    #[test]
    fn large_sectors_are_described() {
        let disk = MemDisk::new(1 << 20, 4096, false);
        let id = identify_device(&disk);
        assert!(checksum_ok(&id));
        assert_eq!(word(&id, 106), 0x4000 | 1 << 12);
        assert_eq!(word(&id, 117), 2048);
        assert_eq!(word(&id, 100), 256);
    }

    #[test]
    fn packet_identify_is_a_removable_cd() {
        let disk = MemDisk::new(1 << 20, 2048, true);
        let id = identify_packet_device(&disk);
        assert!(checksum_ok(&id));
        assert_eq!(word(&id, 0), 0x85C0);
    }
}
