//! The MMIO instruction emulator of the Hypervisor.framework back end.
//!
//! On an EPT violation for an MMIO page the hardware tells us only the guest-physical address;
//! the back end fetches the faulting instruction and hands its bytes to [`emulate`], which
//! decodes exactly one instruction (iced-x86) and carries it out against an
//! [`EmulatorContext`]: registers, RFLAGS and linear-address memory.
//!
//! Replay safety is the central rule: the vmx layer learns an MMIO read value only by leaving to
//! the VMM, so `read_memory` may fail (e.g. [`EmulateError::MmioPending`]) and the same
//! instruction is emulated again later with the value available. Therefore every memory read
//! happens before any write, and register, flag and memory writes are buffered and applied only
//! after all reads succeeded; a failed memory write also leaves registers and flags untouched.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// The processor mode the faulting instruction was fetched in; it fixes the default operand and
/// address sizes (compatibility mode is `Protected32`/`Protected16` by CS.D).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    Real,
    Protected16,
    Protected32,
    Long64,
}

impl CpuMode {
    fn bitness(self) -> u32 {
        match self {
            CpuMode::Real | CpuMode::Protected16 => 16,
            CpuMode::Protected32 => 32,
            CpuMode::Long64 => 64,
        }
    }
}

/// What the emulator needs from the vCPU and the guest's memory.
pub trait EmulatorContext {
    /// The full 64-bit value of a general-purpose register, always asked as RAX..R15.
    /// `Register::RIP` is asked too, only for a RIP-relative memory operand; it must be the
    /// address of the instruction being emulated.
    fn gpr(&self, reg: Register) -> u64;
    /// Sets a full 64-bit register (RAX..R15); size merging is already done.
    fn set_gpr(&mut self, reg: Register, value: u64);
    fn rflags(&self) -> u64;
    fn set_rflags(&mut self, value: u64);
    /// Linear-address memory access for the instruction's memory operand(s). The context maps
    /// it to the MMIO page or to RAM. An Err aborts the emulation with NO architectural effect
    /// (the vmx layer uses this to exit for an MMIO read, then replays the instruction with the
    /// value).
    fn read_memory(&mut self, linear: u64, data: &mut [u8]) -> Result<(), EmulateError>;
    fn write_memory(&mut self, linear: u64, data: &[u8]) -> Result<(), EmulateError>;
    /// The base of a segment register (ES, CS, SS, DS, FS, GS). In long mode only FS and GS are
    /// asked.
    fn segment_base(&self, seg: Register) -> u64;
}

/// The outcome of one successful emulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulated {
    /// The instruction completed: advance RIP by `len`.
    Done { len: usize },
    /// One REP iteration completed and the count register is still non-zero: leave RIP
    /// unchanged so the guest re-executes (and exits again for) the next element.
    Repeat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmulateError {
    #[error("cannot decode the instruction at an MMIO access ({len} bytes fetched)")]
    Decode { len: usize },
    #[error("cannot emulate instruction {mnemonic:?} at an MMIO access")]
    Unsupported { mnemonic: Mnemonic },
    /// The read value comes from the VMM: exit, then emulate the instruction again.
    #[error("MMIO read of {size} bytes at linear address {linear:#x} is pending")]
    MmioPending { linear: u64, size: usize },
    #[error("no memory at linear address {linear:#x} ({size} bytes)")]
    Memory { linear: u64, size: usize },
}

/// Decodes one instruction from `bytes` (which may hold more than one) and emulates it.
pub fn emulate(
    ctx: &mut impl EmulatorContext,
    bytes: &[u8],
    mode: CpuMode,
) -> Result<Emulated, EmulateError> {
    let instr = decode(bytes, mode)?;
    let address_size = address_size(bytes, instr.len(), mode);
    let mut exec = Execution {
        ctx,
        instr: &instr,
        mode,
        address_size,
        pending: Pending::default(),
    };
    let outcome = exec.run()?;
    exec.commit()?;
    Ok(outcome)
}

fn decode(bytes: &[u8], mode: CpuMode) -> Result<Instruction, EmulateError> {
    let fetched = bytes.len().min(15);
    // IP 0: a RIP-relative operand's displacement then comes out as "next IP offset + disp",
    // to which the real RIP is added.
    let mut decoder = Decoder::with_ip(mode.bitness(), &bytes[..fetched], 0, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Err(EmulateError::Decode { len: fetched });
    }
    Ok(instr)
}

/// The address size in bytes: the mode's default, toggled by a 0x67 prefix.
fn address_size(bytes: &[u8], len: usize, mode: CpuMode) -> usize {
    let has_67 = bytes
        .iter()
        .take(len)
        .take_while(|&&b| is_prefix(b, mode))
        .any(|&b| b == 0x67);
    match (mode.bitness(), has_67) {
        (16, false) | (32, true) => 2,
        (64, false) => 8,
        _ => 4,
    }
}

fn is_prefix(byte: u8, mode: CpuMode) -> bool {
    matches!(
        byte,
        0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
    ) || (mode == CpuMode::Long64 && (0x40..=0x4f).contains(&byte))
}

const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const DF: u64 = 1 << 10;
const OF: u64 = 1 << 11;
const STATUS_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

fn size_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

fn sign_bit(size: usize) -> u64 {
    1u64 << (size * 8 - 1)
}

fn sign_extend(value: u64, size: usize) -> u64 {
    let shift = 64 - size as u32 * 8;
    (((value << shift) as i64) >> shift) as u64
}

fn parity_even(value: u64) -> bool {
    (value as u8).count_ones() % 2 == 0
}

/// ZF, SF and PF of a result (already masked to `size`).
fn result_flags(result: u64, size: usize) -> u64 {
    let mut flags = 0;
    if result == 0 {
        flags |= ZF;
    }
    if result & sign_bit(size) != 0 {
        flags |= SF;
    }
    if parity_even(result) {
        flags |= PF;
    }
    flags
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AluOp {
    Add,
    Sub,
    Cmp,
    And,
    Or,
    Xor,
    Test,
}

/// Result (masked to `size`) and status flags of an ALU operation.
fn alu(op: AluOp, a: u64, b: u64, size: usize) -> (u64, u64) {
    let mask = size_mask(size);
    let (a, b) = (a & mask, b & mask);
    match op {
        AluOp::Add => {
            let result = a.wrapping_add(b) & mask;
            let mut flags = result_flags(result, size);
            if result < a {
                flags |= CF;
            }
            // Overflow: both inputs have the same sign and the result's sign differs.
            if (a ^ result) & (b ^ result) & sign_bit(size) != 0 {
                flags |= OF;
            }
            if (a ^ b ^ result) & 0x10 != 0 {
                flags |= AF;
            }
            (result, flags)
        }
        AluOp::Sub | AluOp::Cmp => {
            let result = a.wrapping_sub(b) & mask;
            let mut flags = result_flags(result, size);
            if a < b {
                flags |= CF;
            }
            // Overflow: the inputs' signs differ and the result's sign differs from a's.
            if (a ^ b) & (a ^ result) & sign_bit(size) != 0 {
                flags |= OF;
            }
            if (a ^ b ^ result) & 0x10 != 0 {
                flags |= AF;
            }
            (result, flags)
        }
        AluOp::And | AluOp::Test => {
            let result = a & b;
            (result, result_flags(result, size))
        }
        AluOp::Or => {
            let result = a | b;
            (result, result_flags(result, size))
        }
        AluOp::Xor => {
            let result = a ^ b;
            (result, result_flags(result, size))
        }
    }
}

/// An operand resolved to where its value lives.
#[derive(Clone, Copy)]
enum Operand {
    Reg(Register),
    /// A linear address.
    Mem(u64),
    Imm(u64),
}

/// Writes buffered until every read succeeded. No instruction we emulate writes more than one
/// memory location or more than three registers (MOVS: RSI, RDI, RCX).
#[derive(Default)]
struct Pending {
    regs: [(Register, u64); 4],
    reg_count: usize,
    rflags: Option<u64>,
    memory: Option<(u64, [u8; 8], usize)>,
}

struct Execution<'a, C: EmulatorContext> {
    ctx: &'a mut C,
    instr: &'a Instruction,
    mode: CpuMode,
    /// In bytes: 2, 4 or 8.
    address_size: usize,
    pending: Pending,
}

impl<C: EmulatorContext> Execution<'_, C> {
    fn unsupported(&self) -> EmulateError {
        EmulateError::Unsupported {
            mnemonic: self.instr.mnemonic(),
        }
    }

    fn done(&self) -> Emulated {
        Emulated::Done {
            len: self.instr.len(),
        }
    }

    fn run(&mut self) -> Result<Emulated, EmulateError> {
        let alu_op = match self.instr.mnemonic() {
            Mnemonic::Mov => return self.mov(),
            Mnemonic::Movzx => return self.extend(false),
            Mnemonic::Movsx | Mnemonic::Movsxd => return self.extend(true),
            Mnemonic::Xchg => return self.xchg(),
            Mnemonic::Bt => return self.bt(),
            Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
                return self.string(false)
            }
            Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => {
                return self.string(true)
            }
            Mnemonic::Add => AluOp::Add,
            Mnemonic::Sub => AluOp::Sub,
            Mnemonic::Cmp => AluOp::Cmp,
            Mnemonic::And => AluOp::And,
            Mnemonic::Or => AluOp::Or,
            Mnemonic::Xor => AluOp::Xor,
            Mnemonic::Test => AluOp::Test,
            _ => return Err(self.unsupported()),
        };
        self.alu(alu_op)
    }

    /// Applies the buffered writes: memory first, so a failed write leaves registers alone.
    fn commit(&mut self) -> Result<(), EmulateError> {
        if let Some((linear, data, size)) = self.pending.memory {
            self.ctx.write_memory(linear, &data[..size])?;
        }
        for &(reg, value) in &self.pending.regs[..self.pending.reg_count] {
            self.ctx.set_gpr(reg, value);
        }
        if let Some(rflags) = self.pending.rflags {
            self.ctx.set_rflags(rflags);
        }
        Ok(())
    }

    fn mov(&mut self) -> Result<Emulated, EmulateError> {
        let dst = self.operand(0)?;
        let src = self.operand(1)?;
        let size = self.operand_size(0)?;
        let value = self.read(src, size)?;
        self.write(dst, size, value)?;
        Ok(self.done())
    }

    fn extend(&mut self, signed: bool) -> Result<Emulated, EmulateError> {
        let dst = self.operand(0)?;
        let src = self.operand(1)?;
        let dst_size = self.operand_size(0)?;
        let src_size = self.operand_size(1)?;
        let mut value = self.read(src, src_size)?;
        if signed {
            value = sign_extend(value, src_size);
        }
        self.write(dst, dst_size, value)?;
        Ok(self.done())
    }

    fn xchg(&mut self) -> Result<Emulated, EmulateError> {
        let first = self.operand(0)?;
        let second = self.operand(1)?;
        let size = self.operand_size(0)?;
        let a = self.read(first, size)?;
        let b = self.read(second, size)?;
        self.write(first, size, b)?;
        self.write(second, size, a)?;
        Ok(self.done())
    }

    fn alu(&mut self, op: AluOp) -> Result<Emulated, EmulateError> {
        let dst = self.operand(0)?;
        let src = self.operand(1)?;
        let size = self.operand_size(0)?;
        let a = self.read(dst, size)?;
        let b = self.read(src, size)?;
        let (result, flags) = alu(op, a, b, size);
        if !matches!(op, AluOp::Cmp | AluOp::Test) {
            self.write(dst, size, result)?;
        }
        self.set_status_flags(STATUS_FLAGS, flags);
        Ok(self.done())
    }

    fn bt(&mut self) -> Result<Emulated, EmulateError> {
        let size = self.operand_size(0)?;
        let bits = size as u64 * 8;
        let offset = self.operand(1)?;
        let (base, bit) = match (self.instr.op0_kind(), offset) {
            // A register bit offset into memory is a signed bit index that may reach far past
            // the operand: it selects the operand-sized unit floor(offset / bits) away.
            (OpKind::Memory, Operand::Reg(reg)) => {
                let index = sign_extend(self.read_gpr(reg), size) as i64;
                let unit = index >> bits.trailing_zeros();
                let displacement = unit.wrapping_mul(size as i64) as u64;
                (
                    Operand::Mem(self.memory_linear(displacement)?),
                    index as u64 & (bits - 1),
                )
            }
            (_, offset) => {
                let dst = self.operand(0)?;
                (dst, self.read(offset, size)? & (bits - 1))
            }
        };
        let value = self.read(base, size)?;
        let carry = if value >> bit & 1 != 0 { CF } else { 0 };
        self.set_status_flags(CF, carry);
        Ok(self.done())
    }

    /// STOS and MOVS, one element per call.
    fn string(&mut self, is_movs: bool) -> Result<Emulated, EmulateError> {
        if !matches!(
            self.instr.op0_kind(),
            OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI
        ) {
            // The SSE MOVSD shares the mnemonic.
            return Err(self.unsupported());
        }
        let size = self.instr.memory_size().size();
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(self.unsupported());
        }
        let (counter, source_index, destination_index) = match self.address_size {
            2 => (Register::CX, Register::SI, Register::DI),
            4 => (Register::ECX, Register::ESI, Register::EDI),
            _ => (Register::RCX, Register::RSI, Register::RDI),
        };
        let repeated = self.instr.has_rep_prefix() || self.instr.has_repne_prefix();
        let count = self.read_gpr(counter);
        if repeated && count == 0 {
            return Ok(self.done());
        }
        let step = if self.ctx.rflags() & DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };

        let value = if is_movs {
            let si = self.read_gpr(source_index);
            let source = self.linear(self.instr.memory_segment(), si);
            let value = self.read(Operand::Mem(source), size)?;
            self.write_gpr(source_index, si.wrapping_add(step));
            value
        } else {
            let accumulator = match size {
                1 => Register::AL,
                2 => Register::AX,
                4 => Register::EAX,
                _ => Register::RAX,
            };
            self.read_gpr(accumulator)
        };
        let di = self.read_gpr(destination_index);
        let destination = self.linear(Register::ES, di);
        self.write(Operand::Mem(destination), size, value)?;
        self.write_gpr(destination_index, di.wrapping_add(step));

        if repeated {
            let left = count.wrapping_sub(1) & size_mask(self.address_size);
            self.write_gpr(counter, left);
            if left != 0 {
                return Ok(Emulated::Repeat);
            }
        }
        Ok(self.done())
    }

    fn set_status_flags(&mut self, which: u64, values: u64) {
        let rflags = self.pending.rflags.unwrap_or_else(|| self.ctx.rflags());
        self.pending.rflags = Some(rflags & !which | values & which);
    }

    fn operand(&self, index: u32) -> Result<Operand, EmulateError> {
        match self.instr.op_kind(index) {
            OpKind::Register => {
                let reg = self.instr.op_register(index);
                if reg.is_gpr() {
                    Ok(Operand::Reg(reg))
                } else {
                    Err(self.unsupported())
                }
            }
            OpKind::Memory => Ok(Operand::Mem(self.memory_linear(0)?)),
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => self
                .instr
                .try_immediate(index)
                .map(Operand::Imm)
                .map_err(|_| self.unsupported()),
            _ => Err(self.unsupported()),
        }
    }

    /// The size in bytes of a register or memory operand.
    fn operand_size(&self, index: u32) -> Result<usize, EmulateError> {
        let size = match self.instr.op_kind(index) {
            OpKind::Register => self.instr.op_register(index).size(),
            OpKind::Memory => self.instr.memory_size().size(),
            _ => 0,
        };
        if matches!(size, 1 | 2 | 4 | 8) {
            Ok(size)
        } else {
            Err(self.unsupported())
        }
    }

    /// The linear address of the instruction's ModRM/moffs memory operand, `extra` bytes on
    /// (BT's register bit offset). The offset wraps at the address size.
    fn memory_linear(&self, extra: u64) -> Result<u64, EmulateError> {
        let instr = self.instr;
        let offset = if instr.is_ip_rel_memory_operand() {
            self.ctx
                .gpr(Register::RIP)
                .wrapping_add(instr.memory_displacement64())
        } else {
            let mut offset = instr.memory_displacement64();
            let base = instr.memory_base();
            if base != Register::None {
                offset = offset.wrapping_add(self.read_gpr(base));
            }
            let index = instr.memory_index();
            if index != Register::None {
                if !index.is_gpr() {
                    return Err(self.unsupported());
                }
                let scaled = self
                    .read_gpr(index)
                    .wrapping_mul(u64::from(instr.memory_index_scale()));
                offset = offset.wrapping_add(scaled);
            }
            offset
        };
        Ok(self.linear(instr.memory_segment(), offset.wrapping_add(extra)))
    }

    /// Segment base + offset (wrapped at the address size); outside long mode linear addresses
    /// are 32 bits, and in long mode only FS and GS have a base.
    fn linear(&self, segment: Register, offset: u64) -> u64 {
        let offset = offset & size_mask(self.address_size);
        if self.mode == CpuMode::Long64 {
            if matches!(segment, Register::FS | Register::GS) {
                self.ctx.segment_base(segment).wrapping_add(offset)
            } else {
                offset
            }
        } else {
            self.ctx.segment_base(segment).wrapping_add(offset) & 0xffff_ffff
        }
    }

    fn read(&mut self, operand: Operand, size: usize) -> Result<u64, EmulateError> {
        match operand {
            Operand::Reg(reg) => Ok(self.read_gpr(reg)),
            Operand::Imm(value) => Ok(value & size_mask(size)),
            Operand::Mem(linear) => {
                let mut data = [0u8; 8];
                self.ctx.read_memory(linear, &mut data[..size])?;
                Ok(u64::from_le_bytes(data))
            }
        }
    }

    fn write(&mut self, operand: Operand, size: usize, value: u64) -> Result<(), EmulateError> {
        match operand {
            Operand::Reg(reg) => {
                self.write_gpr(reg, value);
                Ok(())
            }
            Operand::Mem(linear) => {
                if self.pending.memory.is_some() {
                    return Err(self.unsupported());
                }
                self.pending.memory = Some((linear, value.to_le_bytes(), size));
                Ok(())
            }
            Operand::Imm(_) => Err(self.unsupported()),
        }
    }

    /// The full value a 64-bit register will have, counting buffered writes.
    fn full_value(&self, full: Register) -> u64 {
        self.pending.regs[..self.pending.reg_count]
            .iter()
            .find(|(reg, _)| *reg == full)
            .map_or_else(|| self.ctx.gpr(full), |&(_, value)| value)
    }

    fn read_gpr(&self, reg: Register) -> u64 {
        let full = self.full_value(reg.full_register());
        if is_high_byte(reg) {
            full >> 8 & 0xff
        } else {
            full & size_mask(reg.size())
        }
    }

    /// Buffers a register write: 32-bit writes zero-extend, 8/16-bit writes merge.
    fn write_gpr(&mut self, reg: Register, value: u64) {
        let full = reg.full_register();
        let old = self.full_value(full);
        let new = if is_high_byte(reg) {
            old & !0xff00 | (value & 0xff) << 8
        } else {
            match reg.size() {
                8 => value,
                4 => value & 0xffff_ffff,
                size => old & !size_mask(size) | value & size_mask(size),
            }
        };
        let pending = &mut self.pending;
        if let Some(slot) = pending.regs[..pending.reg_count]
            .iter_mut()
            .find(|(r, _)| *r == full)
        {
            slot.1 = new;
        } else if pending.reg_count < pending.regs.len() {
            pending.regs[pending.reg_count] = (full, new);
            pending.reg_count += 1;
        }
    }
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}
