//! Opening a qcow2 image's backing chain: read-only, locked shared, never probed.
//!
//! The backing format comes from the header's backing-format extension. QEMU would probe the
//! backing file when that extension is missing (it has warned that this is deprecated since
//! 5.1, and `qemu-img create -b` has required `-F` since 6.1). We refuse instead and say how
//! to record the format (`qemu-img rebase -u -F`): a probe is how a guest that owns a raw
//! backing file could make us open a file of its choosing as the next backing image.
//! imago reads header extensions of version 3 images only, but `qemu-img create -o
//! compat=0.10 -b ... -F ...` records the backing format in a version 2 image's extension
//! area too, so this module reads that extension itself for version 2 images.
//! A relative backing file name is relative to the directory of the image naming it, as in
//! QEMU.

use super::{open_error, ImageFile, OrderedStorage, Qcow2Error};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, StorageOpenOptions};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Backing images below the top one that we follow; deeper chains (or loops) are refused.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Opens `path` (read-write only if `writable`), locks it (exclusive when writable, shared
/// otherwise, as raw images are locked), and wraps it for imago. Returns the lock holder too.
pub fn open_file(
    path: &Path,
    writable: bool,
    storage_options: &StorageOpenOptions,
) -> Result<(ImagoFile, std::fs::File), Qcow2Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    if file.metadata().map_err(|e| open_error(path, e))?.is_dir() {
        return Err(open_error(
            path,
            std::io::Error::other("is a directory, not an image"),
        ));
    }
    crate::block::raw::lock(&file, !writable).map_err(|e| {
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Qcow2Error::Locked(path.to_path_buf())
        } else {
            open_error(path, e)
        }
    })?;
    // The lock belongs to the open file description, which the duplicate shares.
    let lock = file.try_clone().map_err(|e| open_error(path, e))?;
    let options = storage_options.clone().filename(path).write(writable);
    let file = ImagoFile::from_open_file(file, options).map_err(|e| open_error(path, e))?;
    Ok((file, lock))
}

/// Opens the backing image that `image` (at `path`) names, and its own backing chain,
/// read-only. `depth` counts the images above the one being opened.
pub fn open_chain(
    path: &Path,
    image: &Qcow2<ImageFile>,
    header: &[u8],
    storage_options: &StorageOpenOptions,
    depth: usize,
    locks: &mut Vec<std::fs::File>,
) -> Result<Option<FormatAccess<ImageFile>>, Qcow2Error> {
    let Some(name) = image.implicit_backing_file() else {
        return Ok(None);
    };
    if depth > MAX_CHAIN_DEPTH {
        return Err(Qcow2Error::ChainTooDeep {
            path: path.to_path_buf(),
            limit: MAX_CHAIN_DEPTH,
        });
    }
    let backing_path = resolve(path, name);
    let v2_format = v2_backing_format(header);
    let format = match image
        .implicit_backing_format()
        .map(String::as_str)
        .or(v2_format.as_deref())
    {
        Some(format) => format,
        None => {
            return Err(Qcow2Error::BackingFormatMissing {
                path: path.to_path_buf(),
                backing: name.clone(),
            })
        }
    };
    // Validate the format before touching the file.
    if !matches!(format, "qcow2" | "raw" | "file") {
        return Err(Qcow2Error::BackingFormat {
            path: path.to_path_buf(),
            format: format.to_string(),
        });
    }
    let (file, lock) = open_file(&backing_path, false, storage_options)?;
    let backing_header = if format == "qcow2" {
        let header = read_header(&lock, &backing_path)?;
        super::check_file(&backing_path, &lock, &header, false)?;
        header
    } else {
        Vec::new()
    };
    locks.push(lock);
    // Read-only: nothing is ever written, so nothing is held.
    let file = OrderedStorage::new(file, &[]);
    let opened = if format == "qcow2" {
        let mut qcow2 = Qcow2::<ImageFile>::open_image(file, false)
            .map_err(|e| open_error(&backing_path, e))?;
        if qcow2.requires_external_data_file() {
            return Err(Qcow2Error::ExternalDataFile(backing_path));
        }
        qcow2.set_data_file(None);
        let below = open_chain(
            &backing_path,
            &qcow2,
            &backing_header,
            storage_options,
            depth + 1,
            locks,
        )?;
        qcow2.set_backing(below);
        FormatAccess::new(qcow2)
    } else {
        let raw = Raw::open_image(file, false).map_err(|e| open_error(&backing_path, e))?;
        FormatAccess::new(raw)
    };
    Ok(Some(opened))
}

/// The first cluster of a qcow2 file (where the header and its extensions live), at most
/// 2 MiB (the largest cluster); shorter if the file is.
pub fn read_header(file: &std::fs::File, path: &Path) -> Result<Vec<u8>, Qcow2Error> {
    use std::os::unix::fs::FileExt;
    let mut start = [0u8; 24];
    let got = file
        .read_at(&mut start, 0)
        .map_err(|e| open_error(path, e))?;
    let cluster_bits = u32::from_be_bytes([start[20], start[21], start[22], start[23]]);
    let want = if got == start.len() && (9..=21).contains(&cluster_bits) {
        1usize << cluster_bits
    } else {
        start.len()
    };
    let mut header = vec![0u8; want];
    let mut done = 0;
    while done < want {
        match file.read_at(&mut header[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(open_error(path, e)),
        }
    }
    header.truncate(done);
    Ok(header)
}

/// Magic of the backing file format name extension.
const BACKING_FORMAT_EXTENSION: u32 = 0xE279_2ACA;

/// The backing format named in a version 2 image's extension area (which starts at byte 72
/// and ends at a zero type or the end of the first cluster). Bounded by `header`.
pub fn v2_backing_format(header: &[u8]) -> Option<String> {
    let be32 = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            header.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    if be32(4)? != 2 {
        return None;
    }
    let mut at = 72usize;
    loop {
        let kind = be32(at)?;
        let length = be32(at + 4)? as usize;
        let data = at.checked_add(8)?;
        if kind == 0 {
            return None;
        }
        let body = header.get(data..data.checked_add(length)?)?;
        if kind == BACKING_FORMAT_EXTENSION {
            return String::from_utf8(body.to_vec()).ok();
        }
        at = data.checked_add(length.div_ceil(8) * 8)?;
    }
}

/// `name` as QEMU resolves it: absolute as given, else relative to `image`'s directory.
fn resolve(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(extensions: &[(u32, &[u8])]) -> Vec<u8> {
        let mut header = vec![0u8; 512];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[4..8].copy_from_slice(&2u32.to_be_bytes());
        let mut at = 72;
        for (kind, body) in extensions {
            header[at..at + 4].copy_from_slice(&kind.to_be_bytes());
            header[at + 4..at + 8].copy_from_slice(&(body.len() as u32).to_be_bytes());
            header[at + 8..at + 8 + body.len()].copy_from_slice(body);
            at += 8 + body.len().div_ceil(8) * 8;
        }
        header
    }

    #[test]
    fn v2_backing_format_is_found_after_other_extensions() {
        let header = v2_header(&[
            (0x6803_f857, b"feature table!"),
            (BACKING_FORMAT_EXTENSION, b"raw"),
        ]);
        assert_eq!(v2_backing_format(&header).as_deref(), Some("raw"));
        assert_eq!(v2_backing_format(&v2_header(&[])), None);
        let mut v3 = header.clone();
        v3[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(v2_backing_format(&v3), None);
    }

    #[test]
    fn v2_extension_lengths_past_the_header_are_ignored() {
        let mut header = v2_header(&[(BACKING_FORMAT_EXTENSION, b"qcow2")]);
        header[76..80].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(v2_backing_format(&header), None);
        header.truncate(74);
        assert_eq!(v2_backing_format(&header), None);
    }

    #[test]
    fn relative_names_follow_the_image_directory() {
        assert_eq!(
            resolve(Path::new("/vm/overlay.qcow2"), "base.img"),
            PathBuf::from("/vm/base.img")
        );
        assert_eq!(
            resolve(Path::new("/vm/overlay.qcow2"), "/images/base.img"),
            PathBuf::from("/images/base.img")
        );
        assert_eq!(
            resolve(Path::new("overlay.qcow2"), "../base.img"),
            PathBuf::from("../base.img")
        );
    }
}
