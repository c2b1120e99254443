//! `-s [bus:]slot[:func],emulation[,config]`: one PCI device per argument.

use super::{parse_tap_options, parse_vmnet_options, CliError, PciDeviceConfig, PciDeviceKind};

/// Emulations of xhyve/HyperKit that this port will add later; named so users get
/// "not supported yet" rather than "unknown device".
const LATER_EMULATIONS: &[&str] = &[
    "virtio-9p",
    "virtio-sock",
    "virtio-vpnkit",
    "uart",
    "e1000",
    "fbuf",
    "dummy",
];

/// Parses one `-s` argument (without checking it against other devices).
pub fn parse_pci_device(spec: &str) -> Result<PciDeviceConfig, CliError> {
    let mut fields = spec.splitn(3, ',');
    let location = fields.next().unwrap_or_default();
    let emulation = fields.next().unwrap_or_default();
    let options = fields.next().map(str::to_string);

    let (bus, slot, function) = parse_location(location)?;
    if emulation.is_empty() {
        return Err(CliError::MissingPciEmulation(spec.to_string()));
    }
    let kind = match emulation {
        "hostbridge" => PciDeviceKind::Hostbridge,
        "amd_hostbridge" => PciDeviceKind::AmdHostbridge,
        "lpc" => PciDeviceKind::Lpc,
        "virtio-rnd" => PciDeviceKind::VirtioRnd,
        "virtio-blk" => PciDeviceKind::VirtioBlk,
        "ahci-hd" => PciDeviceKind::AhciHd,
        "ahci-cd" => PciDeviceKind::AhciCd,
        "virtio-tap" => {
            parse_tap_options(spec, options.as_deref())?;
            PciDeviceKind::VirtioTap
        }
        "virtio-net" => {
            parse_vmnet_options(spec, options.as_deref())?;
            PciDeviceKind::VirtioNet
        }
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
    if takes_block_options(kind) {
        check_block_options(spec, kind, options.as_deref())?;
    } else if options.is_some() && !is_network(kind) {
        return Err(CliError::PciOptionsNotAccepted {
            spec: spec.to_string(),
            name: kind_name(kind),
        });
    }
    if kind == PciDeviceKind::Lpc && bus != 0 {
        return Err(CliError::InvalidPciPlacement {
            spec: spec.to_string(),
            reason: "the LPC bridge must be on bus 0",
        });
    }
    Ok(PciDeviceConfig {
        bus,
        slot,
        function,
        kind,
        options,
    })
}

/// Adds a parsed device to the list, rejecting an occupied bus:slot:func and a second LPC bridge.
pub fn add_pci_device(
    devices: &mut Vec<PciDeviceConfig>,
    spec: &str,
    device: PciDeviceConfig,
) -> Result<(), CliError> {
    let same_place = |d: &&PciDeviceConfig| {
        (d.bus, d.slot, d.function) == (device.bus, device.slot, device.function)
    };
    if devices.iter().any(|d| same_place(&d)) {
        return Err(CliError::PciSlotOccupied {
            bus: device.bus,
            slot: device.slot,
            function: device.function,
        });
    }
    if device.kind == PciDeviceKind::Lpc && devices.iter().any(|d| d.kind == PciDeviceKind::Lpc) {
        return Err(CliError::InvalidPciPlacement {
            spec: spec.to_string(),
            reason: "only one LPC bridge is allowed",
        });
    }
    devices.push(device);
    Ok(())
}

fn takes_block_options(kind: PciDeviceKind) -> bool {
    matches!(
        kind,
        PciDeviceKind::VirtioBlk | PciDeviceKind::AhciHd | PciDeviceKind::AhciCd
    )
}

fn kind_name(kind: PciDeviceKind) -> &'static str {
    match kind {
        PciDeviceKind::Hostbridge => "hostbridge",
        PciDeviceKind::AmdHostbridge => "amd_hostbridge",
        PciDeviceKind::Lpc => "lpc",
        PciDeviceKind::VirtioRnd => "virtio-rnd",
        PciDeviceKind::VirtioBlk => "virtio-blk",
        PciDeviceKind::AhciHd => "ahci-hd",
        PciDeviceKind::AhciCd => "ahci-cd",
        PciDeviceKind::VirtioTap => "virtio-tap",
        PciDeviceKind::VirtioNet => "virtio-net",
    }
}

/// Network devices parse their own options (checked above).
fn is_network(kind: PciDeviceKind) -> bool {
    matches!(kind, PciDeviceKind::VirtioTap | PciDeviceKind::VirtioNet)
}

/// Block devices need an image path; the rest of the string must parse as xhyve's options.
fn check_block_options(
    spec: &str,
    kind: PciDeviceKind,
    options: Option<&str>,
) -> Result<(), CliError> {
    let Some(options) = options else {
        return Err(CliError::PciOptionsRequired {
            spec: spec.to_string(),
            name: kind_name(kind),
            usage: "PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync]",
        });
    };
    crate::block::BlockOptions::parse(options)
        .map(|_| ())
        .map_err(|source| CliError::InvalidBlockOptions {
            spec: spec.to_string(),
            source,
        })
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

    fn device(bus: u8, slot: u8, function: u8, kind: PciDeviceKind) -> PciDeviceConfig {
        PciDeviceConfig {
            bus,
            slot,
            function,
            kind,
            options: None,
        }
    }

    fn error(spec: &str) -> String {
        parse_pci_device(spec).unwrap_err().to_string()
    }

    #[test]
    fn location_forms() {
        assert_eq!(
            parse_pci_device("0:0,hostbridge").unwrap(),
            device(0, 0, 0, PciDeviceKind::Hostbridge)
        );
        assert_eq!(
            parse_pci_device("31,lpc").unwrap(),
            device(0, 31, 0, PciDeviceKind::Lpc)
        );
        // Two numbers are slot:func, as in bhyve.
        assert_eq!(
            parse_pci_device("5:7,amd_hostbridge").unwrap(),
            device(0, 5, 7, PciDeviceKind::AmdHostbridge)
        );
        assert_eq!(
            parse_pci_device("4,virtio-rnd").unwrap(),
            device(0, 4, 0, PciDeviceKind::VirtioRnd)
        );
        assert_eq!(
            parse_pci_device("1:2:3,hostbridge").unwrap(),
            device(1, 2, 3, PciDeviceKind::Hostbridge)
        );
        assert_eq!(
            parse_pci_device("255:31:7,hostbridge").unwrap(),
            device(255, 31, 7, PciDeviceKind::Hostbridge)
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
    fn later_emulations_are_not_supported_yet() {
        let err = parse_pci_device("2,virtio-9p").unwrap_err();
        assert_eq!(
            err.to_string(),
            "not supported yet: -s 2,virtio-9p (PCI device \"virtio-9p\")"
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
        assert_eq!(
            (d.slot, d.function, d.kind),
            (4, 1, PciDeviceKind::VirtioBlk)
        );
        assert_eq!(
            d.options.as_deref(),
            Some("/img/d.img,ro,sectorsize=512/4096")
        );
    }

    #[test]
    fn ahci_devices_require_block_options() {
        let hd = parse_pci_device("4,ahci-hd,/tmp/disk.img,ro,sectorsize=4096").unwrap();
        assert_eq!(hd.kind, PciDeviceKind::AhciHd);
        assert_eq!(
            hd.options.as_deref(),
            Some("/tmp/disk.img,ro,sectorsize=4096")
        );
        let cd = parse_pci_device("0:5:1,ahci-cd,/tmp/a.iso").unwrap();
        assert_eq!(
            (cd.slot, cd.function, cd.kind),
            (5, 1, PciDeviceKind::AhciCd)
        );
        assert_eq!(
            error("4,ahci-hd"),
            "invalid -s \"4,ahci-hd\": ahci-hd needs options: \
             PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync]"
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
             PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync]"
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
            PciDeviceConfig {
                options: Some("tap0,mac=02:00:00:00:00:01".into()),
                ..device(0, 2, 1, PciDeviceKind::VirtioTap)
            }
        );
        assert_eq!(
            error("2,virtio-tap,tap0,mac=nope"),
            "invalid -s \"2,virtio-tap,tap0,mac=nope\": invalid MAC address \"nope\": expected xx:xx:xx:xx:xx:xx"
        );
        assert!(error("2,virtio-tap").contains("tap name \"\""));
        // Everywhere now: vmnet or the built-in network, or a daemon's socket.
        assert_eq!(
            parse_pci_device("2,virtio-net").unwrap(),
            device(0, 2, 0, PciDeviceKind::VirtioNet)
        );
        assert_eq!(
            parse_pci_device("2,virtio-net,mac=02:00:00:00:00:03").unwrap(),
            PciDeviceConfig {
                options: Some("mac=02:00:00:00:00:03".into()),
                ..device(0, 2, 0, PciDeviceKind::VirtioNet)
            }
        );
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
