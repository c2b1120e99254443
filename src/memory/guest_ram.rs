//! Guest RAM as the shared instruction emulator reads it ([`GuestRam`] over vm-memory), with a
//! compare-exchange that is atomic against the other vCPUs, which keep running while one
//! vCPU's instruction is completed in the VMM.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use super::GuestMemory;
use crate::arch::x86_64::emulate::GuestRam;

pub struct RamView<'a>(pub &'a GuestMemory);

impl RamView<'_> {
    /// The host address of `len` bytes at `gpa`, if one region holds them all.
    fn host_range(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let last = gpa.checked_add(len.checked_sub(1)? as u64)?;
        let start = self.0.get_host_address(GuestAddress(gpa)).ok()?;
        let end = self.0.get_host_address(GuestAddress(last)).ok()?;
        // Both ends in RAM and contiguous on the host: one region holds the range.
        (end as usize == start as usize + (len - 1)).then_some(start)
    }
}

impl GuestRam for RamView<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.0.read_slice(buf, GuestAddress(gpa)).is_ok()
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        self.0.write_slice(buf, GuestAddress(gpa)).is_ok()
    }

    fn compare_exchange(
        &self,
        gpa: u64,
        expected: &[u8],
        new: &[u8],
        actual: &mut [u8],
    ) -> Option<bool> {
        let len = expected.len();
        if new.len() != len || actual.len() != len {
            return None;
        }
        let host = self.host_range(gpa, len)?;
        match len {
            8 if host as usize % 8 == 0 => {
                let expected = u64::from_le_bytes(expected.try_into().ok()?);
                let new = u64::from_le_bytes(new.try_into().ok()?);
                // SAFETY: `host` points at 8 bytes of guest RAM that stay mapped for the VM's
                // life and is 8-byte aligned; guest RAM is shared memory that other vCPUs
                // access atomically too.
                let atomic = unsafe { AtomicU64::from_ptr(host.cast::<u64>()) };
                let result =
                    atomic.compare_exchange(expected, new, Ordering::SeqCst, Ordering::SeqCst);
                let (swapped, seen) = match result {
                    Ok(old) => (true, old),
                    Err(old) => (false, old),
                };
                actual.copy_from_slice(&seen.to_le_bytes());
                Some(swapped)
            }
            #[cfg(target_arch = "x86_64")]
            16 if host as usize % 16 == 0 => {
                let (swapped, seen) = compare_exchange_16(
                    host,
                    u128::from_le_bytes(expected.try_into().ok()?),
                    u128::from_le_bytes(new.try_into().ok()?),
                );
                actual.copy_from_slice(&seen.to_le_bytes());
                Some(swapped)
            }
            // A misaligned CMPXCHG8B is a split lock even on hardware; read, compare, write.
            _ => {
                self.0.read_slice(actual, GuestAddress(gpa)).ok()?;
                if actual != expected {
                    return Some(false);
                }
                self.0.write_slice(new, GuestAddress(gpa)).ok()?;
                Some(true)
            }
        }
    }
}

/// `lock cmpxchg16b` on host memory: (swapped, the value seen).
#[cfg(target_arch = "x86_64")]
fn compare_exchange_16(host: *mut u8, expected: u128, new: u128) -> (bool, u128) {
    let (mut low, mut high) = (expected as u64, (expected >> 64) as u64);
    let swapped: u8;
    // SAFETY: `host` is 16-byte aligned and points at 16 bytes of mapped guest RAM (checked by
    // the caller); CMPXCHG16B needs RBX, which LLVM reserves, so it is saved in a scratch
    // register around the instruction.
    unsafe {
        std::arch::asm!(
            "xchg {new_low}, rbx",
            "lock cmpxchg16b [{ptr}]",
            "sete {swapped}",
            "mov rbx, {new_low}",
            ptr = in(reg) host,
            new_low = inout(reg) new as u64 => _,
            swapped = out(reg_byte) swapped,
            in("rcx") (new >> 64) as u64,
            inout("rax") low,
            inout("rdx") high,
            options(nostack),
        );
    }
    (swapped != 0, u128::from(high) << 64 | u128::from(low))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn compare_exchange_swaps_only_on_a_match() {
        let memory = create_guest_memory(1 << 20).unwrap();
        let ram = RamView(&memory);
        assert!(ram.write(0x1000, &[1u8; 16]));
        let mut seen = [0u8; 16];
        assert_eq!(
            ram.compare_exchange(0x1000, &[2; 16], &[3; 16], &mut seen),
            Some(false)
        );
        assert_eq!(seen, [1; 16]);
        assert_eq!(
            ram.compare_exchange(0x1000, &[1; 16], &[3; 16], &mut seen),
            Some(true)
        );
        let mut now = [0u8; 16];
        assert!(ram.read(0x1000, &mut now));
        assert_eq!(now, [3; 16]);
        let mut seen8 = [0u8; 8];
        assert_eq!(
            ram.compare_exchange(0x1008, &[3; 8], &[4; 8], &mut seen8),
            Some(true)
        );
        assert_eq!(
            ram.compare_exchange(0x1003, &[3; 8], &[5; 8], &mut seen8),
            Some(false)
        );
        assert_eq!(seen8, [3, 3, 3, 3, 3, 4, 4, 4]);
        assert_eq!(
            ram.compare_exchange(1 << 30, &[0; 8], &[0; 8], &mut seen8),
            None
        );
    }
}
