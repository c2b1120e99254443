//! The AHCI command layer on guest memory filled from the input (see `fuzz_command`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xhyve::devices::ahci::fuzz_command(data);
});
