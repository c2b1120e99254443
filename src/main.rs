//! `xhyve`: boot a virtual machine from xhyve's command line.

use std::io::Write;

use xhyve::cli::{self, Action};
use xhyve::vmm;

fn main() {
    vmm::install_panic_hook();
    env_logger::Builder::from_env(env_logger::Env::new().filter("XHYVE_LOG")).init();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let program = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "xhyve".into());
    let code = match cli::parse(args) {
        Ok(Action::Help) => {
            eprint!("{}", cli::usage(&program));
            0
        }
        Ok(Action::Version) => {
            eprint!("{}", cli::version_text());
            0
        }
        Ok(Action::Run(config)) => match vmm::run(&config) {
            Ok(code) => code,
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
