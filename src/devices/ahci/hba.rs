//! The AHCI host bus adapter as a PCI function (`ahci-hd`, `ahci-cd`): an Intel ICH8 AHCI
//! controller (8086:2821) with one port, its registers in the ABAR (BAR 5, memory).
//!
//! A write of PxCI only records the issued slots and wakes the controller's I/O thread, so
//! a vCPU never waits for the disk. That thread runs the commands through
//! [`AhciDrive::execute`], lowest slot first, then posts the D2H (and PIO setup) FIS into
//! the received-FIS area, clears the PxCI bit, sets PxIS and raises the HBA interrupt
//! through MSI when the guest enabled it, else INTx.

use std::io;
use std::sync::{Arc, Condvar, Mutex};

use super::{AhciDrive, DriveKind, ATA_S_DRDY, ATA_S_DSC};
use crate::block::{BlockBackend, IoWorker, SubmitError};
use crate::devices::bus::lock;
use crate::devices::irq::{InterruptLine, MsiSender};
use crate::devices::pci::msi::Msi;
use crate::devices::pci::{
    BarKind, BarSpec, ConfigSpace, ConfigSpaceError, PciDevice, PciIds, COMMAND_INTX_DISABLE,
};
use crate::memory::GuestMemory;
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

#[derive(Debug, thiserror::Error)]
pub enum AhciError {
    #[error("AHCI configuration space: {0}")]
    ConfigSpace(#[from] ConfigSpaceError),
    #[error("cannot start the AHCI I/O thread: {0}")]
    Worker(#[source] io::Error),
    #[error(transparent)]
    Disk(#[from] crate::block::BlockError),
}

/// What the HBA needs from the machine.
pub struct AhciResources {
    pub memory: GuestMemory,
    pub msi: Arc<dyn MsiSender>,
    pub intx: Arc<dyn InterruptLine>,
}

/// The controller's registers, shared by the vCPU (register accesses) and the I/O thread
/// (command completion).
struct Registers {
    ghc: u32,
    is: u32,
    port: Port,
    /// The slot the I/O thread is running, if any; PxCMD.CR stays set while it runs.
    in_flight: Option<u32>,
    /// Bumped by a port stop or an HBA reset: a command that was running when it changed
    /// completes without touching the registers.
    generation: u64,
    /// The MSI message while MSI is enabled (mirrors configuration space).
    msi: Option<(u64, u32)>,
    /// INTx not disabled in the command register.
    intx_enabled: bool,
    intx_high: bool,
    /// PxSIG and the status after reset, fixed by the drive kind.
    signature: u32,
    ready_status: u8,
}

/// What the vCPU side and the I/O thread share.
struct Controller {
    memory: GuestMemory,
    msi_sender: Arc<dyn MsiSender>,
    intx: Arc<dyn InterruptLine>,
    regs: Mutex<Registers>,
    /// Signalled when the I/O thread finishes a command (`in_flight` back to `None`): a
    /// machine reset waits on it.
    idle: Condvar,
}

/// The AHCI controller with one drive on port 0.
pub struct AhciHba {
    config: ConfigSpace,
    msi: Msi,
    controller: Arc<Controller>,
    worker: IoWorker<()>,
}

impl AhciHba {
    /// Builds `ahci-hd` or `ahci-cd` on the image `options` name (read-only for a CD).
    pub fn build(
        kind: DriveKind,
        options: &crate::block::BlockOptions,
        resources: AhciResources,
    ) -> Result<crate::devices::BuiltDevice, AhciError> {
        let mut options = options.clone();
        if kind == DriveKind::Cdrom {
            options.read_only = true;
        }
        let disk = crate::block::open_image(&options)?;
        let hba = AhciHba::new(kind, disk, resources)?;
        Ok(crate::devices::BuiltDevice::shared(Arc::new(Mutex::new(
            hba,
        ))))
    }

    pub fn new(
        kind: DriveKind,
        disk: Arc<dyn BlockBackend>,
        resources: AhciResources,
    ) -> Result<Self, AhciError> {
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
        let drive = AhciDrive::new(kind, disk);
        let ready_status = match kind {
            DriveKind::Disk => ATA_S_DRDY | ATA_S_DSC,
            // An ATAPI device clears DRDY after reset (ATA8-ACS signature protocol).
            DriveKind::Cdrom => 0,
        };
        let mut regs = Registers {
            ghc: GHC_AE,
            is: 0,
            port: Port::default(),
            in_flight: None,
            generation: 0,
            msi: None,
            intx_enabled: true,
            intx_high: false,
            signature: drive.signature(),
            ready_status,
        };
        regs.reset_port();
        let controller = Arc::new(Controller {
            memory: resources.memory,
            msi_sender: resources.msi,
            intx: resources.intx,
            regs: Mutex::new(regs),
            idle: Condvar::new(),
        });
        let worker = {
            let controller = controller.clone();
            let mut drive = drive;
            // Depth 1: a queued wake-up not yet taken will see every slot issued after it.
            IoWorker::spawn("ahci-io", 1, move |()| controller.run_issued(&mut drive))
                .map_err(AhciError::Worker)?
        };
        Ok(AhciHba {
            config,
            msi,
            controller,
            worker,
        })
    }

    /// Wakes the I/O thread. A full queue means a wake-up is already pending.
    fn kick(&self) {
        match self.worker.submit(()) {
            Ok(()) | Err(SubmitError::Full(())) => {}
            Err(SubmitError::Stopped(())) => log::trace!("ahci: I/O thread has stopped"),
        }
    }
}

impl Registers {
    /// The drive's state after a COMRESET: link up, signature in PxSIG, ready status.
    fn reset_port(&mut self) {
        let p = &mut self.port;
        p.ssts = SSTS_UP;
        p.sig = self.signature;
        p.tfd = u32::from(self.ready_status);
        p.sact = 0;
        p.ci = 0;
        p.in_soft_reset = false;
        p.serr |= SERR_DIAG_X;
        p.is |= PXIS_PCS;
    }

    fn read(&self, offset: u64) -> u32 {
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
}

/// What a register write asks of the caller once the registers are unlocked.
#[derive(PartialEq, Eq)]
enum AfterWrite {
    Nothing,
    RunCommands,
}

impl Controller {
    /// Recomputes IS and the interrupt output. `new_event`: a port status bit was just set,
    /// which is what sends an MSI (MSI is an edge; INTx follows the level).
    fn update_interrupt(&self, r: &mut Registers, new_event: bool) {
        let port_pending = r.port.is & r.port.ie != 0;
        if port_pending {
            r.is |= 1;
        }
        let asserted = r.ghc & GHC_IE != 0 && r.is != 0;
        let intx = match r.msi {
            Some((address, data)) => {
                if asserted && new_event && port_pending {
                    self.msi_sender.send_msi(address, data);
                }
                false
            }
            None => asserted && r.intx_enabled,
        };
        if r.intx_high != intx {
            r.intx_high = intx;
            self.intx.set_level(intx);
        }
    }

    /// Posts a D2H register FIS carrying the signature, as a device does after reset.
    fn post_signature(&self, r: &mut Registers) {
        let status = r.ready_status;
        let sig = r.port.sig.to_le_bytes();
        let mut fis = [0u8; super::fis::FIS_LEN];
        fis[0] = super::fis::FIS_TYPE_D2H_REGISTER;
        fis[2] = status;
        fis[3] = 0x01; // error register after diagnostics: no error
        fis[4] = sig[1]; // LBA low
        fis[5] = sig[2]; // LBA mid
        fis[6] = sig[3]; // LBA high
        fis[12] = sig[0]; // sector count
        r.port.tfd = u32::from(status) | 1 << 8;
        if r.port.cmd & CMD_FRE != 0 {
            if let Some(at) = r.port.fb.checked_add(super::fis::RX_D2H_OFFSET) {
                let _ = self.memory.write_slice(&fis, GuestAddress(at));
            }
        }
    }

    /// The I/O thread: runs issued commands, lowest slot first, until none is left, the
    /// port stops, or one fails (the port then stops processing until the guest restarts
    /// it by clearing and setting PxCMD.ST, as on hardware).
    fn run_issued(&self, drive: &mut AhciDrive) {
        loop {
            let (slot, list_base, generation) = {
                let mut r = lock(&self.regs);
                if r.port.cmd & CMD_ST == 0 || r.port.ci == 0 {
                    return;
                }
                let slot = r.port.ci.trailing_zeros();
                r.in_flight = Some(slot);
                r.port.cmd = r.port.cmd & !(0x1F << CMD_CCS_SHIFT) | slot << CMD_CCS_SHIFT;
                (slot, r.port.clb, r.generation)
            };
            let outcome = drive.execute(&self.memory, list_base, slot as u8);
            let mut r = lock(&self.regs);
            r.in_flight = None;
            self.idle.notify_all();
            if r.generation != generation {
                // Stopped or reset while it ran: the guest no longer expects an answer.
                if r.port.cmd & CMD_ST == 0 {
                    r.port.cmd &= !CMD_CR;
                }
                continue;
            }
            r.port.ci &= !(1 << slot);
            let mut raised = PXIS_DHRS;
            if outcome.soft_reset {
                r.port.in_soft_reset = true;
                continue;
            }
            if r.port.in_soft_reset {
                r.port.in_soft_reset = false;
                self.post_signature(&mut r);
            } else {
                if r.port.cmd & CMD_FRE != 0 {
                    outcome.post(&self.memory, r.port.fb);
                }
                r.port.tfd = u32::from(outcome.error) << 8 | u32::from(outcome.status);
                if outcome.pio_setup.is_some() {
                    raised |= PXIS_PSS;
                }
                if outcome.is_error() {
                    raised |= PXIS_TFES;
                }
            }
            r.port.is |= raised;
            self.update_interrupt(&mut r, true);
            if raised & PXIS_TFES != 0 {
                return;
            }
        }
    }

    fn write(&self, offset: u64, value: u32) -> AfterWrite {
        let mut r = lock(&self.regs);
        match offset {
            ghc::GHC => {
                if value & GHC_HR != 0 {
                    self.reset_hba(&mut r);
                    return AfterWrite::Nothing;
                }
                r.ghc = GHC_AE | value & GHC_IE;
                self.update_interrupt(&mut r, true);
            }
            ghc::IS => {
                r.is &= !value;
                self.update_interrupt(&mut r, false);
            }
            o if (ghc::PORT0..ghc::PORT0 + ghc::PORT_LEN).contains(&o) => {
                return self.write_port(&mut r, o - ghc::PORT0, value);
            }
            _ => {}
        }
        AfterWrite::Nothing
    }

    /// GHC.HR: every register to its reset value, the port through a COMRESET.
    fn reset_hba(&self, r: &mut Registers) {
        r.ghc = GHC_AE;
        r.is = 0;
        r.port = Port::default();
        r.reset_port();
        r.port.is = 0;
        r.generation += 1;
        if r.in_flight.is_some() {
            r.port.cmd |= CMD_CR;
        }
        self.update_interrupt(r, false);
    }

    fn write_port(&self, r: &mut Registers, offset: u64, value: u32) -> AfterWrite {
        let value64 = u64::from(value);
        let p = &mut r.port;
        match offset {
            // The command list is 1 KiB aligned, the received-FIS area 256 bytes.
            px::CLB => p.clb = p.clb & !0xFFFF_FFFF | value64 & 0xFFFF_FC00,
            px::CLBU => p.clb = p.clb & 0xFFFF_FFFF | value64 << 32,
            px::FB => p.fb = p.fb & !0xFFFF_FFFF | value64 & 0xFFFF_FF00,
            px::FBU => p.fb = p.fb & 0xFFFF_FFFF | value64 << 32,
            px::IS => {
                p.is &= !value;
                self.update_interrupt(r, false);
            }
            px::IE => {
                p.ie = value & PXIS_MASK;
                self.update_interrupt(r, true);
            }
            px::CMD => return self.write_cmd(r, value),
            px::SCTL => self.write_sctl(r, value),
            px::SERR => p.serr &= !value,
            // Issuing only counts while the port runs.
            px::SACT if p.cmd & CMD_ST != 0 => p.sact |= value,
            px::CI if p.cmd & CMD_ST != 0 => {
                p.ci |= value;
                return AfterWrite::RunCommands;
            }
            _ => {}
        }
        AfterWrite::Nothing
    }

    fn write_cmd(&self, r: &mut Registers, value: u32) -> AfterWrite {
        let p = &mut r.port;
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
            // Stopping the port abandons whatever was issued; CR clears once the command
            // the I/O thread is running (if any) has finished.
            p.cmd &= !(0x1F << CMD_CCS_SHIFT);
            p.ci = 0;
            p.sact = 0;
            if was & CMD_ST != 0 {
                r.generation += 1;
            }
            if r.in_flight.is_none() {
                r.port.cmd &= !CMD_CR;
            }
        }
        if was & CMD_ST == 0 && r.port.cmd & CMD_ST != 0 && r.port.ci != 0 {
            return AfterWrite::RunCommands;
        }
        AfterWrite::Nothing
    }

    fn write_sctl(&self, r: &mut Registers, value: u32) {
        let was = r.port.sctl;
        r.port.sctl = value & 0xFFF;
        // DET 1 -> 0 ends a COMRESET: the device comes back and sends its signature.
        if was & 0xF == 1 && value & 0xF == 0 {
            r.reset_port();
            self.post_signature(r);
            self.update_interrupt(r, true);
        } else if value & 0xF == 1 {
            r.port.ssts = 0;
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

    /// A machine reset: no new command starts, the one the I/O thread runs (if any)
    /// finishes first (waited for on `idle`), then every register is as at power-on and
    /// MSI is off with the rest of configuration space.
    fn reset(&mut self, power_on: &ConfigSpace) {
        let mut r = lock(&self.controller.regs);
        r.port.cmd &= !CMD_ST;
        r.port.ci = 0;
        r.generation += 1;
        while r.in_flight.is_some() {
            r = match self.controller.idle.wait(r) {
                Ok(r) => r,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
        r.ghc = GHC_AE;
        r.is = 0;
        r.port = Port::default();
        r.reset_port();
        r.msi = None;
        r.intx_enabled = true;
        self.controller.update_interrupt(&mut r, false);
        drop(r);
        self.config.copy_registers_from(power_on);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        // The interrupt-disable bit or the MSI enable may have moved the interrupt.
        let msi = self
            .msi
            .enabled(&self.config)
            .then(|| self.msi.message(&self.config));
        let intx_enabled = self.config.command() & COMMAND_INTX_DISABLE == 0;
        let mut r = lock(&self.controller.regs);
        r.msi = msi;
        r.intx_enabled = intx_enabled;
        self.controller.update_interrupt(&mut r, false);
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != ABAR {
            data.fill(0xFF);
            return;
        }
        // Registers are 32-bit; narrower reads take their bytes of the register.
        let aligned = offset & !3;
        let value = lock(&self.controller.regs).read(aligned).to_le_bytes();
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
        if self.controller.write(offset, value) == AfterWrite::RunCommands {
            self.kick();
        }
    }
}

#[cfg(test)]
mod tests;
