//! `-l DEVICE,CONFIG`: the LPC bridge's COM ports (xhyve's `lpc_device_parse`).

use std::path::PathBuf;

use super::{CliError, SerialBackend};

/// The COM ports configured so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SerialPorts {
    pub com1: Option<SerialBackend>,
    pub com2: Option<SerialBackend>,
}

impl SerialPorts {
    /// Applies one `-l` argument. The device name is case-insensitive (as xhyve's strcasecmp);
    /// the backend is the whole rest of the string and is case-sensitive.
    pub fn add(&mut self, value: &str) -> Result<(), CliError> {
        let invalid = |reason| CliError::InvalidLpc {
            value: value.to_string(),
            reason,
        };
        let (device, backend) = match value.split_once(',') {
            Some((device, backend)) => (device, Some(backend)),
            None => (value, None),
        };
        let device = device.to_ascii_lowercase();
        if device == "bootrom" {
            return Err(CliError::NotSupportedYet("-l bootrom".to_string()));
        }
        let backend = match backend {
            Some("") | None => return Err(invalid("backend required")),
            Some("stdio") => SerialBackend::Stdio,
            Some("autopty") => SerialBackend::Autopty,
            Some(path) => SerialBackend::Tty(PathBuf::from(path)),
        };
        if backend == SerialBackend::Stdio
            && [&self.com1, &self.com2].contains(&&Some(SerialBackend::Stdio))
        {
            return Err(invalid("stdio is already used by another port"));
        }
        let port = match device.as_str() {
            "com1" => &mut self.com1,
            "com2" => &mut self.com2,
            _ => return Err(invalid("unknown device; expected com1 or com2")),
        };
        if port.is_some() {
            return Err(invalid("port already configured"));
        }
        *port = Some(backend);
        Ok(())
    }
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
        assert_eq!(ports.com1, Some(SerialBackend::Stdio));
        assert_eq!(ports.com2, Some(SerialBackend::Tty("/dev/pts/3".into())));

        let mut ports = SerialPorts::default();
        ports.add("Com2,autopty").unwrap();
        assert_eq!(ports.com1, None);
        assert_eq!(ports.com2, Some(SerialBackend::Autopty));
    }

    #[test]
    fn backend_is_the_whole_rest_and_case_sensitive() {
        let mut ports = SerialPorts::default();
        ports.add("com1,/tmp/a,b").unwrap();
        ports.add("com2,STDIO").unwrap();
        assert_eq!(ports.com1, Some(SerialBackend::Tty("/tmp/a,b".into())));
        assert_eq!(ports.com2, Some(SerialBackend::Tty("STDIO".into())));
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
}
