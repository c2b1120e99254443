//! The integer SIMD instructions a Linux boot runs at CPL0 (the kernel's BLAKE2s: its SSSE3
//! and AVX-512VL forms), carried out on the XMM/YMM registers in the vCPU's XSAVE image.
//!
//! Only XMM0-15/YMM0-15, 128- and 256-bit forms, without EVEX masking or broadcast. Legacy SSE
//! forms keep bits 255:128 of the destination; VEX and EVEX forms zero every bit above the
//! operation's width (the YMM upper half and the ZMM_Hi256 component), as the processor does.

use iced_x86::{EncodingKind, Mnemonic, OpKind, Register};

use super::{
    read_u64, write_u64, xsave_image, CompleteError, Exception, ExtendedState, Kind, Op, SSE,
    XSAVE_HEADER, XSAVE_XMM_START, YMM,
};

/// CR4.OSFXSR: SSE instructions #UD without it.
const CR4_OSFXSR: u64 = 1 << 9;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const ZMM_HI256: u64 = 1 << 6;

/// The operations implemented, by mnemonic.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Operation {
    Move,
    MoveAligned,
    MoveDword,
    AddDwords,
    AddQwords,
    Xor,
    Or,
    And,
    ShuffleDwords,
    ShuffleBytes,
    ShiftRightDwords,
    ShiftLeftDwords,
    RotateRightDwords,
    UnpackLowDwords,
    UnpackLowQwords,
    PermuteTwoTables,
    Extract128,
    ZeroUpper,
}

fn operation(mnemonic: Mnemonic) -> Option<Operation> {
    Some(match mnemonic {
        Mnemonic::Movdqu
        | Mnemonic::Vmovdqu
        | Mnemonic::Vmovdqu32
        | Mnemonic::Vmovdqu64
        | Mnemonic::Vmovdqu8
        | Mnemonic::Vmovdqu16 => Operation::Move,
        Mnemonic::Movdqa | Mnemonic::Vmovdqa | Mnemonic::Vmovdqa32 | Mnemonic::Vmovdqa64 => {
            Operation::MoveAligned
        }
        Mnemonic::Movd | Mnemonic::Vmovd => Operation::MoveDword,
        Mnemonic::Paddd | Mnemonic::Vpaddd => Operation::AddDwords,
        Mnemonic::Paddq | Mnemonic::Vpaddq => Operation::AddQwords,
        Mnemonic::Pxor | Mnemonic::Vpxor | Mnemonic::Vpxord | Mnemonic::Vpxorq => Operation::Xor,
        Mnemonic::Por | Mnemonic::Vpor | Mnemonic::Vpord | Mnemonic::Vporq => Operation::Or,
        Mnemonic::Pand | Mnemonic::Vpand | Mnemonic::Vpandd | Mnemonic::Vpandq => Operation::And,
        Mnemonic::Pshufd | Mnemonic::Vpshufd => Operation::ShuffleDwords,
        Mnemonic::Pshufb | Mnemonic::Vpshufb => Operation::ShuffleBytes,
        Mnemonic::Psrld | Mnemonic::Vpsrld => Operation::ShiftRightDwords,
        Mnemonic::Pslld | Mnemonic::Vpslld => Operation::ShiftLeftDwords,
        Mnemonic::Vprord => Operation::RotateRightDwords,
        Mnemonic::Punpckldq | Mnemonic::Vpunpckldq => Operation::UnpackLowDwords,
        Mnemonic::Punpcklqdq | Mnemonic::Vpunpcklqdq => Operation::UnpackLowQwords,
        Mnemonic::Vpermi2d => Operation::PermuteTwoTables,
        Mnemonic::Vextracti128 => Operation::Extract128,
        Mnemonic::Vzeroupper => Operation::ZeroUpper,
        _ => return None,
    })
}

/// Whether `Op::complete_simd` knows `mnemonic`.
pub(super) fn is_simd(mnemonic: Mnemonic) -> bool {
    operation(mnemonic).is_some()
}

/// One vector value, up to 256 bits.
type Vector = [u8; 32];

fn dword(v: &Vector, i: usize) -> u32 {
    u32::from_le_bytes([v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]])
}

fn set_dword(v: &mut Vector, i: usize, value: u32) {
    v[4 * i..4 * i + 4].copy_from_slice(&value.to_le_bytes());
}

fn qword(v: &Vector, i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[8 * i..8 * i + 8]);
    u64::from_le_bytes(b)
}

fn set_qword(v: &mut Vector, i: usize, value: u64) {
    v[8 * i..8 * i + 8].copy_from_slice(&value.to_le_bytes());
}

/// Where the register file lives in the image.
struct Layout {
    ymm_high: usize,
    zmm_high: Option<usize>,
}

impl Op<'_> {
    pub(super) fn complete_simd(
        &mut self,
        ext: &mut dyn ExtendedState,
    ) -> Result<Kind, CompleteError> {
        let instr = self.instr;
        let mnemonic = instr.mnemonic();
        let unsupported = CompleteError::Unsupported { mnemonic };
        let operation = operation(mnemonic).ok_or(unsupported)?;
        let cr0 = self.cpu.sregs.cr0;
        if cr0 & CR0_EM != 0 || self.cpu.sregs.cr4 & CR4_OSFXSR == 0 {
            return Err(self.fault(Exception::UD, "SSE is off (CR0.EM or CR4.OSFXSR)"));
        }
        if cr0 & CR0_TS != 0 {
            return Err(self.fault(Exception::NM, "CR0.TS is set"));
        }
        let vex = matches!(instr.encoding(), EncodingKind::VEX | EncodingKind::EVEX);
        if instr.op_mask() != Register::None || instr.is_broadcast() {
            return Err(unsupported);
        }
        let layout = Layout {
            ymm_high: ext
                .component(2)
                .filter(|c| c.size >= 256)
                .map(|c| c.offset as usize)
                .ok_or(CompleteError::State("no AVX component in the XSAVE image"))?,
            zmm_high: ext
                .component(6)
                .filter(|c| c.size >= 512)
                .map(|c| c.offset as usize),
        };
        if layout.ymm_high + 256 > xsave_image(ext)?.len()
            || layout.zmm_high.is_some_and(|o| o + 512 > 4096)
        {
            return Err(CompleteError::State(
                "a state component outside the XSAVE image",
            ));
        }
        if operation == Operation::ZeroUpper {
            let area = xsave_image(ext)?;
            area[layout.ymm_high..layout.ymm_high + 256].fill(0);
            if let Some(zmm) = layout.zmm_high.filter(|&o| o + 512 <= area.len()) {
                area[zmm..zmm + 512].fill(0);
            }
            ext.xsave_changed();
            return Ok(Kind::Avx);
        }

        // Operand 0 is the destination; the vector sources follow it, the immediate last.
        let width = self
            .vector_width(0)
            .or_else(|| self.vector_width(1))
            .ok_or(unsupported)?;
        let immediate = (0..instr.op_count())
            .find(|&i| instr.op_kind(i) == OpKind::Immediate8)
            .map(|_| instr.immediate8());
        let mut sources = [[0u8; 32]; 2];
        let mut source_count = 0;
        for index in 1..instr.op_count() {
            if instr.op_kind(index) == OpKind::Immediate8 {
                continue;
            }
            if source_count == sources.len() {
                return Err(unsupported);
            }
            sources[source_count] = self.read_vector(index, &layout, ext, operation)?;
            source_count += 1;
        }
        // Legacy SSE arithmetic is two-operand: the destination is also the first source.
        // VPERMI2D reads its indexes from the destination.
        let reads_destination = operation == Operation::PermuteTwoTables
            || (!vex
                && !matches!(
                    operation,
                    Operation::Move
                        | Operation::MoveAligned
                        | Operation::MoveDword
                        | Operation::ShuffleDwords
                ));
        let (a, b) = if reads_destination {
            (self.read_vector(0, &layout, ext, operation)?, sources[0])
        } else {
            (sources[0], sources[1])
        };
        let lanes32 = width / 4;
        let mut result: Vector = [0u8; 32];
        match operation {
            Operation::Move | Operation::MoveAligned => result = a,
            Operation::MoveDword => result[..4].copy_from_slice(&a[..4]),
            Operation::AddDwords => {
                for i in 0..lanes32 {
                    set_dword(&mut result, i, dword(&a, i).wrapping_add(dword(&b, i)));
                }
            }
            Operation::AddQwords => {
                for i in 0..width / 8 {
                    set_qword(&mut result, i, qword(&a, i).wrapping_add(qword(&b, i)));
                }
            }
            Operation::Xor | Operation::Or | Operation::And => {
                for i in 0..width {
                    result[i] = match operation {
                        Operation::Xor => a[i] ^ b[i],
                        Operation::Or => a[i] | b[i],
                        _ => a[i] & b[i],
                    };
                }
            }
            Operation::ShuffleDwords => {
                let order = immediate.ok_or(unsupported)?;
                let source = a;
                for lane in 0..width / 16 {
                    for i in 0..4 {
                        let from = usize::from(order >> (2 * i) & 3);
                        set_dword(&mut result, lane * 4 + i, dword(&source, lane * 4 + from));
                    }
                }
            }
            Operation::ShuffleBytes => {
                for lane in 0..width / 16 {
                    for i in 0..16 {
                        let control = b[lane * 16 + i];
                        result[lane * 16 + i] = if control & 0x80 != 0 {
                            0
                        } else {
                            a[lane * 16 + usize::from(control & 15)]
                        };
                    }
                }
            }
            Operation::ShiftRightDwords
            | Operation::ShiftLeftDwords
            | Operation::RotateRightDwords => {
                let shift = u32::from(immediate.ok_or(unsupported)?);
                let value = a;
                for i in 0..lanes32 {
                    let x = dword(&value, i);
                    let y = match operation {
                        Operation::ShiftRightDwords => x.checked_shr(shift).unwrap_or(0),
                        Operation::ShiftLeftDwords => x.checked_shl(shift).unwrap_or(0),
                        _ => x.rotate_right(shift % 32),
                    };
                    set_dword(&mut result, i, y);
                }
            }
            Operation::UnpackLowDwords => {
                for lane in 0..width / 16 {
                    let base = lane * 4;
                    set_dword(&mut result, base, dword(&a, base));
                    set_dword(&mut result, base + 1, dword(&b, base));
                    set_dword(&mut result, base + 2, dword(&a, base + 1));
                    set_dword(&mut result, base + 3, dword(&b, base + 1));
                }
            }
            Operation::UnpackLowQwords => {
                for lane in 0..width / 16 {
                    set_qword(&mut result, lane * 2, qword(&a, lane * 2));
                    set_qword(&mut result, lane * 2 + 1, qword(&b, lane * 2));
                }
            }
            Operation::PermuteTwoTables => {
                let (indexes, first, second) = (a, sources[0], sources[1]);
                for i in 0..lanes32 {
                    let pick = dword(&indexes, i) as usize & (2 * lanes32 - 1);
                    let value = if pick < lanes32 {
                        dword(&first, pick)
                    } else {
                        dword(&second, pick - lanes32)
                    };
                    set_dword(&mut result, i, value);
                }
            }
            Operation::Extract128 => {
                let lane = usize::from(immediate.ok_or(unsupported)? & 1);
                result[..16].copy_from_slice(&a[lane * 16..lane * 16 + 16]);
            }
            Operation::ZeroUpper => {}
        }
        let out_width = match operation {
            Operation::Extract128 => 16,
            Operation::MoveDword => 16,
            _ => width,
        };
        self.write_vector(0, &result, out_width, vex, &layout, ext, operation)?;
        Ok(if vex { Kind::Avx } else { Kind::Sse })
    }

    /// 16 or 32 bytes for an XMM/YMM register or a memory operand of that size.
    fn vector_width(&self, index: u32) -> Option<usize> {
        match self.instr.op_kind(index) {
            OpKind::Register => {
                let reg = self.instr.op_register(index);
                if reg.is_xmm() {
                    Some(16)
                } else if reg.is_ymm() {
                    Some(32)
                } else {
                    None
                }
            }
            OpKind::Memory => match self.instr.memory_size().size() {
                16 => Some(16),
                32 => Some(32),
                _ => None,
            },
            _ => None,
        }
    }

    fn read_vector(
        &self,
        index: u32,
        layout: &Layout,
        ext: &mut dyn ExtendedState,
        operation: Operation,
    ) -> Result<Vector, CompleteError> {
        let unsupported = CompleteError::Unsupported {
            mnemonic: self.instr.mnemonic(),
        };
        let mut value: Vector = [0u8; 32];
        match self.instr.op_kind(index) {
            OpKind::Register => {
                let reg = self.instr.op_register(index);
                if reg.is_gpr32() || reg.is_gpr64() {
                    let v = self.read_gpr(reg).ok_or(unsupported)?;
                    value[..8].copy_from_slice(&v.to_le_bytes());
                    return Ok(value);
                }
                if !(reg.is_xmm() || reg.is_ymm()) || reg.number() >= 16 {
                    return Err(unsupported);
                }
                let n = reg.number();
                let area = xsave_image(ext)?;
                let bv = read_u64(area, XSAVE_HEADER);
                if bv & SSE != 0 {
                    let at = XSAVE_XMM_START + 16 * n;
                    value[..16].copy_from_slice(&area[at..at + 16]);
                }
                if reg.is_ymm() && bv & YMM != 0 {
                    let at = layout.ymm_high + 16 * n;
                    value[16..].copy_from_slice(&area[at..at + 16]);
                }
            }
            OpKind::Memory => {
                let size = match operation {
                    Operation::MoveDword => 4,
                    _ => self.instr.memory_size().size(),
                };
                if !matches!(size, 4 | 8 | 16 | 32) {
                    return Err(unsupported);
                }
                let linear = self.memory_operand()?;
                if operation == Operation::MoveAligned {
                    self.require_alignment(linear, size as u64)?;
                } else if !self.vex_or_evex() && size == 16 && !matches!(operation, Operation::Move)
                {
                    // Legacy SSE memory operands must be 16-byte aligned (MOVDQU excepted).
                    self.require_alignment(linear, 16)?;
                }
                self.memory.read(linear, &mut value[..size])?;
            }
            _ => return Err(unsupported),
        }
        Ok(value)
    }

    fn vex_or_evex(&self) -> bool {
        matches!(
            self.instr.encoding(),
            EncodingKind::VEX | EncodingKind::EVEX
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn write_vector(
        &mut self,
        index: u32,
        value: &Vector,
        width: usize,
        vex: bool,
        layout: &Layout,
        ext: &mut dyn ExtendedState,
        operation: Operation,
    ) -> Result<(), CompleteError> {
        let unsupported = CompleteError::Unsupported {
            mnemonic: self.instr.mnemonic(),
        };
        match self.instr.op_kind(index) {
            OpKind::Register => {
                let reg = self.instr.op_register(index);
                if reg.is_gpr32() || reg.is_gpr64() {
                    // MOVD r32, xmm: the low dword, zero-extended.
                    return self.write_gpr(reg, u64::from(dword(value, 0)));
                }
                if !(reg.is_xmm() || reg.is_ymm()) || reg.number() >= 16 {
                    return Err(unsupported);
                }
                let n = reg.number();
                let area = xsave_image(ext)?;
                let mut bv = read_u64(area, XSAVE_HEADER);
                if bv & SSE == 0 {
                    area[XSAVE_XMM_START..XSAVE_XMM_START + 256].fill(0);
                    bv |= SSE;
                }
                let at = XSAVE_XMM_START + 16 * n;
                area[at..at + 16].copy_from_slice(&value[..16]);
                let high = layout.ymm_high + 16 * n;
                if width == 32 || vex {
                    if bv & YMM == 0 {
                        area[layout.ymm_high..layout.ymm_high + 256].fill(0);
                        bv |= YMM;
                    }
                    let upper: [u8; 16] = if width == 32 {
                        value[16..].try_into().unwrap_or_default()
                    } else {
                        [0u8; 16]
                    };
                    area[high..high + 16].copy_from_slice(&upper);
                }
                if vex && bv & ZMM_HI256 != 0 {
                    if let Some(zmm) = layout.zmm_high {
                        area[zmm + 32 * n..zmm + 32 * n + 32].fill(0);
                    }
                }
                write_u64(area, XSAVE_HEADER, bv);
                ext.xsave_changed();
                Ok(())
            }
            OpKind::Memory => {
                let size = match operation {
                    Operation::MoveDword => 4,
                    _ => self.instr.memory_size().size().min(width),
                };
                let linear = self.memory_operand()?;
                if operation == Operation::MoveAligned {
                    self.require_alignment(linear, size as u64)?;
                }
                self.memory.write(linear, &value[..size])
            }
            _ => Err(unsupported),
        }
    }
}
