//! The userspace interrupt controllers wired into a machine (`XHYVE_IRQCHIP=user`, and what
//! Hypervisor.framework needs): one IOAPIC, the 8259 pair, one LAPIC per vCPU and the MSI
//! router, plus the vCPU run states (running, halted, waiting for SIPI) they drive.
//!
//! All models live behind one mutex: a machine has a handful of vCPUs, every critical section
//! is a few register updates, and one lock makes routing (IOAPIC -> LAPICs, LAPIC EOI ->
//! IOAPIC, IPIs) free of lock-ordering problems. Nothing here calls the hypervisor while that
//! lock is held; waking a vCPU (condvar + kick) happens after it is released.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use super::control::Control;
use super::exit::StopReason;
use super::timers::{Timed, TimerWaker};
use crate::devices::bus::{lock, BusDevice};
use crate::devices::irq::{InterruptLine, MsiSender};
use crate::devices::power::PowerEvent;
use crate::hv::{HvError, Vcpu, VcpuKicker};
use crate::intc::clock::Clock;
use crate::intc::hpet::HpetIrqSink;
use crate::intc::ioapic::IoApic;
use crate::intc::lapic::{
    Accepted, Lapic, LapicConfig, LapicEvent, LAPIC_BASE, LAPIC_SIZE, MSR_APIC_BASE,
    MSR_TSC_DEADLINE, MSR_X2APIC_FIRST,
};
use crate::intc::msi::{decode_msi, CpuSet, DestinationInfo, InterruptRequest, Router, MAX_CPUS};
use crate::intc::pic::PicPair;
use crate::intc::pit::Pit;

/// The IOAPIC pin the PIT's IRQ 0 reaches through the MADT's interrupt source override.
const PIT_IOAPIC_PIN: usize = 2;
/// The vCPU whose LINT0 takes the 8259's ExtINT (virtual wire): the bootstrap processor.
const PIC_CPU: usize = 0;
/// Guest TSC rate assumed for TSC-deadline conversion until the vCPU's thread reports the
/// real one (`attach_vcpu`).
const NOMINAL_TSC_HZ: u64 = 1_000_000_000;

/// LAPIC registers whose writes can move the LAPIC timer's deadline.
const TIMER_REGISTERS: [u64; 4] = [0x0F0, 0x320, 0x380, 0x3E0];
/// IA32_APIC_BASE's x2APIC enable bit.
const APIC_BASE_X2APIC: u64 = 1 << 10;

/// Where a vCPU is in its life, as the halt detection and INIT/SIPI see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuRun {
    Running,
    WaitingForSipi,
    Halted { interrupts_on: bool },
}

struct CpuState {
    lapic: Lapic,
    run: CpuRun,
    nmi_pending: bool,
    /// INIT arrived while the vCPU ran: its thread must reset it and wait for SIPI.
    init_pending: bool,
    /// A SIPI's vector, taken by the vCPU thread when it starts.
    start_vector: Option<u8>,
}

struct ChipState {
    ioapic: IoApic,
    pic: PicPair,
    router: Router,
    cpus: Vec<CpuState>,
}

/// Per-vCPU wake-up: the condvar a halted or not-yet-started vCPU sleeps on, and the kicker
/// that makes a running one leave the guest.
struct CpuWake {
    generation: Mutex<u64>,
    changed: Condvar,
    kicker: OnceLock<Arc<dyn VcpuKicker>>,
    /// Something may be waiting for this vCPU (a vector, the PIC, NMI, INIT, SIPI, an open
    /// window request). Set by whoever changes that, before the kick; cleared only by the
    /// vCPU's own entry decision under the chip lock. While clear, entering the guest needs
    /// no lock at all, which is most exits.
    attention: AtomicBool,
}

impl Default for CpuWake {
    fn default() -> Self {
        CpuWake {
            generation: Mutex::new(0),
            changed: Condvar::new(),
            kicker: OnceLock::new(),
            attention: AtomicBool::new(true),
        }
    }
}

/// What the vCPU thread does before its next entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryStep {
    /// Enter the guest (interrupts are injected and the window set as needed).
    Run,
    /// The vCPU must (re)start through INIT/SIPI first: `wait_for_startup`.
    Startup,
}

thread_local! {
    /// The vCPU index of the calling thread, so that an interrupt a vCPU raises for itself
    /// does not signal its own thread (it looks before its next entry anyway).
    static CURRENT_VCPU: Cell<Option<usize>> = const { Cell::new(None) };
}

const NO_CPU: DestinationInfo = DestinationInfo {
    apic_id: u32::MAX,
    x2apic: false,
    logical_id: 0,
    cluster_model: false,
    hardware_enabled: false,
    software_enabled: false,
    task_priority: 0,
};

/// What the vCPU thread must do before its next entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub nmi: bool,
    pub vector: Option<u8>,
    pub window: bool,
}

pub struct UserIrqChip {
    state: Mutex<ChipState>,
    wakes: Vec<CpuWake>,
    clock: Arc<dyn Clock>,
    timer_waker: TimerWaker,
    control: Arc<Control>,
    /// `-x`: every LAPIC starts (and restarts at a machine reset) in x2APIC mode.
    x2apic: bool,
}

impl UserIrqChip {
    /// The controllers of a machine with `vcpus` processors; vCPU 0 runs, the others wait
    /// for INIT/SIPI. `x2apic` (xhyve's `-x`) starts every LAPIC in x2APIC mode.
    pub fn new(
        vcpus: u8,
        x2apic: bool,
        clock: Arc<dyn Clock>,
        timer_waker: TimerWaker,
        control: Arc<Control>,
    ) -> Arc<Self> {
        let cpus = (0..vcpus)
            .map(|id| {
                let mut lapic = Lapic::new(LapicConfig {
                    apic_id: u32::from(id),
                    bootstrap: id == 0,
                    x2apic_allowed: x2apic,
                    tsc_hz: NOMINAL_TSC_HZ,
                });
                if x2apic {
                    let base = lapic.apic_base() | APIC_BASE_X2APIC;
                    if let Err(e) = lapic.wrmsr(MSR_APIC_BASE, base, 0) {
                        log::warn!("LAPIC {id} stays in xAPIC mode: {e}");
                    }
                }
                lapic.set_virtual_wire();
                CpuState {
                    lapic,
                    run: if id == 0 {
                        CpuRun::Running
                    } else {
                        CpuRun::WaitingForSipi
                    },
                    nmi_pending: false,
                    init_pending: false,
                    start_vector: None,
                }
            })
            .collect();
        Arc::new(UserIrqChip {
            state: Mutex::new(ChipState {
                ioapic: IoApic::new(0),
                pic: PicPair::new(),
                router: Router::new(),
                cpus,
            }),
            wakes: (0..vcpus).map(|_| CpuWake::default()).collect(),
            clock,
            timer_waker,
            control,
            x2apic,
        })
    }

    /// A machine reset: the IOAPIC and the 8259 pair as built, every LAPIC at power-on
    /// (x2APIC with `-x`, virtual wire), vCPU 0 running and the others waiting for INIT/SIPI,
    /// nothing pending. The vCPU threads are parked or idle (`Control::begin_reset` keeps
    /// an idle one from acting on this before its own reset): none is woken here.
    pub fn reset(&self) {
        let mut state = lock(&self.state);
        state.ioapic = IoApic::new(0);
        state.pic = PicPair::new();
        state.router = Router::new();
        for (id, cpu) in state.cpus.iter_mut().enumerate() {
            cpu.lapic.power_on_reset();
            if self.x2apic {
                let base = cpu.lapic.apic_base() | APIC_BASE_X2APIC;
                if let Err(e) = cpu.lapic.wrmsr(MSR_APIC_BASE, base, 0) {
                    log::warn!("LAPIC {id} stays in xAPIC mode: {e}");
                }
            }
            cpu.lapic.set_virtual_wire();
            cpu.run = if id == 0 {
                CpuRun::Running
            } else {
                CpuRun::WaitingForSipi
            };
            cpu.nmi_pending = false;
            cpu.init_pending = false;
            cpu.start_vector = None;
        }
        drop(state);
        for wake in &self.wakes {
            // The next entry decision looks at the reset state.
            wake.attention.store(true, Ordering::Release);
        }
        // The LAPIC timers stopped: the timer thread drops their deadlines.
        self.timer_waker.wake();
    }

    /// Called on vCPU `id`'s thread before it runs: records the thread and its kicker, and
    /// returns the kicker `Control` should use (it also wakes a sleeping vCPU).
    pub fn attach_vcpu(
        self: &Arc<Self>,
        id: u8,
        kicker: Arc<dyn VcpuKicker>,
    ) -> Arc<dyn VcpuKicker> {
        let index = usize::from(id);
        CURRENT_VCPU.with(|c| c.set(Some(index)));
        if let Some(wake) = self.wakes.get(index) {
            let _ = wake.kicker.set(kicker);
        }
        Arc::new(ChipKicker {
            chip: self.clone(),
            cpu: index,
        })
    }

    pub fn is_lapic_address(addr: u64) -> bool {
        (LAPIC_BASE..LAPIC_BASE + LAPIC_SIZE).contains(&addr)
    }

    /// Wakes and kicks every vCPU in `set` except the calling one.
    fn wake_cpus(&self, set: CpuSet) {
        if set.is_empty() {
            return;
        }
        let current = CURRENT_VCPU.with(Cell::get);
        for cpu in set.iter() {
            if Some(cpu) == current {
                self.note_attention(cpu);
                continue;
            }
            self.wake_cpu(cpu);
        }
    }

    fn note_attention(&self, cpu: usize) {
        if let Some(wake) = self.wakes.get(cpu) {
            wake.attention.store(true, Ordering::Release);
        }
    }

    fn wake_cpu(&self, cpu: usize) {
        let Some(wake) = self.wakes.get(cpu) else {
            return;
        };
        // Before the kick: the kicked vCPU must see it on its way back in.
        wake.attention.store(true, Ordering::Release);
        *lock(&wake.generation) += 1;
        wake.changed.notify_all();
        if let Some(kicker) = wake.kicker.get() {
            kicker.kick();
        }
    }

    // ---- the vCPU thread ----

    /// Tells vCPU `id`'s LAPIC the guest TSC's rate and its value now, for TSC-deadline.
    pub fn set_guest_tsc(&self, id: u8, tsc_hz: u64, tsc_now: u64) {
        let now = self.clock.now_ns();
        if let Some(cpu) = lock(&self.state).cpus.get_mut(usize::from(id)) {
            cpu.lapic.set_tsc_rate(tsc_hz);
            cpu.lapic.set_tsc_reference(tsc_now, now);
        }
    }

    /// RDMSR of a LAPIC MSR (`Lapic::handles_msr`) on vCPU `id`; `None` raises #GP.
    pub fn msr_read(&self, id: u8, msr: u32) -> Option<u64> {
        let now = self.clock.now_ns();
        let state = lock(&self.state);
        let cpu = state.cpus.get(usize::from(id))?;
        cpu.lapic
            .rdmsr(msr, now)
            .map_err(|e| log::trace!("vCPU {id} RDMSR {msr:#x}: {e}"))
            .ok()
    }

    /// WRMSR of a LAPIC MSR on vCPU `id`, routed as an MMIO write is; `false` raises #GP.
    pub fn msr_write(&self, id: u8, msr: u32, value: u64) -> bool {
        let register = u64::from(msr.wrapping_sub(MSR_X2APIC_FIRST)) << 4;
        let timer =
            msr == MSR_TSC_DEADLINE || msr == MSR_APIC_BASE || TIMER_REGISTERS.contains(&register);
        self.write_lapic(id, timer, |lapic, now| {
            lapic
                .wrmsr(msr, value, now)
                .map_err(|e| log::trace!("vCPU {id} WRMSR {msr:#x} <- {value:#x}: {e}"))
                .ok()
        })
    }

    /// The guest read vCPU `id`'s LAPIC page.
    pub fn lapic_read(&self, id: u8, addr: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let state = lock(&self.state);
        match state.cpus.get(usize::from(id)) {
            Some(cpu) => cpu.lapic.mmio_read(addr - LAPIC_BASE, data, now),
            None => data.fill(0xff),
        }
    }

    /// The guest wrote vCPU `id`'s LAPIC page: EOIs reach the IOAPIC, IPIs their targets.
    pub fn lapic_write(&self, id: u8, addr: u64, data: &[u8]) {
        let offset = addr - LAPIC_BASE;
        let timer = TIMER_REGISTERS.contains(&offset);
        self.write_lapic(id, timer, |lapic, now| {
            Some(lapic.mmio_write(offset, data, now))
        });
    }

    /// One write to vCPU `id`'s LAPIC (page or MSR) by `write`, which returns the event to
    /// route or `None` to refuse it; `timer` says the write may have re-armed its timer.
    /// Returns whether the write was taken.
    fn write_lapic(
        &self,
        id: u8,
        timer: bool,
        write: impl FnOnce(&mut Lapic, u64) -> Option<LapicEvent>,
    ) -> bool {
        let index = usize::from(id);
        let now = self.clock.now_ns();
        let mut kicks = CpuSet::EMPTY;
        {
            let mut state = lock(&self.state);
            let ChipState {
                ioapic,
                router,
                cpus,
                ..
            } = &mut *state;
            let Some(cpu) = cpus.get_mut(index) else {
                return false;
            };
            let Some(event) = write(&mut cpu.lapic, now) else {
                return false;
            };
            apply_lapic_event(event, index, ioapic, router, cpus, &mut kicks);
            // An EOI, a lower TPR or LINT0 opened to the PIC can uncover an interrupt that
            // was already waiting here.
            if has_work(&state, index) {
                kicks.insert(index);
            }
        }
        if timer {
            self.timer_waker.wake();
        }
        self.wake_cpus(kicks);
        true
    }

    /// Decides what vCPU `id` takes on its next entry; `ready` is whether the guest can
    /// take an external interrupt now. Acknowledges what it returns.
    pub fn next_entry(&self, id: u8, ready: bool) -> Entry {
        next_entry_locked(&mut lock(&self.state), usize::from(id), ready)
    }

    /// Injects what `next_entry` decides and opens an interrupt window for the rest, or says
    /// the vCPU must start through INIT/SIPI first. Takes no lock when nothing changed for
    /// this vCPU since its last entry.
    pub fn prepare_entry(&self, vcpu: &mut dyn Vcpu) -> Result<EntryStep, HvError> {
        let id = vcpu.id();
        let Some(wake) = self.wakes.get(usize::from(id)) else {
            return Ok(EntryStep::Run);
        };
        if !wake.attention.load(Ordering::Acquire) {
            return Ok(EntryStep::Run);
        }
        let ready = vcpu.ready_for_interrupt();
        let Some(entry) = self.entry_decision(id, ready) else {
            return Ok(EntryStep::Startup);
        };
        if entry.nmi {
            vcpu.inject_nmi()?;
        }
        if let Some(vector) = entry.vector {
            vcpu.inject_interrupt(vector)?;
        }
        vcpu.request_interrupt_window(entry.window);
        Ok(EntryStep::Run)
    }

    /// `next_entry` unless the vCPU needs INIT/SIPI first (`None`), under one lock; clears the
    /// vCPU's attention when nothing is left for it.
    fn entry_decision(&self, id: u8, ready: bool) -> Option<Entry> {
        let index = usize::from(id);
        let mut state = lock(&self.state);
        let cpu = state.cpus.get(index)?;
        if cpu.init_pending || cpu.start_vector.is_some() || cpu.run == CpuRun::WaitingForSipi {
            return None;
        }
        let entry = next_entry_locked(&mut state, index, ready);
        if !entry.window {
            if let Some(wake) = self.wakes.get(index) {
                wake.attention.store(false, Ordering::Release);
            }
        }
        Some(entry)
    }

    /// Whether vCPU `id` must (re)start through INIT/SIPI before it may run.
    pub fn needs_startup(&self, id: u8) -> bool {
        let state = lock(&self.state);
        state.cpus.get(usize::from(id)).is_some_and(|c| {
            c.init_pending || c.start_vector.is_some() || c.run == CpuRun::WaitingForSipi
        })
    }

    /// Sleeps until vCPU `id` receives a SIPI; returns its vector, or `None` when the
    /// machine stops first.
    pub fn wait_for_startup(&self, id: u8) -> Option<u8> {
        let index = usize::from(id);
        let wake = self.wakes.get(index)?;
        let mut generation = lock(&wake.generation);
        loop {
            // A machine reset wants the thread in its park.
            if self.control.is_stopping() || self.control.resetting() {
                return None;
            }
            {
                let mut state = lock(&self.state);
                let cpu = state.cpus.get_mut(index)?;
                cpu.init_pending = false;
                if let Some(vector) = cpu.start_vector.take() {
                    cpu.run = CpuRun::Running;
                    return Some(vector);
                }
                cpu.run = CpuRun::WaitingForSipi;
                self.stop_if_all_halted(&state);
            }
            if self.control.is_stopping() {
                return None;
            }
            // Out of the guest while it waits: a machine pause need not wait for a SIPI.
            let _idle = self.control.idle();
            generation = match wake.changed.wait(generation) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    /// HLT: sleeps until something can wake vCPU `id` (an interrupt it can take, NMI, INIT,
    /// SIPI) or the machine stops. When every started vCPU is halted with interrupts off
    /// the machine stops with xhyve's "halt".
    pub fn halt(&self, id: u8, interrupts_on: bool) {
        let index = usize::from(id);
        let Some(wake) = self.wakes.get(index) else {
            return;
        };
        let mut generation = lock(&wake.generation);
        loop {
            // A machine reset wants the thread in its park.
            if self.control.is_stopping() || self.control.resetting() {
                return;
            }
            {
                let mut state = lock(&self.state);
                let ChipState { pic, cpus, .. } = &mut *state;
                let Some(cpu) = cpus.get_mut(index) else {
                    return;
                };
                let pic_wakes =
                    index == PIC_CPU && cpu.lapic.accepts_pic_interrupts() && pic.intr_asserted();
                let woken = cpu.nmi_pending
                    || cpu.init_pending
                    || cpu.start_vector.is_some()
                    || (interrupts_on && (pic_wakes || cpu.lapic.pending_vector().is_some()));
                if woken {
                    if cpu.run != CpuRun::WaitingForSipi {
                        cpu.run = CpuRun::Running;
                    }
                    return;
                }
                cpu.run = CpuRun::Halted { interrupts_on };
                if !interrupts_on {
                    self.stop_if_all_halted(&state);
                }
            }
            if self.control.is_stopping() {
                return;
            }
            // Out of the guest while halted: a machine pause need not wait for a wake-up.
            let _idle = self.control.idle();
            generation = match wake.changed.wait(generation) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    fn stop_if_all_halted(&self, state: &ChipState) {
        let halted_off = CpuRun::Halted {
            interrupts_on: false,
        };
        let all_stopped = state
            .cpus
            .iter()
            .all(|c| c.run == CpuRun::WaitingForSipi || c.run == halted_off);
        if all_stopped && state.cpus.iter().any(|c| c.run == halted_off) {
            self.control.stop(StopReason::Guest(PowerEvent::Halt));
            // The vCPUs sleep on their condvars: wake them to see the stop.
            for cpu in 0..self.wakes.len() {
                if let Some(wake) = self.wakes.get(cpu) {
                    wake.changed.notify_all();
                    if let Some(kicker) = wake.kicker.get() {
                        kicker.kick();
                    }
                }
            }
        }
    }

    // ---- interrupt sources ----

    /// Drives GSI `gsi`: the IOAPIC pin, and the PIC line for ISA IRQs (GSI 2 is IRQ 0,
    /// as the MADT's override says).
    pub fn set_gsi(&self, gsi: u32, high: bool) {
        let mut kicks = CpuSet::EMPTY;
        {
            let mut state = lock(&self.state);
            let pic_irq = match gsi {
                2 => Some(0),
                g if g < 16 => Some(g as u8),
                _ => None,
            };
            if let Some(irq) = pic_irq {
                state.pic.set_irq_level(irq, high);
            }
            let ChipState {
                ioapic,
                router,
                cpus,
                ..
            } = &mut *state;
            ioapic.set_pin(gsi as usize, high, &mut |request: InterruptRequest| {
                deliver(cpus, router, &request, None, &mut kicks)
            });
            note_pic(&state, &mut kicks);
        }
        self.wake_cpus(kicks);
    }

    /// An edge on ISA IRQ 0 (the PIT): PIC IRQ 0 and IOAPIC pin 2.
    pub fn pulse_timer_irq(&self) {
        let mut kicks = CpuSet::EMPTY;
        {
            let mut state = lock(&self.state);
            state.pic.pulse_irq(0);
            let ChipState {
                ioapic,
                router,
                cpus,
                ..
            } = &mut *state;
            ioapic.pulse_pin(PIT_IOAPIC_PIN, &mut |request: InterruptRequest| {
                deliver(cpus, router, &request, None, &mut kicks)
            });
            note_pic(&state, &mut kicks);
        }
        self.wake_cpus(kicks);
    }

    pub fn send_msi(&self, address: u64, data: u32) {
        let Ok(request) = decode_msi(address, data) else {
            log::trace!("dropping malformed MSI {address:#x}/{data:#x}");
            return;
        };
        let mut kicks = CpuSet::EMPTY;
        {
            let mut state = lock(&self.state);
            let ChipState { router, cpus, .. } = &mut *state;
            deliver(cpus, router, &request, None, &mut kicks);
        }
        self.wake_cpus(kicks);
    }

    fn ioapic_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.state).ioapic.mmio_read(offset, data);
    }

    fn ioapic_write(&self, offset: u64, data: &[u8]) {
        let mut kicks = CpuSet::EMPTY;
        {
            let mut state = lock(&self.state);
            let ChipState {
                ioapic,
                router,
                cpus,
                ..
            } = &mut *state;
            ioapic.mmio_write(offset, data, &mut |request: InterruptRequest| {
                deliver(cpus, router, &request, None, &mut kicks)
            });
        }
        self.wake_cpus(kicks);
    }

    fn pic_read(&self, port: u16) -> u8 {
        lock(&self.state).pic.read_port(port)
    }

    fn pic_write(&self, port: u16, value: u8) {
        let mut kicks = CpuSet::EMPTY;
        {
            let mut state = lock(&self.state);
            state.pic.write_port(port, value);
            note_pic(&state, &mut kicks);
        }
        self.wake_cpus(kicks);
    }

    // ---- LAPIC timers ----

    fn lapic_timer_deadline(&self) -> Option<u64> {
        let state = lock(&self.state);
        state
            .cpus
            .iter()
            .filter_map(|c| c.lapic.next_deadline_ns())
            .min()
    }

    fn tick_lapic_timers(&self, now_ns: u64) {
        let mut kicks = CpuSet::EMPTY;
        {
            let mut state = lock(&self.state);
            for (index, cpu) in state.cpus.iter_mut().enumerate() {
                if cpu.lapic.next_deadline_ns().is_some_and(|d| d <= now_ns)
                    && cpu.lapic.tick(now_ns)
                {
                    kicks.insert(index);
                }
            }
        }
        self.wake_cpus(kicks);
    }
}

fn next_entry_locked(state: &mut ChipState, index: usize, ready: bool) -> Entry {
    let ChipState { pic, cpus, .. } = state;
    let Some(cpu) = cpus.get_mut(index) else {
        return Entry {
            nmi: false,
            vector: None,
            window: false,
        };
    };
    let nmi = std::mem::take(&mut cpu.nmi_pending);
    let pic_wired = index == PIC_CPU && cpu.lapic.accepts_pic_interrupts();
    let mut vector = None;
    if ready {
        vector = if pic_wired && pic.intr_asserted() {
            Some(pic.intack())
        } else {
            cpu.lapic.acknowledge()
        };
    }
    let window = (pic_wired && pic.intr_asserted()) || cpu.lapic.pending_vector().is_some();
    Entry {
        nmi,
        vector,
        window,
    }
}

/// Whether vCPU `index` has an interrupt it could take.
fn has_work(state: &ChipState, index: usize) -> bool {
    state.cpus.get(index).is_some_and(|cpu| {
        cpu.lapic.pending_vector().is_some()
            || (index == PIC_CPU && cpu.lapic.accepts_pic_interrupts() && state.pic.intr_asserted())
    })
}

/// Routes what a LAPIC write of vCPU `index` sends: an IPI, or an EOI to the IOAPIC.
fn apply_lapic_event(
    event: LapicEvent,
    index: usize,
    ioapic: &mut IoApic,
    router: &mut Router,
    cpus: &mut [CpuState],
    kicks: &mut CpuSet,
) {
    match event {
        LapicEvent::None => {}
        LapicEvent::Ipi(request) => deliver(cpus, router, &request, Some(index), kicks),
        LapicEvent::EoiBroadcast(vector) => {
            ioapic.end_of_interrupt(vector, &mut |request: InterruptRequest| {
                deliver(cpus, router, &request, None, kicks)
            });
        }
    }
}

/// Marks the PIC's CPU for a wake-up when the 8259 is asking for service.
fn note_pic(state: &ChipState, kicks: &mut CpuSet) {
    if state.pic.intr_asserted()
        && state
            .cpus
            .get(PIC_CPU)
            .is_some_and(|c| c.lapic.accepts_pic_interrupts())
    {
        kicks.insert(PIC_CPU);
    }
}

/// Hands `request` to the LAPICs it names and records which vCPUs need waking.
fn deliver(
    cpus: &mut [CpuState],
    router: &mut Router,
    request: &InterruptRequest,
    sender: Option<usize>,
    kicks: &mut CpuSet,
) {
    let count = cpus.len().min(MAX_CPUS);
    let mut infos = [NO_CPU; MAX_CPUS];
    for (info, cpu) in infos.iter_mut().zip(cpus.iter()) {
        *info = cpu.lapic.destination_info();
    }
    let targets = router.route(request, &infos[..count], sender);
    for index in targets.iter() {
        let Some(cpu) = cpus.get_mut(index) else {
            continue;
        };
        match cpu.lapic.deliver(request) {
            Accepted::Ignored | Accepted::Smi => continue,
            Accepted::Interrupt | Accepted::ExtInt => {}
            Accepted::Nmi => cpu.nmi_pending = true,
            Accepted::Init => {
                cpu.start_vector = None;
                if cpu.run != CpuRun::WaitingForSipi {
                    cpu.init_pending = true;
                    cpu.run = CpuRun::WaitingForSipi;
                }
            }
            Accepted::StartUp(vector) => {
                // Only a processor waiting since INIT starts; later SIPIs are ignored.
                if cpu.run != CpuRun::WaitingForSipi || cpu.start_vector.is_some() {
                    continue;
                }
                cpu.start_vector = Some(vector);
                cpu.run = CpuRun::Running;
            }
        }
        kicks.insert(index);
    }
}

/// Control's kicker for a vCPU in user mode: also wakes it from a halt or SIPI wait.
struct ChipKicker {
    chip: Arc<UserIrqChip>,
    cpu: usize,
}

impl VcpuKicker for ChipKicker {
    fn kick(&self) {
        self.chip.wake_cpu(self.cpu);
    }
}

/// A GSI of the user chip, for devices.
pub struct UserInterruptLine {
    chip: Arc<UserIrqChip>,
    gsi: u32,
}

impl UserInterruptLine {
    pub fn new(chip: Arc<UserIrqChip>, gsi: u32) -> Arc<Self> {
        Arc::new(UserInterruptLine { chip, gsi })
    }
}

impl InterruptLine for UserInterruptLine {
    fn set_level(&self, high: bool) {
        self.chip.set_gsi(self.gsi, high);
    }

    fn gsi(&self) -> u32 {
        self.gsi
    }
}

pub struct UserMsiSender(pub Arc<UserIrqChip>);

impl MsiSender for UserMsiSender {
    fn send_msi(&self, address: u64, data: u32) {
        self.0.send_msi(address, data);
    }
}

/// The HPET's pins on the user chip.
pub struct UserPinSink(pub Arc<UserIrqChip>);

impl HpetIrqSink for UserPinSink {
    fn set_pin_level(&self, pin: u32, high: bool) {
        self.0.set_gsi(pin, high);
    }
}

/// The IOAPIC's MMIO window.
pub struct IoApicMmio(pub Arc<UserIrqChip>);

impl BusDevice for IoApicMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.0.ioapic_read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.0.ioapic_write(offset, data);
    }
}

/// The 8259 pair's ports (0x20, 0xA0, ELCR 0x4D0, two each).
pub struct PicPorts(pub Arc<UserIrqChip>);

impl BusDevice for PicPorts {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match u16::try_from(base + offset + i as u64) {
                Ok(port) => self.0.pic_read(port),
                Err(_) => 0xff,
            };
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            if let Ok(port) = u16::try_from(base + offset + i as u64) {
                self.0.pic_write(port, byte);
            }
        }
    }
}

/// The PIT on the timer thread: channel 0's edges become ISA IRQ 0.
pub struct PitDevice {
    pit: Pit,
    chip: Arc<UserIrqChip>,
}

impl PitDevice {
    pub fn new(pit: Pit, chip: Arc<UserIrqChip>) -> Self {
        PitDevice { pit, chip }
    }
}

impl crate::devices::PowerOnReset for PitDevice {
    fn power_on_reset(&mut self) {
        self.pit.power_on_reset();
    }
}

impl BusDevice for PitDevice {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.pit.read(base, offset, data);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.pit.write(base, offset, data);
    }
}

impl Timed for PitDevice {
    fn next_deadline_ns(&self) -> Option<u64> {
        self.pit.next_deadline_ns()
    }

    fn tick(&mut self, now_ns: u64) {
        // Edges the timer thread was late for are coalesced, as a PC's PIC would.
        if self.pit.tick(now_ns) > 0 {
            self.chip.pulse_timer_irq();
        }
    }
}

/// Every LAPIC timer, as one device of the timer thread.
pub struct LapicTimers(pub Arc<UserIrqChip>);

impl Timed for LapicTimers {
    fn next_deadline_ns(&self) -> Option<u64> {
        self.0.lapic_timer_deadline()
    }

    fn tick(&mut self, now_ns: u64) {
        self.0.tick_lapic_timers(now_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intc::clock::ManualClock;
    use crate::vmm::timers::TimerService;

    fn chip(vcpus: u8) -> (Arc<UserIrqChip>, Arc<ManualClock>, Arc<Control>) {
        let clock = Arc::new(ManualClock::new(0));
        let service = TimerService::new(clock.clone());
        let (control, _woken) = Control::new(vcpus);
        let chip = UserIrqChip::new(
            vcpus,
            false,
            clock.clone(),
            service.waker(),
            control.clone(),
        );
        (chip, clock, control)
    }

    fn lapic_write32(chip: &UserIrqChip, id: u8, reg: u64, value: u32) {
        chip.lapic_write(id, LAPIC_BASE + reg, &value.to_le_bytes());
    }

    fn lapic_read32(chip: &UserIrqChip, id: u8, reg: u64) -> u32 {
        let mut data = [0u8; 4];
        chip.lapic_read(id, LAPIC_BASE + reg, &mut data);
        u32::from_le_bytes(data)
    }

    fn ioapic_write32(chip: &UserIrqChip, index: u32, value: u32) {
        chip.ioapic_write(0, &index.to_le_bytes());
        chip.ioapic_write(0x10, &value.to_le_bytes());
    }

    fn ioapic_read32(chip: &UserIrqChip, index: u32) -> u32 {
        chip.ioapic_write(0, &index.to_le_bytes());
        let mut data = [0u8; 4];
        chip.ioapic_read(0x10, &mut data);
        u32::from_le_bytes(data)
    }

    /// Routes `pin` to `vector` on APIC 0; `level` selects level triggering.
    fn route_pin(chip: &UserIrqChip, pin: u32, vector: u8, level: bool) {
        lapic_write32(chip, 0, 0xF0, 0x1FF);
        ioapic_write32(chip, 0x10 + 2 * pin + 1, 0);
        ioapic_write32(
            chip,
            0x10 + 2 * pin,
            u32::from(vector) | if level { 1 << 15 } else { 0 },
        );
    }

    #[test]
    fn an_ioapic_pin_reaches_the_lapic_and_is_injected_when_ready() {
        let (chip, _clock, _control) = chip(1);
        route_pin(&chip, 4, 0x34, false);
        chip.set_gsi(4, true);
        chip.set_gsi(4, false);
        let not_ready = chip.next_entry(0, false);
        assert_eq!(not_ready.vector, None);
        assert!(
            not_ready.window,
            "asks for a window while the guest cannot take it"
        );
        let entry = chip.next_entry(0, true);
        assert_eq!(entry.vector, Some(0x34));
        assert!(!entry.window);
        // In service now: ISR bit set, IRR clear.
        assert_ne!(lapic_read32(&chip, 0, 0x100 + 0x10) & (1 << (0x34 - 32)), 0);
    }

    #[test]
    fn a_machine_reset_puts_the_controllers_at_power_on() {
        let (chip, _clock, _control) = chip(2);
        let fresh_rte = ioapic_read32(&chip, 0x10 + 8);
        let fresh_svr = lapic_read32(&chip, 0, 0xF0);
        let fresh_lint0 = lapic_read32(&chip, 0, 0x350);
        route_pin(&chip, 4, 0x34, true);
        chip.set_gsi(4, true);
        assert_eq!(chip.next_entry(0, true).vector, Some(0x34));
        lapic_write32(&chip, 0, 0x80, 0x20); // TPR
                                             // vCPU 1 was started by SIPI.
        lock(&chip.state).cpus[1].run = CpuRun::Running;
        assert!(!chip.needs_startup(1));

        chip.reset();
        assert_eq!(
            ioapic_read32(&chip, 0x10 + 8),
            fresh_rte,
            "pin 4 masked again"
        );
        assert_eq!(
            lapic_read32(&chip, 0, 0xF0),
            fresh_svr,
            "LAPIC software-disabled"
        );
        assert_eq!(lapic_read32(&chip, 0, 0x80), 0, "TPR");
        assert_eq!(lapic_read32(&chip, 0, 0x350), fresh_lint0, "virtual wire");
        assert_eq!(
            lapic_read32(&chip, 0, 0x100 + 0x10),
            0,
            "nothing in service"
        );
        assert!(!chip.needs_startup(0), "the BSP runs");
        assert!(chip.needs_startup(1), "the AP waits for INIT/SIPI again");
        assert_eq!(chip.next_entry(0, true).vector, None);
    }

    #[test]
    fn a_level_pin_holds_remote_irr_and_reasserts_after_eoi() {
        let (chip, _clock, _control) = chip(1);
        route_pin(&chip, 9, 0x39, true);
        chip.set_gsi(9, true);
        assert_ne!(ioapic_read32(&chip, 0x10 + 18) & (1 << 14), 0, "remote IRR");
        assert_eq!(chip.next_entry(0, true).vector, Some(0x39));
        lapic_write32(&chip, 0, 0xB0, 0); // EOI while the line is still high
        assert_eq!(chip.next_entry(0, true).vector, Some(0x39), "re-asserted");
        chip.set_gsi(9, false);
        lapic_write32(&chip, 0, 0xB0, 0);
        assert_eq!(ioapic_read32(&chip, 0x10 + 18) & (1 << 14), 0);
        assert_eq!(chip.next_entry(0, true).vector, None);
    }

    #[test]
    fn a_masked_pin_delivers_nothing() {
        let (chip, _clock, _control) = chip(1);
        lapic_write32(&chip, 0, 0xF0, 0x1FF);
        ioapic_write32(&chip, 0x10 + 8, 0x10000 | 0x34);
        chip.set_gsi(4, true);
        let entry = chip.next_entry(0, true);
        assert_eq!(entry.vector, None);
        assert!(!entry.window);
    }

    #[test]
    fn the_pic_delivers_through_lint0_on_the_bsp() {
        let (chip, _clock, _control) = chip(2);
        // ICW1-4: vectors 0x08/0x70, cascade on IR2, 8086 mode; unmask IRQ 0 only.
        for (port, value) in [(0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01)] {
            chip.pic_write(port, value);
        }
        chip.pic_write(0x21, 0xFE);
        chip.pulse_timer_irq();
        assert_eq!(
            chip.next_entry(1, true).vector,
            None,
            "only the BSP is wired"
        );
        assert_eq!(chip.next_entry(0, true).vector, Some(0x08));
        chip.pic_write(0x20, 0x0B); // OCW3: read ISR
        assert_eq!(chip.pic_read(0x20), 1);
    }

    #[test]
    fn init_and_sipi_start_an_application_processor() {
        let (chip, _clock, _control) = chip(2);
        assert!(!chip.needs_startup(0));
        assert!(chip.needs_startup(1));
        lapic_write32(&chip, 0, 0x310, 1 << 24);
        lapic_write32(&chip, 0, 0x300, 0x4500); // INIT, assert
        lapic_write32(&chip, 0, 0x300, 0x4608); // SIPI vector 8
        assert_eq!(chip.wait_for_startup(1), Some(8));
        assert!(!chip.needs_startup(1));
    }

    #[test]
    fn halting_every_cpu_with_interrupts_off_stops_the_machine() {
        let (chip, _clock, control) = chip(2);
        chip.halt(0, false);
        assert_eq!(
            control.stop_reason(),
            Some(StopReason::Guest(PowerEvent::Halt))
        );
    }

    #[test]
    fn a_halted_cpu_wakes_for_an_interrupt() {
        let (chip, _clock, control) = chip(1);
        route_pin(&chip, 4, 0x34, false);
        let sleeper = {
            let chip = chip.clone();
            std::thread::spawn(move || chip.halt(0, true))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!sleeper.is_finished(), "halted with nothing pending");
        chip.set_gsi(4, true);
        sleeper.join().unwrap();
        assert!(control.stop_reason().is_none());
    }

    #[test]
    fn the_lapic_timer_fires_through_the_timer_device() {
        let (chip, clock, _control) = chip(1);
        lapic_write32(&chip, 0, 0xF0, 0x1FF);
        lapic_write32(&chip, 0, 0x3E0, 0xB); // divide by 1
        lapic_write32(&chip, 0, 0x320, 0x40); // one-shot, vector 0x40
        lapic_write32(&chip, 0, 0x380, 1000); // 10 us at 100 MHz
        let mut timers = LapicTimers(chip.clone());
        assert_eq!(timers.next_deadline_ns(), Some(10_000));
        clock.set(10_000);
        timers.tick(10_000);
        assert_eq!(chip.next_entry(0, true).vector, Some(0x40));
        assert_eq!(timers.next_deadline_ns(), None);
    }

    fn attention(chip: &UserIrqChip, id: usize) -> bool {
        chip.wakes[id].attention.load(Ordering::Acquire)
    }

    #[test]
    fn a_quiet_vcpu_enters_without_the_lock_until_something_arrives() {
        let (chip, _clock, _control) = chip(2);
        route_pin(&chip, 4, 0x34, false);
        assert_eq!(chip.entry_decision(1, true), None, "vCPU 1 waits for SIPI");
        assert!(attention(&chip, 1), "and keeps looking until it starts");
        assert!(chip.entry_decision(0, true).is_some());
        assert!(
            !attention(&chip, 0),
            "nothing pending: the next entry skips the lock"
        );

        chip.set_gsi(4, true);
        assert!(attention(&chip, 0), "an interrupt from another thread");
        let entry = chip.entry_decision(0, true).unwrap();
        assert_eq!(entry.vector, Some(0x34));
        assert!(!attention(&chip, 0));

        lapic_write32(&chip, 0, 0xB0, 0); // EOI 0x34
        assert!(!attention(&chip, 0), "an EOI that uncovers nothing");
        // 0x50 in service holds 0x44 back; the vCPU's own EOI uncovers it.
        chip.send_msi(0xFEE0_0000, 0x50);
        chip.send_msi(0xFEE0_0000, 0x44);
        let entry = chip.entry_decision(0, true).unwrap();
        assert_eq!((entry.vector, entry.window), (Some(0x50), false));
        assert!(!attention(&chip, 0));
        CURRENT_VCPU.with(|c| c.set(Some(0)));
        lapic_write32(&chip, 0, 0xB0, 0); // EOI 0x50, on vCPU 0's own thread
        CURRENT_VCPU.with(|c| c.set(None));
        assert!(attention(&chip, 0), "the EOI uncovered 0x44");
        assert_eq!(chip.entry_decision(0, true).unwrap().vector, Some(0x44));
    }

    #[test]
    fn x2apic_msrs_and_the_tsc_deadline_timer_reach_the_model() {
        let clock = Arc::new(ManualClock::new(0));
        let service = TimerService::new(clock.clone());
        let (control, _woken) = Control::new(2);
        let chip = UserIrqChip::new(2, true, clock.clone(), service.waker(), control);
        assert_eq!(chip.msr_read(1, 0x802), Some(1), "x2APIC ID");
        assert_eq!(chip.msr_read(0, 0x803).map(|v| v & 0xFF), Some(0x14));
        assert_ne!(
            chip.msr_read(0, MSR_APIC_BASE).unwrap() & APIC_BASE_X2APIC,
            0
        );
        assert!(!chip.msr_write(0, 0x802, 5), "the ID is read-only: #GP");

        chip.set_guest_tsc(0, 2_000_000_000, 1_000); // 2 GHz, TSC 1000 at time 0
        assert!(chip.msr_write(0, 0x80F, 0x1FF));
        assert!(chip.msr_write(0, 0x832, (2 << 17) | 0x61)); // TSC-deadline mode
        assert!(chip.msr_write(0, MSR_TSC_DEADLINE, 1_000 + 20_000)); // 10 us ahead
        let mut timers = LapicTimers(chip.clone());
        assert_eq!(timers.next_deadline_ns(), Some(10_000));
        clock.set(10_000);
        timers.tick(10_000);
        let irr = chip.msr_read(0, 0x820 + 0x61 / 32).unwrap();
        assert_ne!(irr & (1 << (0x61 % 32)), 0, "vector 0x61 pending in IRR");

        let (xapic, _clock, _control) = super::tests::chip(1);
        assert_eq!(
            xapic.msr_read(0, 0x802),
            None,
            "no x2APIC MSRs in xAPIC mode"
        );
        assert!(!xapic.msr_write(0, MSR_APIC_BASE, 0xFEE0_0000 | (3 << 10)));
    }

    #[test]
    fn an_msi_reaches_the_apic_it_names() {
        let (chip, _clock, _control) = chip(2);
        lapic_write32(&chip, 1, 0xF0, 0x1FF);
        chip.send_msi(0xFEE0_1000, 0x45);
        assert_eq!(chip.next_entry(0, true).vector, None);
        assert_eq!(chip.next_entry(1, true).vector, Some(0x45));
    }
}
