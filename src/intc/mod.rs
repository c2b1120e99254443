//! Userspace interrupt controllers and timers (xhyve's `vmm/io`), as plain models.
//!
//! No model here calls the hypervisor, sleeps or blocks: time comes from a `clock::Clock`,
//! timers report `next_deadline_ns()` and advance on `tick(now)`, and interrupts leave as
//! values or through small sink traits that the VMM connects.

pub mod clock;
pub mod hpet;
pub mod ioapic;
pub mod lapic;
pub mod msi;
pub mod pic;
pub mod pit;
pub mod pmtimer;
