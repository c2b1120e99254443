//! The PCI-to-ISA (LPC) bridge function: Intel 0x8086:0x7000, class 06/01/00.
//!
//! Its ISA devices (COM ports, RTC, power management) are separate devices on the port bus;
//! this function only identifies the bridge to the guest.

use super::{ConfigSpace, PciDevice, PciIds};

const CLASS_BRIDGE: u8 = 0x06;
const SUBCLASS_ISA_BRIDGE: u8 = 0x01;

pub struct LpcBridge {
    config: ConfigSpace,
}

impl LpcBridge {
    pub fn new() -> Self {
        LpcBridge {
            config: ConfigSpace::new(PciIds {
                vendor: 0x8086,
                device: 0x7000,
                class: CLASS_BRIDGE,
                subclass: SUBCLASS_ISA_BRIDGE,
                prog_if: 0,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl Default for LpcBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for LpcBridge {
    fn config_space(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_as_an_isa_bridge() {
        let mut lpc = LpcBridge::new();
        let mut d = [0u8; 4];
        lpc.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x7000_8086);
        lpc.read_config(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0601_0000);
    }
}
