//! Harness of the slow-tier tests that boot the xhyve-rs test kernel (`test/build-test-kernel.sh`)
//! through the real binary and drive its serial console through a pseudo-terminal, as a person
//! would: `-l com1,autopty`, then the test opens the `/dev/pts/N` that xhyve names, reads what
//! the guest prints and types commands.
//!
//! Without the kernel the tests skip, unless `XHYVE_REQUIRE_KVM=1`, which makes them fail.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub use crate::common::{kvm_usable, xhyve_binary, IrqChip};

/// Generous: the build machines emulate ring-0 guest code at about 1.4 M instructions/s, two
/// boots may share the machine in CI, and development machines run other engineers' jobs.
/// `XHYVE_LINUX_TIMEOUT=<seconds>` overrides it (a developer holding a shared lock).
pub fn boot_timeout() -> Duration {
    std::env::var("XHYVE_LINUX_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(900))
}
/// A shell command (ring 3 runs natively; each system call costs some emulated ring 0).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The init script's prompt (`PS1='xhyve-guest:\w# '` in test/initramfs/init-test).
pub const PROMPT: &str = "xhyve-guest:/# ";

fn repo_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The test kernel and its initramfs, or `None` to skip (panics under `XHYVE_REQUIRE_KVM=1`).
pub fn test_kernel() -> Option<(PathBuf, PathBuf)> {
    if !kvm_usable() {
        return None;
    }
    let kernel = repo_file("test/build/test-kernel/vmlinux");
    let initramfs = repo_file("test/build/test-kernel/initramfs.cpio");
    if kernel.exists() && initramfs.exists() {
        return Some((kernel, initramfs));
    }
    if std::env::var("XHYVE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!(
            "{} is missing: run test/build-test-kernel.sh (./test/run does)",
            kernel.display()
        );
    }
    eprintln!(
        "skipping: {} is missing (run test/build-test-kernel.sh)",
        kernel.display()
    );
    None
}

/// A scratch directory for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("linux-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a host command, panicking with its output unless it succeeds; returns its stdout.
pub fn host(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One boot of the test kernel.
pub struct Linux {
    pub irqchip: IrqChip,
    pub vcpus: u32,
    pub memory: String,
    /// `-s` values besides hostbridge and lpc.
    pub devices: Vec<String>,
    /// More xhyve flags (`-A`, `-W`, ...).
    pub flags: Vec<String>,
    /// Kernel command line after `console=ttyS0`.
    pub cmdline: String,
    /// `None`: no initramfs (the root comes from `root=` on the command line).
    pub initramfs: Option<PathBuf>,
    pub kernel: PathBuf,
}

impl Linux {
    pub fn new(kernel: &Path, initramfs: &Path, irqchip: IrqChip) -> Linux {
        Linux {
            irqchip,
            vcpus: 1,
            memory: "256M".into(),
            devices: Vec::new(),
            flags: vec!["-A".into()],
            cmdline: String::new(),
            initramfs: Some(initramfs.to_owned()),
            kernel: kernel.to_owned(),
        }
    }

    pub fn boot(&self) -> Booted {
        let mut args: Vec<OsString> = vec![
            "-m".into(),
            self.memory.clone().into(),
            "-c".into(),
            self.vcpus.to_string().into(),
            "-s".into(),
            "0:0,hostbridge".into(),
            "-s".into(),
            "31,lpc".into(),
        ];
        for device in &self.devices {
            args.push("-s".into());
            args.push(device.into());
        }
        args.push("-l".into());
        args.push("com1,autopty".into());
        args.extend(self.flags.iter().map(OsString::from));
        let initramfs = self
            .initramfs
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        args.push("-f".into());
        args.push(
            format!(
                "kexec,{},{initramfs},console=ttyS0 {}",
                self.kernel.display(),
                self.cmdline
            )
            .into(),
        );
        Booted::spawn(args, self.irqchip)
    }
}

/// A running test kernel, its console on a pty. Dropping it kills xhyve.
pub struct Booted {
    child: Child,
    pty: File,
    console: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    pub started: Instant,
    description: String,
    marker: u32,
}

impl Booted {
    fn spawn(args: Vec<OsString>, irqchip: IrqChip) -> Booted {
        let binary = xhyve_binary();
        let description = format!(
            "XHYVE_IRQCHIP={} {} {args:?}",
            irqchip.env_value(),
            binary.display()
        );
        let started = Instant::now();
        let mut child = Command::new(&binary)
            .args(&args)
            .env("XHYVE_IRQCHIP", irqchip.env_value())
            // The vCPU threads log KVM's emulated-instruction count at exit, and a sample of it
            // every 2 s (figures).
            .env("XHYVE_LOG", "debug,xhyve::stats=trace")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut stderr_pipe = child.stderr.take().expect("stderr piped");
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        // xhyve names the pty on stdout before the guest starts.
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
        let mut line = String::new();
        let pty_path = loop {
            line.clear();
            match stdout.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = child.wait();
                    panic!(
                        "xhyve never named its pty: {description}\n{}",
                        String::from_utf8_lossy(&stderr.lock().unwrap())
                    );
                }
                Ok(_) => {}
            }
            if let Some(path) = line.trim().strip_prefix("COM1 connected to ") {
                break PathBuf::from(path);
            }
        };
        // Keep draining stdout so that xhyve never blocks on it.
        thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
        });
        let pty = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&pty_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", pty_path.display()));
        make_raw(&pty);
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut reader = pty.try_clone().expect("dup pty");
        let sink = Arc::clone(&console);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once xhyve closes the master: the end of the console.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Booted {
            child,
            pty,
            console,
            stderr,
            started,
            description,
            marker: 0,
        }
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Instructions KVM emulated, summed over vCPUs, once xhyve has exited (debug log).
    pub fn emulated_instructions(&self) -> Option<u64> {
        let stderr = self.stderr();
        let counts: Vec<u64> = stderr
            .lines()
            .filter_map(|l| l.split("the hypervisor emulated ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        (!counts.is_empty()).then(|| counts.iter().sum())
    }

    /// Instructions KVM had emulated `at` after start, summed over vCPUs, from the last sample
    /// of each vCPU (`XHYVE_LOG=xhyve::stats=trace`, every 2 s) no later than `at`.
    pub fn emulated_at(&self, at: Duration) -> Option<u64> {
        let stderr = self.stderr();
        let mut latest: std::collections::BTreeMap<u32, u64> = Default::default();
        for line in stderr.lines() {
            // "vCPU 0 at 12.0 s: 1234 instructions emulated"
            let Some(rest) = line.split("vCPU ").nth(1) else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let (Some(id), Some("at"), Some(secs), Some("s:"), Some(count)) = (
                words.next(),
                words.next(),
                words.next(),
                words.next(),
                words.next(),
            ) else {
                continue;
            };
            let (Ok(id), Ok(secs), Ok(count)) = (id.parse(), secs.parse::<f64>(), count.parse())
            else {
                continue;
            };
            if secs <= at.as_secs_f64() {
                latest.insert(id, count);
            }
        }
        (!latest.is_empty()).then(|| latest.values().sum())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        thread::sleep(Duration::from_millis(200));
        panic!(
            "{why} after {:.0?}\n{}\nexit: {status:?}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.started.elapsed(),
            self.description,
            self.console(),
            self.stderr()
        );
    }

    /// Waits until the console (from `from` on) contains `needle`; returns the time since
    /// start and the console offset just after the needle.
    pub fn wait_for_from(
        &mut self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> (Duration, usize) {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if let Some(at) = console.get(from..).and_then(|tail| tail.find(needle)) {
                return (self.started.elapsed(), from + at + needle.len());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(300));
                if let Some(at) = self.console().get(from..).and_then(|t| t.find(needle)) {
                    return (self.started.elapsed(), from + at + needle.len());
                }
                self.fail(&format!(
                    "xhyve exited before the console showed {needle:?}"
                ));
            }
            if Instant::now() >= deadline {
                self.fail(&format!("timed out waiting for {needle:?}"));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Duration {
        self.wait_for_from(0, needle, timeout).0
    }

    /// Types `text` on the console.
    pub fn type_text(&mut self, text: &str) {
        // A slow guest drains the UART's receive FIFO one interrupt at a time: type in small
        // bursts, as a person would.
        for chunk in text.as_bytes().chunks(4) {
            if let Err(e) = self.pty.write_all(chunk).and_then(|()| self.pty.flush()) {
                self.fail(&format!("cannot type on the console: {e}"));
            }
            thread::sleep(Duration::from_millis(30));
        }
    }

    /// Runs a shell command at the prompt and returns its output. Panics unless it exits with
    /// status 0. The shell prints a start and an end marker around it; both are computed by
    /// the shell, so the echoed command line (which line editing may wrap) never matches them.
    pub fn sh(&mut self, command: &str) -> String {
        self.marker += 1;
        let n = 1000 + self.marker;
        let from = self.console().len();
        self.type_text(&format!(
            "echo \"<<$((1000+{}))>>\"; {command}; echo \"@@$((1000+{})) $?@@\"\n",
            self.marker, self.marker
        ));
        let (_, body_start) = self.wait_for_from(from, &format!("<<{n}>>"), COMMAND_TIMEOUT);
        let end_marker = format!("@@{n} ");
        let (_, after) = self.wait_for_from(body_start, &end_marker, COMMAND_TIMEOUT);
        let (_, end) = self.wait_for_from(after, "@@", COMMAND_TIMEOUT);
        let console = self.console();
        let status = console[after..end - 2].trim().to_string();
        let body = console[body_start..after - end_marker.len()]
            .replace('\r', "")
            .trim_start_matches('\n')
            .to_string();
        if status != "0" {
            self.fail(&format!("`{command}` exited with {status}:\n{body}"));
        }
        body
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped (self.child is still held).
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.child.id());
    }

    /// Waits for xhyve to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() >= deadline => self.fail("xhyve did not exit"),
                Ok(None) => thread::sleep(Duration::from_millis(100)),
                Err(e) => self.fail(&format!("cannot wait for xhyve: {e}")),
            }
        }
    }

    /// Types `command` (which ends the VM) and checks xhyve's exit code.
    pub fn end_with(&mut self, command: &str, code: i32) {
        self.type_text(&format!("{command}\n"));
        let got = self.wait_exit(COMMAND_TIMEOUT);
        if got != Some(code) {
            self.fail(&format!("`{command}`: exit code {got:?}, expected {code}"));
        }
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn make_raw(file: &File) {
    // SAFETY: tcgetattr/tcsetattr on an open tty descriptor with a zeroed termios that
    // tcgetattr fills in before use.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(file.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(file.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
}

/// Unpacks an uncompressed newc cpio (the test initramfs) into `dir`: directories, regular
/// files and symbolic links with their permission bits. Device nodes are skipped (the kernel
/// mounts devtmpfs on /dev), so no root is needed.
pub fn unpack_newc(cpio: &Path, dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let data = std::fs::read(cpio).unwrap_or_else(|e| panic!("{}: {e}", cpio.display()));
    let field = |at: usize, i: usize| -> usize {
        let hex = std::str::from_utf8(&data[at + 6 + 8 * i..at + 14 + 8 * i]).expect("hex field");
        usize::from_str_radix(hex, 16).expect("hex field")
    };
    let align = |n: usize| (n + 3) & !3;
    let mut at = 0;
    loop {
        assert_eq!(
            &data[at..at + 6],
            b"070701",
            "newc magic at {at} in {}",
            cpio.display()
        );
        let (mode, filesize, namesize) = (field(at, 1), field(at, 6), field(at, 11));
        let name_at = at + 110;
        let name = std::str::from_utf8(&data[name_at..name_at + namesize - 1]).expect("name");
        let body = align(name_at + namesize);
        let next = align(body + filesize);
        if name == "TRAILER!!!" {
            return;
        }
        let rel = name.trim_start_matches('/');
        assert!(
            !rel.split('/').any(|c| c == ".."),
            "cpio member {name:?} leaves the tree"
        );
        let path = dir.join(rel);
        let content = &data[body..body + filesize];
        match mode & 0o170000 {
            0o040000 => std::fs::create_dir_all(&path).expect("mkdir"),
            0o100000 => std::fs::write(&path, content).expect("write file"),
            0o120000 => {
                // gen_init_cpio stores the target with its NUL.
                let target = content.strip_suffix(b"\0").unwrap_or(content);
                let target = std::str::from_utf8(target).expect("link target");
                std::os::unix::fs::symlink(target, &path).expect("symlink");
            }
            _ => {}
        }
        if matches!(mode & 0o170000, 0o040000 | 0o100000) {
            std::fs::set_permissions(
                &path,
                std::fs::Permissions::from_mode((mode & 0o7777) as u32),
            )
            .expect("chmod");
        }
        at = next;
    }
}
