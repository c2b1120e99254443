//! The man page and shell completions come from the command line's clap definition
//! (`xhyve --manpage`, `xhyve --completions SHELL`); the committed doc/xhyve.1 must match.

mod common;

use std::process::Command;

fn generate(args: &[&str]) -> String {
    let out = Command::new(common::xhyve_binary())
        .args(args)
        .output()
        .expect("run xhyve");
    assert_eq!(out.status.code(), Some(0), "xhyve {args:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn committed_man_page_is_current() {
    let generated = generate(&["--manpage"]);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/doc/xhyve.1");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == committed,
        "doc/xhyve.1 is stale: run `xhyve --manpage > doc/xhyve.1`"
    );
    for text in [
        ".TH xhyve 1",
        "restful\\-uri",
        ".SH EXIT STATUS",
        ".SH SIGNALS",
    ] {
        assert!(generated.contains(text), "man page lacks {text:?}");
    }
}

#[test]
fn completions_for_three_shells() {
    for (shell, marker) in [
        ("bash", "complete -F _xhyve"),
        ("zsh", "#compdef xhyve"),
        ("fish", "complete -c xhyve"),
    ] {
        let script = generate(&["--completions", shell]);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("restful-uri"), "{shell}");
    }
}
