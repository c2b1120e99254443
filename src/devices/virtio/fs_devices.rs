//! The shared-folder devices: virtio-9p (`-s N,virtio-9p,...`, device ID 9) and virtio-fs
//! (`-s N,virtio-fs,...`, device ID 26). Both are request/reply queues over a server built
//! from the typed options (`crate::fs::options`); the servers and the confinement live in
//! `crate::fs`, the chain handling in [`super::fs_queue`].

use virtio_queue::Queue;

use super::fs_queue::{RequestQueue, RequestServer};
use super::pci::{VirtioPci, VirtioPciError, VirtioPciResources};
use super::queue_worker::{QueueWorker, VirtioQueues};
use super::{ActivateError, Activation, QueueError, VirtioDevice};
use crate::devices::{BuiltDevice, DeviceHandle};
use crate::fs::options::{FsOptions, P9Backend, P9Options};
use crate::fs::sandbox::{FsError, Share};
use crate::fs::{fuse, p9};
use crate::memory::GuestMemory;

const DEVICE_TYPE_9P: u16 = 9;
const DEVICE_TYPE_FS: u16 = 26;
/// VIRTIO_9P_MOUNT_TAG: the configuration space carries the tag.
const F_9P_MOUNT_TAG: u64 = 1;
/// HyperKit's 9P ring size; Linux's 9P client fits 512 KiB messages in 128 descriptors.
const QUEUE_SIZE_9P: u16 = 256;
/// virtio-fs: the high-priority queue (FORGET, INTERRUPT) and one request queue.
const QUEUE_SIZES_FS: [u16; 2] = [128, 256];
/// PCI class "other" for 9P as HyperKit presents it; mass storage "other" for virtio-fs.
const PCI_CLASS_9P: (u8, u8, u8) = (0xff, 0x00, 0x00);
const PCI_CLASS_FS: (u8, u8, u8) = (0x01, 0x80, 0x00);

/// Why a share could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ShareDeviceError {
    #[error("{device} {dir:?}: {source}")]
    Share {
        device: &'static str,
        dir: std::path::PathBuf,
        source: FsError,
    },
    #[error(transparent)]
    Pci(#[from] VirtioPciError),
}

impl RequestServer for Box<dyn RequestServer> {
    fn max_request(&self) -> usize {
        (**self).max_request()
    }
    fn serve(&mut self, req: &[u8], reply: &mut Vec<u8>) -> bool {
        (**self).serve(req, reply)
    }
}

/// Serves every queue of the device with the one server.
pub struct ServerQueues(RequestQueue<Box<dyn RequestServer>>);

impl VirtioQueues for ServerQueues {
    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, QueueError> {
        self.0.process(queue, memory)
    }
}

/// A request/reply device: its identity, configuration space and worker.
pub struct ShareDevice {
    device_type: u16,
    pci_class: (u8, u8, u8),
    features: u64,
    queue_sizes: &'static [u16],
    config: Vec<u8>,
    worker: QueueWorker<ServerQueues>,
}

impl ShareDevice {
    fn build(
        device: ShareDevice,
        transport: VirtioPciResources,
    ) -> Result<BuiltDevice, ShareDeviceError> {
        let handle = device.worker.handle();
        let function = VirtioPci::new(device, transport)?;
        Ok(BuiltDevice {
            function: std::sync::Arc::new(std::sync::Mutex::new(function)),
            handle: Some(handle),
        })
    }

    /// `-s N,virtio-9p,...`: the built-in server on DIR, or HyperKit's forwarder.
    pub fn build_9p(
        options: &P9Options,
        transport: VirtioPciResources,
    ) -> Result<BuiltDevice, ShareDeviceError> {
        let server: Box<dyn RequestServer> = match &options.backend {
            P9Backend::Dir {
                dir,
                read_only,
                ids,
            } => {
                let share =
                    Share::new(dir, *read_only).map_err(|source| ShareDeviceError::Share {
                        device: "virtio-9p",
                        dir: dir.clone(),
                        source,
                    })?;
                Box::new(p9::Server::new(
                    share,
                    p9::Options {
                        ids: *ids,
                        ..Default::default()
                    },
                ))
            }
            P9Backend::Forward(target) => Box::new(p9::forward::Forwarder::new(target.clone())),
        };
        let worker = QueueWorker::new("virtio-9p", ServerQueues(RequestQueue::new(server)))
            .map_err(VirtioPciError::Notifier)?;
        let device = ShareDevice {
            device_type: DEVICE_TYPE_9P,
            pci_class: PCI_CLASS_9P,
            features: F_9P_MOUNT_TAG,
            queue_sizes: &[QUEUE_SIZE_9P],
            config: options.config_space(),
            worker,
        };
        Self::build(device, transport)
    }

    /// `-s N,virtio-fs,DIR,tag=TAG[,ro][,uid=N,gid=N]`.
    pub fn build_fs(
        options: &FsOptions,
        transport: VirtioPciResources,
    ) -> Result<BuiltDevice, ShareDeviceError> {
        let share = Share::new(&options.dir, options.read_only).map_err(|source| {
            ShareDeviceError::Share {
                device: "virtio-fs",
                dir: options.dir.clone(),
                source,
            }
        })?;
        let server: Box<dyn RequestServer> = Box::new(fuse::Server::new(
            share,
            fuse::Options {
                ids: options.ids,
                ..Default::default()
            },
        ));
        let worker = QueueWorker::new("virtio-fs", ServerQueues(RequestQueue::new(server)))
            .map_err(VirtioPciError::Notifier)?;
        let device = ShareDevice {
            device_type: DEVICE_TYPE_FS,
            pci_class: PCI_CLASS_FS,
            features: 0,
            queue_sizes: &QUEUE_SIZES_FS,
            config: options.config_space(1).to_vec(),
            worker,
        };
        Self::build(device, transport)
    }
}

impl VirtioDevice for ShareDevice {
    fn device_type(&self) -> u16 {
        self.device_type
    }
    fn pci_class(&self) -> (u8, u8, u8) {
        self.pci_class
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.queue_sizes
    }
    fn config_size(&self) -> u64 {
        self.config.len() as u64
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Reads past the end (or straddling it) see zeros.
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| self.config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.worker.activate(activation)
    }
    fn reset(&mut self) {
        self.worker.reset();
    }
    fn handle(&self) -> Option<Box<dyn DeviceHandle>> {
        Some(self.worker.handle())
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn device_9p(tag: &str, dir: &std::path::Path) -> ShareDevice {
        let opts = P9Options::parse(Some(&format!("{},tag={tag}", dir.display()))).unwrap();
        let share = Share::new(dir, false).unwrap();
        let server: Box<dyn RequestServer> = Box::new(p9::Server::new(share, Default::default()));
        ShareDevice {
            device_type: DEVICE_TYPE_9P,
            pci_class: PCI_CLASS_9P,
            features: F_9P_MOUNT_TAG,
            queue_sizes: &[QUEUE_SIZE_9P],
            config: opts.config_space(),
            worker: QueueWorker::new("virtio-9p", ServerQueues(RequestQueue::new(server))).unwrap(),
        }
    }

    #[test]
    fn config_space_carries_the_tag_and_reads_past_it_are_zero() {
        let tmp = TempDir::new_with_prefix("/tmp/xhyve-9pdev-").unwrap();
        let d = device_9p("hostshare", tmp.as_path());
        assert_eq!(
            (d.device_type(), d.device_features(), d.config_size()),
            (9, 1, 11)
        );
        let mut b = [0u8; 4];
        d.read_config(0, &mut b);
        assert_eq!(b, [9, 0, b'h', b'o']);
        d.read_config(9, &mut b);
        assert_eq!(b, [b'r', b'e', 0, 0]);
        d.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
