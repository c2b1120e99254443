//! 9P2000.L messages through the built-in server, as a sequence of u16 LE length-prefixed requests (see `xhyve::fs::fuzz::fuzz_p9`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xhyve::fs::fuzz::fuzz_p9(data);
});
