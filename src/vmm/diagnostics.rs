//! What the VMM prints when a guest does something it cannot handle: the exit, the registers,
//! the instruction bytes at RIP, the CPU mode and the last serial output.

use std::fmt::Write;

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::regs::CpuMode;
use crate::hv::Vcpu;
use crate::memory::GuestMemory;

/// How many instruction bytes to show at RIP (the longest x86 instruction is 15 bytes).
const INSTRUCTION_BYTES: usize = 15;
/// How much of the serial tail to show.
const SERIAL_TAIL_BYTES: usize = 1024;

pub fn report(vcpu: &mut dyn Vcpu, memory: &GuestMemory, what: &str, serial: &[u8]) -> String {
    let mut out = format!("vCPU {}: {what}", vcpu.id());
    match (vcpu.regs(), vcpu.sregs()) {
        (Ok(regs), Ok(sregs)) => {
            let linear = sregs.cs.base.wrapping_add(regs.rip);
            let _ = write!(
                out,
                "\n  RIP {:#x} (CS {:#x} base {:#x}), {}, CPL {}, RFLAGS {:#x}",
                regs.rip,
                sregs.cs.selector,
                sregs.cs.base,
                sregs.mode(),
                sregs.cpl(),
                regs.rflags
            );
            let _ = write!(
                out,
                "\n  CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}",
                sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer
            );
            let _ = write!(
                out,
                "\n  RAX {:#x} RBX {:#x} RCX {:#x} RDX {:#x} RSI {:#x} RDI {:#x} RSP {:#x} RBP {:#x}",
                regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rsp, regs.rbp
            );
            let bytes = instruction_bytes(vcpu, memory, linear);
            out.push_str("\n  instruction bytes at RIP: ");
            out.push_str(&bytes.text);
            if !bytes.raw.is_empty() {
                let bitness = match sregs.mode() {
                    CpuMode::Long64 => 64,
                    CpuMode::Real | CpuMode::Protected16 => 16,
                    CpuMode::Protected32 | CpuMode::Compat32 => 32,
                };
                let _ = write!(out, " ({})", disassemble(&bytes.raw, bitness, regs.rip));
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            let _ = write!(out, "\n  (registers unavailable: {e})");
        }
    }
    if !serial.is_empty() {
        let tail = &serial[serial.len().saturating_sub(SERIAL_TAIL_BYTES)..];
        out.push_str("\n  last serial output:\n");
        for line in String::from_utf8_lossy(tail).lines() {
            let _ = writeln!(out, "  | {line}");
        }
        if out.ends_with('\n') {
            out.pop();
        }
    }
    out
}

struct InstructionBytes {
    raw: Vec<u8>,
    text: String,
}

fn instruction_bytes(vcpu: &dyn Vcpu, memory: &GuestMemory, linear: u64) -> InstructionBytes {
    let gpa = match vcpu.translate(linear) {
        Ok(Some(gpa)) => gpa,
        Ok(None) => {
            return InstructionBytes {
                raw: Vec::new(),
                text: format!("(linear address {linear:#x} is not mapped)"),
            }
        }
        Err(_) => linear,
    };
    // Byte by byte, so that an instruction at the end of RAM still shows what exists.
    let raw: Vec<u8> = (0..INSTRUCTION_BYTES as u64)
        .map_while(|i| {
            memory
                .read_obj::<u8>(GuestAddress(gpa.wrapping_add(i)))
                .ok()
        })
        .collect();
    let text = if raw.is_empty() {
        format!("(guest-physical {gpa:#x} is outside RAM)")
    } else {
        raw.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    InstructionBytes { raw, text }
}

/// The first instruction in `bytes`, in Intel syntax, or why it does not decode.
fn disassemble(bytes: &[u8], bitness: u32, rip: u64) -> String {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return "not a valid instruction".into();
    }
    let mut text = String::new();
    IntelFormatter::new().format(&instruction, &mut text);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disassembles_what_this_host_cannot_emulate() {
        assert_eq!(disassemble(&[0xcc, 0x90], 64, 0x1000), "int3");
        assert_eq!(
            disassemble(&[0x48, 0x0f, 0xae, 0x2f], 64, 0),
            "xrstor64 [rdi]"
        );
        assert_eq!(disassemble(&[0xee], 32, 0), "out dx,al");
        assert_eq!(disassemble(&[0x0f], 64, 0), "not a valid instruction");
    }
}
