//! The `protobalance` binary: the command line (see `cli`), and the C math
//! functions its dependencies call, defined here so that the binary needs
//! no libm.so.
//!
//! Why: libm.so's mapped pages cost about half a megabyte of resident memory
//! at start, for two functions. The crate's own code calls the `libm` crate;
//! dependencies call `f64::exp` and `f64::powf` (hickory's decaying
//! round-trip estimate of its name servers, a retry back-off), which
//! compile to calls of the C symbols `exp` and `pow`. Defining those symbols
//! in the binary, from the same `libm` crate (a port of musl's), leaves the
//! linker nothing to take from libm.so.
//! `tests/cli.rs` checks that the binary does not need it.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    protobalance::cli::main(protobalance::cli::Cli::parse())
}

/// `exp(3)`, for the dependencies that call it.
#[unsafe(no_mangle)]
pub extern "C" fn exp(x: f64) -> f64 {
    libm::exp(x)
}

/// `pow(3)`, for the dependencies that call it.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}
