//! Linux bzImage through the 32-bit boot protocol (Documentation/arch/x86/boot.rst), as
//! xhyve's kexec.c does: protected-mode kernel in RAM, zero page, RIP = kernel, RSI = zero page.

use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, GuestAddress};

use super::cpu::protected_mode_entry;
use super::e820::{e820_map, HIGH_RAM_START};
use super::image::{write_guest, Image};
use super::layout::{
    align_up, GuestLayout, CMDLINE_ADDR, CMDLINE_AREA_END, ZERO_PAGE, ZERO_PAGE_SIZE,
};
use super::{BootError, BootSetup};
use crate::vmm::memory::{lowmem_size, GuestMemory};

const SETUP_HEADER_OFFSET: usize = 0x1f1;
const BOOT_FLAG_OFFSET: usize = 0x1fe;
const HEADER_MAGIC_OFFSET: usize = 0x202;
const BOOT_FLAG: u16 = 0xaa55;
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
const MIN_PROTOCOL: u16 = 0x020a;
/// Protocol that added `acpi_rsdp_addr` to the zero page.
const RSDP_PROTOCOL: u16 = 0x020e;
const LOADED_HIGH: u8 = 1 << 0;
/// "Undefined" boot loader ID: we are none of the registered ones.
const LOADER_ID_UNDEFINED: u8 = 0xff;
/// The kernel's default when it is not told the command line's size limit (protocol < 2.06).
const DEFAULT_CMDLINE_SIZE: u64 = 255;
/// xhyve's command line when none is given.
const EMPTY_CMDLINE: &str = "auto";

/// The Linux-specific parts of `-f kexec`.
pub struct Linux<'a> {
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub memory_bytes: u64,
    pub rsdp: Option<u64>,
}

pub fn is_bzimage(prefix: &[u8]) -> bool {
    prefix.len() >= HEADER_MAGIC_OFFSET + 4
        && prefix[BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2] == BOOT_FLAG.to_le_bytes()
        && &prefix[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4] == HEADER_MAGIC
}

/// The setup header as the image defines it: bytes past the header's own length (given by
/// the jump at 0x200) belong to the real-mode code, not to the header, so they stay zero.
fn read_setup_header(image: &Image, prefix: &[u8]) -> Result<setup_header, BootError> {
    let mut hdr = setup_header::default();
    let full = hdr.as_slice().len();
    let declared = (0x202 + prefix.get(0x201).copied().unwrap_or(0) as usize)
        .saturating_sub(SETUP_HEADER_OFFSET)
        .min(full);
    let available = prefix.len().saturating_sub(SETUP_HEADER_OFFSET);
    if available < declared {
        return Err(image.corrupt("truncated Linux setup header"));
    }
    hdr.as_mut_slice()[..declared]
        .copy_from_slice(&prefix[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + declared]);
    Ok(hdr)
}

/// Where the protected-mode kernel goes: its preferred address if relocatable and it fits,
/// else 1 MiB (rounded up to its alignment when relocatable), as xhyve does.
fn kernel_base(hdr: &setup_header, footprint: u64, lowmem_end: u64) -> u64 {
    let fits = |base: u64| base >= HIGH_RAM_START && base.saturating_add(footprint) <= lowmem_end;
    if hdr.relocatable_kernel != 0 {
        if fits(hdr.pref_address) {
            return hdr.pref_address;
        }
        let align = hdr.kernel_alignment as u64;
        if align.is_power_of_two() {
            if let Some(base) = align_up(HIGH_RAM_START, align).filter(|&b| fits(b)) {
                return base;
            }
        }
    }
    HIGH_RAM_START
}

/// Writes a Linux kernel's command line (bzImage or PVH) at `CMDLINE_ADDR` and returns that
/// address; `max` is the kernel's limit, without the terminating NUL.
pub fn write_linux_cmdline(
    mem: &GuestMemory,
    layout: &mut GuestLayout,
    cmdline: &str,
    max: u64,
) -> Result<u64, BootError> {
    let text = if cmdline.is_empty() {
        EMPTY_CMDLINE
    } else {
        cmdline
    };
    let max = max.min(CMDLINE_AREA_END - CMDLINE_ADDR - 1);
    if text.len() as u64 > max {
        return Err(BootError::CmdlineTooLong {
            len: text.len(),
            max,
        });
    }
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(0);
    layout.claim("kernel command line", CMDLINE_ADDR, bytes.len() as u64)?;
    write_guest(mem, "kernel command line", CMDLINE_ADDR, &bytes)?;
    Ok(CMDLINE_ADDR)
}

/// Places the initrd page-aligned as high as possible below `limit`; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemory,
    layout: &mut GuestLayout,
    path: &Path,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let mut initrd = Image::open(path, "initrd")?;
    let size = initrd.size;
    if size == 0 {
        return Ok((0, 0));
    }
    let what = format!("initrd \"{}\"", path.display());
    let addr = layout
        .highest_free(size, HIGH_RAM_START, limit)
        .ok_or_else(|| BootError::NoRoom {
            what: what.clone(),
            size,
        })?;
    layout.claim(&what, addr, size)?;
    initrd.copy_to_guest(mem, 0, size, addr)?;
    Ok((addr, size))
}

pub fn load(
    mem: &GuestMemory,
    layout: &mut GuestLayout,
    image: &mut Image,
    prefix: &[u8],
    linux: &Linux,
) -> Result<BootSetup, BootError> {
    let mut hdr = read_setup_header(image, prefix)?;
    if hdr.version < MIN_PROTOCOL {
        return Err(BootError::OldBootProtocol {
            path: image.path.clone(),
            version: hdr.version,
        });
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(BootError::NotLoadedHigh {
            path: image.path.clone(),
        });
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => n as u64,
    };
    let payload_offset = (setup_sects + 1) * 512;
    let payload_len = image
        .size
        .checked_sub(payload_offset)
        .filter(|&len| len > 0)
        .ok_or_else(|| image.corrupt("no protected-mode kernel after the setup sectors"))?;

    let lowmem_end = lowmem_size(linux.memory_bytes);
    // The decompressor works in place, in the `init_size` bytes from the load address.
    let footprint = payload_len.max(hdr.init_size as u64);
    let base = kernel_base(&hdr, footprint, lowmem_end);

    let mut setup = protected_mode_entry(mem, layout, base)?;
    layout.claim("zero page", ZERO_PAGE, ZERO_PAGE_SIZE)?;
    let cmdline_max = if hdr.version >= 0x0206 {
        hdr.cmdline_size as u64
    } else {
        DEFAULT_CMDLINE_SIZE
    };
    let cmdline_addr = write_linux_cmdline(mem, layout, linux.cmdline, cmdline_max)?;
    layout.claim("kernel", base, footprint)?;
    BzImage::load(mem, Some(GuestAddress(base)), &mut image.file, None).map_err(|err| {
        BootError::Read {
            what: "kernel",
            path: image.path.clone(),
            reason: err.to_string(),
        }
    })?;

    if let Some(initrd) = linux.initrd {
        let limit = (hdr.initrd_addr_max as u64 + 1).min(lowmem_end);
        let (addr, size) = load_initrd(mem, layout, initrd, limit)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    hdr.type_of_loader = LOADER_ID_UNDEFINED;
    hdr.code32_start = base as u32;
    hdr.cmd_line_ptr = cmdline_addr as u32;
    let mut params = boot_params {
        hdr,
        ..boot_params::default()
    };
    let map = e820_map(linux.memory_bytes);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind.code(),
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    if hdr.version >= RSDP_PROTOCOL {
        params.acpi_rsdp_addr = linux.rsdp.unwrap_or(0);
    }
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|_| BootError::GuestWrite {
        what: "zero page".to_string(),
        addr: ZERO_PAGE,
    })?;

    setup.regs.rsi = ZERO_PAGE;
    Ok(setup)
}
