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

use crate::arch::x86_64::regs::{SpecialRegisters, StandardRegisters};
use crate::memory::GuestMemory;

pub use e820::{e820_map, E820Entry, E820Kind};

use image::Image;
use layout::GuestLayout;

/// `-f`: the guest loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// `-f kexec,KERNEL[,INITRD[,CMDLINE]]`: Linux bzImage or ELF vmlinux (PVH).
    Kexec {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// `-f multiboot,KERNEL[,MODULE[;CMDLINE][:MODULE[;CMDLINE]]...][,CMDLINE]` (HyperKit's syntax).
    Multiboot {
        kernel: PathBuf,
        modules: Vec<MultibootModule>,
        cmdline: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultibootModule {
    pub path: PathBuf,
    pub cmdline: String,
}

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

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use crate::memory::create_guest_memory;

    const MIB: u64 = 1 << 20;

    fn try_load(image: &[u8], multiboot_variant: bool) -> Result<BootSetup, BootError> {
        let kernel = TempFile::new("fuzz", image);
        let mem = create_guest_memory(16 * MIB).unwrap();
        let firmware = if multiboot_variant {
            multiboot(kernel.path(), &[], "x")
        } else {
            kexec(kernel.path(), None, "x")
        };
        load(&mem, &firmware, 16 * MIB, None)
    }

    fn samples() -> Vec<Vec<u8>> {
        let text = {
            let mut t = multiboot_header(0x3, None);
            t.extend([0xf4; 64]);
            t
        };
        let segment = [TestSegment {
            paddr: 0x10_0000,
            vaddr: 0x10_0000,
            data: &text,
            memsz: 0x2000,
        }];
        let pvh_note = [TestNote {
            name: b"Xen",
            n_type: 18,
            desc: &0x10_0000u32.to_le_bytes(),
        }];
        let mut aout = multiboot_header(1 << 16, Some([0x10_0000, 0x10_0000, 0, 0, 0x10_0000]));
        aout.resize(512, 0xf4);
        let bz = TestBzImage {
            init_size: 0x10_0000,
            ..TestBzImage::default()
        };
        vec![
            bz.build(),
            build_elf(true, 0x10_0000, &segment, &pvh_note),
            build_elf(false, 0x10_0000, &segment, &[]),
            build_elf(true, 0x10_0000, &segment, &[]),
            aout,
        ]
    }

    #[test]
    fn every_sample_format_loads() {
        for (i, image) in samples().iter().enumerate() {
            try_load(image, i >= 2).unwrap_or_else(|e| panic!("sample {i}: {e}"));
        }
    }

    #[test]
    fn truncated_and_mangled_images_fail_cleanly() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (i, image) in samples().iter().enumerate() {
            for cut in (0..image.len()).step_by(7) {
                let _ = try_load(&image[..cut], i >= 2);
            }
            for _ in 0..150 {
                let mut mangled = image.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % mangled.len().min(0x300) as u64) as usize;
                    mangled[at] = next() as u8;
                }
                let _ = try_load(&mangled, i >= 2);
                let _ = try_load(&mangled, i < 2);
            }
        }
    }

    #[test]
    fn unknown_file_and_missing_file_are_named() {
        let err = try_load(b"#!/bin/sh\necho hi\n", false).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        let err = try_load(&[], false).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        let mem = create_guest_memory(16 * MIB).unwrap();
        let missing = kexec(Path::new("/x/vmlinuz"), None, "");
        assert_eq!(
            load(&mem, &missing, 16 * MIB, None)
                .unwrap_err()
                .to_string(),
            "cannot open kernel \"/x/vmlinuz\": No such file or directory"
        );
        let kernel = TempFile::new("ok", &samples()[0]);
        let no_initrd = kexec(kernel.path(), Some(Path::new("/x/initrd")), "");
        assert_eq!(
            load(&mem, &no_initrd, 16 * MIB, None)
                .unwrap_err()
                .to_string(),
            "cannot open initrd \"/x/initrd\": No such file or directory"
        );
    }

    #[test]
    fn corrupt_elf_headers_are_reported_as_corrupt() {
        let good = build_elf(
            true,
            0x10_0000,
            &[TestSegment {
                paddr: 0x10_0000,
                vaddr: 0x10_0000,
                data: &[1; 8],
                memsz: 8,
            }],
            &[TestNote {
                name: b"Xen",
                n_type: 18,
                desc: &[0, 0, 0x10, 0],
            }],
        );
        let patch = |at: usize, bytes: &[u8]| {
            let mut image = good.clone();
            image[at..at + bytes.len()].copy_from_slice(bytes);
            image
        };
        let cases = [
            patch(5, &[2]),                            // big-endian
            patch(4, &[9]),                            // unknown class
            patch(56, &[0, 0]),                        // no program headers
            patch(56, &[0xff, 0xff]),                  // absurd count
            patch(54, &[8, 0]),                        // program header too small
            patch(32, &[0xff; 8]),                     // table past the end
            patch(64 + 32, &[0xff, 0xff, 0, 0]),       // segment past the end (filesz)
            patch(64 + 40, &[1, 0, 0, 0, 0, 0, 0, 0]), // filesz > memsz
            patch(64 + 56 + 32, &[0xff, 0, 0, 0]),     // note segment past the end
            patch(64 + 112 + 8, &[0xff, 0, 0, 0]),     // note name runs past its segment
        ];
        for (i, image) in cases.iter().enumerate() {
            let err = try_load(image, false).unwrap_err();
            assert!(matches!(err, BootError::Corrupt { .. }), "case {i}: {err}");
        }
    }
}
