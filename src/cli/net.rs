//! Options of the network devices: `virtio-tap,tapN[,mac=xx:xx:xx:xx:xx:xx]` (Linux),
//! `virtio-net[,...]` (vmnet on macOS, the built-in network, daemons' sockets), and the MAC
//! that `-M` prints.

use super::{CliError, PciDeviceConfig, PciDeviceKind, VmConfig};
use crate::net::options::{parse_net_options, NetOptions};
use crate::net::{derive_mac, valid_interface_name, MacAddr};

/// A parsed `virtio-tap` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapOptions {
    /// The host interface, e.g. `tap0`.
    pub name: String,
    /// `mac=`: overrides the MAC derived from `-U`.
    pub mac: Option<MacAddr>,
}

/// Parses the options of `-s spec` (everything after `virtio-tap,`).
pub fn parse_tap_options(spec: &str, options: Option<&str>) -> Result<TapOptions, CliError> {
    let invalid = |reason: String| CliError::InvalidNetOptions {
        spec: spec.to_string(),
        reason,
    };
    let mut fields = options.unwrap_or_default().split(',');
    let name = fields.next().unwrap_or_default();
    if !valid_interface_name(name) {
        return Err(invalid(format!(
            "tap name \"{name}\" must be 1-15 letters, digits, '-', '_' or '.' (e.g. tap0)"
        )));
    }
    Ok(TapOptions {
        name: name.to_string(),
        mac: parse_mac_option(fields, invalid)?,
    })
}

/// A parsed `virtio-net` configuration: vmnet (macOS's default), the built-in network
/// (`user`; Linux's default) or a daemon's socket (see [`crate::net::options`]).
pub type VmnetOptions = NetOptions;

/// Parses the options of `-s spec` (everything after `virtio-net,`; may be absent).
pub fn parse_vmnet_options(spec: &str, options: Option<&str>) -> Result<NetOptions, CliError> {
    parse_net_options(options).map_err(|e| CliError::InvalidNetOptions {
        spec: spec.to_string(),
        reason: e.to_string(),
    })
}

/// The only option the network devices share: at most one `mac=`.
fn parse_mac_option<'a>(
    fields: impl Iterator<Item = &'a str>,
    invalid: impl Fn(String) -> CliError,
) -> Result<Option<MacAddr>, CliError> {
    let mut mac = None;
    for field in fields {
        match field.split_once('=') {
            Some(("mac", value)) if mac.is_none() => {
                mac = Some(value.parse().map_err(|e| invalid(format!("{e}")))?);
            }
            Some(("mac", _)) => return Err(invalid("mac= given twice".into())),
            _ => return Err(invalid(format!("unknown option \"{field}\""))),
        }
    }
    Ok(mac)
}

/// The MAC of a network device: its `mac=`, else the one derived from `-U` and its slot.
pub fn tap_mac(uuid: Option<[u8; 16]>, device: &PciDeviceConfig, options: &TapOptions) -> MacAddr {
    options
        .mac
        .unwrap_or_else(|| derive_mac(uuid, device.bus, device.slot, device.function))
}

/// The MAC of a `virtio-net` device that vmnet does not assign: its `mac=`, else derived from
/// `-U` and its slot, as a tap's.
pub fn net_mac(uuid: Option<[u8; 16]>, device: &PciDeviceConfig, options: &NetOptions) -> MacAddr {
    options
        .mac
        .unwrap_or_else(|| derive_mac(uuid, device.bus, device.slot, device.function))
}

/// The first network device (the one `-M` describes; as in xhyve, `-M` without a network
/// device does nothing).
pub fn first_nic(config: &VmConfig) -> Option<&PciDeviceConfig> {
    config
        .pci_devices
        .iter()
        .find(|d| matches!(d.kind, PciDeviceKind::VirtioTap | PciDeviceKind::VirtioNet))
}

/// The MAC of the first network device where the command line alone decides it: a tap's,
/// a vmnet device's `mac=`, or the derived one of every other back end. `None` for vmnet
/// without `mac=`: vmnet assigns that one.
pub fn first_nic_mac(config: &VmConfig) -> Option<MacAddr> {
    let device = first_nic(config)?;
    let spec = device.options.as_deref();
    match device.kind {
        PciDeviceKind::VirtioTap => {
            let options = parse_tap_options("", spec).ok()?;
            Some(tap_mac(config.uuid, device, &options))
        }
        _ => {
            let options = parse_vmnet_options("", spec).ok()?;
            match options.mac {
                Some(mac) => Some(mac),
                None if options.uses_vmnet() => None,
                None => Some(net_mac(config.uuid, device, &options)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(options: &str) -> String {
        parse_tap_options("2,virtio-tap,x", Some(options))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn name_and_mac() {
        assert_eq!(
            parse_tap_options("s", Some("tap0")).unwrap(),
            TapOptions {
                name: "tap0".into(),
                mac: None
            }
        );
        assert_eq!(
            parse_tap_options("s", Some("tap12,mac=02:00:00:00:00:07"))
                .unwrap()
                .mac,
            Some(MacAddr([2, 0, 0, 0, 0, 7]))
        );
    }

    #[test]
    fn bad_options_name_the_value() {
        assert_eq!(
            parse_tap_options("2,virtio-tap", None)
                .unwrap_err()
                .to_string(),
            "invalid -s \"2,virtio-tap\": tap name \"\" must be 1-15 letters, digits, '-', '_' or '.' (e.g. tap0)"
        );
        assert!(error("tap/0").contains("tap name \"tap/0\""));
        assert!(error("a234567890123456").contains("tap name"));
        assert_eq!(
            error("tap0,mac=zz"),
            "invalid -s \"2,virtio-tap,x\": invalid MAC address \"zz\": expected xx:xx:xx:xx:xx:xx"
        );
        assert!(error("tap0,mac=01:00:00:00:00:01").contains("multicast"));
        assert_eq!(
            error("tap0,speed=10"),
            "invalid -s \"2,virtio-tap,x\": unknown option \"speed=10\""
        );
        assert!(error("tap0,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02").contains("twice"));
    }

    #[test]
    fn first_nic_mac_prefers_mac_option_then_derives_from_uuid_and_slot() {
        let mut config = VmConfig::with_firmware(crate::cli::Firmware::Kexec {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
        });
        assert_eq!(first_nic_mac(&config), None);
        let tap = |slot, options: &str| PciDeviceConfig {
            bus: 0,
            slot,
            function: 0,
            kind: PciDeviceKind::VirtioTap,
            options: Some(options.into()),
        };
        config.pci_devices.push(tap(3, "tap0"));
        config
            .pci_devices
            .push(tap(4, "tap1,mac=02:00:00:00:00:09"));
        config.uuid = Some([7; 16]);
        assert_eq!(
            first_nic_mac(&config),
            Some(derive_mac(Some([7; 16]), 0, 3, 0))
        );
        config.pci_devices.remove(0);
        assert_eq!(first_nic_mac(&config), Some(MacAddr([2, 0, 0, 0, 0, 9])));

        // A vmnet device first: its mac=, or nothing the command line can tell.
        let vmnet = |options: Option<&str>| PciDeviceConfig {
            kind: PciDeviceKind::VirtioNet,
            options: options.map(str::to_string),
            ..tap(2, "")
        };
        config.pci_devices.insert(0, vmnet(None));
        assert_eq!(first_nic(&config).map(|d| d.slot), Some(2));
        if cfg!(target_os = "macos") {
            assert_eq!(first_nic_mac(&config), None);
        } else {
            // The built-in network: derived like a tap's.
            assert_eq!(
                first_nic_mac(&config),
                Some(derive_mac(Some([7; 16]), 0, 2, 0))
            );
        }
        config.pci_devices[0] = vmnet(Some("socket=/tmp/x.sock"));
        assert_eq!(
            first_nic_mac(&config),
            Some(derive_mac(Some([7; 16]), 0, 2, 0))
        );
        config.pci_devices[0] = vmnet(Some("mac=02:00:00:00:00:0a"));
        assert_eq!(first_nic_mac(&config), Some(MacAddr([2, 0, 0, 0, 0, 10])));
    }

    #[test]
    fn vmnet_options_take_a_mac_and_name_bad_options() {
        assert_eq!(parse_vmnet_options("2,virtio-net", None).unwrap().mac, None);
        assert_eq!(
            parse_vmnet_options("s", Some("mac=02:00:00:00:00:07"))
                .unwrap()
                .mac,
            Some(MacAddr([2, 0, 0, 0, 0, 7]))
        );
        let error = |options| {
            parse_vmnet_options("2,virtio-net,x", Some(options))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error("tap0"),
            "invalid -s \"2,virtio-net,x\": unknown option \"tap0\""
        );
        assert_eq!(
            error("mac=zz"),
            "invalid -s \"2,virtio-net,x\": invalid MAC address \"zz\": expected xx:xx:xx:xx:xx:xx"
        );
        assert!(error("mac=02:00:00:00:00:01,mac=02:00:00:00:00:02").contains("twice"));
    }
}
