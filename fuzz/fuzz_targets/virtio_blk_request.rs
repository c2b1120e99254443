//! virtio-blk request parsing and execution on a chain decoded from the input
//! (see `fuzz_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xhyve::devices::virtio_blk_req::fuzz_request(data);
});
