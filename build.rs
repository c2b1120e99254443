fn main() {
    // Hypervisor.framework and vmnet exist only on macOS; Linux builds must not try to link them.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        println!("cargo:rustc-link-lib=framework=Hypervisor");
        println!("cargo:rustc-link-lib=framework=vmnet");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
