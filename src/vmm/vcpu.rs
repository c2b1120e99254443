//! One vCPU thread: run the guest, dispatch each exit to a bus, and stop when told.
//!
//! This is the hot path: no allocation, no lock held across `run()`, no logging above trace.
//! Only the fatal paths (which end the VM) allocate, to build their report.

use std::sync::Arc;

use super::control::Control;
use super::diagnostics;
use super::exit::StopReason;
use super::memory::GuestMemory;
use crate::devices::bus::Bus;
use crate::devices::power::PowerEvent;
use crate::hv::regs::RFLAGS_IF;
use crate::hv::{SystemEvent, Vcpu, VmExit};

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
}

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
        Ok(kicker) => ctx.control.register_kicker(id, kicker),
        Err(e) => {
            ctx.control
                .stop(StopReason::Fatal(format!("vCPU {id}: {e}")));
            return;
        }
    }
    while !ctx.control.is_stopping() {
        if let Err(reason) = run_once(vcpu.as_mut(), &ctx) {
            ctx.control.stop(reason);
            ctx.control.kick_all();
            break;
        }
    }
}

fn run_once(vcpu: &mut dyn Vcpu, ctx: &VcpuContext) -> Result<(), StopReason> {
    let mut unhandled = None;
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
            if !ctx.mmio_bus.read(addr, data) {
                log::trace!("unhandled MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        Ok(VmExit::MmioWrite { addr, data }) => {
            if !ctx.mmio_bus.write(addr, data) {
                log::trace!("unhandled MMIO write at {addr:#x}");
            }
        }
        Ok(VmExit::MsrRead { value, fault, .. }) => {
            if ctx.ignore_unknown_msrs {
                *value = 0;
            } else {
                *fault = 1;
            }
        }
        Ok(VmExit::MsrWrite { fault, .. }) => {
            if !ctx.ignore_unknown_msrs {
                *fault = 1;
            }
        }
        Ok(VmExit::Interrupted) => {
            vcpu.clear_kick();
            answer_halt_poll(vcpu, ctx);
        }
        Ok(VmExit::Shutdown) => return Err(StopReason::Guest(PowerEvent::TripleFault)),
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

fn answer_halt_poll(vcpu: &mut dyn Vcpu, ctx: &VcpuContext) {
    let generation = ctx.control.poll_generation();
    let state = vcpu.run_state();
    let regs = vcpu.regs();
    if let (Ok(state), Ok(regs)) = (state, regs) {
        ctx.control
            .report(vcpu.id(), generation, state, regs.rflags & RFLAGS_IF != 0);
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
