//! One vCPU thread: run the guest, dispatch each exit to a bus, and stop when told.
//!
//! This is the hot path: no allocation, no lock held across `run()`, no logging above trace.
//! Only the fatal paths (which end the VM) allocate, to build their report.

use std::sync::Arc;

use super::control::Control;
use super::diagnostics;
use super::exit::StopReason;
use super::user_irqchip::{EntryStep, UserIrqChip};
use crate::arch::x86_64::boot::BootSetup;
use crate::arch::x86_64::emulate::complete::COMPLETIONS;
use crate::arch::x86_64::regs::{SegmentRegister, RFLAGS_IF};
use crate::devices::bus::Bus;
use crate::devices::power::PowerEvent;
use crate::hv::{SystemEvent, Vcpu, VmExit, INTERNAL_ERROR_EMULATION};
use crate::memory::guest_ram::RamView;
use crate::memory::GuestMemory;

/// What every vCPU thread shares.
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub control: Arc<Control>,
    pub memory: GuestMemory,
    /// `-e`: an unhandled port stops the machine.
    pub strict_io: bool,
    /// `-w`: unknown MSRs read as zero and ignore writes instead of raising #GP.
    pub ignore_unknown_msrs: bool,
    /// `-p`: the host CPU this vCPU is pinned to, per vCPU id.
    pub pins: Vec<Option<u32>>,
    /// The VMM's interrupt controllers (`XHYVE_IRQCHIP=user`); `None` with the hypervisor's.
    pub user_irqchip: Option<Arc<UserIrqChip>>,
    /// The boot processor's entry registers, as the loader left them (a machine reset
    /// loads the guest again and puts them back). Read only at a reset.
    pub boot: Arc<std::sync::Mutex<BootSetup>>,
    /// `-x`: LAPICs start in x2APIC mode (the boot MSRs say so).
    pub x2apic: bool,
}

/// How often `XHYVE_LOG=xhyve::stats=trace` samples the hypervisor's emulation counter.
const STATS_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// A port access nobody claims.
#[derive(Debug, Clone, Copy)]
enum Unhandled {
    PortRead { port: u16, size: usize },
    PortWrite { port: u16, size: usize },
}

/// Runs `vcpu` until the machine stops. Every way out records a stop reason.
pub fn run(mut vcpu: Box<dyn Vcpu>, ctx: Arc<VcpuContext>) {
    let id = vcpu.id();
    if let Err(e) = pin_to_host_cpu(&ctx, id) {
        ctx.control.stop(StopReason::Fatal(e));
        return;
    }
    match vcpu.kicker() {
        Ok(kicker) => {
            let kicker = match &ctx.user_irqchip {
                Some(chip) => {
                    // TSC-deadline counts in guest TSC ticks; the model needs their rate.
                    match vcpu.guest_tsc() {
                        Ok((hz, now)) => chip.set_guest_tsc(id, hz, now),
                        Err(e) => log::debug!("vCPU {id}: TSC-deadline uses a nominal rate: {e}"),
                    }
                    chip.attach_vcpu(id, kicker)
                }
                None => kicker,
            };
            ctx.control.register_kicker(id, kicker)
        }
        Err(e) => {
            ctx.control
                .stop(StopReason::Fatal(format!("vCPU {id}: {e}")));
            return;
        }
    }
    let started = std::time::Instant::now();
    let mut next_sample = STATS_SAMPLE_INTERVAL;
    let mut watch = HypercallWatch::default();
    let sampling = log::log_enabled!(target: "xhyve::stats", log::Level::Trace);
    let mut seen_reset = ctx.control.reset_generation();
    while !ctx.control.is_stopping() {
        // A machine pause: one atomic load per pass when none is asked for. A machine reset
        // happens in the park (the vCPU is this thread's to change).
        if ctx.control.pause_requested() {
            park(vcpu.as_mut(), &ctx, &mut seen_reset);
            continue;
        }
        if sampling && started.elapsed() >= next_sample {
            // How much guest code the hypervisor emulated so far, to time boot phases
            // (XHYVE_LOG=xhyve::stats=trace); trace only, as the exit path requires.
            next_sample += STATS_SAMPLE_INTERVAL;
            if let Some(count) = vcpu.emulated_instructions() {
                log::trace!(target: "xhyve::stats", "vCPU {id} at {:.1} s: {count} instructions emulated", started.elapsed().as_secs_f64());
            }
        }
        let mut step = Ok(());
        if let Some(chip) = &ctx.user_irqchip {
            step = prepare_user_entry(vcpu.as_mut(), chip, &ctx);
            // Woken from the VMM's HLT or SIPI wait during a pause: park before the guest
            // runs (the entry is prepared; it runs as prepared after the resume, unless a
            // machine reset came meanwhile: the entry is then prepared again).
            if ctx.control.pause_requested() && park(vcpu.as_mut(), &ctx, &mut seen_reset) {
                continue;
            }
        }
        if let Err(reason) = step.and_then(|()| run_once(vcpu.as_mut(), &ctx, &mut watch)) {
            ctx.control.stop(reason);
            ctx.control.kick_all();
            break;
        }
    }
    if let Some(count) = vcpu.emulated_instructions() {
        log::debug!("vCPU {id}: the hypervisor emulated {count} instructions");
    }
}

/// Parks the vCPU thread for a pause; applies a machine reset asked for meanwhile. Returns
/// whether it did.
fn park(vcpu: &mut dyn Vcpu, ctx: &VcpuContext, seen: &mut u64) -> bool {
    ctx.control.park(seen, &mut || {
        if let Err(e) = reset_vcpu(vcpu, ctx) {
            let reason = fatal(vcpu, ctx, &format!("cannot reset the vCPU: {e}"));
            ctx.control.stop(reason);
            ctx.control.kick_all();
        }
    })
}

/// A machine reset, on the vCPU's own thread: the power-on state, then what start-up gave
/// it: the boot registers for the BSP (an AP waits for INIT/SIPI) and the boot MSRs.
fn reset_vcpu(vcpu: &mut dyn Vcpu, ctx: &VcpuContext) -> Result<(), crate::hv::HvError> {
    let id = vcpu.id();
    vcpu.reset()?;
    if id == 0 {
        let boot = *crate::devices::bus::lock(&ctx.boot);
        vcpu.set_sregs(&boot.sregs)?;
        vcpu.set_regs(&boot.regs)?;
    }
    vcpu.set_msrs(&crate::arch::x86_64::msrs::boot_msrs(id, ctx.x2apic))?;
    if let Some(chip) = &ctx.user_irqchip {
        // The guest TSC went on; the model's TSC-deadline reference follows it.
        if let Ok((hz, now)) = vcpu.guest_tsc() {
            chip.set_guest_tsc(id, hz, now);
        }
    }
    Ok(())
}

/// User irqchip: (re)starts a vCPU through INIT/SIPI, then injects what it can take.
fn prepare_user_entry(
    vcpu: &mut dyn Vcpu,
    chip: &UserIrqChip,
    ctx: &VcpuContext,
) -> Result<(), StopReason> {
    loop {
        let step = chip
            .prepare_entry(vcpu)
            .map_err(|e| fatal(vcpu, ctx, &format!("cannot inject an interrupt: {e}")))?;
        if step == EntryStep::Run {
            return Ok(());
        }
        let Some(vector) = chip.wait_for_startup(vcpu.id()) else {
            return Ok(());
        };
        start_in_real_mode(vcpu, vector).map_err(|e| {
            fatal(
                vcpu,
                ctx,
                &format!("cannot start vCPU at SIPI vector {vector:#x}: {e}"),
            )
        })?;
    }
}

/// The state a SIPI leaves: real mode at CS = vector << 8 (base vector << 12), IP 0.
fn start_in_real_mode(vcpu: &mut dyn Vcpu, vector: u8) -> Result<(), crate::hv::HvError> {
    let mut sregs = vcpu.sregs()?;
    sregs.cs = SegmentRegister {
        base: u64::from(vector) << 12,
        limit: 0xffff,
        selector: u16::from(vector) << 8,
        type_: 0xb,
        present: true,
        s: true,
        ..Default::default()
    };
    sregs.cr0 &= !(1 | (1 << 31));
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&crate::arch::x86_64::regs::StandardRegisters {
        rip: 0,
        rflags: 2,
        ..Default::default()
    })
}

fn run_once(
    vcpu: &mut dyn Vcpu,
    ctx: &VcpuContext,
    watch: &mut HypercallWatch,
) -> Result<(), StopReason> {
    let mut unhandled = None;
    let vcpu_id = vcpu.id();
    let exit = vcpu.run();
    match exit {
        Ok(VmExit::IoIn { port, size, data }) => {
            let size = size.max(1);
            for chunk in data.chunks_mut(size) {
                if !ctx.io_bus.read(u64::from(port), chunk) {
                    chunk.fill(0xff);
                    unhandled = Some(Unhandled::PortRead { port, size });
                }
            }
        }
        Ok(VmExit::IoOut { port, size, data }) => {
            let size = size.max(1);
            for chunk in data.chunks(size) {
                if !ctx.io_bus.write(u64::from(port), chunk) {
                    unhandled = Some(Unhandled::PortWrite { port, size });
                }
            }
        }
        Ok(VmExit::MmioRead { addr, data }) => {
            if let Some(chip) = ctx
                .user_irqchip
                .as_ref()
                .filter(|_| UserIrqChip::is_lapic_address(addr))
            {
                chip.lapic_read(vcpu_id, addr, data);
            } else if !ctx.mmio_bus.read(addr, data) {
                log::trace!("unhandled MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        Ok(VmExit::MmioWrite { addr, data }) => {
            if let Some(chip) = ctx
                .user_irqchip
                .as_ref()
                .filter(|_| UserIrqChip::is_lapic_address(addr))
            {
                chip.lapic_write(vcpu_id, addr, data);
            } else if !ctx.mmio_bus.write(addr, data) {
                log::trace!("unhandled MMIO write at {addr:#x}");
            }
        }
        Ok(VmExit::MsrRead {
            index,
            value,
            fault,
        }) => match lapic_msr_chip(ctx, index) {
            Some(chip) => match chip.msr_read(vcpu_id, index) {
                Some(read) => *value = read,
                None => *fault = 1,
            },
            None if ctx.ignore_unknown_msrs => *value = 0,
            None => *fault = 1,
        },
        Ok(VmExit::MsrWrite {
            index,
            value,
            fault,
        }) => match lapic_msr_chip(ctx, index) {
            Some(chip) => *fault = u8::from(!chip.msr_write(vcpu_id, index, value)),
            None if ctx.ignore_unknown_msrs => {}
            None => *fault = 1,
        },
        Ok(VmExit::Interrupted) => {
            vcpu.clear_kick();
            if ctx.user_irqchip.is_none() {
                if let Some(rip) = answer_halt_poll(vcpu, ctx) {
                    watch.sample(vcpu, ctx, rip);
                }
            }
        }
        Ok(VmExit::Shutdown) => return Err(StopReason::Guest(PowerEvent::TripleFault)),
        Ok(VmExit::Hlt) if ctx.user_irqchip.is_some() => {
            let enabled = vcpu
                .regs()
                .map(|r| r.rflags & RFLAGS_IF != 0)
                .unwrap_or(false);
            if let Some(chip) = &ctx.user_irqchip {
                chip.halt(vcpu_id, enabled);
            }
        }
        Ok(VmExit::Hlt) => {
            // Only reached when the hypervisor lets HLT out (no in-kernel irqchip): with
            // interrupts off nothing but INIT/NMI can wake it, which xhyve treats as halted.
            let enabled = vcpu
                .regs()
                .map(|r| r.rflags & RFLAGS_IF != 0)
                .unwrap_or(false);
            if !enabled {
                return Err(StopReason::Guest(PowerEvent::Halt));
            }
        }
        Ok(VmExit::IrqWindowOpen) => {}
        Ok(VmExit::SystemEvent(event)) => {
            return Err(match event {
                SystemEvent::Reset => StopReason::Guest(PowerEvent::Reset),
                SystemEvent::Shutdown => StopReason::Guest(PowerEvent::PowerOff),
                SystemEvent::Other(kind) => {
                    fatal(vcpu, ctx, &format!("unexpected system event {kind}"))
                }
            });
        }
        Ok(VmExit::InternalError {
            suberror: INTERNAL_ERROR_EMULATION,
        }) => {
            // The hypervisor could not emulate an instruction: complete it here and run on.
            if let Err(e) = vcpu.complete_instruction(&RamView(&ctx.memory)) {
                return Err(fatal(
                    vcpu,
                    ctx,
                    &format!(
                        "the hypervisor could not emulate the guest (KVM internal error, suberror {INTERNAL_ERROR_EMULATION}) and neither could xhyve: {e}\n  instructions xhyve completed so far: {}",
                        COMPLETIONS.summary()
                    ),
                ));
            }
        }
        Ok(VmExit::InternalError { suberror }) => {
            return Err(fatal(
                vcpu,
                ctx,
                &format!("the hypervisor could not emulate the guest (KVM internal error, suberror {suberror})"),
            ));
        }
        Ok(VmExit::FailEntry { reason }) => {
            return Err(fatal(
                vcpu,
                ctx,
                &format!("the hypervisor refused to enter the guest (hardware entry failure reason {reason:#x})"),
            ));
        }
        Ok(VmExit::Other { reason }) => {
            return Err(fatal(
                vcpu,
                ctx,
                &format!("unexpected exit reason {reason}"),
            ));
        }
        Err(e) => return Err(fatal(vcpu, ctx, &format!("vCPU run failed: {e}"))),
    }
    match unhandled {
        Some(access) if ctx.strict_io => {
            let what = match access {
                Unhandled::PortRead { port, size } => {
                    format!("unhandled I/O port read at {port:#x} ({size} bytes)")
                }
                Unhandled::PortWrite { port, size } => {
                    format!("unhandled I/O port write at {port:#x} ({size} bytes)")
                }
            };
            Err(fatal(vcpu, ctx, &what))
        }
        Some(access) => {
            log::trace!("{access:?}");
            Ok(())
        }
        None => Ok(()),
    }
}

/// The user irqchip when `msr` is one of its LAPIC's.
fn lapic_msr_chip(ctx: &VcpuContext, msr: u32) -> Option<&UserIrqChip> {
    ctx.user_irqchip
        .as_deref()
        .filter(|_| crate::intc::lapic::Lapic::handles_msr(msr))
}

/// Reports the vCPU's state to the halt poll; its RIP, when read.
fn answer_halt_poll(vcpu: &mut dyn Vcpu, ctx: &VcpuContext) -> Option<u64> {
    let generation = ctx.control.poll_generation();
    let state = vcpu.run_state();
    let regs = vcpu.regs();
    if let (Ok(state), Ok(regs)) = (state, regs) {
        ctx.control
            .report(vcpu.id(), generation, state, regs.rflags & RFLAGS_IF != 0);
        return Some(regs.rip);
    }
    None
}

/// How long a vCPU sits on one hypercall before xhyve says so.
const HYPERCALL_STUCK: std::time::Duration = std::time::Duration::from_secs(2);

/// Watches for a vCPU that never gets past a `vmcall`/`vmmcall`. On the build machines' KVM
/// (DESIGN.md) the host's emulator loops on a hypercall inside KVM_RUN for ever: no exit
/// reaches the VMM and the guest hangs silently. The halt poll's kicks (in-kernel irqchip,
/// about 13 a second) are the only time the VMM sees such a vCPU; the user irqchip mode has
/// no periodic kick, so a guest with no interrupt source goes unseen there.
///
/// A vCPU is reported when every sample for 2 s found RIP on the same hypercall while the
/// hypervisor kept emulating (its `insn_emulation` counter grew): a host that completes
/// hypercalls moves RIP on at once, and a halted vCPU emulates nothing.
#[derive(Default)]
struct HypercallWatch {
    rip: u64,
    since: Option<std::time::Instant>,
    emulated: Option<u64>,
    reported: bool,
}

impl HypercallWatch {
    fn sample(&mut self, vcpu: &mut dyn Vcpu, ctx: &VcpuContext, rip: u64) {
        let now = std::time::Instant::now();
        let since = match self.since {
            Some(since) if self.rip == rip => since,
            _ => {
                *self = HypercallWatch {
                    rip,
                    since: Some(now),
                    emulated: vcpu.emulated_instructions(),
                    reported: false,
                };
                return;
            }
        };
        if self.reported || now.duration_since(since) < HYPERCALL_STUCK {
            return;
        }
        // One look per stay: the instruction bytes are read once.
        self.reported = true;
        let emulating = match (self.emulated, vcpu.emulated_instructions()) {
            (Some(then), Some(now)) => now > then,
            // Without the counter, RIP alone must do.
            _ => true,
        };
        if !emulating {
            return;
        }
        if let Some(name) = hypercall_at(vcpu, &ctx.memory, rip) {
            log::warn!(
                "vCPU {}: stuck on {name} at RIP {rip:#x} for {} s: this host's KVM never \
                 completes a hypercall, so the guest hangs here (a Linux guest using KVM's \
                 paravirtual features, CPUID 0x40000001, does)",
                vcpu.id(),
                HYPERCALL_STUCK.as_secs()
            );
        }
    }
}

/// `vmcall` or `vmmcall` when that is the instruction at CS:`rip`.
fn hypercall_at(vcpu: &mut dyn Vcpu, memory: &GuestMemory, rip: u64) -> Option<&'static str> {
    use crate::arch::x86_64::emulate::{fetch, CpuMode, Paging};
    let sregs = vcpu.sregs().ok()?;
    let long = sregs.efer & crate::hv::regs::EFER_LMA != 0 && sregs.cs.l;
    let mode = if long {
        CpuMode::Long64
    } else {
        CpuMode::Protected32
    };
    let mut linear = sregs.cs.base.wrapping_add(rip);
    if !long {
        linear &= 0xffff_ffff;
    }
    let paging = Paging {
        cr0: sregs.cr0,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
    };
    let mut bytes = [0u8; 3];
    if fetch(&RamView(memory), &paging, linear, mode, &mut bytes) != bytes.len() {
        return None;
    }
    match bytes {
        [0x0f, 0x01, 0xc1] => Some("vmcall"),
        [0x0f, 0x01, 0xd9] => Some("vmmcall"),
        _ => None,
    }
}

fn fatal(vcpu: &mut dyn Vcpu, ctx: &VcpuContext, what: &str) -> StopReason {
    StopReason::Fatal(diagnostics::report(
        vcpu,
        &ctx.memory,
        what,
        &ctx.control.serial_tail(),
    ))
}

fn pin_to_host_cpu(ctx: &VcpuContext, id: u8) -> Result<(), String> {
    match ctx.pins.get(usize::from(id)) {
        Some(Some(cpu)) => super::host::pin_current_thread(*cpu)
            .map_err(|e| format!("cannot pin vCPU {id} to host CPU {cpu} (-p {id}:{cpu}): {e}")),
        _ => Ok(()),
    }
}
