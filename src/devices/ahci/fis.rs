//! Frame Information Structures (SATA 3.x 10.5): the host-to-device register FIS a command
//! arrives in, and the device-to-host register / PIO setup FISes its answer goes out in.

pub const FIS_TYPE_H2D_REGISTER: u8 = 0x27;
pub const FIS_TYPE_D2H_REGISTER: u8 = 0x34;
pub const FIS_TYPE_PIO_SETUP: u8 = 0x5F;
/// Length of a register FIS (H2D, D2H) and a PIO setup FIS.
pub const FIS_LEN: usize = 20;
/// Offsets of the posted FISes inside a port's received-FIS area (AHCI 1.3 4.2.1).
pub const RX_PIO_SETUP_OFFSET: u64 = 0x20;
pub const RX_D2H_OFFSET: u64 = 0x40;

/// Why a command FIS could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FisError {
    #[error("command FIS of {0} bytes is too short")]
    TooShort(usize),
    #[error("command FIS type {0:#04x} is not a host-to-device register FIS")]
    WrongType(u8),
}

/// A host-to-device register FIS, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2dFis {
    /// C bit: a command (set) rather than a device control update (clear).
    pub is_command: bool,
    pub command: u8,
    pub features: u16,
    /// The 48 LBA bits as sent (bytes 4-6 and 8-10).
    pub lba48: u64,
    pub device: u8,
    pub count: u16,
    pub control: u8,
    /// The raw bytes, echoed in the answer where the protocol asks for it.
    pub raw: [u8; FIS_LEN],
}

impl H2dFis {
    /// Decodes the first 20 bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, FisError> {
        let raw: [u8; FIS_LEN] = bytes
            .get(..FIS_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(FisError::TooShort(bytes.len()))?;
        if raw[0] != FIS_TYPE_H2D_REGISTER {
            return Err(FisError::WrongType(raw[0]));
        }
        let lba48 = u64::from(raw[4])
            | u64::from(raw[5]) << 8
            | u64::from(raw[6]) << 16
            | u64::from(raw[8]) << 24
            | u64::from(raw[9]) << 32
            | u64::from(raw[10]) << 40;
        Ok(H2dFis {
            is_command: raw[1] & 0x80 != 0,
            command: raw[2],
            features: u16::from(raw[3]) | u16::from(raw[11]) << 8,
            lba48,
            device: raw[7],
            count: u16::from(raw[12]) | u16::from(raw[13]) << 8,
            control: raw[15],
            raw,
        })
    }

    /// LBA of a 28-bit command: 24 bits plus the device register's low nibble.
    pub fn lba28(&self) -> u64 {
        (self.lba48 & 0x00FF_FFFF) | u64::from(self.device & 0x0F) << 24
    }

    /// Sector count of a 28-bit command (0 means 256).
    pub fn count28(&self) -> u32 {
        match self.count & 0xFF {
            0 => 256,
            n => u32::from(n),
        }
    }

    /// Sector count of a 48-bit command (0 means 65536).
    pub fn count48(&self) -> u32 {
        match self.count {
            0 => 65536,
            n => u32::from(n),
        }
    }
}

/// A device-to-host register FIS with the interrupt bit set: `status`, `error`, and the
/// task-file registers given (LBA bytes 4-10 as in the command, `count`).
pub fn d2h_fis(status: u8, error: u8, regs: &[u8; FIS_LEN], count: u16) -> [u8; FIS_LEN] {
    let mut fis = [0u8; FIS_LEN];
    fis[0] = FIS_TYPE_D2H_REGISTER;
    fis[1] = 0x40;
    fis[2] = status;
    fis[3] = error;
    fis[4..11].copy_from_slice(&regs[4..11]);
    fis[12..14].copy_from_slice(&count.to_le_bytes());
    fis
}

/// A PIO setup FIS for a device-to-host data transfer of `len` bytes, ending in `status`.
pub fn pio_setup_fis(status: u8, regs: &[u8; FIS_LEN], len: u16) -> [u8; FIS_LEN] {
    let mut fis = [0u8; FIS_LEN];
    fis[0] = FIS_TYPE_PIO_SETUP;
    fis[1] = 0x20 | 0x40; // D: device to host; I: interrupt
    fis[2] = status;
    fis[4..11].copy_from_slice(&regs[4..11]);
    fis[12..14].copy_from_slice(&regs[12..14]);
    fis[15] = status;
    fis[16..18].copy_from_slice(&len.to_le_bytes());
    fis
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_48_bit_read() {
        let mut b = [0u8; 64];
        b[0] = 0x27;
        b[1] = 0x80;
        b[2] = 0x25;
        b[4..7].copy_from_slice(&[0x01, 0x02, 0x03]);
        b[7] = 0x40;
        b[8..11].copy_from_slice(&[0x04, 0x05, 0x06]);
        b[12] = 0x10;
        let fis = H2dFis::parse(&b).unwrap();
        assert!(fis.is_command);
        assert_eq!(fis.command, 0x25);
        assert_eq!(fis.lba48, 0x0605_0403_0201);
        assert_eq!(fis.count48(), 16);
        b[12] = 0;
        assert_eq!(H2dFis::parse(&b).unwrap().count48(), 65536);
    }

    #[test]
    fn lba28_takes_the_device_nibble() {
        let mut b = [0u8; 20];
        b[0] = 0x27;
        b[4..7].copy_from_slice(&[0xAA, 0xBB, 0xCC]);
        b[7] = 0xEF;
        b[8] = 0x99; // ignored by 28-bit commands
        let fis = H2dFis::parse(&b).unwrap();
        assert!(!fis.is_command);
        assert_eq!(fis.lba28(), 0x0FCC_BBAA);
        assert_eq!(fis.count28(), 256);
    }

    #[test]
    fn rejects_short_and_foreign_fises() {
        assert_eq!(H2dFis::parse(&[0x27; 19]), Err(FisError::TooShort(19)));
        assert_eq!(H2dFis::parse(&[0x34; 20]), Err(FisError::WrongType(0x34)));
    }

    #[test]
    fn answers_carry_status_and_registers() {
        let mut regs = [0u8; 20];
        regs[4] = 9;
        let d2h = d2h_fis(0x41, 0x04, &regs, 3);
        assert_eq!(&d2h[..5], &[0x34, 0x40, 0x41, 0x04, 9]);
        assert_eq!(d2h[12], 3);
        let pio = pio_setup_fis(0x50, &regs, 512);
        assert_eq!((pio[0], pio[1], pio[15]), (0x5F, 0x60, 0x50));
        assert_eq!(u16::from_le_bytes([pio[16], pio[17]]), 512);
    }
}
