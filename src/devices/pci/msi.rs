//! A single-vector, 64-bit MSI capability (what `-W` gives virtio devices).

use super::{ConfigSpace, ConfigSpaceError};

const CAP_ID_MSI: u8 = 0x05;
const CONTROL_ENABLE: u16 = 1 << 0;
const CONTROL_64BIT: u16 = 1 << 7;

/// Where the capability sits; its state is the configuration-space bytes.
pub struct Msi {
    cap_offset: u16,
}

impl Msi {
    pub fn new(config: &mut ConfigSpace) -> Result<Self, ConfigSpaceError> {
        // Control, address low, address high, data, 2 reserved bytes.
        let mut body = [0u8; 14];
        body[0..2].copy_from_slice(&CONTROL_64BIT.to_le_bytes());
        let cap_offset = config.add_capability(CAP_ID_MSI, &body)?;
        let at = usize::from(cap_offset);
        config.set_writable(at + 2, &CONTROL_ENABLE.to_le_bytes());
        config.set_writable(at + 4, &0xFFFF_FFFCu32.to_le_bytes());
        config.set_writable(at + 8, &0xFFFF_FFFFu32.to_le_bytes());
        config.set_writable(at + 12, &0xFFFFu16.to_le_bytes());
        Ok(Msi { cap_offset })
    }

    pub fn enabled(&self, config: &ConfigSpace) -> bool {
        config.read_u16(self.cap_offset + 2) & CONTROL_ENABLE != 0
    }

    /// The message the guest programmed: address and data.
    pub fn message(&self, config: &ConfigSpace) -> (u64, u32) {
        let low = u64::from(config.read_u32(self.cap_offset + 4));
        let high = u64::from(config.read_u32(self.cap_offset + 8));
        let data = u32::from(config.read_u16(self.cap_offset + 12));
        (high << 32 | low, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::PciIds;

    #[test]
    fn guest_programs_and_enables_one_message() {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 1,
            device: 2,
            class: 0,
            subclass: 0,
            prog_if: 0,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let msi = Msi::new(&mut config).unwrap();
        assert_eq!(
            config.read_u32(0x40),
            0x0080_0005,
            "64-bit, one vector, disabled"
        );
        assert!(!msi.enabled(&config));
        config.write(0x44, &0xFEE0_0003u32.to_le_bytes());
        config.write(0x48, &0u32.to_le_bytes());
        config.write(0x4C, &0xFFFF_0041u32.to_le_bytes());
        config.write(0x42, &0xFFFFu16.to_le_bytes());
        assert!(msi.enabled(&config));
        assert_eq!(
            config.read_u16(0x42),
            0x0081,
            "only the enable bit is writable"
        );
        assert_eq!(msi.message(&config), (0xFEE0_0000, 0x41));
    }
}
