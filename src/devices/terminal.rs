//! Host ends of a COM port: the controlling terminal, a new pseudo-terminal (optionally with a
//! symlink to it), `null`, or a tty device.
//!
//! A back end is an output writer plus an optional input reader. Writers issue one `write()`
//! per call with no user-space buffering, so bytes reach a pipe reader promptly, and never
//! block a vCPU for long: a pty or tty drops what its peer does not take, and stdout waits at
//! most [`STDOUT_STALL`] for a reader before dropping output. Readers wait with `poll()` so
//! that the input thread can notice a stop request.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty;
use nix::sys::termios::{self, SetArg, Termios};

use super::console_log::{ConsoleLogError, LogRing, LoggedWriter, SystemLog};
use super::serial::{SerialBackend, SerialConfig};

/// How long a stdio console write waits for the reader of a full stdout (a pipe nobody
/// reads, a suspended terminal) before output is dropped. Long enough for a slow but live
/// reader; short enough that the vCPU holding the UART lock stays responsive to a stop.
pub const STDOUT_STALL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("-l com{com}: \"{path}\" is not a terminal")]
    NotATerminal { com: u8, path: PathBuf },
    #[error("-l com{com}: cannot open \"{path}\": {source}")]
    Open {
        com: u8,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("-l com{com}: cannot create a pseudo-terminal: {source}")]
    Pty {
        com: u8,
        #[source]
        source: io::Error,
    },
    #[error("-l com{com}: cannot set up the terminal: {source}")]
    Setup {
        com: u8,
        #[source]
        source: io::Error,
    },
    #[error("-l com{com}: cannot make the link \"{path}\" to the pty: {source}")]
    Link {
        com: u8,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Log(#[from] ConsoleLogError),
}

/// The opened host side of one COM port.
pub struct Terminal {
    /// Where guest output goes.
    pub output: Box<dyn Write + Send>,
    /// Where guest input comes from (`None`: the port has no input).
    pub input: Option<FdReader>,
    /// The pseudo-terminal's slave path, for `Autopty`.
    pub pty_path: Option<PathBuf>,
    /// Keeps stdin in raw mode while the terminal lives.
    _raw_stdin: Option<RawStdinGuard>,
    /// Holds the pty slave open so that guest output is buffered (not lost with EIO) and the
    /// raw settings persist until a client opens it.
    _pty_slave: Option<OwnedFd>,
}

/// What must stay alive while a terminal's reader and writer are in use.
pub struct TerminalHold {
    _raw_stdin: Option<RawStdinGuard>,
    _pty_slave: Option<OwnedFd>,
}

impl Terminal {
    /// Splits the terminal into its writer, its reader and what keeps them working.
    pub fn into_parts(
        self,
    ) -> (
        Box<dyn Write + Send>,
        Option<FdReader>,
        Option<PathBuf>,
        TerminalHold,
    ) {
        let hold = TerminalHold {
            _raw_stdin: self._raw_stdin,
            _pty_slave: self._pty_slave,
        };
        (self.output, self.input, self.pty_path, hold)
    }

    /// Opens the back end for COM`com` (used in messages only).
    pub fn open(backend: &SerialBackend, com: u8) -> Result<Terminal, TerminalError> {
        match backend {
            SerialBackend::Stdio => open_stdio(com),
            SerialBackend::Autopty(link) => open_autopty(com, link.as_deref()),
            SerialBackend::Null => Ok(Terminal {
                output: Box::new(io::sink()),
                input: None,
                pty_path: None,
                _raw_stdin: None,
                _pty_slave: None,
            }),
            SerialBackend::Tty(path) => open_tty(com, path),
        }
    }

    /// Opens a whole `-l` configuration: the terminal plus its console ring and system log.
    /// The copies are set up first, so a bad `log=` path fails before a pty is announced.
    pub fn open_config(config: &SerialConfig, com: u8) -> Result<Terminal, TerminalError> {
        let ring = match &config.log_ring {
            Some(path) => Some(LogRing::create(path, com)?),
            None => None,
        };
        let system_log = match config.asl {
            true => Some(SystemLog::open(com)?),
            false => None,
        };
        let mut terminal = Terminal::open(&config.backend, com)?;
        if ring.is_some() || system_log.is_some() {
            let inner = std::mem::replace(&mut terminal.output, Box::new(io::sink()));
            terminal.output = Box::new(LoggedWriter {
                inner,
                ring,
                system_log,
            });
        }
        Ok(terminal)
    }
}

/// Symlinks made by `autopty=PATH`, removed at exit by [`remove_links`].
static LINKS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Replaces whatever is at `link` (HyperKit unlinks it too) with a symlink to `target`.
fn make_link(link: &Path, target: &Path) -> io::Result<()> {
    match std::fs::remove_file(link) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(target, link)?;
    crate::vmm::signals::remove_at_crash(link);
    LINKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(link.to_path_buf());
    Ok(())
}

/// Removes the `autopty=PATH` symlinks this process made. Safe to call more than once.
pub fn remove_links() {
    let links = std::mem::take(&mut *LINKS.lock().unwrap_or_else(|p| p.into_inner()));
    for link in links {
        // Only our symlink: a file someone put there since is theirs.
        if link
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            let _ = std::fs::remove_file(link);
        }
    }
}

fn open_stdio(com: u8) -> Result<Terminal, TerminalError> {
    let setup = |source| TerminalError::Setup { com, source };
    let output = io::stdout().as_fd().try_clone_to_owned().map_err(setup)?;
    let output = FdWriter::bounded(output, STDOUT_STALL);
    // A closed stdin (daemons, some CI runners) means a port without input, not an error.
    let input = match io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => Some(FdReader::new(fd, false)),
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => None,
        Err(e) => return Err(setup(e)),
    };
    let raw = if io::stdin().is_terminal() {
        Some(RawStdinGuard::enter().map_err(setup)?)
    } else {
        None
    };
    Ok(Terminal {
        output: Box::new(output),
        input,
        pty_path: None,
        _raw_stdin: raw,
        _pty_slave: None,
    })
}

fn open_autopty(com: u8, link: Option<&Path>) -> Result<Terminal, TerminalError> {
    let pty = |source| TerminalError::Pty { com, source };
    let (master, slave_path) = open_pty_master().map_err(pty)?;
    let slave = open_path(&slave_path, libc::O_NOCTTY).map_err(pty)?;
    make_raw(&slave).map_err(pty)?;
    set_nonblocking(&master).map_err(pty)?;
    let reader_fd = master.try_clone().map_err(pty)?;
    if let Some(link) = link {
        make_link(link, &slave_path).map_err(|source| TerminalError::Link {
            com,
            path: link.to_path_buf(),
            source,
        })?;
    }
    println!("COM{com} connected to {}", slave_path.display());
    // The VMM's later output and a test reading this line must see it now.
    let _ = io::stdout().flush();
    Ok(Terminal {
        output: Box::new(FdWriter::new(master, true)),
        input: Some(FdReader::new(reader_fd, true)),
        pty_path: Some(slave_path),
        _raw_stdin: None,
        _pty_slave: Some(slave),
    })
}

fn open_tty(com: u8, path: &Path) -> Result<Terminal, TerminalError> {
    let fd = open_path(path, libc::O_NOCTTY | libc::O_NONBLOCK).map_err(|source| {
        TerminalError::Open {
            com,
            path: path.to_owned(),
            source,
        }
    })?;
    if !fd.is_terminal() {
        return Err(TerminalError::NotATerminal {
            com,
            path: path.to_owned(),
        });
    }
    let setup = |source| TerminalError::Setup { com, source };
    make_raw(&fd).map_err(setup)?;
    let reader_fd = fd.try_clone().map_err(setup)?;
    Ok(Terminal {
        output: Box::new(FdWriter::new(fd, true)),
        input: Some(FdReader::new(reader_fd, false)),
        pty_path: None,
        _raw_stdin: None,
        _pty_slave: None,
    })
}

/// Creates a pseudo-terminal and returns its master and the slave's path.
fn open_pty_master() -> io::Result<(OwnedFd, PathBuf)> {
    let master = pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY)?;
    pty::grantpt(&master)?;
    pty::unlockpt(&master)?;
    let name = slave_name(&master)?;
    Ok((master.into(), PathBuf::from(name)))
}

#[cfg(target_os = "linux")]
fn slave_name(master: &pty::PtyMaster) -> nix::Result<String> {
    pty::ptsname_r(master)
}

#[cfg(not(target_os = "linux"))]
fn slave_name(master: &pty::PtyMaster) -> nix::Result<String> {
    // SAFETY: ptsname returns a static buffer that the next call overwrites; nix copies it
    // out at once, and ports are opened once at start-up on one thread.
    unsafe { pty::ptsname(master) }
}

/// Opens `path` read-write with extra open(2) `flags` (close-on-exec, as std always sets).
fn open_path(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Puts a terminal in raw mode so that bytes pass unchanged in both directions:
/// cfmakeraw(3), as xhyve and bhyve do. (vmm-sys-util's `Terminal::set_raw_mode` clears only
/// ICANON, ECHO and ISIG: output would still gain a CR before each LF, the user's Enter would
/// reach the guest as LF, and ^S/^Q would be taken by the host's flow control.)
fn make_raw(fd: impl AsFd) -> io::Result<()> {
    let mut t = termios::tcgetattr(&fd)?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(&fd, SetArg::TCSANOW, &t)?;
    Ok(())
}

/// The terminal on stdin and its settings from before raw mode: written once, read from
/// signal handlers. Kept as libc's struct, exactly as the kernel gave it: nix's `Termios`
/// is not `Sync`, and rebuilding one drops flag bits nix has no name for.
static SAVED_STDIN: OnceLock<(OwnedFd, libc::termios)> = OnceLock::new();
/// Whether stdin is currently in raw mode and must be restored.
static STDIN_IS_RAW: AtomicBool = AtomicBool::new(false);

/// Restores stdin's terminal settings if `xhyve` put it in raw mode.
///
/// Async-signal-safe: one atomic swap, a lock-free read of the saved settings and
/// `tcsetattr`. Safe to call any number of times, from any thread or signal handler.
pub fn restore_terminal() {
    if !STDIN_IS_RAW.swap(false, Ordering::SeqCst) {
        return;
    }
    if let Some((fd, saved)) = SAVED_STDIN.get() {
        // The one call left on libc: it writes back the saved struct bit for bit (see
        // SAVED_STDIN), and allocates nothing, as a signal handler requires.
        // SAFETY: `saved` is a valid termios filled by tcgetattr; `fd` is open for the
        // whole process.
        unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, saved) };
    }
}

/// Stdin in raw mode for as long as this lives.
struct RawStdinGuard;

impl RawStdinGuard {
    fn enter() -> io::Result<RawStdinGuard> {
        // The first saved settings are the user's; a second guest port on stdio must not
        // record the raw settings as "original".
        let saved = match SAVED_STDIN.get() {
            Some((_, saved)) => *saved,
            None => {
                // A descriptor of our own: the signal-time restore needs no std handle.
                let fd = io::stdin().as_fd().try_clone_to_owned()?;
                let original = libc::termios::from(termios::tcgetattr(&fd)?);
                SAVED_STDIN.get_or_init(|| (fd, original)).1
            }
        };
        let mut raw = Termios::from(saved);
        termios::cfmakeraw(&mut raw);
        STDIN_IS_RAW.store(true, Ordering::SeqCst);
        if let Err(err) = termios::tcsetattr(io::stdin(), SetArg::TCSANOW, &raw) {
            restore_terminal();
            return Err(err.into());
        }
        Ok(RawStdinGuard)
    }
}

impl Drop for RawStdinGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Unbuffered output to a descriptor: each `write` is one `write(2)`.
pub struct FdWriter {
    fd: File,
    mode: WriteMode,
}

enum WriteMode {
    /// A blocking write (tests' own pty clients).
    Blocking,
    /// A non-blocking descriptor: drop output the peer does not take (a pty nobody reads)
    /// instead of blocking the vCPU.
    DropWhenFull,
    /// A descriptor shared with others (stdout), which must stay blocking: wait up to `stall`
    /// for room, then drop output; while `stalled`, drop at once until room appears, so a
    /// reader that went away costs the guest no more than one wait.
    Bounded { stall: Duration, stalled: bool },
}

impl FdWriter {
    pub fn new(fd: OwnedFd, drop_when_full: bool) -> Self {
        let mode = if drop_when_full {
            WriteMode::DropWhenFull
        } else {
            WriteMode::Blocking
        };
        FdWriter {
            fd: File::from(fd),
            mode,
        }
    }

    /// A writer that never waits more than `stall` for the reader.
    pub fn bounded(fd: OwnedFd, stall: Duration) -> Self {
        FdWriter {
            fd: File::from(fd),
            mode: WriteMode::Bounded {
                stall,
                stalled: false,
            },
        }
    }

    /// Waits until the descriptor takes output or `timeout` passes; true if it is writable.
    fn wait_writable(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            match poll(&mut pfd, timeout) {
                // POLLERR/POLLHUP: let write() report it.
                Ok(ready) if ready > 0 => return true,
                Ok(_) => return false,
                Err(_) if left.is_zero() => return false,
                // EINTR: try again until the deadline.
                Err(_) => {}
            }
        }
    }
}

impl Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let WriteMode::Bounded { stall, stalled } = self.mode {
            let wait = if stalled { Duration::ZERO } else { stall };
            let writable = self.wait_writable(wait);
            self.mode = WriteMode::Bounded {
                stall,
                stalled: !writable,
            };
            if !writable {
                return Ok(buf.len());
            }
        }
        let drop_when_full = matches!(self.mode, WriteMode::DropWhenFull);
        // A signal may interrupt the write; retry a bounded number of times, then drop.
        for _ in 0..8 {
            // One write(2) per call: a File has no user-space buffer.
            let err = match self.fd.write(buf) {
                Ok(n) => return Ok(n),
                Err(err) => err,
            };
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                // A pty with no client reports EIO; the byte is lost, as on a real unplugged line.
                io::ErrorKind::WouldBlock if drop_when_full => return Ok(buf.len()),
                _ if drop_when_full && err.raw_os_error() == Some(libc::EIO) => {
                    return Ok(buf.len())
                }
                _ => return Err(err),
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Input from a descriptor, waiting with `poll` so a stop request is seen within
/// [`FdReader::POLL_INTERVAL_MS`].
pub struct FdReader {
    fd: File,
    /// A pty master reads EIO while no client has the slave open: wait, do not stop.
    is_pty_master: bool,
    stop: Arc<AtomicBool>,
}

impl FdReader {
    pub const POLL_INTERVAL_MS: u16 = 100;

    pub fn new(fd: OwnedFd, is_pty_master: bool) -> Self {
        FdReader {
            fd: File::from(fd),
            is_pty_master,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Setting this flag makes a pending `read` return end-of-file.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(0);
            }
            let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, Self::POLL_INTERVAL_MS) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(err) => return Err(err.into()),
            }
            let err = match self.fd.read(buf) {
                Ok(n) => return Ok(n),
                Err(err) => err,
            };
            match err.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                _ if self.is_pty_master && err.raw_os_error() == Some(libc::EIO) => {
                    // No client on the slave side (poll reports POLLHUP at once): wait for one.
                    std::thread::sleep(Duration::from_millis(u64::from(Self::POLL_INTERVAL_MS)));
                }
                _ => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty_path_that_is_not_a_terminal_is_refused() {
        let err = match Terminal::open(&SerialBackend::Tty("/dev/null".into()), 1) {
            Err(e) => e,
            Ok(_) => panic!("/dev/null accepted as a terminal"),
        };
        assert_eq!(err.to_string(), "-l com1: \"/dev/null\" is not a terminal");
    }

    #[test]
    fn missing_tty_names_path_and_os_error() {
        let err = match Terminal::open(&SerialBackend::Tty("/nonexistent/tty9".into()), 2) {
            Err(e) => e,
            Ok(_) => panic!("missing tty accepted"),
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with("-l com2: cannot open \"/nonexistent/tty9\": "),
            "{msg}"
        );
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn autopty_passes_bytes_unchanged_both_ways() {
        let mut term = Terminal::open(&SerialBackend::Autopty(None), 1).unwrap();
        let path = term.pty_path.clone().unwrap();
        let client = open_path(&path, libc::O_NOCTTY).unwrap();
        let mut client_w = FdWriter::new(client.try_clone().unwrap(), false);
        let mut client_r = FdReader::new(client, false);
        // "\r\n" and 0x03 would be translated or eaten by a cooked terminal.
        term.output.write_all(b"a\nb\x03").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < 4 {
            let n = client_r.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"a\nb\x03");
        client_w.write_all(b"\r\x7f").unwrap();
        let input = term.input.as_mut().unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let n = input.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"\r\x7f");
    }

    /// Raw mode is cfmakeraw's, flag for flag: the console's bytes depend on it (a mode that
    /// kept OPOST/ONLCR or ICRNL would add CRs to output and turn Enter into LF).
    #[test]
    fn raw_mode_is_cfmakeraw_and_settings_are_saved_exactly() {
        let (_master, path) = open_pty_master().unwrap();
        let slave = open_path(&path, libc::O_NOCTTY).unwrap();
        let cooked = libc::termios::from(termios::tcgetattr(&slave).unwrap());
        // SAFETY: termios is plain old data; tcgetattr overwrites it and is checked.
        let mut direct: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `direct` is a valid, writable termios; the descriptor is open.
        let rc = unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut direct) };
        assert_eq!(rc, 0);
        let flags = |t: &libc::termios| (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc);
        assert_eq!(flags(&cooked), flags(&direct), "saved settings lose no bit");
        assert_ne!(cooked.c_oflag & libc::OPOST, 0, "a new pty starts cooked");

        let mut expected = cooked;
        // SAFETY: `expected` is a valid termios.
        unsafe { libc::cfmakeraw(&mut expected) };
        make_raw(&slave).unwrap();
        let raw = libc::termios::from(termios::tcgetattr(&slave).unwrap());
        assert_eq!(flags(&raw), flags(&expected));
        assert_eq!(raw.c_oflag & libc::OPOST, 0);
        assert_eq!(raw.c_iflag & (libc::ICRNL | libc::IXON), 0);
    }

    #[test]
    fn stopped_reader_returns_eof() {
        let (master, _path) = open_pty_master().unwrap();
        let mut r = FdReader::new(master, true);
        r.stop_flag().store(true, Ordering::Relaxed);
        assert_eq!(r.read(&mut [0u8; 4]).unwrap(), 0);
    }

    /// A stdio console whose output pipe nobody reads must not block the writer (a vCPU
    /// holding the UART lock) for ever: each write waits at most the stall time once, then
    /// output is dropped until the pipe has room again.
    #[test]
    fn bounded_writer_drops_output_nobody_reads() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut w = FdWriter::bounded(write_end, Duration::from_millis(50));
            // Far more than a pipe holds (64 KiB on Linux), a byte at a time as the UART does.
            for _ in 0..256 * 1024 {
                w.write_all(b"x").unwrap();
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(20))
            .expect("the console writer blocked on a full pipe");
        // And output flows again once someone reads.
        let mut buf = vec![0u8; 1 << 20];
        let n = File::from(read_end).read(&mut buf).unwrap();
        assert!(n > 0);
    }

    #[test]
    fn autopty_link_points_at_the_pty_and_is_removed() {
        let dir = std::env::temp_dir().join(format!("xhyve-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("tty");
        std::fs::write(&link, b"stale").unwrap();
        let term = Terminal::open(&SerialBackend::Autopty(Some(link.clone())), 1).unwrap();
        let target = std::fs::read_link(&link).unwrap();
        assert_eq!(Some(target), term.pty_path.clone());
        remove_links();
        assert!(link.symlink_metadata().is_err(), "link removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn null_has_no_input_and_takes_output() {
        let mut term = Terminal::open(&SerialBackend::Null, 1).unwrap();
        assert!(term.input.is_none());
        term.output.write_all(b"dropped").unwrap();
    }
}
