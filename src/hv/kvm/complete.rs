//! The vCPU state the shared instruction completer needs, from KVM: the XSAVE image
//! (KVM_GET/SET_XSAVE), XCR0 (KVM_GET/SET_XCRS) and IA32_XSS (KVM_GET_MSRS). Everything is
//! allocated when the vCPU is created, so a completion allocates nothing.

use kvm_bindings::{kvm_msr_entry, kvm_xcrs, kvm_xsave, Msrs};
use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::emulate::complete::{CompleteError, Component, ExtendedState};

const MSR_IA32_XSS: u32 = 0xda0;
/// Bytes in KVM's (non-XSAVE2) image.
const XSAVE_IMAGE_BYTES: usize = 4096;

/// What a vCPU keeps for completions.
pub struct CompletionBuffers {
    xsave: Box<kvm_xsave>,
    xss: Msrs,
    layout: [Option<Component>; 63],
}

impl CompletionBuffers {
    pub fn new() -> Result<Self, &'static str> {
        let xss = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_XSS,
            ..Default::default()
        }])
        .map_err(|_| "MSR list too large")?;
        Ok(CompletionBuffers {
            xsave: Box::default(),
            xss,
            layout: host_layout(),
        })
    }
}

/// The standard-format layout of the state components: the host's CPUID leaf 0xD, which is
/// the layout KVM's XSAVE image uses whatever the guest's CPUID says.
fn host_layout() -> [Option<Component>; 63] {
    let mut layout = [None; 63];
    for (index, slot) in layout.iter_mut().enumerate().skip(2) {
        // SAFETY: CPUID is available on every x86_64 processor; leaf 0xD sub-leaves past
        // the supported ones return zeros. (The intrinsic is safe from Rust 1.87 on.)
        #[allow(unused_unsafe)]
        let leaf = unsafe { std::arch::x86_64::__cpuid_count(0xd, index as u32) };
        if leaf.eax != 0 {
            *slot = Some(Component {
                offset: leaf.ebx,
                size: leaf.eax,
                align64: leaf.ecx & 2 != 0,
            });
        }
    }
    layout
}

/// One completion's view of a vCPU's extended state: read lazily, written back on `finish`.
pub struct KvmExtendedState<'a> {
    fd: &'a VcpuFd,
    buffers: &'a mut CompletionBuffers,
    loaded: bool,
    changed: bool,
}

impl<'a> KvmExtendedState<'a> {
    pub fn new(fd: &'a VcpuFd, buffers: &'a mut CompletionBuffers) -> Self {
        KvmExtendedState {
            fd,
            buffers,
            loaded: false,
            changed: false,
        }
    }

    /// Writes the image back if the instruction changed it.
    pub fn finish(self) -> Result<(), CompleteError> {
        if self.changed {
            // SAFETY: the buffer is a whole kvm_xsave read from this vCPU by KVM_GET_XSAVE;
            // without KVM_CAP_XSAVE2 the kernel reads exactly its 4096-byte region.
            unsafe { self.fd.set_xsave(&self.buffers.xsave) }
                .map_err(|_| CompleteError::State("KVM_SET_XSAVE failed"))?;
        }
        Ok(())
    }
}

impl ExtendedState for KvmExtendedState<'_> {
    fn xsave_area(&mut self) -> Result<&mut [u8], CompleteError> {
        if !self.loaded {
            *self.buffers.xsave = self
                .fd
                .get_xsave()
                .map_err(|_| CompleteError::State("KVM_GET_XSAVE failed"))?;
            self.loaded = true;
        }
        let region = &mut self.buffers.xsave.region;
        // SAFETY: `region` is 1024 u32s, 4096 initialised bytes that any byte pattern may
        // overwrite; the slice borrows it mutably for its whole life.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(region.as_mut_ptr().cast::<u8>(), XSAVE_IMAGE_BYTES)
        })
    }

    fn xsave_changed(&mut self) {
        self.changed = true;
    }

    fn xcr0(&mut self) -> Result<u64, CompleteError> {
        let xcrs = self
            .fd
            .get_xcrs()
            .map_err(|_| CompleteError::State("KVM_GET_XCRS failed"))?;
        let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        Ok(xcrs.xcrs[..count]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value))
    }

    fn set_xcr0(&mut self, value: u64) -> Result<(), CompleteError> {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = value;
        self.fd
            .set_xcrs(&xcrs)
            .map_err(|_| CompleteError::State("KVM_SET_XCRS refused the value"))
    }

    fn xss(&mut self) -> Result<u64, CompleteError> {
        let read = self
            .fd
            .get_msrs(&mut self.buffers.xss)
            .map_err(|_| CompleteError::State("KVM_GET_MSRS of IA32_XSS failed"))?;
        // A host without XSAVES has no IA32_XSS: nothing supervisor to save.
        Ok(match self.buffers.xss.as_slice().first() {
            Some(entry) if read == 1 => entry.data,
            _ => 0,
        })
    }

    fn component(&self, index: u32) -> Option<Component> {
        self.buffers.layout.get(index as usize).copied().flatten()
    }
}
