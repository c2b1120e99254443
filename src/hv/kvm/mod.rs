//! The KVM back end (Linux): kvm-ioctls behind the `hv` traits.

mod complete;
mod kick;
mod regs;
mod routing;
mod stats;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_enable_cap, kvm_interrupt, kvm_ioeventfd,
    kvm_ioeventfd_flag_nr_datamatch, kvm_ioeventfd_flag_nr_deassign, kvm_ioeventfd_flag_nr_pio,
    kvm_irqfd, kvm_msi, kvm_msr_entry, kvm_pit_config, CpuId, Msrs, KVMIO,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
    KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{
    Cap, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit, VcpuFd, VmFd,
};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use super::{
    Doorbell, HvError, Hypervisor, IrqChipMode, IrqfdSource, RunState, SystemEvent, Vcpu,
    VcpuKicker, Vm, VmExit, VmOptions,
};
use crate::arch::x86_64::cpuid::CpuidEntry;
use crate::arch::x86_64::emulate::complete::{CompleteError, Cpu, Exception, Kind, COMPLETIONS};
use crate::arch::x86_64::emulate::{self, GuestRam};
use crate::arch::x86_64::regs::{SpecialRegisters, StandardRegisters};
use routing::GsiRoutes;

/// KVM's TSS and identity-map pages for real-mode emulation on Intel: three pages just below
/// the bootrom area, clear of the LAPIC, IOAPIC, HPET and ECAM.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HvError {
    move |e| HvError::Ioctl {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
}

impl Kvm {
    pub fn new() -> Result<Self, HvError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| HvError::Open {
            path: "/dev/kvm",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HvError::MissingCapability(name));
            }
        }
        kick::install_handler()?;
        Ok(Kvm { kvm })
    }
}

impl Hypervisor for Kvm {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vm(&self, options: &VmOptions) -> Result<Arc<dyn Vm>, HvError> {
        Ok(Arc::new(self.create_kvm_vm(options)?))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HvError> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                index_significant: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

impl Kvm {
    fn create_kvm_vm(&self, options: &VmOptions) -> Result<KvmVm, HvError> {
        let fd = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(KVM_TSS_ADDR)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        let power_on_chips = match options.irqchip {
            IrqChipMode::Kernel => {
                fd.create_irq_chip()
                    .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                fd.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
                Some(PowerOnChips::read(&fd)?)
            }
            // LAPIC, IOAPIC, PIC and PIT accesses exit to the VMM; HLT exits too.
            IrqChipMode::User => None,
        };
        let user_msrs = fd.check_extension_raw(u64::from(KVM_CAP_X86_USER_SPACE_MSR)) > 0;
        if options.user_msr_exits && !user_msrs {
            return Err(HvError::MissingCapability("KVM_CAP_X86_USER_SPACE_MSR"));
        }
        // User mode: the LAPIC's MSRs (IA32_APIC_BASE, TSC-deadline, x2APIC) belong to the
        // VMM's model. Without a filter KVM would answer them itself (it drops TSC-deadline
        // writes silently when it has no LAPIC), so they are denied to KVM and exit.
        let lapic_msr_exits = options.irqchip == IrqChipMode::User
            && user_msrs
            && install_lapic_msr_filter(&fd)
                .map_err(|e| log::debug!("LAPIC MSRs stay with KVM: {e}"))
                .is_ok();
        let mut reasons = 0;
        if options.user_msr_exits {
            reasons |= KVM_MSR_EXIT_REASON_UNKNOWN;
        }
        if lapic_msr_exits {
            // KVM never filters x2APIC MSRs (0x800-0x8FF); without its LAPIC it refuses
            // them as invalid, which exits too. Other invalid MSRs come along and get the
            // #GP the kernel would raise (or -w's zero).
            reasons |= KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_INVAL;
        }
        if reasons != 0 {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_X86_USER_SPACE_MSR,
                ..Default::default()
            };
            cap.args[0] = u64::from(reasons);
            fd.enable_cap(&cap)
                .map_err(ioctl_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        }
        let vm = KvmVm {
            fd,
            power_on_chips,
            irqchip: options.irqchip,
            lapic_msr_exits,
            routes: Mutex::new(GsiRoutes::default()),
        };
        if options.irqchip == IrqChipMode::Kernel {
            // KVM's default table puts the in-kernel PIT on IOAPIC pin 0; ours follows the MADT.
            vm.install_routes(&GsiRoutes::default())?;
        }
        Ok(vm)
    }
}

/// Denies KVM the LAPIC's MSRs, so that each access exits as KVM_MSR_EXIT_REASON_FILTER.
fn install_lapic_msr_filter(fd: &VmFd) -> Result<(), HvError> {
    use crate::intc::lapic::{MSR_APIC_BASE, MSR_TSC_DEADLINE, MSR_X2APIC_FIRST, MSR_X2APIC_LAST};
    let denied = [0u8; 32]; // a clear bit denies; 256 MSRs at most per range here
                            // The x2APIC range is listed for kernels that filter it; current ones ignore it.
    let both = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
    let range = |base: u32, msr_count: u32| MsrFilterRange {
        flags: both,
        base,
        msr_count,
        bitmap: &denied,
    };
    let ranges = [
        range(MSR_APIC_BASE, 1),
        range(MSR_TSC_DEADLINE, 1),
        range(MSR_X2APIC_FIRST, MSR_X2APIC_LAST - MSR_X2APIC_FIRST + 1),
    ];
    fd.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(ioctl_err("KVM_X86_SET_MSR_FILTER"))
}

/// The in-kernel 8259 pair, IOAPIC and PIT as KVM creates them: a machine reset puts them
/// back (KVM has no reset of its own for them).
struct PowerOnChips {
    /// PIC master, PIC slave, IOAPIC (KVM_IRQCHIP_PIC_MASTER, _SLAVE, _IOAPIC).
    chips: [kvm_bindings::kvm_irqchip; 3],
    pit: kvm_bindings::kvm_pit_state2,
}

impl PowerOnChips {
    fn read(fd: &VmFd) -> Result<Self, HvError> {
        let mut chips: [kvm_bindings::kvm_irqchip; 3] = Default::default();
        for (id, chip) in chips.iter_mut().enumerate() {
            chip.chip_id = id as u32;
            fd.get_irqchip(chip).map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
        }
        let pit = fd.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?;
        Ok(PowerOnChips { chips, pit })
    }
}

pub struct KvmVm {
    fd: VmFd,
    /// With the in-kernel irqchip: its state at creation.
    power_on_chips: Option<PowerOnChips>,
    irqchip: IrqChipMode,
    /// User mode with the LAPIC's MSRs exiting to the VMM (x2APIC and TSC-deadline served).
    lapic_msr_exits: bool,
    /// The GSI routing table as last given to KVM (irqfd MSI routes added on demand).
    routes: Mutex<GsiRoutes>,
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), HvError> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the VM's life; KVM only
        // touches it through the guest.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>, HvError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        // What the guest may see of the LAPIC's MSR features: all of KVM's with its
        // irqchip, the VMM model's when they exit to it, none when they cannot.
        let hide_lapic_msr_features = self.irqchip == IrqChipMode::User && !self.lapic_msr_exits;
        let completion = complete::CompletionBuffers::new().map_err(HvError::MissingCapability)?;
        let emulated = stats::StatCounter::open(&fd, "insn_emulation");
        let mut vcpu = KvmVcpu {
            fd,
            id,
            hide_lapic_msr_features,
            completion,
            emulated,
            power_on_lapic: None,
        };
        vcpu.init_fpu()?;
        if self.irqchip == IrqChipMode::Kernel {
            vcpu.init_lapic_lints()?;
            vcpu.power_on_lapic = Some(Box::new(
                vcpu.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?,
            ));
        }
        Ok(Box::new(vcpu))
    }

    fn reset_irqchip(&self) -> Result<(), HvError> {
        let Some(power_on) = &self.power_on_chips else {
            return Ok(());
        };
        for chip in &power_on.chips {
            self.fd
                .set_irqchip(chip)
                .map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
        }
        // KVM reloads each channel's count from the state, so the PIT starts unprogrammed.
        self.fd
            .set_pit2(&power_on.pit)
            .map_err(ioctl_err("KVM_SET_PIT2"))
    }

    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<(), HvError> {
        if self.irqchip == IrqChipMode::User {
            return Err(HvError::MissingCapability(
                "KVM_IRQ_LINE without an in-kernel irqchip",
            ));
        }
        self.fd
            .set_irq_line(gsi, level)
            .map_err(ioctl_err("KVM_IRQ_LINE"))
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<(), HvError> {
        if self.irqchip == IrqChipMode::User {
            return Err(HvError::MissingCapability(
                "KVM_SIGNAL_MSI without an in-kernel irqchip",
            ));
        }
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(ioctl_err("KVM_SIGNAL_MSI"))
    }

    fn register_doorbell(&self, fd: RawFd, doorbell: Doorbell) -> Result<(), HvError> {
        self.ioeventfd(fd, doorbell, 0)
    }

    fn unregister_doorbell(&self, fd: RawFd, doorbell: Doorbell) -> Result<(), HvError> {
        self.ioeventfd(fd, doorbell, 1 << kvm_ioeventfd_flag_nr_deassign)
    }

    fn register_irqfd(&self, fd: RawFd, source: IrqfdSource) -> Result<u32, HvError> {
        if self.irqchip == IrqChipMode::User {
            return Err(HvError::MissingCapability(
                "KVM_IRQFD without an in-kernel irqchip",
            ));
        }
        match source {
            IrqfdSource::Edge { gsi } => {
                self.irqfd(fd, gsi)?;
                Ok(gsi)
            }
            IrqfdSource::Msi { address, data } => {
                let mut routes = crate::devices::bus::lock(&self.routes);
                let gsi = routes.add_msi(address, data).map_err(|e| HvError::Ioctl {
                    what: "KVM_SET_GSI_ROUTING",
                    source: std::io::Error::other(e.to_string()),
                })?;
                let installed = self
                    .install_routes(&routes)
                    .and_then(|()| self.irqfd(fd, gsi));
                if let Err(e) = installed {
                    routes.remove_last_msi();
                    let _ = self.install_routes(&routes);
                    return Err(e);
                }
                Ok(gsi)
            }
        }
    }

    fn retarget_irqfd(&self, route: u32, address: u64, data: u32) -> Result<(), HvError> {
        let mut routes = crate::devices::bus::lock(&self.routes);
        routes
            .retarget_msi(route, address, data)
            .map_err(|e| HvError::Ioctl {
                what: "KVM_SET_GSI_ROUTING",
                source: std::io::Error::other(e.to_string()),
            })?;
        self.install_routes(&routes)
    }
}

impl KvmVm {
    fn install_routes(&self, routes: &GsiRoutes) -> Result<(), HvError> {
        let table = routes.to_kvm().map_err(|e| HvError::Ioctl {
            what: "KVM_SET_GSI_ROUTING",
            source: std::io::Error::other(e.to_string()),
        })?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
    }

    /// KVM_IRQFD with our own struct, since kvm-ioctls wants an owned `EventFd`.
    fn irqfd(&self, fd: RawFd, gsi: u32) -> Result<(), HvError> {
        let request = kvm_irqfd {
            fd: fd as u32,
            gsi,
            ..Default::default()
        };
        // SAFETY: KVM_IRQFD reads one kvm_irqfd from the pointer, which outlives the call; the
        // fd is a VM fd. A bad eventfd is refused by the kernel, not dereferenced.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_IRQFD(), &request) };
        if ret < 0 {
            return Err(HvError::Ioctl {
                what: "KVM_IRQFD",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// KVM_IOEVENTFD with our own struct, since kvm-ioctls wants an owned `EventFd`.
    fn ioeventfd(&self, fd: RawFd, doorbell: Doorbell, extra_flags: u32) -> Result<(), HvError> {
        let mut request = kvm_ioeventfd {
            fd,
            flags: extra_flags,
            ..Default::default()
        };
        match doorbell {
            Doorbell::Port16 { port, value } => {
                request.addr = u64::from(port);
                request.len = 2;
                request.datamatch = u64::from(value);
                request.flags |=
                    (1 << kvm_ioeventfd_flag_nr_pio) | (1 << kvm_ioeventfd_flag_nr_datamatch);
            }
            // Length 0: any write size matches, and KVM takes the fast MMIO path.
            Doorbell::Mmio { addr } => request.addr = addr,
        }
        // SAFETY: KVM_IOEVENTFD reads one kvm_ioeventfd from the pointer, which outlives the
        // call; the fd is a VM fd. A bad eventfd is refused by the kernel, not dereferenced.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_IOEVENTFD(), &request) };
        if ret < 0 {
            return Err(HvError::Ioctl {
                what: "KVM_IOEVENTFD",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

// KVM_IOEVENTFD = _IOW(KVMIO, 0x79, struct kvm_ioeventfd).
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
// KVM_IRQFD = _IOW(KVMIO, 0x76, struct kvm_irqfd).
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);

pub struct KvmVcpu {
    fd: VcpuFd,
    id: u8,
    /// CPUID must not show x2APIC or TSC-deadline: nobody would answer their MSRs.
    hide_lapic_msr_features: bool,
    /// Buffers for completing what KVM cannot emulate, allocated up front.
    completion: complete::CompletionBuffers,
    /// KVM's count of instructions it emulated for this vCPU, where it keeps statistics.
    emulated: Option<stats::StatCounter>,
    /// With the in-kernel irqchip: the LAPIC as created (virtual wire), for a machine reset.
    power_on_lapic: Option<Box<kvm_bindings::kvm_lapic_state>>,
}

/// CPUID.1:ECX bits of features served through LAPIC MSRs.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;
const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// LAPIC register offsets and LVT delivery modes used for virtual-wire mode.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_APIC_BASE: u32 = 0x1b;
const MSR_IA32_PAT: u32 = 0x277;
/// IA32_PAT after RESET: WB, WT, UC-, UC, twice.
const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;
/// IA32_APIC_BASE after RESET: enabled, xAPIC, at 0xFEE00000 (BSP flag added for vCPU 0).
const APIC_BASE_POWER_ON: u64 = 0xfee0_0800;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM's paravirtual MSRs that make KVM write guest memory (kvmclock, the old and the new
/// number; async page faults; steal time; PV EOI): a reset turns them off, or KVM would go
/// on writing at addresses the old run chose.
const KVM_PV_MEMORY_MSRS: [u32; 6] = [
    0x11,
    0x12,
    0x4b56_4d00,
    0x4b56_4d01,
    0x4b56_4d02,
    0x4b56_4d03,
];
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

impl KvmVcpu {
    fn init_fpu(&self) -> Result<(), HvError> {
        // The state a processor has after FNINIT, as firmware leaves it.
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(ioctl_err("KVM_SET_FPU"))
    }

    /// Virtual-wire mode, as a PC BIOS leaves it: LINT0 takes the 8259's ExtINT, LINT1 is NMI.
    fn init_lapic_lints(&self) -> Result<(), HvError> {
        let mut lapic = self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *b as _;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(ioctl_err("KVM_SET_LAPIC"))
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u8 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>, HvError> {
        // The exit's header fields (I/O element size, internal-error suberror) sit in kvm_run
        // beside the data slice that `VcpuFd::run` lends out; read them through a raw pointer.
        let run_page: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => {
                    // SAFETY: the page is mapped for the vCPU's life and the kernel filled the
                    // io header for this KVM_EXIT_IO; the header does not overlap `data`.
                    let size = usize::from(unsafe { (*run_page).__bindgen_anon_1.io.size });
                    VmExit::IoIn { port, size, data }
                }
                VcpuExit::IoOut(port, data) => {
                    // SAFETY: as for IoIn.
                    let size = usize::from(unsafe { (*run_page).__bindgen_anon_1.io.size });
                    VmExit::IoOut { port, size, data }
                }
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                VcpuExit::X86Rdmsr(m) => VmExit::MsrRead {
                    index: m.index,
                    value: m.data,
                    fault: m.error,
                },
                VcpuExit::X86Wrmsr(m) => VmExit::MsrWrite {
                    index: m.index,
                    value: m.data,
                    fault: m.error,
                },
                VcpuExit::Hlt => VmExit::Hlt,
                VcpuExit::Shutdown => VmExit::Shutdown,
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::IrqWindowOpen => VmExit::IrqWindowOpen,
                VcpuExit::InternalError => {
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the union holds
                    // `internal`; the page is mapped for the vCPU's life.
                    let suberror = unsafe { (*run_page).__bindgen_anon_1.internal.suberror };
                    VmExit::InternalError { suberror }
                }
                VcpuExit::FailEntry(reason, _) => VmExit::FailEntry { reason },
                VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                    other => SystemEvent::Other(other),
                }),
                VcpuExit::Unsupported(reason) => VmExit::Other { reason },
                other => VmExit::Other {
                    reason: exit_number(&other),
                },
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(ioctl_err("KVM_RUN")(e)),
        }
    }

    fn regs(&self) -> Result<StandardRegisters, HvError> {
        Ok(regs::from_kvm_regs(
            &self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?,
        ))
    }

    fn set_regs(&mut self, r: &StandardRegisters) -> Result<(), HvError> {
        self.fd
            .set_regs(&regs::to_kvm_regs(r))
            .map_err(ioctl_err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegisters, HvError> {
        Ok(regs::from_kvm_sregs(
            &self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?,
        ))
    }

    fn set_sregs(&mut self, s: &SpecialRegisters) -> Result<(), HvError> {
        let mut k = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        regs::fill_kvm_sregs(&mut k, s);
        self.fd.set_sregs(&k).map_err(ioctl_err("KVM_SET_SREGS"))
    }

    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<(), HvError> {
        let kvm_entries: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: if e.index_significant {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: if e.function == 1 && self.hide_lapic_msr_features {
                    e.ecx & !(CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE)
                } else {
                    e.ecx
                },
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries)
            .map_err(|_| HvError::MissingCapability("CPUID table too large"))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))
    }

    fn reset(&mut self) -> Result<(), HvError> {
        self.finish_pending_exit()?;
        let (regs, sregs) = crate::arch::x86_64::regs::power_on_registers();
        // Nothing pending or being injected: an exception, interrupt or NMI of the old run
        // must not reach the new one.
        let events = kvm_bindings::kvm_vcpu_events {
            flags: kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING,
            ..Default::default()
        };
        self.fd
            .set_vcpu_events(&events)
            .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))?;
        self.set_sregs(&sregs)?;
        self.set_regs(&regs)?;
        // Every XSAVE component in its initial state (XSTATE_BV 0), XCR0 back to x87 only,
        // then the x87/SSE control words FNINIT leaves.
        let xsave = kvm_bindings::kvm_xsave::default();
        // SAFETY: a whole zeroed kvm_xsave; without KVM_CAP_XSAVE2 the kernel reads exactly
        // its 4096-byte region, and a zero header (standard format, nothing present) is valid.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(ioctl_err("KVM_SET_XSAVE"))?;
        let mut xcrs = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 1;
        self.fd.set_xcrs(&xcrs).map_err(ioctl_err("KVM_SET_XCRS"))?;
        self.init_fpu()?;
        let debug = kvm_bindings::kvm_debugregs {
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..Default::default()
        };
        self.fd
            .set_debug_regs(&debug)
            .map_err(ioctl_err("KVM_SET_DEBUGREGS"))?;
        let bsp = if self.id == 0 { 1 << 8 } else { 0 };
        // xAPIC mode before the LAPIC state, which KVM reads in the mode the base names.
        self.set_msrs(&[
            (MSR_IA32_APIC_BASE, APIC_BASE_POWER_ON | bsp),
            (MSR_IA32_PAT, PAT_POWER_ON),
        ])?;
        // One at a time, and a refusal is no error: KVM refuses an MSR it does not offer,
        // which the guest then cannot have turned on either.
        for msr in KVM_PV_MEMORY_MSRS.into_iter().chain([MSR_KVM_PV_EOI_EN]) {
            if let Err(e) = self.set_msrs(&[(msr, 0)]) {
                log::trace!("vCPU {}: MSR {msr:#x} not reset: {e}", self.id);
            }
        }
        if self.power_on_lapic.is_some() {
            // KVM's LAPIC keeps the TSC-deadline apart from its registers.
            self.set_msrs(&[(MSR_IA32_TSC_DEADLINE, 0)])?;
        }
        if let Some(lapic) = &self.power_on_lapic {
            self.fd
                .set_lapic(lapic)
                .map_err(ioctl_err("KVM_SET_LAPIC"))?;
            // KVM runs INIT/SIPI itself here: an AP waits for them, as at creation.
            let mp_state = kvm_bindings::kvm_mp_state {
                mp_state: if self.id == 0 {
                    kvm_bindings::KVM_MP_STATE_RUNNABLE
                } else {
                    KVM_MP_STATE_UNINITIALIZED
                },
            };
            self.fd
                .set_mp_state(mp_state)
                .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<(), HvError> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| HvError::MissingCapability("MSR list too large"))?;
        let written = self.fd.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if written != entries.len() {
            let index = entries.get(written).map_or(0, |e| e.index);
            return Err(HvError::Ioctl {
                what: "KVM_SET_MSRS",
                source: std::io::Error::other(format!("MSR {index:#x} was refused")),
            });
        }
        Ok(())
    }

    fn guest_tsc(&self) -> Result<(u64, u64), HvError> {
        let khz = self
            .fd
            .get_tsc_khz()
            .map_err(ioctl_err("KVM_GET_TSC_KHZ"))?;
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| HvError::MissingCapability("MSR list too large"))?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(ioctl_err("KVM_GET_MSRS"))?;
        match msrs.as_slice().first() {
            Some(entry) if read == 1 && khz > 0 => Ok((u64::from(khz) * 1000, entry.data)),
            _ => Err(HvError::MissingCapability("guest TSC rate")),
        }
    }

    fn run_state(&self) -> Result<RunState, HvError> {
        let mp = self
            .fd
            .get_mp_state()
            .map_err(ioctl_err("KVM_GET_MP_STATE"))?;
        Ok(match mp.mp_state {
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => RunState::WaitingForSipi,
            KVM_MP_STATE_HALTED => RunState::Halted,
            _ => RunState::Running,
        })
    }

    fn translate(&self, gva: u64) -> Result<Option<u64>, HvError> {
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(ioctl_err("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    fn kicker(&mut self) -> Result<Arc<dyn VcpuKicker>, HvError> {
        Ok(Arc::new(kick::ThreadKicker::register(&mut self.fd)))
    }

    fn clear_kick(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }

    fn ready_for_interrupt(&mut self) -> bool {
        self.fd.get_kvm_run().ready_for_interrupt_injection != 0
    }

    fn interrupts_enabled(&mut self) -> bool {
        self.fd.get_kvm_run().if_flag != 0
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), HvError> {
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer, which outlives the
        // call; the fd is a vCPU fd of a VM without an in-kernel irqchip.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(HvError::Ioctl {
                what: "KVM_INTERRUPT",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn inject_nmi(&mut self) -> Result<(), HvError> {
        self.fd.nmi().map_err(ioctl_err("KVM_NMI"))
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = u8::from(on);
    }

    fn emulated_instructions(&self) -> Option<u64> {
        self.emulated.as_ref().and_then(stats::StatCounter::read)
    }

    fn complete_instruction(&mut self, ram: &dyn GuestRam) -> Result<Kind, CompleteError> {
        let regs = self
            .regs()
            .map_err(|_| CompleteError::State("KVM_GET_REGS failed"))?;
        let sregs = self
            .sregs()
            .map_err(|_| CompleteError::State("KVM_GET_SREGS failed"))?;
        let mut cpu = Cpu { regs, sregs };
        let mut ext = complete::KvmExtendedState::new(&self.fd, &mut self.completion);
        let kind = match emulate::complete::complete(&mut cpu, ram, &mut ext) {
            Ok(kind) => kind,
            // The instruction faults, as it would on hardware: e.g. an xsave to a user
            // signal frame whose page is not faulted in yet. Nothing changed; the guest's
            // #PF handler maps the page and the instruction runs (and exits) again.
            Err(CompleteError::PageFault { linear, error_code }) => {
                let mut sregs = sregs;
                sregs.cr2 = linear;
                self.set_sregs(&sregs)
                    .map_err(|_| CompleteError::State("KVM_SET_SREGS failed"))?;
                self.inject_exception(Exception {
                    vector: PAGE_FAULT,
                    error_code: Some(error_code),
                })?;
                COMPLETIONS.record(Kind::PageFault);
                return Ok(Kind::PageFault);
            }
            // Any other exception the instruction raises (e.g. #GP from an xrstor of a
            // corrupt user signal frame, which Linux fixes up): delivered as well.
            Err(CompleteError::Fault { exception, .. }) => {
                let real_mode = sregs.cr0 & crate::hv::regs::CR0_PE == 0;
                self.inject_exception(Exception {
                    // Real mode pushes no error code.
                    error_code: exception.error_code.filter(|_| !real_mode),
                    ..exception
                })?;
                COMPLETIONS.record(Kind::Exception);
                return Ok(Kind::Exception);
            }
            Err(e) => return Err(e),
        };
        ext.finish()?;
        if cpu.sregs != sregs {
            self.set_sregs(&cpu.sregs)
                .map_err(|_| CompleteError::State("KVM_SET_SREGS failed"))?;
        }
        self.set_regs(&cpu.regs)
            .map_err(|_| CompleteError::State("KVM_SET_REGS failed"))?;
        COMPLETIONS.record(kind);
        Ok(kind)
    }
}

impl KvmVcpu {
    /// KVM finishes an instruction that exited for port or MMIO I/O only at the next
    /// KVM_RUN (KVM's API documentation: re-enter with `immediate_exit` set before changing
    /// the state), and would then write the old instruction's result and RIP over a state
    /// set meanwhile. Entering with `immediate_exit` completes it and returns at once,
    /// without running the guest. A completion that exits again (a split MMIO access) is
    /// answered with all ones: the reset discards what it computes.
    fn finish_pending_exit(&mut self) -> Result<(), HvError> {
        self.fd.set_kvm_immediate_exit(1);
        let mut result = Err(HvError::MissingCapability("a vCPU that stops exiting"));
        for _ in 0..8 {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    result = Ok(());
                    break;
                }
                Err(e) => {
                    result = Err(ioctl_err("KVM_RUN")(e));
                    break;
                }
                Ok(VcpuExit::IoIn(_, data)) | Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                Ok(_) => {}
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// Queues `exception` for the next entry, RIP still at the instruction that raised it.
    fn inject_exception(&mut self, exception: Exception) -> Result<(), CompleteError> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(|_| CompleteError::State("KVM_GET_VCPU_EVENTS failed"))?;
        events.exception.injected = 1;
        events.exception.nr = exception.vector;
        events.exception.has_error_code = u8::from(exception.error_code.is_some());
        events.exception.error_code = exception.error_code.unwrap_or(0);
        self.fd
            .set_vcpu_events(&events)
            .map_err(|_| CompleteError::State("KVM_SET_VCPU_EVENTS refused the exception"))
    }
}

/// The #PF vector.
const PAGE_FAULT: u8 = 14;

// KVM_INTERRUPT = _IOW(KVMIO, 0x86, struct kvm_interrupt); kvm-ioctls has no wrapper.
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        kick::unregister(&mut self.fd);
    }
}

fn exit_number(exit: &VcpuExit<'_>) -> u32 {
    match exit {
        VcpuExit::Unknown => kvm_bindings::KVM_EXIT_UNKNOWN,
        VcpuExit::Exception => kvm_bindings::KVM_EXIT_EXCEPTION,
        VcpuExit::Hypercall(_) => kvm_bindings::KVM_EXIT_HYPERCALL,
        VcpuExit::Debug(_) => kvm_bindings::KVM_EXIT_DEBUG,
        VcpuExit::Nmi => kvm_bindings::KVM_EXIT_NMI,
        VcpuExit::IoapicEoi(_) => kvm_bindings::KVM_EXIT_IOAPIC_EOI,
        VcpuExit::MemoryFault { .. } => kvm_bindings::KVM_EXIT_MEMORY_FAULT,
        _ => u32::MAX,
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::arch::x86_64::regs::SegmentRegister;
    use crate::memory::{create_guest_memory, GuestMemory};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    /// `None` when /dev/kvm is unusable, unless XHYVE_REQUIRE_KVM=1 makes that a failure.
    pub fn kvm_or_skip() -> Option<Kvm> {
        match Kvm::new() {
            Ok(k) => Some(k),
            Err(e) if std::env::var("XHYVE_REQUIRE_KVM").as_deref() == Ok("1") => {
                panic!("XHYVE_REQUIRE_KVM=1 but KVM is unusable: {e}")
            }
            Err(e) => {
                eprintln!("skipping: KVM is unusable: {e}");
                None
            }
        }
    }

    /// A VM with 1 MiB of RAM mapped at 0.
    pub fn real_mode_vm() -> Option<(Kvm, Arc<dyn Vm>, GuestMemory)> {
        real_mode_vm_with(IrqChipMode::Kernel)
    }

    /// `real_mode_vm` with the interrupt controllers `irqchip` says.
    pub fn real_mode_vm_with(irqchip: IrqChipMode) -> Option<(Kvm, Arc<dyn Vm>, GuestMemory)> {
        let kvm = kvm_or_skip()?;
        let options = VmOptions {
            vcpus: 1,
            irqchip,
            user_msr_exits: false,
            pause_exits: false,
        };
        let vm = kvm.create_vm(&options).unwrap();
        let mem = create_guest_memory(1 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        // SAFETY: the caller keeps `mem` alive as long as `vm`.
        unsafe { vm.map_memory(0, 0, region.len(), region.as_ptr()).unwrap() };
        Some((kvm, vm, mem))
    }

    /// A vCPU in real mode at CS:IP 0:`ip`.
    pub fn start_real_mode_vcpu(vm: &dyn Vm, ip: u64) -> Box<dyn Vcpu> {
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.sregs().unwrap();
        sregs.cs = SegmentRegister {
            base: 0,
            limit: 0xffff,
            selector: 0,
            type_: 0xb,
            present: true,
            s: true,
            ..Default::default()
        };
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&StandardRegisters {
            rip: ip,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
        vcpu
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn doorbell_writes_signal_the_eventfd_instead_of_exiting() {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let Some((_kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        let port_bell = Doorbell::Port16 {
            port: 0x510,
            value: 1,
        };
        let mmio_bell = Doorbell::Mmio { addr: 0x10_0000 };
        let port_fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let mmio_fd = EventFd::new(EFD_NONBLOCK).unwrap();
        vm.register_doorbell(port_fd.as_raw_fd(), port_bell)
            .unwrap();
        vm.register_doorbell(mmio_fd.as_raw_fd(), mmio_bell)
            .unwrap();
        // mov dx,0x510; mov ax,1; out dx,ax (matches); mov ax,0; out dx,ax (does not match);
        // mov ax,0xffff; mov ds,ax; mov [0x10],ax (0x100000, the MMIO doorbell);
        // mov [0x20],ax (0x100010, an ordinary MMIO write)
        let code = [
            0xba, 0x10, 0x05, 0xb8, 0x01, 0x00, 0xef, 0xb8, 0x00, 0x00, 0xef, 0xb8, 0xff, 0xff,
            0x8e, 0xd8, 0xa3, 0x10, 0x00, 0xa3, 0x20, 0x00,
        ];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x1000);
        match vcpu.run().unwrap() {
            VmExit::IoOut {
                port: 0x510,
                size: 2,
                data,
            } => assert_eq!(data, [0, 0], "only the non-matching value exits"),
            other => panic!("unexpected exit {other:?}"),
        }
        match vcpu.run().unwrap() {
            VmExit::MmioWrite { addr, .. } => assert_eq!(addr, 0x10_0010),
            other => panic!("unexpected exit {other:?}"),
        }
        assert_eq!(port_fd.read().unwrap(), 1);
        assert_eq!(mmio_fd.read().unwrap(), 1);

        vm.unregister_doorbell(port_fd.as_raw_fd(), port_bell)
            .unwrap();
        assert!(
            vm.unregister_doorbell(port_fd.as_raw_fd(), port_bell)
                .is_err(),
            "a second unregister finds nothing"
        );
    }

    /// Whether `vector` is pending in the LAPIC IRR of `vcpu`.
    fn irr_has(vcpu: &VcpuFd, vector: u8) -> bool {
        let lapic = vcpu.get_lapic().unwrap();
        let offset = 0x200 + usize::from(vector / 32) * 0x10;
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        u32::from_le_bytes(bytes) & (1 << (vector % 32)) != 0
    }

    fn wait_for_irr(vcpu: &VcpuFd, vector: u8) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if irr_has(vcpu, vector) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    }

    /// Nanoseconds per call of `a` and of `b`: medians of alternating rounds, since the
    /// build machines are shared and noisy.
    fn median_ns_per_call(a: &dyn Fn(), b: &dyn Fn()) -> (u128, u128) {
        const ROUNDS: usize = 15;
        const CALLS: u32 = 2000;
        let time = |f: &dyn Fn()| {
            let start = std::time::Instant::now();
            for _ in 0..CALLS {
                f();
            }
            start.elapsed().as_nanos() / u128::from(CALLS)
        };
        let mut times_a = Vec::with_capacity(ROUNDS);
        let mut times_b = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            times_a.push(time(a));
            times_b.push(time(b));
        }
        times_a.sort_unstable();
        times_b.sort_unstable();
        (times_a[ROUNDS / 2], times_b[ROUNDS / 2])
    }

    /// Also measures an MSI and an edge by irqfd against the ioctls; prints the figures.
    #[test]
    fn an_msi_irqfd_sets_the_vector_in_the_lapic_irr() {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let Some(kvm) = kvm_or_skip() else {
            return;
        };
        let vm = kvm
            .create_kvm_vm(&VmOptions {
                vcpus: 1,
                irqchip: IrqChipMode::Kernel,
                user_msr_exits: false,
                pause_exits: false,
            })
            .unwrap();
        let vcpu = vm.fd.create_vcpu(0).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        for (i, b) in 0x1FFu32.to_le_bytes().iter().enumerate() {
            lapic.regs[0xF0 + i] = *b as _; // SVR: software enabled
        }
        vcpu.set_lapic(&lapic).unwrap();

        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let source = IrqfdSource::Msi {
            address: 0xFEE0_0000,
            data: 0x45,
        };
        let route = vm.register_irqfd(fd.as_raw_fd(), source).unwrap();
        assert_eq!(route, 24, "the first GSI past the IOAPIC");
        assert!(!irr_has(&vcpu, 0x45));
        fd.write(1).unwrap();
        assert!(
            wait_for_irr(&vcpu, 0x45),
            "vector 0x45 pending after the write"
        );

        vm.retarget_irqfd(route, 0xFEE0_0000, 0x46).unwrap();
        fd.write(1).unwrap();
        assert!(
            wait_for_irr(&vcpu, 0x46),
            "the retargeted route raises 0x46"
        );
        assert!(
            vm.register_irqfd(fd.as_raw_fd(), IrqfdSource::Edge { gsi: 4 })
                .is_err(),
            "one eventfd, one route"
        );

        let edge = EventFd::new(EFD_NONBLOCK).unwrap();
        vm.register_irqfd(edge.as_raw_fd(), IrqfdSource::Edge { gsi: 4 })
            .unwrap();
        let msi_irqfd = || fd.write(1).unwrap();
        let msi_ioctl = || vm.signal_msi(0xFEE0_0000, 0x46).unwrap();
        // KVM injects irqfd edges on IOAPIC/PIC routes from a kernel worker after the write
        // returns, so this is the sender's cost only.
        let edge_irqfd = || edge.write(1).unwrap();
        let edge_ioctl = || {
            vm.set_irq_line(4, true).unwrap();
            vm.set_irq_line(4, false).unwrap();
        };
        let (irqfd_ns, ioctl_ns) = median_ns_per_call(&msi_irqfd, &msi_ioctl);
        eprintln!("MSI: irqfd {irqfd_ns} ns, KVM_SIGNAL_MSI {ioctl_ns} ns (median of 15 rounds)");
        let (irqfd_ns, ioctl_ns) = median_ns_per_call(&edge_irqfd, &edge_ioctl);
        eprintln!("GSI edge: irqfd {irqfd_ns} ns, 2x KVM_IRQ_LINE {ioctl_ns} ns (median of 15)");
    }

    #[test]
    fn user_mode_lapic_msrs_exit_to_the_vmm() {
        let Some((_kvm, vm, mem)) = real_mode_vm_with(IrqChipMode::User) else {
            return;
        };
        // mov ecx,0x1b; rdmsr; mov ecx,0x6e0; wrmsr; mov ecx,0x802; rdmsr; hlt
        let code = [
            0x66, 0xb9, 0x1b, 0x00, 0x00, 0x00, 0x0f, 0x32, 0x66, 0xb9, 0xe0, 0x06, 0x00, 0x00,
            0x0f, 0x30, 0x66, 0xb9, 0x02, 0x08, 0x00, 0x00, 0x0f, 0x32, 0xf4,
        ];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x1000);
        match vcpu.run().unwrap() {
            VmExit::MsrRead { index, value, .. } => {
                assert_eq!(index, 0x1b);
                *value = 0xfee0_0900;
            }
            other => panic!("unexpected exit {other:?}"),
        }
        match vcpu.run().unwrap() {
            VmExit::MsrWrite { index, value, .. } => {
                assert_eq!((index, value), (0x6e0, 0xfee0_0900), "TSC-deadline write");
            }
            other => panic!("unexpected exit {other:?}"),
        }
        match vcpu.run().unwrap() {
            VmExit::MsrRead { index, value, .. } => {
                assert_eq!(index, 0x802, "an x2APIC MSR");
                *value = 0;
            }
            other => panic!("unexpected exit {other:?}"),
        }
        assert!(matches!(vcpu.run().unwrap(), VmExit::Hlt));
        assert!(vcpu.guest_tsc().unwrap().0 > 0, "a TSC rate");
    }

    #[test]
    fn real_mode_port_io_and_string_io_reach_the_vmm() {
        let Some((_kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        // mov dx,0x3f8; mov al,'K'; out dx,al; in al,dx; mov si,0x1100; mov cx,3; rep outsw;
        // mov dx,0x404; out dx,ax
        let code = [
            0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xec, 0xbe, 0x00, 0x11, 0xb9, 0x03, 0x00, 0xf3,
            0x6f, 0xba, 0x04, 0x04, 0xef,
        ];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"abcdef", GuestAddress(0x1100)).unwrap();
        let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x1000);
        match vcpu.run().unwrap() {
            VmExit::IoOut {
                port: 0x3f8,
                size: 1,
                data,
            } => assert_eq!(data, b"K"),
            other => panic!("unexpected exit {other:?}"),
        }
        match vcpu.run().unwrap() {
            VmExit::IoIn {
                port: 0x3f8,
                size: 1,
                data,
            } => data[0] = 0x5a,
            other => panic!("unexpected exit {other:?}"),
        }
        let mut seen = Vec::new();
        loop {
            match vcpu.run().unwrap() {
                VmExit::IoOut {
                    port: 0x3f8,
                    size: 2,
                    data,
                } => seen.extend_from_slice(data),
                VmExit::IoOut {
                    port: 0x404,
                    size: 2,
                    data,
                } => {
                    assert_eq!(data, &[0x5a, 0]);
                    break;
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        assert_eq!(seen, b"abcdef");
        assert_eq!(vcpu.regs().unwrap().rip, 0x1013);
    }

    /// A machine reset of KVM's in-kernel IOAPIC and PIT (as read at creation), and of a
    /// vCPU: power-on registers; the BSP runnable, an AP waiting for INIT/SIPI.
    #[test]
    fn a_reset_puts_the_in_kernel_chips_and_the_vcpus_at_power_on() {
        let Some(kvm) = kvm_or_skip() else {
            return;
        };
        let options = VmOptions {
            vcpus: 2,
            irqchip: IrqChipMode::Kernel,
            user_msr_exits: false,
            pause_exits: false,
        };
        let vm = kvm.create_kvm_vm(&options).unwrap();
        let ioapic_rte4 = |vm: &KvmVm| {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
                ..Default::default()
            };
            vm.fd.get_irqchip(&mut chip).unwrap();
            // SAFETY: chip_id names the IOAPIC, so the union holds its state.
            unsafe { chip.chip.ioapic.redirtbl[4].bits }
        };
        let fresh_rte = ioapic_rte4(&vm);
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.fd.get_irqchip(&mut chip).unwrap();
        // SAFETY: as above; pin 4 unmasked to vector 0x34.
        unsafe { chip.chip.ioapic.redirtbl[4].bits = 0x34 };
        vm.fd.set_irqchip(&chip).unwrap();
        let mut pit = vm.fd.get_pit2().unwrap();
        let fresh_mode = pit.channels[0].mode;
        pit.channels[0].mode = 2;
        pit.channels[0].count = 1193;
        vm.fd.set_pit2(&pit).unwrap();
        assert_eq!(ioapic_rte4(&vm), 0x34);

        vm.reset_irqchip().unwrap();
        assert_eq!(ioapic_rte4(&vm), fresh_rte, "pin 4 as created");
        let pit = vm.fd.get_pit2().unwrap();
        assert_eq!(pit.channels[0].mode, fresh_mode, "PIT as created");

        let (power_regs, power_sregs) = crate::arch::x86_64::regs::power_on_registers();
        for id in 0..2 {
            let mut vcpu = vm.create_vcpu(id).unwrap();
            let mut sregs = vcpu.sregs().unwrap();
            sregs.cs = crate::arch::x86_64::regs::flat_segment(0x10, true);
            sregs.cr0 = 0x11;
            vcpu.set_sregs(&sregs).unwrap();
            vcpu.set_regs(&StandardRegisters {
                rip: 0x1234,
                rax: 5,
                rflags: 2,
                ..Default::default()
            })
            .unwrap();
            vcpu.reset().unwrap();
            assert_eq!(vcpu.regs().unwrap(), power_regs);
            let sregs = vcpu.sregs().unwrap();
            assert_eq!((sregs.cs.selector, sregs.cs.base), (0xf000, 0xffff_0000));
            assert_eq!(sregs.cr0 & 0xffff_ffff, power_sregs.cr0);
            assert_eq!(sregs.efer, 0);
            assert_eq!(sregs.apic_base & !0xfff, 0xfee0_0000);
            let state = vcpu.run_state().unwrap();
            if id == 0 {
                assert_eq!(state, RunState::Running);
            } else {
                assert_eq!(
                    state,
                    RunState::WaitingForSipi,
                    "the AP waits for INIT/SIPI"
                );
            }
        }
    }

    /// A reset that lands between an MMIO read exit and the KVM_RUN that would finish it:
    /// the old instruction must not complete over the new state (it would set RIP past
    /// itself and run on in the old code, whose next instruction writes port 0x81).
    #[test]
    fn a_reset_after_an_mmio_exit_does_not_finish_the_old_instruction() {
        let Some((_kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        // mov ax,0xffff; mov ds,ax; mov al,[0x10] (linear 0x100000, past RAM: MMIO);
        // out 0x81,al
        let old = [0xb8, 0xff, 0xff, 0x8e, 0xd8, 0xa0, 0x10, 0x00, 0xe6, 0x81];
        mem.write_slice(&old, GuestAddress(0x1000)).unwrap();
        // The new code: out 0x80,al
        mem.write_slice(&[0xe6, 0x80], GuestAddress(0x2000))
            .unwrap();
        let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x1000);
        match vcpu.run().unwrap() {
            VmExit::MmioRead {
                addr: 0x10_0000,
                data,
            } => data.fill(0x42),
            other => panic!("unexpected exit {other:?}"),
        }
        vcpu.reset().unwrap();
        let mut sregs = vcpu.sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&StandardRegisters {
            rip: 0x2000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
        match vcpu.run().unwrap() {
            VmExit::IoOut { port, .. } => assert_eq!(port, 0x80, "the old code ran on"),
            other => panic!("unexpected exit {other:?}"),
        }
    }

    #[test]
    fn kick_interrupts_a_spinning_vcpu() {
        let Some((_kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        mem.write_slice(&[0xeb, 0xfe], GuestAddress(0x1000))
            .unwrap(); // jmp $
        let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x1000);
        let kicker = vcpu.kicker().unwrap();
        let k = kicker.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            k.kick();
        });
        assert!(matches!(vcpu.run().unwrap(), VmExit::Interrupted));
        vcpu.clear_kick();
        t.join().unwrap();
        // A kick before run() is not lost either.
        kicker.kick();
        assert!(matches!(vcpu.run().unwrap(), VmExit::Interrupted));
    }
}

#[cfg(test)]
mod cpuid_tests {
    use super::tests_support::*;
    use super::*;
    use crate::arch::x86_64::cpuid::CpuidPolicy;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn guest_cpuid_hides_what_the_policy_hides() {
        let Some((kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        // mov eax,1; xor ecx,ecx; cpuid; mov eax,ecx; out 0x80,eax (32-bit operands in 16-bit code)
        let code = [
            0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x66, 0x31, 0xc9, 0x0f, 0xa2, 0x66, 0x89, 0xc8,
            0x66, 0xe7, 0x80,
        ];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x1000);
        let supported = kvm.supported_cpuid().unwrap();
        let policy = CpuidPolicy::new(1, false);
        let applied = policy.apply(&supported, 0);
        let applied_ecx = applied
            .iter()
            .find(|e| e.function == 1)
            .map_or(0, |e| e.ecx);
        vcpu.set_cpuid(&applied).unwrap();
        match vcpu.run().unwrap() {
            VmExit::IoOut {
                port: 0x80,
                size: 4,
                data,
            } => {
                let ecx = u32::from_le_bytes(data.try_into().unwrap());
                let foreign = ecx & !applied_ecx;
                if foreign != 0 {
                    // Measured on the build machines: their paravirtual KVM shows the guest
                    // feature bits that KVM_SET_CPUID2 did not set (XSAVE, AVX among them), so
                    // hiding by CPUID cannot work there; Linux guests need `noxsave`.
                    eprintln!(
                        "skipping: this host's KVM adds CPUID bits {foreign:#x} to the table we set ({applied_ecx:#x})"
                    );
                    return;
                }
                assert_eq!(ecx & (1 << 26), 0, "xsave visible: ecx {ecx:#x}");
                assert_eq!(ecx & (1 << 13), 0, "cx16 visible: ecx {ecx:#x}");
                assert_ne!(ecx & (1 << 31), 0, "hypervisor bit missing: ecx {ecx:#x}");
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }

    #[test]
    fn guest_sees_no_kvm_paravirtual_features_that_make_hypercalls() {
        let Some((kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        // mov eax,0x40000001; cpuid; out 0x80,eax (32-bit operands in 16-bit code)
        let code = [
            0x66, 0xb8, 0x01, 0x00, 0x00, 0x40, 0x0f, 0xa2, 0x66, 0xe7, 0x80,
        ];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        let mut vcpu = start_real_mode_vcpu(vm.as_ref(), 0x1000);
        let supported = kvm.supported_cpuid().unwrap();
        let offered = supported
            .iter()
            .find(|e| e.function == crate::arch::x86_64::cpuid::KVM_CPUID_FEATURES)
            .map_or(0, |e| e.eax);
        vcpu.set_cpuid(&CpuidPolicy::new(1, false).apply(&supported, 0))
            .unwrap();
        match vcpu.run().unwrap() {
            VmExit::IoOut {
                port: 0x80,
                size: 4,
                data,
            } => {
                let eax = u32::from_le_bytes(data.try_into().unwrap());
                eprintln!(
                    "KVM_GET_SUPPORTED_CPUID 0x40000001.eax {offered:#x}; the guest sees {eax:#x}"
                );
                assert_eq!(
                    eax & crate::arch::x86_64::cpuid::KVM_PV_HIDDEN,
                    0,
                    "the guest sees hypercall features: {eax:#x}"
                );
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
}
