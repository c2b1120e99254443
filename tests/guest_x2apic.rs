//! The LAPIC through its MSRs (`-x`): x2APIC mode, the ID and version registers, and the
//! TSC-deadline timer, whose vector the guest (interrupts off) finds pending in the IRR read
//! through MSRs. In user mode these MSRs exit to the VMM's LAPIC model.

#[macro_use]
mod common;

use common::Vm;

guest_test!(x2apic_msrs_and_the_tsc_deadline_timer, |mode| {
    Vm::multiboot("x2apic")
        .irqchip(mode)
        .args(["-x"])
        .run()
        .assert_exit(1)
        .assert_line("x2apic id 00000000 version 14")
        .assert_line("x2apic tsc-deadline irr pending")
        .assert_line("x2apic ok");
});

guest_test!(without_x_the_guest_sees_no_x2apic, |mode| {
    // The guest checks CPUID before touching the MSRs, and says why it gives up.
    let out = Vm::multiboot("x2apic").irqchip(mode).run();
    out.assert_exit(1);
    assert!(
        out.lines().any(|l| l.contains("x2apic not in cpuid")),
        "{out}"
    );
});
