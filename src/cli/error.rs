//! Everything that can be wrong with an xhyve command line, and how `main` should report it.

/// sysexits.h `EX_USAGE`: xhyve exits with it for a bad `-m` or `-l`.
const EX_USAGE: i32 = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// Unknown option, option without its argument, stray positional argument.
    #[error("{0}")]
    Syntax(String),
    #[error("-f is required: -f kexec,kernel[,initrd[,cmdline]] or -f multiboot,kernel[,modules][,cmdline]")]
    MissingFirmware,
    #[error("-f given more than once: \"{0}\"")]
    DuplicateFirmware(String),
    #[error("invalid -f \"{value}\": {reason}")]
    InvalidFirmware { value: String, reason: String },
    #[error("invalid memsize '{value}': {reason}")]
    InvalidMemsize { value: String, reason: &'static str },
    #[error("invalid -c \"{0}\": vCPU count must be 1-{max}", max = crate::cli::VmConfig::MAX_VCPUS)]
    InvalidVcpus(String),
    #[error("invalid -s {field} \"{value}\": {reason}")]
    InvalidPciSlot {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid -s \"{0}\": emulation required, e.g. -s 0:0,hostbridge")]
    MissingPciEmulation(String),
    #[error(
        "-s {bus}:{slot}:{function}: slot {bus}:{slot} has no function 0, so guests never \
         see it; put a device at {bus}:{slot}:0"
    )]
    MissingFunctionZero { bus: u8, slot: u8, function: u8 },
    #[error("-m given more than once (\"{first}\", then \"{second}\"): give it once")]
    DuplicateMemsize { first: String, second: String },
    #[error("pci slot {bus}:{slot}:{function} already occupied")]
    PciSlotOccupied { bus: u8, slot: u8, function: u8 },
    #[error("pci slot {bus}:{slot}: unknown device \"{name}\"")]
    UnknownPciDevice { bus: u8, slot: u8, name: String },
    #[error("invalid -s \"{spec}\": {name} takes no options")]
    PciOptionsNotAccepted { spec: String, name: &'static str },
    #[error("invalid -s \"{spec}\": {name} needs options: {usage}")]
    PciOptionsRequired {
        spec: String,
        name: &'static str,
        usage: &'static str,
    },
    #[error("invalid -s \"{spec}\": {source}")]
    InvalidBlockOptions {
        spec: String,
        source: crate::block::OptionsError,
    },
    #[error("invalid -s \"{spec}\": {reason}")]
    InvalidPciPlacement { spec: String, reason: &'static str },
    #[error("invalid lpc device configuration '{value}': {reason}")]
    InvalidLpc { value: String, reason: String },
    #[error("invalid -U \"{0}\": not a UUID")]
    InvalidUuid(String),
    #[error("invalid -p \"{value}\": {reason}")]
    InvalidCpuPin { value: String, reason: String },
    #[error("invalid -F \"{0}\": pidfile path required")]
    InvalidPidfile(String),
    #[error("invalid -s \"{spec}\": {source}")]
    InvalidNetOptions {
        spec: String,
        source: crate::net::NetOptionsError,
    },
    #[error("invalid -s \"{spec}\": {source}")]
    InvalidShareOptions {
        spec: String,
        source: crate::fs::options::OptionsError,
    },
    #[error("invalid --restful-uri \"{value}\": {reason}")]
    InvalidRestfulUri { value: String, reason: String },
    /// A feature of xhyve/HyperKit that this port will implement later.
    #[error("not supported yet: {0}")]
    NotSupportedYet(String),
    /// A feature of xhyve that this port will not implement.
    #[error("not supported: {0}")]
    NotSupported(String),
}

impl CliError {
    /// The process exit status for this error: xhyve's `EX_USAGE` for `-m`/`-l`, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::InvalidMemsize { .. }
            | CliError::DuplicateMemsize { .. }
            | CliError::InvalidLpc { .. } => EX_USAGE,
            _ => 1,
        }
    }

    /// Whether `main` should print the usage text after the message, as xhyve's `usage(1)`.
    pub fn show_usage(&self) -> bool {
        matches!(self, CliError::Syntax(_) | CliError::MissingFirmware)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memsize_and_lpc_errors_exit_with_ex_usage() {
        let memsize = CliError::InvalidMemsize {
            value: "0".into(),
            reason: "must not be zero",
        };
        let lpc = CliError::InvalidLpc {
            value: "com3,stdio".into(),
            reason: "unknown device".into(),
        };
        assert_eq!(memsize.exit_code(), 64);
        assert_eq!(lpc.exit_code(), 64);
        assert_eq!(CliError::InvalidUuid("x".into()).exit_code(), 1);
        assert_eq!(CliError::MissingFirmware.exit_code(), 1);
    }

    #[test]
    fn only_syntax_errors_and_missing_firmware_show_usage() {
        assert!(CliError::Syntax("unknown option -Q".into()).show_usage());
        assert!(CliError::MissingFirmware.show_usage());
        assert!(!CliError::InvalidVcpus("0".into()).show_usage());
        assert!(!CliError::NotSupportedYet("-b".into()).show_usage());
    }
}
