//! One counter from KVM's binary statistics (KVM_GET_STATS_FD on a vCPU): `insn_emulation`,
//! the instructions KVM's emulator ran for the vCPU. On this host every CPL0 instruction is
//! emulated, so it measures how much guest code ran in ring 0.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::KVMIO;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

// KVM_GET_STATS_FD = _IO(KVMIO, 0xce).
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
const HEADER_BYTES: usize = 24;
/// struct kvm_stats_desc before its name: flags, exponent, size, offset, bucket_size.
const DESCRIPTOR_FIXED_BYTES: usize = 16;

/// A counter's place in a stats file.
pub struct StatCounter {
    file: File,
    offset: u64,
}

impl StatCounter {
    /// Finds counter `name` among the vCPU's statistics; `None` where KVM has no stats fd
    /// or no such counter.
    pub fn open(vcpu: &impl AsRawFd, name: &str) -> Option<StatCounter> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file descriptor or -1.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut header, 0).ok()?;
        let word =
            |i: usize| u32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().unwrap_or_default());
        let (name_size, count, desc_offset, data_offset) = (
            word(1) as usize,
            word(2) as usize,
            u64::from(word(4)),
            u64::from(word(5)),
        );
        let stride = DESCRIPTOR_FIXED_BYTES + name_size;
        if name_size == 0 || count > 4096 || stride > 4096 {
            return None;
        }
        let mut descriptors = vec![0u8; stride * count];
        file.read_exact_at(&mut descriptors, desc_offset).ok()?;
        let offset = descriptors.chunks_exact(stride).find_map(|d| {
            let label = &d[DESCRIPTOR_FIXED_BYTES..];
            let label = &label[..label.iter().position(|&b| b == 0).unwrap_or(label.len())];
            (label == name.as_bytes())
                .then(|| u64::from(u32::from_le_bytes([d[8], d[9], d[10], d[11]])))
        })?;
        Some(StatCounter {
            file,
            offset: data_offset + offset,
        })
    }

    pub fn read(&self) -> Option<u64> {
        let mut value = [0u8; 8];
        self.file.read_exact_at(&mut value, self.offset).ok()?;
        Some(u64::from_le_bytes(value))
    }
}
