//! One vCPU's local APIC: the xAPIC page at 0xFEE00000, the x2APIC MSRs (0x800-0x8FF),
//! IA32_APIC_BASE, and the APIC timer (one-shot, periodic, TSC-deadline).
//! Behaviour follows the Intel SDM vol. 3 ch. 10 and xhyve's vlapic.c.
//!
//! The model never reaches other vCPUs: an ICR write returns the IPI as a `LapicEvent` for
//! the router (`msi::select_targets`), which hands it to each target's `deliver`. Likewise
//! an EOI of a level-triggered vector returns the vector for the IOAPIC. After any access
//! the VMM asks `pending_vector` whether to open an interrupt window, and injects with
//! `acknowledge`.

use super::msi::{
    DeliveryMode, DestinationInfo, DestinationMode, InterruptRequest, Shorthand, TriggerMode,
};

pub const LAPIC_BASE: u64 = 0xFEE0_0000;
pub const LAPIC_SIZE: u64 = 0x1000;

pub const MSR_APIC_BASE: u32 = 0x1B;
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8FF;

/// The rate the APIC timer counts at before the divider. Guests calibrate it; 100 MHz makes
/// one count exactly 10 ns, so periods do not drift through rounding.
pub const TIMER_BUS_HZ: u64 = 100_000_000;

/// Version 0x14 (integrated APIC) with 7 LVT entries (max LVT index 6, CMCI included).
const VERSION: u32 = 0x14 | (6 << 16);

const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// Address bits of IA32_APIC_BASE on a CPU with 36-bit physical addresses or more.
const APIC_BASE_ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;

const REG_ID: u32 = 0x020;
const REG_VERSION: u32 = 0x030;
const REG_TPR: u32 = 0x080;
const REG_APR: u32 = 0x090;
const REG_PPR: u32 = 0x0A0;
const REG_EOI: u32 = 0x0B0;
const REG_RRD: u32 = 0x0C0;
const REG_LDR: u32 = 0x0D0;
const REG_DFR: u32 = 0x0E0;
const REG_SVR: u32 = 0x0F0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_LVT_CMCI: u32 = 0x2F0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_THERMAL: u32 = 0x330;
const REG_LVT_PERFORMANCE: u32 = 0x340;
const REG_LVT_LINT0: u32 = 0x350;
const REG_LVT_LINT1: u32 = 0x360;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const REG_SELF_IPI: u32 = 0x3F0;

const SVR_ENABLE: u32 = 1 << 8;
/// Vector, software enable and focus-processor checking; EOI-broadcast suppression is not
/// offered (version bit 24 is clear), so bit 12 stays zero.
const SVR_WRITABLE: u32 = 0x3FF;

const LVT_MASKED: u32 = 1 << 16;
const LVT_LEVEL: u32 = 1 << 15;
const LVT_TIMER_MODE_SHIFT: u32 = 17;

const ICR_LOW_WRITABLE: u32 = 0x000C_CFFF;

/// ESR bits (SDM 10.5.3).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The local interrupt sources, in LVT order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalSource {
    Timer,
    Thermal,
    PerformanceCounter,
    Lint0,
    Lint1,
    Error,
    Cmci,
}

impl LocalSource {
    fn from_register(reg: u32) -> Option<Self> {
        match reg {
            REG_LVT_CMCI => Some(Self::Cmci),
            REG_LVT_TIMER => Some(Self::Timer),
            REG_LVT_THERMAL => Some(Self::Thermal),
            REG_LVT_PERFORMANCE => Some(Self::PerformanceCounter),
            REG_LVT_LINT0 => Some(Self::Lint0),
            REG_LVT_LINT1 => Some(Self::Lint1),
            REG_LVT_ERROR => Some(Self::Error),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Which LVT bits the guest may write for this source.
    fn writable_bits(self) -> u32 {
        match self {
            // Vector, mask, timer mode.
            Self::Timer => 0x0007_00FF,
            // Vector, delivery mode, polarity, trigger mode, mask.
            Self::Lint0 | Self::Lint1 => 0x0001_A7FF,
            Self::Error => 0x0001_00FF,
            Self::Thermal | Self::PerformanceCounter | Self::Cmci => 0x0001_07FF,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// What a LAPIC did with an interrupt handed to it. The VMM acts on the non-`Interrupt`
/// outcomes itself (NMI injection, asking the PIC for ExtINT, vCPU INIT/SIPI state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Dropped: APIC disabled, masked, illegal vector or meaningless request.
    Ignored,
    /// A vector is now in the IRR; the vCPU should be kicked to look at `pending_vector`.
    Interrupt,
    Nmi,
    Smi,
    /// The PIC supplies the vector (virtual wire).
    ExtInt,
    /// The APIC has been reset by INIT; the vCPU should wait for a SIPI.
    Init,
    /// Start-up IPI: a vCPU waiting for SIPI starts at `vector << 12`.
    StartUp(u8),
}

/// Something a register write asks of the rest of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicEvent {
    None,
    /// An ICR write: route this to its targets.
    Ipi(InterruptRequest),
    /// EOI of a level-triggered vector: tell the IOAPIC(s).
    EoiBroadcast(u8),
}

/// A rejected MSR access; the VMM injects #GP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LapicError {
    #[error("MSR {0:#x} is not a local APIC MSR")]
    NotLapicMsr(u32),
    #[error("x2APIC MSR {0:#x} accessed while the APIC is not in x2APIC mode")]
    NotX2apic(u32),
    #[error("x2APIC MSR {0:#x} does not exist")]
    Reserved(u32),
    #[error("x2APIC MSR {0:#x} is read-only")]
    ReadOnly(u32),
    #[error("x2APIC MSR {0:#x} is write-only")]
    WriteOnly(u32),
    #[error("x2APIC MSR {msr:#x} accepts only 0, got {value:#x}")]
    NonZeroWrite { msr: u32, value: u64 },
    #[error("invalid IA32_APIC_BASE value {0:#x}")]
    BadApicBase(u64),
}

/// How a LAPIC is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LapicConfig {
    /// Initial APIC ID (the MADT's; xhyve uses the vCPU index).
    pub apic_id: u32,
    /// Sets the BSP flag in IA32_APIC_BASE.
    pub bootstrap: bool,
    /// Whether the guest may switch to x2APIC mode (xhyve `-x`).
    pub x2apic_allowed: bool,
    /// Guest TSC frequency, to turn TSC-deadline values into nanoseconds.
    pub tsc_hz: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunningTimer {
    deadline_ns: u64,
    /// Nanoseconds per period (periodic mode) or of the whole count (one-shot).
    duration_ns: u64,
    /// Divider in force when the count started; the current count is measured with it.
    divisor: u32,
}

#[derive(Debug, Clone)]
pub struct Lapic {
    config: LapicConfig,
    apic_base: u64,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    pending_errors: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 7],
    timer_initial: u32,
    timer_divide: u32,
    timer: Option<RunningTimer>,
    tsc_deadline: u64,
    /// A guest TSC value and the clock time it was read at, for TSC-deadline conversion.
    tsc_reference: (u64, u64),
}

fn bit_set(bits: &mut [u32; 8], vector: u8, on: bool) {
    let word = usize::from(vector >> 5);
    let mask = 1u32 << (vector & 31);
    if on {
        bits[word] |= mask;
    } else {
        bits[word] &= !mask;
    }
}

fn bit_test(bits: &[u32; 8], vector: u8) -> bool {
    bits[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
}

fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8usize)
        .rev()
        .find(|&word| bits[word] != 0)
        .map(|word| (word as u8) * 32 + (31 - bits[word].leading_zeros()) as u8)
}

/// Counts per second of the divided timer clock; the divide register encodes 2^(n+1)
/// in bits 0, 1 and 3, with 0b111 meaning divide by 1.
fn divisor_from_register(divide: u32) -> u32 {
    let code = (divide & 3) | ((divide & 8) >> 1);
    if code == 7 {
        1
    } else {
        2 << code
    }
}

fn counts_to_ns(counts: u64, divisor: u32) -> u64 {
    let ns = u128::from(counts) * u128::from(divisor) * NANOS_PER_SEC / u128::from(TIMER_BUS_HZ);
    u64::try_from(ns).unwrap_or(u64::MAX).max(1)
}

fn ns_to_counts(ns: u64, divisor: u32) -> u64 {
    let counts =
        u128::from(ns) * u128::from(TIMER_BUS_HZ) / (NANOS_PER_SEC * u128::from(divisor.max(1)));
    u64::try_from(counts).unwrap_or(u64::MAX)
}

impl Lapic {
    pub fn new(config: LapicConfig) -> Self {
        let mut apic_base = LAPIC_BASE | APIC_BASE_ENABLE;
        if config.bootstrap {
            apic_base |= APIC_BASE_BSP;
        }
        let mut lapic = Self {
            config,
            apic_base,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            pending_errors: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [0; 7],
            timer_initial: 0,
            timer_divide: 0,
            timer: None,
            tsc_deadline: 0,
            tsc_reference: (0, 0),
        };
        lapic.reset_registers();
        lapic
    }

    /// Power-up register state (also what INIT and a global disable leave behind); the APIC
    /// ID and IA32_APIC_BASE are untouched.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xFFFF_FFFF;
        self.svr = 0xFF;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.pending_errors = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; 7];
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.timer = None;
        self.tsc_deadline = 0;
        if self.x2apic_mode() {
            self.ldr = self.x2apic_logical_id();
        }
    }

    /// Power-on, as at a machine reset (INIT keeps IA32_APIC_BASE; this does not): the
    /// default APIC base (xAPIC mode, enabled, the BSP flag as built) and every register
    /// reset. The APIC ID and what the model knows of the guest TSC stay.
    pub fn power_on_reset(&mut self) {
        let mut apic_base = LAPIC_BASE | APIC_BASE_ENABLE;
        if self.config.bootstrap {
            apic_base |= APIC_BASE_BSP;
        }
        self.apic_base = apic_base;
        self.reset_registers();
    }

    /// Tells the model which guest TSC value corresponds to clock time `now_ns`, so that
    /// TSC-deadline writes convert to clock deadlines. Defaults to TSC 0 at time 0.
    pub fn set_tsc_reference(&mut self, tsc: u64, now_ns: u64) {
        self.tsc_reference = (tsc, now_ns);
    }

    /// The guest TSC's rate, once the hypervisor has told it (`LapicConfig::tsc_hz`).
    pub fn set_tsc_rate(&mut self, tsc_hz: u64) {
        self.config.tsc_hz = tsc_hz;
    }

    /// Virtual-wire mode, as PC firmware leaves it: LINT0 takes the 8259's ExtINT, LINT1 is
    /// NMI, both unmasked even while the APIC is software-disabled.
    pub fn set_virtual_wire(&mut self) {
        self.lvt[LocalSource::Lint0.index()] = DeliveryMode::ExtInt.bits() << 8;
        self.lvt[LocalSource::Lint1.index()] = DeliveryMode::Nmi.bits() << 8;
    }

    /// Whether the 8259's INTR reaches this CPU: LINT0 unmasked in ExtINT mode, or the APIC
    /// globally disabled (then LINT0 is the processor's INTR pin).
    pub fn accepts_pic_interrupts(&self) -> bool {
        let lint0 = self.lvt[LocalSource::Lint0.index()];
        !self.hardware_enabled()
            || (lint0 & LVT_MASKED == 0
                && DeliveryMode::from_bits(lint0 >> 8) == Some(DeliveryMode::ExtInt))
    }

    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    pub fn hardware_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    pub fn x2apic_mode(&self) -> bool {
        self.apic_base & (APIC_BASE_ENABLE | APIC_BASE_X2APIC)
            == APIC_BASE_ENABLE | APIC_BASE_X2APIC
    }

    /// Whether the xAPIC page answers MMIO (enabled and not in x2APIC mode).
    pub fn mmio_enabled(&self) -> bool {
        self.hardware_enabled() && !self.x2apic_mode()
    }

    fn x2apic_logical_id(&self) -> u32 {
        let id = self.config.apic_id;
        ((id >> 4) << 16) | (1 << (id & 0xF))
    }

    /// The APIC ID as the current mode exposes it.
    pub fn apic_id(&self) -> u32 {
        if self.x2apic_mode() {
            self.config.apic_id
        } else {
            self.config.apic_id & 0xFF
        }
    }

    /// Addressing state for the interrupt router.
    pub fn destination_info(&self) -> DestinationInfo {
        DestinationInfo {
            apic_id: self.apic_id(),
            x2apic: self.x2apic_mode(),
            logical_id: self.ldr,
            cluster_model: self.dfr >> 28 == 0,
            hardware_enabled: self.hardware_enabled(),
            software_enabled: self.software_enabled(),
            task_priority: self.tpr,
        }
    }

    pub fn processor_priority(&self) -> u8 {
        let in_service = highest(&self.isr).unwrap_or(0) & 0xF0;
        if self.tpr & 0xF0 >= in_service {
            self.tpr
        } else {
            in_service
        }
    }

    /// The vector the vCPU should take next, if any beats the processor priority.
    pub fn pending_vector(&self) -> Option<u8> {
        let vector = highest(&self.irr)?;
        (vector & 0xF0 > self.processor_priority() & 0xF0).then_some(vector)
    }

    /// The vCPU takes the pending interrupt: it moves from IRR to ISR. Returns the vector
    /// to inject, or `None` if nothing may be delivered now.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.pending_vector()?;
        bit_set(&mut self.irr, vector, false);
        bit_set(&mut self.isr, vector, true);
        Some(vector)
    }

    /// Hands an interrupt message from the router to this APIC.
    pub fn deliver(&mut self, request: &InterruptRequest) -> Accepted {
        // A de-assert message (level MSI or the legacy INIT de-assert) asks for nothing.
        if !self.hardware_enabled() || !request.assert {
            return Accepted::Ignored;
        }
        match request.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_vector(request.vector, request.trigger_mode == TriggerMode::Level)
            }
            DeliveryMode::Nmi => Accepted::Nmi,
            DeliveryMode::Smi => Accepted::Smi,
            DeliveryMode::ExtInt => Accepted::ExtInt,
            DeliveryMode::Init => {
                self.reset_registers();
                Accepted::Init
            }
            DeliveryMode::StartUp => Accepted::StartUp(request.vector),
        }
    }

    /// Puts a fixed vector in the IRR (and its trigger mode in the TMR).
    fn accept_vector(&mut self, vector: u8, level: bool) -> Accepted {
        if !self.hardware_enabled() || !self.software_enabled() {
            return Accepted::Ignored;
        }
        if vector < 16 {
            self.record_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return Accepted::Ignored;
        }
        bit_set(&mut self.irr, vector, true);
        bit_set(&mut self.tmr, vector, level);
        Accepted::Interrupt
    }

    /// Notes an error and raises the error LVT; the guest sees it in ESR after its next
    /// ESR write.
    fn record_error(&mut self, bits: u32) {
        self.pending_errors |= bits;
        let lvt = self.lvt[LocalSource::Error.index()];
        let vector = (lvt & 0xFF) as u8;
        // An illegal error vector would recurse into another error; drop it instead.
        if lvt & LVT_MASKED == 0 && vector >= 16 && self.software_enabled() {
            bit_set(&mut self.irr, vector, true);
            bit_set(&mut self.tmr, vector, false);
        }
    }

    /// Raises a local interrupt source through its LVT entry (LINT0/1 pins, thermal, ...).
    pub fn fire_local(&mut self, source: LocalSource) -> Accepted {
        if !self.hardware_enabled() {
            return Accepted::Ignored;
        }
        let lvt = self.lvt[source.index()];
        if lvt & LVT_MASKED != 0 {
            return Accepted::Ignored;
        }
        let level =
            lvt & LVT_LEVEL != 0 && matches!(source, LocalSource::Lint0 | LocalSource::Lint1);
        match DeliveryMode::from_bits(lvt >> 8) {
            Some(DeliveryMode::Fixed) => self.accept_vector(lvt as u8, level),
            Some(DeliveryMode::Nmi) => Accepted::Nmi,
            Some(DeliveryMode::Smi) => Accepted::Smi,
            Some(DeliveryMode::ExtInt) => Accepted::ExtInt,
            Some(DeliveryMode::Init) => {
                self.reset_registers();
                Accepted::Init
            }
            _ => Accepted::Ignored,
        }
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LocalSource::Timer.index()] >> LVT_TIMER_MODE_SHIFT) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// When the timer next needs `tick`, if it is running.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.timer.map(|t| t.deadline_ns)
    }

    /// Advances the timer to `now_ns`. Returns true if that made an interrupt pending.
    /// Periods missed while the VMM was late are coalesced into one interrupt.
    pub fn tick(&mut self, now_ns: u64) -> bool {
        let Some(timer) = self.timer else {
            return false;
        };
        if now_ns < timer.deadline_ns {
            return false;
        }
        match self.timer_mode() {
            TimerMode::Periodic => {
                let late = now_ns - timer.deadline_ns;
                // Never sooner than the minimum period (see MIN_PERIODIC_NS).
                let periods = (late / timer.duration_ns.max(1) + 1).max(
                    crate::intc::periods_at_least(timer.duration_ns, crate::intc::MIN_PERIODIC_NS),
                );
                let deadline_ns = timer
                    .deadline_ns
                    .saturating_add(periods.saturating_mul(timer.duration_ns));
                self.timer = Some(RunningTimer {
                    deadline_ns,
                    ..timer
                });
            }
            TimerMode::OneShot => self.timer = None,
            TimerMode::TscDeadline => {
                self.timer = None;
                self.tsc_deadline = 0;
            }
        }
        self.fire_local(LocalSource::Timer) == Accepted::Interrupt
    }

    fn start_count(&mut self, initial: u32, now_ns: u64) {
        self.timer_initial = initial;
        if self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        if initial == 0 {
            self.timer = None;
            return;
        }
        let divisor = divisor_from_register(self.timer_divide);
        let duration_ns = counts_to_ns(u64::from(initial), divisor);
        self.timer = Some(RunningTimer {
            deadline_ns: now_ns.saturating_add(duration_ns),
            duration_ns,
            divisor,
        });
    }

    fn current_count(&self, now_ns: u64) -> u32 {
        match self.timer {
            Some(timer) if self.timer_mode() != TimerMode::TscDeadline => {
                let left_ns = timer.deadline_ns.saturating_sub(now_ns);
                let counts = ns_to_counts(left_ns, timer.divisor);
                u32::try_from(counts)
                    .unwrap_or(u32::MAX)
                    .min(self.timer_initial)
            }
            _ => 0,
        }
    }

    fn guest_tsc(&self, now_ns: u64) -> u64 {
        let (tsc, at_ns) = self.tsc_reference;
        let elapsed = u128::from(now_ns.saturating_sub(at_ns));
        let ticks = elapsed * u128::from(self.config.tsc_hz) / NANOS_PER_SEC;
        tsc.saturating_add(u64::try_from(ticks).unwrap_or(u64::MAX))
    }

    fn write_tsc_deadline(&mut self, deadline: u64, now_ns: u64) {
        // Only meaningful in TSC-deadline mode; otherwise the write is dropped (SDM 10.5.4.1).
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.tsc_deadline = deadline;
        if deadline == 0 {
            self.timer = None;
            return;
        }
        let ahead = deadline.saturating_sub(self.guest_tsc(now_ns));
        let ahead_ns = if self.config.tsc_hz == 0 {
            0
        } else {
            u128::from(ahead) * NANOS_PER_SEC / u128::from(self.config.tsc_hz)
        };
        let duration_ns = u64::try_from(ahead_ns).unwrap_or(u64::MAX);
        self.timer = Some(RunningTimer {
            deadline_ns: now_ns.saturating_add(duration_ns),
            duration_ns: duration_ns.max(1),
            divisor: 1,
        });
    }

    fn write_lvt(&mut self, source: LocalSource, value: u32) {
        let index = source.index();
        let mut lvt =
            (value & source.writable_bits()) | (self.lvt[index] & !source.writable_bits());
        if !self.software_enabled() {
            lvt |= LVT_MASKED;
        }
        if source == LocalSource::Timer {
            if (lvt >> LVT_TIMER_MODE_SHIFT) & 3 == 3 {
                // Reserved mode: keep the old one.
                lvt = (lvt & !(3 << LVT_TIMER_MODE_SHIFT))
                    | (self.lvt[index] & (3 << LVT_TIMER_MODE_SHIFT));
            }
            let old_mode = self.timer_mode();
            self.lvt[index] = lvt;
            if self.timer_mode() != old_mode {
                // Switching modes disarms the timer (SDM 10.5.4.1).
                self.timer = None;
                self.tsc_deadline = 0;
                self.timer_initial = 0;
            }
            return;
        }
        self.lvt[index] = lvt;
    }

    fn write_svr(&mut self, value: u32) {
        self.svr = value & SVR_WRITABLE;
        if !self.software_enabled() {
            for lvt in &mut self.lvt {
                *lvt |= LVT_MASKED;
            }
        }
    }

    fn end_of_interrupt(&mut self) -> LapicEvent {
        let Some(vector) = highest(&self.isr) else {
            return LapicEvent::None;
        };
        bit_set(&mut self.isr, vector, false);
        if bit_test(&self.tmr, vector) {
            LapicEvent::EoiBroadcast(vector)
        } else {
            LapicEvent::None
        }
    }

    /// Builds the IPI an ICR write asks for, or `None` if the write sends nothing.
    fn send_ipi(&mut self) -> LapicEvent {
        let low = self.icr_low;
        let Some(delivery_mode) = DeliveryMode::from_bits(low >> 8) else {
            return LapicEvent::None;
        };
        let vector = (low & 0xFF) as u8;
        let assert = low & (1 << 14) != 0;
        let trigger_mode = if low & (1 << 15) != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        if matches!(
            delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) && vector < 16
        {
            self.record_error(ESR_SEND_ILLEGAL_VECTOR);
            return LapicEvent::None;
        }
        if delivery_mode == DeliveryMode::Init && !assert && trigger_mode == TriggerMode::Level {
            return LapicEvent::None;
        }
        let (destination, wide_destination) = if self.x2apic_mode() {
            (self.icr_high, true)
        } else {
            (self.icr_high >> 24, false)
        };
        LapicEvent::Ipi(InterruptRequest {
            vector,
            delivery_mode,
            destination_mode: if low & (1 << 11) != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            trigger_mode,
            assert: assert || delivery_mode != DeliveryMode::Init,
            shorthand: Shorthand::from_bits(low >> 18),
            destination,
            wide_destination,
        })
    }

    /// Reads a register by its xAPIC offset (16-byte aligned), as both modes see it.
    fn read_register(&self, reg: u32, now_ns: u64) -> u32 {
        match reg {
            REG_ID => {
                if self.x2apic_mode() {
                    self.config.apic_id
                } else {
                    (self.config.apic_id & 0xFF) << 24
                }
            }
            REG_VERSION => VERSION,
            REG_TPR => u32::from(self.tpr),
            REG_PPR => u32::from(self.processor_priority()),
            REG_LDR => self.ldr,
            REG_DFR => self.dfr,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr[((reg - REG_ISR) >> 4) as usize],
            0x180..=0x1F0 => self.tmr[((reg - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((reg - REG_IRR) >> 4) as usize],
            REG_ESR => self.esr,
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH => self.icr_high,
            REG_TIMER_INITIAL => self.timer_initial,
            REG_TIMER_CURRENT => self.current_count(now_ns),
            REG_TIMER_DIVIDE => self.timer_divide,
            // Arbitration priority and remote read are not modelled; EOI is write-only.
            REG_APR | REG_RRD | REG_EOI => 0,
            _ => match LocalSource::from_register(reg) {
                Some(source) => self.lvt[source.index()],
                None => 0,
            },
        }
    }

    /// Writes a register by its xAPIC offset; read-only ones are left alone.
    fn write_register(&mut self, reg: u32, value: u32, now_ns: u64) -> LapicEvent {
        match reg {
            REG_TPR => self.tpr = value as u8,
            REG_EOI => return self.end_of_interrupt(),
            REG_LDR if !self.x2apic_mode() => self.ldr = value & 0xFF00_0000,
            REG_DFR if !self.x2apic_mode() => self.dfr = value | 0x0FFF_FFFF,
            REG_SVR => self.write_svr(value),
            REG_ESR => {
                self.esr = self.pending_errors;
                self.pending_errors = 0;
            }
            REG_ICR_HIGH if !self.x2apic_mode() => self.icr_high = value & 0xFF00_0000,
            REG_ICR_LOW => {
                self.icr_low = value & ICR_LOW_WRITABLE;
                return self.send_ipi();
            }
            REG_TIMER_INITIAL => self.start_count(value, now_ns),
            REG_TIMER_DIVIDE => self.timer_divide = value & 0xB,
            _ => {
                if let Some(source) = LocalSource::from_register(reg) {
                    self.write_lvt(source, value);
                }
            }
        }
        LapicEvent::None
    }

    /// Guest read of the xAPIC page at `offset`. Reads as zero in x2APIC mode or when
    /// globally disabled.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8], now_ns: u64) {
        data.fill(0);
        if !self.mmio_enabled() || offset >= LAPIC_SIZE {
            return;
        }
        let within = (offset & 0xF) as usize;
        if within >= 4 {
            return;
        }
        let value = self
            .read_register((offset & 0xFF0) as u32, now_ns)
            .to_le_bytes();
        let len = data.len().min(4 - within);
        data[..len].copy_from_slice(&value[within..within + len]);
    }

    /// Guest write of the xAPIC page. Only aligned 32-bit writes take effect, as on
    /// hardware; others are dropped.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> LapicEvent {
        if !self.mmio_enabled() || offset >= LAPIC_SIZE || offset & 0xF != 0 {
            return LapicEvent::None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return LapicEvent::None;
        };
        self.write_register(offset as u32, u32::from_le_bytes(bytes), now_ns)
    }

    /// Whether `msr` belongs to this model (`rdmsr`/`wrmsr` answer it).
    pub fn handles_msr(msr: u32) -> bool {
        msr == MSR_APIC_BASE
            || msr == MSR_TSC_DEADLINE
            || (MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr)
    }

    fn x2apic_register(&self, msr: u32) -> Result<u32, LapicError> {
        if !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return Err(LapicError::NotLapicMsr(msr));
        }
        if !self.x2apic_mode() {
            return Err(LapicError::NotX2apic(msr));
        }
        let reg = (msr - MSR_X2APIC_FIRST) << 4;
        let exists = matches!(
            reg,
            REG_ID | REG_VERSION | REG_TPR | REG_PPR | REG_EOI | REG_LDR | REG_SVR | 0x100
                ..=0x270
                    | REG_ESR
                    | REG_ICR_LOW
                    | REG_TIMER_INITIAL
                    | REG_TIMER_CURRENT
                    | REG_TIMER_DIVIDE
                    | REG_SELF_IPI
        ) || LocalSource::from_register(reg).is_some();
        if exists {
            Ok(reg)
        } else {
            Err(LapicError::Reserved(msr))
        }
    }

    pub fn rdmsr(&self, msr: u32, now_ns: u64) -> Result<u64, LapicError> {
        match msr {
            MSR_APIC_BASE => return Ok(self.apic_base),
            MSR_TSC_DEADLINE => {
                return Ok(if self.timer_mode() == TimerMode::TscDeadline {
                    self.tsc_deadline
                } else {
                    0
                })
            }
            _ => {}
        }
        let reg = self.x2apic_register(msr)?;
        match reg {
            REG_EOI | REG_SELF_IPI => Err(LapicError::WriteOnly(msr)),
            REG_ICR_LOW => Ok(u64::from(self.icr_high) << 32 | u64::from(self.icr_low)),
            _ => Ok(u64::from(self.read_register(reg, now_ns))),
        }
    }

    pub fn wrmsr(&mut self, msr: u32, value: u64, now_ns: u64) -> Result<LapicEvent, LapicError> {
        match msr {
            MSR_APIC_BASE => return self.write_apic_base(value).map(|()| LapicEvent::None),
            MSR_TSC_DEADLINE => {
                self.write_tsc_deadline(value, now_ns);
                return Ok(LapicEvent::None);
            }
            _ => {}
        }
        let reg = self.x2apic_register(msr)?;
        match reg {
            REG_ID | REG_VERSION | REG_PPR | REG_LDR | REG_TIMER_CURRENT | 0x100..=0x270 => {
                Err(LapicError::ReadOnly(msr))
            }
            REG_EOI | REG_ESR if value != 0 => Err(LapicError::NonZeroWrite { msr, value }),
            REG_ICR_LOW => {
                self.icr_high = (value >> 32) as u32;
                Ok(self.write_register(REG_ICR_LOW, value as u32, now_ns))
            }
            REG_SELF_IPI => {
                let vector = value as u8;
                if vector < 16 {
                    self.record_error(ESR_SEND_ILLEGAL_VECTOR);
                } else {
                    self.accept_vector(vector, false);
                }
                Ok(LapicEvent::None)
            }
            _ => Ok(self.write_register(reg, value as u32, now_ns)),
        }
    }

    /// IA32_APIC_BASE: enable/disable and xAPIC -> x2APIC, following the SDM's legal mode
    /// transitions (10.12.5). The base address cannot move; xhyve does not relocate it.
    fn write_apic_base(&mut self, value: u64) -> Result<(), LapicError> {
        let reserved =
            !(APIC_BASE_ADDRESS_MASK | APIC_BASE_ENABLE | APIC_BASE_X2APIC | APIC_BASE_BSP);
        if value & reserved != 0 || value & APIC_BASE_ADDRESS_MASK != LAPIC_BASE {
            return Err(LapicError::BadApicBase(value));
        }
        let enable = value & APIC_BASE_ENABLE != 0;
        let x2apic = value & APIC_BASE_X2APIC != 0;
        if x2apic && (!enable || !self.config.x2apic_allowed) {
            return Err(LapicError::BadApicBase(value));
        }
        let was_enabled = self.hardware_enabled();
        let was_x2apic = self.x2apic_mode();
        // x2APIC may only be left by disabling; it may only be entered from xAPIC.
        if enable && ((was_x2apic && !x2apic) || (x2apic && !was_x2apic && !was_enabled)) {
            return Err(LapicError::BadApicBase(value));
        }
        let bsp = self.apic_base & APIC_BASE_BSP;
        self.apic_base = LAPIC_BASE | bsp | (value & (APIC_BASE_ENABLE | APIC_BASE_X2APIC));
        if !enable {
            if was_enabled {
                self.reset_registers();
            }
        } else if !was_enabled {
            self.reset_registers();
        } else if x2apic && !was_x2apic {
            self.ldr = self.x2apic_logical_id();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TSC_HZ: u64 = 1_000_000_000;

    fn lapic(apic_id: u32) -> Lapic {
        Lapic::new(LapicConfig {
            apic_id,
            bootstrap: apic_id == 0,
            x2apic_allowed: true,
            tsc_hz: TSC_HZ,
        })
    }

    fn read(lapic: &Lapic, reg: u32) -> u32 {
        read_at(lapic, reg, 0)
    }

    fn read_at(lapic: &Lapic, reg: u32, now: u64) -> u32 {
        let mut data = [0u8; 4];
        lapic.mmio_read(u64::from(reg), &mut data, now);
        u32::from_le_bytes(data)
    }

    fn write(lapic: &mut Lapic, reg: u32, value: u32) -> LapicEvent {
        write_at(lapic, reg, value, 0)
    }

    fn write_at(lapic: &mut Lapic, reg: u32, value: u32, now: u64) -> LapicEvent {
        lapic.mmio_write(u64::from(reg), &value.to_le_bytes(), now)
    }

    fn enabled(apic_id: u32) -> Lapic {
        let mut l = lapic(apic_id);
        write(&mut l, REG_SVR, SVR_ENABLE | 0xFF);
        l
    }

    fn to_x2apic(l: &mut Lapic) {
        l.wrmsr(
            MSR_APIC_BASE,
            LAPIC_BASE | APIC_BASE_ENABLE | APIC_BASE_X2APIC,
            0,
        )
        .unwrap();
    }

    #[test]
    fn power_up_state() {
        let l = lapic(3);
        assert_eq!(read(&l, REG_ID), 3 << 24);
        assert_eq!(read(&l, REG_VERSION), 0x0006_0014);
        assert_eq!(read(&l, REG_SVR), 0xFF);
        assert_eq!(read(&l, REG_DFR), 0xFFFF_FFFF);
        for reg in (0x320..=0x370).step_by(0x10).chain([REG_LVT_CMCI]) {
            assert_eq!(read(&l, reg), LVT_MASKED, "LVT {reg:#x}");
        }
        assert_eq!(l.apic_base(), LAPIC_BASE | APIC_BASE_ENABLE);
        assert_eq!(
            lapic(0).apic_base(),
            LAPIC_BASE | APIC_BASE_ENABLE | APIC_BASE_BSP
        );
        assert!(!l.software_enabled());
        assert_eq!(l.pending_vector(), None);
    }

    #[test]
    fn id_version_ppr_are_read_only_and_masks_apply() {
        let mut l = lapic(3);
        write(&mut l, REG_ID, 0x0700_0000);
        write(&mut l, REG_VERSION, 0);
        write(&mut l, REG_PPR, 0xFF);
        assert_eq!(read(&l, REG_ID), 3 << 24);
        assert_eq!(read(&l, REG_VERSION), 0x0006_0014);
        assert_eq!(read(&l, REG_PPR), 0);
        write(&mut l, REG_LDR, 0x12FF_FFFF);
        assert_eq!(read(&l, REG_LDR), 0x1200_0000);
        write(&mut l, REG_DFR, 0x0000_0000);
        assert_eq!(read(&l, REG_DFR), 0x0FFF_FFFF);
        write(&mut l, REG_TPR, 0x1234);
        assert_eq!(read(&l, REG_TPR), 0x34);
        write(&mut l, REG_SVR, 0xFFFF_FFFF);
        assert_eq!(read(&l, REG_SVR), 0x3FF);
        write(&mut l, REG_TIMER_DIVIDE, 0xFF);
        assert_eq!(read(&l, REG_TIMER_DIVIDE), 0xB);
        assert_eq!(read(&l, REG_APR), 0);
        assert_eq!(read(&l, REG_RRD), 0);
    }

    #[test]
    fn software_disabled_apic_drops_fixed_interrupts_but_not_nmi() {
        let mut l = lapic(0);
        assert_eq!(
            l.deliver(&InterruptRequest::fixed(0x40, 0)),
            Accepted::Ignored
        );
        assert_eq!(l.pending_vector(), None);
        let nmi = InterruptRequest {
            delivery_mode: DeliveryMode::Nmi,
            ..InterruptRequest::fixed(0, 0)
        };
        assert_eq!(l.deliver(&nmi), Accepted::Nmi);
    }

    #[test]
    fn deassert_messages_are_ignored() {
        let mut l = enabled(0);
        let deassert = InterruptRequest {
            trigger_mode: TriggerMode::Level,
            assert: false,
            ..InterruptRequest::fixed(0x40, 0)
        };
        assert_eq!(l.deliver(&deassert), Accepted::Ignored);
        assert_eq!(l.pending_vector(), None);
    }

    #[test]
    fn irr_isr_eoi_cycle() {
        let mut l = enabled(0);
        assert_eq!(
            l.deliver(&InterruptRequest::fixed(0x41, 0)),
            Accepted::Interrupt
        );
        assert_eq!(read(&l, REG_IRR + 0x20), 1 << 1);
        assert_eq!(l.pending_vector(), Some(0x41));
        assert_eq!(l.acknowledge(), Some(0x41));
        assert_eq!(read(&l, REG_IRR + 0x20), 0);
        assert_eq!(read(&l, REG_ISR + 0x20), 1 << 1);
        assert_eq!(read(&l, REG_PPR), 0x40);
        assert_eq!(l.acknowledge(), None);
        assert_eq!(write(&mut l, REG_EOI, 0), LapicEvent::None);
        assert_eq!(read(&l, REG_ISR + 0x20), 0);
        assert_eq!(read(&l, REG_PPR), 0);
        // EOI with nothing in service does nothing.
        assert_eq!(write(&mut l, REG_EOI, 0), LapicEvent::None);
    }

    #[test]
    fn priorities_gate_delivery() {
        let mut l = enabled(0);
        write(&mut l, REG_TPR, 0x50);
        l.deliver(&InterruptRequest::fixed(0x45, 0));
        l.deliver(&InterruptRequest::fixed(0x5F, 0));
        assert_eq!(
            l.pending_vector(),
            None,
            "same or lower class than TPR waits"
        );
        write(&mut l, REG_TPR, 0x20);
        assert_eq!(l.pending_vector(), Some(0x5F));
        assert_eq!(l.acknowledge(), Some(0x5F));
        // 0x45 is a lower class than the in-service 0x5F.
        assert_eq!(l.pending_vector(), None);
        l.deliver(&InterruptRequest::fixed(0x61, 0));
        assert_eq!(l.acknowledge(), Some(0x61), "a higher class nests");
        write(&mut l, REG_EOI, 0);
        assert_eq!(
            read(&l, REG_ISR + 0x30),
            0,
            "EOI retires the highest in service"
        );
        assert_eq!(read(&l, REG_ISR + 0x20), 1 << 31);
        write(&mut l, REG_EOI, 0);
        assert_eq!(l.acknowledge(), Some(0x45));
    }

    #[test]
    fn level_triggered_eoi_is_broadcast() {
        let mut l = enabled(0);
        let level = InterruptRequest {
            trigger_mode: TriggerMode::Level,
            ..InterruptRequest::fixed(0x71, 0)
        };
        l.deliver(&level);
        assert_eq!(read(&l, REG_TMR + 0x30), 1 << 17);
        l.acknowledge();
        assert_eq!(write(&mut l, REG_EOI, 0), LapicEvent::EoiBroadcast(0x71));
        // The same vector delivered edge-triggered later is not broadcast.
        l.deliver(&InterruptRequest::fixed(0x71, 0));
        l.acknowledge();
        assert_eq!(write(&mut l, REG_EOI, 0), LapicEvent::None);
    }

    #[test]
    fn illegal_vectors_set_esr_after_write_and_fire_error_lvt() {
        let mut l = enabled(0);
        write(&mut l, REG_LVT_ERROR, 0xFE);
        assert_eq!(
            l.deliver(&InterruptRequest::fixed(0x05, 0)),
            Accepted::Ignored
        );
        assert_eq!(read(&l, REG_ESR), 0, "ESR updates only on write");
        write(&mut l, REG_ESR, 0);
        assert_eq!(read(&l, REG_ESR), ESR_RECEIVE_ILLEGAL_VECTOR);
        assert_eq!(l.pending_vector(), Some(0xFE));
        write(&mut l, REG_ICR_LOW, 0x0000_0003);
        write(&mut l, REG_ESR, 0);
        assert_eq!(read(&l, REG_ESR), ESR_SEND_ILLEGAL_VECTOR);
        write(&mut l, REG_ESR, 0);
        assert_eq!(read(&l, REG_ESR), 0);
    }

    #[test]
    fn xapic_icr_builds_ipis() {
        let mut l = enabled(0);
        write(&mut l, REG_ICR_HIGH, 0x02FF_FFFF);
        assert_eq!(read(&l, REG_ICR_HIGH), 0x0200_0000);
        // Fixed, logical, level assert, vector 0x30.
        let LapicEvent::Ipi(req) = write(&mut l, REG_ICR_LOW, 0x0000_4830) else {
            panic!("no IPI");
        };
        assert_eq!(req.vector, 0x30);
        assert_eq!(req.delivery_mode, DeliveryMode::Fixed);
        assert_eq!(req.destination_mode, DestinationMode::Logical);
        assert_eq!(req.destination, 2);
        assert!(!req.wide_destination);
        assert_eq!(req.shorthand, Shorthand::None);
        assert_eq!(read(&l, REG_ICR_LOW) & (1 << 12), 0, "delivery status idle");
        // INIT assert to all but self, then the legacy de-assert that sends nothing.
        let LapicEvent::Ipi(init) = write(&mut l, REG_ICR_LOW, 0x000C_4500) else {
            panic!("no INIT");
        };
        assert_eq!(init.delivery_mode, DeliveryMode::Init);
        assert_eq!(init.shorthand, Shorthand::AllExcludingSelf);
        assert_eq!(write(&mut l, REG_ICR_LOW, 0x000C_8500), LapicEvent::None);
        // SIPI with vector 0x9A (start at 0x9A000).
        let LapicEvent::Ipi(sipi) = write(&mut l, REG_ICR_LOW, 0x0000_469A) else {
            panic!("no SIPI");
        };
        assert_eq!(sipi.delivery_mode, DeliveryMode::StartUp);
        assert_eq!(sipi.vector, 0x9A);
        // Reserved delivery mode 3 sends nothing.
        assert_eq!(write(&mut l, REG_ICR_LOW, 0x0000_0340), LapicEvent::None);
    }

    #[test]
    fn init_resets_and_sipi_reports_vector() {
        let mut l = enabled(1);
        write(&mut l, REG_TPR, 0x30);
        write(&mut l, REG_LDR, 0x0100_0000);
        l.deliver(&InterruptRequest::fixed(0x50, 1));
        let init = InterruptRequest {
            delivery_mode: DeliveryMode::Init,
            ..InterruptRequest::fixed(0, 1)
        };
        assert_eq!(l.deliver(&init), Accepted::Init);
        assert_eq!(read(&l, REG_TPR), 0);
        assert_eq!(read(&l, REG_LDR), 0);
        assert_eq!(read(&l, REG_SVR), 0xFF);
        assert_eq!(read(&l, REG_ID), 1 << 24, "INIT keeps the APIC ID");
        assert_eq!(l.pending_vector(), None);
        let deassert = InterruptRequest {
            assert: false,
            ..init
        };
        assert_eq!(l.deliver(&deassert), Accepted::Ignored);
        let sipi = InterruptRequest {
            delivery_mode: DeliveryMode::StartUp,
            ..InterruptRequest::fixed(0x9A, 1)
        };
        assert_eq!(l.deliver(&sipi), Accepted::StartUp(0x9A));
    }

    #[test]
    fn divide_register_decoding() {
        let expect = [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xA, 128),
            (0xB, 1),
        ];
        for (reg, divisor) in expect {
            assert_eq!(divisor_from_register(reg), divisor, "DCR {reg:#x}");
        }
    }

    #[test]
    fn one_shot_timer_counts_down_and_fires_once() {
        let mut l = enabled(0);
        write(&mut l, REG_TIMER_DIVIDE, 0xB); // divide by 1
        write(&mut l, REG_LVT_TIMER, 0xEF);
        let counts = (TIMER_BUS_HZ / 1000) as u32; // 1 ms
        write_at(&mut l, REG_TIMER_INITIAL, counts, 1_000);
        assert_eq!(l.next_deadline_ns(), Some(1_001_000));
        assert_eq!(read(&l, REG_TIMER_INITIAL), counts);
        let half = read_at(&l, REG_TIMER_CURRENT, 501_000);
        assert!(
            (counts / 2 - 1..=counts / 2).contains(&half),
            "current count {half}"
        );
        assert!(!l.tick(1_000_999));
        assert!(l.tick(1_001_000));
        assert_eq!(l.pending_vector(), Some(0xEF));
        assert_eq!(l.next_deadline_ns(), None);
        assert_eq!(read_at(&l, REG_TIMER_CURRENT, 2_000_000), 0);
        assert!(!l.tick(5_000_000));
    }

    #[test]
    fn timer_divider_scales_the_period() {
        let mut l = enabled(0);
        write(&mut l, REG_TIMER_DIVIDE, 0x3); // divide by 16
        write(&mut l, REG_LVT_TIMER, 0xEF);
        write(&mut l, REG_TIMER_INITIAL, (TIMER_BUS_HZ / 16 / 1000) as u32);
        assert_eq!(l.next_deadline_ns(), Some(1_000_000));
        // Writing 0 stops the count.
        write(&mut l, REG_TIMER_INITIAL, 0);
        assert_eq!(l.next_deadline_ns(), None);
    }

    #[test]
    fn periodic_timer_reloads_and_coalesces_missed_periods() {
        let mut l = enabled(0);
        write(&mut l, REG_TIMER_DIVIDE, 0xB);
        write(&mut l, REG_LVT_TIMER, (1 << LVT_TIMER_MODE_SHIFT) | 0xEE);
        write(&mut l, REG_TIMER_INITIAL, (TIMER_BUS_HZ / 1000) as u32);
        assert!(l.tick(1_000_000));
        assert_eq!(l.next_deadline_ns(), Some(2_000_000));
        assert_eq!(l.acknowledge(), Some(0xEE));
        write(&mut l, REG_EOI, 0);
        // 3.5 periods late: one interrupt, next deadline on the period grid.
        assert!(l.tick(5_500_000));
        assert_eq!(l.next_deadline_ns(), Some(6_000_000));
        assert_eq!(read(&l, REG_IRR + 0x70), 1 << 14);
    }

    /// A guest cannot make the timer thread spin: a periodic count of one bus clock (10 ns)
    /// fires at most every MIN_PERIODIC_NS.
    #[test]
    fn periodic_timer_has_a_minimum_period() {
        let mut l = enabled(0);
        write(&mut l, REG_TIMER_DIVIDE, 0xB); // divide by 1
        write(&mut l, REG_LVT_TIMER, (1 << LVT_TIMER_MODE_SHIFT) | 0xEE);
        write(&mut l, REG_TIMER_INITIAL, 1);
        let first = l.next_deadline_ns().unwrap();
        assert!(l.tick(first));
        let next = l.next_deadline_ns().unwrap();
        assert!(
            next - first >= crate::intc::MIN_PERIODIC_NS,
            "next tick after {} ns",
            next - first
        );
    }

    #[test]
    fn masked_timer_keeps_counting_without_interrupts() {
        let mut l = enabled(0);
        write(&mut l, REG_TIMER_DIVIDE, 0xB);
        write(
            &mut l,
            REG_LVT_TIMER,
            LVT_MASKED | (1 << LVT_TIMER_MODE_SHIFT) | 0xEE,
        );
        write(&mut l, REG_TIMER_INITIAL, (TIMER_BUS_HZ / 1000) as u32);
        assert!(!l.tick(1_000_000));
        assert_eq!(l.pending_vector(), None);
        assert_eq!(l.next_deadline_ns(), Some(2_000_000));
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut l = enabled(0);
        // Not in TSC-deadline mode: the MSR ignores writes and reads 0.
        l.wrmsr(MSR_TSC_DEADLINE, 5_000, 0).unwrap();
        assert_eq!(l.rdmsr(MSR_TSC_DEADLINE, 0), Ok(0));
        assert_eq!(l.next_deadline_ns(), None);
        write(&mut l, REG_LVT_TIMER, (2 << LVT_TIMER_MODE_SHIFT) | 0xEC);
        l.set_tsc_reference(1_000_000, 500);
        // TSC runs at 1 GHz: deadline TSC 1_002_000 is 2 us after time 500.
        l.wrmsr(MSR_TSC_DEADLINE, 1_002_000, 500).unwrap();
        assert_eq!(l.rdmsr(MSR_TSC_DEADLINE, 500), Ok(1_002_000));
        assert_eq!(l.next_deadline_ns(), Some(2_500));
        // The count registers do nothing in this mode.
        write(&mut l, REG_TIMER_INITIAL, 10);
        assert_eq!(l.next_deadline_ns(), Some(2_500));
        assert_eq!(read_at(&l, REG_TIMER_CURRENT, 600), 0);
        assert!(l.tick(2_500));
        assert_eq!(l.pending_vector(), Some(0xEC));
        assert_eq!(
            l.rdmsr(MSR_TSC_DEADLINE, 3_000),
            Ok(0),
            "fired deadline reads 0"
        );
        // A deadline in the past fires at once; 0 disarms.
        l.wrmsr(MSR_TSC_DEADLINE, 1, 4_000).unwrap();
        assert_eq!(l.next_deadline_ns(), Some(4_000));
        l.wrmsr(MSR_TSC_DEADLINE, 0, 4_000).unwrap();
        assert_eq!(l.next_deadline_ns(), None);
        // Leaving TSC-deadline mode disarms it.
        l.wrmsr(MSR_TSC_DEADLINE, 2_000_000, 4_000).unwrap();
        write(&mut l, REG_LVT_TIMER, 0xEC);
        assert_eq!(l.next_deadline_ns(), None);
    }

    #[test]
    fn reserved_timer_mode_keeps_the_old_mode() {
        let mut l = enabled(0);
        write(&mut l, REG_LVT_TIMER, (1 << LVT_TIMER_MODE_SHIFT) | 0xEE);
        write(&mut l, REG_LVT_TIMER, (3 << LVT_TIMER_MODE_SHIFT) | 0xEE);
        assert_eq!(read(&l, REG_LVT_TIMER), (1 << LVT_TIMER_MODE_SHIFT) | 0xEE);
    }

    #[test]
    fn software_disable_masks_every_lvt() {
        let mut l = enabled(0);
        write(&mut l, REG_LVT_TIMER, 0xEF);
        write(&mut l, REG_LVT_LINT0, 0x700);
        write(&mut l, REG_SVR, 0xFF);
        assert_eq!(read(&l, REG_LVT_TIMER), LVT_MASKED | 0xEF);
        assert_eq!(read(&l, REG_LVT_LINT0), LVT_MASKED | 0x700);
        // While disabled, unmasking does not stick.
        write(&mut l, REG_LVT_TIMER, 0xEF);
        assert_eq!(read(&l, REG_LVT_TIMER), LVT_MASKED | 0xEF);
        // Re-enabling leaves LVTs masked until the guest unmasks them.
        write(&mut l, REG_SVR, 0x1FF);
        assert_eq!(read(&l, REG_LVT_TIMER), LVT_MASKED | 0xEF);
    }

    #[test]
    fn virtual_wire_routes_the_pic_until_lint0_is_masked() {
        let mut l = lapic(0);
        assert!(!l.accepts_pic_interrupts(), "masked at power-up");
        l.set_virtual_wire();
        assert!(l.accepts_pic_interrupts());
        assert_eq!(l.fire_local(LocalSource::Lint1), Accepted::Nmi);
        write(&mut l, REG_SVR, 0x1FF);
        write(&mut l, REG_LVT_LINT0, LVT_MASKED | 0x700);
        assert!(!l.accepts_pic_interrupts());
    }

    #[test]
    fn lint_pins_follow_their_lvt() {
        let mut l = enabled(0);
        assert_eq!(
            l.fire_local(LocalSource::Lint0),
            Accepted::Ignored,
            "masked"
        );
        write(&mut l, REG_LVT_LINT0, 0x700); // LINT0: ExtINT
        write(&mut l, REG_LVT_LINT1, 0x400); // LINT1: NMI
        assert_eq!(l.fire_local(LocalSource::Lint0), Accepted::ExtInt);
        assert_eq!(l.fire_local(LocalSource::Lint1), Accepted::Nmi);
        write(&mut l, REG_LVT_LINT0, 0x8000 | 0x63); // fixed, level
        assert_eq!(l.fire_local(LocalSource::Lint0), Accepted::Interrupt);
        assert_eq!(l.acknowledge(), Some(0x63));
        assert_eq!(write(&mut l, REG_EOI, 0), LapicEvent::EoiBroadcast(0x63));
        // Writable-bit masks: remote IRR and delivery status stay clear.
        write(&mut l, REG_LVT_LINT1, 0xFFFF_FFFF);
        assert_eq!(read(&l, REG_LVT_LINT1), 0x0001_A7FF);
        write(&mut l, REG_LVT_ERROR, 0xFFFF_FFFF);
        assert_eq!(read(&l, REG_LVT_ERROR), 0x0001_00FF);
    }

    #[test]
    fn mmio_partial_and_odd_accesses() {
        let mut l = enabled(5);
        let mut byte = [0u8; 1];
        l.mmio_read(u64::from(REG_ID) + 3, &mut byte, 0);
        assert_eq!(byte, [5]);
        let mut beyond = [0xAAu8; 4];
        l.mmio_read(u64::from(REG_ID) + 4, &mut beyond, 0);
        assert_eq!(beyond, [0; 4]);
        l.mmio_read(LAPIC_SIZE, &mut beyond, 0);
        assert_eq!(beyond, [0; 4]);
        // Unaligned and narrow writes are dropped.
        l.mmio_write(u64::from(REG_TPR) + 1, &0x40u32.to_le_bytes(), 0);
        l.mmio_write(u64::from(REG_TPR), &[0x40], 0);
        assert_eq!(read(&l, REG_TPR), 0);
    }

    #[test]
    fn destination_info_reflects_registers() {
        let mut l = enabled(2);
        write(&mut l, REG_LDR, 0x0400_0000);
        write(&mut l, REG_DFR, 0x0FFF_FFFF);
        write(&mut l, REG_TPR, 0x20);
        let info = l.destination_info();
        assert_eq!(info.apic_id, 2);
        assert!(!info.x2apic);
        assert_eq!(info.logical_id, 0x0400_0000);
        assert!(info.cluster_model);
        assert!(info.hardware_enabled && info.software_enabled);
        assert_eq!(info.task_priority, 0x20);
    }

    #[test]
    fn apic_base_transitions() {
        let mut l = lapic(0x21);
        let xapic = LAPIC_BASE | APIC_BASE_ENABLE;
        let x2 = xapic | APIC_BASE_X2APIC;
        assert_eq!(
            l.wrmsr(MSR_APIC_BASE, LAPIC_BASE | APIC_BASE_X2APIC, 0),
            Err(LapicError::BadApicBase(LAPIC_BASE | APIC_BASE_X2APIC))
        );
        assert!(l
            .wrmsr(MSR_APIC_BASE, 0xFED0_0000 | APIC_BASE_ENABLE, 0)
            .is_err());
        assert!(
            l.wrmsr(MSR_APIC_BASE, xapic | 1, 0).is_err(),
            "reserved bit"
        );
        to_x2apic(&mut l);
        assert!(l.x2apic_mode());
        assert!(!l.mmio_enabled());
        assert_eq!(l.apic_id(), 0x21);
        assert_eq!(
            l.wrmsr(MSR_APIC_BASE, xapic, 0),
            Err(LapicError::BadApicBase(xapic))
        );
        l.wrmsr(MSR_APIC_BASE, LAPIC_BASE, 0).unwrap();
        assert!(!l.hardware_enabled());
        assert_eq!(
            l.deliver(&InterruptRequest::fixed(0x40, 0x21)),
            Accepted::Ignored
        );
        assert_eq!(
            l.wrmsr(MSR_APIC_BASE, x2, 0),
            Err(LapicError::BadApicBase(x2)),
            "disabled -> x2APIC"
        );
        l.wrmsr(MSR_APIC_BASE, xapic, 0).unwrap();
        assert!(l.mmio_enabled());
        assert_eq!(l.apic_base(), xapic, "BSP flag is not the guest's to set");
        // Without -x the guest cannot enter x2APIC mode.
        let mut plain = Lapic::new(LapicConfig {
            x2apic_allowed: false,
            ..l.config
        });
        assert!(plain.wrmsr(MSR_APIC_BASE, x2, 0).is_err());
        assert!(!plain.x2apic_mode());
    }

    #[test]
    fn x2apic_registers_through_msrs() {
        let mut l = enabled(0x21);
        assert_eq!(l.rdmsr(0x802, 0), Err(LapicError::NotX2apic(0x802)));
        to_x2apic(&mut l);
        let mut data = [0xAAu8; 4];
        l.mmio_read(u64::from(REG_ID), &mut data, 0);
        assert_eq!(data, [0; 4], "xAPIC page is off in x2APIC mode");
        assert_eq!(l.rdmsr(0x802, 0), Ok(0x21));
        assert_eq!(l.rdmsr(0x803, 0), Ok(0x0006_0014));
        assert_eq!(l.rdmsr(0x80D, 0), Ok((2 << 16) | (1 << 1)));
        assert_eq!(l.destination_info().logical_id, (2 << 16) | 2);
        assert_eq!(l.rdmsr(0x80F, 0), Ok(0x1FF), "SVR survives the switch");
        l.wrmsr(0x808, 0x40, 0).unwrap();
        assert_eq!(l.rdmsr(0x808, 0), Ok(0x40));
        assert_eq!(l.wrmsr(0x802, 1, 0), Err(LapicError::ReadOnly(0x802)));
        assert_eq!(l.wrmsr(0x80D, 1, 0), Err(LapicError::ReadOnly(0x80D)));
        assert_eq!(l.wrmsr(0x839, 1, 0), Err(LapicError::ReadOnly(0x839)));
        assert_eq!(l.rdmsr(0x80B, 0), Err(LapicError::WriteOnly(0x80B)));
        assert_eq!(l.rdmsr(0x83F, 0), Err(LapicError::WriteOnly(0x83F)));
        assert_eq!(
            l.rdmsr(0x80E, 0),
            Err(LapicError::Reserved(0x80E)),
            "no DFR"
        );
        assert_eq!(
            l.rdmsr(0x831, 0),
            Err(LapicError::Reserved(0x831)),
            "no ICR high"
        );
        assert_eq!(
            l.wrmsr(0x80B, 1, 0),
            Err(LapicError::NonZeroWrite {
                msr: 0x80B,
                value: 1
            })
        );
        assert_eq!(l.rdmsr(0x10, 0), Err(LapicError::NotLapicMsr(0x10)));
        assert!(Lapic::handles_msr(0x1B) && Lapic::handles_msr(0x6E0) && Lapic::handles_msr(0x8FF));
        assert!(!Lapic::handles_msr(0x900));
    }

    #[test]
    fn x2apic_icr_and_self_ipi() {
        let mut l = enabled(0);
        to_x2apic(&mut l);
        let Ok(LapicEvent::Ipi(req)) = l.wrmsr(0x830, (0x0001_0002u64 << 32) | 0x0000_0850, 0)
        else {
            panic!("no IPI");
        };
        assert_eq!(req.destination, 0x0001_0002);
        assert!(req.wide_destination);
        assert_eq!(req.destination_mode, DestinationMode::Logical);
        assert_eq!(req.vector, 0x50);
        assert_eq!(l.rdmsr(0x830, 0), Ok((0x0001_0002u64 << 32) | 0x850));
        assert_eq!(l.wrmsr(0x83F, 0x61, 0), Ok(LapicEvent::None));
        assert_eq!(l.pending_vector(), Some(0x61));
        l.wrmsr(0x83F, 0x02, 0).unwrap();
        l.wrmsr(0x828, 0, 0).unwrap();
        assert_eq!(l.rdmsr(0x828, 0), Ok(u64::from(ESR_SEND_ILLEGAL_VECTOR)));
        assert_eq!(l.acknowledge(), Some(0x61));
        assert_eq!(l.wrmsr(0x80B, 0, 0), Ok(LapicEvent::None));
        assert_eq!(l.pending_vector(), None);
    }
}
