//! Copies of a COM port's output besides its terminal (HyperKit's `-l comN,...,log=PATH,asl`).
//!
//! `log=PATH` is HyperKit's console ring: a file of exactly [`RING_SIZE`] bytes, created (or
//! truncated) at start, mapped shared, into which every output byte is stored at the next
//! offset, wrapping to offset 0 at the end. There is no header and no write pointer in the
//! file, as in HyperKit's `uart_mapring`/`ringwrite`; readers (Docker for Mac's diagnostics,
//! HyperKit's Go wrapper users) take the bytes as they are. `asl` sends output to the macOS
//! system log a line at a time.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

/// HyperKit's ring size (`sc->log.length = 65536`).
pub const RING_SIZE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleLogError {
    #[error("-l com{com}: cannot create the console ring \"{path}\": {source}")]
    Ring {
        com: u8,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("-l com{com}: asl (the Apple System Log) exists only on macOS")]
    AslNotAvailable { com: u8 },
}

/// The memory-mapped console ring.
pub struct LogRing {
    map: MmapMut,
    next: usize,
}

impl LogRing {
    /// Creates or truncates `path` to [`RING_SIZE`] zero bytes (mode 0644, as HyperKit) and
    /// maps it.
    pub fn create(path: &Path, com: u8) -> Result<LogRing, ConsoleLogError> {
        let err = |source| ConsoleLogError::Ring {
            com,
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(path)
            .map_err(err)?;
        file.set_len(RING_SIZE as u64).map_err(err)?;
        // SAFETY: the mapping is of a file this process just sized; another process changing
        // or truncating it can only change the bytes we write (or raise SIGBUS, as it would for
        // HyperKit); no Rust reference into the mapping is handed out.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(err)?;
        Ok(LogRing { map, next: 0 })
    }

    fn record(&mut self, data: &[u8]) {
        for &b in data {
            self.map[self.next] = b;
            self.next = (self.next + 1) % RING_SIZE;
        }
    }
}

/// The system log, a line at a time (macOS `asl`; HyperKit's `log.c` does the same).
pub struct SystemLog {
    line: Vec<u8>,
}

/// Longest line sent to the system log; longer output is sent in pieces.
const MAX_LOG_LINE: usize = 1024;

impl SystemLog {
    #[cfg(target_os = "macos")]
    pub fn open(_com: u8) -> Result<SystemLog, ConsoleLogError> {
        Ok(SystemLog { line: Vec::new() })
    }

    #[cfg(not(target_os = "macos"))]
    pub fn open(com: u8) -> Result<SystemLog, ConsoleLogError> {
        Err(ConsoleLogError::AslNotAvailable { com })
    }

    fn record(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' || self.line.len() >= MAX_LOG_LINE {
                self.emit();
            }
            if b != b'\n' && b != b'\r' {
                self.line.push(b);
            }
        }
    }

    fn emit(&mut self) {
        // A NUL inside guest output would cut the C string short: replace it.
        let text: Vec<u8> = self
            .line
            .drain(..)
            .map(|b| if b == 0 { b'?' } else { b })
            .collect();
        #[cfg(target_os = "macos")]
        if let Ok(text) = std::ffi::CString::new(text) {
            // SAFETY: both strings are NUL-terminated; "%s" consumes exactly one argument.
            unsafe { libc::syslog(libc::LOG_NOTICE, c"%s".as_ptr(), text.as_ptr()) };
        }
        #[cfg(not(target_os = "macos"))]
        drop(text);
    }
}

/// A terminal's writer plus the copies `log=` and `asl` ask for. The copies take every byte
/// the guest sent, even what the terminal dropped.
pub struct LoggedWriter {
    pub inner: Box<dyn Write + Send>,
    pub ring: Option<LogRing>,
    pub system_log: Option<SystemLog>,
}

impl Write for LoggedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(ring) = &mut self.ring {
            ring.record(buf);
        }
        if let Some(log) = &mut self.system_log {
            log.record(buf);
        }
        self.inner.write_all(buf).map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xhyve-ring-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("console-ring")
    }

    #[test]
    fn ring_is_64k_and_wraps_in_place() {
        let path = temp("wrap");
        std::fs::write(&path, vec![b'x'; 100_000]).unwrap();
        let mut w = LoggedWriter {
            inner: Box::new(io::sink()),
            ring: Some(LogRing::create(&path, 1).unwrap()),
            system_log: None,
        };
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), RING_SIZE, "truncated to HyperKit's size");
        assert!(on_disk.iter().all(|&b| b == 0), "old contents cleared");

        w.write_all(b"hello").unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..6], b"hello\0");

        // Fill to the end and wrap by three bytes.
        let filler = vec![b'.'; RING_SIZE - 5];
        w.write_all(&filler).unwrap();
        w.write_all(b"abc").unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), RING_SIZE);
        assert_eq!(&on_disk[..5], b"abclo");
        assert_eq!(on_disk[RING_SIZE - 1], b'.');
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn ring_in_a_missing_directory_names_the_path() {
        let err = LogRing::create(Path::new("/nonexistent/dir/ring"), 2)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("-l com2: cannot create the console ring \"/nonexistent/dir/ring\""),
            "{err}"
        );
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn asl_is_a_clear_error_off_macos() {
        let err = SystemLog::open(1).err().unwrap().to_string();
        assert_eq!(
            err,
            "-l com1: asl (the Apple System Log) exists only on macOS"
        );
    }

    #[test]
    fn system_log_cuts_lines() {
        let mut log = SystemLog { line: Vec::new() };
        log.record(b"ab\r\ncd");
        assert_eq!(log.line, b"cd");
        let mut log = SystemLog { line: Vec::new() };
        log.record(&vec![b'x'; MAX_LOG_LINE + 1]);
        assert_eq!(log.line.len(), 1);
    }
}
