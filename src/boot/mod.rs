//! Guest loaders (`-f kexec`, `-f multiboot`).
//!
//! `load` recognises the kernel file (a Linux bzImage, an ELF vmlinux with a PVH entry note or
//! a multiboot kernel), places it and its initrd/modules, command line and boot information in
//! guest RAM, and returns the boot vCPU's state: 32-bit flat protected mode, paging and
//! interrupts off, as every one of these protocols starts.

mod bzimage;
mod cpu;
mod e820;
mod elf;
mod image;
mod layout;
mod multiboot;
mod pvh;

use std::path::{Path, PathBuf};

use crate::cli::Firmware;
use crate::hv::regs::{SpecialRegisters, StandardRegisters};
use crate::vmm::memory::GuestMemory;

pub use e820::{e820_map, E820Entry, E820Kind};

use image::Image;
use layout::GuestLayout;

/// The boot vCPU's initial register state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSetup {
    pub regs: StandardRegisters,
    pub sregs: SpecialRegisters,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} \"{}\": {reason}", path.display())]
    Open {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot read {what} \"{}\": {reason}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("\"{}\" is not a bzImage, an ELF vmlinux or a multiboot kernel", path.display())]
    NotAKernel { path: PathBuf },
    #[error("kernel \"{}\" is an ELF file without a PVH entry note", path.display())]
    NoPvhEntry { path: PathBuf },
    #[error(
        "kernel \"{}\" uses Linux boot protocol {}.{:02}: 2.10 or later is required",
        path.display(), version >> 8, version & 0xff
    )]
    OldBootProtocol { path: PathBuf, version: u16 },
    #[error("kernel \"{}\" cannot be loaded above 1 MiB (LOADED_HIGH is not set)", path.display())]
    NotLoadedHigh { path: PathBuf },
    #[error("kernel command line is {len} bytes long: at most {max} fit")]
    CmdlineTooLong { len: usize, max: u64 },
    #[error("{what} \"{}\" is corrupt: {reason}", path.display())]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("multiboot kernel \"{}\" requires unsupported features (header flags {flags:#x})", path.display())]
    UnsupportedMultiboot { path: PathBuf, flags: u32 },
    #[error("{what} at {start:#x}-{end:#x} is outside guest RAM")]
    OutsideRam { what: String, start: u64, end: u64 },
    #[error("{what} at {start:#x}-{end:#x} overlaps {other} at {other_start:#x}")]
    Overlap {
        what: String,
        start: u64,
        end: u64,
        other: String,
        other_start: u64,
    },
    #[error("no room for {what} ({size} bytes) in guest RAM")]
    NoRoom { what: String, size: u64 },
    #[error("cannot write {what} to guest memory at {addr:#x}")]
    GuestWrite { what: String, addr: u64 },
}

/// Loads the guest named by `firmware` into `mem` (which holds `memory_bytes` of RAM with the
/// layout of vmm::memory) and returns the boot vCPU's initial state. `rsdp` is the ACPI RSDP's
/// guest address when `-A` built tables.
pub fn load(
    mem: &GuestMemory,
    firmware: &Firmware,
    memory_bytes: u64,
    rsdp: Option<u64>,
) -> Result<BootSetup, BootError> {
    let mut layout = GuestLayout::new(memory_bytes);
    match firmware {
        Firmware::Kexec {
            kernel,
            initrd,
            cmdline,
        } => {
            let mut image = Image::open(kernel, "kernel")?;
            let prefix = image.prefix()?;
            if bzimage::is_bzimage(&prefix) {
                let linux = bzimage::Linux {
                    initrd: initrd.as_deref(),
                    cmdline,
                    memory_bytes,
                    rsdp,
                };
                return bzimage::load(mem, &mut layout, &mut image, &prefix, &linux);
            }
            if elf::is_elf(&prefix) {
                let parsed = elf::ElfFile::parse(&mut image)?;
                if let Some(entry) = parsed.pvh_entry(&mut image)? {
                    let linux = pvh::Pvh {
                        entry,
                        initrd: initrd.as_deref(),
                        cmdline,
                        memory_bytes,
                        rsdp,
                    };
                    return pvh::load(mem, &mut layout, &mut image, &parsed, &linux);
                }
            }
            if let Some(header) = multiboot::find_header(&prefix) {
                let modules: Vec<(&Path, &str)> =
                    initrd.iter().map(|p| (p.as_path(), "")).collect();
                let boot = multiboot::Multiboot {
                    header,
                    modules: &modules,
                    cmdline,
                    memory_bytes,
                };
                return multiboot::load(mem, &mut layout, &mut image, &prefix, &boot);
            }
            if elf::is_elf(&prefix) {
                return Err(BootError::NoPvhEntry {
                    path: kernel.clone(),
                });
            }
            Err(BootError::NotAKernel {
                path: kernel.clone(),
            })
        }
        Firmware::Multiboot {
            kernel,
            modules,
            cmdline,
        } => {
            let mut image = Image::open(kernel, "kernel")?;
            let prefix = image.prefix()?;
            let header = multiboot::find_header(&prefix).ok_or_else(|| BootError::NotAKernel {
                path: kernel.clone(),
            })?;
            let modules: Vec<(&Path, &str)> = modules
                .iter()
                .map(|m| (m.path.as_path(), m.cmdline.as_str()))
                .collect();
            let boot = multiboot::Multiboot {
                header,
                modules: &modules,
                cmdline,
                memory_bytes,
            };
            multiboot::load(mem, &mut layout, &mut image, &prefix, &boot)
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util;
