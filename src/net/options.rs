//! Options of the network devices, parsed once by the command line and handed to the device
//! manager as they are: `virtio-tap,tapN[,mac=xx:xx:xx:xx:xx:xx]` (Linux) and
//! `virtio-net[,mac=xx:xx:xx:xx:xx:xx]` (macOS vmnet).

use super::{valid_interface_name, MacAddr, MacError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetOptionsError {
    #[error("tap name \"{0}\" must be 1-15 letters, digits, '-', '_' or '.' (e.g. tap0)")]
    TapName(String),
    #[error(transparent)]
    Mac(#[from] MacError),
    #[error("mac= given twice")]
    MacTwice,
    #[error("unknown option \"{0}\"")]
    Unknown(String),
}

/// `virtio-tap` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapOptions {
    /// The host interface, e.g. `tap0`.
    pub name: String,
    /// `mac=`: overrides the MAC derived from `-U`.
    pub mac: Option<MacAddr>,
}

impl TapOptions {
    /// Parses everything after `virtio-tap,` (absent: an error naming the empty tap).
    pub fn parse(options: Option<&str>) -> Result<Self, NetOptionsError> {
        let mut fields = options.unwrap_or_default().split(',');
        let name = fields.next().unwrap_or_default();
        if !valid_interface_name(name) {
            return Err(NetOptionsError::TapName(name.to_string()));
        }
        Ok(TapOptions {
            name: name.to_string(),
            mac: parse_mac_option(fields)?,
        })
    }
}

/// `virtio-net` (vmnet) options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmnetOptions {
    /// `mac=`: overrides the MAC vmnet assigns. Our extension: xhyve takes no options here.
    pub mac: Option<MacAddr>,
}

impl VmnetOptions {
    /// Parses everything after `virtio-net,` (may be absent).
    pub fn parse(options: Option<&str>) -> Result<Self, NetOptionsError> {
        let fields = options.into_iter().flat_map(|o| o.split(','));
        Ok(VmnetOptions {
            mac: parse_mac_option(fields)?,
        })
    }
}

/// The only option the network devices share: at most one `mac=`.
fn parse_mac_option<'a>(
    fields: impl Iterator<Item = &'a str>,
) -> Result<Option<MacAddr>, NetOptionsError> {
    let mut mac = None;
    for field in fields {
        match field.split_once('=') {
            Some(("mac", value)) if mac.is_none() => mac = Some(value.parse()?),
            Some(("mac", _)) => return Err(NetOptionsError::MacTwice),
            _ => return Err(NetOptionsError::Unknown(field.to_string())),
        }
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(options: &str) -> String {
        TapOptions::parse(Some(options)).unwrap_err().to_string()
    }

    #[test]
    fn name_and_mac() {
        assert_eq!(
            TapOptions::parse(Some("tap0")).unwrap(),
            TapOptions {
                name: "tap0".into(),
                mac: None
            }
        );
        assert_eq!(
            TapOptions::parse(Some("tap12,mac=02:00:00:00:00:07"))
                .unwrap()
                .mac,
            Some(MacAddr([2, 0, 0, 0, 0, 7]))
        );
    }

    #[test]
    fn bad_options_name_the_value() {
        assert_eq!(
            TapOptions::parse(None).unwrap_err().to_string(),
            "tap name \"\" must be 1-15 letters, digits, '-', '_' or '.' (e.g. tap0)"
        );
        assert!(error("tap/0").contains("tap name \"tap/0\""));
        assert!(error("a234567890123456").contains("tap name"));
        assert_eq!(
            error("tap0,mac=zz"),
            "invalid MAC address \"zz\": expected xx:xx:xx:xx:xx:xx"
        );
        assert!(error("tap0,mac=01:00:00:00:00:01").contains("multicast"));
        assert_eq!(error("tap0,speed=10"), "unknown option \"speed=10\"");
        assert!(error("tap0,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02").contains("twice"));
    }

    #[test]
    fn vmnet_options_take_only_a_mac() {
        assert_eq!(
            VmnetOptions::parse(None).unwrap(),
            VmnetOptions { mac: None }
        );
        assert_eq!(
            VmnetOptions::parse(Some("mac=02:00:00:00:00:07"))
                .unwrap()
                .mac,
            Some(MacAddr([2, 0, 0, 0, 0, 7]))
        );
        let error = |options| VmnetOptions::parse(Some(options)).unwrap_err().to_string();
        assert_eq!(error("tap0"), "unknown option \"tap0\"");
        assert_eq!(
            error("mac=zz"),
            "invalid MAC address \"zz\": expected xx:xx:xx:xx:xx:xx"
        );
        assert!(error("mac=02:00:00:00:00:01,mac=02:00:00:00:00:02").contains("twice"));
    }
}
