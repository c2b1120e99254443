//! Emulated hardware on the port and MMIO buses.

pub mod ahci;
pub mod bus;
pub mod console_log;
pub mod doorbell;
pub mod irq;
pub mod pci;
pub mod power;
pub mod power_mgmt;
pub mod rtc;
pub mod serial;
pub mod terminal;
pub mod virtio;
pub mod virtio_blk_req;
