//! xhyve's block device options:
//! `PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]][,flush=full|fsync][,format=raw|qcow2]
//! [,l2-cache-size=BYTES]`.
//!
//! The same string configures virtio-blk, ahci-hd and ahci-cd. The whole string (not just
//! the path) seeds the device serial, as xhyve does, so it is kept verbatim.
//!
//! `flush=` is our extension (xhyve has no such option): how a guest's flush reaches the
//! disk. `full` (the default on macOS) is `fcntl(F_FULLFSYNC)`, which also empties the
//! drive's write cache; `fsync` is the cheaper `fsync(2)`, which on macOS stops at that
//! cache. On Linux both are `fsync(2)`, which already flushes the drive cache there.
//!
//! `format=` (ours) names the image format. Without it an image is raw: the format is never
//! guessed from the contents, because a guest can write a qcow2 header into a raw disk and
//! would then, on the next start, be reading host files through a backing-file name of its
//! choosing. `format=qcow` is accepted as an alias of `qcow2` for HyperKit's spelling.
//!
//! `l2-cache-size=` (QEMU's name and meaning, qcow2 only) bounds the memory that caches
//! guest-to-host cluster mappings: bytes of L2 table, 8 per cluster of guest disk, with an
//! optional `k`, `M` or `G` suffix (binary). See `qcow2::mapcache`.

use std::path::PathBuf;

/// Smallest sector size xhyve accepts (DEV_BSIZE).
pub const MIN_SECTOR_SIZE: u32 = 512;
/// Largest sector size accepted; larger values are not real hardware and would make one
/// sector bigger than the I/O buffers a guest driver expects.
pub const MAX_SECTOR_SIZE: u32 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("block device options \"{0}\": a backing image path is required")]
    MissingPath(String),
    #[error("unknown block device option \"{0}\"")]
    UnknownOption(String),
    #[error("invalid sectorsize \"{0}\": sizes must be powers of two from 512 to 65536")]
    SectorSizeNotPowerOfTwo(String),
    #[error("invalid sectorsize \"{0}\": the logical size must not exceed the physical size")]
    LogicalAbovePhysical(String),
    #[error("invalid flush \"{0}\": expected full or fsync")]
    FlushMode(String),
    #[error("invalid disk URL \"{url}\": {reason}")]
    FileUrl { url: String, reason: String },
    #[error("invalid format \"{0}\": expected raw or qcow2")]
    Format(String),
    #[error(
        "invalid l2-cache-size \"{0}\": expected a number of bytes from 1, \
         optionally with a k, M or G suffix"
    )]
    L2CacheSize(String),
    #[error("l2-cache-size applies to qcow2 images only: add format=qcow2")]
    L2CacheSizeNeedsQcow2,
}

/// The on-disk format of an image, named by `format=`; never probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// `raw`, `qcow2`, or HyperKit's `qcow` (an alias of `qcow2`).
    pub fn parse(text: &str) -> Result<Self, OptionsError> {
        match text {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" | "qcow" => Ok(ImageFormat::Qcow2),
            _ => Err(OptionsError::Format(text.to_string())),
        }
    }
}

/// How a flush reaches stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// `fsync(2)`. On macOS this only reaches the drive's volatile cache.
    Fsync,
    /// macOS `fcntl(F_FULLFSYNC)`: flushes the drive's cache too (slow, but what a guest's
    /// flush means). On other systems the same as `Fsync`.
    FullFsync,
}

impl FlushMode {
    /// `full` or `fsync`, the values of the `flush=` option.
    pub fn parse(text: &str) -> Result<Self, OptionsError> {
        match text {
            "full" => Ok(FlushMode::FullFsync),
            "fsync" => Ok(FlushMode::Fsync),
            _ => Err(OptionsError::FlushMode(text.to_string())),
        }
    }

    /// The safe default for the host: `FullFsync` on macOS, `Fsync` elsewhere.
    pub fn host_default() -> Self {
        if cfg!(target_os = "macos") {
            FlushMode::FullFsync
        } else {
            FlushMode::Fsync
        }
    }
}

/// Parsed block device options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOptions {
    pub path: PathBuf,
    /// `nocache`: ask the host not to keep the image in its page cache.
    pub nocache: bool,
    /// `sync` or `direct`: every write is synchronous (O_SYNC), as in xhyve.
    pub sync: bool,
    pub read_only: bool,
    /// Logical sector size in bytes (what the guest addresses).
    pub logical_sector_size: u32,
    /// Physical sector size in bytes (reported as a hint for alignment).
    pub physical_sector_size: u32,
    /// `flush=full|fsync` (our extension, not xhyve's); defaults to [`FlushMode::host_default`].
    pub flush_mode: FlushMode,
    /// `format=raw|qcow2` (ours); raw when absent, never probed.
    pub format: ImageFormat,
    /// `l2-cache-size=BYTES` (qcow2): the mapping cache's size; `None` takes the default.
    pub l2_cache_size: Option<u64>,
    /// The option string as given, the seed of the device serial.
    pub spec: String,
}

impl BlockOptions {
    /// Options for `path` with every default (read-write, 512-byte sectors).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        BlockOptions {
            spec: path.to_string_lossy().into_owned(),
            path,
            nocache: false,
            sync: false,
            read_only: false,
            logical_sector_size: MIN_SECTOR_SIZE,
            physical_sector_size: MIN_SECTOR_SIZE,
            flush_mode: FlushMode::host_default(),
            format: ImageFormat::Raw,
            l2_cache_size: None,
        }
    }

    /// Parses xhyve's option string (everything after `-s slot,emulation,`).
    pub fn parse(spec: &str) -> Result<Self, OptionsError> {
        let mut fields = spec.split(',');
        let path = fields.next().unwrap_or_default();
        if path.is_empty() {
            return Err(OptionsError::MissingPath(spec.to_string()));
        }
        let mut options = match path.strip_prefix("file://") {
            Some(url) => file_url_options(url, path)?,
            None => BlockOptions::new(path),
        };
        options.spec = spec.to_string();
        for field in fields {
            match field {
                "nocache" => options.nocache = true,
                "sync" | "direct" => options.sync = true,
                "ro" => options.read_only = true,
                _ => {
                    if let Some(sizes) = field.strip_prefix("sectorsize=") {
                        let (logical, physical) = parse_sector_sizes(sizes)?;
                        options.logical_sector_size = logical;
                        options.physical_sector_size = physical;
                    } else if let Some(mode) = field.strip_prefix("flush=") {
                        options.flush_mode = FlushMode::parse(mode)?;
                    } else if let Some(format) = field.strip_prefix("format=") {
                        options.format = ImageFormat::parse(format)?;
                    } else if let Some(size) = field.strip_prefix("l2-cache-size=") {
                        options.l2_cache_size = Some(parse_byte_size(size)?);
                    } else {
                        return Err(OptionsError::UnknownOption(field.to_string()));
                    }
                }
            }
        }
        if options.l2_cache_size.is_some() && options.format != ImageFormat::Qcow2 {
            return Err(OptionsError::L2CacheSizeNeedsQcow2);
        }
        Ok(options)
    }
}

/// `N`, `Nk`, `NM` or `NG` (binary multiples, either case), at least 1.
fn parse_byte_size(text: &str) -> Result<u64, OptionsError> {
    let bad = || OptionsError::L2CacheSize(text.to_string());
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    match value.checked_mul(1 << shift) {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => Err(bad()),
    }
}

/// HyperKit's disk URL (its Go wrapper's `virtio-blk,file://PATH?sync=..&buffered=..`, which
/// HyperKit hands to mirage-block): `sync=os` makes a flush `fsync(2)`, `sync=drive` the full
/// flush through the drive cache (`F_FULLFSYNC`); `buffered=1` keeps the host page cache,
/// `buffered=0` asks to bypass it (our `nocache`). Both parameters are optional.
fn file_url_options(url: &str, whole: &str) -> Result<BlockOptions, OptionsError> {
    let bad = |reason: String| OptionsError::FileUrl {
        url: whole.to_string(),
        reason,
    };
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    if path.is_empty() {
        return Err(bad("a path is required after file://".into()));
    }
    let mut options = BlockOptions::new(path);
    for param in query.into_iter().flat_map(|q| q.split('&')) {
        match param.split_once('=') {
            Some(("sync", "os")) => options.flush_mode = FlushMode::Fsync,
            Some(("sync", "drive")) => options.flush_mode = FlushMode::FullFsync,
            Some(("sync", other)) => {
                return Err(bad(format!(
                    "sync=\"{other}\" is not supported; expected os or drive"
                )))
            }
            Some(("buffered", "1")) => options.nocache = false,
            Some(("buffered", "0")) => options.nocache = true,
            Some(("buffered", other)) => {
                return Err(bad(format!("buffered=\"{other}\": expected 0 or 1")))
            }
            _ => return Err(bad(format!("unknown parameter \"{param}\""))),
        }
    }
    Ok(options)
}

/// `L` or `L/P`; `P` defaults to `L`.
fn parse_sector_sizes(sizes: &str) -> Result<(u32, u32), OptionsError> {
    let (logical, physical) = match sizes.split_once('/') {
        Some((l, p)) => (l, p),
        None => (sizes, sizes),
    };
    let logical = parse_sector_size(logical, sizes)?;
    let physical = parse_sector_size(physical, sizes)?;
    if logical > physical {
        return Err(OptionsError::LogicalAbovePhysical(sizes.to_string()));
    }
    Ok((logical, physical))
}

fn parse_sector_size(text: &str, whole: &str) -> Result<u32, OptionsError> {
    let bad = || OptionsError::SectorSizeNotPowerOfTwo(whole.to_string());
    let size: u32 = text.parse().map_err(|_| bad())?;
    if !size.is_power_of_two() || !(MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&size) {
        return Err(bad());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_cache_size_takes_bytes_and_suffixes_for_qcow2_only() {
        let size = |spec: &str| BlockOptions::parse(spec).map(|o| o.l2_cache_size);
        assert_eq!(size("d.qcow2,format=qcow2"), Ok(None));
        assert_eq!(
            size("d.qcow2,format=qcow2,l2-cache-size=65536"),
            Ok(Some(65536))
        );
        assert_eq!(
            size("d.qcow2,l2-cache-size=4M,format=qcow2"),
            Ok(Some(4 << 20))
        );
        assert_eq!(
            size("d.qcow2,format=qcow2,l2-cache-size=512k"),
            Ok(Some(512 << 10))
        );
        assert_eq!(
            size("d.qcow2,format=qcow2,l2-cache-size=1G"),
            Ok(Some(1 << 30))
        );
        for bad in [
            "0",
            "",
            "M",
            "-1",
            "1.5M",
            "4MB",
            "1 M",
            "99999999999999999999G",
            "17179869184G",
        ] {
            assert_eq!(
                size(&format!("d.qcow2,format=qcow2,l2-cache-size={bad}")),
                Err(OptionsError::L2CacheSize(bad.to_string())),
                "{bad}"
            );
        }
        assert_eq!(
            size("d.img,l2-cache-size=1M"),
            Err(OptionsError::L2CacheSizeNeedsQcow2)
        );
        assert_eq!(
            OptionsError::L2CacheSize("4MB".into()).to_string(),
            "invalid l2-cache-size \"4MB\": expected a number of bytes from 1, optionally with \
             a k, M or G suffix"
        );
    }

    #[test]
    fn path_alone_takes_defaults() {
        let o = BlockOptions::parse("/images/disk.img").unwrap();
        assert_eq!(o.path, PathBuf::from("/images/disk.img"));
        assert!(!o.read_only && !o.sync && !o.nocache);
        assert_eq!((o.logical_sector_size, o.physical_sector_size), (512, 512));
        assert_eq!(o.spec, "/images/disk.img");
    }

    #[test]
    fn every_option_is_recognised() {
        let o = BlockOptions::parse("d.img,nocache,direct,ro,sectorsize=512/4096").unwrap();
        assert!(o.nocache && o.sync && o.read_only);
        assert_eq!((o.logical_sector_size, o.physical_sector_size), (512, 4096));
        assert_eq!(o.spec, "d.img,nocache,direct,ro,sectorsize=512/4096");
        assert!(BlockOptions::parse("d.img,sync").unwrap().sync);
    }

    #[test]
    fn hyperkit_file_urls() {
        let o = BlockOptions::parse("file:///vms/disk.img?sync=os&buffered=1").unwrap();
        assert_eq!(o.path, PathBuf::from("/vms/disk.img"));
        assert_eq!(o.flush_mode, FlushMode::Fsync);
        assert!(!o.nocache);
        let o = BlockOptions::parse("file:///d.img?sync=drive&buffered=0,ro").unwrap();
        assert_eq!(o.flush_mode, FlushMode::FullFsync);
        assert!(o.nocache && o.read_only);
        assert_eq!(o.spec, "file:///d.img?sync=drive&buffered=0,ro");
        assert_eq!(
            BlockOptions::parse("file:///d.img").unwrap().path,
            PathBuf::from("/d.img")
        );
        for (bad, named) in [
            ("file://?sync=os", "a path is required"),
            ("file:///d?sync=none", "sync=\"none\""),
            ("file:///d?buffered=2", "buffered=\"2\""),
            ("file:///d?cache=1", "unknown parameter \"cache=1\""),
        ] {
            let err = BlockOptions::parse(bad).unwrap_err().to_string();
            assert!(err.contains(named) && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn flush_defaults_to_the_host_choice() {
        let o = BlockOptions::parse("d.img").unwrap();
        let expected = if cfg!(target_os = "macos") {
            FlushMode::FullFsync
        } else {
            FlushMode::Fsync
        };
        assert_eq!(o.flush_mode, expected);
    }

    #[test]
    fn flush_option_selects_the_mode() {
        let full = BlockOptions::parse("d.img,flush=full").unwrap();
        assert_eq!(full.flush_mode, FlushMode::FullFsync);
        let cheap = BlockOptions::parse("d.img,ro,flush=fsync,sectorsize=4096").unwrap();
        assert_eq!(cheap.flush_mode, FlushMode::Fsync);
        assert!(cheap.read_only);
        assert_eq!(cheap.logical_sector_size, 4096);
        // The last one given wins, like the other options.
        let last = BlockOptions::parse("d.img,flush=fsync,flush=full").unwrap();
        assert_eq!(last.flush_mode, FlushMode::FullFsync);
    }

    #[test]
    fn bad_flush_values_are_named() {
        for bad in ["", "FULL", "fullfsync", "sync", "full=1"] {
            let spec = format!("d.img,flush={bad}");
            let err = BlockOptions::parse(&spec).unwrap_err();
            assert_eq!(err, OptionsError::FlushMode(bad.to_string()), "{spec}");
        }
        assert_eq!(
            BlockOptions::parse("d.img,flush=sync")
                .unwrap_err()
                .to_string(),
            "invalid flush \"sync\": expected full or fsync"
        );
    }

    #[test]
    fn format_is_raw_unless_named() {
        assert_eq!(
            BlockOptions::parse("d.img").unwrap().format,
            ImageFormat::Raw
        );
        let q = BlockOptions::parse("d.qcow2,format=qcow2,ro").unwrap();
        assert_eq!(q.format, ImageFormat::Qcow2);
        assert!(q.read_only);
        assert_eq!(
            BlockOptions::parse("d.qcow2,format=qcow").unwrap().format,
            ImageFormat::Qcow2
        );
        // HyperKit's form, as its Go wrapper writes it.
        let h = BlockOptions::parse("file:///vms/d.qcow2?sync=os&buffered=1,format=qcow").unwrap();
        assert_eq!(h.format, ImageFormat::Qcow2);
        assert_eq!(h.path, PathBuf::from("/vms/d.qcow2"));
        assert_eq!(
            BlockOptions::parse("d.img,format=qcow2,format=raw")
                .unwrap()
                .format,
            ImageFormat::Raw
        );
        for bad in ["", "QCOW2", "vmdk", "auto"] {
            assert_eq!(
                BlockOptions::parse(&format!("d.img,format={bad}")).unwrap_err(),
                OptionsError::Format(bad.to_string())
            );
        }
        assert_eq!(
            BlockOptions::parse("d.img,format=vmdk")
                .unwrap_err()
                .to_string(),
            "invalid format \"vmdk\": expected raw or qcow2"
        );
    }

    #[test]
    fn single_sector_size_sets_both() {
        let o = BlockOptions::parse("d.img,sectorsize=4096").unwrap();
        assert_eq!(
            (o.logical_sector_size, o.physical_sector_size),
            (4096, 4096)
        );
    }

    #[test]
    fn missing_path_is_an_error() {
        assert_eq!(
            BlockOptions::parse("").unwrap_err(),
            OptionsError::MissingPath(String::new())
        );
        assert_eq!(
            BlockOptions::parse(",ro").unwrap_err().to_string(),
            "block device options \",ro\": a backing image path is required"
        );
    }

    #[test]
    fn unknown_option_is_named() {
        assert_eq!(
            BlockOptions::parse("d.img,rw").unwrap_err().to_string(),
            "unknown block device option \"rw\""
        );
        assert_eq!(
            BlockOptions::parse("d.img,").unwrap_err(),
            OptionsError::UnknownOption(String::new())
        );
    }

    #[test]
    fn bad_sector_sizes_are_rejected() {
        for bad in ["256", "1000", "x", "512/", "/512", "131072", "0", "-512"] {
            let err = BlockOptions::parse(&format!("d.img,sectorsize={bad}")).unwrap_err();
            assert_eq!(
                err,
                OptionsError::SectorSizeNotPowerOfTwo(bad.to_string()),
                "{bad}"
            );
        }
        assert_eq!(
            BlockOptions::parse("d.img,sectorsize=4096/512")
                .unwrap_err()
                .to_string(),
            "invalid sectorsize \"4096/512\": the logical size must not exceed the physical size"
        );
    }
}
