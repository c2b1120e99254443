//! ELF32/ELF64 little-endian executables: loadable segments and notes, read defensively.
//!
//! linux-loader's ELF loader handles only ELF64 and writes segments before a caller could
//! check where they land; the multiboot and PVH loaders need both classes and must refuse a
//! segment over the firmware area before writing anything, so this parser only describes.

use super::image::{zero_guest, Image};
use super::layout::GuestLayout;
use super::BootError;
use crate::memory::GuestMemory;

const MAGIC: &[u8; 4] = b"\x7fELF";
const CLASS_32: u8 = 1;
const CLASS_64: u8 = 2;
const DATA_LSB: u8 = 1;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// More program headers than any real kernel has; bounds the work a corrupt file causes.
const MAX_PHDRS: u16 = 512;
const MAX_NOTE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub paddr: u64,
    pub vaddr: u64,
}

#[derive(Debug)]
pub struct ElfFile {
    pub entry: u64,
    pub loads: Vec<Segment>,
    notes: Vec<Segment>,
}

pub fn is_elf(prefix: &[u8]) -> bool {
    prefix.starts_with(MAGIC)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

impl ElfFile {
    pub fn parse(image: &mut Image) -> Result<ElfFile, BootError> {
        let mut ident = [0u8; 16];
        image.read_at(0, &mut ident)?;
        if &ident[..4] != MAGIC {
            return Err(image.corrupt("no ELF magic"));
        }
        if ident[5] != DATA_LSB {
            return Err(image.corrupt("big-endian ELF file"));
        }
        let is64 = match ident[4] {
            CLASS_32 => false,
            CLASS_64 => true,
            class => return Err(image.corrupt(format!("unknown ELF class {class}"))),
        };
        let mut ehdr = [0u8; 64];
        let ehdr = &mut ehdr[..if is64 { 64 } else { 52 }];
        image.read_at(0, ehdr)?;
        let (entry, phoff, phentsize, phnum, phdr_size) = if is64 {
            (
                u64_at(ehdr, 24),
                u64_at(ehdr, 32),
                u16_at(ehdr, 54),
                u16_at(ehdr, 56),
                56,
            )
        } else {
            (
                u32_at(ehdr, 24) as u64,
                u32_at(ehdr, 28) as u64,
                u16_at(ehdr, 42),
                u16_at(ehdr, 44),
                32,
            )
        };
        if phnum == 0 {
            return Err(image.corrupt("ELF file has no program headers"));
        }
        if phnum > MAX_PHDRS {
            return Err(image.corrupt(format!("{phnum} ELF program headers")));
        }
        if (phentsize as usize) < phdr_size {
            return Err(image.corrupt(format!("ELF program header size {phentsize}")));
        }
        let mut table = vec![0u8; phentsize as usize * phnum as usize];
        image.read_at(phoff, &mut table)?;

        let mut elf = ElfFile {
            entry,
            loads: Vec::new(),
            notes: Vec::new(),
        };
        for (index, ph) in table.chunks_exact(phentsize as usize).enumerate() {
            let p_type = u32_at(ph, 0);
            let seg = if is64 {
                Segment {
                    offset: u64_at(ph, 8),
                    vaddr: u64_at(ph, 16),
                    paddr: u64_at(ph, 24),
                    filesz: u64_at(ph, 32),
                    memsz: u64_at(ph, 40),
                }
            } else {
                Segment {
                    offset: u32_at(ph, 4) as u64,
                    vaddr: u32_at(ph, 8) as u64,
                    paddr: u32_at(ph, 12) as u64,
                    filesz: u32_at(ph, 16) as u64,
                    memsz: u32_at(ph, 20) as u64,
                }
            };
            if seg
                .offset
                .checked_add(seg.filesz)
                .is_none_or(|end| end > image.size)
            {
                return Err(image.corrupt(format!(
                    "ELF program header {index} points past the end of the file"
                )));
            }
            match p_type {
                PT_LOAD => {
                    if seg.filesz > seg.memsz {
                        return Err(image.corrupt(format!(
                            "ELF program header {index} has file size {:#x} above memory size {:#x}",
                            seg.filesz, seg.memsz
                        )));
                    }
                    if seg.memsz > 0 {
                        elf.loads.push(seg);
                    }
                }
                PT_NOTE => elf.notes.push(seg),
                _ => {}
            }
        }
        if elf.loads.is_empty() {
            return Err(image.corrupt("ELF file has no loadable segments"));
        }
        Ok(elf)
    }

    /// The descriptor of the first note named `name` (without its NUL) of type `n_type`.
    pub fn find_note(
        &self,
        image: &mut Image,
        name: &[u8],
        n_type: u32,
    ) -> Result<Option<Vec<u8>>, BootError> {
        for seg in &self.notes {
            if seg.filesz > MAX_NOTE_BYTES {
                return Err(image.corrupt("ELF note segment too large"));
            }
            let mut notes = vec![0u8; seg.filesz as usize];
            image.read_at(seg.offset, &mut notes)?;
            let mut at = 0usize;
            while notes.len().saturating_sub(at) >= 12 {
                let namesz = u32_at(&notes, at) as usize;
                let descsz = u32_at(&notes, at + 4) as usize;
                let ty = u32_at(&notes, at + 8);
                let name_at = at + 12;
                let desc_at = name_at.saturating_add(namesz.saturating_add(3) & !3);
                let next = desc_at.saturating_add(descsz.saturating_add(3) & !3);
                if desc_at.saturating_add(descsz) > notes.len() {
                    return Err(image.corrupt("ELF note runs past its segment"));
                }
                let note_name = &notes[name_at..name_at + namesz];
                let note_name = note_name.strip_suffix(&[0]).unwrap_or(note_name);
                if ty == n_type && note_name == name {
                    return Ok(Some(notes[desc_at..desc_at + descsz].to_vec()));
                }
                at = next;
            }
        }
        Ok(None)
    }

    /// The 32-bit physical entry of the PVH boot protocol (Xen note PHYS32_ENTRY), if any.
    pub fn pvh_entry(&self, image: &mut Image) -> Result<Option<u64>, BootError> {
        let Some(desc) = self.find_note(image, b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)? else {
            return Ok(None);
        };
        let entry = match desc.len() {
            4 => u32_at(&desc, 0) as u64,
            8 => u64_at(&desc, 0),
            len => {
                return Err(image.corrupt(format!("PVH entry note of {len} bytes")));
            }
        };
        if entry > u32::MAX as u64 {
            return Err(image.corrupt(format!("PVH entry {entry:#x} is above 4 GiB")));
        }
        Ok(Some(entry))
    }

    /// Claims, copies and zero-fills every loadable segment at its physical address; returns
    /// the end of the highest one.
    pub fn load_segments(
        &self,
        mem: &GuestMemory,
        layout: &mut GuestLayout,
        image: &mut Image,
    ) -> Result<u64, BootError> {
        for seg in &self.loads {
            layout.claim("kernel segment", seg.paddr, seg.memsz)?;
        }
        let mut end = 0;
        for seg in &self.loads {
            image.copy_to_guest(mem, seg.offset, seg.filesz, seg.paddr)?;
            zero_guest(
                mem,
                "kernel segment",
                seg.paddr + seg.filesz,
                seg.memsz - seg.filesz,
            )?;
            end = end.max(seg.paddr + seg.memsz);
        }
        Ok(end)
    }

    /// `e_entry` as a physical address: translated through the segment whose virtual range
    /// holds it, for kernels linked at virtual addresses other than their load addresses.
    pub fn physical_entry(&self) -> u64 {
        self.loads
            .iter()
            .find(|s| self.entry >= s.vaddr && self.entry - s.vaddr < s.memsz && s.vaddr != s.paddr)
            .map_or(self.entry, |s| s.paddr + (self.entry - s.vaddr))
    }
}
