//! Ethernet MAC addresses: parsing `mac=`, printing for `-M`, and deriving one from `-U`.
//!
//! The rule (stable across runs and versions, so a guest keeps its DHCP lease):
//! `02:h0:h1:h2:h3:h4`, where `h` is SHA-256 over the ASCII tag `xhyve-net`, the 16 bytes of
//! the `-U` UUID (all zero without `-U`), then the PCI bus, slot and function bytes of the
//! network device. `02` in the first byte marks a locally administered unicast address, so it
//! cannot collide with a vendor's.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("invalid MAC address \"{0}\": expected xx:xx:xx:xx:xx:xx")]
    Syntax(String),
    #[error("invalid MAC address \"{0}\": multicast addresses cannot name a NIC")]
    Multicast(String),
    #[error("invalid MAC address \"{0}\": all zeros")]
    Zero(String),
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, MacError> {
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(|| MacError::Syntax(s.into()))?;
            let hex = !part.is_empty() && part.len() <= 2;
            if !hex || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(MacError::Syntax(s.into()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacError::Syntax(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(MacError::Syntax(s.into()));
        }
        if bytes[0] & 1 != 0 {
            return Err(MacError::Multicast(s.into()));
        }
        if bytes == [0; 6] {
            return Err(MacError::Zero(s.into()));
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// The MAC of the network device at `bus:slot:function` of the VM with `uuid` (see the
/// module documentation for the rule).
pub fn derive_mac(uuid: Option<[u8; 16]>, bus: u8, slot: u8, function: u8) -> MacAddr {
    let mut hash = Sha256::new();
    hash.update(b"xhyve-net");
    hash.update(uuid.unwrap_or([0; 16]));
    hash.update([bus, slot, function]);
    let digest = hash.finalize();
    let mut mac = [0x02, 0, 0, 0, 0, 0];
    mac[1..].copy_from_slice(&digest[..5]);
    MacAddr(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let mac: MacAddr = "02:aB:0:ff:10:9".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0xAB, 0x00, 0xFF, 0x10, 0x09]);
        assert_eq!(mac.to_string(), "02:ab:00:ff:10:09");
    }

    #[test]
    fn rejects_bad_addresses_naming_them() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:00:00:00:00:100",
            "02:00:00:00:00:g0",
            "02-00-00-00-00-01",
            "02:00:00:00::01",
            "02:00:00:00:00:+1",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(MacError::Syntax(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            "01:00:5e:00:00:01"
                .parse::<MacAddr>()
                .unwrap_err()
                .to_string(),
            "invalid MAC address \"01:00:5e:00:00:01\": multicast addresses cannot name a NIC"
        );
        assert!(matches!(
            "00:00:00:00:00:00".parse::<MacAddr>(),
            Err(MacError::Zero(_))
        ));
    }

    #[test]
    fn derived_macs_are_stable_local_unicast_and_differ_by_uuid_and_slot() {
        let uuid = Some(*b"0123456789abcdef");
        let a = derive_mac(uuid, 0, 2, 0);
        assert_eq!(a, derive_mac(uuid, 0, 2, 0));
        assert_eq!(a.0[0], 0x02);
        assert_ne!(a, derive_mac(uuid, 0, 3, 0));
        assert_ne!(a, derive_mac(uuid, 0, 2, 1));
        assert_ne!(a, derive_mac(None, 0, 2, 0));
        // Pinned (computed independently with Python's hashlib): changing the rule would
        // change every guest's MAC and so its DHCP lease.
        assert_eq!(derive_mac(None, 0, 2, 0).to_string(), "02:3d:24:62:2e:30");
        let counting: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            derive_mac(Some(counting), 0, 3, 0).to_string(),
            "02:1a:74:6e:9f:28"
        );
    }
}
