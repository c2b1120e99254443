//! `--restful-uri`: where the control API listens, as vfkit spells it.
//!
//! `unix:///absolute/path` (a socket created 0600), `tcp://127.0.0.1:PORT` (or `localhost`,
//! `[::1]`; `http://` is the same, as in vfkit), or `none://` for no API. A TCP address off
//! the loopback interface is refused: whoever reaches the API can stop the VM.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use super::{CliError, RestEndpoint};

/// The longest socket path every host takes (macOS `sun_path` is 104 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 103;

pub fn parse_rest_uri(value: &str) -> Result<Option<RestEndpoint>, CliError> {
    let bad = |reason: &str| CliError::InvalidRestfulUri {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(bad("expected unix:///PATH or tcp://127.0.0.1:PORT"));
    };
    match scheme {
        "none" => Ok(None),
        "unix" => {
            if rest.is_empty() || !rest.starts_with('/') {
                return Err(bad("unix:// needs an absolute socket path"));
            }
            if rest.len() > MAX_SOCKET_PATH {
                return Err(bad("socket path longer than 103 bytes"));
            }
            Ok(Some(RestEndpoint::Unix(PathBuf::from(rest))))
        }
        "tcp" | "http" => {
            if rest.contains('/') {
                return Err(bad("a TCP URI takes no path"));
            }
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("a TCP URI needs a port"))?;
            let port: u16 = port.parse().map_err(|_| bad("the port must be 0-65535"))?;
            let ip = match host.trim_start_matches('[').trim_end_matches(']') {
                "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
                other => other
                    .parse::<IpAddr>()
                    .map_err(|_| bad("the host must be a loopback address"))?,
            };
            if !ip.is_loopback() {
                return Err(bad("the host must be a loopback address (127.0.0.1, ::1)"));
            }
            Ok(Some(RestEndpoint::Tcp(SocketAddr::new(ip, port))))
        }
        _ => Err(bad("unknown scheme; expected unix, tcp or none")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfkit_forms() {
        assert_eq!(
            parse_rest_uri("unix:///run/vm/rest.sock").unwrap(),
            Some(RestEndpoint::Unix("/run/vm/rest.sock".into()))
        );
        assert_eq!(
            parse_rest_uri("tcp://127.0.0.1:8081").unwrap(),
            Some(RestEndpoint::Tcp("127.0.0.1:8081".parse().unwrap()))
        );
        assert_eq!(
            parse_rest_uri("http://localhost:80").unwrap(),
            Some(RestEndpoint::Tcp("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            parse_rest_uri("tcp://[::1]:9").unwrap(),
            Some(RestEndpoint::Tcp("[::1]:9".parse().unwrap()))
        );
        assert_eq!(parse_rest_uri("none://").unwrap(), None);
    }

    #[test]
    fn errors_name_the_value() {
        for (value, reason) in [
            ("unix://", "absolute socket path"),
            ("unix://rel/x", "absolute socket path"),
            ("tcp://0.0.0.0:80", "loopback"),
            ("tcp://10.1.2.3:80", "loopback"),
            ("tcp://127.0.0.1", "needs a port"),
            ("tcp://127.0.0.1:99999", "0-65535"),
            ("tcp://127.0.0.1:80/x", "no path"),
            ("ftp://x", "unknown scheme"),
            ("/tmp/sock", "expected unix"),
        ] {
            let err = parse_rest_uri(value).unwrap_err().to_string();
            assert!(
                err.contains(&format!("\"{value}\"")) && err.contains(reason),
                "{value}: {err}"
            );
        }
        let long = format!("unix:///{}", "a".repeat(120));
        assert!(parse_rest_uri(&long).is_err());
    }
}
