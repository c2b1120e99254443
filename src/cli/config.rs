//! The typed machine configuration that the command line produces and `vmm` consumes.

use std::path::PathBuf;

/// What the command line asks `xhyve` to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Boot a virtual machine.
    Run(Box<VmConfig>),
    /// `-h`: print usage to stderr and exit 0.
    Help,
    /// `-v`: print the version to stderr and exit 0.
    Version,
    /// `--completions SHELL` (hidden): print a completion script for bash, zsh or fish.
    Completions(String),
    /// `--manpage` (hidden): print the xhyve.1 man page (roff).
    Manpage,
}

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
    /// `-s`: PCI devices, in the order given.
    pub pci_devices: Vec<PciDeviceConfig>,
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
    /// Whose behaviour to follow where xhyve and HyperKit differ (from argv[0]).
    pub personality: Personality,
    /// `--restful-uri`: where to serve the control API (vfkit's REST shape), if anywhere.
    pub restful_uri: Option<RestEndpoint>,
}

/// `--restful-uri unix:///PATH` or `tcp://127.0.0.1:PORT` (vfkit's option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestEndpoint {
    Unix(PathBuf),
    /// Loopback only: the API can stop the VM, so it is not offered to the network.
    Tcp(std::net::SocketAddr),
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

/// `-f`: the guest loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// `-f kexec,KERNEL[,INITRD[,CMDLINE]]`: Linux bzImage or ELF vmlinux (PVH).
    Kexec {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// `-f multiboot,KERNEL[,MODULE[;CMDLINE][:MODULE[;CMDLINE]]...][,CMDLINE]` (HyperKit's syntax).
    Multiboot {
        kernel: PathBuf,
        modules: Vec<MultibootModule>,
        cmdline: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultibootModule {
    pub path: PathBuf,
    pub cmdline: String,
}

/// One COM port: `-l comN,TERMINAL[,log=PATH][,asl]` (HyperKit's chained form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// Where the port's bytes go and come from.
    pub backend: SerialBackend,
    /// `log=PATH`: HyperKit's console ring, a 64 KiB memory-mapped file of the latest output.
    pub log_ring: Option<PathBuf>,
    /// `asl`: output also goes to the macOS system log, a line at a time.
    pub asl: bool,
}

impl SerialConfig {
    /// A port on `backend` with no log ring and no system log.
    pub fn new(backend: SerialBackend) -> Self {
        SerialConfig {
            backend,
            log_ring: None,
            asl: false,
        }
    }
}

/// Where a COM port's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackend {
    /// The terminal `xhyve` runs in, in raw mode (restored on every exit).
    Stdio,
    /// A new pseudo-terminal; its name is printed as `COMn connected to /dev/pts/N`.
    /// `autopty=PATH` also makes a symlink at PATH to it, removed on exit.
    Autopty(Option<PathBuf>),
    /// `null`: output is dropped, there is no input (HyperKit).
    Null,
    /// An existing terminal device.
    Tty(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuPin {
    pub vcpu: u8,
    pub host_cpu: u32,
}

/// One `-s [bus:]slot[:func],emulation[,config]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDeviceConfig {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
    pub kind: PciDeviceKind,
    /// Everything after the second comma, commas included.
    pub options: Option<String>,
}

/// The PCI emulations this build implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciDeviceKind {
    Hostbridge,
    AmdHostbridge,
    Lpc,
    /// `virtio-rnd`: an entropy source.
    VirtioRnd,
    /// `virtio-blk,PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync]`:
    /// a disk; the options (checked at parse time) stay in [`PciDeviceConfig::options`].
    VirtioBlk,
    /// `ahci-hd`: an AHCI controller with a SATA disk (options: block device options).
    AhciHd,
    /// `ahci-cd`: an AHCI controller with a read-only ATAPI CD-ROM (an ISO image).
    AhciCd,
    /// `virtio-tap,tapN[,mac=...]`: virtio-net over a Linux tap interface.
    VirtioTap,
    /// `virtio-net[,mac=...]`: virtio-net over macOS vmnet (shared mode); macOS only.
    VirtioNet,
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
            pci_devices: Vec::new(),
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
}
