//! Completing, in the VMM, an instruction the hypervisor failed to emulate.
//!
//! This host's KVM emulates every guest instruction at CPL0 and gives up on some
//! (`KVM_EXIT_INTERNAL_ERROR`, suberror 1): software interrupts, the XSAVE family, `popcnt`,
//! `fwait`, `clac`/`stac`, `cmpxchg16b`, `ldmxcsr`. [`complete`] fetches the instruction at
//! CS:RIP through the guest's page tables, decodes it and carries it out against a copy of the
//! registers ([`Cpu`]), guest RAM and the vCPU's XSAVE image ([`ExtendedState`]).
//!
//! Rules: nothing changes unless the whole instruction succeeds (the caller writes the copy
//! back only on `Ok`; memory writes come last, after every read and every check, and a write
//! translates all its pages before it stores a byte). Every access, the fetch included, is
//! checked against the guest's page tables as the processor checks it (U/S, R/W with CR0.WP,
//! NX, SMEP, SMAP with EFLAGS.AC, reserved bits); a refusal is [`CompleteError::PageFault`],
//! which the back end delivers. The accessed and dirty flags the walks call for are set
//! last, once the instruction commits, so a refused or faulting instruction leaves guest
//! memory untouched. Any other exception the instruction raises (#GP, #UD, #NP, #TS, #SS,
//! #MF, #NM, with the error code the processor pushes) is [`CompleteError::Fault`], which the
//! back end delivers too: the guest decides, as on hardware. That matters: Linux restores a
//! signal frame's extended state with `xrstor` straight from user memory and relies on the
//! #GP of a corrupt header reaching its exception-table fixup; refusing it instead would let
//! any unprivileged guest process stop the whole VM. A 64-bit memory operand must be
//! canonical (#GP, #SS through SS). Segment limits outside 64-bit mode, PAE PDPTE reserved
//! bits and protection keys are not modelled. No allocation.

mod simd;

use std::sync::atomic::{AtomicU64, Ordering};

use std::cell::RefCell;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use super::mmio::{CpuMode, InstructionBytes};
use super::paging::{
    host_phys_bits, Access, AccessKind, EntryUpdate, GuestRam, Paging, Privilege, WalkError,
};
use crate::hv::regs::{
    SegmentRegister, SpecialRegisters, StandardRegisters, CR0_PE, EFER_LMA, RFLAGS_IF,
};

const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;
const RFLAGS_AC: u64 = 1 << 18;
const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR4_LA57: u64 = 1 << 12;
const CR4_OSXSAVE: u64 = 1 << 18;

/// An IDT entry: its two quadwords (the second only in long mode) and its type.
struct Gate {
    low: u64,
    high: u64,
    gate_type: u8,
}

/// IDT gate and descriptor types.
const GATE_TASK: u8 = 0x5;
const GATE_INTERRUPT: u8 = 0xe;
const GATE_TRAP: u8 = 0xf;

/// Offsets in the XSAVE image (the legacy FXSAVE region, then the header at 512).
const XSAVE_FCW: usize = 0;
const XSAVE_FSW: usize = 2;
const XSAVE_MXCSR: usize = 24;
const XSAVE_MXCSR_MASK: usize = 28;
const XSAVE_XMM_START: usize = 160;
const XSAVE_XMM_END: usize = 416;
const XSAVE_HEADER: usize = 512;
const XSAVE_HEADER_SIZE: usize = 64;
const XSAVE_EXTENDED: usize = 576;
const XCOMP_BV_COMPACTED: u64 = 1 << 63;
const MXCSR_DEFAULT: u32 = 0x1f80;
/// The MXCSR_MASK a processor reports as 0 means this.
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;
const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const YMM: u64 = 1 << 2;

/// The instructions [`complete`] finishes, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Int3,
    IntN,
    Into,
    Popcnt,
    Lzcnt,
    Tzcnt,
    Fwait,
    Clac,
    Stac,
    Cmpxchg8b,
    Cmpxchg16b,
    Ldmxcsr,
    Stmxcsr,
    Fxsave,
    Fxrstor,
    Xsave,
    Xsaveopt,
    Xsavec,
    Xsaves,
    Xrstor,
    Xrstors,
    Xgetbv,
    Xsetbv,
    /// Load segment limit: Linux's paranoid entry (NMI, #DB, #MC) reads the CPU number from
    /// the CPUNODE descriptor's limit with it when the CPU has no RDPID.
    Lsl,
    /// Load access rights, LSL's twin.
    Lar,
    /// Integer SSE on XMM registers (the kernel's SSSE3 BLAKE2s).
    Sse,
    /// VEX/EVEX integer vector instructions (the kernel's AVX-512VL BLAKE2s).
    Avx,
    /// Not an instruction: a completed instruction's memory access faulted and the back end
    /// delivered #PF instead.
    PageFault,
    /// Not an instruction: a completed instruction raised another exception (#GP, #UD, ...)
    /// and the back end delivered it.
    Exception,
}

impl Kind {
    pub const ALL: [Kind; 29] = [
        Kind::Int3,
        Kind::IntN,
        Kind::Into,
        Kind::Popcnt,
        Kind::Lzcnt,
        Kind::Tzcnt,
        Kind::Fwait,
        Kind::Clac,
        Kind::Stac,
        Kind::Cmpxchg8b,
        Kind::Cmpxchg16b,
        Kind::Ldmxcsr,
        Kind::Stmxcsr,
        Kind::Fxsave,
        Kind::Fxrstor,
        Kind::Xsave,
        Kind::Xsaveopt,
        Kind::Xsavec,
        Kind::Xsaves,
        Kind::Xrstor,
        Kind::Xrstors,
        Kind::Xgetbv,
        Kind::Xsetbv,
        Kind::Lsl,
        Kind::Lar,
        Kind::Sse,
        Kind::Avx,
        Kind::PageFault,
        Kind::Exception,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Int3 => "int3",
            Kind::IntN => "int n",
            Kind::Into => "into",
            Kind::Popcnt => "popcnt",
            Kind::Lzcnt => "lzcnt",
            Kind::Tzcnt => "tzcnt",
            Kind::Fwait => "fwait",
            Kind::Clac => "clac",
            Kind::Stac => "stac",
            Kind::Cmpxchg8b => "cmpxchg8b",
            Kind::Cmpxchg16b => "cmpxchg16b",
            Kind::Ldmxcsr => "ldmxcsr",
            Kind::Stmxcsr => "stmxcsr",
            Kind::Fxsave => "fxsave",
            Kind::Fxrstor => "fxrstor",
            Kind::Xsave => "xsave",
            Kind::Xsaveopt => "xsaveopt",
            Kind::Xsavec => "xsavec",
            Kind::Xsaves => "xsaves",
            Kind::Xrstor => "xrstor",
            Kind::Xrstors => "xrstors",
            Kind::Xgetbv => "xgetbv",
            Kind::Xsetbv => "xsetbv",
            Kind::Lsl => "lsl",
            Kind::Lar => "lar",
            Kind::Sse => "sse",
            Kind::Avx => "avx",
            Kind::PageFault => "#PF delivered",
            Kind::Exception => "other exceptions delivered",
        }
    }

    fn of(mnemonic: Mnemonic) -> Option<Kind> {
        Some(match mnemonic {
            Mnemonic::Int3 => Kind::Int3,
            Mnemonic::Int => Kind::IntN,
            Mnemonic::Into => Kind::Into,
            Mnemonic::Popcnt => Kind::Popcnt,
            Mnemonic::Lzcnt => Kind::Lzcnt,
            Mnemonic::Tzcnt => Kind::Tzcnt,
            Mnemonic::Wait => Kind::Fwait,
            Mnemonic::Clac => Kind::Clac,
            Mnemonic::Stac => Kind::Stac,
            Mnemonic::Cmpxchg8b => Kind::Cmpxchg8b,
            Mnemonic::Cmpxchg16b => Kind::Cmpxchg16b,
            Mnemonic::Ldmxcsr | Mnemonic::Vldmxcsr => Kind::Ldmxcsr,
            Mnemonic::Stmxcsr | Mnemonic::Vstmxcsr => Kind::Stmxcsr,
            Mnemonic::Fxsave | Mnemonic::Fxsave64 => Kind::Fxsave,
            Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => Kind::Fxrstor,
            Mnemonic::Xsave | Mnemonic::Xsave64 => Kind::Xsave,
            Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => Kind::Xsaveopt,
            Mnemonic::Xsavec | Mnemonic::Xsavec64 => Kind::Xsavec,
            Mnemonic::Xsaves | Mnemonic::Xsaves64 => Kind::Xsaves,
            Mnemonic::Xrstor | Mnemonic::Xrstor64 => Kind::Xrstor,
            Mnemonic::Xrstors | Mnemonic::Xrstors64 => Kind::Xrstors,
            Mnemonic::Xgetbv => Kind::Xgetbv,
            Mnemonic::Xsetbv => Kind::Xsetbv,
            Mnemonic::Lsl => Kind::Lsl,
            Mnemonic::Lar => Kind::Lar,
            _ => return None,
        })
    }
}

/// Completions per [`Kind`]: a fixed array of atomic counters, shared by every vCPU.
pub struct CompletionCounts {
    counts: [AtomicU64; Kind::ALL.len()],
}

impl CompletionCounts {
    pub const fn new() -> Self {
        CompletionCounts {
            counts: [const { AtomicU64::new(0) }; Kind::ALL.len()],
        }
    }

    pub fn record(&self, kind: Kind) {
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, kind: Kind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }

    /// "int3 12, fwait 35", or "none".
    pub fn summary(&self) -> String {
        let parts: Vec<String> = Kind::ALL
            .iter()
            .filter(|&&k| self.get(k) > 0)
            .map(|&k| format!("{} {}", k.name(), self.get(k)))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

impl Default for CompletionCounts {
    fn default() -> Self {
        CompletionCounts::new()
    }
}

/// Every completion in this process (one VM per process).
pub static COMPLETIONS: CompletionCounts = CompletionCounts::new();

/// An exception a completed instruction raises, with the error code the processor pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
}

impl Exception {
    pub const UD: Exception = Exception::without_code(6);
    pub const NM: Exception = Exception::without_code(7);
    pub const MF: Exception = Exception::without_code(16);

    const fn without_code(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
        }
    }

    const fn with_code(vector: u8, code: u16) -> Self {
        Exception {
            vector,
            error_code: Some(code as u32),
        }
    }

    /// #TS: the error code names the selector (RPL bits clear) or is 0.
    pub const fn ts(code: u16) -> Self {
        Exception::with_code(10, code)
    }

    pub const fn np(code: u16) -> Self {
        Exception::with_code(11, code)
    }

    pub const fn ss(code: u16) -> Self {
        Exception::with_code(12, code)
    }

    pub const fn gp(code: u16) -> Self {
        Exception::with_code(13, code)
    }

    /// The error code for a selector: its index and table bit, RPL clear (EXT is 0: the
    /// completer only raises exceptions for the instruction it runs).
    const fn selector_code(selector: u16) -> u16 {
        selector & 0xfffc
    }

    /// The error code for an IDT entry (IDT bit set).
    const fn idt_code(vector: u8) -> u16 {
        (vector as u16) << 3 | 2
    }

    pub fn name(self) -> &'static str {
        match self.vector {
            6 => "#UD",
            7 => "#NM",
            10 => "#TS",
            11 => "#NP",
            12 => "#SS",
            13 => "#GP",
            16 => "#MF",
            _ => "an exception",
        }
    }
}

impl std::fmt::Display for Exception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error_code {
            Some(code) => write!(f, "{}({code:#x})", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CompleteError {
    #[error("cannot fetch the instruction at linear address {linear:#x}")]
    Fetch { linear: u64 },
    #[error("cannot decode the instruction (bytes: {bytes})")]
    Decode { bytes: InstructionBytes },
    #[error("the VMM does not complete {mnemonic:?}")]
    Unsupported { mnemonic: Mnemonic },
    /// The instruction raises `exception` in the guest, as the processor would: the back end
    /// delivers it (nothing changed; RIP stays at the instruction) and the guest's handler
    /// decides, e.g. Linux's exception-table fixup for an `xrstor` of a corrupt user signal
    /// frame.
    #[error("{mnemonic:?} raises {exception} in the guest ({why})")]
    Fault {
        mnemonic: Mnemonic,
        exception: Exception,
        why: &'static str,
    },
    #[error("guest linear address {linear:#x} ({size} bytes) is not mapped to RAM")]
    Memory { linear: u64, size: usize },
    /// The instruction's memory access faults in the guest: the back end delivers #PF (CR2 =
    /// `linear`) and the guest's handler decides, as on hardware.
    #[error("#PF at linear address {linear:#x} (error code {error_code:#x})")]
    PageFault { linear: u64, error_code: u32 },
    #[error("the instruction uses more than {MAX_ENTRY_UPDATES} paging-structure entries")]
    TooManyEntries,
    #[error("the vCPU's extended state is unavailable: {0}")]
    State(&'static str),
}

/// Where a state component lives: CPUID.(EAX=0DH, ECX=i) of the machine whose XSAVE image
/// [`ExtendedState::xsave_area`] returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Component {
    /// Offset in the standard (non-compacted) format.
    pub offset: u32,
    pub size: u32,
    /// Aligned to 64 bytes in the compacted format.
    pub align64: bool,
}

/// The vCPU's x87/SSE/AVX state and XCR0, read only when an instruction needs them.
pub trait ExtendedState {
    /// The vCPU's XSAVE image in the standard format (KVM_GET_XSAVE's layout: legacy region,
    /// header at 512, component i at its CPUID offset), read fresh for each completion.
    fn xsave_area(&mut self) -> Result<&mut [u8], CompleteError>;
    /// The image was changed: write it back when the completion succeeds.
    fn xsave_changed(&mut self);
    fn xcr0(&mut self) -> Result<u64, CompleteError>;
    fn set_xcr0(&mut self, value: u64) -> Result<(), CompleteError>;
    /// IA32_XSS: the supervisor state components XSAVES/XRSTORS cover.
    fn xss(&mut self) -> Result<u64, CompleteError>;
    /// Layout of state component `index` (2..=62), `None` when unknown.
    fn component(&self, index: u32) -> Option<Component>;
}

/// The registers an instruction works on; the caller writes back what changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    pub regs: StandardRegisters,
    pub sregs: SpecialRegisters,
}

/// The decoding mode of CS (compatibility mode decodes as protected mode); `None` in
/// virtual-8086 mode, which nothing here supports.
pub fn decode_mode(cpu: &Cpu) -> Option<CpuMode> {
    let s = &cpu.sregs;
    if s.cr0 & CR0_PE == 0 {
        Some(CpuMode::Real)
    } else if cpu.regs.rflags & RFLAGS_VM != 0 {
        None
    } else if s.efer & EFER_LMA != 0 && s.cs.l {
        Some(CpuMode::Long64)
    } else if s.cs.db {
        Some(CpuMode::Protected32)
    } else {
        Some(CpuMode::Protected16)
    }
}

/// Fetches, decodes and completes the instruction at CS:RIP. On `Ok` the caller writes `cpu`
/// back (and the XSAVE image if it was marked changed); on `Err` nothing has changed.
pub fn complete(
    cpu: &mut Cpu,
    ram: &dyn GuestRam,
    ext: &mut dyn ExtendedState,
) -> Result<Kind, CompleteError> {
    let mode = decode_mode(cpu).ok_or(CompleteError::Unsupported {
        mnemonic: Mnemonic::INVALID,
    })?;
    let memory = Memory {
        ram,
        paging: Paging {
            cr0: cpu.sregs.cr0,
            cr3: cpu.sregs.cr3,
            cr4: cpu.sregs.cr4,
            efer: cpu.sregs.efer,
        },
        long_mode: cpu.sregs.efer & EFER_LMA != 0,
        phys_bits: host_phys_bits(),
        explicit: Privilege::at(cpu.sregs.cpl(), cpu.regs.rflags & RFLAGS_AC != 0),
        updates: RefCell::new(EntryUpdates {
            entries: [EntryUpdate::default(); MAX_ENTRY_UPDATES],
            len: 0,
        }),
    };
    let linear = memory.wrap(cpu.sregs.cs.base.wrapping_add(cpu.regs.rip));
    let mut bytes = [0u8; 15];
    let (fetched, stopped) = memory.fetch(linear, mode, &mut bytes);
    let fetch_failed = |stopped: Option<CompleteError>| match stopped {
        Some(fault @ CompleteError::PageFault { .. }) => fault,
        _ => CompleteError::Fetch { linear },
    };
    if fetched == 0 {
        return Err(fetch_failed(stopped));
    }
    let bitness = match mode {
        CpuMode::Real | CpuMode::Protected16 => 16,
        CpuMode::Protected32 => 32,
        CpuMode::Long64 => 64,
    };
    let mut decoder = Decoder::with_ip(
        bitness,
        &bytes[..fetched],
        cpu.regs.rip,
        DecoderOptions::NONE,
    );
    let instr = decoder.decode();
    if instr.is_invalid() {
        // Cut short by the page that could not be fetched: that fetch is what faults.
        if decoder.last_error() == DecoderError::NoMoreBytes && stopped.is_some() {
            return Err(fetch_failed(stopped));
        }
        return Err(CompleteError::Decode {
            bytes: InstructionBytes::new(&bytes[..fetched]),
        });
    }
    // Only the pages holding the instruction's own bytes count as fetched.
    memory.record_fetch(linear, mode, instr.len())?;
    let kind = Kind::of(instr.mnemonic());
    if kind.is_none() && !simd::is_simd(instr.mnemonic()) {
        return Err(CompleteError::Unsupported {
            mnemonic: instr.mnemonic(),
        });
    }
    let mut next = *cpu;
    next.regs.rip = next_ip(cpu.regs.rip, instr.len(), mode);
    let mut op = Op {
        cpu: &mut next,
        memory: &memory,
        instr: &instr,
        mode,
    };
    let kind = match kind {
        Some(kind) => {
            op.run(kind, ext)?;
            kind
        }
        None => op.complete_simd(ext)?,
    };
    memory.commit();
    *cpu = next;
    Ok(kind)
}

/// Whether `address` is canonical: bits 63..47 (63..56 with 5-level paging) all equal.
fn canonical(address: u64, la57: bool) -> bool {
    let unused = if la57 { 7 } else { 16 };
    ((address << unused) as i64 >> unused) as u64 == address
}

/// The instruction pointer after `len` bytes: it wraps at 16 bits in real mode and 16-bit
/// code, at 32 bits in 32-bit code.
fn next_ip(rip: u64, len: usize, mode: CpuMode) -> u64 {
    let next = rip.wrapping_add(len as u64);
    match mode {
        CpuMode::Real | CpuMode::Protected16 => next & 0xffff,
        CpuMode::Protected32 => next & 0xffff_ffff,
        CpuMode::Long64 => next,
    }
}

/// The most paging-structure entries one instruction's walks can use: the most pages one
/// touches (a 64-bit software interrupt: two each for its fetch, the IDT gate, the code
/// descriptor, the TSS slot and the stack frame; the XSAVE family: two for the fetch and a
/// 4 KiB area) times five levels, with room to spare.
const MAX_ENTRY_UPDATES: usize = 80;

/// The accessed/dirty flags an instruction's accesses would set, kept until it commits.
struct EntryUpdates {
    entries: [EntryUpdate; MAX_ENTRY_UPDATES],
    len: usize,
}

impl EntryUpdates {
    /// Merges with an entry already recorded (the upper levels of neighbouring pages);
    /// false when full.
    fn add(&mut self, update: &EntryUpdate) -> bool {
        if let Some(known) = self.entries[..self.len]
            .iter_mut()
            .find(|e| e.gpa == update.gpa)
        {
            known.set |= update.set;
            return true;
        }
        let Some(slot) = self.entries.get_mut(self.len) else {
            return false;
        };
        *slot = *update;
        self.len += 1;
        true
    }
}

/// Guest memory by linear address, through the guest's page tables.
struct Memory<'a> {
    ram: &'a dyn GuestRam,
    paging: Paging,
    long_mode: bool,
    /// The guest's MAXPHYADDR, for the reserved-bit checks.
    phys_bits: u8,
    /// Who the instruction's own operands are accessed as: its CPL and EFLAGS.AC.
    explicit: Privilege,
    updates: RefCell<EntryUpdates>,
}

impl Memory<'_> {
    /// Linear addresses are 32 bits outside long mode.
    fn wrap(&self, linear: u64) -> u64 {
        if self.long_mode {
            linear
        } else {
            linear & 0xffff_ffff
        }
    }

    /// Checks one access to the page holding `at` and records the flags it sets. `Ok(None)`:
    /// a paging structure is not RAM.
    fn translate(
        &self,
        at: u64,
        access: Access,
        record: bool,
    ) -> Result<Option<u64>, CompleteError> {
        let t = match self.paging.walk(self.ram, at, access, self.phys_bits) {
            Ok(t) => t,
            Err(WalkError::PageFault { error_code }) => {
                return Err(CompleteError::PageFault {
                    linear: at,
                    error_code,
                })
            }
            Err(WalkError::NotRam) => return Ok(None),
        };
        if record {
            let mut updates = self.updates.borrow_mut();
            if !t.updates().iter().all(|u| updates.add(u)) {
                return Err(CompleteError::TooManyEntries);
            }
        }
        Ok(Some(t.gpa))
    }

    /// Sets the accessed/dirty flags the instruction's accesses call for: it commits.
    fn commit(&self) {
        let updates = self.updates.borrow();
        for update in &updates.entries[..updates.len] {
            // The walk read each entry from RAM; one that has gone cannot be set.
            update.apply(self.ram);
        }
    }

    /// Visits the page-bounded chunks of `len` bytes at `linear` with their guest-physical
    /// addresses. A chunk the guest's page tables do not allow is the #PF the instruction
    /// raises (at the first faulting byte); a chunk outside RAM is an error for the VMM.
    /// `record`: the access is made, so its accessed/dirty flags are due at commit.
    fn chunks(
        &self,
        linear: u64,
        len: usize,
        access: Access,
        record: bool,
        mut each: impl FnMut(u64, usize, usize) -> bool,
    ) -> Result<(), CompleteError> {
        let mut done = 0;
        while done < len {
            let at = self.wrap(linear.wrapping_add(done as u64));
            let chunk = ((0x1000 - (at & 0xfff)) as usize).min(len - done);
            match self.translate(at, access, record)? {
                Some(gpa) if each(gpa, done, chunk) => done += chunk,
                _ => return Err(CompleteError::Memory { linear, size: len }),
            }
        }
        Ok(())
    }

    fn read_as(
        &self,
        privilege: Privilege,
        linear: u64,
        buf: &mut [u8],
    ) -> Result<(), CompleteError> {
        let len = buf.len();
        let access = Access {
            kind: AccessKind::Read,
            privilege,
        };
        self.chunks(linear, len, access, true, |gpa, at, chunk| {
            self.ram.read(gpa, &mut buf[at..at + chunk])
        })
    }

    /// Reads up to `buf.len()` instruction bytes at `linear`, page by page: how many, and
    /// why it stopped short.
    fn fetch(&self, linear: u64, mode: CpuMode, buf: &mut [u8]) -> (usize, Option<CompleteError>) {
        let mut done = 0;
        while done < buf.len() {
            let at = self.code_address(linear, done, mode);
            let chunk = ((0x1000 - (at & 0xfff)) as usize).min(buf.len() - done);
            match self.translate(at, self.fetch_access(), false) {
                Ok(Some(gpa)) if self.ram.read(gpa, &mut buf[done..done + chunk]) => done += chunk,
                Ok(_) => return (done, Some(CompleteError::Fetch { linear: at })),
                Err(e) => return (done, Some(e)),
            }
        }
        (done, None)
    }

    /// Records the accessed flags of the pages holding the `len` instruction bytes at
    /// `linear`, already fetched.
    fn record_fetch(&self, linear: u64, mode: CpuMode, len: usize) -> Result<(), CompleteError> {
        let mut done = 0;
        while done < len {
            let at = self.code_address(linear, done, mode);
            self.translate(at, self.fetch_access(), true)?
                .ok_or(CompleteError::Fetch { linear: at })?;
            done += ((0x1000 - (at & 0xfff)) as usize).min(len - done);
        }
        Ok(())
    }

    fn fetch_access(&self) -> Access {
        Access {
            kind: AccessKind::Fetch,
            privilege: self.explicit,
        }
    }

    /// The instruction pointer wraps at 32 bits outside 64-bit code.
    fn code_address(&self, linear: u64, offset: usize, mode: CpuMode) -> u64 {
        let at = linear.wrapping_add(offset as u64);
        if mode == CpuMode::Long64 {
            at
        } else {
            at & 0xffff_ffff
        }
    }

    /// A read of the instruction's own operand.
    fn read(&self, linear: u64, buf: &mut [u8]) -> Result<(), CompleteError> {
        self.read_as(self.explicit, linear, buf)
    }

    /// A read of a system structure (GDT, LDT, IDT, TSS): an implicit supervisor access.
    fn read_system(&self, linear: u64, buf: &mut [u8]) -> Result<(), CompleteError> {
        self.read_as(Privilege::Implicit, linear, buf)
    }

    fn read_system_u64(&self, linear: u64) -> Result<u64, CompleteError> {
        let mut b = [0u8; 8];
        self.read_system(linear, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u32(&self, linear: u64) -> Result<u32, CompleteError> {
        let mut b = [0u8; 4];
        self.read(linear, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Checks that `len` bytes at `linear` allow the access and are RAM, so that a later
    /// access there cannot fail halfway (a #PF on a later page must leave the earlier ones
    /// untouched). Sets no flags: the accesses themselves record theirs.
    fn check(&self, linear: u64, len: usize, kind: AccessKind) -> Result<(), CompleteError> {
        let access = Access {
            kind,
            privilege: self.explicit,
        };
        // Memory regions are whole pages, so a page's first byte being RAM covers the chunk.
        self.chunks(linear, len, access, false, |gpa, _, _| {
            self.ram.read(gpa, &mut [0u8; 1])
        })
    }

    fn write_as(
        &self,
        privilege: Privilege,
        linear: u64,
        data: &[u8],
    ) -> Result<(), CompleteError> {
        let access = Access {
            kind: AccessKind::Write,
            privilege,
        };
        self.chunks(linear, data.len(), access, false, |gpa, _, _| {
            self.ram.read(gpa, &mut [0u8; 1])
        })?;
        self.chunks(linear, data.len(), access, true, |gpa, at, chunk| {
            self.ram.write(gpa, &data[at..at + chunk])
        })
    }

    /// A write of the instruction's own operand.
    fn write(&self, linear: u64, data: &[u8]) -> Result<(), CompleteError> {
        self.write_as(self.explicit, linear, data)
    }
}

/// A segment descriptor read from the GDT or LDT.
#[derive(Clone, Copy, Debug)]
struct Descriptor {
    raw: u64,
}

impl Descriptor {
    fn type_(self) -> u8 {
        (self.raw >> 40) as u8 & 0xf
    }
    fn system(self) -> bool {
        self.raw >> 44 & 1 == 0
    }
    fn dpl(self) -> u8 {
        (self.raw >> 45) as u8 & 3
    }
    fn present(self) -> bool {
        self.raw >> 47 & 1 != 0
    }
    fn is_code(self) -> bool {
        !self.system() && self.type_() & 0x8 != 0
    }
    fn conforming(self) -> bool {
        self.is_code() && self.type_() & 0x4 != 0
    }
    fn writable_data(self) -> bool {
        !self.system() && self.type_() & 0xa == 0x2
    }

    /// The hidden part a segment register takes from this descriptor (accessed set).
    fn load(self, selector: u16) -> SegmentRegister {
        let d = self.raw;
        let granular = d >> 55 & 1 != 0;
        let mut limit = ((d & 0xffff) | (d >> 32 & 0xf_0000)) as u32;
        if granular {
            limit = limit << 12 | 0xfff;
        }
        SegmentRegister {
            base: (d >> 16 & 0xff_ffff) | (d >> 32 & 0xff00_0000),
            limit,
            selector,
            type_: self.type_() | 1,
            present: self.present(),
            dpl: self.dpl(),
            db: d >> 54 & 1 != 0,
            s: !self.system(),
            l: d >> 53 & 1 != 0,
            g: granular,
            avl: d >> 52 & 1 != 0,
            unusable: false,
        }
    }
}

/// A null SS with RPL `cpl`, as a 64-bit privilege change loads it.
fn null_stack_segment(cpl: u8) -> SegmentRegister {
    SegmentRegister {
        selector: u16::from(cpl),
        type_: 0x3,
        dpl: cpl,
        db: true,
        s: true,
        present: true,
        limit: 0xffff_ffff,
        g: true,
        unusable: true,
        ..SegmentRegister::default()
    }
}

/// One instruction being completed against a copy of the registers.
struct Op<'a> {
    cpu: &'a mut Cpu,
    memory: &'a Memory<'a>,
    instr: &'a Instruction,
    mode: CpuMode,
}

impl Op<'_> {
    fn fault(&self, exception: Exception, why: &'static str) -> CompleteError {
        CompleteError::Fault {
            mnemonic: self.instr.mnemonic(),
            exception,
            why,
        }
    }

    fn cpl(&self) -> u8 {
        self.cpu.sregs.cpl()
    }

    fn run(&mut self, kind: Kind, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        match kind {
            Kind::Int3 => self.software_interrupt(3),
            Kind::IntN => {
                let vector = self.instr.immediate8();
                self.software_interrupt(vector)
            }
            Kind::Into => {
                if self.mode == CpuMode::Long64 {
                    return Err(self.fault(Exception::UD, "into in 64-bit mode"));
                }
                if self.cpu.regs.rflags & RFLAGS_OF != 0 {
                    self.software_interrupt(4)
                } else {
                    Ok(())
                }
            }
            Kind::Popcnt | Kind::Lzcnt | Kind::Tzcnt => self.bit_count(kind),
            Kind::Fwait => self.fwait(ext),
            Kind::Clac | Kind::Stac => {
                if self.cpl() != 0 {
                    return Err(self.fault(Exception::UD, "clac/stac outside ring 0"));
                }
                if kind == Kind::Stac {
                    self.cpu.regs.rflags |= RFLAGS_AC;
                } else {
                    self.cpu.regs.rflags &= !RFLAGS_AC;
                }
                Ok(())
            }
            Kind::Cmpxchg8b | Kind::Cmpxchg16b => self.cmpxchg(kind == Kind::Cmpxchg16b),
            Kind::Ldmxcsr => self.ldmxcsr(ext),
            Kind::Stmxcsr => self.stmxcsr(ext),
            Kind::Fxsave => self.fxsave(ext),
            Kind::Fxrstor => self.fxrstor(ext),
            Kind::Xsave | Kind::Xsaveopt | Kind::Xsavec | Kind::Xsaves => self.xsave(kind, ext),
            Kind::Xrstor | Kind::Xrstors => self.xrstor(kind == Kind::Xrstors, ext),
            Kind::Xgetbv => self.xgetbv(ext),
            Kind::Xsetbv => self.xsetbv(ext),
            Kind::Lsl | Kind::Lar => self.load_segment_attribute(kind == Kind::Lsl),
            Kind::Sse | Kind::Avx => self.complete_simd(ext).map(|_| ()),
            // Kind::of never yields it: it counts deliveries, not an instruction.
            Kind::PageFault | Kind::Exception => Err(CompleteError::Unsupported {
                mnemonic: self.instr.mnemonic(),
            }),
        }
    }

    // ---- registers and operands ----

    fn gpr_slot(regs: &mut StandardRegisters, full: Register) -> Option<&mut u64> {
        Some(match full {
            Register::RAX => &mut regs.rax,
            Register::RCX => &mut regs.rcx,
            Register::RDX => &mut regs.rdx,
            Register::RBX => &mut regs.rbx,
            Register::RSP => &mut regs.rsp,
            Register::RBP => &mut regs.rbp,
            Register::RSI => &mut regs.rsi,
            Register::RDI => &mut regs.rdi,
            Register::R8 => &mut regs.r8,
            Register::R9 => &mut regs.r9,
            Register::R10 => &mut regs.r10,
            Register::R11 => &mut regs.r11,
            Register::R12 => &mut regs.r12,
            Register::R13 => &mut regs.r13,
            Register::R14 => &mut regs.r14,
            Register::R15 => &mut regs.r15,
            _ => return None,
        })
    }

    /// The value of a GPR of any size.
    fn read_gpr(&self, reg: Register) -> Option<u64> {
        let mut regs = self.cpu.regs;
        let full = *Self::gpr_slot(&mut regs, reg.full_register())?;
        Some(match reg {
            Register::AH | Register::CH | Register::DH | Register::BH => full >> 8 & 0xff,
            _ => full & size_mask(reg.size()),
        })
    }

    /// 32-bit writes zero-extend, 16-bit writes merge (no 8-bit destinations here).
    fn write_gpr(&mut self, reg: Register, value: u64) -> Result<(), CompleteError> {
        let size = reg.size();
        let mnemonic = self.instr.mnemonic();
        let slot = Self::gpr_slot(&mut self.cpu.regs, reg.full_register())
            .ok_or(CompleteError::Unsupported { mnemonic })?;
        *slot = match size {
            8 => value,
            4 => value & 0xffff_ffff,
            2 => *slot & !0xffff | value & 0xffff,
            _ => return Err(CompleteError::Unsupported { mnemonic }),
        };
        Ok(())
    }

    /// The linear address of the instruction's memory operand.
    fn memory_operand(&self) -> Result<u64, CompleteError> {
        let unsupported = CompleteError::Unsupported {
            mnemonic: self.instr.mnemonic(),
        };
        let index = (0..self.instr.op_count())
            .find(|&i| self.instr.op_kind(i) == OpKind::Memory)
            .ok_or(unsupported)?;
        let long = self.mode == CpuMode::Long64;
        let sregs = &self.cpu.sregs;
        let address = self.instr.virtual_address(index, 0, |reg, _, _| match reg {
            Register::FS => Some(sregs.fs.base),
            Register::GS => Some(sregs.gs.base),
            Register::ES | Register::CS | Register::SS | Register::DS if long => Some(0),
            Register::ES => Some(sregs.es.base),
            Register::CS => Some(sregs.cs.base),
            Register::SS => Some(sregs.ss.base),
            Register::DS => Some(sregs.ds.base),
            reg => self.read_gpr(reg),
        });
        let address = address.ok_or(unsupported)?;
        if long && !canonical(address, self.cpu.sregs.cr4 & CR4_LA57 != 0) {
            let exception = if self.instr.memory_segment() == Register::SS {
                Exception::ss(0)
            } else {
                Exception::gp(0)
            };
            return Err(self.fault(exception, "non-canonical memory operand"));
        }
        Ok(self.memory.wrap(address))
    }

    fn require_alignment(&self, linear: u64, align: u64) -> Result<(), CompleteError> {
        if linear % align != 0 {
            return Err(self.fault(Exception::gp(0), "misaligned memory operand"));
        }
        Ok(())
    }

    // ---- software interrupts ----

    fn software_interrupt(&mut self, vector: u8) -> Result<(), CompleteError> {
        if self.mode == CpuMode::Real {
            self.real_mode_interrupt(vector)
        } else if self.cpu.sregs.efer & EFER_LMA != 0 {
            self.long_mode_interrupt(vector)
        } else {
            self.protected_mode_interrupt(vector)
        }
    }

    /// The IVT: push FLAGS, CS, IP on SS:SP, clear IF, TF and AC, jump to the vector.
    fn real_mode_interrupt(&mut self, vector: u8) -> Result<(), CompleteError> {
        let entry = u64::from(vector) * 4;
        if entry + 3 > u64::from(self.cpu.sregs.idt.limit) {
            return Err(self.fault(Exception::gp(0), "vector beyond the IVT limit"));
        }
        let mut target = [0u8; 4];
        self.memory
            .read_system(self.cpu.sregs.idt.base.wrapping_add(entry), &mut target)?;
        let target = u32::from_le_bytes(target);
        let sp = self.cpu.regs.rsp & 0xffff;
        if sp < 6 && sp != 0 {
            return Err(self.fault(Exception::ss(0), "the stack wraps inside the frame"));
        }
        let new_sp = sp.wrapping_sub(6) & 0xffff;
        let regs = &self.cpu.regs;
        let mut frame = [0u8; 6];
        frame[0..2].copy_from_slice(&(regs.rip as u16).to_le_bytes());
        frame[2..4].copy_from_slice(&self.cpu.sregs.cs.selector.to_le_bytes());
        frame[4..6].copy_from_slice(&(regs.rflags as u16).to_le_bytes());
        self.memory
            .write(self.cpu.sregs.ss.base.wrapping_add(new_sp), &frame)?;
        let regs = &mut self.cpu.regs;
        regs.rsp = regs.rsp & !0xffff | new_sp;
        regs.rflags &= !(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC);
        regs.rip = u64::from(target & 0xffff);
        let cs = &mut self.cpu.sregs.cs;
        cs.selector = (target >> 16) as u16;
        cs.base = u64::from(cs.selector) << 4;
        Ok(())
    }

    /// The descriptor `selector` names in the GDT or LDT; #GP if there is none.
    fn descriptor(&self, selector: u16) -> Result<Descriptor, CompleteError> {
        self.lookup_descriptor(selector)?.map_err(|why| {
            let code = if selector & !3 == 0 {
                0
            } else {
                Exception::selector_code(selector)
            };
            self.fault(Exception::gp(code), why)
        })
    }

    /// The descriptor `selector` names, or why there is none (a null selector, an absent
    /// LDT, beyond the table's limit): the caller decides whether that faults.
    fn lookup_descriptor(
        &self,
        selector: u16,
    ) -> Result<Result<Descriptor, &'static str>, CompleteError> {
        if selector & !3 == 0 {
            return Ok(Err("null selector"));
        }
        let (base, limit) = if selector & 4 != 0 {
            let ldt = &self.cpu.sregs.ldt;
            if ldt.unusable || !ldt.present {
                return Ok(Err("selector in an absent LDT"));
            }
            (ldt.base, u64::from(ldt.limit))
        } else {
            let gdt = &self.cpu.sregs.gdt;
            (gdt.base, u64::from(gdt.limit))
        };
        let offset = u64::from(selector & !7);
        if offset + 7 > limit {
            return Ok(Err("selector beyond the descriptor table limit"));
        }
        Ok(Ok(Descriptor {
            raw: self.memory.read_system_u64(base.wrapping_add(offset))?,
        }))
    }

    /// The gate's code segment and the privilege level the handler runs at.
    fn handler_segment(
        &self,
        selector: u16,
        long: bool,
    ) -> Result<(Descriptor, u8), CompleteError> {
        let code = self.descriptor(selector)?;
        let error_code = Exception::selector_code(selector);
        if !code.is_code() {
            return Err(self.fault(
                Exception::gp(error_code),
                "the gate's selector is not a code segment",
            ));
        }
        if !code.present() {
            return Err(self.fault(
                Exception::np(error_code),
                "the handler's code segment is not present",
            ));
        }
        let cpl = self.cpl();
        if code.dpl() > cpl {
            return Err(self.fault(
                Exception::gp(error_code),
                "the handler's code segment is less privileged",
            ));
        }
        let loaded = code.load(selector);
        if long && (!loaded.l || loaded.db) {
            return Err(self.fault(
                Exception::gp(error_code),
                "the handler's code segment is not 64-bit",
            ));
        }
        let new_cpl = if code.conforming() { cpl } else { code.dpl() };
        Ok((code, new_cpl))
    }

    /// Reads `N` bytes at `offset` in the TSS, within TR's limit.
    fn tss_read<const N: usize>(&self, offset: u64) -> Result<[u8; N], CompleteError> {
        let tr = &self.cpu.sregs.tr;
        if tr.unusable || offset + N as u64 - 1 > u64::from(tr.limit) {
            return Err(self.fault(
                Exception::ts(Exception::selector_code(tr.selector)),
                "the stack pointer lies beyond the TSS limit",
            ));
        }
        let mut b = [0u8; N];
        self.memory
            .read_system(tr.base.wrapping_add(offset), &mut b)?;
        Ok(b)
    }

    /// RFLAGS as the handler starts: TF, NT, RF and VM clear, IF too through an interrupt gate.
    fn handler_rflags(rflags: u64, gate_type: u8) -> u64 {
        let mut flags = rflags & !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
        if gate_type == GATE_INTERRUPT {
            flags &= !RFLAGS_IF;
        }
        flags
    }

    /// The IDT's interrupt or trap gate for software interrupt `vector` (16 bytes in long
    /// mode, 8 in protected mode), checked as INT n checks it.
    fn interrupt_gate(&self, vector: u8, long: bool) -> Result<Gate, CompleteError> {
        let size: u64 = if long { 16 } else { 8 };
        let entry = u64::from(vector) * size;
        let error_code = Exception::idt_code(vector);
        if entry + size - 1 > u64::from(self.cpu.sregs.idt.limit) {
            return Err(self.fault(Exception::gp(error_code), "vector beyond the IDT limit"));
        }
        let gate_at = self.cpu.sregs.idt.base.wrapping_add(entry);
        let low = self.memory.read_system_u64(gate_at)?;
        let high = if long {
            self.memory.read_system_u64(gate_at.wrapping_add(8))?
        } else {
            0
        };
        let gate_type = (low >> 40) as u8 & 0xf;
        let gate_dpl = (low >> 45) as u8 & 3;
        if !long && gate_type == GATE_TASK {
            // A task switch is not modelled: the VMM stops rather than fake one.
            return Err(CompleteError::Unsupported {
                mnemonic: self.instr.mnemonic(),
            });
        }
        if gate_type != GATE_INTERRUPT && gate_type != GATE_TRAP {
            return Err(self.fault(
                Exception::gp(error_code),
                "not an interrupt or trap gate of this mode",
            ));
        }
        if self.cpl() > gate_dpl {
            return Err(self.fault(
                Exception::gp(error_code),
                "gate DPL below CPL for a software interrupt",
            ));
        }
        if low >> 47 & 1 == 0 {
            return Err(self.fault(Exception::np(error_code), "the gate is not present"));
        }
        Ok(Gate {
            low,
            high,
            gate_type,
        })
    }

    /// A 16-byte IDT gate; IST stacks and the privilege change from the 64-bit TSS; the frame
    /// is always SS, RSP, RFLAGS, CS, RIP on a 16-byte aligned stack.
    fn long_mode_interrupt(&mut self, vector: u8) -> Result<(), CompleteError> {
        let Gate {
            low,
            high,
            gate_type,
        } = self.interrupt_gate(vector, true)?;
        let cpl = self.cpl();
        let selector = (low >> 16) as u16;
        let target = (low & 0xffff) | (low >> 32 & 0xffff_0000) | (high & 0xffff_ffff) << 32;
        let (code, new_cpl) = self.handler_segment(selector, true)?;
        let ist = (low >> 32) & 7;
        let rsp = if ist != 0 {
            u64::from_le_bytes(self.tss_read::<8>(0x24 + (ist - 1) * 8)?)
        } else if new_cpl < cpl {
            u64::from_le_bytes(self.tss_read::<8>(4 + u64::from(new_cpl) * 8)?)
        } else {
            self.cpu.regs.rsp
        } & !0xf;
        let regs = self.cpu.regs;
        let sregs = self.cpu.sregs;
        let frame_values = [
            regs.rip,
            u64::from(sregs.cs.selector),
            regs.rflags,
            regs.rsp,
            u64::from(sregs.ss.selector),
        ];
        let mut frame = [0u8; 40];
        for (slot, value) in frame.chunks_exact_mut(8).zip(frame_values) {
            slot.copy_from_slice(&value.to_le_bytes());
        }
        let new_rsp = rsp.wrapping_sub(40);
        // The frame is pushed at the handler's privilege.
        let pusher = Privilege::at(new_cpl, regs.rflags & RFLAGS_AC != 0);
        self.memory.write_as(pusher, new_rsp, &frame)?;
        self.cpu.regs.rsp = new_rsp;
        self.cpu.regs.rip = target;
        self.cpu.regs.rflags = Self::handler_rflags(regs.rflags, gate_type);
        self.cpu.sregs.cs = code.load(selector & !3 | u16::from(new_cpl));
        if new_cpl != cpl {
            self.cpu.sregs.ss = null_stack_segment(new_cpl);
        }
        Ok(())
    }

    /// An 8-byte 32-bit interrupt or trap gate; a privilege change takes SS:ESP from the
    /// 32-bit TSS and pushes the old SS:ESP first.
    fn protected_mode_interrupt(&mut self, vector: u8) -> Result<(), CompleteError> {
        let Gate {
            low: gate,
            gate_type,
            ..
        } = self.interrupt_gate(vector, false)?;
        let cpl = self.cpl();
        let selector = (gate >> 16) as u16;
        let target = (gate & 0xffff) | (gate >> 32 & 0xffff_0000);
        let (code, new_cpl) = self.handler_segment(selector, false)?;
        let regs = self.cpu.regs;
        let sregs = self.cpu.sregs;
        let old_esp = regs.rsp & 0xffff_ffff;
        let (stack, esp, frame_len) = if new_cpl < cpl {
            let tss_offset = 4 + u64::from(new_cpl) * 8;
            let esp = u32::from_le_bytes(self.tss_read::<4>(tss_offset)?);
            let ss_selector = u16::from_le_bytes(self.tss_read::<2>(tss_offset + 4)?);
            let ss = self.descriptor(ss_selector)?;
            let error_code = Exception::selector_code(ss_selector);
            if !ss.writable_data() || ss.dpl() != new_cpl || ss_selector & 3 != u16::from(new_cpl) {
                return Err(self.fault(
                    Exception::ts(error_code),
                    "the TSS stack segment does not fit the new CPL",
                ));
            }
            if !ss.present() {
                return Err(self.fault(
                    Exception::ss(error_code),
                    "the TSS stack segment is not present",
                ));
            }
            (ss.load(ss_selector), u64::from(esp), 20usize)
        } else {
            (sregs.ss, old_esp, 12usize)
        };
        // A 16-bit stack segment (B clear) addresses with SP.
        let (esp_mask, new_esp) = if stack.db {
            (
                0xffff_ffffu64,
                esp.wrapping_sub(frame_len as u64) & 0xffff_ffff,
            )
        } else {
            (0xffffu64, esp.wrapping_sub(frame_len as u64) & 0xffff)
        };
        let mut values = [0u32; 5];
        values[0] = regs.rip as u32;
        values[1] = u32::from(sregs.cs.selector);
        values[2] = regs.rflags as u32;
        values[3] = old_esp as u32;
        values[4] = u32::from(sregs.ss.selector);
        let mut frame = [0u8; 20];
        for (slot, value) in frame.chunks_exact_mut(4).zip(values) {
            slot.copy_from_slice(&value.to_le_bytes());
        }
        let pusher = Privilege::at(new_cpl, regs.rflags & RFLAGS_AC != 0);
        self.memory.write_as(
            pusher,
            stack.base.wrapping_add(new_esp),
            &frame[..frame_len],
        )?;
        let rsp = if new_cpl < cpl {
            new_esp
        } else {
            regs.rsp & !esp_mask | new_esp
        };
        self.cpu.regs.rsp = rsp;
        self.cpu.regs.rip = target;
        self.cpu.regs.rflags = Self::handler_rflags(regs.rflags, gate_type);
        self.cpu.sregs.cs = code.load(selector & !3 | u16::from(new_cpl));
        if new_cpl < cpl {
            self.cpu.sregs.ss = stack;
        }
        Ok(())
    }

    // ---- bit counts ----

    fn bit_count(&mut self, kind: Kind) -> Result<(), CompleteError> {
        let dst = self.instr.op0_register();
        let size = dst.size();
        let source = match self.instr.op1_kind() {
            OpKind::Register => self.read_gpr(self.instr.op1_register()),
            OpKind::Memory => {
                let mut b = [0u8; 8];
                self.memory.read(self.memory_operand()?, &mut b[..size])?;
                Some(u64::from_le_bytes(b))
            }
            _ => None,
        };
        let mnemonic = self.instr.mnemonic();
        let source = source.ok_or(CompleteError::Unsupported { mnemonic })? & size_mask(size);
        let bits = size as u32 * 8;
        let flags = &mut self.cpu.regs.rflags;
        let result = match kind {
            Kind::Popcnt => {
                // ZF = source is zero; OF, SF, AF, CF and PF are cleared.
                *flags &= !(RFLAGS_OF | RFLAGS_SF | RFLAGS_ZF | RFLAGS_AF | RFLAGS_CF | RFLAGS_PF);
                if source == 0 {
                    *flags |= RFLAGS_ZF;
                }
                u64::from(source.count_ones())
            }
            _ => {
                // CF = source is zero, ZF = result is zero; OF, SF, PF and AF are undefined
                // and left as they were.
                let count = if kind == Kind::Lzcnt {
                    (source << (64 - bits)).leading_zeros().min(bits)
                } else {
                    source.trailing_zeros().min(bits)
                };
                *flags &= !(RFLAGS_CF | RFLAGS_ZF);
                if source == 0 {
                    *flags |= RFLAGS_CF;
                }
                if count == 0 {
                    *flags |= RFLAGS_ZF;
                }
                u64::from(count)
            }
        };
        self.write_gpr(dst, result)
    }

    // ---- lsl / lar ----

    /// LSL and LAR: ZF=1 and the limit (or access rights) of the descriptor the selector
    /// names when the caller may see it, else ZF=0 and the destination unchanged. Neither
    /// faults on a bad selector, and neither checks the present bit (SDM vol. 2A).
    fn load_segment_attribute(&mut self, limit: bool) -> Result<(), CompleteError> {
        if self.mode == CpuMode::Real {
            return Err(self.fault(Exception::UD, "lsl/lar in real mode"));
        }
        let selector = match self.instr.op1_kind() {
            OpKind::Register => self.read_gpr(self.instr.op1_register()),
            OpKind::Memory => {
                let mut b = [0u8; 2];
                self.memory.read(self.memory_operand()?, &mut b)?;
                Some(u64::from(u16::from_le_bytes(b)))
            }
            _ => None,
        };
        let mnemonic = self.instr.mnemonic();
        let selector = selector.ok_or(CompleteError::Unsupported { mnemonic })? as u16;
        let visible = self.visible_descriptor(selector, limit)?;
        self.cpu.regs.rflags &= !RFLAGS_ZF;
        let Some(descriptor) = visible else {
            return Ok(());
        };
        self.cpu.regs.rflags |= RFLAGS_ZF;
        let value = if limit {
            u64::from(descriptor.load(selector).limit)
        } else {
            descriptor.raw >> 32 & 0x00f0_ff00
        };
        self.write_gpr(self.instr.op0_register(), value)
    }

    /// The descriptor LSL (`limit`) or LAR may report, or `None` (ZF=0): a null selector, one
    /// beyond its table, a system type the instruction does not accept in this mode, or a
    /// non-conforming segment less privileged than both CPL and RPL.
    fn visible_descriptor(
        &self,
        selector: u16,
        limit: bool,
    ) -> Result<Option<Descriptor>, CompleteError> {
        let Ok(descriptor) = self.lookup_descriptor(selector)? else {
            return Ok(None);
        };
        if descriptor.system() {
            let long = self.cpu.sregs.efer & EFER_LMA != 0;
            // LDT and 32/64-bit TSSs for both; LAR also takes call gates; 16-bit TSSs (and
            // LAR's 16-bit call and task gates) only outside long mode.
            let accepted = match descriptor.type_() {
                0x2 | 0x9 | 0xb => true,
                0xc => !limit,
                0x1 | 0x3 => !long,
                0x4 | 0x5 => !limit && !long,
                _ => false,
            };
            if !accepted {
                return Ok(None);
            }
        }
        if !descriptor.conforming() {
            let privilege = self.cpl().max(selector as u8 & 3);
            if descriptor.dpl() < privilege {
                return Ok(None);
            }
        }
        Ok(Some(descriptor))
    }

    // ---- cmpxchg8b / cmpxchg16b ----

    fn cmpxchg(&mut self, wide: bool) -> Result<(), CompleteError> {
        let linear = self.memory_operand()?;
        let half = if wide { 8 } else { 4 };
        if wide {
            self.require_alignment(linear, 16)?;
        }
        let regs = self.cpu.regs;
        let mask = size_mask(half);
        let mut expected = [0u8; 16];
        let mut new = [0u8; 16];
        expected[..8].copy_from_slice(&(regs.rax & mask).to_le_bytes());
        expected[half..half + 8].copy_from_slice(&(regs.rdx & mask).to_le_bytes());
        new[..8].copy_from_slice(&(regs.rbx & mask).to_le_bytes());
        new[half..half + 8].copy_from_slice(&(regs.rcx & mask).to_le_bytes());
        let len = half * 2;
        // One page holds the operand when it is naturally aligned (always for cmpxchg16b);
        // then the exchange is atomic against the other vCPUs.
        if (linear & 0xfff) as usize + len > 0x1000 {
            return Err(CompleteError::Memory { linear, size: len });
        }
        // The processor writes the destination whether or not it matches, so the access is
        // a write either way (a read-only page faults, the page turns dirty).
        let access = Access {
            kind: AccessKind::Write,
            privilege: self.memory.explicit,
        };
        let gpa = self
            .memory
            .translate(linear, access, true)?
            .ok_or(CompleteError::Memory { linear, size: len })?;
        let mut actual = [0u8; 16];
        let swapped = self
            .memory
            .ram
            .compare_exchange(gpa, &expected[..len], &new[..len], &mut actual[..len])
            .ok_or(CompleteError::Memory { linear, size: len })?;
        let flags = &mut self.cpu.regs.rflags;
        if swapped {
            *flags |= RFLAGS_ZF;
        } else {
            *flags &= !RFLAGS_ZF;
            let low = u64::from_le_bytes(actual[..8].try_into().unwrap_or_default()) & mask;
            let high =
                u64::from_le_bytes(actual[half..half + 8].try_into().unwrap_or_default()) & mask;
            // Writing EAX and EDX zero-extends them in 64-bit mode, as the processor does.
            self.cpu.regs.rax = low;
            self.cpu.regs.rdx = high;
        }
        Ok(())
    }

    // ---- x87 / SSE control ----

    fn fwait(&mut self, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        let cr0 = self.cpu.sregs.cr0;
        if cr0 & CR0_TS != 0 && cr0 & CR0_MP != 0 {
            return Err(self.fault(Exception::NM, "CR0.TS and CR0.MP are set"));
        }
        let area = xsave_image(ext)?;
        let control = read_u16(area, XSAVE_FCW);
        let status = read_u16(area, XSAVE_FSW);
        // An exception is pending when its status bit is set and its mask bit is clear. The
        // x87 in its initial state (XSTATE_BV bit 0 clear) has none.
        let x87_live = read_u64(area, XSAVE_HEADER) & X87 != 0;
        if x87_live && status & !control & 0x3f != 0 {
            return Err(self.fault(Exception::MF, "an unmasked x87 exception is pending"));
        }
        Ok(())
    }

    fn require_sse(&self) -> Result<(), CompleteError> {
        if self.cpu.sregs.cr0 & CR0_TS != 0 {
            return Err(self.fault(Exception::NM, "CR0.TS is set"));
        }
        Ok(())
    }

    fn ldmxcsr(&mut self, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        self.require_sse()?;
        let linear = self.memory_operand()?;
        let value = self.memory.read_u32(linear)?;
        let area = xsave_image(ext)?;
        if value & !mxcsr_mask(area) != 0 {
            return Err(self.fault(Exception::gp(0), "reserved MXCSR bits set"));
        }
        set_mxcsr(area, value);
        ext.xsave_changed();
        Ok(())
    }

    fn stmxcsr(&mut self, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        self.require_sse()?;
        let linear = self.memory_operand()?;
        let value = mxcsr(xsave_image(ext)?);
        self.memory.write(linear, &value.to_le_bytes())
    }

    fn fxsave(&mut self, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        self.require_sse()?;
        let linear = self.memory_operand()?;
        self.require_alignment(linear, 16)?;
        let area = xsave_image(ext)?;
        let mut image = [0u8; XSAVE_XMM_END];
        image.copy_from_slice(&area[..XSAVE_XMM_END]);
        image[XSAVE_MXCSR..XSAVE_MXCSR + 4].copy_from_slice(&mxcsr(area).to_le_bytes());
        // Bytes 416..511 are reserved or free for software: FXSAVE leaves them alone.
        self.memory.write(linear, &image)
    }

    fn fxrstor(&mut self, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        self.require_sse()?;
        let linear = self.memory_operand()?;
        self.require_alignment(linear, 16)?;
        let mut image = [0u8; XSAVE_XMM_END];
        self.memory.read(linear, &mut image)?;
        let area = xsave_image(ext)?;
        let value = read_u32(&image, XSAVE_MXCSR);
        if value & !mxcsr_mask(area) != 0 {
            return Err(self.fault(Exception::gp(0), "reserved MXCSR bits set"));
        }
        let mask = read_u32(area, XSAVE_MXCSR_MASK);
        area[..XSAVE_XMM_END].copy_from_slice(&image);
        area[XSAVE_MXCSR_MASK..XSAVE_MXCSR_MASK + 4].copy_from_slice(&mask.to_le_bytes());
        let bv = read_u64(area, XSAVE_HEADER) | X87 | SSE;
        write_u64(area, XSAVE_HEADER, bv);
        ext.xsave_changed();
        Ok(())
    }

    // ---- the XSAVE family ----

    /// The requested-feature bitmap EDX:EAX & (XCR0, plus IA32_XSS for the supervisor forms),
    /// after the checks every XSAVE-family instruction makes.
    fn xsave_request(
        &self,
        supervisor: bool,
        ext: &mut dyn ExtendedState,
    ) -> Result<(u64, u64, u64), CompleteError> {
        if self.cpu.sregs.cr4 & CR4_OSXSAVE == 0 {
            return Err(self.fault(Exception::UD, "CR4.OSXSAVE is clear"));
        }
        if self.cpu.sregs.cr0 & CR0_TS != 0 {
            return Err(self.fault(Exception::NM, "CR0.TS is set"));
        }
        if supervisor && self.cpl() != 0 {
            return Err(self.fault(Exception::gp(0), "xsaves/xrstors outside ring 0"));
        }
        let xcr0 = ext.xcr0()?;
        let xss = if supervisor { ext.xss()? } else { 0 };
        let mask = (self.cpu.regs.rdx & 0xffff_ffff) << 32 | (self.cpu.regs.rax & 0xffff_ffff);
        Ok((mask & (xcr0 | xss), xcr0, xss))
    }

    /// Where each component of `bitmap` (bits 2..62) sits in memory: its standard offset, or
    /// packed from 576 in the compacted format. Fails for a component the image lacks.
    fn layout(
        &self,
        bitmap: u64,
        compacted: bool,
        area_len: usize,
        ext: &dyn ExtendedState,
    ) -> Result<[(usize, Component); 63], CompleteError> {
        let mut places = [(0usize, Component::default()); 63];
        let mut next = XSAVE_EXTENDED;
        for i in 2..63u32 {
            if bitmap >> i & 1 == 0 {
                continue;
            }
            let component = ext
                .component(i)
                .filter(|c| c.offset as usize + c.size as usize <= area_len)
                .ok_or(CompleteError::State(
                    "a state component outside the XSAVE image",
                ))?;
            let at = if compacted {
                if component.align64 {
                    next = next.next_multiple_of(64);
                }
                let at = next;
                next += component.size as usize;
                at
            } else {
                component.offset as usize
            };
            places[i as usize] = (at, component);
        }
        Ok(places)
    }

    fn xsave(&mut self, kind: Kind, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        let supervisor = kind == Kind::Xsaves;
        let compacted = matches!(kind, Kind::Xsavec | Kind::Xsaves);
        let (rfbm, _, xss) = self.xsave_request(supervisor, ext)?;
        let linear = self.memory_operand()?;
        self.require_alignment(linear, 64)?;
        if rfbm & xss != 0 {
            return Err(CompleteError::State("supervisor state components"));
        }
        let area_len = xsave_image(ext)?.len();
        let places = self.layout(rfbm, compacted, area_len, ext)?;
        let end = (2..63)
            .filter(|&i| rfbm >> i & 1 != 0)
            .map(|i| places[i].0 + places[i].1.size as usize)
            .max()
            .unwrap_or(XSAVE_EXTENDED)
            .max(XSAVE_EXTENDED);
        self.memory.check(linear, end, AccessKind::Write)?;
        let area = xsave_image(ext)?;
        let in_use = read_u64(area, XSAVE_HEADER);
        let mut header = [0u8; XSAVE_HEADER_SIZE];
        self.memory
            .read(linear.wrapping_add(XSAVE_HEADER as u64), &mut header)?;
        if compacted {
            header = [0u8; XSAVE_HEADER_SIZE];
            write_u64(&mut header, 0, in_use & rfbm);
            write_u64(&mut header, 8, rfbm | XCOMP_BV_COMPACTED);
        } else {
            // Standard XSAVE writes only the requested bits of XSTATE_BV.
            let old = read_u64(&header, 0);
            write_u64(&mut header, 0, old & !rfbm | in_use & rfbm);
        }
        let memory = self.memory;
        if rfbm & X87 != 0 {
            memory.write(linear, &area[..XSAVE_MXCSR])?;
            memory.write(linear.wrapping_add(32), &area[32..XSAVE_XMM_START])?;
        }
        if rfbm & (SSE | YMM) != 0 {
            let mut control = [0u8; 8];
            control[..4].copy_from_slice(&mxcsr(area).to_le_bytes());
            control[4..].copy_from_slice(&mxcsr_mask(area).to_le_bytes());
            memory.write(linear.wrapping_add(XSAVE_MXCSR as u64), &control)?;
        }
        if rfbm & SSE != 0 {
            memory.write(
                linear.wrapping_add(XSAVE_XMM_START as u64),
                &area[XSAVE_XMM_START..XSAVE_XMM_END],
            )?;
        }
        memory.write(linear.wrapping_add(XSAVE_HEADER as u64), &header)?;
        for (i, &(at, c)) in places.iter().enumerate().skip(2) {
            if rfbm >> i & 1 == 0 {
                continue;
            }
            let data = &area[c.offset as usize..c.offset as usize + c.size as usize];
            memory.write(linear.wrapping_add(at as u64), data)?;
        }
        Ok(())
    }

    fn xrstor(
        &mut self,
        supervisor: bool,
        ext: &mut dyn ExtendedState,
    ) -> Result<(), CompleteError> {
        let (rfbm, xcr0, xss) = self.xsave_request(supervisor, ext)?;
        let linear = self.memory_operand()?;
        self.require_alignment(linear, 64)?;
        let mut header = [0u8; XSAVE_HEADER_SIZE];
        self.memory
            .read(linear.wrapping_add(XSAVE_HEADER as u64), &mut header)?;
        let xstate_bv = read_u64(&header, 0);
        let xcomp_bv = read_u64(&header, 8);
        let compacted = xcomp_bv & XCOMP_BV_COMPACTED != 0;
        if header[16..].iter().any(|&b| b != 0) {
            return Err(self.fault(Exception::gp(0), "reserved XSAVE header bytes set"));
        }
        if supervisor && !compacted {
            return Err(self.fault(Exception::gp(0), "xrstors of a standard-format image"));
        }
        if compacted {
            let allowed = xcr0 | if supervisor { xss } else { 0 };
            if xcomp_bv & !XCOMP_BV_COMPACTED & !allowed != 0 {
                return Err(self.fault(Exception::gp(0), "XCOMP_BV names disabled components"));
            }
            if xstate_bv & !xcomp_bv & !XCOMP_BV_COMPACTED != 0 {
                return Err(self.fault(
                    Exception::gp(0),
                    "XSTATE_BV names components XCOMP_BV lacks",
                ));
            }
        } else {
            if xcomp_bv != 0 {
                return Err(self.fault(Exception::gp(0), "XCOMP_BV set in a standard-format image"));
            }
            if xstate_bv & !xcr0 != 0 {
                return Err(
                    self.fault(Exception::gp(0), "XSTATE_BV names components XCR0 disables")
                );
            }
        }
        if rfbm & xss & xstate_bv != 0 {
            return Err(CompleteError::State("supervisor state components"));
        }
        let area_len = xsave_image(ext)?.len();
        // Compacted: every XCOMP_BV component has a slot, loaded or not.
        let layout_bits = if compacted {
            xcomp_bv & !XCOMP_BV_COMPACTED
        } else {
            rfbm
        };
        let places = self.layout(layout_bits & !xss, compacted, area_len, ext)?;

        // Every read from guest memory happens before the image changes.
        let mut legacy = [0u8; XSAVE_XMM_END];
        self.memory.read(linear, &mut legacy)?;
        let area = xsave_image(ext)?;
        let mxcsr_value = if compacted {
            (rfbm & SSE != 0).then(|| {
                if xstate_bv & SSE != 0 {
                    read_u32(&legacy, XSAVE_MXCSR)
                } else {
                    MXCSR_DEFAULT
                }
            })
        } else {
            (rfbm & (SSE | YMM) != 0).then(|| read_u32(&legacy, XSAVE_MXCSR))
        };
        if let Some(value) = mxcsr_value {
            if value & !mxcsr_mask(area) != 0 {
                return Err(self.fault(Exception::gp(0), "reserved MXCSR bits set"));
            }
        }
        for (i, &(at, c)) in places.iter().enumerate().skip(2) {
            if rfbm & xstate_bv & 1u64 << i != 0 {
                self.memory.check(
                    linear.wrapping_add(at as u64),
                    c.size as usize,
                    AccessKind::Read,
                )?;
            }
        }
        let mut bv = read_u64(area, XSAVE_HEADER);
        if rfbm & X87 != 0 {
            if xstate_bv & X87 != 0 {
                area[..XSAVE_MXCSR].copy_from_slice(&legacy[..XSAVE_MXCSR]);
                area[32..XSAVE_XMM_START].copy_from_slice(&legacy[32..XSAVE_XMM_START]);
                bv |= X87;
            } else {
                area[..XSAVE_MXCSR].fill(0);
                area[32..XSAVE_XMM_START].fill(0);
                area[XSAVE_FCW..XSAVE_FCW + 2].copy_from_slice(&0x37fu16.to_le_bytes());
                bv &= !X87;
            }
        }
        if rfbm & SSE != 0 {
            if xstate_bv & SSE != 0 {
                area[XSAVE_XMM_START..XSAVE_XMM_END]
                    .copy_from_slice(&legacy[XSAVE_XMM_START..XSAVE_XMM_END]);
                bv |= SSE;
            } else {
                area[XSAVE_XMM_START..XSAVE_XMM_END].fill(0);
                bv &= !SSE;
            }
        }
        for (i, &(at, c)) in places.iter().enumerate().skip(2) {
            let bit = 1u64 << i;
            if rfbm & bit == 0 {
                continue;
            }
            let range = c.offset as usize..c.offset as usize + c.size as usize;
            if xstate_bv & bit != 0 {
                self.memory
                    .read(linear.wrapping_add(at as u64), &mut area[range])?;
                bv |= bit;
            } else {
                area[range].fill(0);
                bv &= !bit;
            }
        }
        if let Some(value) = mxcsr_value {
            area[XSAVE_MXCSR..XSAVE_MXCSR + 4].copy_from_slice(&value.to_le_bytes());
            // KVM takes MXCSR from the image only while SSE or AVX state is live; the SSE
            // registers' init values are the zeros already there.
            if value != MXCSR_DEFAULT && bv & (SSE | YMM) == 0 {
                bv |= SSE;
            }
        }
        write_u64(area, XSAVE_HEADER, bv);
        ext.xsave_changed();
        Ok(())
    }

    fn xgetbv(&mut self, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        if self.cpu.sregs.cr4 & CR4_OSXSAVE == 0 {
            return Err(self.fault(Exception::UD, "CR4.OSXSAVE is clear"));
        }
        let value = match self.cpu.regs.rcx & 0xffff_ffff {
            0 => ext.xcr0()?,
            1 => ext.xcr0()? & read_u64(xsave_image(ext)?, XSAVE_HEADER),
            _ => return Err(self.fault(Exception::gp(0), "xgetbv of an unknown XCR")),
        };
        self.cpu.regs.rax = value & 0xffff_ffff;
        self.cpu.regs.rdx = value >> 32;
        Ok(())
    }

    fn xsetbv(&mut self, ext: &mut dyn ExtendedState) -> Result<(), CompleteError> {
        if self.cpu.sregs.cr4 & CR4_OSXSAVE == 0 {
            return Err(self.fault(Exception::UD, "CR4.OSXSAVE is clear"));
        }
        if self.cpl() != 0 || self.cpu.regs.rcx & 0xffff_ffff != 0 {
            return Err(self.fault(
                Exception::gp(0),
                "xsetbv outside ring 0 or of an unknown XCR",
            ));
        }
        let value = (self.cpu.regs.rdx & 0xffff_ffff) << 32 | (self.cpu.regs.rax & 0xffff_ffff);
        if value & X87 == 0 || (value & YMM != 0 && value & SSE == 0) {
            return Err(self.fault(Exception::gp(0), "an invalid XCR0"));
        }
        ext.set_xcr0(value)
            .map_err(|_| self.fault(Exception::gp(0), "the hypervisor refused the XCR0 value"))
    }
}

fn size_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

fn write_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// The vCPU's XSAVE image, at least as long as the legacy region and the header.
fn xsave_image(ext: &mut dyn ExtendedState) -> Result<&mut [u8], CompleteError> {
    let area = ext.xsave_area()?;
    if area.len() < XSAVE_EXTENDED {
        return Err(CompleteError::State("the XSAVE image is too short"));
    }
    Ok(area)
}

/// MXCSR as the image holds it: its initial value while neither SSE nor AVX state is live.
fn mxcsr(area: &[u8]) -> u32 {
    if read_u64(area, XSAVE_HEADER) & (SSE | YMM) != 0 {
        read_u32(area, XSAVE_MXCSR)
    } else {
        MXCSR_DEFAULT
    }
}

fn mxcsr_mask(area: &[u8]) -> u32 {
    match read_u32(area, XSAVE_MXCSR_MASK) {
        0 => MXCSR_MASK_DEFAULT,
        mask => mask,
    }
}

/// Sets MXCSR in the image and marks SSE state live so that the hypervisor takes it.
fn set_mxcsr(area: &mut [u8], value: u32) {
    let bv = read_u64(area, XSAVE_HEADER);
    if bv & (SSE | YMM) == 0 {
        // The SSE registers' initial values are zeros.
        area[XSAVE_XMM_START..XSAVE_XMM_END].fill(0);
        write_u64(area, XSAVE_HEADER, bv | SSE);
    }
    area[XSAVE_MXCSR..XSAVE_MXCSR + 4].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hv::regs::{DescriptorTable, CR0_PG, CR4_PAE, EFER_LME};
    use iced_x86::{Code, Encoder, MemoryOperand};
    use std::cell::RefCell;

    const RAM_BYTES: usize = 4 << 20;
    const CODE: u64 = 0x1000;
    const GDT: u64 = 0x2000;
    const IDT: u64 = 0x3000;
    const TSS: u64 = 0x4000;
    const DATA: u64 = 0x10000;
    const STACK_TOP: u64 = 0x20000;
    const RSP0_TOP: u64 = 0x30000;
    const IST1_TOP: u64 = 0x40000;
    const ACCESSED: u64 = 1 << 5;
    const DIRTY: u64 = 1 << 6;

    /// Flat test RAM from 0.
    struct Ram(RefCell<Vec<u8>>);

    impl Ram {
        fn new() -> Self {
            Ram(RefCell::new(vec![0; RAM_BYTES]))
        }
        fn poke(&self, at: u64, bytes: &[u8]) {
            self.0.borrow_mut()[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        }
        fn peek(&self, at: u64, len: usize) -> Vec<u8> {
            self.0.borrow()[at as usize..at as usize + len].to_vec()
        }
        fn peek_u64(&self, at: u64) -> u64 {
            u64::from_le_bytes(self.peek(at, 8).try_into().unwrap())
        }
        fn peek_u32(&self, at: u64) -> u32 {
            u32::from_le_bytes(self.peek(at, 4).try_into().unwrap())
        }
    }

    impl GuestRam for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let ram = self.0.borrow();
            match ram.get(gpa as usize..(gpa as usize).saturating_add(buf.len())) {
                Some(src) if gpa < RAM_BYTES as u64 => {
                    buf.copy_from_slice(src);
                    true
                }
                _ => false,
            }
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> bool {
            let mut ram = self.0.borrow_mut();
            match ram.get_mut(gpa as usize..(gpa as usize).saturating_add(buf.len())) {
                Some(dst) if gpa < RAM_BYTES as u64 => {
                    dst.copy_from_slice(buf);
                    true
                }
                _ => false,
            }
        }
    }

    /// An XSAVE image with the AVX component at its usual standard offset (576, 256 bytes) and
    /// a 64-byte aligned component 5 (opmask-like, 64 bytes at 1088).
    struct Ext {
        area: Vec<u8>,
        xcr0: u64,
        xss: u64,
        changed: bool,
    }

    impl Ext {
        fn new() -> Self {
            let mut area = vec![0u8; 4096];
            area[XSAVE_MXCSR..XSAVE_MXCSR + 4].copy_from_slice(&MXCSR_DEFAULT.to_le_bytes());
            area[XSAVE_MXCSR_MASK..XSAVE_MXCSR_MASK + 4].copy_from_slice(&0xffffu32.to_le_bytes());
            area[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
            Ext {
                area,
                xcr0: X87 | SSE | YMM | 1 << 5,
                xss: 0,
                changed: false,
            }
        }
    }

    impl ExtendedState for Ext {
        fn xsave_area(&mut self) -> Result<&mut [u8], CompleteError> {
            Ok(&mut self.area)
        }
        fn xsave_changed(&mut self) {
            self.changed = true;
        }
        fn xcr0(&mut self) -> Result<u64, CompleteError> {
            Ok(self.xcr0)
        }
        fn set_xcr0(&mut self, value: u64) -> Result<(), CompleteError> {
            self.xcr0 = value;
            Ok(())
        }
        fn xss(&mut self) -> Result<u64, CompleteError> {
            Ok(self.xss)
        }
        fn component(&self, index: u32) -> Option<Component> {
            match index {
                2 => Some(Component {
                    offset: 576,
                    size: 256,
                    align64: false,
                }),
                5 => Some(Component {
                    offset: 1088,
                    size: 64,
                    align64: true,
                }),
                _ => None,
            }
        }
    }

    fn code_descriptor(long: bool, dpl: u8) -> u64 {
        // Base 0, limit 0xfffff pages, present, code execute/read.
        let mut d: u64 = 0xffff | 0xf << 48 | 1 << 55 | 1 << 47 | 1 << 44 | 0xa << 40;
        d |= u64::from(dpl) << 45;
        if long {
            d |= 1 << 53;
        } else {
            d |= 1 << 54;
        }
        d
    }

    fn data_descriptor(dpl: u8) -> u64 {
        0xffff
            | 0xf << 48
            | 1 << 55
            | 1 << 54
            | 1 << 47
            | 1 << 44
            | 0x2 << 40
            | u64::from(dpl) << 45
    }

    /// GDT: 0x08 kernel code, 0x10 kernel data, 0x18 user code, 0x20 user data.
    fn gdt(ram: &Ram, long: bool) {
        ram.poke(GDT + 8, &code_descriptor(long, 0).to_le_bytes());
        ram.poke(GDT + 16, &data_descriptor(0).to_le_bytes());
        ram.poke(GDT + 24, &code_descriptor(long, 3).to_le_bytes());
        ram.poke(GDT + 32, &data_descriptor(3).to_le_bytes());
    }

    fn segment(ram: &Ram, selector: u16) -> SegmentRegister {
        let raw = ram.peek_u64(GDT + u64::from(selector & !7));
        Descriptor { raw }.load(selector)
    }

    fn gate64(ram: &Ram, vector: u8, target: u64, gate_type: u8, dpl: u8, ist: u8) {
        let low = (target & 0xffff)
            | 0x08 << 16
            | u64::from(ist) << 32
            | u64::from(gate_type) << 40
            | u64::from(dpl) << 45
            | 1 << 47
            | (target & 0xffff_0000) << 32;
        ram.poke(IDT + u64::from(vector) * 16, &low.to_le_bytes());
        ram.poke(
            IDT + u64::from(vector) * 16 + 8,
            &(target >> 32).to_le_bytes(),
        );
    }

    fn gate32(ram: &Ram, vector: u8, target: u32, gate_type: u8, dpl: u8) {
        let target = u64::from(target);
        let gate = (target & 0xffff)
            | 0x08 << 16
            | u64::from(gate_type) << 40
            | u64::from(dpl) << 45
            | 1 << 47
            | (target & 0xffff_0000) << 32;
        ram.poke(IDT + u64::from(vector) * 8, &gate.to_le_bytes());
    }

    /// A 64-bit CPU at CPL `cpl` (paging off: linear = physical, which the completer allows).
    fn long_cpu(ram: &Ram, cpl: u8) -> Cpu {
        gdt(ram, true);
        ram.poke(TSS + 4, &RSP0_TOP.to_le_bytes());
        ram.poke(TSS + 0x24, &IST1_TOP.to_le_bytes());
        let mut cpu = Cpu::default();
        cpu.sregs.cr0 = CR0_PE;
        cpu.sregs.cr4 = CR4_OSXSAVE;
        cpu.sregs.efer = EFER_LME | EFER_LMA;
        cpu.sregs.gdt = DescriptorTable {
            base: GDT,
            limit: 39,
        };
        cpu.sregs.idt = DescriptorTable {
            base: IDT,
            limit: 0xfff,
        };
        cpu.sregs.tr = SegmentRegister {
            base: TSS,
            limit: 0x67,
            type_: 0xb,
            present: true,
            ..SegmentRegister::default()
        };
        let (cs, ss) = if cpl == 0 { (0x08, 0x10) } else { (0x1b, 0x23) };
        cpu.sregs.cs = segment(ram, cs);
        cpu.sregs.ss = segment(ram, ss);
        cpu.regs.rip = CODE;
        cpu.regs.rsp = STACK_TOP;
        cpu.regs.rflags = 0x202;
        cpu
    }

    fn encode(bitness: u32, ip: u64, instr: Instruction) -> Vec<u8> {
        let mut encoder = Encoder::new(bitness);
        encoder.encode(&instr, ip).expect("encodable");
        encoder.take_buffer()
    }

    /// Places `instr` at RIP and completes it: the new state, or the error (state unchanged).
    fn run(
        ram: &Ram,
        cpu: &Cpu,
        ext: &mut Ext,
        bitness: u32,
        instr: Instruction,
    ) -> Result<(Cpu, Kind, usize), CompleteError> {
        let linear = cpu.sregs.cs.base + cpu.regs.rip;
        let bytes = encode(bitness, cpu.regs.rip, instr);
        ram.poke(linear, &bytes);
        let mut after = *cpu;
        let result = complete(&mut after, ram, ext);
        if result.is_err() {
            assert_eq!(after, *cpu, "a failed completion changed the registers");
        }
        result.map(|kind| (after, kind, bytes.len()))
    }

    /// The exception a refused completion raises in the guest, if it is one.
    fn fault_of(err: &CompleteError) -> Option<Exception> {
        match err {
            CompleteError::Fault { exception, .. } => Some(*exception),
            _ => None,
        }
    }

    fn with1(code: Code, op: MemoryOperand) -> Instruction {
        Instruction::with1(code, op).unwrap()
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Values with few or many bits set, zero, and single bits: the edges of bit counts.
        fn interesting(&mut self) -> u64 {
            match self.next() % 5 {
                0 => 0,
                1 => 1 << (self.next() % 64),
                2 => self.next() & self.next() & self.next(),
                3 => self.next() | self.next(),
                _ => self.next(),
            }
        }
    }

    /// A descriptor from its fields, written out bit by bit as the SDM draws it.
    fn raw_descriptor(limit: u32, type_: u8, s: bool, dpl: u8, present: bool, g: bool) -> u64 {
        u64::from(limit & 0xffff)
            | u64::from(type_) << 40
            | u64::from(s) << 44
            | u64::from(dpl) << 45
            | u64::from(present) << 47
            | u64::from(limit >> 16 & 0xf) << 48
            | u64::from(g) << 55
    }

    #[test]
    fn lsl_and_lar_report_what_the_caller_may_see_and_never_fault() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        // Linux's CPUNODE entry (15, selector 0x7b): a DPL-3 data segment whose byte-granular
        // limit is node << 12 | cpu, read by the NMI entry with `lsl`.
        let cpunode = raw_descriptor(0x1003, 0x5, true, 3, true, false);
        let entries: [(u16, u64); 7] = [
            (0x28, raw_descriptor(0xfffff, 0x3, true, 0, true, true)), // kernel data, 4 GiB
            (0x30, raw_descriptor(0x0123, 0xe, true, 0, false, false)), // conforming code, absent
            (0x38, raw_descriptor(0x67, 0x9, false, 0, true, false)),  // 64-bit TSS
            (0x40, raw_descriptor(0x67, 0x1, false, 3, true, false)),  // 16-bit TSS
            (0x48, raw_descriptor(0x10, 0xc, false, 3, true, false)),  // call gate
            (0x50, raw_descriptor(0x10, 0xe, false, 3, true, false)),  // interrupt gate
            (0x78, cpunode),
        ];
        for (selector, raw) in entries {
            ram.poke(GDT + u64::from(selector), &raw.to_le_bytes());
        }
        let mut lsl = |cpl: u8, selector: u64, code: Code, from_memory: bool| {
            let mut cpu = long_cpu(&ram, cpl);
            cpu.sregs.gdt.limit = 0x7f;
            cpu.regs.rax = 0x1111_2222_3333_4444;
            cpu.regs.rflags = 0x2 | RFLAGS_CF;
            let (dst, src) = match code {
                Code::Lsl_r16_rm16 | Code::Lar_r16_rm16 => (Register::AX, Register::BX),
                Code::Lsl_r32_r32m16 | Code::Lar_r32_r32m16 => (Register::EAX, Register::EBX),
                _ => (Register::RAX, Register::RBX),
            };
            let instr = if from_memory {
                ram.poke(DATA, &(selector as u16).to_le_bytes());
                cpu.regs.rbx = DATA;
                Instruction::with2(code, dst, MemoryOperand::with_base(Register::RBX))
            } else {
                cpu.regs.rbx = selector;
                Instruction::with2(code, dst, src)
            }
            .unwrap();
            let (after, kind, _) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
            assert_eq!(
                after.regs.rflags & !RFLAGS_ZF,
                0x2 | RFLAGS_CF,
                "other flags kept"
            );
            (kind, after.regs.rflags & RFLAGS_ZF != 0, after.regs.rax)
        };
        let untouched = 0x1111_2222_3333_4444;
        // The NMI entry's read, in all three operand sizes and from memory.
        assert_eq!(
            lsl(0, 0x7b, Code::Lsl_r64_r64m16, false),
            (Kind::Lsl, true, 0x1003)
        );
        assert_eq!(
            lsl(0, 0x7b, Code::Lsl_r32_r32m16, true),
            (Kind::Lsl, true, 0x1003)
        );
        assert_eq!(
            lsl(0, 0x7b, Code::Lsl_r16_rm16, false),
            (Kind::Lsl, true, 0x1111_2222_3333_1003)
        );
        // Page granularity scales the limit.
        assert_eq!(lsl(0, 0x28, Code::Lsl_r64_r64m16, false).2, 0xffff_ffff);
        // Null, beyond the GDT, and an absent LDT: ZF=0, no fault, destination unchanged.
        for selector in [0x0, 0x3, 0x80, 0x7c] {
            assert_eq!(
                lsl(0, selector, Code::Lsl_r64_r64m16, false),
                (Kind::Lsl, false, untouched),
                "selector {selector:#x}"
            );
        }
        // Privilege: a DPL-0 segment is hidden from CPL 3 and from RPL 3; a conforming code
        // segment is not, present or not.
        assert!(!lsl(3, 0x28, Code::Lsl_r64_r64m16, false).1);
        assert!(!lsl(0, 0x2b, Code::Lsl_r64_r64m16, false).1);
        assert_eq!(lsl(3, 0x33, Code::Lsl_r64_r64m16, false).2, 0x123);
        // System descriptors in long mode: a 64-bit TSS for both, a call gate for LAR only,
        // a 16-bit TSS and an interrupt gate for neither.
        assert_eq!(lsl(0, 0x38, Code::Lsl_r64_r64m16, false).2, 0x67);
        assert!(!lsl(0, 0x48, Code::Lsl_r64_r64m16, false).1);
        assert!(lsl(0, 0x48, Code::Lar_r64_r64m16, false).1);
        for selector in [0x40, 0x50] {
            assert!(!lsl(0, selector, Code::Lsl_r64_r64m16, false).1);
            assert!(!lsl(0, selector, Code::Lar_r64_r64m16, false).1);
        }
        // LAR: the access-rights bytes, type through G, with the limit and base masked out.
        let (kind, zf, rights) = lsl(0, 0x7b, Code::Lar_r32_r32m16, false);
        assert_eq!((kind, zf), (Kind::Lar, true));
        assert_eq!(rights, 0xf500);
        // G and P set, limit 19:16 (0xf) masked out.
        assert_eq!(lsl(0, 0x28, Code::Lar_r64_r64m16, true).2, 0x0080_9300);
    }

    #[test]
    fn bit_counts_match_rust_and_the_sdm_flags() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let forms = [
            (Code::Popcnt_r16_rm16, Register::AX, Register::BX, 16),
            (Code::Popcnt_r32_rm32, Register::EAX, Register::EBX, 32),
            (Code::Popcnt_r64_rm64, Register::RAX, Register::RBX, 64),
            (Code::Lzcnt_r16_rm16, Register::AX, Register::BX, 16),
            (Code::Lzcnt_r32_rm32, Register::EAX, Register::EBX, 32),
            (Code::Lzcnt_r64_rm64, Register::RAX, Register::RBX, 64),
            (Code::Tzcnt_r16_rm16, Register::AX, Register::BX, 16),
            (Code::Tzcnt_r32_rm32, Register::EAX, Register::EBX, 32),
            (Code::Tzcnt_r64_rm64, Register::RAX, Register::RBX, 64),
        ];
        for _ in 0..300 {
            for &(code, dst, src, bits) in &forms {
                let mut cpu = long_cpu(&ram, 0);
                let value = rng.interesting();
                let old_rax = rng.next();
                cpu.regs.rax = old_rax;
                cpu.regs.rbx = value;
                cpu.regs.rflags = 0x2 | (rng.next() & 0x8d5);
                let from_memory = rng.next() % 2 == 0;
                let instr = if from_memory {
                    ram.poke(DATA, &value.to_le_bytes());
                    cpu.regs.rbx = DATA;
                    Instruction::with2(code, dst, MemoryOperand::with_base(Register::RBX))
                } else {
                    Instruction::with2(code, dst, src)
                }
                .unwrap();
                let (after, _, len) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
                let source = value & size_mask(bits / 8);
                let (expected, flags_changed, flags) = match code.mnemonic() {
                    Mnemonic::Popcnt => (
                        u64::from(source.count_ones()),
                        0x8d5,
                        if source == 0 { RFLAGS_ZF } else { 0 },
                    ),
                    Mnemonic::Lzcnt => {
                        let n = match bits {
                            16 => (source as u16).leading_zeros(),
                            32 => (source as u32).leading_zeros(),
                            _ => source.leading_zeros(),
                        };
                        let f = if source == 0 { RFLAGS_CF } else { 0 }
                            | if n == 0 { RFLAGS_ZF } else { 0 };
                        (u64::from(n), RFLAGS_CF | RFLAGS_ZF, f)
                    }
                    _ => {
                        let n = match bits {
                            16 => (source as u16).trailing_zeros(),
                            32 => (source as u32).trailing_zeros(),
                            _ => source.trailing_zeros(),
                        };
                        let f = if source == 0 { RFLAGS_CF } else { 0 }
                            | if n == 0 { RFLAGS_ZF } else { 0 };
                        (u64::from(n), RFLAGS_CF | RFLAGS_ZF, f)
                    }
                };
                let expected_rax = match bits {
                    16 => old_rax & !0xffff | expected,
                    _ => expected,
                };
                assert_eq!(after.regs.rax, expected_rax, "{code:?} of {value:#x}");
                assert_eq!(
                    after.regs.rflags,
                    cpu.regs.rflags & !flags_changed | flags,
                    "{code:?} of {value:#x}: flags"
                );
                assert_eq!(after.regs.rip, CODE + len as u64);
            }
        }
    }

    #[test]
    fn int3_through_a_64_bit_interrupt_gate_at_cpl0() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        gate64(&ram, 3, 0xffff_ffff_8100_1234, GATE_INTERRUPT, 3, 0);
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rsp = STACK_TOP - 8; // not 16-byte aligned: the frame is aligned down
        cpu.regs.rflags = 0x202 | RFLAGS_TF | RFLAGS_NT | RFLAGS_AC;
        let (after, kind, _) =
            run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Int3)).unwrap();
        assert_eq!(kind, Kind::Int3);
        assert_eq!(after.regs.rip, 0xffff_ffff_8100_1234);
        assert_eq!(after.regs.rsp, STACK_TOP - 16 - 40);
        let frame: Vec<u64> = (0..5)
            .map(|i| ram.peek_u64(after.regs.rsp + i * 8))
            .collect();
        assert_eq!(
            frame,
            [CODE + 1, 0x08, cpu.regs.rflags, STACK_TOP - 8, 0x10]
        );
        // Interrupt gate: IF, TF and NT clear; AC stays.
        assert_eq!(after.regs.rflags, 0x2 | RFLAGS_AC);
        assert_eq!(after.sregs.cs.selector, 0x08);
        assert_eq!(after.sregs.ss, cpu.sregs.ss);
    }

    #[test]
    fn int_n_through_a_trap_gate_keeps_if_and_uses_the_ist_stack() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        gate64(&ram, 0x80, 0x5000, GATE_TRAP, 0, 1);
        let cpu = long_cpu(&ram, 0);
        let instr = Instruction::with1(Code::Int_imm8, 0x80u32).unwrap();
        let (after, kind, _) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!(kind, Kind::IntN);
        assert_eq!(after.regs.rsp, IST1_TOP - 40);
        assert_eq!(ram.peek_u64(IST1_TOP - 40), CODE + 2);
        assert_eq!(ram.peek_u64(IST1_TOP - 16), STACK_TOP);
        assert_eq!(after.regs.rflags, 0x202);
        assert_eq!(after.regs.rip, 0x5000);
    }

    #[test]
    fn int3_from_cpl3_switches_to_the_tss_stack_and_a_null_ss() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        gate64(&ram, 3, 0x6000, GATE_INTERRUPT, 3, 0);
        let cpu = long_cpu(&ram, 3);
        let (after, _, _) = run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Int3)).unwrap();
        assert_eq!(after.regs.rsp, RSP0_TOP - 40);
        let frame: Vec<u64> = (0..5)
            .map(|i| ram.peek_u64(after.regs.rsp + i * 8))
            .collect();
        assert_eq!(frame, [CODE + 1, 0x1b, 0x202, STACK_TOP, 0x23]);
        assert_eq!(after.sregs.cs.selector, 0x08);
        assert_eq!(after.sregs.cs.dpl, 0);
        assert_eq!(after.sregs.ss.selector, 0);
        assert!(after.sregs.ss.unusable);
        assert_eq!(after.sregs.cpl(), 0);
    }

    #[test]
    fn a_non_canonical_memory_operand_raises_gp_or_ss_through_the_stack() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let popcnt = |base: Register| {
            Instruction::with2(
                Code::Popcnt_r64_rm64,
                Register::RAX,
                MemoryOperand::with_base(base),
            )
            .unwrap()
        };
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rbx = 0x0000_8000_0000_0000;
        let err = run(&ram, &cpu, &mut ext, 64, popcnt(Register::RBX)).unwrap_err();
        assert_eq!(fault_of(&err), Some(Exception::gp(0)), "{err}");
        cpu.regs.rbp = 0xfff0_0000_0000_0000;
        let err = run(&ram, &cpu, &mut ext, 64, popcnt(Register::RBP)).unwrap_err();
        assert_eq!(fault_of(&err), Some(Exception::ss(0)), "{err}");
        // The top half is canonical; with 5-level paging, 57-bit addresses are.
        cpu.regs.rbx = 0xffff_8000_0000_0000;
        let err = run(&ram, &cpu, &mut ext, 64, popcnt(Register::RBX)).unwrap_err();
        assert!(fault_of(&err).is_none(), "{err}");
        assert!(canonical(0x00ff_ffff_ffff_ffff, true));
        assert!(!canonical(0x0100_0000_0000_0000, true));
        assert!(!canonical(0x00ff_ffff_ffff_ffff, false));
    }

    #[test]
    fn exceptions_carry_the_error_code_the_processor_pushes() {
        assert_eq!(Exception::gp(0x10).to_string(), "#GP(0x10)");
        assert_eq!(Exception::UD.to_string(), "#UD");
        assert_eq!(Exception::selector_code(0x2b), 0x28);
        assert_eq!(Exception::idt_code(0x90), 0x482);
    }

    #[test]
    fn software_interrupts_the_guest_may_not_take_are_refused() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        // DPL 0 gate from CPL 3: #GP.
        gate64(&ram, 3, 0x6000, GATE_INTERRUPT, 0, 0);
        let cpu = long_cpu(&ram, 3);
        let err = run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Int3)).unwrap_err();
        assert_eq!(fault_of(&err), Some(Exception::gp(3 << 3 | 2)), "{err}");
        // Not present: #NP.
        gate64(&ram, 4, 0x6000, GATE_INTERRUPT, 3, 0);
        let mut raw = ram.peek_u64(IDT + 4 * 16);
        raw &= !(1 << 47);
        ram.poke(IDT + 4 * 16, &raw.to_le_bytes());
        let cpu = long_cpu(&ram, 0);
        let instr = Instruction::with1(Code::Int_imm8, 4u32).unwrap();
        let err = run(&ram, &cpu, &mut ext, 64, instr).unwrap_err();
        assert_eq!(fault_of(&err), Some(Exception::np(4 << 3 | 2)), "{err}");
        // Beyond the IDT limit: #GP.
        let mut cpu = long_cpu(&ram, 0);
        cpu.sregs.idt.limit = 3 * 16 + 14;
        let err = run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Int3)).unwrap_err();
        assert_eq!(fault_of(&err), Some(Exception::gp(3 << 3 | 2)), "{err}");
        // A stack outside RAM: nothing is written, nothing changes.
        gate64(&ram, 3, 0x6000, GATE_INTERRUPT, 3, 0);
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rsp = RAM_BYTES as u64 + 0x1000;
        let err = run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Int3)).unwrap_err();
        assert!(matches!(err, CompleteError::Memory { .. }), "{err}");
    }

    fn protected_cpu(ram: &Ram, cpl: u8) -> Cpu {
        let mut cpu = long_cpu(ram, cpl);
        gdt(ram, false);
        cpu.sregs.efer = 0;
        let (cs, ss) = if cpl == 0 { (0x08, 0x10) } else { (0x1b, 0x23) };
        cpu.sregs.cs = segment(ram, cs);
        cpu.sregs.ss = segment(ram, ss);
        // 32-bit TSS: ESP0 at 4, SS0 at 8.
        ram.poke(TSS + 4, &(RSP0_TOP as u32).to_le_bytes());
        ram.poke(TSS + 8, &0x10u32.to_le_bytes());
        cpu
    }

    #[test]
    fn int_n_through_32_bit_gates_with_and_without_a_privilege_change() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        gate32(&ram, 0x30, 0x7000, GATE_INTERRUPT, 3);
        let instr = Instruction::with1(Code::Int_imm8, 0x30u32).unwrap();
        let cpu = protected_cpu(&ram, 0);
        let (after, _, _) = run(&ram, &cpu, &mut ext, 32, instr).unwrap();
        assert_eq!(after.regs.rsp, STACK_TOP - 12);
        let frame: Vec<u32> = (0..3)
            .map(|i| ram.peek_u32(after.regs.rsp + i * 4))
            .collect();
        assert_eq!(frame, [CODE as u32 + 2, 0x08, 0x202]);
        assert_eq!(after.regs.rflags, 0x2);
        assert_eq!(after.regs.rip, 0x7000);

        let cpu = protected_cpu(&ram, 3);
        let (after, _, _) = run(&ram, &cpu, &mut ext, 32, instr).unwrap();
        assert_eq!(after.regs.rsp, RSP0_TOP - 20);
        let frame: Vec<u32> = (0..5)
            .map(|i| ram.peek_u32(after.regs.rsp + i * 4))
            .collect();
        assert_eq!(
            frame,
            [CODE as u32 + 2, 0x1b, 0x202, STACK_TOP as u32, 0x23]
        );
        assert_eq!(after.sregs.ss.selector, 0x10);
        assert_eq!(after.sregs.cs.selector, 0x08);
    }

    #[test]
    fn int_n_in_real_mode_goes_through_the_ivt() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = Cpu::default();
        cpu.sregs.idt = DescriptorTable {
            base: 0,
            limit: 0x3ff,
        };
        cpu.sregs.cs.selector = 0x100;
        cpu.sregs.cs.base = 0x1000;
        cpu.sregs.ss.base = 0x8000;
        cpu.regs.rip = 0x10;
        cpu.regs.rsp = 0x200;
        cpu.regs.rflags = 0x202 | RFLAGS_TF;
        ram.poke(0x21 * 4, &[0x34, 0x12, 0x00, 0x20]); // 2000:1234
        let instr = Instruction::with1(Code::Int_imm8, 0x21u32).unwrap();
        let (after, _, _) = run(&ram, &cpu, &mut ext, 16, instr).unwrap();
        assert_eq!(after.regs.rip, 0x1234);
        assert_eq!(after.sregs.cs.selector, 0x2000);
        assert_eq!(after.sregs.cs.base, 0x20000);
        assert_eq!(after.regs.rsp, 0x1fa);
        assert_eq!(
            ram.peek(0x8000 + 0x1fa, 6),
            [0x12, 0x00, 0x00, 0x01, 0x02, 0x03]
        );
        assert_eq!(after.regs.rflags, 0x2);
    }

    #[test]
    fn into_traps_only_on_overflow_and_only_outside_64_bit_mode() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        gate32(&ram, 4, 0x7000, GATE_TRAP, 3);
        let mut cpu = protected_cpu(&ram, 0);
        let (after, _, _) = run(&ram, &cpu, &mut ext, 32, Instruction::with(Code::Into)).unwrap();
        assert_eq!(after.regs.rip, CODE + 1);
        cpu.regs.rflags |= RFLAGS_OF;
        let (after, _, _) = run(&ram, &cpu, &mut ext, 32, Instruction::with(Code::Into)).unwrap();
        assert_eq!(after.regs.rip, 0x7000);
        let cpu = long_cpu(&ram, 0);
        ram.poke(CODE, &[0xce]);
        let mut after = cpu;
        // 0xCE is invalid in 64-bit mode: the decoder refuses it.
        assert!(complete(&mut after, &ram, &mut ext).is_err());
    }

    #[test]
    fn cmpxchg16b_and_8b_swap_on_a_match_and_load_on_a_mismatch() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rdi = DATA;
        ram.poke(DATA, &[0x11; 8]);
        ram.poke(DATA + 8, &[0x22; 8]);
        cpu.regs.rax = 0x1111_1111_1111_1111;
        cpu.regs.rdx = 0x2222_2222_2222_2222;
        cpu.regs.rbx = 0xaaaa;
        cpu.regs.rcx = 0xbbbb;
        let instr = with1(
            Code::Cmpxchg16b_m128,
            MemoryOperand::with_base(Register::RDI),
        );
        let (after, kind, _) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!(kind, Kind::Cmpxchg16b);
        assert_ne!(after.regs.rflags & RFLAGS_ZF, 0);
        assert_eq!(
            (ram.peek_u64(DATA), ram.peek_u64(DATA + 8)),
            (0xaaaa, 0xbbbb)
        );
        // Mismatch now: RDX:RAX get the memory, ZF clear, memory kept.
        let (after, _, _) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!(after.regs.rflags & RFLAGS_ZF, 0);
        assert_eq!((after.regs.rax, after.regs.rdx), (0xaaaa, 0xbbbb));
        assert_eq!(
            (ram.peek_u64(DATA), ram.peek_u64(DATA + 8)),
            (0xaaaa, 0xbbbb)
        );
        // Misaligned: #GP, refused.
        let mut misaligned = cpu;
        misaligned.regs.rdi = DATA + 8;
        let err = run(&ram, &misaligned, &mut ext, 64, instr).unwrap_err();
        assert!(
            matches!(
                err,
                CompleteError::Fault {
                    exception: Exception { vector: 13, .. },
                    ..
                }
            ),
            "{err}"
        );

        // cmpxchg8b compares EDX:EAX; the upper halves of the 64-bit registers do not count.
        cpu.regs.rdi = DATA + 4;
        ram.poke(DATA + 4, &0x0000_0005_0000_0007u64.to_le_bytes());
        cpu.regs.rax = 0xffff_ffff_0000_0007;
        cpu.regs.rdx = 0xffff_ffff_0000_0005;
        cpu.regs.rbx = 0x9;
        cpu.regs.rcx = 0x8;
        let instr = with1(Code::Cmpxchg8b_m64, MemoryOperand::with_base(Register::RDI));
        let (after, _, _) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_ne!(after.regs.rflags & RFLAGS_ZF, 0);
        assert_eq!(ram.peek_u64(DATA + 4), 0x0000_0008_0000_0009);
        let (after, _, _) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!((after.regs.rax, after.regs.rdx), (9, 8));
    }

    #[test]
    fn fwait_waits_for_nothing_unless_an_unmasked_exception_is_pending() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let cpu = long_cpu(&ram, 0);
        let (after, kind, _) =
            run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Wait)).unwrap();
        assert_eq!((kind, after.regs.rip), (Kind::Fwait, CODE + 1));
        // Invalid-operation pending (FSW.IE) with IM masked: still nothing.
        ext.area[XSAVE_HEADER] = 1;
        ext.area[XSAVE_FSW] = 0x81;
        run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Wait)).unwrap();
        // Unmask it: #MF, refused.
        ext.area[XSAVE_FCW] = 0x7e;
        let err = run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Wait)).unwrap_err();
        assert!(
            matches!(
                err,
                CompleteError::Fault {
                    exception: Exception::MF,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!ext.changed);
    }

    #[test]
    fn clac_and_stac_flip_ac_in_ring_0_only() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let cpu = long_cpu(&ram, 0);
        let (after, _, _) = run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Stac)).unwrap();
        assert_eq!(after.regs.rflags, 0x202 | RFLAGS_AC);
        let (after, _, _) = run(&ram, &after, &mut ext, 64, Instruction::with(Code::Clac)).unwrap();
        assert_eq!(after.regs.rflags, 0x202);
        let user = long_cpu(&ram, 3);
        assert!(run(&ram, &user, &mut ext, 64, Instruction::with(Code::Stac)).is_err());
    }

    #[test]
    fn ldmxcsr_and_stmxcsr_go_through_the_xsave_image() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rsi = DATA;
        ram.poke(DATA, &0x9fc0u32.to_le_bytes());
        let instr = with1(Code::Ldmxcsr_m32, MemoryOperand::with_base(Register::RSI));
        run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert!(ext.changed);
        assert_eq!(read_u32(&ext.area, XSAVE_MXCSR), 0x9fc0);
        // SSE state must be live for the hypervisor to take MXCSR from the image.
        assert_ne!(read_u64(&ext.area, XSAVE_HEADER) & SSE, 0);
        let instr = with1(
            Code::Stmxcsr_m32,
            MemoryOperand::with_base_displ(Register::RSI, 8),
        );
        run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!(ram.peek_u32(DATA + 8), 0x9fc0);
        // Reserved bits (beyond MXCSR_MASK): #GP, refused, the image unchanged.
        ext.changed = false;
        ram.poke(DATA, &0x1_0000u32.to_le_bytes());
        let instr = with1(Code::Ldmxcsr_m32, MemoryOperand::with_base(Register::RSI));
        let err = run(&ram, &cpu, &mut ext, 64, instr).unwrap_err();
        assert!(
            matches!(
                err,
                CompleteError::Fault {
                    exception: Exception { vector: 13, .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(!ext.changed);
    }

    /// An image with recognisable contents in every component.
    fn patterned_ext() -> Ext {
        let mut ext = Ext::new();
        for (i, b) in ext.area.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        ext.area[XSAVE_MXCSR..XSAVE_MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        ext.area[XSAVE_MXCSR_MASK..XSAVE_MXCSR_MASK + 4].copy_from_slice(&0xffffu32.to_le_bytes());
        ext.area[XSAVE_HEADER..XSAVE_EXTENDED].fill(0);
        write_u64(&mut ext.area, XSAVE_HEADER, X87 | SSE | YMM | 1 << 5);
        ext
    }

    #[test]
    fn xsave_then_xrstor_round_trips_in_the_standard_format() {
        let ram = Ram::new();
        let saved = patterned_ext();
        let mut ext = patterned_ext();
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rdi = DATA;
        cpu.regs.rax = u64::from(u32::MAX);
        cpu.regs.rdx = u64::from(u32::MAX);
        let instr = with1(Code::Xsave64_mem, MemoryOperand::with_base(Register::RDI));
        let (_, kind, _) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!(kind, Kind::Xsave);
        assert!(!ext.changed);
        assert_eq!(ram.peek(DATA, 416), saved.area[..416]);
        assert_eq!(ram.peek(DATA + 576, 256), saved.area[576..832]);
        assert_eq!(ram.peek(DATA + 1088, 64), saved.area[1088..1152]);
        assert_eq!(ram.peek_u64(DATA + 512), X87 | SSE | YMM | 1 << 5);
        assert_eq!(ram.peek_u64(DATA + 520), 0);

        // Wipe the vCPU's state, then restore it from memory.
        ext.area[..416].fill(0);
        ext.area[576..1152].fill(0);
        ext.area[XSAVE_MXCSR_MASK..XSAVE_MXCSR_MASK + 4].copy_from_slice(&0xffffu32.to_le_bytes());
        let instr = with1(Code::Xrstor64_mem, MemoryOperand::with_base(Register::RDI));
        let (_, kind, _) = run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!(kind, Kind::Xrstor);
        assert!(ext.changed);
        assert_eq!(ext.area[..416], saved.area[..416]);
        assert_eq!(ext.area[576..832], saved.area[576..832]);
        assert_eq!(ext.area[1088..1152], saved.area[1088..1152]);
    }

    #[test]
    fn xrstor_puts_components_absent_from_xstate_bv_in_their_initial_state() {
        let ram = Ram::new();
        let mut ext = patterned_ext();
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rdi = DATA;
        cpu.regs.rax = YMM | SSE; // only AVX and SSE are requested
        ram.poke(DATA + 512, &SSE.to_le_bytes()); // XSTATE_BV: SSE only
        ram.poke(DATA + XSAVE_MXCSR as u64, &0x1f80u32.to_le_bytes());
        let x87_before = ext.area[..24].to_vec();
        let instr = with1(Code::Xrstor64_mem, MemoryOperand::with_base(Register::RDI));
        run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert!(
            ext.area[576..832].iter().all(|&b| b == 0),
            "AVX state initialised"
        );
        assert_eq!(
            ext.area[..24],
            x87_before[..],
            "x87 not requested: untouched"
        );
        let bv = read_u64(&ext.area, XSAVE_HEADER);
        assert_eq!(bv & (X87 | SSE | YMM), X87 | SSE);
    }

    #[test]
    fn xsavec_packs_components_and_xrstor_reads_the_compacted_form() {
        let ram = Ram::new();
        let saved = patterned_ext();
        let mut ext = patterned_ext();
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rdi = DATA;
        cpu.regs.rax = X87 | SSE | YMM | 1 << 5;
        let instr = with1(Code::Xsavec64_mem, MemoryOperand::with_base(Register::RDI));
        run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!(
            ram.peek_u64(DATA + 520),
            XCOMP_BV_COMPACTED | X87 | SSE | YMM | 1 << 5
        );
        // AVX at 576 (256 bytes), then component 5 aligned up from 832 to 832 (already 64).
        assert_eq!(ram.peek(DATA + 576, 256), saved.area[576..832]);
        assert_eq!(ram.peek(DATA + 832, 64), saved.area[1088..1152]);

        ext.area[576..1152].fill(0);
        let instr = with1(Code::Xrstor64_mem, MemoryOperand::with_base(Register::RDI));
        run(&ram, &cpu, &mut ext, 64, instr).unwrap();
        assert_eq!(ext.area[576..832], saved.area[576..832]);
        assert_eq!(ext.area[1088..1152], saved.area[1088..1152]);
    }

    /// The area's offsets wrap at the top of the address space instead of overflowing (found
    /// by the instruction_complete fuzz target); there is no RAM there.
    #[test]
    fn an_xsave_area_at_the_top_of_the_address_space_is_refused() {
        let ram = Ram::new();
        let mut ext = patterned_ext();
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rax = u64::from(u32::MAX);
        cpu.regs.rdi = !63; // 64 bytes below 2^64
        for code in [
            Code::Xsave64_mem,
            Code::Xrstor64_mem,
            Code::Xsavec64_mem,
            Code::Fxsave64_m512byte,
            Code::Fxrstor64_m512byte,
        ] {
            let instr = with1(code, MemoryOperand::with_base(Register::RDI));
            let err = run(&ram, &cpu, &mut ext, 64, instr).unwrap_err();
            assert!(
                matches!(err, CompleteError::Memory { .. }),
                "{code:?}: {err}"
            );
        }
    }

    #[test]
    fn xsave_family_refuses_what_would_fault() {
        let ram = Ram::new();
        let mut ext = patterned_ext();
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rax = u64::from(u32::MAX);
        cpu.regs.rdi = DATA + 16; // not 64-byte aligned
        let xsave = with1(Code::Xsave64_mem, MemoryOperand::with_base(Register::RDI));
        let err = run(&ram, &cpu, &mut ext, 64, xsave).unwrap_err();
        assert!(
            matches!(
                err,
                CompleteError::Fault {
                    exception: Exception { vector: 13, .. },
                    ..
                }
            ),
            "{err}"
        );
        // XSTATE_BV naming a component XCR0 disables.
        cpu.regs.rdi = DATA;
        ram.poke(DATA + 512, &(1u64 << 9).to_le_bytes());
        let xrstor = with1(Code::Xrstor64_mem, MemoryOperand::with_base(Register::RDI));
        let err = run(&ram, &cpu, &mut ext, 64, xrstor).unwrap_err();
        assert!(
            matches!(
                err,
                CompleteError::Fault {
                    exception: Exception { vector: 13, .. },
                    ..
                }
            ),
            "{err}"
        );
        // Reserved header bytes.
        ram.poke(DATA + 512, &[0u8; 64]);
        ram.poke(DATA + 512 + 20, &[1]);
        let err = run(&ram, &cpu, &mut ext, 64, xrstor).unwrap_err();
        assert!(
            matches!(
                err,
                CompleteError::Fault {
                    exception: Exception { vector: 13, .. },
                    ..
                }
            ),
            "{err}"
        );
        // CR4.OSXSAVE clear: #UD.
        ram.poke(DATA + 512, &[0u8; 64]);
        cpu.sregs.cr4 = 0;
        let err = run(&ram, &cpu, &mut ext, 64, xrstor).unwrap_err();
        assert!(
            matches!(
                err,
                CompleteError::Fault {
                    exception: Exception::UD,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!ext.changed);
    }

    #[test]
    fn fxsave_and_fxrstor_round_trip_the_legacy_region() {
        let ram = Ram::new();
        let saved = patterned_ext();
        let mut ext = patterned_ext();
        let mut cpu = long_cpu(&ram, 0);
        cpu.regs.rbx = DATA;
        let fxsave = with1(
            Code::Fxsave64_m512byte,
            MemoryOperand::with_base(Register::RBX),
        );
        run(&ram, &cpu, &mut ext, 64, fxsave).unwrap();
        assert_eq!(ram.peek(DATA, 416), saved.area[..416]);
        // Wipe the registers; MXCSR_MASK is the processor's, not state.
        ext.area[..XSAVE_MXCSR_MASK].fill(0);
        ext.area[XSAVE_MXCSR_MASK + 4..416].fill(0);
        let fxrstor = with1(
            Code::Fxrstor64_m512byte,
            MemoryOperand::with_base(Register::RBX),
        );
        run(&ram, &cpu, &mut ext, 64, fxrstor).unwrap();
        assert_eq!(ext.area[..416], saved.area[..416]);
    }

    #[test]
    fn xgetbv_and_xsetbv_use_xcr0() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = long_cpu(&ram, 0);
        let (after, _, _) = run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Xgetbv)).unwrap();
        assert_eq!((after.regs.rax, after.regs.rdx), (ext.xcr0, 0));
        cpu.regs.rax = X87 | SSE;
        run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Xsetbv)).unwrap();
        assert_eq!(ext.xcr0, X87 | SSE);
        cpu.regs.rax = YMM;
        assert!(run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Xsetbv)).is_err());
    }

    #[test]
    fn the_instruction_is_fetched_through_4_level_paging() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = long_cpu(&ram, 0);
        // CR3 0x100000: PML4[511] -> PDPT 0x101000, PDPT[510] -> PD 0x102000, PD[8] -> a 2 MiB
        // page at 0x200000. Linear 0xffffffff81000000 + x -> 0x200000 + x.
        let present_rw = 0x3;
        ram.poke(
            0x10_0000 + 511 * 8,
            &(0x10_1000u64 | present_rw).to_le_bytes(),
        );
        ram.poke(
            0x10_1000 + 510 * 8,
            &(0x10_2000u64 | present_rw).to_le_bytes(),
        );
        ram.poke(
            0x10_2000 + 8 * 8,
            &(0x20_0000u64 | present_rw | 0x80).to_le_bytes(),
        );
        cpu.sregs.cr0 |= CR0_PG;
        cpu.sregs.cr4 |= CR4_PAE;
        cpu.sregs.cr3 = 0x10_0000;
        cpu.regs.rip = 0xffff_ffff_8100_0ffe; // the instruction straddles nothing: 2 MiB page
        let bytes = encode(64, cpu.regs.rip, Instruction::with(Code::Stac));
        ram.poke(0x20_0ffe, &bytes);
        let mut after = cpu;
        assert_eq!(complete(&mut after, &ram, &mut ext), Ok(Kind::Stac));
        assert_eq!(after.regs.rip, 0xffff_ffff_8100_1001);
        // An unmapped RIP: the fetch's #PF (not present, no I/D without NXE or SMEP);
        // nothing changes.
        cpu.regs.rip = 0xffff_8000_0000_0000;
        let mut after = cpu;
        assert_eq!(
            complete(&mut after, &ram, &mut ext),
            Err(CompleteError::PageFault {
                linear: 0xffff_8000_0000_0000,
                error_code: 0
            })
        );
        assert_eq!(after, cpu);
        // A RIP outside RAM altogether is the VMM's problem.
        ram.poke(0x10_2000 + 9 * 8, &(0x4000_0000u64 | 0x83).to_le_bytes());
        cpu.regs.rip = 0xffff_ffff_8120_0000;
        let mut after = cpu;
        assert!(matches!(
            complete(&mut after, &ram, &mut ext),
            Err(CompleteError::Fetch { .. })
        ));
        assert_eq!(after, cpu);
    }

    #[test]
    fn a_store_to_a_page_the_guest_has_not_mapped_writable_is_its_page_fault() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = long_cpu(&ram, 0);
        // Code as in the fetch test: a 2 MiB page at linear 0xffffffff81000000. Data: PML4[0]
        // -> PDPT 0x103000, PDPT[0] -> PD 0x104000, PD[1] -> PT 0x105000, PT[0x10] -> the
        // 4 KiB page 0x300000 at linear 0x210000.
        let present_rw = 0x3u64;
        for (at, value) in [
            (0x10_0000 + 511 * 8, 0x10_1000 | present_rw),
            (0x10_1000 + 510 * 8, 0x10_2000 | present_rw),
            (0x10_2000 + 8 * 8, 0x20_0000 | present_rw | 0x80),
            (0x10_0000, 0x10_3000 | present_rw),
            (0x10_3000, 0x10_4000 | present_rw),
            (0x10_4000 + 8, 0x10_5000 | present_rw),
        ] {
            ram.poke(at, &value.to_le_bytes());
        }
        cpu.sregs.cr0 |= CR0_PG | 1 << 16; // WP, as Linux runs
        cpu.sregs.cr4 |= CR4_PAE;
        cpu.sregs.cr3 = 0x10_0000;
        cpu.regs.rip = 0xffff_ffff_8100_0000;
        cpu.regs.rdi = 0x21_0000;
        let store = with1(Code::Stmxcsr_m32, MemoryOperand::with_base(Register::RDI));
        ram.poke(0x20_0000, &encode(64, cpu.regs.rip, store));
        let pte = 0x10_5000 + 0x10 * 8;

        // Not present: #PF, error code W, CR2 the address; nothing changes.
        let mut after = cpu;
        assert_eq!(
            complete(&mut after, &ram, &mut ext),
            Err(CompleteError::PageFault {
                linear: 0x21_0000,
                error_code: 0x2
            })
        );
        assert_eq!(after, cpu);

        // Present but read-only (a copy-on-write page): #PF with P and W; the page keeps its
        // bytes, so the guest's fault handler can copy it first.
        ram.poke(pte, &(0x30_0000u64 | 0x1).to_le_bytes());
        ram.poke(0x30_0000, &[0xaa; 4]);
        let mut after = cpu;
        assert_eq!(
            complete(&mut after, &ram, &mut ext),
            Err(CompleteError::PageFault {
                linear: 0x21_0000,
                error_code: 0x3
            })
        );
        assert_eq!(ram.peek(0x30_0000, 4), [0xaa; 4]);

        // The faults set no accessed flag anywhere.
        for at in [0x10_0000, 0x10_3000, 0x10_4000 + 8, 0x10_2000 + 8 * 8] {
            assert_eq!(ram.peek_u64(at) & (ACCESSED | DIRTY), 0, "entry at {at:#x}");
        }

        // Writable: the store lands, and the processor's flags are set: accessed on every
        // level of both walks, dirty on the data page only.
        ram.poke(pte, &(0x30_0000u64 | present_rw).to_le_bytes());
        let mut after = cpu;
        assert_eq!(complete(&mut after, &ram, &mut ext), Ok(Kind::Stmxcsr));
        assert_eq!(ram.peek_u32(0x30_0000), MXCSR_DEFAULT);
        for at in [0x10_0000, 0x10_3000, 0x10_4000 + 8] {
            assert_eq!(ram.peek_u64(at) & (ACCESSED | DIRTY), ACCESSED);
        }
        assert_eq!(ram.peek_u64(pte) & (ACCESSED | DIRTY), ACCESSED | DIRTY);
        for at in [0x10_0000 + 511 * 8, 0x10_1000 + 510 * 8, 0x10_2000 + 8 * 8] {
            assert_eq!(
                ram.peek_u64(at) & (ACCESSED | DIRTY),
                ACCESSED,
                "code {at:#x}"
            );
        }
    }

    const PML4: u64 = 0x30_0000;
    const PT: u64 = 0x30_3000;
    /// PML4[0], PDPT[0], PD[0]: the upper entries every walk below 2 MiB uses.
    const UPPER: [u64; 3] = [PML4, 0x30_1000, 0x30_2000];
    const CR0_WP: u64 = 1 << 16;
    const CR4_SMEP: u64 = 1 << 20;
    const CR4_SMAP: u64 = 1 << 21;
    const EFER_NXE: u64 = 1 << 11;

    /// Identity-maps the test RAM with 4 KiB pages, every entry present and writable with
    /// accessed/dirty clear (plus `extra` flags on the upper levels), and turns on 4-level
    /// paging with CR0.WP, as Linux runs.
    fn identity_paging(ram: &Ram, cpu: &mut Cpu, extra: u64) {
        ram.poke(UPPER[0], &(0x30_1000 | 3 | extra).to_le_bytes());
        ram.poke(UPPER[1], &(0x30_2000 | 3 | extra).to_le_bytes());
        ram.poke(UPPER[2], &(PT | 3 | extra).to_le_bytes());
        ram.poke(UPPER[2] + 8, &((PT + 0x1000) | 3 | extra).to_le_bytes());
        for page in 0..(RAM_BYTES as u64 >> 12) {
            ram.poke(PT + page * 8, &(page << 12 | 3).to_le_bytes());
        }
        cpu.sregs.cr0 |= CR0_PG | CR0_WP;
        cpu.sregs.cr4 |= CR4_PAE;
        cpu.sregs.cr3 = PML4;
    }

    fn pte(linear: u64) -> u64 {
        PT + (linear >> 12) * 8
    }

    fn set_pte(ram: &Ram, linear: u64, flags: u64) {
        ram.poke(pte(linear), &(linear & !0xfff | flags).to_le_bytes());
    }

    fn flags(ram: &Ram, entry: u64) -> u64 {
        ram.peek_u64(entry) & (ACCESSED | DIRTY)
    }

    fn tables(ram: &Ram) -> Vec<u8> {
        ram.peek(PML4, 0x5000)
    }

    #[test]
    fn a_completed_instruction_sets_the_accessed_and_dirty_flags_it_used() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = long_cpu(&ram, 0);
        identity_paging(&ram, &mut cpu, 0);
        cpu.regs.rdi = DATA;
        let popcnt = Instruction::with2(
            Code::Popcnt_r64_rm64,
            Register::RAX,
            MemoryOperand::with_base(Register::RDI),
        )
        .unwrap();
        run(&ram, &cpu, &mut ext, 64, popcnt).unwrap();
        // A read: accessed on every level of the data walk and the fetch walk, dirty nowhere.
        for entry in UPPER {
            assert_eq!(flags(&ram, entry), ACCESSED, "upper entry {entry:#x}");
        }
        assert_eq!(flags(&ram, pte(DATA)), ACCESSED);
        assert_eq!(flags(&ram, pte(CODE)), ACCESSED);
        // Pages nobody touched keep clear flags.
        assert_eq!(flags(&ram, pte(DATA + 0x1000)), 0);
        assert_eq!(flags(&ram, pte(STACK_TOP - 8)), 0);

        // A write across a page boundary: both pages accessed and dirty.
        cpu.regs.rdi = DATA + 0x2ffe;
        let stmxcsr = with1(Code::Stmxcsr_m32, MemoryOperand::with_base(Register::RDI));
        run(&ram, &cpu, &mut ext, 64, stmxcsr).unwrap();
        assert_eq!(flags(&ram, pte(DATA + 0x2000)), ACCESSED | DIRTY);
        assert_eq!(flags(&ram, pte(DATA + 0x3000)), ACCESSED | DIRTY);
        assert_eq!(flags(&ram, pte(DATA)), ACCESSED);
        for entry in UPPER {
            assert_eq!(flags(&ram, entry), ACCESSED, "upper entry {entry:#x}");
        }

        // int3: the IDT, GDT and TSS are read (accessed), the new stack is written (dirty).
        gate64(&ram, 3, 0x5000, GATE_INTERRUPT, 0, 0);
        let (after, _, _) = run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Int3)).unwrap();
        assert_eq!(after.regs.rip, 0x5000);
        assert_eq!(flags(&ram, pte(IDT)), ACCESSED);
        assert_eq!(flags(&ram, pte(GDT)), ACCESSED);
        assert_eq!(flags(&ram, pte(STACK_TOP - 40)), ACCESSED | DIRTY);
    }

    #[test]
    fn a_refused_or_faulting_instruction_sets_no_flags() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = long_cpu(&ram, 0);
        identity_paging(&ram, &mut cpu, 0);

        // The second page of a page-crossing store is read-only: #PF on it, and the first
        // page, already checked, is not marked.
        set_pte(&ram, DATA + 0x3000, 1);
        let before = tables(&ram);
        cpu.regs.rdi = DATA + 0x2ffe;
        let stmxcsr = with1(Code::Stmxcsr_m32, MemoryOperand::with_base(Register::RDI));
        assert_eq!(
            run(&ram, &cpu, &mut ext, 64, stmxcsr),
            Err(CompleteError::PageFault {
                linear: DATA + 0x3000,
                error_code: 0x3
            })
        );
        assert_eq!(tables(&ram), before);

        // fxrstor reads its image, then refuses reserved MXCSR bits (#GP).
        cpu.regs.rdi = DATA;
        ram.poke(DATA + XSAVE_MXCSR as u64, &u32::MAX.to_le_bytes());
        let fxrstor = with1(
            Code::Fxrstor64_m512byte,
            MemoryOperand::with_base(Register::RDI),
        );
        assert!(matches!(
            run(&ram, &cpu, &mut ext, 64, fxrstor),
            Err(CompleteError::Fault {
                exception: Exception { vector: 13, .. },
                ..
            })
        ));
        assert_eq!(tables(&ram), before);

        // int3 reads the IDT and GDT, then its stack push finds no page.
        gate64(&ram, 3, 0x5000, GATE_INTERRUPT, 0, 0);
        set_pte(&ram, STACK_TOP - 0x1000, 0);
        let before = tables(&ram);
        assert_eq!(
            run(&ram, &cpu, &mut ext, 64, Instruction::with(Code::Int3)),
            Err(CompleteError::PageFault {
                linear: STACK_TOP - 40,
                error_code: 0x2
            })
        );
        assert_eq!(tables(&ram), before);
    }

    #[test]
    fn smap_smep_and_nx_guard_the_kernel_as_the_processor_does() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = long_cpu(&ram, 0);
        identity_paging(&ram, &mut cpu, 4);
        cpu.sregs.cr4 |= CR4_SMAP;
        // DATA is a user page (U/S on every level); everything else a kernel page.
        set_pte(&ram, DATA, 7);
        cpu.regs.rdi = DATA;
        let popcnt = Instruction::with2(
            Code::Popcnt_r64_rm64,
            Register::RAX,
            MemoryOperand::with_base(Register::RDI),
        )
        .unwrap();
        let before = tables(&ram);
        // SMAP, AC clear: the kernel's read of a user page is #PF with P only.
        assert_eq!(
            run(&ram, &cpu, &mut ext, 64, popcnt),
            Err(CompleteError::PageFault {
                linear: DATA,
                error_code: 0x1
            })
        );
        assert_eq!(tables(&ram), before);
        // After stac (AC set) the same read goes through.
        let mut opened = cpu;
        opened.regs.rflags |= RFLAGS_AC;
        assert!(run(&ram, &opened, &mut ext, 64, popcnt).is_ok());

        // The IDT on a user page: int3's gate read is an implicit supervisor access, which
        // SMAP refuses whatever AC says.
        gate64(&ram, 3, 0x5000, GATE_INTERRUPT, 0, 0);
        set_pte(&ram, IDT, 7);
        assert_eq!(
            run(&ram, &opened, &mut ext, 64, Instruction::with(Code::Int3)),
            Err(CompleteError::PageFault {
                linear: IDT + 3 * 16,
                error_code: 0x1
            })
        );
        set_pte(&ram, IDT, 3);
        assert!(run(&ram, &opened, &mut ext, 64, Instruction::with(Code::Int3)).is_ok());

        // SMEP: the kernel fetching from a user page is #PF with P and I/D.
        let stac = Instruction::with(Code::Stac);
        set_pte(&ram, CODE, 7);
        let mut smep = cpu;
        smep.sregs.cr4 |= CR4_SMEP;
        assert_eq!(
            run(&ram, &smep, &mut ext, 64, stac),
            Err(CompleteError::PageFault {
                linear: CODE,
                error_code: 0x11
            })
        );
        assert!(run(&ram, &cpu, &mut ext, 64, stac).is_ok());

        // NX: a fetch from an execute-disable page faults once EFER.NXE is on; without NXE
        // bit 63 is reserved (P|RSVD).
        set_pte(&ram, CODE, 3 | 1 << 63);
        let mut nx = cpu;
        nx.sregs.efer |= EFER_NXE;
        assert_eq!(
            run(&ram, &nx, &mut ext, 64, stac),
            Err(CompleteError::PageFault {
                linear: CODE,
                error_code: 0x11
            })
        );
        assert_eq!(
            run(&ram, &cpu, &mut ext, 64, stac),
            Err(CompleteError::PageFault {
                linear: CODE,
                error_code: 0x9
            })
        );
    }

    #[test]
    fn other_instructions_are_not_completed() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let cpu = long_cpu(&ram, 0);
        let instr = Instruction::with2(Code::Mov_r64_rm64, Register::RAX, Register::RBX).unwrap();
        let err = run(&ram, &cpu, &mut ext, 64, instr).unwrap_err();
        assert_eq!(
            err,
            CompleteError::Unsupported {
                mnemonic: Mnemonic::Mov
            }
        );
    }

    #[test]
    fn random_bytes_and_registers_never_panic() {
        let ram = Ram::new();
        let mut rng = Rng(0xfeed_f00d_dead_beef);
        for round in 0..20_000 {
            let mut ext = patterned_ext();
            let mut cpu = if round % 3 == 0 {
                protected_cpu(&ram, (round % 2 * 3) as u8)
            } else {
                long_cpu(&ram, (round % 2 * 3) as u8)
            };
            for reg in [
                &mut cpu.regs.rax,
                &mut cpu.regs.rbx,
                &mut cpu.regs.rcx,
                &mut cpu.regs.rdx,
                &mut cpu.regs.rsi,
                &mut cpu.regs.rdi,
                &mut cpu.regs.rsp,
            ] {
                *reg = if rng.next() % 2 == 0 {
                    rng.next()
                } else {
                    rng.next() % RAM_BYTES as u64
                };
            }
            cpu.sregs.idt.base = rng.next() % (RAM_BYTES as u64 * 2);
            cpu.sregs.tr.base = rng.next() % (RAM_BYTES as u64 * 2);
            let mut bytes = [0u8; 15];
            for b in &mut bytes {
                *b = rng.next() as u8;
            }
            // Prefer the opcodes this module completes.
            let openers: [&[u8]; 8] = [
                &[0xcc],
                &[0xcd],
                &[0x0f, 0xae],
                &[0x48, 0x0f, 0xc7],
                &[0xf3, 0x0f, 0xb8],
                &[0x9b],
                &[0x0f, 0x01],
                &[0x48, 0x0f, 0xae],
            ];
            let opener = openers[(rng.next() % 8) as usize];
            bytes[..opener.len()].copy_from_slice(opener);
            ram.poke(CODE, &bytes);
            let mut after = cpu;
            if complete(&mut after, &ram, &mut ext).is_err() {
                assert_eq!(after, cpu);
            }
        }
    }

    /// XMM/YMM register `n` of the test image (the AVX half at 576).
    fn vector(ext: &Ext, n: usize) -> [u32; 8] {
        let mut v = [0u32; 8];
        for (i, slot) in v.iter_mut().enumerate() {
            let at = if i < 4 {
                160 + 16 * n + 4 * i
            } else {
                576 + 16 * n + 4 * (i - 4)
            };
            *slot = read_u32(&ext.area, at);
        }
        v
    }

    fn set_vector(ext: &mut Ext, n: usize, v: [u32; 8]) {
        for (i, value) in v.iter().enumerate() {
            let at = if i < 4 {
                160 + 16 * n + 4 * i
            } else {
                576 + 16 * n + 4 * (i - 4)
            };
            ext.area[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        let bv = read_u64(&ext.area, XSAVE_HEADER) | SSE | YMM;
        write_u64(&mut ext.area, XSAVE_HEADER, bv);
    }

    fn simd_cpu(ram: &Ram) -> Cpu {
        let mut cpu = long_cpu(ram, 0);
        cpu.sregs.cr4 |= 1 << 9; // OSFXSR
        cpu
    }

    fn random_vector(rng: &mut Rng) -> [u32; 8] {
        std::array::from_fn(|_| rng.next() as u32)
    }

    #[test]
    fn blake2s_vector_instructions_match_a_lane_by_lane_oracle() {
        let ram = Ram::new();
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        use Register::*;
        for _ in 0..50 {
            let mut ext = Ext::new();
            let cpu = simd_cpu(&ram);
            let (x1, x2, x3) = (
                random_vector(&mut rng),
                random_vector(&mut rng),
                random_vector(&mut rng),
            );
            set_vector(&mut ext, 1, x1);
            set_vector(&mut ext, 2, x2);
            set_vector(&mut ext, 3, x3);
            let imm = rng.next() as u32 & 0xff;
            let shift = imm % 32;
            let cases: Vec<(Instruction, [u32; 8])> = vec![
                (
                    Instruction::with3(Code::VEX_Vpaddd_xmm_xmm_xmmm128, XMM0, XMM1, XMM2).unwrap(),
                    std::array::from_fn(|i| if i < 4 { x1[i].wrapping_add(x2[i]) } else { 0 }),
                ),
                (
                    Instruction::with3(Code::VEX_Vpxor_ymm_ymm_ymmm256, YMM0, YMM1, YMM2).unwrap(),
                    std::array::from_fn(|i| x1[i] ^ x2[i]),
                ),
                (
                    Instruction::with3(
                        Code::EVEX_Vprord_xmm_k1z_xmmm128b32_imm8,
                        XMM0,
                        XMM1,
                        shift,
                    )
                    .unwrap(),
                    std::array::from_fn(|i| if i < 4 { x1[i].rotate_right(shift) } else { 0 }),
                ),
                (
                    Instruction::with3(Code::VEX_Vpshufd_xmm_xmmm128_imm8, XMM0, XMM1, imm)
                        .unwrap(),
                    std::array::from_fn(|i| {
                        if i < 4 {
                            x1[(imm >> (2 * i) & 3) as usize]
                        } else {
                            0
                        }
                    }),
                ),
                (
                    Instruction::with3(Code::VEX_Vextracti128_xmmm128_ymm_imm8, XMM0, YMM1, 1u32)
                        .unwrap(),
                    std::array::from_fn(|i| if i < 4 { x1[i + 4] } else { 0 }),
                ),
                (
                    Instruction::with2(Code::VEX_Vmovdqa_ymm_ymmm256, YMM0, YMM3).unwrap(),
                    x3,
                ),
                (
                    // Legacy SSE: the upper half of YMM0 (x3's copy below) is kept.
                    Instruction::with2(Code::Paddd_xmm_xmmm128, XMM3, XMM1).unwrap(),
                    std::array::from_fn(|i| {
                        if i < 4 {
                            x3[i].wrapping_add(x1[i])
                        } else {
                            x3[i]
                        }
                    }),
                ),
            ];
            for (instr, want) in cases {
                let mut ext = Ext::new();
                set_vector(&mut ext, 1, x1);
                set_vector(&mut ext, 2, x2);
                set_vector(&mut ext, 3, x3);
                set_vector(&mut ext, 0, x3);
                let dst = instr.op0_register().number();
                run(&ram, &cpu, &mut ext, 64, instr).unwrap_or_else(|e| panic!("{instr}: {e}"));
                assert_eq!(vector(&ext, dst), want, "{instr}");
                assert!(ext.changed);
            }
            // VPERMI2D ymm0 (indexes), ymm1, ymm2: index i picks from the 16 dwords of ymm1:ymm2.
            let mut ext = Ext::new();
            let indexes: [u32; 8] = std::array::from_fn(|_| rng.next() as u32);
            set_vector(&mut ext, 0, indexes);
            set_vector(&mut ext, 1, x1);
            set_vector(&mut ext, 2, x2);
            let instr =
                Instruction::with3(Code::EVEX_Vpermi2d_ymm_k1z_ymm_ymmm256b32, YMM0, YMM1, YMM2)
                    .unwrap();
            run(&ram, &cpu, &mut ext, 64, instr).unwrap();
            let want: [u32; 8] = std::array::from_fn(|i| {
                let pick = (indexes[i] & 15) as usize;
                if pick < 8 {
                    x1[pick]
                } else {
                    x2[pick - 8]
                }
            });
            assert_eq!(vector(&ext, 0), want);
            // PSHUFB xmm1, xmm2 (SSSE3): bytes picked by the low nibble, zero where bit 7 is set.
            let mut ext = Ext::new();
            set_vector(&mut ext, 1, x1);
            set_vector(&mut ext, 2, x2);
            let instr = Instruction::with2(Code::Pshufb_xmm_xmmm128, XMM1, XMM2).unwrap();
            run(&ram, &cpu, &mut ext, 64, instr).unwrap();
            let bytes =
                |v: [u32; 8]| -> Vec<u8> { v[..4].iter().flat_map(|d| d.to_le_bytes()).collect() };
            let (a, control) = (bytes(x1), bytes(x2));
            let want: Vec<u8> = control
                .iter()
                .map(|&c| {
                    if c & 0x80 != 0 {
                        0
                    } else {
                        a[usize::from(c & 15)]
                    }
                })
                .collect();
            assert_eq!(bytes(vector(&ext, 1)), want);
        }
    }

    #[test]
    fn vector_moves_reach_memory_and_vzeroupper_clears_the_upper_halves() {
        let ram = Ram::new();
        let mut ext = Ext::new();
        let mut cpu = simd_cpu(&ram);
        cpu.regs.rdi = DATA;
        let pattern: [u32; 8] = std::array::from_fn(|i| 0x1111_1111 * (i as u32 + 1));
        set_vector(&mut ext, 5, pattern);
        let store = Instruction::with2(
            Code::VEX_Vmovdqu_ymmm256_ymm,
            MemoryOperand::with_base(Register::RDI),
            Register::YMM5,
        )
        .unwrap();
        run(&ram, &cpu, &mut ext, 64, store).unwrap();
        let stored: Vec<u32> = (0..8).map(|i| ram.peek_u32(DATA + 4 * i)).collect();
        assert_eq!(stored, pattern);
        let load = Instruction::with2(
            Code::VEX_Vmovdqu_xmm_xmmm128,
            Register::XMM6,
            MemoryOperand::with_base(Register::RDI),
        )
        .unwrap();
        set_vector(&mut ext, 6, [9; 8]);
        run(&ram, &cpu, &mut ext, 64, load).unwrap();
        assert_eq!(
            vector(&ext, 6),
            [pattern[0], pattern[1], pattern[2], pattern[3], 0, 0, 0, 0]
        );
        // MOVDQA of a misaligned operand faults.
        cpu.regs.rdi = DATA + 4;
        let aligned = Instruction::with2(
            Code::Movdqa_xmm_xmmm128,
            Register::XMM6,
            MemoryOperand::with_base(Register::RDI),
        )
        .unwrap();
        let err = run(&ram, &cpu, &mut ext, 64, aligned).unwrap_err();
        assert!(
            matches!(
                err,
                CompleteError::Fault {
                    exception: Exception { vector: 13, .. },
                    ..
                }
            ),
            "{err}"
        );
        run(
            &ram,
            &cpu,
            &mut ext,
            64,
            Instruction::with(Code::VEX_Vzeroupper),
        )
        .unwrap();
        assert_eq!(vector(&ext, 5)[4..], [0, 0, 0, 0]);
        assert_eq!(vector(&ext, 5)[..4], pattern[..4]);
        // Masked EVEX forms are not completed.
        let mut masked = Instruction::with3(
            Code::EVEX_Vprord_xmm_k1z_xmmm128b32_imm8,
            Register::XMM0,
            Register::XMM1,
            3u32,
        )
        .unwrap();
        masked.set_op_mask(Register::K1);
        assert!(run(&ram, &cpu, &mut ext, 64, masked).is_err());
    }
}
