//! The MMIO instruction emulator (used by the Hypervisor.framework back end).
//!
//! On an EPT violation for an MMIO page the hardware tells us only the guest-physical address;
//! the back end fetches the faulting instruction and hands its bytes to [`emulate`], which
//! decodes exactly one instruction (iced-x86) and carries it out against an
//! [`EmulatorContext`]: registers, RFLAGS and linear-address memory.
//!
//! Emulated: MOV (r/m<-r, r<-r/m, r/m<-imm, moffs), MOVZX, MOVSX, MOVSXD, ADD, ADC, SUB, SBB,
//! CMP, AND, OR, XOR, TEST (register and immediate, both directions), INC, DEC, NEG, NOT,
//! BT/BTS/BTR/BTC, XCHG, STOS and MOVS (one element per call, REP by the address-size counter),
//! and CLFLUSH(OPT) as a no-op; 8/16/32/64-bit operands, every addressing form of the three
//! modes. Anything else is [`EmulateError::Unsupported`]. Segment limits, canonical checks and
//! paging are the context's business (it maps linear addresses).
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
    #[error("cannot decode the instruction at an MMIO access (bytes: {bytes})")]
    Decode { bytes: InstructionBytes },
    #[error("cannot emulate instruction {mnemonic:?} at an MMIO access")]
    Unsupported { mnemonic: Mnemonic },
    /// The read value comes from the VMM: exit, then emulate the instruction again.
    #[error("MMIO read of {size} bytes at linear address {linear:#x} is pending")]
    MmioPending { linear: u64, size: usize },
    #[error("no memory at linear address {linear:#x} ({size} bytes)")]
    Memory { linear: u64, size: usize },
}

/// Up to 15 fetched instruction bytes, kept inline (no allocation on the exit path) so an error
/// can show them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InstructionBytes {
    bytes: [u8; 15],
    len: u8,
}

impl InstructionBytes {
    pub fn new(bytes: &[u8]) -> Self {
        let len = bytes.len().min(15);
        let mut inline = [0u8; 15];
        inline[..len].copy_from_slice(&bytes[..len]);
        InstructionBytes {
            bytes: inline,
            len: len as u8,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Display for InstructionBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.len == 0 {
            return f.write_str("none");
        }
        for (i, byte) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for InstructionBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{self}]")
    }
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
        return Err(EmulateError::Decode {
            bytes: InstructionBytes::new(&bytes[..fetched]),
        });
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
    Adc,
    Sub,
    Sbb,
    Cmp,
    And,
    Or,
    Xor,
    Test,
}

/// Result (masked to `size`) and status flags of an ALU operation; `carry` is CF before it
/// (used by ADC and SBB).
fn alu(op: AluOp, a: u64, b: u64, carry: bool, size: usize) -> (u64, u64) {
    let mask = size_mask(size);
    let (a, b) = (a & mask, b & mask);
    match op {
        AluOp::Add | AluOp::Adc => {
            let carry_in = u128::from(op == AluOp::Adc && carry);
            let wide = u128::from(a) + u128::from(b) + carry_in;
            let result = wide as u64 & mask;
            let mut flags = result_flags(result, size);
            if wide > u128::from(mask) {
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
        AluOp::Sub | AluOp::Sbb | AluOp::Cmp => {
            let borrow_in = u128::from(op == AluOp::Sbb && carry);
            let subtrahend = u128::from(b) + borrow_in;
            let result = u128::from(a).wrapping_sub(subtrahend) as u64 & mask;
            let mut flags = result_flags(result, size);
            if u128::from(a) < subtrahend {
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum BitUpdate {
    None,
    Set,
    Reset,
    Complement,
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
            Mnemonic::Inc | Mnemonic::Dec | Mnemonic::Neg | Mnemonic::Not => {
                return self.unary(self.instr.mnemonic())
            }
            Mnemonic::Bt => return self.bit_test(BitUpdate::None),
            Mnemonic::Bts => return self.bit_test(BitUpdate::Set),
            Mnemonic::Btr => return self.bit_test(BitUpdate::Reset),
            Mnemonic::Btc => return self.bit_test(BitUpdate::Complement),
            Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
                return self.string(false)
            }
            Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => {
                return self.string(true)
            }
            // Flushing a cache line of device memory has nothing to emulate (xhyve agrees).
            Mnemonic::Clflush | Mnemonic::Clflushopt => return Ok(self.done()),
            Mnemonic::Add => AluOp::Add,
            Mnemonic::Adc => AluOp::Adc,
            Mnemonic::Sbb => AluOp::Sbb,
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

    /// INC and DEC leave CF alone; NEG sets flags as 0 - x; NOT sets none.
    fn unary(&mut self, mnemonic: Mnemonic) -> Result<Emulated, EmulateError> {
        let target = self.operand(0)?;
        let size = self.operand_size(0)?;
        let value = self.read(target, size)?;
        let (result, changed, flags) = match mnemonic {
            Mnemonic::Inc => {
                let (result, flags) = alu(AluOp::Add, value, 1, false, size);
                (result, STATUS_FLAGS & !CF, flags)
            }
            Mnemonic::Dec => {
                let (result, flags) = alu(AluOp::Sub, value, 1, false, size);
                (result, STATUS_FLAGS & !CF, flags)
            }
            Mnemonic::Neg => {
                let (result, flags) = alu(AluOp::Sub, 0, value, false, size);
                (result, STATUS_FLAGS, flags)
            }
            _ => (!value & size_mask(size), 0, 0),
        };
        self.write(target, size, result)?;
        if changed != 0 {
            self.set_status_flags(changed, flags);
        }
        Ok(self.done())
    }

    fn alu(&mut self, op: AluOp) -> Result<Emulated, EmulateError> {
        let dst = self.operand(0)?;
        let src = self.operand(1)?;
        let size = self.operand_size(0)?;
        let a = self.read(dst, size)?;
        let b = self.read(src, size)?;
        let carry = self.ctx.rflags() & CF != 0;
        let (result, flags) = alu(op, a, b, carry, size);
        if !matches!(op, AluOp::Cmp | AluOp::Test) {
            self.write(dst, size, result)?;
        }
        self.set_status_flags(STATUS_FLAGS, flags);
        Ok(self.done())
    }

    /// BT, BTS, BTR, BTC: CF = the selected bit, which the last three then change.
    fn bit_test(&mut self, update: BitUpdate) -> Result<Emulated, EmulateError> {
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
        let updated = match update {
            BitUpdate::None => None,
            BitUpdate::Set => Some(value | 1 << bit),
            BitUpdate::Reset => Some(value & !(1 << bit)),
            BitUpdate::Complement => Some(value ^ 1 << bit),
        };
        if let Some(updated) = updated {
            self.write(base, size, updated)?;
        }
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
            let left = count.wrapping_sub(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Encoder, MemoryOperand, RepPrefixKind};
    use std::collections::HashMap;

    const SEGMENTS: [Register; 6] = [
        Register::ES,
        Register::CS,
        Register::SS,
        Register::DS,
        Register::FS,
        Register::GS,
    ];

    /// A vCPU and a flat memory; every access is logged.
    #[derive(Clone, Debug, Default)]
    struct Model {
        regs: [u64; 16],
        rip: u64,
        rflags: u64,
        memory: HashMap<u64, u8>,
        segment_bases: [u64; 6],
        fail_reads: bool,
        fail_writes: bool,
        reads: Vec<(u64, usize)>,
        writes: Vec<(u64, usize)>,
    }

    impl Model {
        fn new() -> Self {
            Model {
                rflags: 0x2,
                ..Model::default()
            }
        }

        fn index(reg: Register) -> usize {
            let index = (reg as usize).wrapping_sub(Register::RAX as usize);
            assert!(
                index < 16,
                "the emulator asked for {reg:?}, not a 64-bit GPR"
            );
            index
        }

        fn reg(&self, reg: Register) -> u64 {
            self.regs[Model::index(reg)]
        }

        fn set(&mut self, reg: Register, value: u64) {
            self.regs[Model::index(reg)] = value;
        }

        fn segment(&mut self, seg: Register, base: u64) {
            let index = SEGMENTS.iter().position(|&s| s == seg).unwrap();
            self.segment_bases[index] = base;
        }

        fn poke(&mut self, address: u64, bytes: &[u8]) {
            for (i, &b) in bytes.iter().enumerate() {
                self.memory.insert(address.wrapping_add(i as u64), b);
            }
        }

        fn peek(&self, address: u64, size: usize) -> u64 {
            let mut value = 0u64;
            for i in (0..size).rev() {
                let byte = self.memory.get(&address.wrapping_add(i as u64)).copied();
                value = value << 8 | u64::from(byte.unwrap_or(0));
            }
            value
        }

        /// The architectural state, without the access logs.
        fn state(&self) -> (Vec<u64>, u64, u64, Vec<(u64, u8)>) {
            let mut memory: Vec<(u64, u8)> = self.memory.iter().map(|(&a, &b)| (a, b)).collect();
            memory.sort_unstable();
            (self.regs.to_vec(), self.rip, self.rflags, memory)
        }
    }

    impl EmulatorContext for Model {
        fn gpr(&self, reg: Register) -> u64 {
            if reg == Register::RIP {
                self.rip
            } else {
                self.reg(reg)
            }
        }
        fn set_gpr(&mut self, reg: Register, value: u64) {
            self.set(reg, value);
        }
        fn rflags(&self) -> u64 {
            self.rflags
        }
        fn set_rflags(&mut self, value: u64) {
            self.rflags = value;
        }
        fn read_memory(&mut self, linear: u64, data: &mut [u8]) -> Result<(), EmulateError> {
            self.reads.push((linear, data.len()));
            if self.fail_reads {
                return Err(EmulateError::MmioPending {
                    linear,
                    size: data.len(),
                });
            }
            let value = self.peek(linear, data.len());
            data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
            Ok(())
        }
        fn write_memory(&mut self, linear: u64, data: &[u8]) -> Result<(), EmulateError> {
            self.writes.push((linear, data.len()));
            if self.fail_writes {
                return Err(EmulateError::Memory {
                    linear,
                    size: data.len(),
                });
            }
            self.poke(linear, data);
            Ok(())
        }
        fn segment_base(&self, seg: Register) -> u64 {
            let index = SEGMENTS.iter().position(|&s| s == seg);
            self.segment_bases[index.expect("asked for a segment base of a non-segment")]
        }
    }

    fn encode(bitness: u32, ip: u64, instr: &Instruction) -> Option<Vec<u8>> {
        let mut encoder = Encoder::new(bitness);
        encoder.encode(instr, ip).ok()?;
        Some(encoder.take_buffer())
    }

    fn asm(bitness: u32, instr: Result<Instruction, iced_x86::IcedError>) -> Vec<u8> {
        encode(bitness, 0, &instr.unwrap()).unwrap()
    }

    fn mem(base: Register, displacement: i64) -> MemoryOperand {
        MemoryOperand::with_base_displ(base, displacement)
    }

    fn done(bytes: &[u8]) -> Result<Emulated, EmulateError> {
        Ok(Emulated::Done { len: bytes.len() })
    }

    // ---- hand-picked cases ----

    #[test]
    fn mov_to_memory_writes_without_reading() {
        let mut m = Model::new();
        m.set(Register::RBX, 0x1000);
        m.set(Register::RAX, 0x1122_3344_5566_7788);
        let bytes = asm(
            64,
            Instruction::with2(Code::Mov_rm32_r32, mem(Register::RBX, 8), Register::EAX),
        );
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.peek(0x1008, 8), 0x5566_7788);
        assert!(m.reads.is_empty());
        assert_eq!(m.writes, vec![(0x1008, 4)]);
    }

    #[test]
    fn register_writes_zero_extend_32_and_merge_8_16() {
        let mut m = Model::new();
        m.set(Register::RBX, 0x2000);
        m.poke(0x2000, &[0xaa, 0xbb, 0xcc, 0xdd]);
        for (code, reg, expected) in [
            (Code::Mov_r32_rm32, Register::EAX, 0xddcc_bbaa),
            (Code::Mov_r16_rm16, Register::AX, 0xffff_ffff_ffff_bbaa),
            (Code::Mov_r8_rm8, Register::AL, 0xffff_ffff_ffff_ffaa),
            (Code::Mov_r8_rm8, Register::AH, 0xffff_ffff_ffff_aaff),
        ] {
            m.set(Register::RAX, u64::MAX);
            let bytes = asm(64, Instruction::with2(code, reg, mem(Register::RBX, 0)));
            assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
            assert_eq!(m.reg(Register::RAX), expected, "{code:?} {reg:?}");
        }
    }

    #[test]
    fn mov_immediate_to_memory_sign_extends_imm32_to_64() {
        let mut m = Model::new();
        m.set(Register::RBX, 0x3000);
        let bytes = asm(
            64,
            Instruction::with2(Code::Mov_rm64_imm32, mem(Register::RBX, 0), -2i32),
        );
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.peek(0x3000, 8), 0xffff_ffff_ffff_fffe);
    }

    #[test]
    fn moffs_forms_use_64_and_32_bit_addresses() {
        let mut m = Model::new();
        m.poke(0xfee0_0020, &[0x78, 0x56, 0x34, 0x12]);
        // mov eax, [moffs64]
        let bytes = [0xa1, 0x20, 0x00, 0xe0, 0xfe, 0, 0, 0, 0];
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.reg(Register::RAX), 0x1234_5678);
        // addr32 mov [moffs32], al
        let bytes = [0x67, 0xa2, 0x24, 0x00, 0xe0, 0xfe];
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.peek(0xfee0_0024, 1), 0x78);
    }

    #[test]
    fn movzx_and_movsx() {
        let mut m = Model::new();
        m.set(Register::RSI, 0x4000);
        m.poke(0x4000, &[0x80, 0xff]);
        for (code, reg, expected) in [
            (Code::Movzx_r32_rm8, Register::ECX, 0x80),
            (Code::Movsx_r32_rm8, Register::ECX, 0xffff_ff80),
            (Code::Movsx_r64_rm8, Register::RCX, 0xffff_ffff_ffff_ff80),
            (Code::Movzx_r64_rm16, Register::RCX, 0xff80),
            (Code::Movsx_r16_rm8, Register::CX, 0x1234_5678_9abc_ff80),
        ] {
            m.set(Register::RCX, 0x1234_5678_9abc_def0);
            let bytes = asm(64, Instruction::with2(code, reg, mem(Register::RSI, 0)));
            assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
            assert_eq!(m.reg(Register::RCX), expected, "{code:?}");
        }
    }

    fn flags_after(code: Code, a: u64, b: u64, size_reg: Register) -> (u64, u64) {
        let mut m = Model::new();
        m.rflags = 0x2 | STATUS_FLAGS;
        m.set(Register::RBX, 0x5000);
        m.poke(0x5000, &a.to_le_bytes());
        m.set(size_reg.full_register(), b);
        let bytes = asm(
            64,
            Instruction::with2(code, mem(Register::RBX, 0), size_reg),
        );
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        (m.peek(0x5000, size_reg.size()), m.rflags & STATUS_FLAGS)
    }

    #[test]
    fn add_flags_edge_cases() {
        // signed overflow, no carry
        assert_eq!(
            flags_after(Code::Add_rm8_r8, 0x7f, 1, Register::CL),
            (0x80, OF | SF | AF)
        );
        // carry out and zero; 0x00 has even parity
        assert_eq!(
            flags_after(Code::Add_rm8_r8, 0xff, 1, Register::CL),
            (0, CF | ZF | AF | PF)
        );
        // both: -128 + -128
        assert_eq!(
            flags_after(Code::Add_rm8_r8, 0x80, 0x80, Register::CL),
            (0, CF | OF | ZF | PF)
        );
        assert_eq!(
            flags_after(Code::Add_rm64_r64, u64::MAX, 2, Register::RCX),
            (1, CF | AF)
        );
        assert_eq!(
            flags_after(Code::Add_rm32_r32, 0x7fff_ffff, 0, Register::ECX),
            (0x7fff_ffff, PF)
        );
    }

    #[test]
    fn sub_and_cmp_flags_edge_cases() {
        // borrow: 0 - 1 = 0xff (8 ones: even parity)
        assert_eq!(
            flags_after(Code::Sub_rm8_r8, 0, 1, Register::CL),
            (0xff, CF | SF | AF | PF)
        );
        // signed overflow: -128 - 1
        assert_eq!(
            flags_after(Code::Sub_rm8_r8, 0x80, 1, Register::CL),
            (0x7f, OF | AF)
        );
        // 16-bit equal
        assert_eq!(
            flags_after(Code::Sub_rm16_r16, 0x1234, 0x1234, Register::CX),
            (0, ZF | PF)
        );
        // cmp leaves memory alone
        assert_eq!(
            // 0xfffffffe: seven ones in the low byte, odd parity
            flags_after(Code::Cmp_rm32_r32, 5, 7, Register::ECX),
            (5, CF | SF | AF)
        );
    }

    #[test]
    fn adc_and_sbb_use_the_incoming_carry() {
        // flags_after starts with every status flag set, so CF = 1
        assert_eq!(
            flags_after(Code::Adc_rm8_r8, 0xff, 0, Register::CL),
            (0, CF | ZF | AF | PF)
        );
        assert_eq!(
            flags_after(Code::Sbb_rm8_r8, 0, 0, Register::CL),
            (0xff, CF | SF | AF | PF)
        );
        assert_eq!(
            flags_after(Code::Adc_rm32_r32, 0x7fff_fffe, 1, Register::ECX),
            (0x8000_0000, OF | SF | AF | PF)
        );
    }

    #[test]
    fn bts_btr_btc_update_memory_with_one_read_and_one_write() {
        for (code, expected) in [
            (Code::Bts_rm32_imm8, 0x0000_0005),
            (Code::Btr_rm32_imm8, 0x0000_0001),
            (Code::Btc_rm32_imm8, 0x0000_0005),
        ] {
            let mut m = Model::new();
            m.set(Register::RBX, 0xb000);
            m.poke(0xb000, &[0x01, 0, 0, 0]);
            let bytes = asm(64, Instruction::with2(code, mem(Register::RBX, 0), 2));
            assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
            assert_eq!(m.peek(0xb000, 4), expected, "{code:?}");
            assert_eq!(m.rflags & CF, 0, "{code:?}");
            assert_eq!((m.reads.len(), m.writes.len()), (1, 1), "{code:?}");
        }
    }

    #[test]
    fn inc_dec_keep_carry_and_neg_not_follow_the_sdm() {
        let run = |code: Code, value: u64, rflags: u64| {
            let mut m = Model::new();
            m.rflags = rflags;
            m.set(Register::RBX, 0xc000);
            m.poke(0xc000, &value.to_le_bytes()[..1]);
            let bytes = asm(64, Instruction::with1(code, mem(Register::RBX, 0)));
            assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
            (m.peek(0xc000, 1), m.rflags & STATUS_FLAGS)
        };
        assert_eq!(run(Code::Inc_rm8, 0xff, 0x2 | CF), (0, CF | ZF | AF | PF));
        assert_eq!(run(Code::Dec_rm8, 0x80, 0x2), (0x7f, OF | AF));
        assert_eq!(run(Code::Neg_rm8, 0, 0x2 | CF), (0, ZF | PF));
        assert_eq!(run(Code::Neg_rm8, 0x80, 0x2), (0x80, CF | OF | SF));
        assert_eq!(run(Code::Not_rm8, 0x0f, 0x2 | OF), (0xf0, OF));
    }

    #[test]
    fn logic_flags_clear_carry_and_overflow() {
        assert_eq!(
            flags_after(Code::And_rm8_r8, 0xf0, 0x30, Register::CL),
            (0x30, PF)
        );
        assert_eq!(
            flags_after(Code::Or_rm16_r16, 0x8000, 1, Register::CX),
            (0x8001, SF)
        );
        assert_eq!(
            flags_after(Code::Xor_rm64_r64, 7, 7, Register::RCX),
            (0, ZF | PF)
        );
        assert_eq!(
            flags_after(Code::Test_rm32_r32, 3, 1, Register::ECX),
            (3, 0)
        );
    }

    #[test]
    fn bt_register_offset_reaches_outside_the_operand() {
        let mut m = Model::new();
        m.set(Register::RBX, 0x6000);
        m.poke(0x5ffc, &[0, 0, 0, 0x80]);
        m.poke(0x6008, &[0x04]);
        // bit -1 of [rbx] = bit 31 of the dword at rbx - 4
        m.set(Register::RAX, u64::MAX);
        let bytes = asm(
            64,
            Instruction::with2(Code::Bt_rm32_r32, mem(Register::RBX, 0), Register::EAX),
        );
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.reads, vec![(0x5ffc, 4)]);
        assert_eq!(m.rflags & CF, CF);
        // bit 66 of [rbx] = bit 2 of the dword at rbx + 8; ZF is untouched
        m.set(Register::RAX, 66);
        m.rflags = 0x2 | ZF;
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.rflags, 0x2 | ZF | CF);
        // an immediate offset wraps inside the operand: bit 34 of a dword = bit 2
        let bytes = asm(
            64,
            Instruction::with2(Code::Bt_rm32_imm8, mem(Register::RBX, 8), 34),
        );
        m.rflags = 0x2;
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.rflags, 0x2 | CF);
    }

    #[test]
    fn rep_stos_counts_down_and_zero_count_does_nothing() {
        let mut m = Model::new();
        m.set(Register::RDI, 0x7000);
        m.set(Register::RAX, 0xabcd);
        m.set(Register::RCX, 0);
        let bytes = asm(64, Instruction::with_rep_stosw(64));
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert!(m.writes.is_empty());
        assert_eq!(m.reg(Register::RDI), 0x7000);

        m.set(Register::RCX, 2);
        assert_eq!(
            emulate(&mut m, &bytes, CpuMode::Long64),
            Ok(Emulated::Repeat)
        );
        assert_eq!((m.reg(Register::RCX), m.reg(Register::RDI)), (1, 0x7002));
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!((m.reg(Register::RCX), m.reg(Register::RDI)), (0, 0x7004));
        assert_eq!(m.peek(0x7000, 4), 0xabcd_abcd);
    }

    #[test]
    fn movs_honours_df_segment_override_and_32_bit_addressing() {
        let mut m = Model::new();
        m.rflags = 0x2 | DF;
        m.segment(Register::FS, 0x10_0000);
        m.segment(Register::ES, 0x5555); // ignored in long mode
        m.set(Register::RSI, 0xffff_ffff_0000_0100);
        m.set(Register::RDI, 0x200);
        m.poke(0x10_0100, &[1, 2, 3, 4]);
        let instr = Instruction::with_movsd(32, Register::FS, RepPrefixKind::None);
        let bytes = asm(64, instr);
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.peek(0x200, 4), 0x0403_0201);
        // 32-bit address size: ESI/EDI updates zero-extend
        assert_eq!(m.reg(Register::RSI), 0xfc);
        assert_eq!(m.reg(Register::RDI), 0x1fc);
        assert_eq!(m.reads, vec![(0x10_0100, 4)]);
    }

    #[test]
    fn xchg_reads_then_writes_memory_and_register() {
        let mut m = Model::new();
        m.set(Register::RBX, 0x8000);
        m.poke(0x8000, &[0x11, 0x22]);
        m.set(Register::R9, 0xffff_ffff_ffff_3344);
        let bytes = asm(
            64,
            Instruction::with2(Code::Xchg_rm16_r16, mem(Register::RBX, 0), Register::R9W),
        );
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.peek(0x8000, 2), 0x3344);
        assert_eq!(m.reg(Register::R9), 0xffff_ffff_ffff_2211);
        assert_eq!((m.reads.len(), m.writes.len()), (1, 1));
    }

    #[test]
    fn failed_read_leaves_the_context_untouched() {
        let codes = [
            Instruction::with2(Code::Add_rm32_r32, mem(Register::RBX, 0), Register::EAX),
            Instruction::with2(Code::Xchg_rm64_r64, mem(Register::RBX, 0), Register::RAX),
            Instruction::with2(Code::Mov_r8_rm8, Register::AH, mem(Register::RBX, 0)),
            Instruction::with_rep_movsq(64),
        ];
        for instr in codes {
            let mut m = Model::new();
            m.set(Register::RBX, 0x9000);
            m.set(Register::RCX, 3);
            m.set(Register::RAX, 0x1234);
            m.poke(0x9000, &[5; 8]);
            m.fail_reads = true;
            let before = m.state();
            let bytes = asm(64, instr);
            let result = emulate(&mut m, &bytes, CpuMode::Long64);
            assert!(
                matches!(result, Err(EmulateError::MmioPending { .. })),
                "{result:?}"
            );
            assert_eq!(m.state(), before);
            assert!(m.writes.is_empty());
        }
    }

    #[test]
    fn failed_write_leaves_registers_and_flags_untouched() {
        let mut m = Model::new();
        m.set(Register::RBX, 0x9000);
        m.set(Register::RAX, 0x1234);
        m.fail_writes = true;
        let before = m.state();
        let bytes = asm(
            64,
            Instruction::with2(Code::Xchg_rm64_r64, mem(Register::RBX, 0), Register::RAX),
        );
        assert!(emulate(&mut m, &bytes, CpuMode::Long64).is_err());
        assert_eq!(m.state(), before);
    }

    #[test]
    fn rip_relative_operand_uses_rip() {
        let mut m = Model::new();
        m.rip = 0xffff_8000_0000_0000;
        let target = m.rip + 0x1000;
        m.poke(target, &[0x42]);
        let instr = Instruction::with2(
            Code::Mov_r8_rm8,
            Register::DL,
            mem(Register::RIP, target as i64),
        );
        let bytes = encode(64, m.rip, &instr.unwrap()).unwrap();
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.reg(Register::RDX), 0x42);
    }

    #[test]
    fn sixteen_bit_addressing_wraps_and_adds_the_segment_base() {
        let mut m = Model::new();
        m.segment(Register::DS, 0x1_0000);
        m.segment(Register::SS, 0x2_0000);
        m.set(Register::RBX, 0xfff0);
        m.set(Register::RSI, 0x20);
        m.set(Register::RBP, 0x100);
        m.set(Register::RAX, 0x99);
        // mov [bx+si], al: offset 0x10010 wraps to 0x0010
        let bytes = [0x88, 0x00];
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Real), done(&bytes));
        assert_eq!(m.writes, vec![(0x1_0010, 1)]);
        // mov [bp+2], al defaults to SS
        let bytes = [0x88, 0x46, 0x02];
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Protected16), done(&bytes));
        assert_eq!(m.writes[1], (0x2_0102, 1));
        // 32-bit mode: segment base + offset wraps at 4 GiB
        m.segment(Register::DS, 0xffff_f000);
        m.set(Register::RBX, 0x2000);
        let bytes = [0x88, 0x03]; // mov [ebx], al
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Protected32), done(&bytes));
        assert_eq!(m.writes[2], (0x1000, 1));
    }

    #[test]
    fn unsupported_and_undecodable_instructions_are_errors() {
        let mut m = Model::new();
        let push = [0x50];
        assert_eq!(
            emulate(&mut m, &push, CpuMode::Long64),
            Err(EmulateError::Unsupported {
                mnemonic: Mnemonic::Push
            })
        );
        let mov_cr0 = [0x0f, 0x22, 0xc0];
        assert_eq!(
            emulate(&mut m, &mov_cr0, CpuMode::Long64),
            Err(EmulateError::Unsupported {
                mnemonic: Mnemonic::Mov
            })
        );
        let sse_movsd = [0xf2, 0x0f, 0x10, 0x03];
        assert!(matches!(
            emulate(&mut m, &sse_movsd, CpuMode::Long64),
            Err(EmulateError::Unsupported { .. })
        ));
        let truncated = [0x8b];
        assert_eq!(
            emulate(&mut m, &truncated, CpuMode::Long64),
            Err(EmulateError::Decode {
                bytes: InstructionBytes::new(&truncated)
            })
        );
        assert_eq!(
            emulate(&mut m, &[], CpuMode::Long64),
            Err(EmulateError::Decode {
                bytes: InstructionBytes::new(&[])
            })
        );
        // LOCK on a MOV is #UD on hardware, so the decoder refuses it too
        let lock_mov = [0xf0, 0x89, 0x03];
        assert_eq!(
            emulate(&mut m, &lock_mov, CpuMode::Long64),
            Err(EmulateError::Decode {
                bytes: InstructionBytes::new(&lock_mov)
            })
        );
        let message = emulate(&mut m, &lock_mov, CpuMode::Long64)
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "cannot decode the instruction at an MMIO access (bytes: f0 89 03)"
        );
        let message = emulate(&mut m, &push, CpuMode::Long64)
            .unwrap_err()
            .to_string();
        assert_eq!(message, "cannot emulate instruction Push at an MMIO access");
        assert!(m.reads.is_empty() && m.writes.is_empty());
    }

    #[test]
    fn lock_prefixed_read_modify_write_is_one_read_and_one_write() {
        let mut m = Model::new();
        m.set(Register::RBX, 0xa000);
        m.set(Register::RAX, 1);
        m.poke(0xa000, &[0xff, 0, 0, 0]);
        let bytes = [0xf0, 0x01, 0x03]; // lock add [rbx], eax
        assert_eq!(emulate(&mut m, &bytes, CpuMode::Long64), done(&bytes));
        assert_eq!(m.peek(0xa000, 4), 0x100);
        assert_eq!((m.reads.len(), m.writes.len()), (1, 1));
    }

    #[test]
    fn clflush_of_mmio_is_a_no_op() {
        let mut m = Model::new();
        m.set(Register::RBX, 0xa000);
        let before = m.state();
        for bytes in [&[0x0f, 0xae, 0x3b][..], &[0x66, 0x0f, 0xae, 0x3b]] {
            assert_eq!(emulate(&mut m, bytes, CpuMode::Long64), done(bytes));
        }
        assert_eq!(m.state(), before);
        assert!(m.reads.is_empty() && m.writes.is_empty());
    }

    // ---- generated cases: iced-x86's encoder against an independent oracle ----

    /// xorshift64*: deterministic, so a failure always reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())]
        }
    }

    /// One operand of a `Code`, read from its name (`Add_rm32_imm8` -> rm32, imm8).
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Spec {
        Rm(usize),
        R(usize),
        Imm(usize),
        Fixed(Register),
        Moffs(usize),
        /// The missing second operand of a one-operand form.
        Absent,
    }

    fn parse_spec(token: &str) -> Option<Spec> {
        let size = |digits: &str| match digits {
            "8" => Some(1),
            "16" => Some(2),
            "32" => Some(4),
            "64" => Some(8),
            _ => None,
        };
        match token {
            "AL" => return Some(Spec::Fixed(Register::AL)),
            "AX" => return Some(Spec::Fixed(Register::AX)),
            "EAX" => return Some(Spec::Fixed(Register::EAX)),
            "RAX" => return Some(Spec::Fixed(Register::RAX)),
            _ => {}
        }
        if let Some(digits) = token.strip_prefix("rm") {
            size(digits).map(Spec::Rm)
        } else if let Some(digits) = token.strip_prefix("moffs") {
            size(digits).map(Spec::Moffs)
        } else if let Some(digits) = token.strip_prefix("imm") {
            size(digits).map(Spec::Imm)
        } else if let Some(digits) = token.strip_prefix('r') {
            size(digits).map(Spec::R)
        } else {
            None
        }
    }

    const GENERATED_MNEMONICS: [Mnemonic; 22] = [
        Mnemonic::Inc,
        Mnemonic::Dec,
        Mnemonic::Neg,
        Mnemonic::Not,
        Mnemonic::Adc,
        Mnemonic::Sbb,
        Mnemonic::Bts,
        Mnemonic::Btr,
        Mnemonic::Btc,
        Mnemonic::Mov,
        Mnemonic::Movzx,
        Mnemonic::Movsx,
        Mnemonic::Movsxd,
        Mnemonic::Add,
        Mnemonic::Sub,
        Mnemonic::Cmp,
        Mnemonic::And,
        Mnemonic::Or,
        Mnemonic::Xor,
        Mnemonic::Test,
        Mnemonic::Xchg,
        Mnemonic::Bt,
    ];

    /// Every two-operand form of the supported mnemonics whose operands are GPRs, r/m,
    /// immediates or moffs (forms such as `Add_rm8_imm8_82`, segment and control register
    /// moves are not generated).
    fn generated_forms() -> Vec<(Code, [Spec; 2])> {
        Code::values()
            .filter(|code| GENERATED_MNEMONICS.contains(&code.mnemonic()))
            .filter_map(|code| {
                let name = format!("{code:?}");
                let specs: Option<Vec<Spec>> = name.split('_').skip(1).map(parse_spec).collect();
                match *specs?.as_slice() {
                    [a, b] => Some((code, [a, b])),
                    [a] => Some((code, [a, Spec::Absent])),
                    _ => None,
                }
            })
            .collect()
    }

    struct Arch {
        bitness: u32,
        mode: CpuMode,
        /// Registers by size 1, 2, 4, 8.
        regs: [&'static [Register]; 4],
        bases: &'static [Register],
        indexes: &'static [Register],
        scales: &'static [u32],
        displacements: &'static [i64],
    }

    const ARCH64: Arch = Arch {
        bitness: 64,
        mode: CpuMode::Long64,
        regs: [
            &[
                Register::AL,
                Register::CL,
                Register::BL,
                Register::AH,
                Register::BH,
                Register::DH,
                Register::SPL,
                Register::SIL,
                Register::DIL,
                Register::R8L,
                Register::R12L,
                Register::R15L,
            ],
            &[
                Register::AX,
                Register::CX,
                Register::SP,
                Register::SI,
                Register::R8W,
                Register::R13W,
                Register::R15W,
            ],
            &[
                Register::EAX,
                Register::EDX,
                Register::EBP,
                Register::EDI,
                Register::R9D,
                Register::R14D,
                Register::R15D,
            ],
            &[
                Register::RAX,
                Register::RCX,
                Register::RBX,
                Register::RSP,
                Register::RSI,
                Register::R8,
                Register::R11,
                Register::R15,
            ],
        ],
        bases: &[
            Register::RAX,
            Register::RBX,
            Register::RSP,
            Register::RBP,
            Register::R12,
            Register::R13,
            Register::R15,
            Register::RIP,
            Register::None,
        ],
        indexes: &[Register::None, Register::RSI, Register::R9, Register::R14],
        scales: &[1, 2, 4, 8],
        displacements: &[0, 8, -8, 0x7f, -0x80, 0x1234, -0x1234_5678],
    };

    const LEGACY_REGS: [&[Register]; 4] = [
        &[
            Register::AL,
            Register::CL,
            Register::BL,
            Register::AH,
            Register::DH,
            Register::BH,
        ],
        &[
            Register::AX,
            Register::DX,
            Register::SP,
            Register::SI,
            Register::DI,
        ],
        &[
            Register::EAX,
            Register::ECX,
            Register::EBX,
            Register::EBP,
            Register::EDI,
        ],
        &[],
    ];

    const ARCH32: Arch = Arch {
        bitness: 32,
        mode: CpuMode::Protected32,
        regs: LEGACY_REGS,
        bases: &[
            Register::EAX,
            Register::EBX,
            Register::ESP,
            Register::EBP,
            Register::ESI,
            Register::None,
        ],
        indexes: &[Register::None, Register::ESI, Register::EDI],
        scales: &[1, 2, 4, 8],
        displacements: &[0, 4, -4, 0x7f, -0x80, 0x1234, 0x1234_5678],
    };

    const ARCH16: Arch = Arch {
        bitness: 16,
        mode: CpuMode::Real,
        regs: LEGACY_REGS,
        bases: &[Register::BX, Register::BP, Register::None],
        indexes: &[Register::None, Register::SI, Register::DI],
        scales: &[1],
        displacements: &[0, 2, -2, 0x7f, -0x80, 0x1234],
    };

    #[derive(Clone, Copy, Debug)]
    struct MemChoice {
        base: Register,
        index: Register,
        scale: u32,
        displacement: i64,
        segment: Register,
    }

    #[derive(Clone, Copy, Debug)]
    enum Place {
        Absent,
        Reg(Register),
        Mem(MemChoice),
        Imm(i64),
    }

    fn size_index(size: usize) -> usize {
        match size {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        }
    }

    fn random_memory(rng: &mut Rng, arch: &Arch, m: &Model) -> MemChoice {
        let base = rng.pick(arch.bases);
        let index = if base == Register::RIP {
            Register::None
        } else {
            rng.pick(arch.indexes)
        };
        let displacement = if base == Register::RIP {
            m.rip.wrapping_add(rng.below(0x10000) as u64) as i64
        } else if base == Register::None && index == Register::None {
            0x1000 + rng.below(0x7000) as i64
        } else {
            rng.pick(arch.displacements)
        };
        let segment = match rng.below(6) {
            0 => Register::FS,
            1 => Register::GS,
            2 => Register::ES,
            _ => Register::None,
        };
        MemChoice {
            base,
            index,
            scale: rng.pick(arch.scales),
            displacement,
            segment,
        }
    }

    fn memory_operand(arch: &Arch, c: &MemChoice, moffs: bool) -> MemoryOperand {
        let displ_size = if moffs || (c.base == Register::None && c.index == Register::None) {
            arch.bitness / 8
        } else if c.displacement == 0 {
            0
        } else {
            1
        };
        MemoryOperand::new(
            c.base,
            c.index,
            c.scale,
            c.displacement,
            displ_size,
            false,
            c.segment,
        )
    }

    fn oracle_read_reg(m: &Model, reg: Register) -> u64 {
        let bytes = m.reg(reg.full_register()).to_le_bytes();
        let (offset, size) = if is_high_byte(reg) {
            (1, 1)
        } else {
            (0, reg.size())
        };
        let mut value = [0u8; 8];
        value[..size].copy_from_slice(&bytes[offset..offset + size]);
        u64::from_le_bytes(value)
    }

    fn oracle_write_reg(m: &mut Model, reg: Register, value: u64) {
        let full = reg.full_register();
        let mut bytes = m.reg(full).to_le_bytes();
        let (offset, size) = if is_high_byte(reg) {
            (1, 1)
        } else {
            (0, reg.size())
        };
        if size == 4 {
            bytes = [0; 8];
        }
        bytes[offset..offset + size].copy_from_slice(&value.to_le_bytes()[..size]);
        m.set(full, u64::from_le_bytes(bytes));
    }

    fn oracle_sign_extend(value: u64, size: usize) -> i128 {
        let bits = size * 8;
        let value = value as u128 & ((1u128 << bits) - 1);
        if value >> (bits - 1) & 1 == 1 {
            value as i128 - (1i128 << bits)
        } else {
            value as i128
        }
    }

    /// Segment base + offset as the SDM describes it, with the default segment SS for BP/SP
    /// bases.
    fn oracle_linear(m: &Model, arch: &Arch, segment: Register, offset: u64) -> u64 {
        let address_bits = arch.bitness;
        let offset = (offset as u128 % (1u128 << address_bits)) as u64;
        let base = m.segment_bases[SEGMENTS.iter().position(|&s| s == segment).unwrap()];
        if arch.bitness == 64 {
            if segment == Register::FS || segment == Register::GS {
                base.wrapping_add(offset)
            } else {
                offset
            }
        } else {
            ((base as u128 + offset as u128) % (1u128 << 32)) as u64
        }
    }

    fn oracle_address(m: &Model, arch: &Arch, c: &MemChoice, extra: i128) -> u64 {
        // A RIP-relative operand's displacement is its absolute target (see random_memory).
        let value = |reg: Register| {
            if reg == Register::None || reg == Register::RIP {
                0
            } else {
                oracle_read_reg(m, reg) as i128
            }
        };
        let offset =
            value(c.base) + value(c.index) * c.scale as i128 + c.displacement as i128 + extra;
        let offset = offset.rem_euclid(1i128 << arch.bitness) as u64;
        let segment = if c.segment != Register::None {
            c.segment
        } else if matches!(
            c.base,
            Register::BP | Register::EBP | Register::ESP | Register::RBP | Register::RSP
        ) {
            Register::SS
        } else {
            Register::DS
        };
        oracle_linear(m, arch, segment, offset)
    }

    fn oracle_alu(mnemonic: Mnemonic, a: u64, b: u64, carry_in: bool, size: usize) -> (u64, u64) {
        let bits = size * 8;
        let modulus = 1u128 << bits;
        let (a, b) = (a as u128 % modulus, b as u128 % modulus);
        let (sa, sb) = (
            oracle_sign_extend(a as u64, size),
            oracle_sign_extend(b as u64, size),
        );
        let c = match mnemonic {
            Mnemonic::Adc | Mnemonic::Sbb => u128::from(carry_in),
            _ => 0,
        };
        let signed_range = -(1i128 << (bits - 1))..=(1i128 << (bits - 1)) - 1;
        let (result, carry, overflow, adjust) = match mnemonic {
            Mnemonic::Add | Mnemonic::Adc => (
                (a + b + c) % modulus,
                a + b + c >= modulus,
                !signed_range.contains(&(sa + sb + c as i128)),
                (a & 0xf) + (b & 0xf) + c > 0xf,
            ),
            Mnemonic::Sub | Mnemonic::Sbb | Mnemonic::Cmp => (
                (a + 2 * modulus - b - c) % modulus,
                a < b + c,
                !signed_range.contains(&(sa - sb - c as i128)),
                (a & 0xf) < (b & 0xf) + c,
            ),
            Mnemonic::And | Mnemonic::Test => (a & b, false, false, false),
            Mnemonic::Or => (a | b, false, false, false),
            Mnemonic::Xor => (a ^ b, false, false, false),
            other => panic!("no ALU oracle for {other:?}"),
        };
        let ones = (0..8).filter(|bit| result >> bit & 1 == 1).count();
        let mut flags = 0;
        for (set, flag) in [
            (carry, CF),
            (ones % 2 == 0, PF),
            (adjust, AF),
            (result == 0, ZF),
            (result >> (bits - 1) & 1 == 1, SF),
            (overflow, OF),
        ] {
            if set {
                flags |= flag;
            }
        }
        (result as u64, flags)
    }

    struct Outcome {
        model: Model,
        reads: usize,
        writes: usize,
    }

    /// The architectural result of a two-operand instruction, computed without the emulator.
    fn oracle(
        m: &Model,
        arch: &Arch,
        mnemonic: Mnemonic,
        specs: [Spec; 2],
        places: [Place; 2],
    ) -> Outcome {
        let size_of = |spec: Spec| match spec {
            Spec::Rm(s) | Spec::R(s) | Spec::Imm(s) | Spec::Moffs(s) => s,
            Spec::Absent => 0,
            Spec::Fixed(reg) => reg.size(),
        };
        let size = size_of(specs[0]);
        let mut out = m.clone();
        let mut reads = 0;
        let mut writes = 0;
        let read = |place: Place, spec: Spec, reads: &mut usize| -> u64 {
            let size = size_of(spec);
            match place {
                Place::Reg(reg) => oracle_read_reg(m, reg),
                Place::Mem(c) => {
                    *reads += 1;
                    m.peek(oracle_address(m, arch, &c, 0), size)
                }
                Place::Imm(imm) => imm as u64,
                Place::Absent => panic!("read of an absent operand"),
            }
        };
        let write = |out: &mut Model, place: Place, value: u64, writes: &mut usize| match place {
            Place::Reg(reg) => oracle_write_reg(out, reg, value),
            Place::Mem(c) => {
                *writes += 1;
                out.poke(oracle_address(m, arch, &c, 0), &value.to_le_bytes()[..size]);
            }
            Place::Imm(_) | Place::Absent => panic!("write to an immediate"),
        };
        match mnemonic {
            Mnemonic::Mov | Mnemonic::Movzx => {
                let value = read(places[1], specs[1], &mut reads);
                write(&mut out, places[0], value, &mut writes);
            }
            Mnemonic::Movsx | Mnemonic::Movsxd => {
                let value = read(places[1], specs[1], &mut reads);
                let value = oracle_sign_extend(value, size_of(specs[1])) as u64;
                write(&mut out, places[0], value, &mut writes);
            }
            Mnemonic::Xchg => {
                let a = read(places[0], specs[0], &mut reads);
                let b = read(places[1], specs[1], &mut reads);
                write(&mut out, places[0], b, &mut writes);
                write(&mut out, places[1], a, &mut writes);
            }
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
                let bits = size as i128 * 8;
                let (value, bit, address) = match (places[0], places[1]) {
                    (Place::Mem(c), Place::Reg(reg)) => {
                        let offset = oracle_sign_extend(oracle_read_reg(m, reg), size);
                        let address =
                            oracle_address(m, arch, &c, offset.div_euclid(bits) * size as i128);
                        reads += 1;
                        (
                            m.peek(address, size),
                            offset.rem_euclid(bits),
                            Some(address),
                        )
                    }
                    (base, offset) => {
                        let value = read(base, specs[0], &mut reads);
                        let offset = read(offset, specs[1], &mut reads) as i128;
                        let address = match base {
                            Place::Mem(c) => Some(oracle_address(m, arch, &c, 0)),
                            _ => None,
                        };
                        (value, offset.rem_euclid(bits), address)
                    }
                };
                let mask = 1u64 << bit;
                let updated = match mnemonic {
                    Mnemonic::Bts => Some(value | mask),
                    Mnemonic::Btr => Some(value & !mask),
                    Mnemonic::Btc => Some(value ^ mask),
                    _ => None,
                };
                if let Some(updated) = updated {
                    match (address, places[0]) {
                        (Some(address), _) => {
                            writes += 1;
                            out.poke(address, &updated.to_le_bytes()[..size]);
                        }
                        (None, Place::Reg(reg)) => oracle_write_reg(&mut out, reg, updated),
                        _ => panic!("bit test of an immediate"),
                    }
                }
                out.rflags = out.rflags & !CF | if value & mask != 0 { CF } else { 0 };
            }
            Mnemonic::Inc | Mnemonic::Dec | Mnemonic::Neg | Mnemonic::Not => {
                let value = read(places[0], specs[0], &mut reads);
                let carry = m.rflags & CF != 0;
                let (result, flags) = match mnemonic {
                    Mnemonic::Inc => {
                        let (result, flags) = oracle_alu(Mnemonic::Add, value, 1, false, size);
                        (result, flags & !CF | if carry { CF } else { 0 })
                    }
                    Mnemonic::Dec => {
                        let (result, flags) = oracle_alu(Mnemonic::Sub, value, 1, false, size);
                        (result, flags & !CF | if carry { CF } else { 0 })
                    }
                    Mnemonic::Neg => oracle_alu(Mnemonic::Sub, 0, value, false, size),
                    _ => (
                        (!value as u128 % (1u128 << (size * 8))) as u64,
                        m.rflags & STATUS_FLAGS,
                    ),
                };
                write(&mut out, places[0], result, &mut writes);
                out.rflags = out.rflags & !STATUS_FLAGS | flags;
            }
            alu => {
                let a = read(places[0], specs[0], &mut reads);
                let b = read(places[1], specs[1], &mut reads);
                let (result, flags) = oracle_alu(alu, a, b, m.rflags & CF != 0, size);
                if !matches!(alu, Mnemonic::Cmp | Mnemonic::Test) {
                    write(&mut out, places[0], result, &mut writes);
                }
                out.rflags = out.rflags & !STATUS_FLAGS | flags;
            }
        }
        Outcome {
            model: out,
            reads,
            writes,
        }
    }

    fn random_model(rng: &mut Rng) -> Model {
        let mut m = Model::new();
        for reg in m.regs.iter_mut() {
            *reg = match rng.below(4) {
                0 => rng.next() & 0xffff,
                1 => rng.next() | 0xffff_ffff_ffff_ff00,
                _ => rng.next(),
            };
        }
        m.rip = rng.next() & 0xffff_ffff_ffff_f000;
        m.rflags = 0x2 | rng.next() & (STATUS_FLAGS | DF);
        for base in m.segment_bases.iter_mut() {
            *base = rng.next() & 0xffff_fff0;
        }
        m
    }

    fn build(code: Code, ops: [&Place; 2], arch: &Arch, moffs: bool) -> Option<Instruction> {
        let operand = |c: &MemChoice| memory_operand(arch, c, moffs);
        match (ops[0], ops[1]) {
            (Place::Reg(a), Place::Reg(b)) => Instruction::with2(code, *a, *b),
            (Place::Reg(a), Place::Mem(b)) => Instruction::with2(code, *a, operand(b)),
            (Place::Mem(a), Place::Reg(b)) => Instruction::with2(code, operand(a), *b),
            (Place::Reg(a), Place::Imm(b)) => match i32::try_from(*b) {
                Ok(b) => Instruction::with2(code, *a, b),
                Err(_) => Instruction::with2(code, *a, *b),
            },
            (Place::Mem(a), Place::Imm(b)) => Instruction::with2(code, operand(a), *b as i32),
            (Place::Reg(a), Place::Absent) => Instruction::with1(code, *a),
            (Place::Mem(a), Place::Absent) => Instruction::with1(code, operand(a)),
            _ => return None,
        }
        .ok()
    }

    /// Generates, emulates and checks `variants` random cases of every form; returns how many
    /// cases ran.
    fn check_generated_forms(arch: &Arch, variants: usize, seed: u64) -> usize {
        let mut rng = Rng(seed);
        let mut ran = 0;
        for (code, specs) in generated_forms() {
            for _ in 0..variants {
                let mut m = random_model(&mut rng);
                let mut places = [Place::Imm(0); 2];
                for (place, spec) in places.iter_mut().zip(specs) {
                    *place = match spec {
                        Spec::R(size) => {
                            let regs = arch.regs[size_index(size)];
                            if regs.is_empty() {
                                continue;
                            }
                            Place::Reg(rng.pick(regs))
                        }
                        // r/m as a register a quarter of the time
                        Spec::Rm(size)
                            if rng.below(4) == 0 && !arch.regs[size_index(size)].is_empty() =>
                        {
                            Place::Reg(rng.pick(arch.regs[size_index(size)]))
                        }
                        Spec::Rm(_) => Place::Mem(random_memory(&mut rng, arch, &m)),
                        Spec::Moffs(_) => {
                            let mut c = random_memory(&mut rng, arch, &m);
                            c.base = Register::None;
                            c.index = Register::None;
                            c.displacement = 0x1000 + rng.below(0x7000) as i64;
                            Place::Mem(c)
                        }
                        Spec::Fixed(reg) => Place::Reg(reg),
                        Spec::Absent => Place::Absent,
                        Spec::Imm(size) => {
                            let bits = size * 8;
                            let value = rng.next() as i64 >> (64 - bits);
                            Place::Imm(value)
                        }
                    };
                }
                if matches!(places, [Place::Imm(0), _]) {
                    continue; // no register of that size in this mode
                }
                let moffs = specs.iter().any(|s| matches!(s, Spec::Moffs(_)));
                let Some(instr) = build(code, [&places[0], &places[1]], arch, moffs) else {
                    continue;
                };
                // AH with a REX prefix, 64-bit operands outside long mode, ...: not encodable.
                let Some(bytes) = encode(arch.bitness, m.rip, &instr) else {
                    continue;
                };
                // xchg (e/r)ax, (e/r)ax is NOP (0x90), which never touches memory.
                if Decoder::new(arch.bitness, &bytes, DecoderOptions::NONE)
                    .decode()
                    .mnemonic()
                    == Mnemonic::Nop
                {
                    continue;
                }
                // The immediate the instruction carries, as the oracle sees it: sign-extended.
                for (place, spec) in places.iter_mut().zip(specs) {
                    if let (Place::Imm(value), Spec::Imm(_)) = (place, spec) {
                        *value = oracle_sign_extend(*value as u64, 8) as i64;
                    }
                }
                for place in &places {
                    if let Place::Mem(c) = place {
                        let address = oracle_address(&m, arch, c, 0);
                        m.poke(address, &rng.next().to_le_bytes());
                    }
                }
                if let (Place::Mem(c), Place::Reg(reg)) = (places[0], places[1]) {
                    if matches!(
                        code.mnemonic(),
                        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
                    ) {
                        let size = specs[0];
                        let size = match size {
                            Spec::Rm(s) => s,
                            _ => unreachable!(),
                        };
                        let offset = oracle_sign_extend(oracle_read_reg(&m, reg), size);
                        let extra = offset.div_euclid(size as i128 * 8) * size as i128;
                        let address = oracle_address(&m, arch, &c, extra);
                        m.poke(address, &rng.next().to_le_bytes());
                    }
                }
                let expected = oracle(&m, arch, code.mnemonic(), specs, places);

                let mut replay = m.clone();
                let mut actual = m.clone();
                let result = emulate(&mut actual, &bytes, arch.mode);
                let context = format!("{code:?} {places:?} bytes {bytes:02x?} in {:?}", arch.mode);
                assert_eq!(result, done(&bytes), "{context}");
                assert_eq!(actual.state(), expected.model.state(), "{context}");
                assert_eq!(actual.reads.len(), expected.reads, "reads: {context}");
                assert_eq!(actual.writes.len(), expected.writes, "writes: {context}");

                if expected.reads > 0 {
                    replay.fail_reads = true;
                    let result = emulate(&mut replay, &bytes, arch.mode);
                    assert!(
                        matches!(result, Err(EmulateError::MmioPending { .. })),
                        "{context}"
                    );
                    assert_eq!(replay.state(), m.state(), "replay: {context}");
                }
                ran += 1;
            }
        }
        ran
    }

    #[test]
    fn generated_forms_cover_every_mnemonic() {
        let forms = generated_forms();
        for mnemonic in GENERATED_MNEMONICS {
            assert!(
                forms.iter().any(|(code, _)| code.mnemonic() == mnemonic),
                "{mnemonic:?}"
            );
        }
        assert!(forms.len() > 100, "only {} forms", forms.len());
    }

    #[test]
    fn generated_64_bit_cases_match_the_oracle() {
        let ran = check_generated_forms(&ARCH64, 24, 0x5eed_0064);
        assert!(ran > 2500, "only {ran} cases ran");
    }

    #[test]
    fn generated_32_bit_cases_match_the_oracle() {
        let ran = check_generated_forms(&ARCH32, 8, 0x5eed_0032);
        assert!(ran > 500, "only {ran} cases ran");
    }

    #[test]
    fn generated_16_bit_cases_match_the_oracle() {
        let ran = check_generated_forms(&ARCH16, 8, 0x5eed_0016);
        assert!(ran > 500, "only {ran} cases ran");
    }

    /// The one-element effect of STOS/MOVS, as the SDM describes it.
    fn oracle_string(
        m: &Model,
        arch: &Arch,
        movs: bool,
        size: usize,
        address_bits: u32,
        rep: bool,
        segment: Register,
    ) -> (Model, Emulated, usize) {
        let (counter, si, di) = match address_bits {
            16 => (Register::CX, Register::SI, Register::DI),
            32 => (Register::ECX, Register::ESI, Register::EDI),
            _ => (Register::RCX, Register::RSI, Register::RDI),
        };
        let mut out = m.clone();
        let len = usize::MAX; // filled in by the caller
        let count = oracle_read_reg(m, counter);
        if rep && count == 0 {
            return (out, Emulated::Done { len }, 0);
        }
        let step: i128 = if m.rflags & DF != 0 {
            -(size as i128)
        } else {
            size as i128
        };
        let wrap = |value: u64| ((value as i128 + step).rem_euclid(1i128 << address_bits)) as u64;
        // The sized SI/DI already wrapped at the address size.
        let at = |segment: Register, offset: u64| {
            let base = m.segment_bases[SEGMENTS.iter().position(|&s| s == segment).unwrap()];
            match arch.bitness {
                64 if matches!(segment, Register::FS | Register::GS) => base.wrapping_add(offset),
                64 => offset,
                _ => (base + offset) % (1 << 32),
            }
        };
        let mut reads = 0;
        let value = if movs {
            reads = 1;
            let source_segment = if segment == Register::None {
                Register::DS
            } else {
                segment
            };
            let source = oracle_read_reg(m, si);
            oracle_write_reg(&mut out, si, wrap(source));
            m.peek(at(source_segment, source), size)
        } else {
            let accumulator =
                [Register::AL, Register::AX, Register::EAX, Register::RAX][size_index(size)];
            oracle_read_reg(m, accumulator)
        };
        let destination = oracle_read_reg(m, di);
        out.poke(at(Register::ES, destination), &value.to_le_bytes()[..size]);
        oracle_write_reg(&mut out, di, wrap(destination));
        let mut outcome = Emulated::Done { len };
        if rep {
            oracle_write_reg(&mut out, counter, count - 1);
            if count != 1 {
                outcome = Emulated::Repeat;
            }
        }
        (out, outcome, reads)
    }

    #[test]
    fn generated_string_cases_match_the_oracle() {
        let mut rng = Rng(0x5eed_57f5);
        let mut ran = 0;
        for arch in [&ARCH64, &ARCH32, &ARCH16] {
            let other = if arch.bitness == 16 {
                32
            } else {
                arch.bitness / 2
            };
            let sizes: &[usize] = if arch.bitness == 64 {
                &[1, 2, 4, 8]
            } else {
                &[1, 2, 4]
            };
            for address_bits in [arch.bitness, other] {
                for &size in sizes {
                    for movs in [false, true] {
                        for rep in [
                            RepPrefixKind::None,
                            RepPrefixKind::Repe,
                            RepPrefixKind::Repne,
                        ] {
                            for _ in 0..12 {
                                let mut m = random_model(&mut rng);
                                let counter = m.reg(Register::RCX) & !0xffff_ffff
                                    | rng.pick(&[0, 1, 2, 0x1_0000, 0xffff_ffff]);
                                m.set(Register::RCX, counter);
                                let segment = rng.pick(&[
                                    Register::None,
                                    Register::FS,
                                    Register::GS,
                                    Register::SS,
                                ]);
                                let instr = match (movs, size) {
                                    (false, 1) => Instruction::with_stosb(address_bits, rep),
                                    (false, 2) => Instruction::with_stosw(address_bits, rep),
                                    (false, 4) => Instruction::with_stosd(address_bits, rep),
                                    (false, _) => Instruction::with_stosq(address_bits, rep),
                                    (true, 1) => {
                                        Instruction::with_movsb(address_bits, segment, rep)
                                    }
                                    (true, 2) => {
                                        Instruction::with_movsw(address_bits, segment, rep)
                                    }
                                    (true, 4) => {
                                        Instruction::with_movsd(address_bits, segment, rep)
                                    }
                                    (true, _) => {
                                        Instruction::with_movsq(address_bits, segment, rep)
                                    }
                                };
                                let bytes = encode(arch.bitness, 0, &instr.unwrap()).unwrap();
                                let segment = if movs { segment } else { Register::None };
                                let rep = rep != RepPrefixKind::None;
                                let (mut expected, outcome, reads) =
                                    oracle_string(&m, arch, movs, size, address_bits, rep, segment);
                                let outcome = match outcome {
                                    Emulated::Done { .. } => Emulated::Done { len: bytes.len() },
                                    repeat => repeat,
                                };
                                let mut actual = m.clone();
                                let context = format!("{bytes:02x?} in {:?}", arch.mode);
                                assert_eq!(
                                    emulate(&mut actual, &bytes, arch.mode),
                                    Ok(outcome),
                                    "{context}"
                                );
                                expected.reads.clone_from(&actual.reads);
                                assert_eq!(actual.state(), expected.state(), "{context}");
                                assert_eq!(actual.reads.len(), reads, "{context}");
                                ran += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(ran > 900, "only {ran} cases ran");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0xf022_0001);
        let modes = [
            CpuMode::Real,
            CpuMode::Protected16,
            CpuMode::Protected32,
            CpuMode::Long64,
        ];
        let mut m = random_model(&mut rng);
        let mut emulated = 0;
        for _ in 0..100_000 {
            let len = 1 + rng.below(15);
            let mut bytes = [0u8; 15];
            for b in bytes.iter_mut().take(len) {
                *b = rng.next() as u8;
            }
            m.fail_reads = rng.below(8) == 0;
            let before = (m.regs, m.rflags);
            match emulate(&mut m, &bytes[..len], rng.pick(&modes)) {
                Ok(_) => emulated += 1,
                // Whatever failed, nothing architectural happened.
                Err(_) => {
                    assert_eq!((m.regs, m.rflags), before, "{:02x?}", &bytes[..len]);
                    assert!(m.writes.is_empty(), "{:02x?}", &bytes[..len]);
                }
            }
            if m.memory.len() > 4096 {
                m = random_model(&mut rng);
            }
            m.reads.clear();
            m.writes.clear();
        }
        assert!(
            emulated > 1000,
            "only {emulated} random instructions emulated"
        );
    }

    /// Our effective-address arithmetic (address size from the prefixes, wrapping, segment
    /// bases, RIP-relative) against iced-x86's own `virtual_address`, for every random byte
    /// string that decodes to an instruction with a ModRM or moffs memory operand.
    #[test]
    fn effective_addresses_agree_with_iced_for_random_encodings() {
        let mut rng = Rng(0xea_0001);
        let modes = [CpuMode::Real, CpuMode::Protected32, CpuMode::Long64];
        let mut compared = 0;
        for _ in 0..50_000 {
            let m = random_model(&mut rng);
            let mode = rng.pick(&modes);
            let mut bytes = [0u8; 15];
            for b in bytes.iter_mut() {
                *b = rng.next() as u8;
            }
            let Ok(instr) = decode(&bytes, mode) else {
                continue;
            };
            // Only what we emulate (LEA, for one, ignores the segment).
            if !GENERATED_MNEMONICS.contains(&instr.mnemonic())
                || (0..instr.op_count()).all(|i| instr.op_kind(i) != OpKind::Memory)
                || !instr.memory_index().is_gpr() && instr.memory_index() != Register::None
            {
                continue;
            }
            let exec = Execution {
                ctx: &mut m.clone(),
                instr: &instr,
                mode,
                address_size: address_size(&bytes, instr.len(), mode),
                pending: Pending::default(),
            };
            let ours = exec.memory_linear(0).unwrap();

            let mut at_rip = Decoder::with_ip(mode.bitness(), &bytes, m.rip, DecoderOptions::NONE);
            let operand = (0..instr.op_count())
                .find(|&i| instr.op_kind(i) == OpKind::Memory)
                .unwrap();
            let theirs = at_rip
                .decode()
                .virtual_address(operand, 0, |reg, _, _| {
                    if let Some(index) = SEGMENTS.iter().position(|&s| s == reg) {
                        let long_mode_flat = mode == CpuMode::Long64 && index < 4;
                        Some(if long_mode_flat {
                            0
                        } else {
                            m.segment_bases[index]
                        })
                    } else {
                        Some(oracle_read_reg(&m, reg))
                    }
                })
                .unwrap();
            let theirs = if mode == CpuMode::Long64 {
                theirs
            } else {
                theirs & 0xffff_ffff
            };
            assert_eq!(ours, theirs, "{:02x?} in {mode:?}", &bytes[..instr.len()]);
            compared += 1;
        }
        assert!(compared > 3_000, "only {compared} addresses compared");
    }
}
