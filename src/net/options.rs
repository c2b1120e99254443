//! Options of the network devices, parsed once by the command line and handed to the device
//! manager as they are: `virtio-tap,tapN[,mac=xx:xx:xx:xx:xx:xx]` (Linux), and `virtio-net`
//! with the back end its options name:
//!
//! ```text
//! virtio-net[,mac=M]                       vmnet on macOS (xhyve), the built-in network elsewhere
//! virtio-net,user[,hostfwd=...][,restrict][,dns=off][,mac=M]   the built-in network (libslirp)
//! virtio-net,socket=PATH[,mac=M]           a daemon on a Unix stream socket (QEMU framing: passt, gvproxy)
//! virtio-net,dgram=PATH[,local=LPATH][,mac=M]  a daemon on a Unix datagram socket (socket_vmnet, vfkit-style gvproxy)
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use super::{valid_interface_name, MacAddr, MacError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetOptionsError {
    #[error("tap name \"{0}\" must be 1-15 letters, digits, '-', '_' or '.' (e.g. tap0)")]
    TapName(String),
    #[error(transparent)]
    Mac(#[from] MacError),
    #[error("mac= given twice")]
    MacTwice,
    #[error("unknown option \"{0}\"")]
    Unknown(String),
    #[error("{0} given twice")]
    Twice(&'static str),
    #[error("choose one back end: \"{0}\" conflicts with \"{1}\"")]
    Conflict(String, String),
    #[error("\"{0}\" needs the built-in network (user)")]
    NeedsUser(String),
    #[error("{0}= needs a path")]
    EmptyPath(&'static str),
    #[error("invalid hostfwd \"{0}\": expected tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT")]
    HostFwd(String),
    #[error("invalid dns \"{0}\": expected dns=on or dns=off")]
    Dns(String),
}

/// `virtio-tap` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapOptions {
    /// The host interface, e.g. `tap0`.
    pub name: String,
    /// `mac=`: overrides the MAC derived from `-U`.
    pub mac: Option<MacAddr>,
}

impl TapOptions {
    /// Parses everything after `virtio-tap,` (absent: an error naming the empty tap).
    pub fn parse(options: Option<&str>) -> Result<Self, NetOptionsError> {
        let mut fields = options.unwrap_or_default().split(',');
        let name = fields.next().unwrap_or_default();
        if !valid_interface_name(name) {
            return Err(NetOptionsError::TapName(name.to_string()));
        }
        Ok(TapOptions {
            name: name.to_string(),
            mac: parse_mac_option(fields)?,
        })
    }
}

/// The only option the network devices share: at most one `mac=`.
fn parse_mac_option<'a>(
    fields: impl Iterator<Item = &'a str>,
) -> Result<Option<MacAddr>, NetOptionsError> {
    let mut mac = None;
    for field in fields {
        match field.split_once('=') {
            Some(("mac", value)) if mac.is_none() => mac = Some(value.parse()?),
            Some(("mac", _)) => return Err(NetOptionsError::MacTwice),
            _ => return Err(NetOptionsError::Unknown(field.to_string())),
        }
    }
    Ok(mac)
}

/// A host port forward: connections (TCP) or datagrams (UDP) to `host` reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFwd {
    pub udp: bool,
    pub host: SocketAddrV4,
    /// `None`: the address the built-in DHCP server hands out first.
    pub guest_addr: Option<Ipv4Addr>,
    pub guest_port: u16,
}

/// Settings of the built-in network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserNetOptions {
    pub hostfwd: Vec<HostFwd>,
    /// The guest reaches nothing but its forwards (and the stack's own DHCP and DNS).
    pub restrict: bool,
    /// `dns=off`: the virtual DNS server (10.0.2.3) forwards nothing to the host's resolvers.
    pub no_dns: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendKind {
    /// No back end named: vmnet on macOS, the built-in network elsewhere.
    Default,
    User(UserNetOptions),
    /// A Unix stream socket speaking QEMU's framing (4-byte big-endian length, then the frame).
    Stream(PathBuf),
    /// A Unix datagram socket, one frame per datagram; `local` is our own socket's path.
    Dgram {
        path: PathBuf,
        local: Option<PathBuf>,
    },
}

/// `virtio-net` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    pub backend: NetBackendKind,
    /// `mac=`: the guest's MAC instead of the derived (or vmnet-assigned) one.
    pub mac: Option<MacAddr>,
}

impl NetOptions {
    /// Parses everything after `virtio-net,` (`None`: nothing was given).
    pub fn parse(options: Option<&str>) -> Result<Self, NetOptionsError> {
        parse_net_options(options)
    }

    /// Whether this device needs vmnet (macOS's default back end).
    pub fn uses_vmnet(&self) -> bool {
        cfg!(target_os = "macos") && self.backend == NetBackendKind::Default
    }
}

/// Parses everything after `virtio-net,` (`None`: nothing was given).
pub fn parse_net_options(options: Option<&str>) -> Result<NetOptions, NetOptionsError> {
    let mut mac = None;
    let mut backend: Option<(String, NetBackendKind)> = None;
    let mut user = UserNetOptions::default();
    let mut user_only: Option<String> = None;
    let mut local: Option<PathBuf> = None;
    let mut dns_seen = false;
    let mut set_backend = |field: &str, kind: NetBackendKind| match &backend {
        Some((first, _)) => Err(NetOptionsError::Conflict(first.clone(), field.into())),
        None => {
            backend = Some((field.into(), kind));
            Ok(())
        }
    };
    for field in options.into_iter().flat_map(|o| o.split(',')) {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (field, None),
        };
        match (key, value) {
            ("mac", Some(v)) => {
                if mac.is_some() {
                    return Err(NetOptionsError::MacTwice);
                }
                mac = Some(v.parse()?);
            }
            ("user", None) => set_backend(field, NetBackendKind::User(Default::default()))?,
            ("socket", Some(path)) => {
                set_backend(field, NetBackendKind::Stream(non_empty("socket", path)?))?
            }
            ("dgram", Some(path)) => set_backend(
                field,
                NetBackendKind::Dgram {
                    path: non_empty("dgram", path)?,
                    local: None,
                },
            )?,
            ("local", Some(path)) => {
                if local.replace(non_empty("local", path)?).is_some() {
                    return Err(NetOptionsError::Twice("local="));
                }
            }
            ("hostfwd", Some(spec)) => {
                user.hostfwd.push(parse_hostfwd(spec)?);
                user_only.get_or_insert_with(|| field.into());
            }
            ("restrict", None) => {
                user.restrict = true;
                user_only.get_or_insert_with(|| field.into());
            }
            ("dns", Some(v)) => {
                if std::mem::replace(&mut dns_seen, true) {
                    return Err(NetOptionsError::Twice("dns="));
                }
                user.no_dns = match v {
                    "on" => false,
                    "off" => true,
                    _ => return Err(NetOptionsError::Dns(v.into())),
                };
                user_only.get_or_insert_with(|| field.into());
            }
            _ => return Err(NetOptionsError::Unknown(field.into())),
        }
    }
    let backend = match backend.map(|(_, kind)| kind) {
        Some(NetBackendKind::User(_)) => NetBackendKind::User(user),
        // Linux has no vmnet: the plain device is the built-in network, and takes its options.
        None if !cfg!(target_os = "macos") => NetBackendKind::User(user),
        other => {
            if let Some(field) = user_only {
                return Err(NetOptionsError::NeedsUser(field));
            }
            other.unwrap_or(NetBackendKind::Default)
        }
    };
    let backend = match (backend, local) {
        (NetBackendKind::Dgram { path, .. }, local) => NetBackendKind::Dgram { path, local },
        (_, Some(_)) => return Err(NetOptionsError::Unknown("local= (only with dgram=)".into())),
        (backend, None) => backend,
    };
    Ok(NetOptions { backend, mac })
}

fn non_empty(key: &'static str, path: &str) -> Result<PathBuf, NetOptionsError> {
    if path.is_empty() {
        return Err(NetOptionsError::EmptyPath(key));
    }
    Ok(PathBuf::from(path))
}

/// QEMU's syntax, `tcp:127.0.0.1:2222-:22`. An empty host address is 127.0.0.1 (QEMU binds
/// every interface there; a guest's ports stay private unless the user names an address).
fn parse_hostfwd(spec: &str) -> Result<HostFwd, NetOptionsError> {
    let bad = || NetOptionsError::HostFwd(spec.into());
    let (proto, rest) = spec.split_once(':').ok_or_else(bad)?;
    let udp = match proto {
        "tcp" | "" => false,
        "udp" => true,
        _ => return Err(bad()),
    };
    let (host, guest) = rest.split_once('-').ok_or_else(bad)?;
    let (host_addr, host_port) = host.split_once(':').ok_or_else(bad)?;
    let (guest_addr, guest_port) = guest.split_once(':').ok_or_else(bad)?;
    let addr = |a: &str| -> Result<Option<Ipv4Addr>, NetOptionsError> {
        if a.is_empty() {
            Ok(None)
        } else {
            a.parse().map(Some).map_err(|_| bad())
        }
    };
    let port = |p: &str| -> Result<u16, NetOptionsError> {
        p.parse().ok().filter(|&p| p != 0).ok_or_else(bad)
    };
    Ok(HostFwd {
        udp,
        host: SocketAddrV4::new(
            addr(host_addr)?.unwrap_or(Ipv4Addr::LOCALHOST),
            // Port 0 on the host would be a random port nobody could find.
            port(host_port)?,
        ),
        guest_addr: addr(guest_addr)?,
        guest_port: port(guest_port)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(options: &str) -> String {
        TapOptions::parse(Some(options)).unwrap_err().to_string()
    }

    #[test]
    fn name_and_mac() {
        assert_eq!(
            TapOptions::parse(Some("tap0")).unwrap(),
            TapOptions {
                name: "tap0".into(),
                mac: None
            }
        );
        assert_eq!(
            TapOptions::parse(Some("tap12,mac=02:00:00:00:00:07"))
                .unwrap()
                .mac,
            Some(MacAddr([2, 0, 0, 0, 0, 7]))
        );
    }

    #[test]
    fn bad_options_name_the_value() {
        assert_eq!(
            TapOptions::parse(None).unwrap_err().to_string(),
            "tap name \"\" must be 1-15 letters, digits, '-', '_' or '.' (e.g. tap0)"
        );
        assert!(error("tap/0").contains("tap name \"tap/0\""));
        assert!(error("a234567890123456").contains("tap name"));
        assert_eq!(
            error("tap0,mac=zz"),
            "invalid MAC address \"zz\": expected xx:xx:xx:xx:xx:xx"
        );
        assert!(error("tap0,mac=01:00:00:00:00:01").contains("multicast"));
        assert_eq!(error("tap0,speed=10"), "unknown option \"speed=10\"");
        assert!(error("tap0,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02").contains("twice"));
    }

    fn user(options: &str) -> UserNetOptions {
        match parse_net_options(Some(options)).unwrap().backend {
            NetBackendKind::User(u) => u,
            other => panic!("{options}: {other:?}"),
        }
    }

    fn err(options: &str) -> String {
        parse_net_options(Some(options)).unwrap_err().to_string()
    }

    #[test]
    fn the_plain_device_is_vmnet_on_macos_and_user_elsewhere() {
        let plain = parse_net_options(None).unwrap();
        assert_eq!(plain.mac, None);
        if cfg!(target_os = "macos") {
            assert_eq!(plain.backend, NetBackendKind::Default);
            assert!(plain.uses_vmnet());
        } else {
            assert_eq!(plain.backend, NetBackendKind::User(Default::default()));
            assert!(!plain.uses_vmnet());
        }
        let with_mac = parse_net_options(Some("mac=02:00:00:00:00:07")).unwrap();
        assert_eq!(with_mac.mac, Some(MacAddr([2, 0, 0, 0, 0, 7])));
    }

    #[test]
    fn user_takes_forwards_restrict_and_dns() {
        let u = user(
            "user,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-10.0.2.15:53,restrict,dns=off",
        );
        assert_eq!(
            u.hostfwd,
            vec![
                HostFwd {
                    udp: false,
                    host: "127.0.0.1:2222".parse().unwrap(),
                    guest_addr: None,
                    guest_port: 22
                },
                HostFwd {
                    udp: true,
                    host: "127.0.0.1:5353".parse().unwrap(),
                    guest_addr: Some(Ipv4Addr::new(10, 0, 2, 15)),
                    guest_port: 53
                },
            ]
        );
        assert!(u.restrict && u.no_dns);
        assert_eq!(user("user"), UserNetOptions::default());
        assert!(!user("user,dns=on").no_dns);
        assert_eq!(
            user("hostfwd=tcp:0.0.0.0:80-:8080,user").hostfwd[0].host,
            "0.0.0.0:80".parse().unwrap()
        );
    }

    #[test]
    fn sockets_take_a_path() {
        let s = parse_net_options(Some("socket=/run/passt.sock,mac=02:00:00:00:00:01")).unwrap();
        assert_eq!(s.backend, NetBackendKind::Stream("/run/passt.sock".into()));
        assert_eq!(
            parse_net_options(Some("dgram=/tmp/d.sock,local=/tmp/me.sock"))
                .unwrap()
                .backend,
            NetBackendKind::Dgram {
                path: "/tmp/d.sock".into(),
                local: Some("/tmp/me.sock".into())
            }
        );
        assert_eq!(err("socket="), "socket= needs a path");
    }

    #[test]
    fn bad_options_are_named() {
        assert_eq!(err("speed=10"), "unknown option \"speed=10\"");
        assert_eq!(
            err("user,socket=/x"),
            "choose one back end: \"user\" conflicts with \"socket=/x\""
        );
        assert_eq!(
            err("socket=/x,restrict"),
            "\"restrict\" needs the built-in network (user)"
        );
        assert_eq!(
            err("dgram=/x,hostfwd=tcp::1-:2"),
            "\"hostfwd=tcp::1-:2\" needs the built-in network (user)"
        );
        assert_eq!(
            err("user,local=/x"),
            "unknown option \"local= (only with dgram=)\""
        );
        assert_eq!(
            err("mac=1,mac=2"),
            "invalid MAC address \"1\": expected xx:xx:xx:xx:xx:xx"
        );
        assert_eq!(
            err("mac=02:00:00:00:00:01,mac=02:00:00:00:00:02"),
            "mac= given twice"
        );
        assert_eq!(
            err("user,dns=maybe"),
            "invalid dns \"maybe\": expected dns=on or dns=off"
        );
        for bad in [
            "hostfwd=tcp:1-:2",
            "hostfwd=icmp::1-:2",
            "hostfwd=tcp::0-:22",
            "hostfwd=tcp::70000-:22",
            "hostfwd=tcp:host:1-:22",
            "hostfwd=tcp::22",
            "hostfwd=",
        ] {
            assert!(
                err(&format!("user,{bad}")).starts_with("invalid hostfwd"),
                "{bad}"
            );
        }
    }
}
