//! `-l DEVICE,CONFIG`: the LPC bridge's COM ports (xhyve's `lpc_device_parse`, with HyperKit's
//! chained back ends).
//!
//! CONFIG is a comma-separated list, as in HyperKit's `uart_set_backend`: exactly one terminal
//! (`stdio`, `autopty`, `autopty=PATH`, `null` or a tty path) plus, optionally, `log=PATH` (the
//! console ring) and `asl` (the macOS system log), in any order. Consecutive items that are no
//! keyword are joined back with their commas into one tty path, so xhyve's "the whole rest is
//! the path" still holds for a path containing a comma.

use std::path::PathBuf;

use super::{CliError, SerialBackend, SerialConfig};

/// The COM ports configured so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SerialPorts {
    pub com1: Option<SerialConfig>,
    pub com2: Option<SerialConfig>,
}

impl SerialPorts {
    /// Applies one `-l` argument. The device name is case-insensitive (as xhyve's strcasecmp);
    /// the back ends are case-sensitive.
    pub fn add(&mut self, value: &str) -> Result<(), CliError> {
        let invalid = |reason: String| CliError::InvalidLpc {
            value: value.to_string(),
            reason,
        };
        let (device, config) = match value.split_once(',') {
            Some((device, config)) => (device, Some(config)),
            None => (value, None),
        };
        let device = device.to_ascii_lowercase();
        if device == "bootrom" {
            return Err(CliError::NotSupportedYet("-l bootrom".to_string()));
        }
        let config = match config {
            Some("") | None => return Err(invalid("backend required".into())),
            Some(config) => parse_config(config).map_err(invalid)?,
        };
        let uses_stdio = |c: &Option<SerialConfig>| {
            c.as_ref()
                .is_some_and(|c| c.backend == SerialBackend::Stdio)
        };
        if config.backend == SerialBackend::Stdio
            && (uses_stdio(&self.com1) || uses_stdio(&self.com2))
        {
            return Err(invalid("stdio is already used by another port".into()));
        }
        let port = match device.as_str() {
            "com1" => &mut self.com1,
            "com2" => &mut self.com2,
            _ => return Err(invalid("unknown device; expected com1 or com2".into())),
        };
        if port.is_some() {
            return Err(invalid("port already configured".into()));
        }
        *port = Some(config);
        Ok(())
    }
}

/// One item of the chain.
enum Item<'a> {
    Backend(SerialBackend),
    Log(&'a str),
    Asl,
    /// Not a keyword: part of a tty path.
    PathPart(&'a str),
}

fn classify(item: &str) -> Item<'_> {
    match item {
        "stdio" => Item::Backend(SerialBackend::Stdio),
        "autopty" => Item::Backend(SerialBackend::Autopty(None)),
        "null" => Item::Backend(SerialBackend::Null),
        "asl" => Item::Asl,
        _ => {
            if let Some(link) = item.strip_prefix("autopty=") {
                Item::Backend(SerialBackend::Autopty(Some(PathBuf::from(link))))
            } else if let Some(path) = item.strip_prefix("log=") {
                Item::Log(path)
            } else {
                Item::PathPart(item)
            }
        }
    }
}

fn parse_config(config: &str) -> Result<SerialConfig, String> {
    let mut backends = Vec::new();
    let mut log_ring = None;
    let mut asl = false;
    let mut path: Option<String> = None;
    let flush_path = |path: &mut Option<String>, backends: &mut Vec<SerialBackend>| {
        if let Some(p) = path.take() {
            backends.push(SerialBackend::Tty(PathBuf::from(p)));
        }
    };
    for item in config.split(',') {
        match classify(item) {
            Item::PathPart(part) => match &mut path {
                Some(p) => {
                    p.push(',');
                    p.push_str(part);
                }
                None => path = Some(part.to_string()),
            },
            other => {
                flush_path(&mut path, &mut backends);
                match other {
                    Item::Backend(SerialBackend::Autopty(Some(link)))
                        if link.as_os_str().is_empty() =>
                    {
                        return Err("autopty= needs a path".into())
                    }
                    Item::Backend(b) => backends.push(b),
                    Item::Log("") => return Err("log= needs a path".into()),
                    Item::Log(_) if log_ring.is_some() => {
                        return Err("log= given more than once".into())
                    }
                    Item::Log(p) => log_ring = Some(PathBuf::from(p)),
                    Item::Asl if asl => return Err("asl given more than once".into()),
                    Item::Asl => asl = true,
                    Item::PathPart(_) => {}
                }
            }
        }
    }
    flush_path(&mut path, &mut backends);
    if backends
        .iter()
        .any(|b| matches!(b, SerialBackend::Tty(p) if p.as_os_str().is_empty()))
    {
        return Err("empty item".into());
    }
    let backend = match backends.len() {
        0 => {
            return Err("a terminal is required: stdio, autopty[=PATH], null or a tty path".into())
        }
        1 => backends.remove(0),
        _ => {
            return Err(
                "more than one terminal; give one of stdio, autopty[=PATH], null or a tty path"
                    .into(),
            )
        }
    };
    Ok(SerialConfig {
        backend,
        log_ring,
        asl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(ports: &mut SerialPorts, value: &str) -> CliError {
        let err = ports.add(value).unwrap_err();
        assert_eq!(
            err.exit_code(),
            if value.starts_with("bootrom") { 1 } else { 64 }
        );
        err
    }

    #[test]
    fn backends() {
        let mut ports = SerialPorts::default();
        ports.add("com1,stdio").unwrap();
        ports.add("COM2,/dev/pts/3").unwrap();
        assert_eq!(ports.com1, Some(SerialConfig::new(SerialBackend::Stdio)));
        assert_eq!(
            ports.com2,
            Some(SerialConfig::new(SerialBackend::Tty("/dev/pts/3".into())))
        );

        let mut ports = SerialPorts::default();
        ports.add("Com2,autopty").unwrap();
        assert_eq!(ports.com1, None);
        assert_eq!(
            ports.com2,
            Some(SerialConfig::new(SerialBackend::Autopty(None)))
        );
    }

    #[test]
    fn backend_is_the_whole_rest_and_case_sensitive() {
        let mut ports = SerialPorts::default();
        ports.add("com1,/tmp/a,b").unwrap();
        ports.add("com2,STDIO").unwrap();
        assert_eq!(
            ports.com1,
            Some(SerialConfig::new(SerialBackend::Tty("/tmp/a,b".into())))
        );
        assert_eq!(
            ports.com2,
            Some(SerialConfig::new(SerialBackend::Tty("STDIO".into())))
        );
    }

    #[test]
    fn errors_use_xhyve_text_and_ex_usage() {
        let mut ports = SerialPorts::default();
        ports.add("com1,autopty").unwrap();
        assert_eq!(
            error(&mut ports, "com1,stdio").to_string(),
            "invalid lpc device configuration 'com1,stdio': port already configured"
        );
        assert_eq!(
            error(&mut ports, "com3,stdio").to_string(),
            "invalid lpc device configuration 'com3,stdio': unknown device; expected com1 or com2"
        );
        assert_eq!(
            error(&mut ports, "com2,").to_string(),
            "invalid lpc device configuration 'com2,': backend required"
        );
        assert_eq!(
            error(&mut ports, "com2").to_string(),
            "invalid lpc device configuration 'com2': backend required"
        );
        assert_eq!(ports.com2, None);
    }

    #[test]
    fn stdio_only_once_over_both_ports() {
        let mut ports = SerialPorts::default();
        ports.add("com1,stdio").unwrap();
        assert_eq!(
            error(&mut ports, "com2,stdio").to_string(),
            "invalid lpc device configuration 'com2,stdio': stdio is already used by another port"
        );
    }

    #[test]
    fn bootrom_is_not_supported_yet() {
        let mut ports = SerialPorts::default();
        assert_eq!(
            error(&mut ports, "bootrom,/x/BHYVE_UEFI.fd").to_string(),
            "not supported yet: -l bootrom"
        );
        assert_eq!(ports, SerialPorts::default());
    }

    #[test]
    fn hyperkit_chains() {
        let mut ports = SerialPorts::default();
        ports
            .add("com1,autopty=/state/tty,log=/state/console-ring")
            .unwrap();
        ports.add("com2,log=/r,null,asl").unwrap();
        assert_eq!(
            ports.com1,
            Some(SerialConfig {
                backend: SerialBackend::Autopty(Some("/state/tty".into())),
                log_ring: Some("/state/console-ring".into()),
                asl: false,
            })
        );
        assert_eq!(
            ports.com2,
            Some(SerialConfig {
                backend: SerialBackend::Null,
                log_ring: Some("/r".into()),
                asl: true,
            })
        );
        let mut ports = SerialPorts::default();
        ports.add("com1,/dev/ttyS0,log=/r").unwrap();
        assert_eq!(
            ports.com1.unwrap().backend,
            SerialBackend::Tty("/dev/ttyS0".into())
        );
    }

    #[test]
    fn chain_errors_name_the_value() {
        let mut ports = SerialPorts::default();
        for (value, reason) in [
            ("com1,log=/r", "a terminal is required"),
            ("com1,stdio,autopty", "more than one terminal"),
            ("com1,null,/dev/tty1", "more than one terminal"),
            ("com1,stdio,log=/a,log=/b", "log= given more than once"),
            ("com1,stdio,log=", "log= needs a path"),
            ("com1,autopty=", "autopty= needs a path"),
            ("com1,stdio,asl,asl", "asl given more than once"),
            ("com1,stdio,", "empty item"),
        ] {
            let err = error(&mut ports, value).to_string();
            assert!(
                err.contains(&format!("'{value}'")) && err.contains(reason),
                "{value}: {err}"
            );
        }
        assert_eq!(ports, SerialPorts::default());
    }
}
