//! `-F pidfile`: created exclusively at start, removed on every exit path.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("cannot create pidfile \"{path}\": {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The pidfile to remove at exit. A static, so that every exit path (normal, fatal, signal)
/// can reach it without threading a handle through.
static CURRENT: Mutex<Option<PathBuf>> = Mutex::new(None);

pub fn create(path: &Path) -> Result<(), PidFileError> {
    let err = |source| PidFileError::Create {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(err)?;
    // The pid and nothing else, as xhyve and HyperKit write it: some readers (such as
    // docker-machine-driver-xhyve's strconv.ParseInt) do not trim a newline.
    if let Err(e) = write!(file, "{}", std::process::id()) {
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
    super::signals::remove_at_crash(path);
    Ok(())
}

/// Removes the pidfile this process created, if any. Safe to call more than once.
pub fn remove() {
    if let Some(path) = CURRENT.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_exclusively_with_pid_and_removed() {
        let dir = std::env::temp_dir().join(format!("xhyve-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.pid");
        let _ = std::fs::remove_file(&path);
        create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, std::process::id().to_string(), "no newline, as xhyve");
        let again = create(&path).unwrap_err().to_string();
        assert!(
            again.contains("vm.pid") && again.contains("exists"),
            "{again}"
        );
        remove();
        assert!(!path.exists());
        remove();
        std::fs::remove_dir(&dir).unwrap();
    }
}
