//! The texts `main` prints for `-h` (and after usage errors) and for `-v`.

use std::path::Path;

/// xhyve's usage text for `program` (argv[0]; only its last path component is shown).
pub fn usage(program: &str) -> String {
    let name = Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.to_string());
    // xhyve pads the second synopsis line to the program name's width (`%*s`).
    let pad = " ".repeat(name.chars().count());
    format!(
        "Usage: {name} [-behuwxMACHPWY] [-c vcpus] [-F <pidfile>] [-g <gdb port>] [-l <lpc>]
       {pad} [-m mem] [-p vcpu:hostcpu] [-s <pci>] [-U uuid] -f <fw>
       -A: create ACPI tables
       -c: # cpus (default 1)
       -C: include guest memory in core file
       -e: exit on unhandled I/O access
       -f: firmware: kexec,kernel[,initrd[,cmdline]]
           or multiboot,kernel[,modules][,cmdline]
       -F: pidfile
       -g: gdb port
       -h: help
       -H: vmexit from the guest on hlt
       -l: LPC device configuration. Ex: -l com1,stdio -l com2,autopty -l com2,/dev/myownpty
       -m: memory size in MB, may be suffixed with one of K, M, G or T
       -M: print MAC address and exit if using vmnet
       -p: pin 'vcpu' to 'hostcpu'
       -P: vmexit from the guest on pause
       -s: <slot,driver,configinfo> PCI slot config
       -u: RTC keeps UTC time
       -U: uuid
       -v: show build version
       -w: ignore unimplemented MSRs
       -W: force virtio to use single-vector MSI
       -x: local apic is in x2APIC mode
       -Y: disable MPtable generation
       --restful-uri unix:///PATH|tcp://127.0.0.1:PORT: control API (vfkit's REST)
"
    )
}

/// Man page sections clap's definition cannot carry, appended to the generated page (roff).
pub const MAN_EXTRA_SECTIONS: &str = r#".SH BLOCK DEVICES
\fB\-s\fR \fISLOT\fR,\fBvirtio\-blk\fR|\fBahci\-hd\fR|\fBahci\-cd\fR,\fIPATH\fR[,\fBnocache\fR][,\fBsync\fR|\fBdirect\fR][,\fBro\fR][,\fBsectorsize=\fR\fIL\fR[/\fIP\fR]][,\fBflush=full\fR|\fBfsync\fR][,\fBformat=raw\fR|\fBqcow2\fR][,\fBl2\-cache\-size=\fR\fIBYTES\fR]
.br
Without \fBformat=\fR an image is raw; the format is never guessed from the contents.
\fBformat=qcow2\fR (or HyperKit\*(Aqs \fBqcow\fR) opens a qcow2 image and its backing chain;
a writable one is checked at open and refused, naming the bad field, if its header, tables
or refcounts are corrupt. \fBl2\-cache\-size=\fR (qcow2 only, QEMU\*(Aqs meaning) bounds the
memory caching guest\-to\-host cluster mappings: 8 bytes per cluster of guest disk, in whole
L2 tables, with an optional k, M or G suffix; default 32M, allocated only as the guest
touches the disk.
.SH EXIT STATUS
As xhyve: 0 reset, 1 poweroff, 2 halt (every vCPU halted with interrupts off), 3 triple
fault, 4 an emulation failure (stderr says what and where), 1 a setup error, 64 a bad
\fB\-m\fR or \fB\-l\fR. Run as \fBhyperkit\fR: 0 poweroff and halt, 2 reset, 3 triple
fault. Stopped by SIGTERM, SIGINT, SIGHUP or the control API: 1; by another terminating
signal: 128 plus its number.
.SH SIGNALS
SIGTERM presses the ACPI power button when the guest enabled ACPI (\fB\-A\fR); otherwise,
and on a second SIGTERM, xhyve stops at once. SIGINT and SIGHUP stop at once. SIGUSR1 pauses
the machine and SIGUSR2 resumes it. SIGPIPE is ignored. Every stop removes the pidfile,
the \fBautopty=\fR links and the control socket, and restores the terminal.
.SH CONTROL API
\fB\-\-restful\-uri\fR serves vfkit\*(Aqs REST API: \fBGET /vm/state\fR, \fBGET /vm/inspect\fR,
and \fBPOST /vm/state\fR with \fB{"state":\fR \fB"Stop"\fR (the ACPI power button),
\fB"HardStop"\fR (exit 1), \fB"Pause"\fR, \fB"Resume"\fR, or \fB"Reset"\fR (ours): a reset
button, the machine starts again in place (same process, devices and disk images, the guest
loaded again from \fB\-f\fR), 202 when done, 409 while it stops. A reset the guest asks for
itself still ends xhyve with exit 0.
.SH ENVIRONMENT
\fBXHYVE_LOG\fR log filter (e.g. debug); \fBXHYVE_HV\fR hypervisor back end (kvm, hvf);
\fBXHYVE_IRQCHIP\fR kernel or user interrupt controllers (Linux).
.SH SEE ALSO
The README of xhyve-rs; xhyve(1) and hyperkit(1) upstream.
"#;

/// The HyperKit release whose behaviour the `hyperkit` personality follows (moby/hyperkit at
/// 3cb0d54, 2022-02-20). Its date is what tools check: minikube takes the first line of
/// `hyperkit -v`, the part after ": ", the part after the first "." and its first 8 characters
/// as YYYYMMDD, and wants at least 20190201.
const HYPERKIT_VERSION: &str = "v0.20220220";

/// The `-v` text, shaped like xhyve's, or like HyperKit's when run as `hyperkit`.
pub fn version_text(personality: super::Personality) -> String {
    if personality == super::Personality::HyperKit {
        return format!(
            "hyperkit: {HYPERKIT_VERSION} (xhyve-rs {})

Homepage: https://github.com/docker/hyperkit
License: BSD

",
            env!("CARGO_PKG_VERSION")
        );
    }
    format!(
        "xhyve: {}

xhyve-rs is a Rust port of xhyve, FreeBSD's bhyve hypervisor,
running on Linux KVM and macOS Hypervisor.framework.

License: BSD
",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_names_the_program_and_pads_the_second_line() {
        let text = usage("/usr/local/bin/xhyve");
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            "Usage: xhyve [-behuwxMACHPWY] [-c vcpus] [-F <pidfile>] [-g <gdb port>] [-l <lpc>]"
        );
        assert_eq!(
            lines.next().unwrap(),
            "             [-m mem] [-p vcpu:hostcpu] [-s <pci>] [-U uuid] -f <fw>"
        );
        assert!(text.contains("       -p: pin 'vcpu' to 'hostcpu'\n"));
        assert!(text.contains("       -f: firmware: kexec,kernel[,initrd[,cmdline]]\n"));
        assert!(text.contains("multiboot,kernel[,modules][,cmdline]\n"));
        assert!(text.contains("       -Y: disable MPtable generation\n"));
        assert!(text.ends_with("control API (vfkit's REST)\n"));
    }

    #[test]
    fn usage_keeps_a_bare_program_name() {
        assert!(usage("xh").starts_with("Usage: xh [-behuwxMACHPWY]"));
        assert!(usage("xh").contains("\n          [-m mem]"));
    }

    #[test]
    fn version_names_the_crate_version() {
        let text = version_text(crate::cli::Personality::Xhyve);
        assert!(text.starts_with(&format!("xhyve: {}\n", env!("CARGO_PKG_VERSION"))));
        assert!(text.contains("Rust port of xhyve"));
        assert!(text.ends_with("License: BSD\n"));
    }

    /// The first line as minikube's hyperkit driver reads it (convertVersionToDate).
    #[test]
    fn hyperkit_version_line_parses_as_minikube_does() {
        let text = version_text(crate::cli::Personality::HyperKit);
        let line = text.split('\n').next().unwrap();
        assert!(line.starts_with("hyperkit: v0."), "{line}");
        let version = line.split(": ").nth(1).unwrap();
        let date = &version.split('.').nth(1).unwrap()[..8];
        assert!(date.bytes().all(|b| b.is_ascii_digit()), "{date}");
        assert!(date >= "20190201", "minikube's minimum: {date}");
    }
}
