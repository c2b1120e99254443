//! The option strings of the shared-folder devices, parsed into typed configs (no I/O):
//!
//! - `virtio-9p,DIR,tag=TAG[,ro][,uid=N,gid=N]`: the built-in 9P2000.L server on DIR;
//! - `virtio-9p,path=SOCKET[,tag=TAG]` or `virtio-9p,port=N[,tag=TAG]`: HyperKit's form, every
//!   message forwarded to an external server (tag defaults to HyperKit's `plan9`);
//! - `virtio-fs,DIR,tag=TAG[,ro][,uid=N,gid=N]`: the in-process virtio-fs server;
//! - `virtio-sock,guest_cid=C,path=DIR[,guest_forwards=P1;P2]` (see `crate::vsock`).

use std::path::PathBuf;

use super::p9::forward::Target;
use super::IdMapping;
use crate::vsock::VsockConfig;

/// Longest 9P mount tag (the config space carries a 16-bit length; HyperKit stops at 256).
pub const MAX_9P_TAG: usize = 255;
/// The virtio-fs config space holds the tag in 36 bytes.
pub const MAX_FS_TAG: usize = 36;
/// HyperKit's default 9P tag.
pub const DEFAULT_9P_TAG: &str = "plan9";

/// Why a device option string is wrong.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("{device} needs a directory to share (DIR,tag=TAG)")]
    NoDirectory { device: &'static str },
    #[error("{device} needs tag=TAG")]
    NoTag { device: &'static str },
    #[error("tag \"{tag}\" is {len} bytes; {device} allows 1 to {max}")]
    BadTag {
        device: &'static str,
        tag: String,
        len: usize,
        max: usize,
    },
    #[error("invalid {key} value \"{value}\"")]
    BadNumber { key: &'static str, value: String },
    #[error("uid= and gid= go together")]
    HalfIdMap,
    #[error("unknown option \"{0}\"")]
    Unknown(String),
    #[error("give a directory, path=SOCKET or port=N, not more than one")]
    Conflicting,
    #[error("{0} is not supported yet")]
    NotSupportedYet(&'static str),
    #[error("virtio-sock needs guest_cid=C and path=DIR")]
    VsockIncomplete,
}

/// Where a 9P share's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum P9Backend {
    /// The built-in server on this directory.
    Dir {
        dir: PathBuf,
        read_only: bool,
        ids: IdMapping,
    },
    /// HyperKit's external server.
    Forward(Target),
}

/// `-s N,virtio-9p,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P9Options {
    pub tag: String,
    pub backend: P9Backend,
}

/// `-s N,virtio-fs,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsOptions {
    pub tag: String,
    pub dir: PathBuf,
    pub read_only: bool,
    pub ids: IdMapping,
}

fn number<T: std::str::FromStr>(key: &'static str, value: &str) -> Result<T, OptionsError> {
    value.parse().map_err(|_| OptionsError::BadNumber {
        key,
        value: value.into(),
    })
}

/// The fields both shares have.
#[derive(Default)]
struct Common {
    dir: Option<PathBuf>,
    tag: Option<String>,
    read_only: bool,
    uid: Option<u32>,
    gid: Option<u32>,
    path: Option<PathBuf>,
    port: Option<u16>,
    socket: Option<PathBuf>,
}

fn common(options: &str) -> Result<Common, OptionsError> {
    let mut c = Common::default();
    for (i, opt) in options.split(',').enumerate() {
        match opt.split_once('=') {
            Some(("tag", v)) => c.tag = Some(v.into()),
            Some(("uid", v)) => c.uid = Some(number("uid", v)?),
            Some(("gid", v)) => c.gid = Some(number("gid", v)?),
            Some(("path", v)) => c.path = Some(v.into()),
            Some(("port", v)) => {
                c.port = Some(number("port", v).and_then(|p: u16| {
                    if p == 0 {
                        Err(OptionsError::BadNumber {
                            key: "port",
                            value: v.into(),
                        })
                    } else {
                        Ok(p)
                    }
                })?)
            }
            Some(("socket", v)) => c.socket = Some(v.into()),
            None if opt == "ro" => c.read_only = true,
            None if i == 0 && !opt.is_empty() => c.dir = Some(opt.into()),
            _ => return Err(OptionsError::Unknown(opt.into())),
        }
    }
    Ok(c)
}

fn ids(c: &Common) -> Result<IdMapping, OptionsError> {
    match (c.uid, c.gid) {
        (None, None) => Ok(IdMapping::Passthrough),
        (Some(uid), Some(gid)) => Ok(IdMapping::Squash { uid, gid }),
        _ => Err(OptionsError::HalfIdMap),
    }
}

fn check_tag(device: &'static str, tag: String, max: usize) -> Result<String, OptionsError> {
    if tag.is_empty() || tag.len() > max {
        return Err(OptionsError::BadTag {
            device,
            len: tag.len(),
            tag,
            max,
        });
    }
    Ok(tag)
}

impl P9Options {
    pub fn parse(options: Option<&str>) -> Result<P9Options, OptionsError> {
        let device = "virtio-9p";
        let c = common(options.ok_or(OptionsError::NoDirectory { device })?)?;
        let forms = usize::from(c.dir.is_some())
            + usize::from(c.path.is_some())
            + usize::from(c.port.is_some());
        if forms > 1 || c.socket.is_some() {
            return Err(OptionsError::Conflicting);
        }
        let backend = match (&c.dir, &c.path, c.port) {
            (Some(dir), _, _) => P9Backend::Dir {
                dir: dir.clone(),
                read_only: c.read_only,
                ids: ids(&c)?,
            },
            (None, Some(path), _) => P9Backend::Forward(Target::Unix(path.clone())),
            (None, None, Some(port)) => P9Backend::Forward(Target::Tcp(port)),
            (None, None, None) => return Err(OptionsError::NoDirectory { device }),
        };
        let tag = match (&backend, c.tag) {
            (_, Some(t)) => t,
            (P9Backend::Forward(_), None) => DEFAULT_9P_TAG.into(),
            (P9Backend::Dir { .. }, None) => return Err(OptionsError::NoTag { device }),
        };
        if matches!(backend, P9Backend::Forward(_))
            && (c.read_only || c.uid.is_some() || c.gid.is_some())
        {
            // The external server decides those.
            return Err(OptionsError::Conflicting);
        }
        Ok(P9Options {
            tag: check_tag(device, tag, MAX_9P_TAG)?,
            backend,
        })
    }

    /// The virtio-9p configuration space: tag length (u16 LE) and the tag.
    pub fn config_space(&self) -> Vec<u8> {
        let mut v = (self.tag.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(self.tag.as_bytes());
        v
    }
}

impl FsOptions {
    pub fn parse(options: Option<&str>) -> Result<FsOptions, OptionsError> {
        let device = "virtio-fs";
        let c = common(options.ok_or(OptionsError::NoDirectory { device })?)?;
        if c.socket.is_some() {
            return Err(OptionsError::NotSupportedYet(
                "virtio-fs socket=PATH (an external vhost-user-fs daemon)",
            ));
        }
        if c.path.is_some() || c.port.is_some() {
            return Err(OptionsError::Conflicting);
        }
        let dir = c.dir.clone().ok_or(OptionsError::NoDirectory { device })?;
        let tag = c.tag.clone().ok_or(OptionsError::NoTag { device })?;
        Ok(FsOptions {
            tag: check_tag(device, tag, MAX_FS_TAG)?,
            dir,
            read_only: c.read_only,
            ids: ids(&c)?,
        })
    }

    /// The virtio-fs configuration space: the tag in 36 bytes (NUL-padded) and the number of
    /// request queues (u32 LE).
    pub fn config_space(&self, request_queues: u32) -> [u8; 40] {
        let mut v = [0u8; 40];
        v[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        v[36..].copy_from_slice(&request_queues.to_le_bytes());
        v
    }
}

/// `virtio-sock,guest_cid=C,path=DIR[,guest_forwards=P1;P2]`, as HyperKit reads it (ports in
/// decimal or 0x-hex).
pub fn parse_vsock(options: Option<&str>) -> Result<VsockConfig, OptionsError> {
    let (mut cid, mut dir, mut forwards) = (None, None, Vec::new());
    for opt in options.ok_or(OptionsError::VsockIncomplete)?.split(',') {
        match opt.split_once('=') {
            Some(("guest_cid", v)) => cid = Some(number::<u64>("guest_cid", v)?),
            Some(("path", v)) if !v.is_empty() => dir = Some(PathBuf::from(v)),
            Some(("guest_forwards", v)) => {
                for p in v.split(';').filter(|p| !p.is_empty()) {
                    let port = match p.strip_prefix("0x") {
                        Some(hex) => u32::from_str_radix(hex, 16).ok(),
                        None => p.parse().ok(),
                    };
                    forwards.push(port.filter(|&p| p != u32::MAX).ok_or(
                        OptionsError::BadNumber {
                            key: "guest_forwards",
                            value: p.into(),
                        },
                    )?);
                }
            }
            _ => return Err(OptionsError::Unknown(opt.into())),
        }
    }
    match (cid, dir) {
        (Some(guest_cid), Some(dir)) => Ok(VsockConfig {
            guest_cid,
            dir,
            guest_forwards: forwards,
        }),
        _ => Err(OptionsError::VsockIncomplete),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nine_p_forms() {
        let p = P9Options::parse(Some("/srv/share,tag=share,ro,uid=501,gid=20")).unwrap();
        assert_eq!(p.tag, "share");
        assert_eq!(
            p.backend,
            P9Backend::Dir {
                dir: "/srv/share".into(),
                read_only: true,
                ids: IdMapping::Squash { uid: 501, gid: 20 }
            }
        );
        assert_eq!(p.config_space(), b"\x05\x00share");
        let p = P9Options::parse(Some("path=/tmp/9p.sock,tag=port")).unwrap();
        assert_eq!(
            p.backend,
            P9Backend::Forward(Target::Unix("/tmp/9p.sock".into()))
        );
        assert_eq!(
            P9Options::parse(Some("port=5640")).unwrap(),
            P9Options {
                tag: "plan9".into(),
                backend: P9Backend::Forward(Target::Tcp(5640))
            }
        );
        for (bad, err) in [
            (
                Some("/d"),
                OptionsError::NoTag {
                    device: "virtio-9p",
                },
            ),
            (
                None,
                OptionsError::NoDirectory {
                    device: "virtio-9p",
                },
            ),
            (Some("/d,path=/s,tag=t"), OptionsError::Conflicting),
            (Some("path=/s,port=3,tag=t"), OptionsError::Conflicting),
            (Some("path=/s,ro"), OptionsError::Conflicting),
            (Some("/d,tag=t,uid=5"), OptionsError::HalfIdMap),
            (
                Some("/d,tag=t,uid=x,gid=1"),
                OptionsError::BadNumber {
                    key: "uid",
                    value: "x".into(),
                },
            ),
            (
                Some("/d,tag=t,bogus"),
                OptionsError::Unknown("bogus".into()),
            ),
            (
                Some("port=0"),
                OptionsError::BadNumber {
                    key: "port",
                    value: "0".into(),
                },
            ),
            (
                Some("/d,tag="),
                OptionsError::BadTag {
                    device: "virtio-9p",
                    tag: String::new(),
                    len: 0,
                    max: 255,
                },
            ),
        ] {
            assert_eq!(P9Options::parse(bad), Err(err), "{bad:?}");
        }
    }

    #[test]
    fn virtiofs_forms() {
        let f = FsOptions::parse(Some("/home,tag=home")).unwrap();
        assert_eq!(
            (f.dir.to_str(), f.read_only, f.ids),
            (Some("/home"), false, IdMapping::Passthrough)
        );
        let cfg = f.config_space(1);
        assert_eq!(&cfg[..5], b"home\0");
        assert_eq!(&cfg[36..], &[1, 0, 0, 0]);
        assert!(matches!(
            FsOptions::parse(Some("/home,tag=home,socket=/tmp/vfsd.sock")),
            Err(OptionsError::NotSupportedYet(_))
        ));
        let long = format!("/home,tag={}", "t".repeat(37));
        assert!(matches!(
            FsOptions::parse(Some(&long)),
            Err(OptionsError::BadTag { len: 37, .. })
        ));
        assert_eq!(
            FsOptions::parse(Some("tag=x")),
            Err(OptionsError::NoDirectory {
                device: "virtio-fs"
            })
        );
    }

    #[test]
    fn vsock_forms() {
        let v = parse_vsock(Some("guest_cid=3,path=/tmp/vs,guest_forwards=2375;0x50")).unwrap();
        assert_eq!(
            v,
            VsockConfig {
                guest_cid: 3,
                dir: "/tmp/vs".into(),
                guest_forwards: vec![2375, 0x50]
            }
        );
        assert_eq!(
            parse_vsock(Some("guest_cid=3")),
            Err(OptionsError::VsockIncomplete)
        );
        assert_eq!(
            parse_vsock(Some("path=/x")),
            Err(OptionsError::VsockIncomplete)
        );
        assert!(matches!(
            parse_vsock(Some("guest_cid=3,path=/x,guest_forwards=1;z")),
            Err(OptionsError::BadNumber { .. })
        ));
        assert!(matches!(
            parse_vsock(Some("guest_cid=3,path=/x,y=1")),
            Err(OptionsError::Unknown(_))
        ));
    }
}
