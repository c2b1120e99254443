//! x86_64 guests: what every back end shares about the architecture itself.

pub mod emulate;
