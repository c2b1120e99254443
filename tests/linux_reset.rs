//! Slow tier: the control API's `Reset` under a real Linux guest (the xhyve-rs test kernel).
//!
//! One machine per interrupt-controller mode, two CPUs, a virtio-blk and an ahci-hd disk:
//! Linux boots to its prompt and writes a marker on both disks; `POST /vm/state Reset`;
//! the same process boots Linux again from its entry (a second `Linux version` banner), both
//! CPUs come online again (the AP through INIT/SIPI), the markers are read back through
//! the re-probed drivers and an ext2 file system is written and read on each disk; then
//! `poweroff -f` (exit 1).
//!
//! Measured on the build machine (2026-12-04, debug build, one test at a time under the
//! heavy lock): kernel irqchip, first prompt 43.9 s, `Reset` answered in 32 ms, the prompt
//! again 45.0 s later, 117 s for the test; user irqchip, 47.4 s, 115 ms, 48.1 s, 124 s.

#[macro_use]
mod common;
mod linux_common;

use std::process::Command;

use linux_common::{boot_timeout, host, test_kernel, IrqChip, Linux, Scratch, PROMPT};

const MARKER: &str = "written before the reset";

fn curl_reset(socket: &std::path::Path) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "60", "-X", "POST", "-w", "\n%{http_code}"])
        .arg("--unix-socket")
        .arg(socket)
        .args(["-d", r#"{"state":"Reset"}"#, "http://localhost/vm/state"])
        .output()
        .expect("curl is needed (Debian: curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn reset_and_boot_again(mode: IrqChip) {
    let Some((kernel, initramfs)) = test_kernel() else {
        return;
    };
    let scratch = Scratch::new(&format!("reset-{}", mode.env_value()));
    let blk = scratch.path("vda.img");
    let ahci = scratch.path("sda.img");
    for image in [&blk, &ahci] {
        host("truncate", &["-s", "16M", &image.display().to_string()]);
    }
    let socket = scratch.path("rest.sock");
    let mut linux = Linux::new(&kernel, &initramfs, mode);
    linux.vcpus = 2;
    linux.devices = vec![
        format!("2,virtio-blk,{}", blk.display()),
        format!("3,ahci-hd,{}", ahci.display()),
    ];
    linux.flags.push("--restful-uri".into());
    linux.flags.push(format!("unix://{}", socket.display()));
    let mut vm = linux.boot();
    let first_prompt = vm.wait_for(PROMPT, boot_timeout());
    let cpus = vm.sh("grep -c ^processor /proc/cpuinfo");
    assert_eq!(cpus.trim(), "2", "both CPUs online before the reset");
    vm.sh(&format!(
        "echo '{MARKER}' > /dev/vda && echo '{MARKER}' > /dev/sda && sync"
    ));

    let before = vm.console().len();
    let asked = std::time::Instant::now();
    let (code, body) = curl_reset(&socket);
    assert_eq!(code, 202, "Reset answered {code}: {body}");
    let answered = asked.elapsed();
    let (_, banner_at) = vm.wait_for_from(before, "Linux version", boot_timeout());
    let (to_second_prompt, _) = vm.wait_for_from(banner_at, PROMPT, boot_timeout());
    eprintln!(
        "figures ({}): first prompt {first_prompt:.1?}; Reset answered in {answered:.1?}; \
         second prompt {:.1?} after the reset",
        mode.env_value(),
        to_second_prompt.saturating_sub(asked.duration_since(vm.started)),
    );

    let cpus = vm.sh("grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online");
    assert!(
        cpus.contains("2\n") && cpus.contains("0-1"),
        "both CPUs online after the reset:\n{cpus}"
    );
    for dev in ["/dev/vda", "/dev/sda"] {
        let read = vm.sh(&format!("head -n 1 {dev}"));
        assert_eq!(read.trim(), MARKER, "{dev} read back after the reset");
        vm.sh(&format!(
            "mke2fs -q {dev} && mkdir -p /mnt/d && mount -t ext2 {dev} /mnt/d && \
             echo again > /mnt/d/f && sync && umount /mnt/d && \
             mount -t ext2 -o ro {dev} /mnt/d && grep -q again /mnt/d/f && umount /mnt/d"
        ));
    }
    vm.end_with("poweroff -f", 1);
}

#[test]
fn reset_over_the_api_boots_linux_again_kernel_irqchip() {
    reset_and_boot_again(IrqChip::Kernel);
}

#[test]
fn reset_over_the_api_boots_linux_again_user_irqchip() {
    reset_and_boot_again(IrqChip::User);
}
