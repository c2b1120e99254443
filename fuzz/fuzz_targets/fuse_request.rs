//! virtio-fs FUSE requests through the in-process server, as a sequence of u16 LE length-prefixed requests (see `xhyve::fs::fuzz::fuzz_fuse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xhyve::fs::fuzz::fuzz_fuse(data);
});
