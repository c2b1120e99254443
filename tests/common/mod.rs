//! Guest-test harness: builds the multiboot test guest once per test binary, runs the real
//! `xhyve` binary on it with a time limit, and hands back exit code and output.
//!
//! Tests that need KVM call [`kvm_usable`] first and return early when it says no; with
//! `XHYVE_REQUIRE_KVM=1` a missing `/dev/kvm` fails the test instead.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Generous: ring-0 guest code is emulated at ~1-2 M instructions/s on the build machines.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The interrupt-controller mode `xhyve` is asked for through `XHYVE_IRQCHIP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqChip {
    /// KVM's in-kernel LAPIC/IOAPIC/PIC/PIT (the default).
    #[default]
    Kernel,
    /// xhyve's userspace interrupt controllers (`intc`), as on Hypervisor.framework.
    User,
}

impl IrqChip {
    pub fn env_value(self) -> &'static str {
        match self {
            IrqChip::Kernel => "kernel",
            IrqChip::User => "user",
        }
    }
}

/// Generates one test per interrupt-controller mode from a body taking the mode. Both skip
/// (or fail, under `XHYVE_REQUIRE_KVM=1`) without KVM.
/// Needs `#[macro_use] mod common;` at the test crate's root.
#[allow(unused_macros)] // Not every test crate that includes `common` defines guest tests.
macro_rules! guest_test {
    ($name:ident, |$mode:ident| $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($mode: $crate::common::IrqChip) {
                $body
            }

            #[test]
            fn kernel_irqchip() {
                if $crate::common::kvm_usable() {
                    body($crate::common::IrqChip::Kernel);
                }
            }

            #[test]
            fn user_irqchip() {
                if $crate::common::kvm_usable() {
                    body($crate::common::IrqChip::User);
                }
            }
        }
    };
}

/// Whether `/dev/kvm` can be opened read-write. When it cannot, prints why and returns false,
/// or panics if `XHYVE_REQUIRE_KVM=1` (CI must not silently skip the guest tests).
pub fn kvm_usable() -> bool {
    let error = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => return true,
        Err(error) => error,
    };
    if std::env::var_os("XHYVE_REQUIRE_KVM").is_some_and(|v| v == "1") {
        panic!("XHYVE_REQUIRE_KVM=1 but /dev/kvm is not usable: {error}");
    }
    eprintln!("note: skipping guest test: /dev/kvm is not usable: {error}");
    false
}

/// The `xhyve` under test: this package's binary, or `XHYVE_TEST_BIN` to run the suite
/// against another build.
pub fn xhyve_binary() -> PathBuf {
    std::env::var_os("XHYVE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_xhyve")))
}

/// Path of the multiboot test guest (`test/guests`), built on first use.
pub fn guest_image() -> &'static Path {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_guest) {
        Ok(path) => path,
        Err(why) => panic!("cannot build the test guest: {why}"),
    }
}

fn build_guest() -> Result<PathBuf, String> {
    for tool in ["cc", "ld"] {
        match Command::new(tool).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(format!("`{tool} --version` failed: {}", out.status)),
            Err(e) => {
                return Err(format!(
                    "`{tool}` is needed to build test/guests (install gcc and binutils): {e}"
                ))
            }
        }
    }
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("test/guests");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    // Build privately, then rename into place: test binaries of concurrent cargo runs share
    // this directory, and a rename never exposes a half-written image.
    let build_dir = out_dir.join(format!("build-{}", std::process::id()));
    std::fs::create_dir_all(&build_dir)
        .map_err(|e| format!("cannot create {}: {e}", build_dir.display()))?;
    let output = Command::new("sh")
        .arg(sources.join("build.sh"))
        .arg(&build_dir)
        .output()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "test/guests/build.sh failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let image = out_dir.join("guest.elf");
    std::fs::rename(build_dir.join("guest.elf"), &image)
        .map_err(|e| format!("cannot move guest.elf into {}: {e}", out_dir.display()))?;
    // Only object files are left; failing to remove them is harmless.
    let _ = std::fs::remove_dir_all(&build_dir);
    Ok(image)
}

/// How an `xhyve` run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code, or `None` if a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Panics, showing all output, unless the exit code is `code`.
    pub fn assert_exit(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit status\n{self}");
        self
    }

    /// Panics, showing all output, unless some stdout line equals `line` (ignoring `\r`).
    pub fn assert_line(&self, line: &str) -> &Self {
        assert!(
            self.lines().any(|l| l == line),
            "no stdout line {line:?}\n{self}"
        );
        self
    }

    /// Stdout lines without trailing `\r`.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.stdout.lines().map(|l| l.trim_end_matches('\r'))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// One `xhyve` invocation. [`Vm::multiboot`] fills in the standard machine; the setters
/// change parts of it; [`Vm::run`] or [`Vm::spawn`] starts it.
#[derive(Debug, Clone)]
pub struct Vm {
    memory: String,
    vcpus: u32,
    pci: Vec<String>,
    extra_args: Vec<OsString>,
    firmware: Option<OsString>,
    env: Vec<(String, String)>,
    irqchip: IrqChip,
    stdin_piped: bool,
    timeout: Duration,
    console: OsString,
}

impl Vm {
    /// `xhyve -m 256M -s 0:0,hostbridge -s 31,lpc -l com1,stdio -f multiboot,GUEST,,CMDLINE`.
    pub fn multiboot(guest_cmdline: &str) -> Vm {
        let mut firmware = OsString::from("multiboot,");
        firmware.push(guest_image());
        firmware.push(",,");
        firmware.push(guest_cmdline);
        Vm::with_firmware(firmware)
    }

    /// The standard machine with an arbitrary `-f` value.
    pub fn with_firmware(firmware: impl Into<OsString>) -> Vm {
        Vm {
            memory: "256M".into(),
            vcpus: 1,
            pci: vec!["0:0,hostbridge".into(), "31,lpc".into()],
            extra_args: Vec::new(),
            firmware: Some(firmware.into()),
            env: Vec::new(),
            irqchip: IrqChip::default(),
            stdin_piped: false,
            timeout: GUEST_TIMEOUT,
            console: "com1,stdio".into(),
        }
    }

    /// Replaces the default `-l com1,stdio` (the guest's output then no longer reaches
    /// [`Running::wait_for_line`]).
    pub fn console(mut self, spec: impl Into<OsString>) -> Vm {
        self.console = spec.into();
        self
    }

    pub fn memory(mut self, memory: &str) -> Vm {
        self.memory = memory.into();
        self
    }

    pub fn vcpus(mut self, vcpus: u32) -> Vm {
        self.vcpus = vcpus;
        self
    }

    /// Replaces the default `-s` list.
    pub fn pci(mut self, slots: &[&str]) -> Vm {
        self.pci = slots.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Appends arguments after the standard ones (before `-f`).
    pub fn args<I, S>(mut self, args: I) -> Vm
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Vm {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn irqchip(mut self, mode: IrqChip) -> Vm {
        self.irqchip = mode;
        self
    }

    /// Gives the VM a stdin pipe (see [`Running::send`]); otherwise stdin is null.
    pub fn stdin_piped(mut self) -> Vm {
        self.stdin_piped = true;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Vm {
        self.timeout = timeout;
        self
    }

    /// The full argument list passed to `xhyve`.
    pub fn command_line(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "-m".into(),
            self.memory.clone().into(),
            "-c".into(),
            self.vcpus.to_string().into(),
        ];
        for slot in &self.pci {
            args.push("-s".into());
            args.push(slot.into());
        }
        args.push("-l".into());
        args.push(self.console.clone());
        args.extend(self.extra_args.iter().cloned());
        if let Some(firmware) = &self.firmware {
            args.push("-f".into());
            args.push(firmware.clone());
        }
        args
    }

    /// Runs to completion; panics (with the output so far) on timeout.
    pub fn run(self) -> Outcome {
        self.spawn().finish()
    }

    pub fn spawn(self) -> Running {
        spawn_xhyve(
            self.command_line(),
            &self.env,
            self.irqchip,
            self.stdin_piped,
            self.timeout,
        )
    }
}

/// Runs `xhyve` with exactly `args` (no standard machine), stdin null, default time limit.
pub fn run_xhyve<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args = args.into_iter().map(Into::into).collect();
    spawn_xhyve(args, &[], IrqChip::default(), false, GUEST_TIMEOUT).finish()
}

fn spawn_xhyve(
    args: Vec<OsString>,
    env: &[(String, String)],
    irqchip: IrqChip,
    stdin_piped: bool,
    timeout: Duration,
) -> Running {
    let binary = xhyve_binary();
    let mut command = Command::new(&binary);
    command
        .args(&args)
        .env("XHYVE_IRQCHIP", irqchip.env_value())
        .stdin(if stdin_piped {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = vec![
        collect(child.stdout.take(), Arc::clone(&stdout)),
        collect(child.stderr.take(), Arc::clone(&stderr)),
    ];
    Running {
        stdin: child.stdin.take(),
        child,
        stdout,
        stderr,
        readers,
        deadline: Instant::now() + timeout,
        description: format!("{} {:?}", binary.display(), args),
    }
}

fn collect<R: Read + Send + 'static>(
    source: Option<R>,
    sink: Arc<Mutex<Vec<u8>>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let Some(mut source) = source else { return };
        let mut buf = [0u8; 4096];
        while let Ok(n) = source.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

/// A started `xhyve`. Dropping it kills the process.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    deadline: Instant,
    description: String,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until stdout has a line equal to `line`; panics with all output if the process
    /// exits first or the time limit passes.
    pub fn wait_for_line(&mut self, line: &str) {
        self.wait_for(line, |l| l == line)
    }

    /// Waits until stdout has a line starting with `prefix`.
    pub fn wait_for_line_starting(&mut self, prefix: &str) {
        self.wait_for(prefix, |l| l.starts_with(prefix))
    }

    fn wait_for(&mut self, line: &str, matches: impl Fn(&str) -> bool) {
        loop {
            let seen = self
                .stdout_so_far()
                .lines()
                .any(|l| matches(l.trim_end_matches('\r')));
            if seen {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers drain, then look once more before giving up.
                let outcome = self.collect_outcome(status);
                if outcome.lines().any(&matches) {
                    return;
                }
                panic!("xhyve exited before printing {line:?}\n{outcome}");
            }
            if Instant::now() >= self.deadline {
                self.kill_and_panic(&format!("timed out waiting for {line:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether `xhyve` has exited (its output may still be draining).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to `xhyve`.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we own (not yet reaped: `self.child` is still held).
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.child.id());
    }

    /// Writes `bytes` to the guest's COM1 input (needs [`Vm::stdin_piped`]).
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("send() needs Vm::stdin_piped()");
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot write to xhyve's stdin: {e}"));
    }

    /// Waits for exit (up to the time limit, then kills and panics) and collects the output.
    pub fn finish(mut self) -> Outcome {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return self.collect_outcome(status),
                Ok(None) if Instant::now() >= self.deadline => {
                    self.kill_and_panic("timed out waiting for exit")
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("cannot wait for xhyve: {e}"),
            }
        }
    }

    fn collect_outcome(&mut self, status: ExitStatus) -> Outcome {
        // The pipes close when xhyve exits, unless it left a child holding them: then the
        // readers would block forever, so only join those that have finished.
        let grace = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < grace {
            thread::sleep(Duration::from_millis(10));
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        Outcome {
            code: status.code(),
            stdout: self.stdout_so_far(),
            stderr: self.stderr_so_far(),
        }
    }

    fn kill_and_panic(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        let outcome = match status {
            Some(status) => self.collect_outcome(status),
            None => Outcome {
                code: None,
                stdout: self.stdout_so_far(),
                stderr: self.stderr_so_far(),
            },
        };
        panic!("{why}: {}\n{outcome}", self.description);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
