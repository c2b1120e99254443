//! A hostile qcow2 image in memory, opened and driven with requests (see
//! `xhyve::block::qcow2::fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xhyve::block::qcow2::fuzz::fuzz_image(data);
});
