//! What is specific to one guest architecture: today only x86_64.

pub mod x86_64;
