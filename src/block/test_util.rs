//! Scratch disk images for tests.

use std::fs::File;
use std::path::PathBuf;

/// A fresh sparse image of `size` bytes in a private directory, removed on drop.
pub struct TempImage {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(name: &str, size: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("xhyve-block-{}-{nanos}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        File::create(&path).unwrap().set_len(size).unwrap();
        TempImage { dir, path }
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
