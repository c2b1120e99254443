//! The MMIO instruction emulator (`xhyve::arch::x86_64::emulate`) on fuzzed modes, registers, RFLAGS
//! and instruction bytes, against a context with two small memory windows: "RAM" (reads and
//! writes succeed) and "MMIO" (reads are `MmioPending` unless the input says the value is ready).
//! Everything else is unmapped (`EmulateError::Memory`).
//!
//! Invariants checked beyond "no panic":
//! - replay safety: no memory read after a memory write, and on Err the registers, RFLAGS and
//!   memory are exactly as before;
//! - `Done { len }`: 1..=15 and equal to iced-x86's own decoded length;
//! - every write lands on an address one of the instruction's memory operands names (for
//!   BT/BTS/BTR/BTC with a register bit offset, the operand-sized unit that offset selects).
#![no_main]

use iced_x86::{
    Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register, RflagsBits,
};
use libfuzzer_sys::fuzz_target;
use xhyve::arch::x86_64::emulate::{emulate, CpuMode, EmulateError, Emulated, EmulatorContext};

const WINDOW: usize = 256;
const GPRS: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];
const SEGMENTS: [Register; 6] = [
    Register::ES,
    Register::CS,
    Register::SS,
    Register::DS,
    Register::FS,
    Register::GS,
];

#[derive(Clone, PartialEq, Eq, Debug)]
struct State {
    gprs: [u64; 16],
    rflags: u64,
    ram: [u8; WINDOW],
    mmio: [u8; WINDOW],
}

struct Context {
    state: State,
    rip: u64,
    ram_base: u64,
    mmio_base: u64,
    mmio_ready: bool,
    segment_bases: [u64; 6],
    wrote: bool,
    writes: Vec<(u64, usize)>,
}

/// Which window `[linear, linear + len)` lies wholly in, and the offset into it.
fn locate(base: u64, linear: u64, len: usize) -> Option<usize> {
    let offset = linear.checked_sub(base)?;
    let end = offset.checked_add(len as u64)?;
    (end <= WINDOW as u64).then_some(offset as usize)
}

impl EmulatorContext for Context {
    fn gpr(&self, reg: Register) -> u64 {
        if reg == Register::RIP {
            return self.rip;
        }
        let index = GPRS
            .iter()
            .position(|&r| r == reg)
            .unwrap_or_else(|| panic!("gpr() asked for {reg:?}, not a 64-bit GPR"));
        self.state.gprs[index]
    }

    fn set_gpr(&mut self, reg: Register, value: u64) {
        let index = GPRS
            .iter()
            .position(|&r| r == reg)
            .unwrap_or_else(|| panic!("set_gpr() of {reg:?}, not a 64-bit GPR"));
        self.state.gprs[index] = value;
    }

    fn rflags(&self) -> u64 {
        self.state.rflags
    }

    fn set_rflags(&mut self, value: u64) {
        self.state.rflags = value;
    }

    fn read_memory(&mut self, linear: u64, data: &mut [u8]) -> Result<(), EmulateError> {
        assert!(
            !self.wrote,
            "memory read at {linear:#x} after a memory write"
        );
        assert!(
            (1..=8).contains(&data.len()),
            "read of {} bytes",
            data.len()
        );
        let size = data.len();
        if let Some(at) = locate(self.ram_base, linear, size) {
            data.copy_from_slice(&self.state.ram[at..at + size]);
            return Ok(());
        }
        if let Some(at) = locate(self.mmio_base, linear, size) {
            if !self.mmio_ready {
                return Err(EmulateError::MmioPending { linear, size });
            }
            data.copy_from_slice(&self.state.mmio[at..at + size]);
            return Ok(());
        }
        Err(EmulateError::Memory { linear, size })
    }

    fn write_memory(&mut self, linear: u64, data: &[u8]) -> Result<(), EmulateError> {
        assert!(!self.wrote, "second memory write, at {linear:#x}");
        assert!(
            (1..=8).contains(&data.len()),
            "write of {} bytes",
            data.len()
        );
        let size = data.len();
        self.writes.push((linear, size));
        let window = if let Some(at) = locate(self.ram_base, linear, size) {
            &mut self.state.ram[at..at + size]
        } else if let Some(at) = locate(self.mmio_base, linear, size) {
            &mut self.state.mmio[at..at + size]
        } else {
            return Err(EmulateError::Memory { linear, size });
        };
        window.copy_from_slice(data);
        self.wrote = true;
        Ok(())
    }

    fn segment_base(&self, seg: Register) -> u64 {
        let index = SEGMENTS
            .iter()
            .position(|&s| s == seg)
            .unwrap_or_else(|| panic!("segment_base() of {seg:?}"));
        self.segment_bases[index]
    }
}

/// A little-endian reader that yields zeros once the input runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, i| acc | u64::from(self.byte()) << (8 * i))
    }
}

/// A register value: mostly pointers into (or just past) the windows, so memory operands hit.
fn register_value(input: &mut Input, ram_base: u64, mmio_base: u64) -> u64 {
    let kind = input.byte();
    match kind & 3 {
        0 => ram_base.wrapping_add(u64::from(input.byte())),
        1 => mmio_base.wrapping_add(u64::from(input.byte())),
        2 => input.u64(),
        _ => u64::from(input.byte()) | u64::from(kind >> 2) << 8,
    }
}

fn value_of(state: &State, rip: u64, reg: Register) -> u64 {
    if reg == Register::RIP || reg == Register::EIP {
        return rip;
    }
    let full = reg.full_register();
    let index = GPRS.iter().position(|&r| r == full).expect("a GPR");
    let value = state.gprs[index];
    match reg.size() {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => value & 0xffff,
        _ => value & 0xff,
    }
}

/// Where the instruction's memory operands may write (start addresses).
fn allowed_writes(instr: &Instruction, ctx: &Context, before: &State, mode: CpuMode) -> Vec<u64> {
    let seg_base = |seg: Register| -> u64 {
        if mode == CpuMode::Long64 && seg != Register::FS && seg != Register::GS {
            0
        } else {
            ctx.segment_bases[SEGMENTS.iter().position(|&s| s == seg).expect("a segment")]
        }
    };
    let resolve = |with_segments: bool| {
        move |reg: Register, _: usize, _: usize| -> Option<u64> {
            if reg.is_segment_register() {
                Some(if with_segments { seg_base(reg) } else { 0 })
            } else {
                Some(value_of(before, ctx.rip, reg))
            }
        }
    };
    let mut allowed = Vec::new();
    for op in 0..instr.op_count() {
        let memory = matches!(
            instr.op_kind(op),
            OpKind::Memory
                | OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemorySegDI
                | OpKind::MemorySegEDI
                | OpKind::MemorySegRDI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        );
        if !memory {
            continue;
        }
        if let Some(va) = instr.virtual_address(op, 0, resolve(true)) {
            allowed.push(va);
        }
    }
    let bit_ops = [Mnemonic::Bt, Mnemonic::Bts, Mnemonic::Btr, Mnemonic::Btc];
    if bit_ops.contains(&instr.mnemonic())
        && instr.op0_kind() == OpKind::Memory
        && instr.op1_kind() == OpKind::Register
    {
        let size = instr.memory_size().size();
        let bits = size as i64 * 8;
        let raw = value_of(before, ctx.rip, instr.op1_register());
        let shift = 64 - bits as u32;
        let index = ((raw << shift) as i64) >> shift;
        let displacement = (index.div_euclid(bits)).wrapping_mul(size as i64) as u64;
        let address_size = [instr.memory_base(), instr.memory_index()]
            .into_iter()
            .find(|&r| r != Register::None)
            .map(|r| r.size())
            .unwrap_or(instr.memory_displ_size() as usize);
        let mask = match address_size {
            8 => u64::MAX,
            4 => 0xffff_ffff,
            _ => 0xffff,
        };
        if let Some(offset) = instr.virtual_address(0, 0, resolve(false)) {
            let segment = seg_base(instr.memory_segment());
            allowed.push(segment.wrapping_add(offset.wrapping_add(displacement) & mask));
        }
    }
    // Outside 64-bit mode a linear address is 32 bits: segment base + offset wraps at 4 GiB
    // (iced-x86 adds them in 64 bits).
    if mode != CpuMode::Long64 {
        for va in &mut allowed {
            *va &= 0xffff_ffff;
        }
    }
    allowed
}

/// The x86 RFLAGS bits (OF, SF, ZF, AF, PF, CF, DF) iced-x86 says the instruction may change.
fn flags_it_may_change(instr: &Instruction) -> u64 {
    const BITS: [(u32, u64); 7] = [
        (RflagsBits::CF, 1 << 0),
        (RflagsBits::PF, 1 << 2),
        (RflagsBits::AF, 1 << 4),
        (RflagsBits::ZF, 1 << 6),
        (RflagsBits::SF, 1 << 7),
        (RflagsBits::DF, 1 << 10),
        (RflagsBits::OF, 1 << 11),
    ];
    let modified = instr.rflags_modified();
    BITS.iter()
        .filter(|(iced, _)| modified & iced != 0)
        .fold(0, |acc, (_, x86)| acc | x86)
}

/// Asserts that only registers and flags iced-x86 says the instruction writes changed.
fn assert_only_its_registers_changed(instr: &Instruction, before: &State, after: &State) {
    let mut factory = InstructionInfoFactory::new();
    let info = factory.info(instr);
    for (i, (&old, &new)) in before.gprs.iter().zip(&after.gprs).enumerate() {
        if old == new {
            continue;
        }
        let written = info.used_registers().iter().any(|used| {
            used.register().full_register() == GPRS[i]
                && matches!(
                    used.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                )
        });
        assert!(
            written,
            "{instr} changed {:?} from {old:#x} to {new:#x}",
            GPRS[i]
        );
    }
    let changed = before.rflags ^ after.rflags;
    let allowed = flags_it_may_change(instr);
    assert_eq!(
        changed & !allowed,
        0,
        "{instr} changed RFLAGS {:#x} -> {:#x}",
        before.rflags,
        after.rflags
    );
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let control = input.byte();
    let mode = [
        CpuMode::Real,
        CpuMode::Protected16,
        CpuMode::Protected32,
        CpuMode::Long64,
    ][usize::from(control & 3)];
    let mmio_ready = control & 4 != 0;
    let ram_base = input.u64();
    let mmio_base = input.u64();
    let mut segment_bases = [0u64; 6];
    for base in &mut segment_bases {
        *base = u64::from(input.byte()) << 4;
    }
    let mut gprs = [0u64; 16];
    for reg in &mut gprs {
        *reg = register_value(&mut input, ram_base, mmio_base);
    }
    let rip = input.u64();
    let rflags = (input.u64() & 0x003f_7fd5) | 2;
    let mut ram = [0u8; WINDOW];
    let mut mmio = [0u8; WINDOW];
    for (i, byte) in ram.iter_mut().enumerate() {
        *byte = i as u8 ^ 0x5a;
    }
    for (i, byte) in mmio.iter_mut().enumerate() {
        *byte = i as u8 ^ 0xa5;
    }
    let bytes = &input.0[..input.0.len().min(15)];

    let before = State {
        gprs,
        rflags,
        ram,
        mmio,
    };
    let mut ctx = Context {
        state: before.clone(),
        rip,
        ram_base,
        mmio_base,
        mmio_ready,
        segment_bases,
        wrote: false,
        writes: Vec::new(),
    };
    let result = emulate(&mut ctx, bytes, mode);

    let bitness = match mode {
        CpuMode::Real | CpuMode::Protected16 => 16,
        CpuMode::Protected32 => 32,
        CpuMode::Long64 => 64,
    };
    let instr = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE).decode();
    match result {
        Err(err) => {
            assert_eq!(
                ctx.state, before,
                "state changed by a failed emulation ({err:?})"
            );
        }
        Ok(outcome) => {
            assert!(!instr.is_invalid(), "emulated bytes iced-x86 cannot decode");
            if let Emulated::Done { len } = outcome {
                assert!((1..=15).contains(&len), "Done with length {len}");
                assert_eq!(len, instr.len(), "Done length differs from iced-x86's");
            } else {
                assert!(
                    instr.has_rep_prefix() || instr.has_repe_prefix() || instr.has_repne_prefix(),
                    "{instr} without a REP prefix asked to repeat"
                );
            }
            assert_only_its_registers_changed(&instr, &before, &ctx.state);
            let allowed = allowed_writes(&instr, &ctx, &before, mode);
            for &(linear, size) in &ctx.writes {
                assert!(
                    allowed.contains(&linear),
                    "{} wrote {size} bytes at {linear:#x}; operands name {allowed:x?}",
                    instr
                );
                assert_eq!(
                    size,
                    instr.memory_size().size(),
                    "{instr} wrote {size} bytes, its memory operand has {}",
                    instr.memory_size().size()
                );
            }
        }
    }
});
