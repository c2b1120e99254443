//! virtio-vsock TX packets through the muxer, as a sequence of u16 LE length-prefixed requests (see `xhyve::vsock::fuzz::fuzz_packets`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xhyve::vsock::fuzz::fuzz_packets(data);
});
