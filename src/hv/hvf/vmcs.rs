//! Access to one vCPU's VMCS and registers: the [`Vmcs`] trait the VMX layer is written
//! against, and [`VmcsModel`], an in-memory VMCS that the exit tests drive.

use std::collections::HashMap;

use super::ffi::{self, hv_vmx_capability_t, hv_x86_reg_t};
use crate::hv::HvError;

/// One vCPU's VMCS, general registers and the VMX capability MSRs.
///
/// On macOS this is `hv_vmx_vcpu_read/write_vmcs`, `hv_vcpu_read/write_register` and
/// `hv_vmx_read_capability`; in tests it is [`VmcsModel`].
pub trait Vmcs {
    fn read_field(&self, field: u32) -> Result<u64, HvError>;
    fn write_field(&mut self, field: u32, value: u64) -> Result<(), HvError>;
    fn read_reg(&self, reg: hv_x86_reg_t) -> Result<u64, HvError>;
    fn write_reg(&mut self, reg: hv_x86_reg_t, value: u64) -> Result<(), HvError>;
    fn capability(&self, cap: hv_vmx_capability_t) -> Result<u64, HvError>;
}

/// The VMCS field that holds a register the framework keeps in the VMCS rather than in its
/// own save area; `None` for registers it saves itself (RAX..R15 except RSP, CR2, DRs...).
pub fn vmcs_field_of(reg: hv_x86_reg_t) -> Option<u32> {
    use ffi::*;
    Some(match reg {
        HV_X86_RIP => VMCS_GUEST_RIP,
        HV_X86_RFLAGS => VMCS_GUEST_RFLAGS,
        HV_X86_RSP => VMCS_GUEST_RSP,
        HV_X86_CR0 => VMCS_GUEST_CR0,
        HV_X86_CR3 => VMCS_GUEST_CR3,
        HV_X86_CR4 => VMCS_GUEST_CR4,
        HV_X86_CS => VMCS_GUEST_CS,
        HV_X86_SS => VMCS_GUEST_SS,
        HV_X86_DS => VMCS_GUEST_DS,
        HV_X86_ES => VMCS_GUEST_ES,
        HV_X86_FS => VMCS_GUEST_FS,
        HV_X86_GS => VMCS_GUEST_GS,
        HV_X86_IDT_BASE => VMCS_GUEST_IDTR_BASE,
        HV_X86_IDT_LIMIT => VMCS_GUEST_IDTR_LIMIT,
        HV_X86_GDT_BASE => VMCS_GUEST_GDTR_BASE,
        HV_X86_GDT_LIMIT => VMCS_GUEST_GDTR_LIMIT,
        HV_X86_LDTR => VMCS_GUEST_LDTR,
        HV_X86_LDT_BASE => VMCS_GUEST_LDTR_BASE,
        HV_X86_LDT_LIMIT => VMCS_GUEST_LDTR_LIMIT,
        HV_X86_LDT_AR => VMCS_GUEST_LDTR_AR,
        HV_X86_TR => VMCS_GUEST_TR,
        HV_X86_TSS_BASE => VMCS_GUEST_TR_BASE,
        HV_X86_TSS_LIMIT => VMCS_GUEST_TR_LIMIT,
        HV_X86_TSS_AR => VMCS_GUEST_TR_AR,
        HV_X86_DR7 => VMCS_GUEST_DR7,
        _ => return None,
    })
}

/// A VMCS in a hash map: capability values, fields and registers, with every field write
/// recorded in order so a test can assert what the VMX layer programmed.
///
/// Registers that live in the VMCS ([`vmcs_field_of`]) alias their field, as on the framework.
/// Unwritten fields and registers read as 0. Capabilities default to "everything allowed,
/// nothing forced".
#[derive(Debug, Clone, Default)]
pub struct VmcsModel {
    pub fields: HashMap<u32, u64>,
    pub regs: HashMap<hv_x86_reg_t, u64>,
    pub capabilities: HashMap<hv_vmx_capability_t, u64>,
    /// Every `write_field` (and aliased `write_reg`) as (field, value), oldest first.
    pub writes: Vec<(u32, u64)>,
}

/// A capability value that allows every control bit to be 0 or 1.
pub const CAP_ANYTHING: u64 = 0xffff_ffff_0000_0000;

impl VmcsModel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn field(&self, field: u32) -> u64 {
        self.fields.get(&field).copied().unwrap_or(0)
    }

    /// Sets a field without recording it as a write (the "hardware" side of a test).
    pub fn set_field(&mut self, field: u32, value: u64) {
        self.fields.insert(field, value);
    }

    pub fn reg(&self, reg: hv_x86_reg_t) -> u64 {
        match vmcs_field_of(reg) {
            Some(field) => self.field(field),
            None => self.regs.get(&reg).copied().unwrap_or(0),
        }
    }

    pub fn set_reg(&mut self, reg: hv_x86_reg_t, value: u64) {
        match vmcs_field_of(reg) {
            Some(field) => self.set_field(field, value),
            None => {
                self.regs.insert(reg, value);
            }
        }
    }

    /// The values written to `field`, oldest first.
    pub fn writes_to(&self, field: u32) -> Vec<u64> {
        self.writes
            .iter()
            .filter(|(f, _)| *f == field)
            .map(|(_, v)| *v)
            .collect()
    }
}

impl Vmcs for VmcsModel {
    fn read_field(&self, field: u32) -> Result<u64, HvError> {
        Ok(self.field(field))
    }

    fn write_field(&mut self, field: u32, value: u64) -> Result<(), HvError> {
        self.writes.push((field, value));
        self.fields.insert(field, value);
        Ok(())
    }

    fn read_reg(&self, reg: hv_x86_reg_t) -> Result<u64, HvError> {
        Ok(self.reg(reg))
    }

    fn write_reg(&mut self, reg: hv_x86_reg_t, value: u64) -> Result<(), HvError> {
        match vmcs_field_of(reg) {
            Some(field) => self.write_field(field, value),
            None => {
                self.regs.insert(reg, value);
                Ok(())
            }
        }
    }

    fn capability(&self, cap: hv_vmx_capability_t) -> Result<u64, HvError> {
        Ok(self.capabilities.get(&cap).copied().unwrap_or(CAP_ANYTHING))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ffi::*;

    #[test]
    fn registers_kept_in_the_vmcs_alias_their_field() {
        let mut m = VmcsModel::new();
        m.write_reg(HV_X86_RIP, 0x1234).unwrap();
        assert_eq!(m.read_field(VMCS_GUEST_RIP).unwrap(), 0x1234);
        assert_eq!(m.writes_to(VMCS_GUEST_RIP), vec![0x1234]);
        m.write_reg(HV_X86_RAX, 7).unwrap();
        assert_eq!(m.read_reg(HV_X86_RAX).unwrap(), 7);
        assert_eq!(m.writes.len(), 1);
    }
}
