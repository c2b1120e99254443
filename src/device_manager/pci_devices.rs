//! The registry of PCI functions: one line per [`DeviceKind`], each calling the builder in
//! the device's own file. This is the only place that matches on device kinds.

use std::sync::{Arc, Mutex};

use crate::config::DeviceKind;
use crate::devices::ahci::hba::{AhciError, AhciHba, AhciResources};
use crate::devices::doorbell::Doorbells;
use crate::devices::irq::{InterruptLine, MsiSender};
use crate::devices::pci::{hostbridge::HostBridge, intx_gsi, lpc::LpcBridge, PciAddress};
use crate::devices::virtio::blk::{VirtioBlk, VirtioBlkError};
use crate::devices::virtio::fs_devices::{ShareDevice, ShareDeviceError};
use crate::devices::virtio::net::NetDeviceError;
use crate::devices::virtio::pci::{VirtioPciError, VirtioPciResources};
use crate::devices::virtio::rnd::VirtioRnd;
use crate::devices::virtio::vsock::{VirtioVsock, VsockDeviceError};
use crate::devices::BuiltDevice;
use crate::memory::GuestMemory;

/// What any PCI function may need from the machine.
#[derive(Clone)]
pub struct DeviceContext {
    pub memory: GuestMemory,
    pub msi: Arc<dyn MsiSender>,
    /// The interrupt line of a GSI.
    pub intx: Arc<dyn Fn(u32) -> Arc<dyn InterruptLine> + Send + Sync>,
    /// `-W`: virtio devices use single-vector MSI instead of MSI-X.
    pub virtio_single_msi: bool,
    /// `-U`: network devices derive their MAC from it.
    pub uuid: Option<[u8; 16]>,
    /// Doorbells without VM exits (KVM with its in-kernel irqchip), if the machine has them.
    pub doorbells: Option<Arc<dyn Doorbells>>,
}

impl DeviceContext {
    /// The INTA# line of the function at `address`.
    pub fn intx_line(&self, address: PciAddress) -> Arc<dyn InterruptLine> {
        (self.intx)(intx_gsi(address.slot, 0))
    }

    /// What an AHCI controller at `address` needs.
    pub fn ahci(&self, address: PciAddress) -> AhciResources {
        AhciResources {
            memory: self.memory.clone(),
            msi: self.msi.clone(),
            intx: self.intx_line(address),
        }
    }

    /// What a virtio transport at `address` needs: memory, MSI and its INTx line.
    pub fn virtio(&self, address: PciAddress) -> VirtioPciResources {
        VirtioPciResources {
            memory: self.memory.clone(),
            msi: self.msi.clone(),
            intx: self.intx_line(address),
            single_msi: self.virtio_single_msi,
        }
    }
}

/// Why a PCI function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Virtio(#[from] VirtioPciError),
    #[error(transparent)]
    VirtioBlk(#[from] VirtioBlkError),
    #[error(transparent)]
    Net(#[from] NetDeviceError),
    #[error(transparent)]
    Ahci(#[from] AhciError),
    #[error(transparent)]
    Share(#[from] ShareDeviceError),
    #[error(transparent)]
    Vsock(#[from] VsockDeviceError),
}

/// Builds the function `kind` names at `address`. One line per device kind.
pub fn build(
    kind: &DeviceKind,
    address: PciAddress,
    ctx: &DeviceContext,
) -> Result<BuiltDevice, DeviceError> {
    use crate::devices::ahci::DriveKind::{Cdrom, Disk};
    use crate::devices::virtio::net;
    Ok(match kind {
        DeviceKind::Hostbridge => BuiltDevice::plain(shared(HostBridge::netapp())),
        DeviceKind::AmdHostbridge => BuiltDevice::plain(shared(HostBridge::amd())),
        DeviceKind::Lpc => BuiltDevice::plain(shared(LpcBridge::new())),
        DeviceKind::VirtioRnd => VirtioRnd::build(ctx.virtio(address))?,
        DeviceKind::VirtioBlk(options) => VirtioBlk::build(options, ctx.virtio(address))?,
        DeviceKind::VirtioTap(options) => {
            net::build_virtio_tap(address, options, ctx.uuid, ctx.virtio(address))?
        }
        DeviceKind::VirtioNet(options) => {
            net::build_virtio_net(address, options, ctx.uuid, ctx.virtio(address))?
        }
        DeviceKind::AhciHd(options) => AhciHba::build(Disk, options, ctx.ahci(address))?,
        DeviceKind::AhciCd(options) => AhciHba::build(Cdrom, options, ctx.ahci(address))?,
        DeviceKind::Virtio9p(options) => ShareDevice::build_9p(options, ctx.virtio(address))?,
        DeviceKind::VirtioFs(options) => ShareDevice::build_fs(options, ctx.virtio(address))?,
        DeviceKind::VirtioSock(config) => VirtioVsock::build(config, ctx.virtio(address))?,
    })
}

fn shared<T: crate::devices::pci::PciDevice + 'static>(device: T) -> Arc<Mutex<T>> {
    Arc::new(Mutex::new(device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BlockOptions;
    use crate::device_manager::DeviceManagerError;
    use crate::devices::bus::Bus;
    use crate::devices::pci::{BarWindows, PciBus};

    struct NoMsi;
    impl MsiSender for NoMsi {
        fn send_msi(&self, _address: u64, _data: u32) {}
    }

    fn context() -> DeviceContext {
        DeviceContext {
            memory: GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap(),
            msi: Arc::new(NoMsi),
            intx: Arc::new(|gsi| {
                Arc::new(crate::devices::irq::test_util::RecordingLine {
                    gsi,
                    ..Default::default()
                })
            }),
            virtio_single_msi: false,
            uuid: None,
            doorbells: None,
        }
    }

    /// The functions `devices` (slot, kind) name on bus 0, built by the registry, with their
    /// BARs placed in xhyve's windows.
    fn pci_bus(devices: &[(u8, DeviceKind)]) -> Result<PciBus, DeviceManagerError> {
        let bus = PciBus::with_buses(Arc::new(Bus::new()), Arc::new(Bus::new()));
        let ctx = context();
        for (slot, kind) in devices {
            let address = at(0, *slot, 0);
            let built = build(kind, address, &ctx)
                .map_err(|source| DeviceManagerError::Device { address, source })?;
            bus.add(address, built.function)?;
        }
        Ok(bus)
    }

    fn read32(bus: &PciBus, addr: PciAddress, offset: u16) -> u32 {
        let mut d = [0u8; 4];
        bus.read_config(addr, offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn at(bus: u8, slot: u8, function: u8) -> PciAddress {
        PciAddress::new(bus, slot, function).unwrap()
    }

    #[test]
    fn builds_a_virtio_rnd_function_with_its_bars() {
        let bus = pci_bus(&[(5, DeviceKind::VirtioRnd)]).unwrap();
        bus.allocate_bars(&BarWindows::for_memory(256 << 20))
            .unwrap();
        assert_eq!(read32(&bus, at(0, 5, 0), 0), 0x1005_1AF4);
        assert_eq!(read32(&bus, at(0, 5, 0), 0x2C), 0x0004_1AF4);
        assert_eq!(
            read32(&bus, at(0, 5, 0), 0x3C) & 0xFFFF,
            0x0100 | intx_gsi(5, 0)
        );
        assert_eq!(read32(&bus, at(0, 5, 0), 0x10), 0x2001);
        assert_eq!(read32(&bus, at(0, 5, 0), 0x14), 0xC000_0000);
        assert_eq!(read32(&bus, at(0, 5, 0), 0x18), 0xC000_4000);
        assert_eq!(bus.mapped_bars(at(0, 5, 0)).len(), 3);
    }

    #[test]
    fn builds_ahci_functions_from_image_options() {
        // Two images: the disk's write lock would refuse a second opener of the same file.
        let hd = crate::block::test_util::TempImage::new("pci-ahci-hd", 1 << 20);
        let cd = crate::block::test_util::TempImage::new("pci-ahci-cd", 1 << 20);
        let options = |img: &crate::block::test_util::TempImage| {
            BlockOptions::parse(&img.path.to_string_lossy()).unwrap()
        };
        let bus = pci_bus(&[
            (4, DeviceKind::AhciHd(options(&hd))),
            (5, DeviceKind::AhciCd(options(&cd))),
        ])
        .unwrap();
        bus.allocate_bars(&BarWindows::for_memory(256 << 20))
            .unwrap();
        assert_eq!(read32(&bus, at(0, 4, 0), 0), 0x2821_8086);
        assert_eq!(read32(&bus, at(0, 5, 0), 8) >> 8, 0x01_06_01);
        assert_eq!(read32(&bus, at(0, 4, 0), 0x24), 0xC000_0000);
        assert_eq!(read32(&bus, at(0, 5, 0), 0x24), 0xC000_1000);
        let missing = BlockOptions::parse("/nonexistent/disk.img").unwrap();
        let err = pci_bus(&[(6, DeviceKind::AhciHd(missing))])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("PCI device 0:6:0: cannot open disk image"),
            "{err}"
        );
    }

    #[test]
    fn builds_shared_folder_functions() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/xhyve-pci-fs-").unwrap();
        let dir = tmp.as_path().display().to_string();
        let p9 = crate::config::P9Options::parse(Some(&format!("{dir},tag=t9"))).unwrap();
        let fs = crate::config::FsOptions::parse(Some(&format!("{dir},tag=tfs,ro"))).unwrap();
        let bus = pci_bus(&[(4, DeviceKind::Virtio9p(p9)), (5, DeviceKind::VirtioFs(fs))]).unwrap();
        assert_eq!(read32(&bus, at(0, 4, 0), 0), 0x1009_1AF4);
        assert_eq!(read32(&bus, at(0, 5, 0), 0), 0x105A_1AF4);
        let vs = crate::fs::options::parse_vsock(Some(&format!("guest_cid=3,path={dir}"))).unwrap();
        let bus = pci_bus(&[(6, DeviceKind::VirtioSock(vs))]).unwrap();
        assert_eq!(read32(&bus, at(0, 6, 0), 0), 0x1053_1AF4);
        assert!(tmp.as_path().join("connect").exists());
        let missing = crate::config::P9Options::parse(Some("/nonexistent/xhyve,tag=t")).unwrap();
        assert!(pci_bus(&[(4, DeviceKind::Virtio9p(missing))]).is_err());
    }

    #[test]
    fn builds_xhyve_default_devices() {
        let bus = pci_bus(&[(0, DeviceKind::Hostbridge), (31, DeviceKind::Lpc)]).unwrap();
        assert_eq!(read32(&bus, at(0, 0, 0), 0), 0x1275_1275);
        assert_eq!(read32(&bus, at(0, 31, 0), 0), 0x7000_8086);
        assert_eq!(read32(&bus, at(0, 31, 0), 8) >> 8, 0x06_01_00);
        assert_eq!(read32(&bus, at(0, 1, 0), 0), 0xFFFF_FFFF);
    }
}
