//! The instruction completer (`xhyve::arch::x86_64::emulate::complete`, its SIMD subset
//! included) on fuzzed registers,
//! segment and control registers, descriptor tables, XSAVE image and guest RAM, with the
//! instruction bytes at CS:RIP taken from the input (often one of the opcodes it completes).
//!
//! Invariants checked beyond "no panic":
//! - on Err nothing changed: registers, guest RAM and the XSAVE image (not marked changed);
//! - on Ok, an instruction that does not transfer control (everything but int3/int n/into)
//!   advanced RIP by iced-x86's own decoded length;
//! - on Ok every change to guest RAM lies inside the RAM (the model cannot grow) and the
//!   image stays 4096 bytes.
#![no_main]

use std::cell::RefCell;

use iced_x86::{Decoder, DecoderOptions};
use libfuzzer_sys::fuzz_target;
use xhyve::arch::x86_64::emulate::complete::{
    complete, decode_mode, CompleteError, Component, Cpu, ExtendedState, Kind,
};
use xhyve::arch::x86_64::emulate::{CpuMode, GuestRam};
use xhyve::hv::regs::{DescriptorTable, SegmentRegister};

const RAM_BYTES: usize = 64 * 1024;

struct Ram(RefCell<Vec<u8>>);

impl GuestRam for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let ram = self.0.borrow();
        let Ok(start) = usize::try_from(gpa) else {
            return false;
        };
        match start
            .checked_add(buf.len())
            .and_then(|end| ram.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        let mut ram = self.0.borrow_mut();
        let Ok(start) = usize::try_from(gpa) else {
            return false;
        };
        match start
            .checked_add(buf.len())
            .and_then(|end| ram.get_mut(start..end))
        {
            Some(dst) => {
                dst.copy_from_slice(buf);
                true
            }
            None => false,
        }
    }
}

struct Ext {
    area: Vec<u8>,
    xcr0: u64,
    xss: u64,
    changed: bool,
    refuse_xcr0: bool,
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
        if self.refuse_xcr0 {
            return Err(CompleteError::State("refused"));
        }
        self.xcr0 = value;
        Ok(())
    }
    fn xss(&mut self) -> Result<u64, CompleteError> {
        Ok(self.xss)
    }
    fn component(&self, index: u32) -> Option<Component> {
        // A layout like a real host's, plus one that overflows the image.
        match index {
            2 => Some(Component { offset: 576, size: 256, align64: false }),
            5 => Some(Component { offset: 1088, size: 64, align64: true }),
            6 => Some(Component { offset: 1152, size: 512, align64: true }),
            7 => Some(Component { offset: 1664, size: 1024, align64: false }),
            9 => Some(Component { offset: 4000, size: 256, align64: false }),
            _ => None,
        }
    }
}

/// Reads fuzz input as a little-endian stream; zeros once exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let n = self.0.len().min(8);
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_le_bytes(b)
    }
    fn u8(&mut self) -> u8 {
        self.u64() as u8
    }
    /// Small addresses inside the RAM most of the time, anything otherwise.
    fn address(&mut self) -> u64 {
        let v = self.u64();
        if v & 7 != 0 {
            (v >> 3) % RAM_BYTES as u64
        } else {
            v
        }
    }
    fn segment(&mut self) -> SegmentRegister {
        let bits = self.u64();
        SegmentRegister {
            base: if bits & 1 != 0 { self.address() } else { 0 },
            limit: if bits & 2 != 0 { 0xffff_ffff } else { 0xffff },
            selector: (bits >> 8) as u16,
            type_: (bits >> 24) as u8 & 0xf,
            present: bits & 4 != 0,
            dpl: (bits >> 28) as u8 & 3,
            db: bits & 8 != 0,
            s: bits & 16 != 0,
            l: bits & 32 != 0,
            g: bits & 64 != 0,
            avl: false,
            unusable: bits & 128 != 0,
        }
    }
}

const OPENERS: [&[u8]; 18] = [
    &[0xcc],
    &[0xcd],
    &[0xce],
    &[0x0f, 0xae],
    &[0x48, 0x0f, 0xae],
    &[0x0f, 0xc7],
    &[0x48, 0x0f, 0xc7],
    &[0xf3, 0x0f, 0xb8],
    &[0xf3, 0x0f, 0xbc],
    &[0xf3, 0x0f, 0xbd],
    &[0x9b],
    &[0x0f, 0x01],
    &[0x0f, 0xc7],
    &[0xc5, 0xf8, 0xae],
    &[0xc5, 0xf9, 0xfe],
    &[0x62, 0xf1, 0x75, 0x08, 0x72],
    &[0x66, 0x0f, 0x38, 0x00],
    &[0x62, 0xf2, 0x4d, 0x28, 0x76],
];

fuzz_target!(|data: &[u8]| {
    let (head, rest) = data.split_at(data.len().min(4096));
    let mut input = Input(head);
    let mut cpu = Cpu::default();
    let regs = &mut cpu.regs;
    for r in [
        &mut regs.rax, &mut regs.rbx, &mut regs.rcx, &mut regs.rdx, &mut regs.rsi,
        &mut regs.rdi, &mut regs.rsp, &mut regs.rbp, &mut regs.r8, &mut regs.r15,
    ] {
        *r = input.address();
    }
    regs.rip = input.address();
    regs.rflags = input.u64() & 0x3f_7fd5 | 2;
    let s = &mut cpu.sregs;
    s.cs = input.segment();
    s.ss = input.segment();
    s.ds = input.segment();
    s.es = input.segment();
    s.fs = input.segment();
    s.gs = input.segment();
    s.tr = input.segment();
    s.ldt = input.segment();
    s.gdt = DescriptorTable { base: input.address(), limit: input.u64() as u16 };
    s.idt = DescriptorTable { base: input.address(), limit: input.u64() as u16 };
    let control = input.u64();
    s.cr0 = control & 0x8001_000f; // PE, MP, EM, TS, WP, PG
    s.cr4 = control >> 8 & 0x34_1030; // PSE, PAE, LA57, OSXSAVE, SMEP, SMAP
    s.efer = if control & 1 << 40 != 0 { 0x500 } else { 0 } | if control & 1 << 41 != 0 { 0x800 } else { 0 }; // LME+LMA, NXE
    s.cr3 = input.address() & !0xfff;
    let opener = OPENERS[usize::from(input.u8()) % OPENERS.len()];
    let use_opener = input.u8() & 3 != 0;

    let mut ram = vec![0u8; RAM_BYTES];
    for (i, b) in rest.iter().enumerate() {
        ram[i * 7 % RAM_BYTES] ^= *b;
    }
    let mut ext = Ext {
        area: vec![0u8; 4096],
        xcr0: input.u64() & 0x2ff | 1,
        xss: input.u64() & 0x1_0000,
        changed: false,
        refuse_xcr0: input.u8() & 1 != 0,
    };
    for (i, b) in head.iter().enumerate() {
        ext.area[(i * 13) % 4096] ^= *b;
    }
    // Instruction bytes at CS:RIP (when that is inside the RAM and paging is off).
    let linear = cpu.sregs.cs.base.wrapping_add(cpu.regs.rip) & 0xffff_ffff;
    let mut bytes = [0u8; 15];
    for b in &mut bytes {
        *b = input.u8();
    }
    if use_opener {
        bytes[..opener.len()].copy_from_slice(opener);
    }
    if let Ok(at) = usize::try_from(linear) {
        if at + 15 <= RAM_BYTES {
            ram[at..at + 15].copy_from_slice(&bytes);
        }
    }

    let ram = Ram(RefCell::new(ram));
    let ram_before = ram.0.borrow().clone();
    let before = cpu;
    let result = complete(&mut cpu, &ram, &mut ext);
    assert_eq!(ext.area.len(), 4096);
    assert_eq!(ram.0.borrow().len(), RAM_BYTES);
    match result {
        Err(_) => {
            assert_eq!(cpu, before, "a refused instruction changed registers");
            assert!(*ram.0.borrow() == ram_before, "a refused instruction wrote guest RAM");
            assert!(!ext.changed, "a refused instruction marked the XSAVE image changed");
        }
        Ok(kind) => {
            if !matches!(kind, Kind::Int3 | Kind::IntN | Kind::Into) {
                let mode = decode_mode(&before).expect("completed in a decodable mode");
                let bitness = match mode {
                    CpuMode::Real | CpuMode::Protected16 => 16,
                    CpuMode::Protected32 => 32,
                    CpuMode::Long64 => 64,
                };
                // The fetch may have gone through page tables; decode what was executed
                // only when paging is off (then it is the bytes placed above).
                if before.sregs.cr0 & 0x8000_0000 == 0 && usize::try_from(linear).is_ok_and(|a| a + 15 <= RAM_BYTES) {
                    let mut decoder = Decoder::with_ip(bitness, &bytes, before.regs.rip, DecoderOptions::NONE);
                    let len = decoder.decode().len() as u64;
                    let mask = match bitness { 16 => 0xffff, 32 => 0xffff_ffff, _ => u64::MAX };
                    assert_eq!(cpu.regs.rip, before.regs.rip.wrapping_add(len) & mask);
                }
            }
        }
    }
});
