fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // Hypervisor.framework and vmnet exist only on macOS; Linux builds must not try to link them.
    if target_os == "macos" {
        println!("cargo:rustc-link-lib=framework=Hypervisor");
        println!("cargo:rustc-link-lib=framework=vmnet");
        // Homebrew's libslirp (Apple silicon, then Intel prefix).
        for dir in ["/opt/homebrew/lib", "/usr/local/lib"] {
            println!("cargo:rustc-link-search=native={dir}");
        }
    }
    // The built-in network (src/net/slirp): libslirp, from Debian `libslirp-dev` or Homebrew
    // `libslirp`. No pkg-config: its glib requirement would pull in glib's headers, and
    // a type-check for another OS (cargo check --target x86_64-apple-darwin) must not need the
    // target's libraries at all. SLIRP_LIB_DIR points at a libslirp elsewhere.
    if let Ok(dir) = std::env::var("SLIRP_LIB_DIR") {
        println!("cargo:rustc-link-search=native={dir}");
    }
    println!("cargo:rustc-link-lib=dylib=slirp");
    println!("cargo:rerun-if-env-changed=SLIRP_LIB_DIR");
    println!("cargo:rerun-if-changed=build.rs");
}
