use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    protobalance::cli::main(protobalance::cli::Cli::parse())
}
