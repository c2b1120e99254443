//! The disk serial number, derived as xhyve derives it so a guest sees the same identity
//! after moving from xhyve: `BHYVE-` and the first six bytes of SHA-256 of the option
//! string, in upper-case hex pairs `XXXX-XXXX-XXXX`.

use sha2::{Digest, Sha256};

/// Length of the serial (and of virtio-blk's GET_ID buffer).
pub const SERIAL_LEN: usize = 20;

/// `BHYVE-XXXX-XXXX-XXXX` for the block option string `spec` (20 ASCII bytes).
pub fn serial_for(spec: &str) -> [u8; SERIAL_LEN] {
    let digest = Sha256::digest(spec.as_bytes());
    let text = format!(
        "BHYVE-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}",
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5]
    );
    let mut serial = [0u8; SERIAL_LEN];
    serial.copy_from_slice(text.as_bytes());
    serial
}

/// The GET_ID answer xhyve gives: it formats the serial with `snprintf` into 20 bytes, so
/// the last character is cut off for the terminating NUL. Kept, so guests' by-id names
/// (`/dev/disk/by-id/virtio-BHYVE-...`) do not change when they move to this port.
pub fn virtio_blk_id(serial: &[u8; SERIAL_LEN]) -> [u8; SERIAL_LEN] {
    let mut id = *serial;
    id[SERIAL_LEN - 1] = 0;
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_sha256_prefix_of_the_spec() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223...
        assert_eq!(&serial_for("abc"), b"BHYVE-BA78-16BF-8F01");
    }

    #[test]
    fn serial_depends_on_the_whole_spec() {
        assert_eq!(serial_for("d.img"), serial_for("d.img"));
        assert_ne!(serial_for("d.img"), serial_for("d.img,ro"));
    }

    #[test]
    fn virtio_id_drops_the_last_character_like_xhyve() {
        let id = virtio_blk_id(&serial_for("abc"));
        assert_eq!(&id, b"BHYVE-BA78-16BF-8F0\0");
    }
}
