//! `xhyve`: boot a virtual machine from xhyve's command line.

use std::io::Write;

use xhyve::cli::{self, Action};
use xhyve::config::HostSettings;
use xhyve::vmm;

fn main() {
    vmm::install_panic_hook();
    let mut logger = env_logger::Builder::new();
    logger.filter_level(log::LevelFilter::Warn);
    // virtio-queue reports a guest's malformed queues at error level: a guest must not be able
    // to flood xhyve's stderr. XHYVE_LOG can turn it back on.
    logger.filter_module("virtio_queue", log::LevelFilter::Off);
    if let Ok(spec) = std::env::var("XHYVE_LOG") {
        logger.parse_filters(&spec);
    }
    logger.init();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let program = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "xhyve".into());
    let code = match cli::parse(args.clone()) {
        Ok(Action::Help) => {
            eprint!("{}", cli::usage(&program));
            0
        }
        Ok(Action::Version) => {
            let personality = args
                .first()
                .map(|p| cli::Personality::from_program(p))
                .unwrap_or_default();
            eprint!("{}", cli::version_text(personality));
            0
        }
        Ok(Action::Completions(shell)) => print_completions(&shell),
        Ok(Action::Manpage) => print_manpage(),
        // -M: xhyve prints the network device's MAC and exits 0 (without a network device
        // the flag does nothing). A tap's MAC is known from the command line alone (no tap
        // is opened, no root needed); vmnet assigns its own, so that one starts vmnet.
        Ok(Action::Run(config)) if config.print_mac && config.first_nic().is_some() => {
            match xhyve::devices::virtio::net::mac_to_print(&config) {
                Ok(mac) => {
                    if let Some(mac) = mac {
                        println!("MAC: {mac}");
                    }
                    0
                }
                Err(e) => {
                    eprintln!("xhyve: {e}");
                    vmm::exit::EXIT_SETUP_ERROR
                }
            }
        }
        // The environment is read here, once; nothing below reads it again.
        Ok(Action::Run(mut config)) => match HostSettings::from_env() {
            Ok(host) => {
                config.host = host;
                match vmm::run(&config) {
                    Ok(code) => code,
                    Err(e) => {
                        eprintln!("xhyve: {e}");
                        vmm::exit::EXIT_SETUP_ERROR
                    }
                }
            }
            Err(e) => {
                eprintln!("xhyve: {e}");
                vmm::exit::EXIT_SETUP_ERROR
            }
        },
        Err(e) => {
            eprintln!("xhyve: {e}");
            if e.show_usage() {
                eprint!("{}", cli::usage(&program));
            }
            e.exit_code()
        }
    };
    vmm::cleanup();
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// `xhyve --completions bash|zsh|fish`: the completion script, generated from the command
/// line's clap definition.
fn print_completions(shell: &str) -> i32 {
    use clap_complete::{generate, Shell};
    let shell = match shell {
        "bash" => Shell::Bash,
        "zsh" => Shell::Zsh,
        _ => Shell::Fish,
    };
    let mut command = cli::command();
    generate(shell, &mut command, "xhyve", &mut std::io::stdout());
    0
}

/// `xhyve --manpage`: xhyve.1, generated from the same definition.
fn print_manpage() -> i32 {
    let mut out = std::io::stdout();
    let written = clap_mangen::Man::new(cli::command())
        .render(&mut out)
        .and_then(|()| out.write_all(cli::MAN_EXTRA_SECTIONS.as_bytes()));
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("xhyve: cannot write the man page: {e}");
            vmm::exit::EXIT_SETUP_ERROR
        }
    }
}
