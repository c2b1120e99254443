//! The typed machine configuration: what the command line (`cli`) produces, and all that
//! `vmm` and the device manager consume. Every option is parsed once, into the option type
//! of the layer that uses it (`BlockOptions` in `block`, `TapOptions` in `net`,
//! `SerialBackend` in `devices::serial`); the environment is read once, into
//! [`HostSettings`]. Nothing below `vmm` reads an option string or an environment variable.

use std::path::PathBuf;

pub use crate::arch::x86_64::boot::{Firmware, MultibootModule};
pub use crate::block::BlockOptions;
pub use crate::devices::pci::PciAddress;
pub use crate::devices::serial::{SerialBackend, SerialConfig};
pub use crate::fs::options::{FsOptions, P9Options};
use crate::hv::IrqChipMode;
use crate::net::{derive_mac, MacAddr};
pub use crate::net::{NetOptions, TapOptions};
pub use crate::vsock::VsockConfig;

/// Everything needed to build and run one virtual machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// `-A`: build ACPI tables.
    pub acpi: bool,
    /// `-c`: number of vCPUs (1..=16).
    pub vcpus: u8,
    /// `-C`: keep guest memory in core dumps (excluded by default).
    pub dump_guest_memory: bool,
    /// `-e`: an access to an unhandled I/O port stops the VM with an error.
    pub strict_io: bool,
    /// `-f`: how to load the guest.
    pub firmware: Firmware,
    /// `-F`: pid file, created exclusively and removed on exit.
    pub pidfile: Option<PathBuf>,
    /// `-H`: exit to the VMM on HLT (Hypervisor.framework only; KVM always handles HLT).
    pub hlt_exit: bool,
    /// `-P`: exit to the VMM on PAUSE (Hypervisor.framework only).
    pub pause_exit: bool,
    /// `-l com1,...` / `-l com2,...`.
    pub com1: Option<SerialConfig>,
    pub com2: Option<SerialConfig>,
    /// `-m`: guest RAM in bytes.
    pub memory_bytes: u64,
    /// `-p vcpu:hostcpu`, in the order given.
    pub cpu_pins: Vec<CpuPin>,
    /// `-s`: PCI devices, in the order given, their options parsed.
    pub devices: Vec<DeviceConfig>,
    /// `-u`: the RTC keeps UTC instead of local time.
    pub rtc_utc: bool,
    /// `-U`: the machine UUID (SMBIOS type 1, MAC derivation).
    pub uuid: Option<[u8; 16]>,
    /// `-w`: ignore accesses to unimplemented MSRs instead of raising #GP.
    pub ignore_unknown_msrs: bool,
    /// `-W`: virtio devices use single-vector MSI instead of MSI-X.
    pub virtio_single_msi: bool,
    /// `-x`: start the local APICs in x2APIC mode.
    pub x2apic: bool,
    /// Build an MP table (default; `-Y` turns it off).
    pub mptable: bool,
    /// `-M`: print the first network device's MAC address and exit 0.
    pub print_mac: bool,
    /// The `XHYVE_*` environment, read once at start-up ([`HostSettings::from_env`]).
    pub host: HostSettings,
    /// Whose behaviour to follow where xhyve and HyperKit differ (from argv[0]).
    pub personality: Personality,
    /// `--restful-uri`: where to serve the control API (vfkit's REST shape), if anywhere.
    pub restful_uri: Option<RestEndpoint>,
}

/// xhyve or HyperKit: the binary behaves as HyperKit when its name (argv[0]'s last path
/// component) is `hyperkit`, so that it can be installed under that name for HyperKit's
/// users. The two differ in the `-v` text and the exit codes; everything else is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Personality {
    #[default]
    Xhyve,
    HyperKit,
}

impl Personality {
    /// The personality for a program name (argv[0]).
    pub fn from_program(program: &std::ffi::OsStr) -> Self {
        match std::path::Path::new(program).file_name() {
            Some(name) if name == "hyperkit" => Personality::HyperKit,
            _ => Personality::Xhyve,
        }
    }
}

/// `--restful-uri unix:///PATH` or `tcp://127.0.0.1:PORT` (vfkit's option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestEndpoint {
    Unix(PathBuf),
    /// Loopback only: the API can stop the VM, so it is not offered to the network.
    Tcp(std::net::SocketAddr),
}

/// One `-s [bus:]slot[:func],emulation[,config]` argument, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub address: PciAddress,
    pub kind: DeviceKind,
}

/// The PCI emulations this build implements, each with its parsed options. Adding a device
/// means adding its variant here, its name in `cli::pci`, and its line in
/// `device_manager::pci_devices::build`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    Hostbridge,
    AmdHostbridge,
    Lpc,
    /// `virtio-rnd`: an entropy source.
    VirtioRnd,
    /// `virtio-blk,PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync]
    /// [,format=raw|qcow2][,l2-cache-size=BYTES]`.
    VirtioBlk(BlockOptions),
    /// `ahci-hd,...`: an AHCI controller with a SATA disk (block device options).
    AhciHd(BlockOptions),
    /// `ahci-cd,...`: an AHCI controller with a read-only ATAPI CD-ROM (an ISO image).
    AhciCd(BlockOptions),
    /// `virtio-tap,tapN[,mac=...]`: virtio-net over a Linux tap interface.
    VirtioTap(TapOptions),
    /// `virtio-net[,mac=...]`: virtio-net over macOS vmnet (shared mode); macOS only.
    VirtioNet(NetOptions),
    /// `virtio-9p,DIR,tag=TAG[,ro][,uid=N,gid=N]` or HyperKit's `virtio-9p,path=SOCKET,tag=TAG`.
    Virtio9p(P9Options),
    /// `virtio-fs,DIR,tag=TAG[,ro][,uid=N,gid=N]`: virtio-fs served in process.
    VirtioFs(FsOptions),
    /// `virtio-sock,guest_cid=C,path=DIR[,guest_forwards=P1;P2]`: vsock over Unix sockets in DIR.
    VirtioSock(VsockConfig),
}

impl DeviceKind {
    /// The emulation name `-s` takes.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Hostbridge => "hostbridge",
            DeviceKind::AmdHostbridge => "amd_hostbridge",
            DeviceKind::Lpc => "lpc",
            DeviceKind::VirtioRnd => "virtio-rnd",
            DeviceKind::VirtioBlk(_) => "virtio-blk",
            DeviceKind::AhciHd(_) => "ahci-hd",
            DeviceKind::AhciCd(_) => "ahci-cd",
            DeviceKind::VirtioTap(_) => "virtio-tap",
            DeviceKind::VirtioNet(_) => "virtio-net",
            DeviceKind::Virtio9p(_) => "virtio-9p",
            DeviceKind::VirtioFs(_) => "virtio-fs",
            DeviceKind::VirtioSock(_) => "virtio-sock",
        }
    }

    pub fn is_network(&self) -> bool {
        matches!(self, DeviceKind::VirtioTap(_) | DeviceKind::VirtioNet(_))
    }
}

/// How virtio doorbells reach their device on a hypervisor that can skip the VM exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorbellPath {
    /// ioeventfd where the hypervisor has it (KVM, in-kernel irqchip): the default.
    EventFd,
    /// `XHYVE_DOORBELLS=exit`: every doorbell is a VM exit, to measure the difference.
    Exit,
}

/// The `XHYVE_*` environment, read once by `main` before the machine is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSettings {
    /// `XHYVE_IRQCHIP=kernel|user`: who emulates the interrupt controllers.
    pub irqchip: IrqChipMode,
    /// `XHYVE_DOORBELLS=exit`.
    pub doorbells: DoorbellPath,
    /// `XHYVE_IRQFD=on|off`: MSIs through irqfds (default on) or KVM_SIGNAL_MSI.
    pub irqfd: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid XHYVE_IRQCHIP \"{0}\": expected kernel or user")]
    IrqChip(String),
    #[error(
        "invalid XHYVE_IRQCHIP \"kernel\": Hypervisor.framework has no in-kernel irqchip; \
         expected user"
    )]
    NoKernelIrqChip,
    #[error("unknown hypervisor back end \"{0}\" (XHYVE_HV): expected {expected}", expected = crate::hv::BACKEND_NAME)]
    Hypervisor(String),
}

impl Default for HostSettings {
    /// The defaults of an empty environment on this host.
    fn default() -> Self {
        HostSettings {
            irqchip: if cfg!(target_os = "macos") {
                IrqChipMode::User
            } else {
                IrqChipMode::Kernel
            },
            doorbells: DoorbellPath::EventFd,
            irqfd: true,
        }
    }
}

impl HostSettings {
    /// Reads the process environment. Called once, by `main`.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings `var` gives (a variable's value, or `None` when unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        if let Some(name) = var("XHYVE_HV") {
            if name != crate::hv::BACKEND_NAME {
                return Err(SettingsError::Hypervisor(name));
            }
        }
        let irqchip = parse_irqchip_mode(
            var("XHYVE_IRQCHIP").as_deref().unwrap_or_default(),
            cfg!(target_os = "macos"),
        )?;
        let doorbells = match var("XHYVE_DOORBELLS").as_deref() {
            Some("exit") => DoorbellPath::Exit,
            _ => DoorbellPath::EventFd,
        };
        let irqfd = match var("XHYVE_IRQFD") {
            None => true,
            Some(value) => parse_irqfd_setting(&value).unwrap_or_else(|| {
                log::warn!("ignoring XHYVE_IRQFD=\"{value}\": expected on or off");
                true
            }),
        };
        Ok(HostSettings {
            irqchip,
            doorbells,
            irqfd,
        })
    }
}

fn parse_irqchip_mode(value: &str, user_only: bool) -> Result<IrqChipMode, SettingsError> {
    match value {
        "" if user_only => Ok(IrqChipMode::User),
        "kernel" if user_only => Err(SettingsError::NoKernelIrqChip),
        "" | "kernel" => Ok(IrqChipMode::Kernel),
        "user" => Ok(IrqChipMode::User),
        other => Err(SettingsError::IrqChip(other.to_string())),
    }
}

fn parse_irqfd_setting(value: &str) -> Option<bool> {
    match value {
        "" | "on" | "1" => Some(true),
        "off" | "0" => Some(false),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuPin {
    pub vcpu: u8,
    pub host_cpu: u32,
}

impl VmConfig {
    /// Default RAM when `-m` is absent: 256 MiB, as xhyve.
    pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;
    /// xhyve's VM_MAXCPU.
    pub const MAX_VCPUS: u8 = 16;

    /// A configuration with xhyve's defaults and the given firmware.
    pub fn with_firmware(firmware: Firmware) -> Self {
        VmConfig {
            acpi: false,
            vcpus: 1,
            dump_guest_memory: false,
            strict_io: false,
            firmware,
            pidfile: None,
            hlt_exit: false,
            pause_exit: false,
            com1: None,
            com2: None,
            memory_bytes: Self::DEFAULT_MEMORY_BYTES,
            cpu_pins: Vec::new(),
            devices: Vec::new(),
            host: HostSettings::default(),
            rtc_utc: false,
            uuid: None,
            ignore_unknown_msrs: false,
            virtio_single_msi: false,
            x2apic: false,
            mptable: true,
            print_mac: false,
            personality: Personality::Xhyve,
            restful_uri: None,
        }
    }

    /// The LPC bridge's slot, if there is one.
    pub fn lpc_slot(&self) -> Option<u8> {
        self.devices
            .iter()
            .find(|d| d.kind == DeviceKind::Lpc)
            .map(|d| d.address.slot)
    }

    /// The first network device (the one `-M` describes; as in xhyve, `-M` without a network
    /// device does nothing).
    pub fn first_nic(&self) -> Option<&DeviceConfig> {
        self.devices.iter().find(|d| d.kind.is_network())
    }

    /// The MAC of the first network device where the command line alone decides it: a tap's,
    /// a vmnet device's `mac=`, or the derived one of every other `virtio-net` back end.
    /// `None` for vmnet without `mac=`: vmnet assigns that one.
    pub fn first_nic_mac(&self) -> Option<MacAddr> {
        let device = self.first_nic()?;
        match &device.kind {
            DeviceKind::VirtioTap(options) => Some(tap_mac(self.uuid, device.address, options)),
            DeviceKind::VirtioNet(options) if options.uses_vmnet() => options.mac,
            DeviceKind::VirtioNet(options) => Some(net_mac(self.uuid, device.address, options)),
            _ => None,
        }
    }
}

/// The MAC of a `virtio-net` device that vmnet does not assign (the built-in network, a
/// daemon's socket): its `mac=`, else derived from `-U` and its slot, as a tap's.
pub fn net_mac(uuid: Option<[u8; 16]>, address: PciAddress, options: &NetOptions) -> MacAddr {
    options
        .mac
        .unwrap_or_else(|| derive_mac(uuid, address.bus, address.slot, address.function))
}

/// The MAC of a tap device: its `mac=`, else the one derived from `-U` and its slot.
pub fn tap_mac(uuid: Option<[u8; 16]>, address: PciAddress, options: &TapOptions) -> MacAddr {
    options
        .mac
        .unwrap_or_else(|| derive_mac(uuid, address.bus, address.slot, address.function))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<HostSettings, SettingsError> {
        HostSettings::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn environment_is_parsed_into_settings() {
        let defaults = settings(&[]).unwrap();
        assert_eq!(defaults, HostSettings::default());
        let s = settings(&[
            ("XHYVE_IRQCHIP", "user"),
            ("XHYVE_DOORBELLS", "exit"),
            ("XHYVE_IRQFD", "off"),
        ])
        .unwrap();
        assert_eq!(s.irqchip, IrqChipMode::User);
        assert_eq!(s.doorbells, DoorbellPath::Exit);
        assert!(!s.irqfd);
        // A bad XHYVE_IRQFD is only warned about.
        assert!(settings(&[("XHYVE_IRQFD", "of")]).unwrap().irqfd);
        let err = settings(&[("XHYVE_IRQCHIP", "usr")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid XHYVE_IRQCHIP \"usr\": expected kernel or user"
        );
        let other = if crate::hv::BACKEND_NAME == "kvm" {
            "hvf"
        } else {
            "kvm"
        };
        assert_eq!(
            settings(&[("XHYVE_HV", other)]).unwrap_err().to_string(),
            format!(
                "unknown hypervisor back end \"{other}\" (XHYVE_HV): expected {}",
                crate::hv::BACKEND_NAME
            )
        );
        assert!(settings(&[("XHYVE_HV", crate::hv::BACKEND_NAME)]).is_ok());
    }

    #[test]
    fn irqchip_is_always_the_vmms_on_macos() {
        assert_eq!(parse_irqchip_mode("", true).unwrap(), IrqChipMode::User);
        assert_eq!(parse_irqchip_mode("user", true).unwrap(), IrqChipMode::User);
        assert_eq!(
            parse_irqchip_mode("kernel", true),
            Err(SettingsError::NoKernelIrqChip)
        );
        assert_eq!(parse_irqchip_mode("", false).unwrap(), IrqChipMode::Kernel);
    }

    #[test]
    fn first_nic_mac_prefers_mac_option_then_derives_from_uuid_and_slot() {
        let mut config = VmConfig::with_firmware(Firmware::Kexec {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
        });
        assert_eq!(config.first_nic_mac(), None);
        let at = |slot| PciAddress {
            bus: 0,
            slot,
            function: 0,
        };
        let tap = |slot, options: &str| DeviceConfig {
            address: at(slot),
            kind: DeviceKind::VirtioTap(TapOptions::parse(Some(options)).unwrap()),
        };
        config.devices.push(tap(3, "tap0"));
        config.devices.push(tap(4, "tap1,mac=02:00:00:00:00:09"));
        config.uuid = Some([7; 16]);
        assert_eq!(
            config.first_nic_mac(),
            Some(derive_mac(Some([7; 16]), 0, 3, 0))
        );
        config.devices.remove(0);
        assert_eq!(config.first_nic_mac(), Some(MacAddr([2, 0, 0, 0, 0, 9])));

        // A virtio-net device first: its mac=; without one, vmnet's (nothing the command
        // line can tell), or derived like a tap's for every other back end.
        let net = |options: &str| DeviceConfig {
            address: at(2),
            kind: DeviceKind::VirtioNet(NetOptions::parse(Some(options)).unwrap()),
        };
        config.devices.insert(0, net("mac=02:00:00:00:00:0a"));
        assert_eq!(config.first_nic().map(|d| d.address.slot), Some(2));
        assert_eq!(config.first_nic_mac(), Some(MacAddr([2, 0, 0, 0, 0, 10])));
        config.devices[0] = DeviceConfig {
            address: at(2),
            kind: DeviceKind::VirtioNet(NetOptions::parse(None).unwrap()),
        };
        let derived = Some(derive_mac(config.uuid, 0, 2, 0));
        if cfg!(target_os = "macos") {
            assert_eq!(config.first_nic_mac(), None);
        } else {
            assert_eq!(config.first_nic_mac(), derived);
        }
        config.devices[0] = net("socket=/tmp/x.sock");
        assert_eq!(config.first_nic_mac(), derived);
    }
}
