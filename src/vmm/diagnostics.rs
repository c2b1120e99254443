//! What the VMM prints when a guest does something it cannot handle: the exit, the registers,
//! the instruction bytes at RIP, the CPU mode and the last serial output.

use std::fmt::Write;

use vm_memory::{Bytes, GuestAddress};

use super::memory::GuestMemory;
use crate::hv::Vcpu;

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
            out.push_str("\n  instruction bytes at RIP: ");
            out.push_str(&instruction_bytes(vcpu, memory, linear));
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

fn instruction_bytes(vcpu: &dyn Vcpu, memory: &GuestMemory, linear: u64) -> String {
    let gpa = match vcpu.translate(linear) {
        Ok(Some(gpa)) => gpa,
        Ok(None) => return format!("(linear address {linear:#x} is not mapped)"),
        Err(_) => linear,
    };
    let mut bytes = [0u8; INSTRUCTION_BYTES];
    // Read byte by byte so an instruction at the end of RAM still shows what exists.
    let mut shown = Vec::with_capacity(INSTRUCTION_BYTES);
    for (i, b) in bytes.iter_mut().enumerate() {
        match memory.read_obj::<u8>(GuestAddress(gpa.wrapping_add(i as u64))) {
            Ok(v) => {
                *b = v;
                shown.push(format!("{v:02x}"));
            }
            Err(_) => break,
        }
    }
    if shown.is_empty() {
        format!("(guest-physical {gpa:#x} is outside RAM)")
    } else {
        shown.join(" ")
    }
}
