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
use crate::vmm::memory::{lowmem_size, GuestMemory};

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
