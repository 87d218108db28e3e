//! Link-time layout of the binary: the functions that run at start and on the
//! forwarding path go first (linker/startup-order.txt, made by
//! scripts/startup-order), so they share pages. The kernel maps a binary's
//! code in 64 KiB fault-around chunks: scattered among the rest, those
//! functions made nearly the whole binary resident at start (2.7 MB of code
//! against 1.5 MB ordered).
//!
//! Only where the linker is LLD, which reads the file: the default for
//! x86_64-unknown-linux-gnu since Rust 1.90. Set PROTOBALANCE_NO_ORDER_FILE
//! to link without it (another linker, say).

fn main() {
    println!("cargo::rerun-if-changed=linker/startup-order.txt");
    println!("cargo::rerun-if-env-changed=PROTOBALANCE_NO_ORDER_FILE");
    let target = std::env::var("TARGET").unwrap_or_default();
    // The names in the file are those of a release build (a symbol's name
    // carries a hash that differs between profiles).
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    if target != "x86_64-unknown-linux-gnu" || !release || std::env::var_os("PROTOBALANCE_NO_ORDER_FILE").is_some() {
        return;
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let order = std::path::Path::new(&manifest_dir).join("linker/startup-order.txt");
    if order.exists() {
        println!(
            "cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        // Names of functions since renamed or removed are expected: the file
        // ages between regenerations, and an unknown name is simply skipped.
        println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
