//! Command-line interface: arguments, logging set-up, exit codes. The work
//! itself is done by `server` (through `run`), `config`, `admin::ctl` and
//! `demo`; this file only parses and dispatches.

mod demo;
mod run;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use clap::{Parser, Subcommand};
use run::{control_runtime, serve};

#[derive(Parser, Debug)]
#[command(
    name = "protobalance",
    version,
    about = "Proto Balance: a fast, small TCP load balancer"
)]
pub struct Cli {
    /// Log level or filter (e.g. `debug`, `info,protobalance::access=off`); overrides RUST_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the balancer described by a config file until SIGTERM/SIGINT.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Worker threads (overrides the file's `threads`); 0 = one per CPU.
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
    },
    /// Validates a config file: exit 0 with a summary, or 1 with the error.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Zero-config forwarding: listen on LISTEN, round-robin over the NODEs.
    Forward {
        /// ADDR:PORT (or ADDR:LOW-HIGH) to listen on.
        listen: String,
        /// Node addresses, HOST:PORT (or HOST alone: the same port as the client's).
        #[arg(required = true)]
        nodes: Vec<String>,
        /// Worker threads; 0 = one per CPU.
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
    },
    /// Talks to a running balancer's admin API.
    Ctl {
        /// The admin API: HOST:PORT, http://HOST:PORT or unix:PATH.
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN_LISTEN, value_name = "ADDR")]
        admin: String,
        /// The admin token, if the balancer has one (shows in `ps`: prefer
        /// --token-file or PROTOBALANCE_TOKEN).
        #[arg(long, env = "PROTOBALANCE_TOKEN", hide_env_values = true, value_name = "TOKEN")]
        token: Option<String>,
        /// A file holding the admin token (surrounding blanks ignored); wins
        /// over --token and PROTOBALANCE_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        action: CtlCommand,
    },
    /// Starts three demo HTTP backends and a balancer in front of them.
    Demo {
        /// Where the balancer listens; a busy port falls back to a free one.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
        listen: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Services, clusters and nodes with their state and figures.
    Status,
    /// Sets a node's state.
    State {
        cluster: String,
        node: String,
        #[arg(value_parser = ["green", "yellow", "red"])]
        state: String,
    },
    /// Sends a service's new connections to another cluster (the file's cluster reverts).
    Redirect { service: String, cluster: String },
    /// Makes the balancer re-read its config file.
    Reload,
}

impl From<CtlCommand> for crate::admin::ctl::Action {
    fn from(c: CtlCommand) -> Self {
        use crate::admin::ctl::Action;
        match c {
            CtlCommand::Status => Action::Status,
            CtlCommand::State { cluster, node, state } => Action::State { cluster, node, state },
            CtlCommand::Redirect { service, cluster } => Action::Redirect { service, cluster },
            CtlCommand::Reload => Action::Reload,
        }
    }
}

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    // Held to the end: dropping it flushes the log lines still queued.
    let _log_writer = crate::logging::init(cli.log_level.as_deref());
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: {}", config.display(), c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path, threads } => match Config::load(&path) {
            Ok(c) => serve(c, Some(path), threads),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Forward { listen, nodes, threads } => match Config::forward(&listen, &nodes) {
            Ok(c) => serve(c, None, threads),
            Err(e) => {
                eprintln!("error: {}", e.message);
                ExitCode::FAILURE
            }
        },
        Command::Ctl {
            admin,
            token,
            token_file,
            action,
        } => {
            let token = match token_file {
                None => token,
                Some(file) => match crate::config::read_regular_file(&file, crate::config::MAX_TOKEN_FILE) {
                    Ok(text) => Some(text.trim().to_string()),
                    Err(why) => {
                        eprintln!("error: --token-file {}: {why}", file.display());
                        return ExitCode::FAILURE;
                    }
                },
            };
            match control_runtime() {
                Ok(rt) => rt.block_on(crate::admin::ctl::run(&admin, token.as_deref(), action.into())),
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { listen } => match control_runtime() {
            Ok(rt) => rt.block_on(demo::run(&listen)),
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
