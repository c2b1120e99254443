//! xhyve's whole command line -> [`Action`].
//!
//! clap does the getopt part (bundled flags `-AHc2`, attached values `-m1G`, an option's value
//! taken verbatim even when it starts with `-`, as getopt does); this module gives each value
//! its meaning. Differences from xhyve, on purpose: `-Y` takes no argument, `-p` works,
//! loader names of `-f` must match exactly, and every flag may repeat (the last `-c`, `-m`,
//! `-U`, `-F` wins, as with getopt), except `-f`, which may be given once.
//!
//! `-h` and `-v` win over everything else that parses: whichever comes first is the action,
//! and the values of the other options are not checked. (xhyve acts on options in order, so
//! `-m 0 -h` fails there but prints help here.) An unknown option is an error even after `-h`.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, ArgMatches, Command};

use super::firmware::parse_firmware;
use super::lpc::SerialPorts;
use super::memsize::parse_memsize;
use super::pci::{add_pci_device, check_function_zero, parse_pci_device};
use super::{Action, CliError, CpuPin, Personality, VmConfig};

/// Boolean flags: (option letter, clap id, help for the man page and completions).
const FLAGS: &[(char, &str, &str)] = &[
    ('A', "acpi", "create ACPI tables"),
    ('b', "bvmcons", "bvmcons console (not supported yet)"),
    (
        'C',
        "dump_guest_memory",
        "include guest memory in core files",
    ),
    ('e', "strict_io", "exit on an unhandled I/O port access"),
    ('h', "help", "print usage and exit"),
    ('H', "hlt_exit", "vmexit from the guest on HLT"),
    (
        'M',
        "print_mac",
        "print the MAC address of the first network device and exit",
    ),
    ('P', "pause_exit", "vmexit from the guest on PAUSE"),
    ('u', "rtc_utc", "the RTC keeps UTC time"),
    ('v', "version", "print the version and exit"),
    ('w', "ignore_unknown_msrs", "ignore unimplemented MSRs"),
    (
        'W',
        "virtio_single_msi",
        "force virtio to use single-vector MSI",
    ),
    ('x', "x2apic", "start the local APICs in x2APIC mode"),
    ('Y', "no_mptable", "do not build an MP table"),
];

/// Options with one value: (option letter, clap id, may repeat and all values count, value
/// name, help).
const VALUED: &[(char, &str, bool, &str, &str)] = &[
    (
        'c',
        "vcpus",
        false,
        "VCPUS",
        "number of vCPUs, 1-16 (default 1)",
    ),
    (
        'f',
        "firmware",
        true,
        "FW",
        "kexec,KERNEL[,INITRD[,CMDLINE]] or multiboot,KERNEL[,MODULES][,CMDLINE]",
    ),
    (
        'F',
        "pidfile",
        false,
        "PIDFILE",
        "write the process id here, removed at exit",
    ),
    (
        'g',
        "gdb_port",
        false,
        "PORT",
        "gdb port (not supported yet)",
    ),
    (
        'l',
        "lpc",
        true,
        "LPC",
        "comN,stdio|autopty[=LINK]|null|TTY[,log=RING][,asl]: a COM port of the LPC bridge",
    ),
    (
        'm',
        "memsize",
        true,
        "MEM",
        "guest RAM, MB or with a K, M, G or T suffix (default 256M)",
    ),
    (
        'p',
        "cpu_pin",
        true,
        "VCPU:HOSTCPU",
        "pin a vCPU to a host CPU",
    ),
    (
        's',
        "pci",
        true,
        "PCI",
        "[BUS:]SLOT[:FUNC],EMULATION[,CONFIG]: a PCI device",
    ),
    (
        'U',
        "uuid",
        false,
        "UUID",
        "machine UUID (SMBIOS, network MACs)",
    ),
];

/// Parses xhyve's command line. `args` includes argv[0].
pub fn parse<I, T>(args: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let personality = args
        .first()
        .map(|program| Personality::from_program(program))
        .unwrap_or_default();
    let matches = command().try_get_matches_from(args).map_err(syntax_error)?;

    let first_index = |id| {
        if matches.get_flag(id) {
            matches.index_of(id)
        } else {
            None
        }
    };
    if matches.get_flag("manpage") {
        return Ok(Action::Manpage);
    }
    if let Some(shell) = last(&matches, "completions") {
        return match shell {
            "bash" | "zsh" | "fish" => Ok(Action::Completions(shell.to_string())),
            _ => Err(CliError::Syntax(format!(
                "--completions \"{shell}\": expected bash, zsh or fish"
            ))),
        };
    }
    match (first_index("help"), first_index("version")) {
        (Some(help), Some(version)) if version < help => return Ok(Action::Version),
        (Some(_), _) => return Ok(Action::Help),
        (None, Some(_)) => return Ok(Action::Version),
        (None, None) => {}
    }

    for (flag, id, what) in [('b', "bvmcons", "bvmcons console")] {
        if matches.get_flag(id) {
            return Err(CliError::NotSupportedYet(format!("-{flag} ({what})")));
        }
    }
    if values(&matches, "gdb_port").next().is_some() {
        return Err(CliError::NotSupportedYet("-g (gdb port)".to_string()));
    }

    // -l and -m first: their errors are EX_USAGE, as in xhyve.
    let memsizes: Vec<&str> = values(&matches, "memsize").collect();
    if let [first, second, ..] = memsizes[..] {
        // Two sizes are a mistake in a script (a default plus an override); which one wins
        // is not obvious, so say so instead of silently taking the last, as getopt would.
        return Err(CliError::DuplicateMemsize {
            first: first.to_string(),
            second: second.to_string(),
        });
    }
    let memory_bytes = match memsizes.first() {
        Some(value) => parse_memsize(value)?,
        None => VmConfig::DEFAULT_MEMORY_BYTES,
    };
    let mut ports = SerialPorts::default();
    for value in values(&matches, "lpc") {
        ports.add(value)?;
    }

    let mut firmwares = values(&matches, "firmware");
    let firmware = parse_firmware(firmwares.next().ok_or(CliError::MissingFirmware)?)?;
    if let Some(second) = firmwares.next() {
        return Err(CliError::DuplicateFirmware(second.to_string()));
    }

    let mut config = VmConfig::with_firmware(firmware);
    config.personality = personality;
    config.memory_bytes = memory_bytes;
    config.com1 = ports.com1;
    config.com2 = ports.com2;
    config.acpi = matches.get_flag("acpi");
    config.dump_guest_memory = matches.get_flag("dump_guest_memory");
    config.strict_io = matches.get_flag("strict_io");
    config.hlt_exit = matches.get_flag("hlt_exit");
    config.pause_exit = matches.get_flag("pause_exit");
    config.rtc_utc = matches.get_flag("rtc_utc");
    config.ignore_unknown_msrs = matches.get_flag("ignore_unknown_msrs");
    config.virtio_single_msi = matches.get_flag("virtio_single_msi");
    config.x2apic = matches.get_flag("x2apic");
    config.mptable = !matches.get_flag("no_mptable");
    config.print_mac = matches.get_flag("print_mac");

    if let Some(value) = last(&matches, "vcpus") {
        config.vcpus = parse_vcpus(value)?;
    }
    if let Some(value) = last(&matches, "pidfile") {
        if value.is_empty() {
            return Err(CliError::InvalidPidfile(value.to_string()));
        }
        config.pidfile = Some(value.into());
    }
    if let Some(value) = last(&matches, "uuid") {
        config.uuid = Some(parse_uuid(value).ok_or_else(|| CliError::InvalidUuid(value.into()))?);
    }
    for spec in values(&matches, "pci") {
        let device = parse_pci_device(spec)?;
        add_pci_device(&mut config.devices, spec, device)?;
    }
    check_function_zero(&config.devices)?;
    if let Some(value) = last(&matches, "restful_uri") {
        config.restful_uri = super::rest_uri::parse_rest_uri(value)?;
    }
    // After -c, wherever it was given: a pin names an existing vCPU.
    for value in values(&matches, "cpu_pin") {
        let pin = parse_cpu_pin(value, config.vcpus)?;
        if config.cpu_pins.iter().any(|p| p.vcpu == pin.vcpu) {
            return Err(CliError::InvalidCpuPin {
                value: value.to_string(),
                reason: format!("vCPU {} is already pinned", pin.vcpu),
            });
        }
        config.cpu_pins.push(pin);
    }

    Ok(Action::Run(Box::new(config)))
}

/// The command-line definition: clap parses with it (getopt style: bundled flags, attached
/// values), and the man page and shell completions are generated from it.
pub fn command() -> Command {
    let flags = FLAGS.iter().map(|&(letter, id, help)| {
        Arg::new(id)
            .short(letter)
            .action(ArgAction::SetTrue)
            .help(help)
    });
    let valued = VALUED.iter().map(|&(letter, id, repeats, name, help)| {
        Arg::new(id)
            .short(letter)
            .num_args(1)
            .allow_hyphen_values(true)
            .value_name(name)
            .help(help)
            .action(if repeats {
                ArgAction::Append
            } else {
                ArgAction::Set
            })
    });
    // vfkit's option, the one long option: where the control API listens.
    let restful_uri = Arg::new("restful_uri")
        .long("restful-uri")
        .num_args(1)
        .value_name("URI")
        .help("control API (vfkit's REST shape): unix:///PATH or tcp://127.0.0.1:PORT")
        .action(ArgAction::Set);
    // Hidden: generators for packagers (`xhyve --completions bash`, `xhyve --manpage`).
    let completions = Arg::new("completions")
        .long("completions")
        .num_args(1)
        .value_name("SHELL")
        .hide(true)
        .action(ArgAction::Set);
    let manpage = Arg::new("manpage")
        .long("manpage")
        .hide(true)
        .action(ArgAction::SetTrue);
    Command::new("xhyve")
        .about(
            "a tiny virtual machine monitor with xhyve's command line (KVM, Hypervisor.framework)",
        )
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_flag(true)
        .disable_version_flag(true)
        .args_override_self(true)
        .args(flags)
        .args(valued)
        .arg(restful_uri)
        .arg(completions)
        .arg(manpage)
}

fn values<'a>(matches: &'a ArgMatches, id: &str) -> impl Iterator<Item = &'a str> {
    matches
        .get_many::<String>(id)
        .into_iter()
        .flatten()
        .map(String::as_str)
}

fn last<'a>(matches: &'a ArgMatches, id: &str) -> Option<&'a str> {
    values(matches, id).last()
}

/// Turns clap's error into a short getopt-like message.
fn syntax_error(err: clap::Error) -> CliError {
    let context = |kind| match err.get(kind) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let message = match err.kind() {
        ErrorKind::UnknownArgument => {
            let arg = context(ContextKind::InvalidArg);
            if arg.starts_with('-') && arg != "-" {
                format!("unknown option \"{arg}\"")
            } else {
                format!("unexpected argument \"{arg}\"")
            }
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals | ErrorKind::WrongNumberOfValues => {
            // clap names the option as "-c <vcpus>"; keep the "-c".
            let arg = context(ContextKind::InvalidArg);
            let option = arg.split_whitespace().next().unwrap_or_default();
            format!("option {option} requires an argument")
        }
        ErrorKind::InvalidUtf8 => "arguments must be valid UTF-8".to_string(),
        _ => {
            let text = err.to_string();
            text.trim_start_matches("error: ").trim_end().to_string()
        }
    };
    CliError::Syntax(message)
}

fn parse_vcpus(value: &str) -> Result<u8, CliError> {
    match parse_decimal::<u8>(value) {
        Some(n) if (1..=VmConfig::MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(CliError::InvalidVcpus(value.to_string())),
    }
}

fn parse_cpu_pin(value: &str, vcpus: u8) -> Result<CpuPin, CliError> {
    let invalid = |reason: String| CliError::InvalidCpuPin {
        value: value.to_string(),
        reason,
    };
    let (vcpu, host_cpu) = value
        .split_once(':')
        .and_then(|(v, h)| Some((parse_decimal::<u8>(v)?, parse_decimal::<u32>(h)?)))
        .ok_or_else(|| invalid("expected vcpu:hostcpu, two numbers".to_string()))?;
    if vcpu >= vcpus {
        return Err(invalid(format!(
            "vCPU {vcpu} does not exist (vCPUs are 0-{})",
            vcpus - 1
        )));
    }
    Ok(CpuPin { vcpu, host_cpu })
}

/// Digits only: no sign, no spaces, no hex (unlike atoi/strtoul, junk is an error).
fn parse_decimal<N: std::str::FromStr>(value: &str) -> Option<N> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Canonical `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, bytes in textual order.
fn parse_uuid(value: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = value.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lengths != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{DeviceConfig, DeviceKind, Firmware, PciAddress, SerialBackend, SerialConfig};

    const KEXEC: &str = "kexec,vmlinuz,initrd.gz,earlyprintk=serial console=ttyS0";

    fn run(args: &[&str]) -> Result<Action, CliError> {
        parse(std::iter::once("xhyve").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> VmConfig {
        match run(args) {
            Ok(Action::Run(config)) => *config,
            other => panic!("{args:?}: expected Run, got {other:?}"),
        }
    }

    fn error(args: &[&str]) -> CliError {
        match run(args) {
            Err(err) => err,
            other => panic!("{args:?}: expected an error, got {other:?}"),
        }
    }

    fn kexec_firmware() -> Firmware {
        Firmware::Kexec {
            kernel: "vmlinuz".into(),
            initrd: Some("initrd.gz".into()),
            cmdline: "earlyprintk=serial console=ttyS0".into(),
        }
    }

    #[test]
    fn minimal_command_line_gives_xhyve_defaults() {
        assert_eq!(
            config(&["-f", KEXEC]),
            VmConfig::with_firmware(kexec_firmware())
        );
    }

    #[test]
    fn every_boolean_flag() {
        let c = config(&[
            "-A", "-C", "-e", "-H", "-P", "-u", "-w", "-W", "-x", "-Y", "-f", KEXEC,
        ]);
        assert!(c.acpi);
        assert!(c.dump_guest_memory);
        assert!(c.strict_io);
        assert!(c.hlt_exit);
        assert!(c.pause_exit);
        assert!(c.rtc_utc);
        assert!(c.ignore_unknown_msrs);
        assert!(c.virtio_single_msi);
        assert!(c.x2apic);
        assert!(!c.mptable);
    }

    #[test]
    fn bundled_flags_and_attached_values() {
        let c = config(&["-AHc2", "-m1G", "-uf", KEXEC]);
        assert!(c.acpi && c.hlt_exit && c.rtc_utc);
        assert!(!c.x2apic);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_bytes, 1 << 30);
        assert_eq!(c.firmware, kexec_firmware());

        let c = config(&["-s0,hostbridge", "-lcom1,stdio", "-f", KEXEC]);
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.com1, Some(SerialConfig::new(SerialBackend::Stdio)));
    }

    #[test]
    fn equals_after_a_short_option_is_dropped() {
        // clap's reading of `-c=2`; getopt would pass "=2" and fail. Documented, harmless.
        let c = config(&["-c=2", "-m=1G", "-f", KEXEC]);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_bytes, 1 << 30);
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_arguments_are_a_syntax_error() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(b"kexec,\xff".to_vec());
        let args = [OsString::from("xhyve"), OsString::from("-f"), bad];
        assert_eq!(
            parse(args).unwrap_err(),
            CliError::Syntax("arguments must be valid UTF-8".to_string())
        );
    }

    #[test]
    fn y_takes_no_argument() {
        let c = config(&["-Y", "-A", "-f", KEXEC]);
        assert!(!c.mptable);
        assert!(c.acpi);
    }

    #[test]
    fn option_values_may_start_with_a_dash() {
        // getopt hands over the next word verbatim; so do we, then reject the value.
        assert!(matches!(
            error(&["-m", "-1", "-f", KEXEC]),
            CliError::InvalidMemsize { .. }
        ));
        assert_eq!(
            error(&["-c", "-A", "-f", KEXEC]).to_string(),
            "invalid -c \"-A\": vCPU count must be 1-16"
        );
    }

    #[test]
    fn flags_may_repeat_and_last_value_wins() {
        let c = config(&["-A", "-A", "-c", "4", "-c", "3", "-m", "512", "-f", KEXEC]);
        assert!(c.acpi);
        assert_eq!(c.vcpus, 3);
        assert_eq!(c.memory_bytes, 512 << 20);
    }

    #[test]
    fn memsize_twice_is_an_error_naming_both() {
        let err = error(&["-m", "1G", "-m", "512", "-f", KEXEC]);
        assert_eq!(
            err.to_string(),
            "-m given more than once (\"1G\", then \"512\"): give it once"
        );
        assert_eq!(err.exit_code(), 64);
        assert!(matches!(
            error(&["-m1G", "-m1G", "-f", KEXEC]),
            CliError::DuplicateMemsize { .. }
        ));
    }

    #[test]
    fn a_function_without_function_zero_is_an_error() {
        let err = error(&["-s", "3:1,virtio-rnd", "-f", KEXEC]);
        assert_eq!(
            err.to_string(),
            "-s 0:3:1: slot 0:3 has no function 0, so guests never see it; put a device at 0:3:0"
        );
        let c = config(&["-s", "3:1,virtio-rnd", "-s", "3:0,virtio-rnd", "-f", KEXEC]);
        assert_eq!(c.devices.len(), 2);
    }

    #[test]
    fn restful_uri_is_a_long_option() {
        let c = config(&["--restful-uri", "unix:///tmp/x.sock", "-f", KEXEC]);
        assert_eq!(
            c.restful_uri,
            Some(crate::cli::RestEndpoint::Unix("/tmp/x.sock".into()))
        );
        let c = config(&["--restful-uri=tcp://127.0.0.1:1234", "-f", KEXEC]);
        assert!(matches!(
            c.restful_uri,
            Some(crate::cli::RestEndpoint::Tcp(_))
        ));
        assert!(matches!(
            error(&["--restful-uri", "tcp://1.2.3.4:5", "-f", KEXEC]),
            CliError::InvalidRestfulUri { .. }
        ));
    }

    #[test]
    fn hidden_generators() {
        assert_eq!(run(&["--manpage"]).unwrap(), Action::Manpage);
        assert_eq!(
            run(&["--completions", "zsh"]).unwrap(),
            Action::Completions("zsh".into())
        );
        let err = run(&["--completions", "tcsh"]).unwrap_err().to_string();
        assert!(err.contains("\"tcsh\""), "{err}");
        // The definition the generators read names every option with its help.
        let cmd = command();
        for letter in ['A', 'c', 'f', 'F', 'l', 'm', 's', 'U', 'Y'] {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_short() == Some(letter))
                .unwrap();
            assert!(arg.get_help().is_some(), "-{letter} has no help");
        }
    }

    #[test]
    fn personality_follows_the_program_name() {
        let as_program = |program: &str| match parse([program, "-f", KEXEC]) {
            Ok(Action::Run(c)) => c.personality,
            other => panic!("{other:?}"),
        };
        assert_eq!(as_program("/usr/local/bin/hyperkit"), Personality::HyperKit);
        assert_eq!(as_program("hyperkit"), Personality::HyperKit);
        assert_eq!(as_program("/usr/bin/xhyve"), Personality::Xhyve);
        assert_eq!(as_program("hyperkit-old"), Personality::Xhyve);
    }

    #[test]
    fn memory_default_and_errors() {
        assert_eq!(config(&["-f", KEXEC]).memory_bytes, 256 << 20);
        assert_eq!(config(&["-m", "512", "-f", KEXEC]).memory_bytes, 512 << 20);
        let err = error(&["-m", "0", "-f", KEXEC]);
        assert_eq!(
            err.to_string(),
            "invalid memsize '0': memory size must not be zero"
        );
        assert_eq!(err.exit_code(), 64);
        assert!(!err.show_usage());
    }

    #[test]
    fn vcpu_count_limits() {
        assert_eq!(config(&["-c", "1", "-f", KEXEC]).vcpus, 1);
        assert_eq!(config(&["-c", "16", "-f", KEXEC]).vcpus, 16);
        for bad in ["0", "17", "256", "-1", "2x", "", " 2", "+2"] {
            let err = error(&["-c", bad, "-f", KEXEC]);
            assert_eq!(
                err.to_string(),
                format!("invalid -c \"{bad}\": vCPU count must be 1-16")
            );
            assert_eq!(err.exit_code(), 1);
        }
    }

    #[test]
    fn help_and_version() {
        assert_eq!(run(&["-h"]).unwrap(), Action::Help);
        assert_eq!(run(&["-v"]).unwrap(), Action::Version);
        assert_eq!(run(&["-A", "-m", "0", "-h"]).unwrap(), Action::Help);
        assert_eq!(run(&["-v", "-h"]).unwrap(), Action::Version);
        assert_eq!(run(&["-h", "-v"]).unwrap(), Action::Help);
        assert_eq!(run(&["-Avh"]).unwrap(), Action::Version);
        assert_eq!(run(&["-f", KEXEC, "-hv"]).unwrap(), Action::Help);
    }

    #[test]
    fn syntax_errors_show_usage() {
        let cases: &[(&[&str], &str)] = &[
            (&["-Q", "-f", KEXEC], "unknown option \"-Q\""),
            (&["-AQ", "-f", KEXEC], "unknown option \"-Q\""),
            (&["--acpi", "-f", KEXEC], "unknown option \"--acpi\""),
            (&["-f", KEXEC, "extra"], "unexpected argument \"extra\""),
            (&["-f", KEXEC, "--", "x"], "unexpected argument \"x\""),
            (&["-f"], "option -f requires an argument"),
            (&["-f", KEXEC, "-c"], "option -c requires an argument"),
        ];
        for (args, message) in cases {
            let err = error(args);
            assert_eq!(err.to_string(), *message, "{args:?}");
            assert!(err.show_usage(), "{args:?}");
            assert_eq!(err.exit_code(), 1, "{args:?}");
        }
    }

    #[test]
    fn firmware_is_mandatory_and_single() {
        let err = error(&["-A", "-m", "1G"]);
        assert_eq!(err, CliError::MissingFirmware);
        assert!(err.show_usage());
        assert_eq!(err.exit_code(), 1);
        assert_eq!(
            error(&["-f", KEXEC, "-f", "kexec,other"]).to_string(),
            "-f given more than once: \"kexec,other\""
        );
        assert_eq!(
            error(&["-f", "kexec"]).to_string(),
            "invalid -f \"kexec\": kernel path required"
        );
    }

    #[test]
    fn not_supported_yet_flags() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["-b", "-f", KEXEC],
                "not supported yet: -b (bvmcons console)",
            ),
            (
                &["-g", "1234", "-f", KEXEC],
                "not supported yet: -g (gdb port)",
            ),
            (&["-l", "bootrom,rom.fd"], "not supported yet: -l bootrom"),
        ];
        for (args, message) in cases {
            let err = error(args);
            assert_eq!(err.to_string(), *message);
            assert_eq!(err.exit_code(), 1);
            assert!(!err.show_usage());
        }
    }

    #[test]
    fn pci_devices_keep_their_order() {
        let c = config(&["-s", "31,lpc", "-s", "0:0,hostbridge", "-f", KEXEC]);
        assert_eq!(
            c.devices,
            vec![
                DeviceConfig {
                    address: PciAddress {
                        bus: 0,
                        slot: 31,
                        function: 0
                    },
                    kind: DeviceKind::Lpc,
                },
                DeviceConfig {
                    address: PciAddress {
                        bus: 0,
                        slot: 0,
                        function: 0
                    },
                    kind: DeviceKind::Hostbridge,
                },
            ]
        );
        assert_eq!(
            error(&["-s", "3,hostbridge", "-s", "0:3:0,lpc", "-f", KEXEC]).to_string(),
            "pci slot 0:3:0 already occupied"
        );
        assert_eq!(
            error(&["-s", "2,virtio-vpnkit,share", "-f", KEXEC]).to_string(),
            "not supported yet: -s 2,virtio-vpnkit,share (PCI device \"virtio-vpnkit\")"
        );
    }

    #[test]
    fn serial_ports() {
        let c = config(&["-l", "com1,stdio", "-l", "com2,autopty", "-f", KEXEC]);
        assert_eq!(c.com1, Some(SerialConfig::new(SerialBackend::Stdio)));
        assert_eq!(
            c.com2,
            Some(SerialConfig::new(SerialBackend::Autopty(None)))
        );
        let err = error(&["-l", "com1,stdio", "-l", "com1,autopty", "-f", KEXEC]);
        assert_eq!(err.exit_code(), 64);
        assert!(err
            .to_string()
            .starts_with("invalid lpc device configuration 'com1,autopty'"));
    }

    #[test]
    fn kernel_command_line_keeps_commas() {
        let c = config(&["-f", "kexec,k,,console=ttyS0,115200,n8 quiet"]);
        assert_eq!(
            c.firmware,
            Firmware::Kexec {
                kernel: "k".into(),
                initrd: None,
                cmdline: "console=ttyS0,115200,n8 quiet".into(),
            }
        );
    }

    #[test]
    fn pidfile() {
        let c = config(&["-F", "/var/run/xhyve.pid", "-f", KEXEC]);
        assert_eq!(c.pidfile, Some("/var/run/xhyve.pid".into()));
        assert_eq!(
            error(&["-F", "", "-f", KEXEC]).to_string(),
            "invalid -F \"\": pidfile path required"
        );
    }

    #[test]
    fn print_mac_flag() {
        assert!(!config(&["-f", KEXEC]).print_mac);
        let c = config(&["-M", "-s", "2,virtio-tap,tap0", "-f", KEXEC]);
        assert!(c.print_mac);
        assert!(c.first_nic_mac().is_some());
    }

    #[test]
    fn uuid_is_stored_in_textual_order() {
        let c = config(&["-U", "DEADBEEF-dead-Dead-0123-456789abcdef", "-f", KEXEC]);
        assert_eq!(
            c.uuid,
            Some([
                0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xde, 0xad, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ])
        );
        for bad in [
            "",
            "deadbeef",
            "deadbeef-dead-dead-dead-deaddeafbee",
            "deadbeef-dead-dead-dead-deaddeafbeef0",
            "deadbeefdead-dead-dead-deaddeafbeef",
            "deadbeef-dead-dead-dead-deaddeafbeeg",
            "{deadbeef-dead-dead-dead-deaddeafbeef}",
            "+eadbeef-dead-dead-dead-deaddeafbeef",
            "deadbeef-dead-dead-déad-deaddeafbee",
        ] {
            assert_eq!(
                error(&["-U", bad, "-f", KEXEC]).to_string(),
                format!("invalid -U \"{bad}\": not a UUID")
            );
        }
    }

    #[test]
    fn cpu_pins_are_checked_against_the_final_vcpu_count() {
        let c = config(&["-p", "1:3", "-p", "0:2", "-c", "2", "-f", KEXEC]);
        assert_eq!(
            c.cpu_pins,
            vec![
                CpuPin {
                    vcpu: 1,
                    host_cpu: 3
                },
                CpuPin {
                    vcpu: 0,
                    host_cpu: 2
                },
            ]
        );
        assert_eq!(
            error(&["-p", "2:0", "-c", "2", "-f", KEXEC]).to_string(),
            "invalid -p \"2:0\": vCPU 2 does not exist (vCPUs are 0-1)"
        );
        assert_eq!(
            error(&["-c", "4", "-p", "1:0", "-p", "1:5", "-f", KEXEC]).to_string(),
            "invalid -p \"1:5\": vCPU 1 is already pinned"
        );
        for bad in ["1", "1:", ":1", "a:1", "1:b", "1:2:3", "-1:0", "300:0"] {
            assert_eq!(
                error(&["-c", "4", "-p", bad, "-f", KEXEC]).to_string(),
                format!("invalid -p \"{bad}\": expected vcpu:hostcpu, two numbers")
            );
        }
    }
}
