//! The host bridge at 0:0.0: `hostbridge` (xhyve's NetApp IDs) or `amd_hostbridge`.

use super::{ConfigSpace, PciDevice, PciIds};

const CLASS_BRIDGE: u8 = 0x06;
const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

/// A host bridge: identity only, no BARs.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    fn with_ids(vendor: u16, device: u16) -> Self {
        HostBridge {
            config: ConfigSpace::new(PciIds {
                vendor,
                device,
                class: CLASS_BRIDGE,
                subclass: SUBCLASS_HOST_BRIDGE,
                prog_if: 0,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }

    /// `-s N,hostbridge`: NetApp 0x1275:0x1275, as xhyve.
    pub fn netapp() -> Self {
        Self::with_ids(0x1275, 0x1275)
    }

    /// `-s N,amd_hostbridge`: AMD 0x1022:0x7432.
    pub fn amd() -> Self {
        Self::with_ids(0x1022, 0x7432)
    }
}

impl PciDevice for HostBridge {
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

    fn dword(dev: &mut dyn PciDevice, offset: u16) -> u32 {
        let mut d = [0u8; 4];
        dev.read_config(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn identities() {
        let mut netapp = HostBridge::netapp();
        assert_eq!(dword(&mut netapp, 0), 0x1275_1275);
        assert_eq!(dword(&mut netapp, 8), 0x0600_0000);
        let mut amd = HostBridge::amd();
        assert_eq!(dword(&mut amd, 0), 0x7432_1022);
        assert_eq!(dword(&mut amd, 8), 0x0600_0000);
        assert_eq!(dword(&mut amd, 0x0C) >> 16 & 0x7F, 0, "type-0 header");
    }
}
