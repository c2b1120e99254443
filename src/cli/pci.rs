//! `-s [bus:]slot[:func],emulation[,config]`: one PCI device per argument.

use super::{BlockOptions, CliError, DeviceConfig, DeviceKind, NetOptions, PciAddress, TapOptions};
use crate::config::{FsOptions, P9Options};
use crate::fs::options::parse_vsock;

/// Emulations of xhyve/HyperKit that this port will add later; named so users get
/// "not supported yet" rather than "unknown device".
const LATER_EMULATIONS: &[&str] = &["virtio-vpnkit", "uart", "e1000", "fbuf", "dummy"];

const BLOCK_USAGE: &str = "PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync]\
                           [,format=raw|qcow2][,l2-cache-size=BYTES]";

/// Parses one `-s` argument, options included (without checking it against other devices).
pub fn parse_pci_device(spec: &str) -> Result<DeviceConfig, CliError> {
    let mut fields = spec.splitn(3, ',');
    let location = fields.next().unwrap_or_default();
    let emulation = fields.next().unwrap_or_default();
    let options = fields.next();

    let (bus, slot, function) = parse_location(location)?;
    if emulation.is_empty() {
        return Err(CliError::MissingPciEmulation(spec.to_string()));
    }
    let no_options = |kind: DeviceKind| match options {
        Some(_) => Err(CliError::PciOptionsNotAccepted {
            spec: spec.to_string(),
            name: kind.name(),
        }),
        None => Ok(kind),
    };
    let block = |name: &'static str| -> Result<BlockOptions, CliError> {
        let Some(options) = options else {
            return Err(CliError::PciOptionsRequired {
                spec: spec.to_string(),
                name,
                usage: BLOCK_USAGE,
            });
        };
        BlockOptions::parse(options).map_err(|source| CliError::InvalidBlockOptions {
            spec: spec.to_string(),
            source,
        })
    };
    let share_error = |source| CliError::InvalidShareOptions {
        spec: spec.to_string(),
        source,
    };
    let net_error = |source| CliError::InvalidNetOptions {
        spec: spec.to_string(),
        source,
    };
    let kind = match emulation {
        "hostbridge" => no_options(DeviceKind::Hostbridge)?,
        "amd_hostbridge" => no_options(DeviceKind::AmdHostbridge)?,
        "lpc" => no_options(DeviceKind::Lpc)?,
        "virtio-rnd" => no_options(DeviceKind::VirtioRnd)?,
        "virtio-blk" => DeviceKind::VirtioBlk(block("virtio-blk")?),
        "ahci-hd" => DeviceKind::AhciHd(block("ahci-hd")?),
        "ahci-cd" => DeviceKind::AhciCd(block("ahci-cd")?),
        "virtio-tap" => DeviceKind::VirtioTap(TapOptions::parse(options).map_err(net_error)?),
        "virtio-net" => DeviceKind::VirtioNet(NetOptions::parse(options).map_err(net_error)?),
        "virtio-9p" => DeviceKind::Virtio9p(P9Options::parse(options).map_err(share_error)?),
        "virtio-fs" => DeviceKind::VirtioFs(FsOptions::parse(options).map_err(share_error)?),
        "virtio-sock" => DeviceKind::VirtioSock(parse_vsock(options).map_err(share_error)?),
        later if LATER_EMULATIONS.contains(&later) => {
            return Err(CliError::NotSupportedYet(format!(
                "-s {spec} (PCI device \"{later}\")"
            )))
        }
        unknown => {
            return Err(CliError::UnknownPciDevice {
                bus,
                slot,
                name: unknown.to_string(),
            })
        }
    };
    if kind == DeviceKind::Lpc && bus != 0 {
        return Err(CliError::InvalidPciPlacement {
            spec: spec.to_string(),
            reason: "the LPC bridge must be on bus 0",
        });
    }
    Ok(DeviceConfig {
        address: PciAddress {
            bus,
            slot,
            function,
        },
        kind,
    })
}

/// Adds a parsed device to the list, rejecting an occupied bus:slot:func and a second LPC
/// bridge. These are the only placement rules; the device manager trusts them.
pub fn add_pci_device(
    devices: &mut Vec<DeviceConfig>,
    spec: &str,
    device: DeviceConfig,
) -> Result<(), CliError> {
    if devices.iter().any(|d| d.address == device.address) {
        let PciAddress {
            bus,
            slot,
            function,
        } = device.address;
        return Err(CliError::PciSlotOccupied {
            bus,
            slot,
            function,
        });
    }
    if device.kind == DeviceKind::Lpc && devices.iter().any(|d| d.kind == DeviceKind::Lpc) {
        return Err(CliError::InvalidPciPlacement {
            spec: spec.to_string(),
            reason: "only one LPC bridge is allowed",
        });
    }
    devices.push(device);
    Ok(())
}

/// A function other than 0 needs function 0 in its slot: guests (Linux, FreeBSD, firmware)
/// probe function 0 and skip the slot when it is absent, so the device would silently vanish.
pub fn check_function_zero(devices: &[DeviceConfig]) -> Result<(), CliError> {
    for d in devices.iter().filter(|d| d.address.function != 0) {
        let a = d.address;
        let has_zero = devices
            .iter()
            .any(|z| (z.address.bus, z.address.slot, z.address.function) == (a.bus, a.slot, 0));
        if !has_zero {
            return Err(CliError::MissingFunctionZero {
                bus: a.bus,
                slot: a.slot,
                function: a.function,
            });
        }
    }
    Ok(())
}

/// `slot`, `slot:func` or `bus:slot:func`.
fn parse_location(location: &str) -> Result<(u8, u8, u8), CliError> {
    let numbers: Vec<&str> = location.split(':').collect();
    let (bus, slot, function) = match numbers.as_slice() {
        [slot] => ("0", *slot, "0"),
        [slot, function] => ("0", *slot, *function),
        [bus, slot, function] => (*bus, *slot, *function),
        _ => {
            return Err(CliError::InvalidPciSlot {
                field: "slot",
                value: location.to_string(),
                reason: "expected [bus:]slot[:func]".to_string(),
            })
        }
    };
    Ok((
        parse_field("bus", bus, 255)?,
        parse_field("slot", slot, 31)?,
        parse_field("function", function, 7)?,
    ))
}

fn parse_field(field: &'static str, value: &str, max: u8) -> Result<u8, CliError> {
    let invalid = || CliError::InvalidPciSlot {
        field,
        value: value.to_string(),
        reason: format!("{field} must be 0-{max}"),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match value.parse::<u32>() {
        Ok(n) if n <= u32::from(max) => Ok(n as u8),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(bus: u8, slot: u8, function: u8, kind: DeviceKind) -> DeviceConfig {
        DeviceConfig {
            address: PciAddress {
                bus,
                slot,
                function,
            },
            kind,
        }
    }

    fn error(spec: &str) -> String {
        parse_pci_device(spec).unwrap_err().to_string()
    }

    #[test]
    fn location_forms() {
        assert_eq!(
            parse_pci_device("0:0,hostbridge").unwrap(),
            device(0, 0, 0, DeviceKind::Hostbridge)
        );
        assert_eq!(
            parse_pci_device("31,lpc").unwrap(),
            device(0, 31, 0, DeviceKind::Lpc)
        );
        // Two numbers are slot:func, as in bhyve.
        assert_eq!(
            parse_pci_device("5:7,amd_hostbridge").unwrap(),
            device(0, 5, 7, DeviceKind::AmdHostbridge)
        );
        assert_eq!(
            parse_pci_device("4,virtio-rnd").unwrap(),
            device(0, 4, 0, DeviceKind::VirtioRnd)
        );
        assert_eq!(
            parse_pci_device("1:2:3,hostbridge").unwrap(),
            device(1, 2, 3, DeviceKind::Hostbridge)
        );
        assert_eq!(
            parse_pci_device("255:31:7,hostbridge").unwrap(),
            device(255, 31, 7, DeviceKind::Hostbridge)
        );
    }

    #[test]
    fn bad_numbers_name_the_field() {
        assert_eq!(
            error("40,hostbridge"),
            "invalid -s slot \"40\": slot must be 0-31"
        );
        assert_eq!(
            error("256:0:0,hostbridge"),
            "invalid -s bus \"256\": bus must be 0-255"
        );
        assert_eq!(
            error("0:8,hostbridge"),
            "invalid -s function \"8\": function must be 0-7"
        );
        assert_eq!(
            error("x,hostbridge"),
            "invalid -s slot \"x\": slot must be 0-31"
        );
        assert_eq!(
            error("-1,hostbridge"),
            "invalid -s slot \"-1\": slot must be 0-31"
        );
        assert_eq!(
            error(",hostbridge"),
            "invalid -s slot \"\": slot must be 0-31"
        );
        assert_eq!(
            error("99999999999,hostbridge"),
            "invalid -s slot \"99999999999\": slot must be 0-31"
        );
        assert_eq!(
            error("1:2:3:4,hostbridge"),
            "invalid -s slot \"1:2:3:4\": expected [bus:]slot[:func]"
        );
    }

    #[test]
    fn emulation_is_required_and_case_sensitive() {
        assert_eq!(
            error("3"),
            "invalid -s \"3\": emulation required, e.g. -s 0:0,hostbridge"
        );
        assert_eq!(
            error("3,"),
            "invalid -s \"3,\": emulation required, e.g. -s 0:0,hostbridge"
        );
        assert_eq!(error("3,foo"), "pci slot 0:3: unknown device \"foo\"");
        assert_eq!(error("1:3:0,LPC"), "pci slot 1:3: unknown device \"LPC\"");
    }

    #[test]
    fn shared_folder_devices() {
        let d = parse_pci_device("5,virtio-9p,/srv,tag=srv,ro").unwrap();
        assert_eq!(d.kind.name(), "virtio-9p");
        let d = parse_pci_device("6,virtio-9p,path=/tmp/9p.sock,tag=port").unwrap();
        assert!(matches!(d.kind, DeviceKind::Virtio9p(_)));
        let d =
            parse_pci_device("8,virtio-sock,guest_cid=3,path=/tmp/vs,guest_forwards=22").unwrap();
        assert_eq!(d.kind.name(), "virtio-sock");
        let d = parse_pci_device("7,virtio-fs,/home,tag=home").unwrap();
        assert!(matches!(d.kind, DeviceKind::VirtioFs(_)));
        assert_eq!(
            parse_pci_device("5,virtio-9p,/srv")
                .unwrap_err()
                .to_string(),
            "invalid -s \"5,virtio-9p,/srv\": virtio-9p needs tag=TAG"
        );
        assert_eq!(
            parse_pci_device("7,virtio-fs,/h,tag=h,socket=/s").unwrap_err().to_string(),
            "invalid -s \"7,virtio-fs,/h,tag=h,socket=/s\": virtio-fs socket=PATH (an external vhost-user-fs daemon) is not supported yet"
        );
    }

    #[test]
    fn later_emulations_are_not_supported_yet() {
        let err = parse_pci_device("2,virtio-vpnkit").unwrap_err();
        assert_eq!(
            err.to_string(),
            "not supported yet: -s 2,virtio-vpnkit (PCI device \"virtio-vpnkit\")"
        );
        assert_eq!(err.exit_code(), 1);
        for name in LATER_EMULATIONS {
            let spec = format!("4,{name},/img,ro");
            assert!(matches!(
                parse_pci_device(&spec),
                Err(CliError::NotSupportedYet(_))
            ));
        }
    }

    #[test]
    fn implemented_emulations_reject_options_and_keep_commas_in_message() {
        assert_eq!(
            error("0,hostbridge,a,b=c"),
            "invalid -s \"0,hostbridge,a,b=c\": hostbridge takes no options"
        );
        assert_eq!(
            error("31,lpc,"),
            "invalid -s \"31,lpc,\": lpc takes no options"
        );
        assert_eq!(
            error("3,virtio-rnd,x"),
            "invalid -s \"3,virtio-rnd,x\": virtio-rnd takes no options"
        );
    }

    #[test]
    fn virtio_blk_keeps_its_option_string() {
        let d = parse_pci_device("4:1,virtio-blk,/img/d.img,ro,sectorsize=512/4096").unwrap();
        assert_eq!((d.address.slot, d.address.function), (4, 1));
        let DeviceKind::VirtioBlk(options) = d.kind else {
            panic!("not virtio-blk: {:?}", d.kind);
        };
        assert_eq!(options.spec, "/img/d.img,ro,sectorsize=512/4096");
        assert!(options.read_only);
        assert_eq!(options.physical_sector_size, 4096);
    }

    #[test]
    fn ahci_devices_require_block_options() {
        let hd = parse_pci_device("4,ahci-hd,/tmp/disk.img,ro,sectorsize=4096").unwrap();
        assert_eq!(
            hd.kind,
            DeviceKind::AhciHd(BlockOptions::parse("/tmp/disk.img,ro,sectorsize=4096").unwrap())
        );
        let cd = parse_pci_device("0:5:1,ahci-cd,/tmp/a.iso").unwrap();
        assert_eq!(
            cd,
            device(
                0,
                5,
                1,
                DeviceKind::AhciCd(BlockOptions::parse("/tmp/a.iso").unwrap())
            )
        );
        assert_eq!(
            error("4,ahci-hd"),
            "invalid -s \"4,ahci-hd\": ahci-hd needs options: \
             PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync]\
             [,format=raw|qcow2][,l2-cache-size=BYTES]"
        );
        assert_eq!(
            error("4,ahci-cd,/a.iso,bogus"),
            "invalid -s \"4,ahci-cd,/a.iso,bogus\": unknown block device option \"bogus\""
        );
    }

    #[test]
    fn virtio_blk_options_are_checked_at_parse_time() {
        assert_eq!(
            error("4,virtio-blk"),
            "invalid -s \"4,virtio-blk\": virtio-blk needs options: \
             PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync]\
             [,format=raw|qcow2][,l2-cache-size=BYTES]"
        );
        assert_eq!(
            error("4,virtio-blk,d.qcow2,format=qcow2,l2-cache-size=4MB"),
            "invalid -s \"4,virtio-blk,d.qcow2,format=qcow2,l2-cache-size=4MB\": invalid \
             l2-cache-size \"4MB\": expected a number of bytes from 1, optionally with a k, M \
             or G suffix"
        );
        assert_eq!(
            error("4,virtio-blk,d.img,rw"),
            "invalid -s \"4,virtio-blk,d.img,rw\": unknown block device option \"rw\""
        );
        assert_eq!(
            error("4,virtio-blk,d.img,sectorsize=1000"),
            "invalid -s \"4,virtio-blk,d.img,sectorsize=1000\": invalid sectorsize \"1000\": \
             sizes must be powers of two from 512 to 65536"
        );
        assert!(matches!(
            parse_pci_device("4,virtio-blk,"),
            Err(CliError::InvalidBlockOptions { .. })
        ));
    }

    #[test]
    fn virtio_tap_keeps_its_options_and_virtio_net_explains_itself() {
        assert_eq!(
            parse_pci_device("2:1,virtio-tap,tap0,mac=02:00:00:00:00:01").unwrap(),
            device(
                0,
                2,
                1,
                DeviceKind::VirtioTap(TapOptions {
                    name: "tap0".into(),
                    mac: Some(crate::net::MacAddr([2, 0, 0, 0, 0, 1]))
                })
            )
        );
        assert_eq!(
            error("2,virtio-tap,tap0,mac=nope"),
            "invalid -s \"2,virtio-tap,tap0,mac=nope\": invalid MAC address \"nope\": expected xx:xx:xx:xx:xx:xx"
        );
        assert!(error("2,virtio-tap").contains("tap name \"\""));
        // Everywhere: vmnet (macOS's default) or the built-in network, or a daemon's socket.
        let DeviceKind::VirtioNet(plain) = parse_pci_device("2,virtio-net").unwrap().kind else {
            panic!("virtio-net is a VirtioNet");
        };
        assert_eq!(plain.uses_vmnet(), cfg!(target_os = "macos"));
        let DeviceKind::VirtioNet(with_mac) =
            parse_pci_device("2,virtio-net,mac=02:00:00:00:00:03")
                .unwrap()
                .kind
        else {
            panic!("virtio-net is a VirtioNet");
        };
        assert_eq!(with_mac.mac, Some(crate::net::MacAddr([2, 0, 0, 0, 0, 3])));
        assert!(error("2,virtio-net,tap0").contains("unknown option \"tap0\""));
        assert!(error("2,virtio-net,socket=/x,user").contains("conflicts"));
        assert!(parse_pci_device("2,virtio-net,user,hostfwd=tcp::2222-:22,restrict").is_ok());
    }

    #[test]
    fn lpc_only_on_bus_zero() {
        assert_eq!(
            error("1:31:0,lpc"),
            "invalid -s \"1:31:0,lpc\": the LPC bridge must be on bus 0"
        );
    }

    #[test]
    fn occupied_slot_and_second_lpc_are_rejected() {
        let mut devices = Vec::new();
        for spec in ["0:0,hostbridge", "31,lpc", "0:1,hostbridge"] {
            let d = parse_pci_device(spec).unwrap();
            add_pci_device(&mut devices, spec, d).unwrap();
        }
        assert_eq!(devices.len(), 3);

        let d = parse_pci_device("0,amd_hostbridge").unwrap();
        assert_eq!(
            add_pci_device(&mut devices, "0,amd_hostbridge", d)
                .unwrap_err()
                .to_string(),
            "pci slot 0:0:0 already occupied"
        );
        let d = parse_pci_device("30,lpc").unwrap();
        assert_eq!(
            add_pci_device(&mut devices, "30,lpc", d)
                .unwrap_err()
                .to_string(),
            "invalid -s \"30,lpc\": only one LPC bridge is allowed"
        );
        assert_eq!(devices.len(), 3);
    }
}
