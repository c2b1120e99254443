//! The virtqueue walk of virtio-rnd, virtio-net and virtio-blk on a ring and guest memory
//! decoded from the input (see `fuzz_virtqueue`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xhyve::devices::virtio::fuzz::fuzz_virtqueue(data);
});
