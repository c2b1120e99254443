//! Host ends of a COM port: the controlling terminal, a new pseudo-terminal (optionally with a
//! symlink to it), `null`, or a tty device.
//!
//! A back end is an output writer plus an optional input reader. Writers issue one `write()`
//! per call with no user-space buffering, so bytes reach a pipe reader promptly, and never
//! block a vCPU for long: a pty or tty drops what its peer does not take, and stdout waits at
//! most [`STDOUT_STALL`] for a reader before dropping output. Readers wait with `poll()` so
//! that the input thread can notice a stop request.

use std::ffi::CStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    let output = FdWriter::bounded(dup_fd(libc::STDOUT_FILENO).map_err(setup)?, STDOUT_STALL);
    // A closed stdin (daemons, some CI runners) means a port without input, not an error.
    let input = match dup_fd(libc::STDIN_FILENO) {
        Ok(fd) => Some(FdReader::new(fd, false)),
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => None,
        Err(e) => return Err(setup(e)),
    };
    // SAFETY: isatty only inspects the descriptor.
    let raw = if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
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
    let slave = open_path(&slave_path, libc::O_RDWR | libc::O_NOCTTY).map_err(pty)?;
    make_raw(slave.as_raw_fd()).map_err(pty)?;
    set_nonblocking(master.as_raw_fd()).map_err(pty)?;
    let reader_fd = dup_fd(master.as_raw_fd()).map_err(pty)?;
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
    let fd =
        open_path(path, libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK).map_err(|source| {
            TerminalError::Open {
                com,
                path: path.to_owned(),
                source,
            }
        })?;
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd.as_raw_fd()) } != 1 {
        return Err(TerminalError::NotATerminal {
            com,
            path: path.to_owned(),
        });
    }
    let setup = |source| TerminalError::Setup { com, source };
    make_raw(fd.as_raw_fd()).map_err(setup)?;
    let reader_fd = dup_fd(fd.as_raw_fd()).map_err(setup)?;
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
    // SAFETY: posix_openpt has no memory preconditions; the result is checked.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: grantpt/unlockpt take a pty master descriptor, which `master` is.
    if unsafe { libc::grantpt(raw) } != 0 || unsafe { libc::unlockpt(raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((master, slave_name(raw)?))
}

#[cfg(target_os = "linux")]
fn slave_name(master: RawFd) -> io::Result<PathBuf> {
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: the buffer is writable for its full length, which is passed.
    let rc = unsafe { libc::ptsname_r(master, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `buf` holds a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(PathBuf::from(name.to_string_lossy().into_owned()))
}

#[cfg(not(target_os = "linux"))]
fn slave_name(master: RawFd) -> io::Result<PathBuf> {
    // ptsname uses a static buffer; devices are created once at start-up, on one thread.
    // SAFETY: `master` is a pty master; the result is checked for NULL before use.
    let ptr = unsafe { libc::ptsname(master) };
    if ptr.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-NULL ptsname result is a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(ptr) };
    Ok(PathBuf::from(name.to_string_lossy().into_owned()))
}

fn open_path(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c_path` is a valid NUL-terminated string; the result is checked.
    let raw = unsafe { libc::open(c_path.as_ptr(), flags | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn dup_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on any descriptor number is safe; the result is checked.
    let raw = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only change descriptor flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn get_termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain old data; all-zero is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

/// Puts a terminal in raw mode so that bytes pass unchanged in both directions.
fn make_raw(fd: RawFd) -> io::Result<()> {
    let mut t = get_termios(fd)?;
    // SAFETY: `t` is a valid termios obtained from tcgetattr.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `t` is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The stdin settings from before raw mode; written once, read from signal handlers.
static SAVED_STDIN_TERMIOS: OnceLock<libc::termios> = OnceLock::new();
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
    if let Some(saved) = SAVED_STDIN_TERMIOS.get() {
        // SAFETY: `saved` is a valid termios captured by tcgetattr.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

/// Stdin in raw mode for as long as this lives.
struct RawStdinGuard;

impl RawStdinGuard {
    fn enter() -> io::Result<RawStdinGuard> {
        let original = get_termios(libc::STDIN_FILENO)?;
        // The first saved settings are the user's; a second guest port on stdio must not
        // record the raw settings as "original".
        let saved = *SAVED_STDIN_TERMIOS.get_or_init(|| original);
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        STDIN_IS_RAW.store(true, Ordering::SeqCst);
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            let err = io::Error::last_os_error();
            restore_terminal();
            return Err(err);
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
    fd: OwnedFd,
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
        FdWriter { fd, mode }
    }

    /// A writer that never waits more than `stall` for the reader.
    pub fn bounded(fd: OwnedFd, stall: Duration) -> Self {
        FdWriter {
            fd,
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
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: `pfd` is one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready > 0 {
                // POLLERR/POLLHUP: let write() report it.
                return true;
            }
            if ready == 0 || left.is_zero() {
                return false;
            }
            // EINTR: try again until the deadline.
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
            // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
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
    fd: OwnedFd,
    /// A pty master reads EIO while no client has the slave open: wait, do not stop.
    is_pty_master: bool,
    stop: Arc<AtomicBool>,
}

impl FdReader {
    pub const POLL_INTERVAL_MS: libc::c_int = 100;

    pub fn new(fd: OwnedFd, is_pty_master: bool) -> Self {
        FdReader {
            fd,
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
        let fd = self.fd.as_raw_fd();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(0);
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, Self::POLL_INTERVAL_MS) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ready == 0 {
                continue;
            }
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                _ if self.is_pty_master && err.raw_os_error() == Some(libc::EIO) => {
                    // No client on the slave side (poll reports POLLHUP at once): wait for one.
                    std::thread::sleep(std::time::Duration::from_millis(
                        Self::POLL_INTERVAL_MS as u64,
                    ));
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
        let client = open_path(&path, libc::O_RDWR | libc::O_NOCTTY).unwrap();
        let mut client_w = FdWriter::new(dup_fd(client.as_raw_fd()).unwrap(), false);
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
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors owned by nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
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
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(read_end.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
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
