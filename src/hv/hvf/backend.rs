//! The Hypervisor.framework back end: [`Hvf`] -> [`HvfVm`] -> [`HvfVcpu`], the `Hypervisor`,
//! `Vm` and `Vcpu` traits over the framework's x86 (VMX) calls. The exit handling itself is
//! the portable [`VmxVcpu`]; this file is the thin part that only a Mac can run.
//!
//! Threads: the framework ties a vCPU to the thread that created it (every `hv_vcpu_*` and
//! `hv_vmx_vcpu_*` call must come from there). The VMM creates its vCPUs on the main thread
//! and then moves each to its own thread, so [`HvfVcpu`] creates the framework vCPU lazily,
//! on the first call from that thread (`kicker()`, which the VMM calls first, or `run()`).
//! What the main thread set before (CPUID, registers, MSRs) is kept and applied then.
//!
//! Interrupt controllers: the framework has none, so the VMM's own (`IrqChipMode::User`)
//! routes every interrupt and injects it through [`Vcpu::inject_interrupt`]; the `Vm`'s
//! `set_irq_line`/`signal_msi` are never the path.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use super::ffi::*;
use super::host_cpuid;
use super::ram::RegionTable;
use super::vmcs::Vmcs;
use super::vmx::{VmxConfig, VmxVcpu, NATIVE_MSRS};
use crate::arch::x86_64::cpuid::CpuidEntry;
use crate::arch::x86_64::regs::{SpecialRegisters, StandardRegisters};
use crate::hv::{
    HvError, Hypervisor, IrqChipMode, RunState, Vcpu, VcpuKicker, Vm, VmExit, VmOptions,
};

/// A framework call's failure as an `HvError` (allocates only on failure).
fn check(call: &'static str, code: hv_return_t) -> Result<(), HvError> {
    if code == HV_SUCCESS {
        return Ok(());
    }
    let mut reason = format!("{} ({:#x})", hv_error_name(code), code as u32);
    if call == "hv_vm_create" && code == HV_DENIED {
        reason.push_str(": sign xhyve with the com.apple.security.hypervisor entitlement");
    }
    Err(HvError::Ioctl {
        what: call,
        source: io::Error::other(reason),
    })
}

/// Hypervisor.framework. Nothing to open: `hv_vm_create` reports a missing framework,
/// missing VT-x or a missing entitlement.
#[derive(Debug, Default)]
pub struct Hvf;

impl Hvf {
    pub fn new() -> Result<Hvf, HvError> {
        Ok(Hvf)
    }
}

impl Hypervisor for Hvf {
    fn name(&self) -> &'static str {
        "hvf"
    }

    fn create_vm(&self, options: &VmOptions) -> Result<Arc<dyn Vm>, HvError> {
        if options.irqchip != IrqChipMode::User {
            return Err(HvError::MissingCapability(
                "in-kernel irqchip (Hypervisor.framework has none)",
            ));
        }
        // SAFETY: no pointers; one VM per process, destroyed in HvfVm's Drop.
        check("hv_vm_create", unsafe { hv_vm_create(HV_VM_DEFAULT) })?;
        Ok(Arc::new(HvfVm {
            ram: Arc::new(RwLock::new(Arc::new(RegionTable::new()))),
            ignore_unknown_msrs: options.user_msr_exits,
            pause_exits: options.pause_exits,
        }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HvError> {
        Ok(host_cpuid::host())
    }
}

/// Copy-on-write: a vCPU takes a snapshot for one `run()` and holds no lock while the guest
/// runs; `map_memory` (at setup) publishes a new table.
type SharedRam = Arc<RwLock<Arc<RegionTable>>>;

fn read_ram(ram: &SharedRam) -> Arc<RegionTable> {
    ram.read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// The process's VM (the framework allows one).
pub struct HvfVm {
    ram: SharedRam,
    ignore_unknown_msrs: bool,
    pause_exits: bool,
}

impl Drop for HvfVm {
    fn drop(&mut self) {
        // SAFETY: no pointers. The VMM drops the VM after every vCPU thread ended (each vCPU
        // is destroyed on its own thread); a failure here only leaks until process exit.
        let _ = unsafe { hv_vm_destroy() };
    }
}

impl Vm for HvfVm {
    unsafe fn map_memory(
        &self,
        _slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), HvError> {
        let len = usize::try_from(size).map_err(|_| HvError::MissingCapability("huge region"))?;
        // SAFETY: the caller keeps host_addr..+size mapped and writable for the VM's life
        // (this method's contract), which is what hv_vm_map and the region table need.
        unsafe {
            check(
                "hv_vm_map",
                hv_vm_map(
                    host_addr.cast_const().cast(),
                    guest_addr,
                    len,
                    HV_MEMORY_READ | HV_MEMORY_WRITE | HV_MEMORY_EXEC,
                ),
            )?;
            let mut shared = self
                .ram
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut table = RegionTable::clone(&shared);
            table
                .insert(guest_addr, size, host_addr)
                .map_err(|e| HvError::Ioctl {
                    what: "hv_vm_map",
                    source: io::Error::other(e.to_string()),
                })?;
            *shared = Arc::new(table);
            Ok(())
        }
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>, HvError> {
        Ok(Box::new(HvfVcpu {
            id,
            ram: self.ram.clone(),
            ignore_unknown_msrs: self.ignore_unknown_msrs,
            pause_exits: self.pause_exits,
            setup: Setup::default(),
            live: None,
            kick: Arc::new(KickState {
                kicked: AtomicBool::new(false),
                vcpu: AtomicU32::new(NO_VCPU),
            }),
        }))
    }

    fn set_irq_line(&self, _gsi: u32, _level: bool) -> Result<(), HvError> {
        Err(HvError::MissingCapability(
            "interrupt lines (the VMM's IOAPIC and PIC handle them)",
        ))
    }

    fn signal_msi(&self, _address: u64, _data: u32) -> Result<(), HvError> {
        Err(HvError::MissingCapability(
            "MSI delivery (the VMM's LAPICs handle it)",
        ))
    }
}

/// One vCPU's VMCS and registers through the framework. Only valid on the thread that
/// created `vcpu`.
pub struct FrameworkVmcs {
    vcpu: hv_vcpuid_t,
}

impl Vmcs for FrameworkVmcs {
    fn read_field(&self, field: u32) -> Result<u64, HvError> {
        let mut value = 0;
        // SAFETY: `value` is a live u64 the call writes; `vcpu` belongs to this thread.
        check("hv_vmx_vcpu_read_vmcs", unsafe {
            hv_vmx_vcpu_read_vmcs(self.vcpu, field, &mut value)
        })?;
        Ok(value)
    }

    fn write_field(&mut self, field: u32, value: u64) -> Result<(), HvError> {
        // SAFETY: no pointers; `vcpu` belongs to this thread.
        check("hv_vmx_vcpu_write_vmcs", unsafe {
            hv_vmx_vcpu_write_vmcs(self.vcpu, field, value)
        })
    }

    fn read_reg(&self, reg: hv_x86_reg_t) -> Result<u64, HvError> {
        let mut value = 0;
        // SAFETY: `value` is a live u64 the call writes; `vcpu` belongs to this thread.
        check("hv_vcpu_read_register", unsafe {
            hv_vcpu_read_register(self.vcpu, reg, &mut value)
        })?;
        Ok(value)
    }

    fn write_reg(&mut self, reg: hv_x86_reg_t, value: u64) -> Result<(), HvError> {
        // SAFETY: no pointers; `vcpu` belongs to this thread.
        check("hv_vcpu_write_register", unsafe {
            hv_vcpu_write_register(self.vcpu, reg, value)
        })
    }

    fn capability(&self, cap: hv_vmx_capability_t) -> Result<u64, HvError> {
        let mut value = 0;
        // SAFETY: `value` is a live u64 the call writes.
        check("hv_vmx_read_capability", unsafe {
            hv_vmx_read_capability(cap, &mut value)
        })?;
        Ok(value)
    }
}

/// `KickState::vcpu` before the framework vCPU exists.
const NO_VCPU: u32 = u32::MAX;

/// Shared between a vCPU and its kickers.
struct KickState {
    /// Set by a kick, cleared by `clear_kick`: `run()` returns `Interrupted` while set, so a
    /// kick that lands outside `hv_vcpu_run` is not lost.
    kicked: AtomicBool,
    vcpu: AtomicU32,
}

struct HvfKicker(Arc<KickState>);

impl VcpuKicker for HvfKicker {
    fn kick(&self) {
        self.0.kicked.store(true, Ordering::SeqCst);
        let mut vcpu = self.0.vcpu.load(Ordering::SeqCst);
        if vcpu != NO_VCPU {
            // SAFETY: one live vCPU id; hv_vcpu_interrupt may be called from any thread and
            // only makes a running hv_vcpu_run return. Failure leaves the flag, seen on the
            // next entry.
            let _ = unsafe { hv_vcpu_interrupt(&mut vcpu, 1) };
        }
    }
}

/// What the VMM set before the framework vCPU existed.
#[derive(Default)]
struct Setup {
    cpuid: Vec<CpuidEntry>,
    regs: Option<StandardRegisters>,
    sregs: Option<SpecialRegisters>,
    msrs: Vec<(u32, u64)>,
}

/// The framework vCPU and its exit handler, once created on the run thread.
struct Live {
    vcpu: hv_vcpuid_t,
    vmx: VmxVcpu<FrameworkVmcs>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // SAFETY: no pointers. The vCPU is dropped where it ran (the VMM moves it into its
        // thread and drops it there); from elsewhere the framework refuses, which only leaks.
        let _ = unsafe { hv_vcpu_destroy(self.vcpu) };
    }
}

/// Bytes of the XSAVE image written at a machine reset: the legacy area, the header, and
/// room for AVX's component; the framework takes an image as large as the guest's XSAVE.
const FP_STATE_BYTES: usize = 4096;

/// An XSAVE image, aligned as the instruction requires.
#[repr(C, align(64))]
struct FpState([u8; FP_STATE_BYTES]);

pub struct HvfVcpu {
    id: u8,
    ram: SharedRam,
    ignore_unknown_msrs: bool,
    pause_exits: bool,
    setup: Setup,
    live: Option<Live>,
    kick: Arc<KickState>,
}

impl HvfVcpu {
    /// The framework vCPU, created on first use from the calling (run) thread.
    fn live(&mut self) -> Result<&mut Live, HvError> {
        if self.live.is_none() {
            let live = self.create()?;
            self.kick.vcpu.store(live.vcpu, Ordering::SeqCst);
            self.live = Some(live);
        }
        self.live
            .as_mut()
            .ok_or(HvError::MissingCapability("a framework vCPU"))
    }

    fn create(&mut self) -> Result<Live, HvError> {
        let mut vcpu: hv_vcpuid_t = 0;
        // SAFETY: `vcpu` is a live id the call writes.
        check("hv_vcpu_create", unsafe {
            hv_vcpu_create(&mut vcpu, HV_VCPU_DEFAULT)
        })?;
        for &msr in NATIVE_MSRS {
            // SAFETY: no pointers; the vCPU was just created on this thread.
            let code = unsafe { hv_vcpu_enable_native_msr(vcpu, msr, true) };
            if let Err(e) = check("hv_vcpu_enable_native_msr", code) {
                // SAFETY: as above; nothing else refers to the vCPU yet.
                let _ = unsafe { hv_vcpu_destroy(vcpu) };
                return Err(e);
            }
        }
        let config = VmxConfig {
            vcpu_id: self.id,
            cpuid: std::mem::take(&mut self.setup.cpuid),
            ignore_unknown_msrs: self.ignore_unknown_msrs,
            // Always, whatever -H says: the VMM's user irqchip sleeps a halted vCPU itself
            // and reports "every vCPU halted" (exit 2), so HLT must reach it.
            exit_on_hlt: true,
            exit_on_pause: self.pause_exits,
        };
        let vmx = match VmxVcpu::new(FrameworkVmcs { vcpu }, config) {
            Ok(vmx) => vmx,
            Err(e) => {
                // SAFETY: as above.
                let _ = unsafe { hv_vcpu_destroy(vcpu) };
                return Err(e);
            }
        };
        let mut live = Live { vcpu, vmx };
        if let Some(sregs) = self.setup.sregs.take() {
            live.vmx.set_sregs(&sregs)?;
        }
        if let Some(regs) = self.setup.regs.take() {
            live.vmx.set_regs(&regs)?;
        }
        write_msrs(&mut live, &std::mem::take(&mut self.setup.msrs))?;
        Ok(live)
    }
}

/// Writes MSRs as the VMM's boot values: the framework's native MSRs to the hardware, the
/// VMX layer's own (EFER, APIC base, PAT, MTRRs...) through it. Values the layer keeps fixed
/// (MISC_ENABLE) or MSRs nobody models are left alone, as a guest write would leave them;
/// a value the layer refuses (x2APIC mode, which our LAPIC lacks) is an error.
fn write_msrs(live: &mut Live, msrs: &[(u32, u64)]) -> Result<(), HvError> {
    for &(index, value) in msrs {
        if NATIVE_MSRS.contains(&index) {
            // SAFETY: no pointers; the vCPU belongs to this thread.
            check("hv_vcpu_write_msr", unsafe {
                hv_vcpu_write_msr(live.vcpu, index, value)
            })?;
        } else if live.vmx.set_msr(index, value)? == Some(false) {
            return Err(HvError::Ioctl {
                what: "set_msrs",
                source: io::Error::other(format!(
                    "MSR {index:#x} = {value:#x} is not supported by the hvf back end"
                )),
            });
        }
    }
    Ok(())
}

impl Vcpu for HvfVcpu {
    fn id(&self) -> u8 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>, HvError> {
        self.live()?;
        let kick = &self.kick;
        let ram = read_ram(&self.ram);
        let Some(live) = self.live.as_mut() else {
            return Err(HvError::MissingCapability("a framework vCPU"));
        };
        let vcpu = live.vcpu;
        let vmx: *mut VmxVcpu<FrameworkVmcs> = &mut live.vmx;
        loop {
            if kick.kicked.load(Ordering::SeqCst) {
                return Ok(VmExit::Interrupted);
            }
            // SAFETY: `vmx` points at `self.live`'s handler, which `&mut self` keeps alive and
            // unaliased for this whole call. Each reborrow either ends in this iteration
            // (`None`) or is returned, ending the loop; the raw pointer only works around the
            // borrow checker's conditional-return-in-a-loop limitation.
            if let Some(exit) = unsafe { &mut *vmx }.prepare_entry(&*ram)? {
                return Ok(exit);
            }
            // SAFETY: no pointers; the vCPU was created on this thread (see `live`).
            check("hv_vcpu_run", unsafe { hv_vcpu_run(vcpu) })?;
            // SAFETY: as for `prepare_entry` above.
            if let Some(exit) = unsafe { &mut *vmx }.handle_exit(&*ram)? {
                return Ok(exit);
            }
        }
    }

    fn regs(&self) -> Result<StandardRegisters, HvError> {
        match &self.live {
            Some(live) => live.vmx.regs(),
            None => Ok(self.setup.regs.unwrap_or_default()),
        }
    }

    fn set_regs(&mut self, regs: &StandardRegisters) -> Result<(), HvError> {
        match &mut self.live {
            Some(live) => live.vmx.set_regs(regs),
            None => {
                self.setup.regs = Some(*regs);
                Ok(())
            }
        }
    }

    fn sregs(&self) -> Result<SpecialRegisters, HvError> {
        match &self.live {
            Some(live) => live.vmx.sregs(),
            None => Ok(self.setup.sregs.unwrap_or_default()),
        }
    }

    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<(), HvError> {
        match &mut self.live {
            Some(live) => live.vmx.set_sregs(sregs),
            None => {
                self.setup.sregs = Some(*sregs);
                Ok(())
            }
        }
    }

    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<(), HvError> {
        if self.live.is_some() {
            return Err(HvError::MissingCapability(
                "changing CPUID after the vCPU started",
            ));
        }
        self.setup.cpuid = entries.to_vec();
        Ok(())
    }

    fn reset(&mut self) -> Result<(), HvError> {
        let Some(live) = &mut self.live else {
            // Not created yet: it will be born in its power-on state; only what the VMM
            // queued for it goes (the caller sets the boot state again).
            self.setup.regs = None;
            self.setup.sregs = None;
            self.setup.msrs.clear();
            return Ok(());
        };
        live.vmx.power_on_reset()?;
        // x87/SSE/AVX in their initial state. The framework's own image is read first, so
        // that its size and format (XCOMP_BV) stay as it gave them; then the legacy area is
        // what FNINIT leaves (FCW 0x37F, MXCSR 0x1F80, registers zero; MXCSR_MASK kept),
        // XSTATE_BV names only x87 and SSE (taken from that area), and every other
        // component is dropped to its init value.
        let mut image = FpState([0; FP_STATE_BYTES]);
        // SAFETY: the buffer is FP_STATE_BYTES long, 64-byte aligned as XSAVE requires, and
        // outlives the call, which writes at most that many bytes; the vCPU is this thread's.
        check("hv_vcpu_read_fpstate", unsafe {
            hv_vcpu_read_fpstate(live.vcpu, image.0.as_mut_ptr().cast(), image.0.len())
        })?;
        let mxcsr_mask: [u8; 4] = [image.0[28], image.0[29], image.0[30], image.0[31]];
        image.0[..512].fill(0);
        image.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        image.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        image.0[28..32].copy_from_slice(&mxcsr_mask);
        image.0[512..520].copy_from_slice(&0x3u64.to_le_bytes());
        image.0[576..].fill(0);
        // SAFETY: as above; the call only reads the buffer.
        check("hv_vcpu_write_fpstate", unsafe {
            hv_vcpu_write_fpstate(live.vcpu, image.0.as_ptr().cast(), image.0.len())
        })
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<(), HvError> {
        match &mut self.live {
            Some(live) => write_msrs(live, msrs),
            None => {
                self.setup.msrs.extend_from_slice(msrs);
                Ok(())
            }
        }
    }

    fn run_state(&self) -> Result<RunState, HvError> {
        Ok(match &self.live {
            Some(live) => live.vmx.run_state(),
            None if self.id == 0 => RunState::Running,
            None => RunState::WaitingForSipi,
        })
    }

    fn translate(&self, gva: u64) -> Result<Option<u64>, HvError> {
        match &self.live {
            Some(live) => live.vmx.translate(&*read_ram(&self.ram), gva),
            None => Ok(None),
        }
    }

    fn kicker(&mut self) -> Result<Arc<dyn VcpuKicker>, HvError> {
        // The VMM calls this first on the vCPU's own thread: the framework vCPU is born here.
        self.live()?;
        Ok(Arc::new(HvfKicker(self.kick.clone())))
    }

    fn clear_kick(&mut self) {
        self.kick.kicked.store(false, Ordering::SeqCst);
    }

    fn ready_for_interrupt(&mut self) -> bool {
        match &mut self.live {
            Some(live) => live.vmx.ready_for_interrupt(),
            None => false,
        }
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), HvError> {
        self.live()?.vmx.inject_interrupt(vector)
    }

    fn inject_nmi(&mut self) -> Result<(), HvError> {
        self.live()?.vmx.inject_nmi()
    }

    fn request_interrupt_window(&mut self, on: bool) {
        if let Some(live) = &mut self.live {
            live.vmx.request_interrupt_window(on);
        }
    }

    fn interrupts_enabled(&mut self) -> bool {
        match &mut self.live {
            Some(live) => live.vmx.interrupts_enabled(),
            None => false,
        }
    }
}
