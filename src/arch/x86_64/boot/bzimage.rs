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
use crate::arch::x86_64::layout::lowmem_size;
use crate::memory::GuestMemory;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::e820::E820Kind;
    use crate::arch::x86_64::boot::load as load_firmware;
    use crate::arch::x86_64::boot::test_util::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    fn boot(
        image: &TestBzImage,
        memory: u64,
        initrd: Option<&[u8]>,
        cmdline: &str,
        rsdp: Option<u64>,
    ) -> (GuestMemory, Result<BootSetup, BootError>) {
        let kernel = TempFile::new("bzimage", &image.build());
        let initrd = initrd.map(|data| TempFile::new("initrd", data));
        let mem = create_guest_memory(memory).unwrap();
        let firmware = kexec(kernel.path(), initrd.as_ref().map(|f| f.path()), cmdline);
        let result = load_firmware(&mem, &firmware, memory, rsdp);
        (mem, result)
    }

    fn zero_page(mem: &GuestMemory) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap()
    }

    #[test]
    fn relocatable_kernel_boots_at_pref_address_with_full_zero_page() {
        let image = TestBzImage::default();
        let initrd: Vec<u8> = (0..10_000u32).map(|i| i as u8 ^ 0x5a).collect();
        let (mem, setup) = boot(
            &image,
            256 * MIB,
            Some(&initrd),
            "console=ttyS0 root=/dev/vda",
            Some(0xf_2400),
        );
        let setup = setup.unwrap();
        assert_eq!(setup.regs.rip, 0x100_0000);
        assert_eq!(setup.regs.rsi, ZERO_PAGE);
        assert_eq!(setup.regs.rflags, 0x2);
        assert_eq!(
            read_bytes(&mem, 0x100_0000, image.payload.len()),
            image.payload
        );

        let zp = zero_page(&mem);
        let hdr = zp.hdr;
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.code32_start }, 0x100_0000);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(read_cstr(&mem, CMDLINE_ADDR), "console=ttyS0 root=/dev/vda");
        // Page-aligned at the top of RAM (initrd_addr_max is above it).
        let initrd_addr = (256 * MIB - 10_000) & !0xfff;
        assert_eq!({ hdr.ramdisk_image } as u64, initrd_addr);
        assert_eq!({ hdr.ramdisk_size }, 10_000);
        assert_eq!(read_bytes(&mem, initrd_addr, initrd.len()), initrd);
        assert_eq!({ zp.acpi_rsdp_addr }, 0xf_2400);

        let map = e820_map(256 * MIB);
        assert_eq!(zp.e820_entries as usize, map.len());
        for (got, want) in zp.e820_table.iter().zip(&map) {
            assert_eq!(({ got.addr }, { got.size }), (want.addr, want.size));
            assert_eq!({ got.r#type }, want.kind.code());
        }
        assert_eq!(map[3].kind, E820Kind::Ram);
    }

    #[test]
    fn fixed_kernel_loads_at_1mib_and_initrd_respects_initrd_addr_max() {
        let image = TestBzImage {
            relocatable: false,
            initrd_addr_max: 0x7ff_ffff,
            ..TestBzImage::default()
        };
        let (mem, setup) = boot(&image, 512 * MIB, Some(&[7; 5000]), "", None);
        assert_eq!(setup.unwrap().regs.rip, MIB);
        let hdr = zero_page(&mem).hdr;
        assert_eq!({ hdr.ramdisk_image } as u64, 0x800_0000 - 0x2000);
        assert_eq!(read_cstr(&mem, CMDLINE_ADDR), "auto");
        assert_eq!({ zero_page(&mem).acpi_rsdp_addr }, 0);
    }

    #[test]
    fn relocatable_kernel_that_misses_pref_address_goes_to_aligned_1mib() {
        let image = TestBzImage {
            pref_address: 0x1000_0000,
            ..TestBzImage::default()
        };
        let (_, setup) = boot(&image, 64 * MIB, None, "x", None);
        assert_eq!(setup.unwrap().regs.rip, 2 * MIB);
    }

    #[test]
    fn rsdp_is_only_passed_from_protocol_2_14() {
        let image = TestBzImage {
            version: 0x020d,
            ..TestBzImage::default()
        };
        let (mem, setup) = boot(&image, 64 * MIB, None, "x", Some(0xf_2400));
        setup.unwrap();
        assert_eq!({ zero_page(&mem).acpi_rsdp_addr }, 0);
    }

    #[test]
    fn old_protocol_and_missing_loaded_high_are_named() {
        let old = TestBzImage {
            version: 0x0209,
            ..TestBzImage::default()
        };
        let err = boot(&old, 64 * MIB, None, "", None).1.unwrap_err();
        assert!(
            err.to_string()
                .ends_with("uses Linux boot protocol 2.09: 2.10 or later is required"),
            "{err}"
        );
        let low = TestBzImage {
            loadflags: 0,
            ..TestBzImage::default()
        };
        let err = boot(&low, 64 * MIB, None, "", None).1.unwrap_err();
        assert!(matches!(err, BootError::NotLoadedHigh { .. }), "{err}");
    }

    #[test]
    fn command_line_longer_than_cmdline_size_is_refused() {
        let image = TestBzImage {
            cmdline_size: 16,
            ..TestBzImage::default()
        };
        let (_, ok) = boot(&image, 64 * MIB, None, "0123456789abcdef", None);
        ok.unwrap();
        let err = boot(&image, 64 * MIB, None, "0123456789abcdefg", None)
            .1
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel command line is 17 bytes long: at most 16 fit"
        );
        // A header claiming a huge limit is still bounded by the low-memory area.
        let huge = TestBzImage {
            cmdline_size: u32::MAX,
            ..TestBzImage::default()
        };
        let long = "a".repeat(CMDLINE_AREA_END as usize);
        let err = boot(&huge, 64 * MIB, None, &long, None).1.unwrap_err();
        assert!(matches!(err, BootError::CmdlineTooLong { .. }));
    }

    #[test]
    fn kernel_or_initrd_that_does_not_fit_is_an_error() {
        let image = TestBzImage {
            relocatable: false,
            init_size: 0x800_0000,
            ..TestBzImage::default()
        };
        let err = boot(&image, 64 * MIB, None, "", None).1.unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel at 0x100000-0x8100000 is outside guest RAM"
        );
        let image = TestBzImage::default();
        let big = vec![0u8; 60 << 20];
        let err = boot(&image, 64 * MIB, Some(&big), "", None).1.unwrap_err();
        assert!(matches!(err, BootError::NoRoom { .. }), "{err}");
        assert!(err.to_string().contains("62914560 bytes"), "{err}");
    }

    #[test]
    fn missing_payload_and_truncated_header_are_corrupt_not_panics() {
        let full = TestBzImage::default().build();
        for len in [0x206, 0x230, 0x265, 1024] {
            let kernel = TempFile::new("short-bzimage", &full[..len]);
            let mem = create_guest_memory(16 * MIB).unwrap();
            let err =
                load_firmware(&mem, &kexec(kernel.path(), None, ""), 16 * MIB, None).unwrap_err();
            assert!(matches!(err, BootError::Corrupt { .. }), "{len}: {err}");
        }
    }
}
