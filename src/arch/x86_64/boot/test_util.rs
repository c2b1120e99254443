//! Helpers for the loaders' tests: temporary image files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A file under the system temp dir, removed when dropped.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(tag: &str, contents: &[u8]) -> TempFile {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("xhyve-boot-test-{}-{n}-{tag}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A loadable segment for `build_elf`.
pub struct TestSegment<'a> {
    pub paddr: u64,
    pub vaddr: u64,
    pub data: &'a [u8],
    pub memsz: u64,
}

/// A note for `build_elf`.
pub struct TestNote<'a> {
    pub name: &'a [u8],
    pub n_type: u32,
    pub desc: &'a [u8],
}

fn pad4(v: &mut Vec<u8>) {
    while v.len() % 4 != 0 {
        v.push(0);
    }
}

/// A minimal little-endian x86 ELF executable (ELF32 or ELF64) with the given PT_LOAD
/// segments and one PT_NOTE segment holding `notes`.
pub fn build_elf(is64: bool, entry: u64, loads: &[TestSegment], notes: &[TestNote]) -> Vec<u8> {
    let ehsize = if is64 { 64 } else { 52 };
    let phentsize = if is64 { 56 } else { 32 };
    let phnum = loads.len() + usize::from(!notes.is_empty());
    let mut note_bytes = Vec::new();
    for n in notes {
        note_bytes.extend_from_slice(&(n.name.len() as u32 + 1).to_le_bytes());
        note_bytes.extend_from_slice(&(n.desc.len() as u32).to_le_bytes());
        note_bytes.extend_from_slice(&n.n_type.to_le_bytes());
        note_bytes.extend_from_slice(n.name);
        note_bytes.push(0);
        pad4(&mut note_bytes);
        note_bytes.extend_from_slice(n.desc);
        pad4(&mut note_bytes);
    }
    let mut data_at = ehsize + phentsize * phnum;
    let mut out = vec![0u8; data_at];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = if is64 { 2 } else { 1 };
    out[5] = 1;
    out[6] = 1;
    let put16 =
        |o: &mut Vec<u8>, at: usize, v: u16| o[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |o: &mut Vec<u8>, at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut out, 16, 2); // ET_EXEC
    put16(&mut out, 18, if is64 { 62 } else { 3 });
    put32(&mut out, 20, 1);
    if is64 {
        put64(&mut out, 24, entry);
        put64(&mut out, 32, ehsize as u64);
        put16(&mut out, 52, ehsize as u16);
        put16(&mut out, 54, phentsize as u16);
        put16(&mut out, 56, phnum as u16);
    } else {
        put32(&mut out, 24, entry as u32);
        put32(&mut out, 28, ehsize as u32);
        put16(&mut out, 40, ehsize as u16);
        put16(&mut out, 42, phentsize as u16);
        put16(&mut out, 44, phnum as u16);
    }
    let mut blobs: Vec<(u32, u64, u64, u64, &[u8])> = loads
        .iter()
        .map(|s| (1, s.vaddr, s.paddr, s.memsz, s.data))
        .collect();
    if !notes.is_empty() {
        blobs.push((4, 0, 0, note_bytes.len() as u64, &note_bytes));
    }
    for (i, (ty, vaddr, paddr, memsz, data)) in blobs.iter().enumerate() {
        let ph = ehsize + i * phentsize;
        let offset = data_at as u64;
        put32(&mut out, ph, *ty);
        if is64 {
            put64(&mut out, ph + 8, offset);
            put64(&mut out, ph + 16, *vaddr);
            put64(&mut out, ph + 24, *paddr);
            put64(&mut out, ph + 32, data.len() as u64);
            put64(&mut out, ph + 40, *memsz);
        } else {
            put32(&mut out, ph + 4, offset as u32);
            put32(&mut out, ph + 8, *vaddr as u32);
            put32(&mut out, ph + 12, *paddr as u32);
            put32(&mut out, ph + 16, data.len() as u32);
            put32(&mut out, ph + 20, *memsz as u32);
        }
        data_at += data.len();
    }
    for (_, _, _, _, data) in &blobs {
        out.extend_from_slice(data);
    }
    out
}

/// Fields of a synthesized bzImage; `build` lays out one setup sector plus the boot sector.
pub struct TestBzImage {
    pub version: u16,
    pub loadflags: u8,
    pub relocatable: bool,
    pub pref_address: u64,
    pub kernel_alignment: u32,
    pub init_size: u32,
    pub initrd_addr_max: u32,
    pub cmdline_size: u32,
    pub payload: Vec<u8>,
}

impl Default for TestBzImage {
    fn default() -> Self {
        TestBzImage {
            version: 0x020f,
            loadflags: 1,
            relocatable: true,
            pref_address: 0x100_0000,
            kernel_alignment: 0x20_0000,
            init_size: 0x40_0000,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            payload: (0..8192u32).map(|i| (i * 7 + 3) as u8).collect(),
        }
    }
}

impl TestBzImage {
    pub fn build(&self) -> Vec<u8> {
        let mut out = vec![0u8; 1024];
        out[0x1f1] = 1; // setup_sects
        out[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        out[0x200] = 0xeb;
        out[0x201] = (0x268 - 0x202) as u8;
        out[0x202..0x206].copy_from_slice(b"HdrS");
        out[0x206..0x208].copy_from_slice(&self.version.to_le_bytes());
        out[0x211] = self.loadflags;
        out[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        out[0x22c..0x230].copy_from_slice(&self.initrd_addr_max.to_le_bytes());
        out[0x230..0x234].copy_from_slice(&self.kernel_alignment.to_le_bytes());
        out[0x234] = self.relocatable as u8;
        out[0x238..0x23c].copy_from_slice(&self.cmdline_size.to_le_bytes());
        out[0x258..0x260].copy_from_slice(&self.pref_address.to_le_bytes());
        out[0x260..0x264].copy_from_slice(&self.init_size.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// A multiboot v1 header with a valid checksum; `aout` appends the five kludge addresses.
pub fn multiboot_header(flags: u32, aout: Option<[u32; 5]>) -> Vec<u8> {
    let magic = 0x1bad_b002u32;
    let mut out = Vec::new();
    for v in [magic, flags, 0u32.wrapping_sub(magic).wrapping_sub(flags)] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in aout.into_iter().flatten() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

pub fn kexec(kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> super::Firmware {
    super::Firmware::Kexec {
        kernel: kernel.to_path_buf(),
        initrd: initrd.map(Path::to_path_buf),
        cmdline: cmdline.to_string(),
    }
}

pub fn multiboot(kernel: &Path, modules: &[(&Path, &str)], cmdline: &str) -> super::Firmware {
    super::Firmware::Multiboot {
        kernel: kernel.to_path_buf(),
        modules: modules
            .iter()
            .map(|(path, cmdline)| super::MultibootModule {
                path: path.to_path_buf(),
                cmdline: cmdline.to_string(),
            })
            .collect(),
        cmdline: cmdline.to_string(),
    }
}

pub fn read_u32(mem: &crate::memory::GuestMemory, addr: u64) -> u32 {
    use vm_memory::Bytes;
    mem.read_obj(vm_memory::GuestAddress(addr))
        .expect("read u32")
}

pub fn read_u64(mem: &crate::memory::GuestMemory, addr: u64) -> u64 {
    use vm_memory::Bytes;
    mem.read_obj(vm_memory::GuestAddress(addr))
        .expect("read u64")
}

pub fn read_bytes(mem: &crate::memory::GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    use vm_memory::Bytes;
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, vm_memory::GuestAddress(addr))
        .expect("read bytes");
    buf
}

/// The NUL-terminated string at `addr`.
pub fn read_cstr(mem: &crate::memory::GuestMemory, addr: u64) -> String {
    let mut out = Vec::new();
    let mut at = addr;
    loop {
        let byte = read_bytes(mem, at, 1)[0];
        if byte == 0 {
            return String::from_utf8(out).expect("utf-8");
        }
        out.push(byte);
        at += 1;
    }
}
