//! Machine-wide events that devices request: reset, power-off, and so on.

/// Why the machine stops. Maps to xhyve's exit codes in `vmm::exit_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// 0xCF9 reset, keyboard-controller pulse, ACPI reset register: exit 0.
    Reset,
    /// ACPI S5 through PM1a control: exit 1.
    PowerOff,
    /// Every vCPU halted with interrupts off: exit 2.
    Halt,
    /// A vCPU triple-faulted: exit 3.
    TripleFault,
}

/// Where devices send power events. The VMM implements it and stops every vCPU.
pub trait PowerControl: Send + Sync {
    fn request(&self, event: PowerEvent);
}
