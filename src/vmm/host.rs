//! The few host-OS services the VMM needs beyond the hypervisor: CPU pinning and keeping guest
//! RAM out of core dumps.

/// Whether this process may run on host CPU `cpu`.
#[cfg(target_os = "linux")]
pub fn cpu_available(cpu: u32) -> bool {
    let cpu = cpu as usize;
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: cpu_set_t is plain data; an all-zero value is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `allowed` is a valid cpu_set_t of the size passed; pid 0 is this process.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) };
    // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
    rc == 0 && unsafe { libc::CPU_ISSET(cpu, &allowed) }
}

/// Pins the calling thread to host CPU `cpu`.
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpu: u32) -> std::io::Result<()> {
    let cpu = cpu as usize;
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Guest RAM stays out of core dumps unless `-C` asks for it: a crash of an 8 GiB VM should
/// not write 8 GiB.
#[cfg(target_os = "linux")]
pub fn exclude_from_core_dumps(addr: *mut u8, len: usize) {
    // SAFETY: the caller passes one whole mapping it owns; MADV_DONTDUMP only changes what a
    // core dump contains.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTDUMP) };
    if rc != 0 {
        log::debug!(
            "madvise(MADV_DONTDUMP): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Asks for transparent huge pages behind guest RAM, as QEMU does: fewer, larger EPT
/// mappings, which matters most where guest page faults are costly (measured on the build
/// machines: the Debian kernel reached its banner in a third of the time).
#[cfg(target_os = "linux")]
pub fn prefer_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: the caller passes one whole mapping it owns; MADV_HUGEPAGE is only a hint.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE): {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(not(target_os = "linux"))]
pub fn prefer_huge_pages(_addr: *mut u8, _len: usize) {}

/// macOS has no hard CPU affinity: only affinity tags, which the scheduler may ignore.
#[cfg(not(target_os = "linux"))]
pub fn cpu_available(cpu: u32) -> bool {
    std::thread::available_parallelism().is_ok_and(|n| (cpu as usize) < n.get())
}

#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpu: u32) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "this host cannot pin threads to CPUs",
    ))
}

/// No MADV_DONTDUMP outside Linux; core dumps there include guest RAM.
#[cfg(not(target_os = "linux"))]
pub fn exclude_from_core_dumps(_addr: *mut u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_zero_is_available_and_absurd_cpus_are_not() {
        assert!(cpu_available(0));
        assert!(!cpu_available(1_000_000));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pinning_moves_the_thread() {
        std::thread::spawn(|| {
            pin_current_thread(0).unwrap();
            // SAFETY: sched_getcpu has no preconditions.
            assert_eq!(unsafe { libc::sched_getcpu() }, 0);
            assert!(pin_current_thread(1_000_000).is_err());
        })
        .join()
        .unwrap();
    }
}
