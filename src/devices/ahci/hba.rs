//! The AHCI host bus adapter as a PCI function (`ahci-hd`, `ahci-cd`): an Intel ICH8 AHCI
//! controller (8086:2821) with one port, its registers in the ABAR (BAR 5, memory).
//!
//! A write of PxCI runs the issued commands through [`AhciDrive::execute`] on the vCPU
//! thread that wrote it. That is bounded: at most [`SLOTS`] commands per write, each moving
//! at most what its sector count allows. The port then posts the D2H (and PIO setup) FIS
//! into the received-FIS area, sets PxIS and raises the HBA interrupt through MSI when the
//! guest enabled it, else INTx.

use std::sync::Arc;

use super::{AhciDrive, DriveKind, ATA_S_DRDY, ATA_S_DSC};
use crate::block::BlockBackend;
use crate::devices::irq::{InterruptLine, MsiSender};
use crate::devices::pci::msi::Msi;
use crate::devices::pci::{
    BarKind, BarSpec, ConfigSpace, ConfigSpaceError, PciDevice, PciIds, COMMAND_INTX_DISABLE,
};
use crate::vmm::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// The ABAR: the HBA's memory BAR.
pub const ABAR: usize = 5;
/// Generic host control plus one port's registers, rounded up to a page.
pub const ABAR_SIZE: u64 = 0x1000;
/// Command slots per port (CAP.NCS + 1).
pub const SLOTS: u32 = 32;

const VENDOR_INTEL: u16 = 0x8086;
const DEVICE_ICH8_AHCI: u16 = 0x2821;
/// Mass storage, SATA, AHCI 1.0.
const CLASS_AHCI: (u8, u8, u8) = (0x01, 0x06, 0x01);

/// Generic host control registers.
mod ghc {
    pub const CAP: u64 = 0x00;
    pub const GHC: u64 = 0x04;
    pub const IS: u64 = 0x08;
    pub const PI: u64 = 0x0C;
    pub const VS: u64 = 0x10;
    pub const CAP2: u64 = 0x24;
    pub const PORT0: u64 = 0x100;
    pub const PORT_LEN: u64 = 0x80;
}

/// Port registers, relative to the port's base.
mod px {
    pub const CLB: u64 = 0x00;
    pub const CLBU: u64 = 0x04;
    pub const FB: u64 = 0x08;
    pub const FBU: u64 = 0x0C;
    pub const IS: u64 = 0x10;
    pub const IE: u64 = 0x14;
    pub const CMD: u64 = 0x18;
    pub const TFD: u64 = 0x20;
    pub const SIG: u64 = 0x24;
    pub const SSTS: u64 = 0x28;
    pub const SCTL: u64 = 0x2C;
    pub const SERR: u64 = 0x30;
    pub const SACT: u64 = 0x34;
    pub const CI: u64 = 0x38;
}

/// CAP: 64-bit addressing, AHCI-only, command list override, 6 Gb/s, 32 slots, one port.
pub const CAP_VALUE: u32 = 1 << 31 | 1 << 24 | 1 << 18 | 3 << 20 | (SLOTS - 1) << 8;
/// AHCI 1.3.
pub const VS_VALUE: u32 = 0x0001_0300;

pub const GHC_HR: u32 = 1 << 0;
pub const GHC_IE: u32 = 1 << 1;
pub const GHC_AE: u32 = 1 << 31;

/// PxIS bits.
pub const PXIS_DHRS: u32 = 1 << 0;
pub const PXIS_PSS: u32 = 1 << 1;
pub const PXIS_PCS: u32 = 1 << 6;
pub const PXIS_TFES: u32 = 1 << 30;
/// Bits PxIS/PxIE implement.
const PXIS_MASK: u32 = 0xFDC0_00FF;

/// PxCMD bits.
pub const CMD_ST: u32 = 1 << 0;
pub const CMD_SUD: u32 = 1 << 1;
pub const CMD_POD: u32 = 1 << 2;
pub const CMD_CLO: u32 = 1 << 3;
pub const CMD_FRE: u32 = 1 << 4;
pub const CMD_FR: u32 = 1 << 14;
pub const CMD_CR: u32 = 1 << 15;
const CMD_CCS_SHIFT: u32 = 8;
/// ATAPI, DLAE, ALPE, ASP, ICC: stored for the guest, no effect here.
const CMD_STORED: u32 = CMD_SUD | CMD_POD | 0xFF00_0000;

/// PxSSTS with a device present and communicating at Gen3, interface active.
pub const SSTS_UP: u32 = 0x133;
/// PxSERR.DIAG.X: the link came up (set with PxIS.PCS after a COMRESET).
const SERR_DIAG_X: u32 = 1 << 26;

/// ATA status BSY and DRQ, cleared by PxCMD.CLO.
const TFD_BSY_DRQ: u32 = 0x88;

/// One port's registers.
#[derive(Debug, Default, Clone, Copy)]
struct Port {
    clb: u64,
    fb: u64,
    is: u32,
    ie: u32,
    cmd: u32,
    tfd: u32,
    sig: u32,
    ssts: u32,
    sctl: u32,
    serr: u32,
    sact: u32,
    ci: u32,
    /// A device control FIS with SRST set came; the next one ends the soft reset.
    in_soft_reset: bool,
}

/// What the HBA needs from the machine.
pub struct AhciResources {
    pub memory: GuestMemory,
    pub msi: Arc<dyn MsiSender>,
    pub intx: Arc<dyn InterruptLine>,
}

/// The AHCI controller with one drive on port 0.
pub struct AhciHba {
    config: ConfigSpace,
    msi: Msi,
    msi_sender: Arc<dyn MsiSender>,
    intx: Arc<dyn InterruptLine>,
    intx_high: bool,
    memory: GuestMemory,
    drive: AhciDrive,
    ghc: u32,
    is: u32,
    port: Port,
}

impl AhciHba {
    pub fn new(
        kind: DriveKind,
        disk: Arc<dyn BlockBackend>,
        resources: AhciResources,
    ) -> Result<Self, ConfigSpaceError> {
        let (class, subclass, prog_if) = CLASS_AHCI;
        let mut config = ConfigSpace::new(PciIds {
            vendor: VENDOR_INTEL,
            device: DEVICE_ICH8_AHCI,
            class,
            subclass,
            prog_if,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let gsi = resources.intx.gsi();
        config.init(0x3C, &[gsi as u8, 1]); // interrupt line (the GSI, as bhyve), pin INTA#
        config.add_bar(
            ABAR,
            BarSpec {
                kind: BarKind::Memory32,
                size: ABAR_SIZE,
            },
        )?;
        let msi = Msi::new(&mut config)?;
        let mut hba = AhciHba {
            config,
            msi,
            msi_sender: resources.msi,
            intx: resources.intx,
            intx_high: false,
            memory: resources.memory,
            drive: AhciDrive::new(kind, disk),
            ghc: GHC_AE,
            is: 0,
            port: Port::default(),
        };
        hba.reset_port();
        Ok(hba)
    }

    /// The drive's state after a COMRESET: link up, signature in PxSIG, ready status.
    fn reset_port(&mut self) {
        let status = self.ready_status();
        let p = &mut self.port;
        p.ssts = SSTS_UP;
        p.sig = self.drive.signature();
        p.tfd = u32::from(status);
        p.sact = 0;
        p.ci = 0;
        p.in_soft_reset = false;
        p.serr |= SERR_DIAG_X;
        p.is |= PXIS_PCS;
    }

    fn ready_status(&self) -> u8 {
        match self.drive.kind() {
            DriveKind::Disk => ATA_S_DRDY | ATA_S_DSC,
            // An ATAPI device clears DRDY after reset (ATA8-ACS signature protocol).
            DriveKind::Cdrom => 0,
        }
    }

    /// GHC.HR: every register to its reset value, the port through a COMRESET.
    fn reset_hba(&mut self) {
        self.ghc = GHC_AE;
        self.is = 0;
        self.port = Port::default();
        self.reset_port();
        self.port.is = 0;
        self.update_interrupt(false);
    }

    /// Posts a D2H register FIS carrying the signature, as a device does after reset.
    fn post_signature(&mut self) {
        let status = self.ready_status();
        let sig = self.port.sig.to_le_bytes();
        let mut fis = [0u8; super::fis::FIS_LEN];
        fis[0] = super::fis::FIS_TYPE_D2H_REGISTER;
        fis[2] = status;
        fis[3] = 0x01; // error register after diagnostics: no error
        fis[4] = sig[1]; // LBA low
        fis[5] = sig[2]; // LBA mid
        fis[6] = sig[3]; // LBA high
        fis[12] = sig[0]; // sector count
        self.port.tfd = u32::from(status) | 1 << 8;
        if self.port.cmd & CMD_FRE != 0 {
            if let Some(at) = self.port.fb.checked_add(super::fis::RX_D2H_OFFSET) {
                let _ = self.memory.write_slice(&fis, GuestAddress(at));
            }
        }
    }

    /// Runs every issued command, lowest slot first, while the port is started. A command
    /// that fails stops the port's processing (the guest recovers by clearing PxCMD.ST).
    fn process_commands(&mut self) {
        let mut raised = 0;
        for _ in 0..SLOTS {
            if self.port.cmd & CMD_ST == 0 {
                break;
            }
            let pending = self.port.ci;
            if pending == 0 {
                break;
            }
            let slot = pending.trailing_zeros();
            self.port.cmd = self.port.cmd & !(0x1F << CMD_CCS_SHIFT) | slot << CMD_CCS_SHIFT;
            let outcome = self.drive.execute(&self.memory, self.port.clb, slot as u8);
            self.port.ci &= !(1 << slot);
            if outcome.soft_reset {
                self.port.in_soft_reset = true;
                continue;
            }
            if self.port.in_soft_reset {
                self.port.in_soft_reset = false;
                self.post_signature();
                raised |= PXIS_DHRS;
                continue;
            }
            if self.port.cmd & CMD_FRE != 0 {
                outcome.post(&self.memory, self.port.fb);
            }
            self.port.tfd = u32::from(outcome.error) << 8 | u32::from(outcome.status);
            raised |= PXIS_DHRS;
            if outcome.pio_setup.is_some() {
                raised |= PXIS_PSS;
            }
            if outcome.is_error() {
                raised |= PXIS_TFES;
                break;
            }
        }
        if raised != 0 {
            self.port.is |= raised;
            self.update_interrupt(true);
        }
    }

    /// Recomputes IS and the interrupt output. `new_event`: a port status bit was just set,
    /// which is what sends an MSI (MSI is an edge; INTx follows the level).
    fn update_interrupt(&mut self, new_event: bool) {
        let port_pending = self.port.is & self.port.ie != 0;
        if port_pending {
            self.is |= 1;
        }
        let asserted = self.ghc & GHC_IE != 0 && self.is != 0;
        if self.msi.enabled(&self.config) {
            self.set_intx(false);
            if asserted && new_event && port_pending {
                let (address, data) = self.msi.message(&self.config);
                self.msi_sender.send_msi(address, data);
            }
            return;
        }
        let intx_enabled = self.config.command() & COMMAND_INTX_DISABLE == 0;
        self.set_intx(asserted && intx_enabled);
    }

    fn set_intx(&mut self, high: bool) {
        if self.intx_high != high {
            self.intx_high = high;
            self.intx.set_level(high);
        }
    }

    fn write_cmd(&mut self, value: u32) {
        let p = &mut self.port;
        let was = p.cmd;
        p.cmd = was & !(CMD_STORED | CMD_ST | CMD_FRE) | value & (CMD_STORED | CMD_ST | CMD_FRE);
        if value & CMD_CLO != 0 {
            p.tfd &= !TFD_BSY_DRQ;
        }
        if p.cmd & CMD_FRE != 0 {
            p.cmd |= CMD_FR;
        } else {
            p.cmd &= !CMD_FR;
        }
        if p.cmd & CMD_ST != 0 {
            p.cmd |= CMD_CR;
        } else {
            // Stopping the port abandons whatever was issued.
            p.cmd &= !(CMD_CR | 0x1F << CMD_CCS_SHIFT);
            p.ci = 0;
            p.sact = 0;
        }
        if was & CMD_ST == 0 && p.cmd & CMD_ST != 0 {
            self.process_commands();
        }
    }

    fn write_sctl(&mut self, value: u32) {
        let was = self.port.sctl;
        self.port.sctl = value & 0xFFF;
        // DET 1 -> 0 ends a COMRESET: the device comes back and sends its signature.
        if was & 0xF == 1 && value & 0xF == 0 {
            self.reset_port();
            self.post_signature();
            self.update_interrupt(true);
        } else if value & 0xF == 1 {
            self.port.ssts = 0;
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let p = &self.port;
        match offset {
            ghc::CAP => CAP_VALUE,
            ghc::GHC => self.ghc,
            ghc::IS => self.is,
            ghc::PI => 1,
            ghc::VS => VS_VALUE,
            ghc::CAP2 => 0,
            o if (ghc::PORT0..ghc::PORT0 + ghc::PORT_LEN).contains(&o) => match o - ghc::PORT0 {
                px::CLB => p.clb as u32,
                px::CLBU => (p.clb >> 32) as u32,
                px::FB => p.fb as u32,
                px::FBU => (p.fb >> 32) as u32,
                px::IS => p.is,
                px::IE => p.ie,
                px::CMD => p.cmd,
                px::TFD => p.tfd,
                px::SIG => p.sig,
                px::SSTS => p.ssts,
                px::SCTL => p.sctl,
                px::SERR => p.serr,
                px::SACT => p.sact,
                px::CI => p.ci,
                _ => 0,
            },
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            ghc::GHC => {
                if value & GHC_HR != 0 {
                    self.reset_hba();
                    return;
                }
                self.ghc = GHC_AE | value & GHC_IE;
                self.update_interrupt(true);
            }
            ghc::IS => {
                self.is &= !value;
                self.update_interrupt(false);
            }
            o if (ghc::PORT0..ghc::PORT0 + ghc::PORT_LEN).contains(&o) => {
                self.write_port_register(o - ghc::PORT0, value)
            }
            _ => {}
        }
    }

    fn write_port_register(&mut self, offset: u64, value: u32) {
        let p = &mut self.port;
        let value64 = u64::from(value);
        match offset {
            // The command list is 1 KiB aligned, the received-FIS area 256 bytes.
            px::CLB => p.clb = p.clb & !0xFFFF_FFFF | value64 & 0xFFFF_FC00,
            px::CLBU => p.clb = p.clb & 0xFFFF_FFFF | value64 << 32,
            px::FB => p.fb = p.fb & !0xFFFF_FFFF | value64 & 0xFFFF_FF00,
            px::FBU => p.fb = p.fb & 0xFFFF_FFFF | value64 << 32,
            px::IS => {
                p.is &= !value;
                self.update_interrupt(false);
            }
            px::IE => {
                p.ie = value & PXIS_MASK;
                self.update_interrupt(true);
            }
            px::CMD => self.write_cmd(value),
            px::SCTL => self.write_sctl(value),
            px::SERR => p.serr &= !value,
            // Issuing only counts while the port runs.
            px::SACT if p.cmd & CMD_ST != 0 => p.sact |= value,
            px::CI if p.cmd & CMD_ST != 0 => {
                p.ci |= value;
                self.process_commands();
            }
            _ => {}
        }
    }
}

impl PciDevice for AhciHba {
    fn config_space(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        // The interrupt-disable bit or the MSI enable may have moved the interrupt.
        self.update_interrupt(false);
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != ABAR {
            data.fill(0xFF);
            return;
        }
        // Registers are 32-bit; narrower reads take their bytes of the register.
        let aligned = offset & !3;
        let value = self.read_register(aligned).to_le_bytes();
        let start = (offset - aligned) as usize;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = value.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        // Only whole-register writes are meaningful: a partial write to a write-1-to-clear
        // or command register could not be merged safely.
        if bar != ABAR || offset & 3 != 0 || data.len() != 4 {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, value);
    }
}

#[cfg(test)]
mod tests;
