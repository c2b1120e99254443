//! Multiboot version 1 kernels (the test guests' format): ELF or a.out-kludge loading,
//! page-aligned modules after the kernel, and a multiboot_info with the full memory map.
//! Entry: EAX = 0x2BADB002, EBX = multiboot_info, 32-bit flat protected mode, paging off.

use std::path::Path;

use super::cpu::protected_mode_entry;
use super::e820::{e820_map, EBDA_START, HIGH_RAM_START};
use super::elf::{is_elf, ElfFile};
use super::image::{write_guest, zero_guest, Image, PREFIX_LEN};
use super::layout::{GuestLayout, MULTIBOOT_INFO_AREA, MULTIBOOT_INFO_AREA_SIZE};
use super::{BootError, BootSetup};
use crate::arch::x86_64::layout::lowmem_size;
use crate::memory::GuestMemory;

const HEADER_MAGIC: u32 = 0x1bad_b002;
const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Header flags 0-2 (page-aligned modules, memory info, video mode) are the defined
/// requirements; 0 and 1 we always meet, and the video mode is a preference. Any other bit
/// in the low half is a requirement we do not know, which the spec says must fail the boot.
const KNOWN_REQUIRED_FLAGS: u32 = 0x7;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;

const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
const INFO_SIZE: usize = 116;
const MODULE_ENTRY_SIZE: usize = 16;
const MMAP_ENTRY_SIZE: usize = 24;
const LOADER_NAME: &str = "xhyve";

/// A multiboot header found in the kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// File offset of the magic.
    pub offset: u64,
    pub flags: u32,
    pub aout: Option<AoutAddresses>,
}

/// The a.out-kludge fields (header flag 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AoutAddresses {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

pub struct Multiboot<'a> {
    pub header: Header,
    /// (path, command line) of each module, in order.
    pub modules: &'a [(&'a Path, &'a str)],
    pub cmdline: &'a str,
    pub memory_bytes: u64,
}

fn word(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The first valid multiboot header (magic, checksum) 4-aligned in the first 8192 bytes.
pub fn find_header(prefix: &[u8]) -> Option<Header> {
    let window = &prefix[..prefix.len().min(PREFIX_LEN as usize)];
    (0..window.len()).step_by(4).find_map(|at| {
        let (magic, flags, checksum) = (
            word(window, at)?,
            word(window, at + 4)?,
            word(window, at + 8)?,
        );
        if magic != HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(checksum) != 0 {
            return None;
        }
        let aout = if flags & FLAG_AOUT_KLUDGE != 0 {
            // A header too short for the fields its flags promise is no header.
            Some(AoutAddresses {
                header_addr: word(window, at + 12)?,
                load_addr: word(window, at + 16)?,
                load_end_addr: word(window, at + 20)?,
                bss_end_addr: word(window, at + 24)?,
                entry_addr: word(window, at + 28)?,
            })
        } else {
            None
        };
        Some(Header {
            offset: at as u64,
            flags,
            aout,
        })
    })
}

/// Loads the a.out-kludge image; returns (entry, end of the kernel in memory).
fn load_aout(
    mem: &GuestMemory,
    layout: &mut GuestLayout,
    image: &mut Image,
    header_offset: u64,
    a: &AoutAddresses,
) -> Result<(u64, u64), BootError> {
    let (header_addr, load_addr) = (a.header_addr as u64, a.load_addr as u64);
    let file_offset = header_addr
        .checked_sub(load_addr)
        .and_then(|delta| header_offset.checked_sub(delta))
        .ok_or_else(|| {
            image.corrupt(format!(
                "multiboot load address {load_addr:#x} does not fit header address {header_addr:#x}"
            ))
        })?;
    let load_len = match a.load_end_addr {
        0 => image.size - file_offset,
        end => (end as u64).checked_sub(load_addr).ok_or_else(|| {
            image.corrupt(format!(
                "multiboot load end {end:#x} is below load address {load_addr:#x}"
            ))
        })?,
    };
    let load_end = load_addr + load_len;
    let bss_end = match a.bss_end_addr {
        0 => load_end,
        end if (end as u64) < load_end => {
            return Err(image.corrupt(format!(
                "multiboot BSS end {end:#x} is below load end {load_end:#x}"
            )))
        }
        end => end as u64,
    };
    layout.claim("kernel", load_addr, bss_end - load_addr)?;
    image.copy_to_guest(mem, file_offset, load_len, load_addr)?;
    zero_guest(mem, "kernel BSS", load_end, bss_end - load_end)?;
    Ok((a.entry_addr as u64, bss_end))
}

/// Bump allocator over the multiboot information area.
struct InfoArea {
    next: u64,
    end: u64,
}

impl InfoArea {
    fn alloc(&mut self, size: usize, align: u64) -> Result<u64, BootError> {
        let start = self.next.next_multiple_of(align);
        let end = start.saturating_add(size as u64);
        if end > self.end {
            return Err(BootError::NoRoom {
                what: "multiboot information".to_string(),
                size: end - MULTIBOOT_INFO_AREA,
            });
        }
        self.next = end;
        Ok(start)
    }

    fn string(&mut self, mem: &GuestMemory, text: &str) -> Result<u32, BootError> {
        let addr = self.alloc(text.len() + 1, 1)?;
        write_guest(mem, "multiboot string", addr, text.as_bytes())?;
        write_guest(mem, "multiboot string", addr + text.len() as u64, &[0])?;
        Ok(addr as u32)
    }
}

fn put(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

pub fn load(
    mem: &GuestMemory,
    layout: &mut GuestLayout,
    image: &mut Image,
    prefix: &[u8],
    boot: &Multiboot,
) -> Result<BootSetup, BootError> {
    let header = &boot.header;
    if header.flags & 0xffff & !KNOWN_REQUIRED_FLAGS != 0 {
        return Err(BootError::UnsupportedMultiboot {
            path: image.path.clone(),
            flags: header.flags,
        });
    }
    layout.claim(
        "multiboot information",
        MULTIBOOT_INFO_AREA,
        MULTIBOOT_INFO_AREA_SIZE,
    )?;
    let (entry, kernel_end) = match &header.aout {
        Some(aout) => load_aout(mem, layout, image, header.offset, aout)?,
        None if is_elf(prefix) => {
            let elf = ElfFile::parse(image)?;
            let end = elf.load_segments(mem, layout, image)?;
            (elf.physical_entry(), end)
        }
        None => {
            return Err(image.corrupt("multiboot header without load addresses in a non-ELF file"))
        }
    };
    if entry > u32::MAX as u64 {
        return Err(image.corrupt(format!("multiboot entry {entry:#x} is above 4 GiB")));
    }
    let mut setup = protected_mode_entry(mem, layout, entry)?;

    let mut area = InfoArea {
        next: MULTIBOOT_INFO_AREA,
        end: MULTIBOOT_INFO_AREA + MULTIBOOT_INFO_AREA_SIZE,
    };
    let info_addr = area.alloc(INFO_SIZE, 8)?;
    let mut info = [0u8; INFO_SIZE];

    let mut module_table = Vec::with_capacity(boot.modules.len() * MODULE_ENTRY_SIZE);
    let mut next_free = kernel_end.max(HIGH_RAM_START);
    for &(path, cmdline) in boot.modules {
        let mut module = Image::open(path, "module")?;
        let what = format!("module \"{}\"", path.display());
        let start =
            layout
                .lowest_free(module.size, next_free)
                .ok_or_else(|| BootError::NoRoom {
                    what: what.clone(),
                    size: module.size,
                })?;
        layout.claim(&what, start, module.size)?;
        module.copy_to_guest(mem, 0, module.size, start)?;
        let end = start + module.size;
        if end > u32::MAX as u64 {
            return Err(BootError::OutsideRam { what, start, end });
        }
        next_free = end;
        let string = area.string(mem, cmdline)?;
        for value in [start as u32, end as u32, string, 0] {
            module_table.extend_from_slice(&value.to_le_bytes());
        }
    }
    let mods_addr = area.alloc(module_table.len(), 4)?;
    write_guest(mem, "multiboot module list", mods_addr, &module_table)?;

    let map = e820_map(boot.memory_bytes);
    let mut mmap = Vec::with_capacity(map.len() * MMAP_ENTRY_SIZE);
    for e in &map {
        // `size` counts the bytes after itself.
        mmap.extend_from_slice(&(MMAP_ENTRY_SIZE as u32 - 4).to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&e.kind.code().to_le_bytes());
    }
    let mmap_addr = area.alloc(mmap.len(), 8)?;
    write_guest(mem, "multiboot memory map", mmap_addr, &mmap)?;

    let cmdline = area.string(mem, boot.cmdline)?;
    let loader_name = area.string(mem, LOADER_NAME)?;
    let mem_upper = lowmem_size(boot.memory_bytes).saturating_sub(HIGH_RAM_START) / 1024;
    put(
        &mut info,
        0,
        INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
    );
    put(&mut info, 4, (EBDA_START / 1024) as u32);
    put(&mut info, 8, mem_upper as u32);
    put(&mut info, 16, cmdline);
    put(&mut info, 20, boot.modules.len() as u32);
    put(&mut info, 24, mods_addr as u32);
    put(&mut info, 44, mmap.len() as u32);
    put(&mut info, 48, mmap_addr as u32);
    put(&mut info, 64, loader_name);
    write_guest(mem, "multiboot information", info_addr, &info)?;

    setup.regs.rax = BOOTLOADER_MAGIC as u64;
    setup.regs.rbx = info_addr;
    Ok(setup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::load as load_firmware;
    use crate::arch::x86_64::boot::test_util::*;
    use crate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    /// An ELF32 multiboot kernel: text at 1 MiB holding the header, plus a BSS.
    fn multiboot_elf(flags: u32) -> Vec<u8> {
        let mut text = multiboot_header(flags, None);
        text.extend((0..500u32).map(|i| i as u8));
        build_elf(
            false,
            0x10_000c,
            &[TestSegment {
                paddr: 0x10_0000,
                vaddr: 0x10_0000,
                data: &text,
                memsz: 0x5000,
            }],
            &[],
        )
    }

    #[test]
    fn elf32_kernel_gets_mbi_modules_and_full_memory_map() {
        let memory = 5 << 30;
        let kernel = TempFile::new("mb-elf", &multiboot_elf(0x3));
        let first = TempFile::new("mod1", &[0x11; 100]);
        let second = TempFile::new("mod2", &[0x22; 5000]);
        let mem = create_guest_memory(memory).unwrap();
        let firmware = multiboot(
            kernel.path(),
            &[(first.path(), "first arg"), (second.path(), "")],
            "kernel args",
        );
        let setup = load_firmware(&mem, &firmware, memory, None).unwrap();

        assert_eq!(setup.regs.rax, 0x2bad_b002);
        assert_eq!(setup.regs.rip, 0x10_000c);
        let mbi = setup.regs.rbx;
        assert!((0x2000..0x8000).contains(&mbi));
        assert_eq!(read_u32(&mem, 0x10_0000), 0x1bad_b002);
        assert_eq!(read_u32(&mem, mbi), 0x1 | 0x4 | 0x8 | 0x40 | 0x200);
        assert_eq!(read_u32(&mem, mbi + 4), 639);
        assert_eq!(read_u32(&mem, mbi + 8) as u64, ((3 << 30) - MIB) / 1024);
        assert_eq!(
            read_cstr(&mem, read_u32(&mem, mbi + 16) as u64),
            "kernel args"
        );
        assert_eq!(read_cstr(&mem, read_u32(&mem, mbi + 64) as u64), "xhyve");

        assert_eq!(read_u32(&mem, mbi + 20), 2);
        let mods = read_u32(&mem, mbi + 24) as u64;
        let (start0, end0) = (read_u32(&mem, mods) as u64, read_u32(&mem, mods + 4) as u64);
        let (start1, end1) = (
            read_u32(&mem, mods + 16) as u64,
            read_u32(&mem, mods + 20) as u64,
        );
        // Page-aligned, after the kernel's BSS, in order.
        assert_eq!((start0, end0), (0x10_5000, 0x10_5064));
        assert_eq!((start1, end1), (0x10_6000, 0x10_6000 + 5000));
        assert_eq!(read_bytes(&mem, start0, 100), vec![0x11; 100]);
        assert_eq!(read_bytes(&mem, start1, 5000), vec![0x22; 5000]);
        assert_eq!(
            read_cstr(&mem, read_u32(&mem, mods + 8) as u64),
            "first arg"
        );
        assert_eq!(read_cstr(&mem, read_u32(&mem, mods + 24) as u64), "");

        let map = e820_map(memory);
        let (len, addr) = (
            read_u32(&mem, mbi + 44) as u64,
            read_u32(&mem, mbi + 48) as u64,
        );
        assert_eq!(len, 24 * map.len() as u64);
        for (i, want) in map.iter().enumerate() {
            let at = addr + 24 * i as u64;
            assert_eq!(read_u32(&mem, at), 20);
            assert_eq!(read_u64(&mem, at + 4), want.addr);
            assert_eq!(read_u64(&mem, at + 12), want.size);
            assert_eq!(read_u32(&mem, at + 20), want.kind.code());
        }
        assert_eq!(read_u64(&mem, addr + 24 * 4 + 4), 4 << 30);
    }

    #[test]
    fn aout_kludge_image_loads_at_its_addresses() {
        let mut file = vec![0x90u8; 0x100];
        // header_addr, load_addr, load_end_addr (0: whole file), bss_end_addr, entry_addr
        file.extend(multiboot_header(
            FLAG_AOUT_KLUDGE,
            Some([0x20_0100, 0x20_0000, 0, 0x20_4000, 0x20_0180]),
        ));
        file.resize(0x1800, 0xc3);
        let kernel = TempFile::new("aout", &file);
        let mem = create_guest_memory(16 * MIB).unwrap();
        mem.write_slice(&[0xee; 0x100], GuestAddress(0x20_3f00))
            .unwrap();
        let setup =
            load_firmware(&mem, &multiboot(kernel.path(), &[], ""), 16 * MIB, None).unwrap();
        assert_eq!(setup.regs.rip, 0x20_0180);
        assert_eq!(read_bytes(&mem, 0x20_0000, file.len()), file);
        assert_eq!(read_bytes(&mem, 0x20_3f00, 0x100), vec![0; 0x100]);
        assert_eq!(read_u32(&mem, setup.regs.rbx + 20), 0);
    }

    #[test]
    fn aout_kludge_with_load_end_copies_only_that_much() {
        let mut file = multiboot_header(
            FLAG_AOUT_KLUDGE,
            Some([0x30_0000, 0x30_0000, 0x30_0010, 0, 0x30_0000]),
        );
        file.resize(0x100, 0x77);
        let kernel = TempFile::new("aout-end", &file);
        let mem = create_guest_memory(16 * MIB).unwrap();
        load_firmware(&mem, &multiboot(kernel.path(), &[], ""), 16 * MIB, None).unwrap();
        assert_eq!(read_bytes(&mem, 0x30_0000, 0x10), file[..0x10].to_vec());
        assert_eq!(read_bytes(&mem, 0x30_0010, 4), vec![0; 4]);
    }

    #[test]
    fn bad_aout_addresses_are_named() {
        let cases: [([u32; 5], &str); 4] = [
            // Load area under the BIOS tables.
            ([0xf_0000, 0xf_0000, 0, 0, 0xf_0000], "kernel at 0xf0000-"),
            // Over the loader's own boot information.
            (
                [0x3000, 0x3000, 0, 0, 0x3000],
                "overlaps multiboot information",
            ),
            // header_addr below load_addr.
            (
                [0x10_0000, 0x10_1000, 0, 0, 0x10_0000],
                "does not fit header address",
            ),
            (
                [0x10_0000, 0x10_0000, 0x10_0040, 0x10_0020, 0x10_0000],
                "BSS end",
            ),
        ];
        for (aout, message) in cases {
            let mut file = multiboot_header(FLAG_AOUT_KLUDGE, Some(aout));
            file.resize(0x100, 0);
            let kernel = TempFile::new("bad-aout", &file);
            let mem = create_guest_memory(16 * MIB).unwrap();
            let err = load_firmware(&mem, &multiboot(kernel.path(), &[], ""), 16 * MIB, None)
                .unwrap_err();
            assert!(err.to_string().contains(message), "{message}: {err}");
        }
    }

    #[test]
    fn header_search_checks_checksum_alignment_and_window() {
        let good = multiboot_header(0x3, None);
        assert_eq!(find_header(&good).unwrap().offset, 0);
        let mut bad_sum = good.clone();
        bad_sum[8] ^= 1;
        assert_eq!(find_header(&bad_sum), None);
        let mut misaligned = vec![0u8; 2];
        misaligned.extend(&good);
        assert_eq!(find_header(&misaligned), None);
        let mut late = vec![0u8; 8192];
        late.extend(&good);
        assert_eq!(find_header(&late), None);
        let mut last = vec![0u8; 8192 - 12];
        last.extend(&good);
        assert_eq!(find_header(&last).unwrap().offset, 8180);
        // The kludge flag promises 20 more bytes; without them there is no header.
        assert_eq!(find_header(&multiboot_header(FLAG_AOUT_KLUDGE, None)), None);
    }

    #[test]
    fn unknown_required_flags_and_missing_header_are_refused() {
        let kernel = TempFile::new("mb-flags", &multiboot_elf(0x8));
        let mem = create_guest_memory(16 * MIB).unwrap();
        let err =
            load_firmware(&mem, &multiboot(kernel.path(), &[], ""), 16 * MIB, None).unwrap_err();
        assert!(
            matches!(err, BootError::UnsupportedMultiboot { flags: 0x8, .. }),
            "{err}"
        );

        let kernel = TempFile::new("not-mb", &[0u8; 4096]);
        let err =
            load_firmware(&mem, &multiboot(kernel.path(), &[], ""), 16 * MIB, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "\"{}\" is not a bzImage, an ELF vmlinux or a multiboot kernel",
                kernel.path().display()
            )
        );
    }

    #[test]
    fn kexec_of_a_multiboot_elf_passes_the_initrd_as_module_0() {
        let kernel = TempFile::new("mb-kexec", &multiboot_elf(0x1));
        let initrd = TempFile::new("mb-initrd", &[9; 10]);
        let mem = create_guest_memory(16 * MIB).unwrap();
        let setup = load_firmware(
            &mem,
            &kexec(kernel.path(), Some(initrd.path()), "hello"),
            16 * MIB,
            None,
        )
        .unwrap();
        let mbi = setup.regs.rbx;
        assert_eq!(read_u32(&mem, mbi + 20), 1);
        let mods = read_u32(&mem, mbi + 24) as u64;
        assert_eq!(
            read_bytes(&mem, read_u32(&mem, mods) as u64, 10),
            vec![9; 10]
        );
        assert_eq!(read_cstr(&mem, read_u32(&mem, mbi + 16) as u64), "hello");
    }

    #[test]
    fn module_that_does_not_fit_is_named() {
        let kernel = TempFile::new("mb-big", &multiboot_elf(0x1));
        let module = TempFile::new("mb-bigmod", &vec![0; 2 << 20]);
        let mem = create_guest_memory(2 * MIB).unwrap();
        let err = load_firmware(
            &mem,
            &multiboot(kernel.path(), &[(module.path(), "")], ""),
            2 * MIB,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, BootError::NoRoom { .. }), "{err}");
        assert!(err.to_string().contains("mb-bigmod"), "{err}");
    }
}
