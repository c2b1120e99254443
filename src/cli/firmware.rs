//! `-f LOADER,...`: how the guest is loaded (HyperKit's relaxed forms of xhyve's `-f`).

use std::path::PathBuf;

use super::{CliError, Firmware, MultibootModule};

const ACCEPTED_FORMS: &str =
    "expected kexec,kernel[,initrd[,cmdline]] or multiboot,kernel[,modules][,cmdline]";

/// Parses one `-f` argument. The kernel command line is everything after the third comma.
pub fn parse_firmware(value: &str) -> Result<Firmware, CliError> {
    let invalid = |reason: &str| CliError::InvalidFirmware {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let (loader, rest) = value.split_once(',').unwrap_or((value, ""));
    let mut fields = rest.splitn(3, ',');
    let kernel = fields.next().unwrap_or_default();
    let second = fields.next().unwrap_or_default();
    let cmdline = fields.next().unwrap_or_default().to_string();

    match loader {
        "kexec" | "multiboot" if kernel.is_empty() => Err(invalid("kernel path required")),
        "kexec" => Ok(Firmware::Kexec {
            kernel: PathBuf::from(kernel),
            initrd: (!second.is_empty()).then(|| PathBuf::from(second)),
            cmdline,
        }),
        "multiboot" => Ok(Firmware::Multiboot {
            kernel: PathBuf::from(kernel),
            modules: parse_modules(second).map_err(invalid)?,
            cmdline,
        }),
        "fbsd" => Err(CliError::NotSupported(
            "-f fbsd (FreeBSD userboot)".to_string(),
        )),
        "bootrom" => Err(CliError::NotSupportedYet(
            "-f bootrom (UEFI firmware)".to_string(),
        )),
        _ => Err(invalid(ACCEPTED_FORMS)),
    }
}

/// `path[;cmdline][:path[;cmdline]]...`; an empty list means no modules.
fn parse_modules(list: &str) -> Result<Vec<MultibootModule>, &'static str> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    list.split(':')
        .map(|entry| {
            let (path, cmdline) = entry.split_once(';').unwrap_or((entry, ""));
            if path.is_empty() {
                return Err("multiboot module path required");
            }
            Ok(MultibootModule {
                path: PathBuf::from(path),
                cmdline: cmdline.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kexec(kernel: &str, initrd: Option<&str>, cmdline: &str) -> Firmware {
        Firmware::Kexec {
            kernel: kernel.into(),
            initrd: initrd.map(PathBuf::from),
            cmdline: cmdline.to_string(),
        }
    }

    fn module(path: &str, cmdline: &str) -> MultibootModule {
        MultibootModule {
            path: path.into(),
            cmdline: cmdline.to_string(),
        }
    }

    fn error(value: &str) -> String {
        parse_firmware(value).unwrap_err().to_string()
    }

    #[test]
    fn kexec_forms() {
        assert_eq!(
            parse_firmware("kexec,vmlinuz").unwrap(),
            kexec("vmlinuz", None, "")
        );
        assert_eq!(
            parse_firmware("kexec,vmlinuz,").unwrap(),
            kexec("vmlinuz", None, "")
        );
        assert_eq!(
            parse_firmware("kexec,vmlinuz,initrd.gz").unwrap(),
            kexec("vmlinuz", Some("initrd.gz"), "")
        );
        assert_eq!(
            parse_firmware("kexec,vmlinuz,,earlyprintk=serial console=ttyS0").unwrap(),
            kexec("vmlinuz", None, "earlyprintk=serial console=ttyS0")
        );
        assert_eq!(
            parse_firmware("kexec,k,i,console=ttyS0,115200 acpi=off,x").unwrap(),
            kexec("k", Some("i"), "console=ttyS0,115200 acpi=off,x")
        );
    }

    #[test]
    fn kernel_path_is_required() {
        assert_eq!(error("kexec"), "invalid -f \"kexec\": kernel path required");
        assert_eq!(
            error("kexec,"),
            "invalid -f \"kexec,\": kernel path required"
        );
        assert_eq!(
            error("kexec,,initrd,cmd"),
            "invalid -f \"kexec,,initrd,cmd\": kernel path required"
        );
        assert_eq!(
            error("multiboot"),
            "invalid -f \"multiboot\": kernel path required"
        );
    }

    #[test]
    fn multiboot_forms() {
        assert_eq!(
            parse_firmware("multiboot,mboot.c32").unwrap(),
            Firmware::Multiboot {
                kernel: "mboot.c32".into(),
                modules: vec![],
                cmdline: String::new(),
            }
        );
        assert_eq!(
            parse_firmware(
                "multiboot,xen,vmlinuz;console=hvc0 root=/dev/vda:initrd.img,dom0_mem=512M,x"
            )
            .unwrap(),
            Firmware::Multiboot {
                kernel: "xen".into(),
                modules: vec![
                    module("vmlinuz", "console=hvc0 root=/dev/vda"),
                    module("initrd.img", ""),
                ],
                cmdline: "dom0_mem=512M,x".to_string(),
            }
        );
        assert_eq!(
            parse_firmware("multiboot,k,,noapic").unwrap(),
            Firmware::Multiboot {
                kernel: "k".into(),
                modules: vec![],
                cmdline: "noapic".to_string(),
            }
        );
        assert_eq!(
            error("multiboot,k,a::b"),
            "invalid -f \"multiboot,k,a::b\": multiboot module path required"
        );
        assert_eq!(
            error("multiboot,k,;cmd"),
            "invalid -f \"multiboot,k,;cmd\": multiboot module path required"
        );
    }

    #[test]
    fn other_loaders() {
        let fbsd = parse_firmware("fbsd,userboot.so,disk.img,").unwrap_err();
        assert_eq!(
            fbsd.to_string(),
            "not supported: -f fbsd (FreeBSD userboot)"
        );
        assert_eq!(fbsd.exit_code(), 1);
        let bootrom = parse_firmware("bootrom,BHYVE_UEFI.fd").unwrap_err();
        assert_eq!(
            bootrom.to_string(),
            "not supported yet: -f bootrom (UEFI firmware)"
        );
        assert_eq!(
            error("linux,vmlinuz"),
            format!("invalid -f \"linux,vmlinuz\": {ACCEPTED_FORMS}")
        );
        // Loader names are matched exactly, not by prefix as xhyve's strncmp did.
        assert_eq!(
            error("kexecx,vmlinuz"),
            format!("invalid -f \"kexecx,vmlinuz\": {ACCEPTED_FORMS}")
        );
        assert_eq!(error(""), format!("invalid -f \"\": {ACCEPTED_FORMS}"));
    }
}
