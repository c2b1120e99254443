//! Linux ELF vmlinux through the PVH boot protocol (xen/include/public/arch-x86/hvm/start_info.h):
//! segments at their physical addresses, `hvm_start_info` in low memory, RIP = the PVH entry
//! from the kernel's Xen note, RBX = start_info, 32-bit flat protected mode, paging off.

use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::bzimage::{load_initrd, write_linux_cmdline};
use super::cpu::protected_mode_entry;
use super::e820::e820_map;
use super::elf::ElfFile;
use super::image::Image;
use super::layout::{GuestLayout, CMDLINE_AREA_END, PVH_START_INFO, PVH_START_INFO_SIZE};
use super::{BootError, BootSetup};
use crate::arch::x86_64::layout::lowmem_size;
use crate::memory::GuestMemory;

const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Version 1 adds the memory map.
const START_INFO_VERSION: u32 = 1;
const MODLIST_ADDR: u64 = PVH_START_INFO + 0x40;
const MEMMAP_ADDR: u64 = PVH_START_INFO + 0x80;

pub struct Pvh<'a> {
    pub entry: u64,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub memory_bytes: u64,
    pub rsdp: Option<u64>,
}

pub fn load(
    mem: &GuestMemory,
    layout: &mut GuestLayout,
    image: &mut Image,
    elf: &ElfFile,
    pvh: &Pvh,
) -> Result<BootSetup, BootError> {
    let mut setup = protected_mode_entry(mem, layout, pvh.entry)?;
    layout.claim("PVH start_info", PVH_START_INFO, PVH_START_INFO_SIZE)?;
    // The kernel copies at most COMMAND_LINE_SIZE bytes; the rest of the low area is the bound.
    let cmdline_addr = write_linux_cmdline(mem, layout, pvh.cmdline, CMDLINE_AREA_END)?;
    elf.load_segments(mem, layout, image)?;

    let mut modules = Vec::new();
    if let Some(initrd) = pvh.initrd {
        let (paddr, size) = load_initrd(mem, layout, initrd, lowmem_size(pvh.memory_bytes))?;
        if size > 0 {
            modules.push(hvm_modlist_entry {
                paddr,
                size,
                cmdline_paddr: 0,
                reserved: 0,
            });
        }
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(pvh.memory_bytes)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.code(),
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: START_INFO_MAGIC,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_ADDR },
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: pvh.rsdp.unwrap_or(0),
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|_| BootError::GuestWrite {
        what: "PVH start_info".to_string(),
        addr: PVH_START_INFO,
    })?;

    setup.regs.rbx = PVH_START_INFO;
    Ok(setup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::layout::CMDLINE_ADDR;
    use crate::arch::x86_64::boot::load as load_firmware;
    use crate::arch::x86_64::boot::test_util::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const KERNEL: u64 = 0x100_0000;

    fn vmlinux(note_desc: Option<&[u8]>) -> Vec<u8> {
        let text: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let notes: Vec<TestNote> = note_desc
            .into_iter()
            .map(|desc| TestNote {
                name: b"Xen",
                n_type: 18,
                desc,
            })
            .collect();
        let other_note = TestNote {
            name: b"GNU",
            n_type: 3,
            desc: &[1, 2, 3, 4, 5],
        };
        let mut all = vec![other_note];
        all.extend(notes);
        build_elf(
            true,
            0xffff_ffff_8100_0000,
            &[
                TestSegment {
                    paddr: KERNEL,
                    vaddr: 0xffff_ffff_8100_0000,
                    data: &text,
                    memsz: 0x3000,
                },
                TestSegment {
                    paddr: KERNEL + 0x10_0000,
                    vaddr: 0xffff_ffff_8110_0000,
                    data: &[0xaa; 16],
                    memsz: 16,
                },
            ],
            &all,
        )
    }

    #[test]
    fn vmlinux_boots_through_pvh_with_start_info() {
        let memory = 5 << 30;
        let kernel = TempFile::new("vmlinux", &vmlinux(Some(&(KERNEL + 0x123).to_le_bytes())));
        let initrd = TempFile::new("initrd", &[0x42; 7000]);
        let mem = create_guest_memory(memory).unwrap();
        // Stale bytes where the BSS goes must be cleared.
        mem.write_slice(&[0xff; 0x1000], GuestAddress(KERNEL + 0x2000))
            .unwrap();
        let firmware = kexec(kernel.path(), Some(initrd.path()), "console=hvc0");
        let setup = load_firmware(&mem, &firmware, memory, Some(0xf_2400)).unwrap();

        assert_eq!(setup.regs.rip, KERNEL + 0x123);
        assert_eq!(setup.regs.rbx, PVH_START_INFO);
        assert_eq!(setup.sregs.cr0 & 0x8000_0001, 1);
        assert_eq!(read_bytes(&mem, KERNEL, 4), vec![0, 1, 2, 3]);
        assert_eq!(
            read_bytes(&mem, KERNEL + 3000, 0x3000 - 3000),
            vec![0; 0x3000 - 3000]
        );
        assert_eq!(read_bytes(&mem, KERNEL + 0x10_0000, 16), vec![0xaa; 16]);

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.rsdp_paddr, 0xf_2400);
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(read_cstr(&mem, info.cmdline_paddr), "console=hvc0");
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 7000);
        assert_eq!(module.paddr, (3 << 30) - 0x2000);
        assert_eq!(read_bytes(&mem, module.paddr, 7000), vec![0x42; 7000]);

        let map = e820_map(memory);
        assert_eq!(info.memmap_entries as usize, map.len());
        for (i, want) in map.iter().enumerate() {
            let got: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(info.memmap_paddr + i as u64 * 24))
                .unwrap();
            assert_eq!(
                (got.addr, got.size, got.type_),
                (want.addr, want.size, want.kind.code())
            );
        }
        assert_eq!(map.last().unwrap().addr, 4 << 30);
    }

    #[test]
    fn four_byte_pvh_note_and_no_initrd() {
        let kernel = TempFile::new("vmlinux4", &vmlinux(Some(&0x100_0040u32.to_le_bytes())));
        let mem = create_guest_memory(64 * MIB).unwrap();
        let setup = load_firmware(&mem, &kexec(kernel.path(), None, ""), 64 * MIB, None).unwrap();
        assert_eq!(setup.regs.rip, 0x100_0040);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.rsdp_paddr),
            (0, 0, 0)
        );
        assert_eq!(read_cstr(&mem, info.cmdline_paddr), "auto");
    }

    #[test]
    fn elf_without_pvh_note_is_refused_by_name() {
        let kernel = TempFile::new("no-pvh", &vmlinux(None));
        let mem = create_guest_memory(64 * MIB).unwrap();
        let err = load_firmware(&mem, &kexec(kernel.path(), None, ""), 64 * MIB, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel \"{}\" is an ELF file without a PVH entry note",
                kernel.path().display()
            )
        );
    }

    #[test]
    fn segment_over_the_firmware_area_is_refused() {
        let image = build_elf(
            true,
            0xf_0000,
            &[TestSegment {
                paddr: 0xf_0000,
                vaddr: 0xf_0000,
                data: &[1; 64],
                memsz: 64,
            }],
            &[TestNote {
                name: b"Xen",
                n_type: 18,
                desc: &0xf_0000u32.to_le_bytes(),
            }],
        );
        let kernel = TempFile::new("fw-overlap", &image);
        let mem = create_guest_memory(64 * MIB).unwrap();
        let err = load_firmware(&mem, &kexec(kernel.path(), None, ""), 64 * MIB, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel segment at 0xf0000-0xf0040 is outside guest RAM"
        );
        // Nothing was written there.
        assert_eq!(read_u64(&mem, 0xf_0000), 0);
    }

    #[test]
    fn corrupt_pvh_notes_are_errors() {
        for desc in [&[1u8, 2][..], &[0, 0, 0, 0, 1, 0, 0, 0][..]] {
            let kernel = TempFile::new("bad-note", &vmlinux(Some(desc)));
            let mem = create_guest_memory(64 * MIB).unwrap();
            let err =
                load_firmware(&mem, &kexec(kernel.path(), None, ""), 64 * MIB, None).unwrap_err();
            assert!(matches!(err, BootError::Corrupt { .. }), "{err}");
        }
    }
}
