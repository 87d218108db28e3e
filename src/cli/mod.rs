//! Command-line interface: arguments, logging set-up, exit codes. The work
//! itself is done by `server` (through `run`), `config`, `admin::ctl` and
//! `demo`; this file only parses and dispatches.

mod demo;
mod run;
mod signals;
mod systemd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use run::{control_runtime, serve};

use crate::config::{Config, LogFormat};

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

    /// How log lines are written: `text`, or `json` (one object a line); overrides the file's `log_format`.
    #[arg(long, global = true, value_name = "FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,

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
    /// Upgrades a running balancer in place (the same as `ctl upgrade`).
    Upgrade {
        /// The admin API: HOST:PORT, http://HOST:PORT or unix:PATH.
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN_LISTEN, value_name = "ADDR")]
        admin: String,
        /// The admin token, if the balancer has one (shows in `ps`: prefer
        /// --token-file or PROTOBALANCE_TOKEN).
        #[arg(long, env = "PROTOBALANCE_TOKEN", hide_env_values = true, value_name = "TOKEN")]
        token: Option<String>,
        /// A file holding the admin token; wins over --token and PROTOBALANCE_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Prints the shell completion script for bash, zsh or fish.
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
    /// Prints the man page (roff), for packaging.
    #[command(hide = true)]
    Manpage,
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
        /// With yellow: drain now and turn red once this has passed ("10m", "90s").
        #[arg(long, value_name = "DURATION")]
        deadline: Option<String>,
    },
    /// Sends a service's new connections to another cluster (the file's cluster reverts).
    Redirect { service: String, cluster: String },
    /// Makes the balancer re-read its config file.
    Reload,
    /// Upgrades the balancer in place: the executable on disk takes over every listener and connection.
    Upgrade,
}

impl From<CtlCommand> for crate::admin::ctl::Action {
    fn from(c: CtlCommand) -> Self {
        use crate::admin::ctl::Action;
        match c {
            CtlCommand::Status => Action::Status,
            CtlCommand::State {
                cluster,
                node,
                state,
                deadline,
            } => Action::State {
                cluster,
                node,
                state,
                deadline,
            },
            CtlCommand::Redirect { service, cluster } => Action::Redirect { service, cluster },
            CtlCommand::Reload => Action::Reload,
            CtlCommand::Upgrade => Action::Upgrade,
        }
    }
}

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    // First: the descriptors systemd or an old process passed, before
    // anything opens its own.
    let handed = run::Handed::take();
    let flag_format = cli.log_format.as_deref().and_then(LogFormat::parse);
    // Held to the end: dropping it flushes the log lines still queued.
    let log = |format: Option<LogFormat>| crate::logging::init(cli.log_level.as_deref(), format.unwrap_or_default());
    match cli.command {
        Command::Run { config: path, threads } => {
            // Loaded before logging starts: the file may choose the log format.
            let loaded = Config::load(&path);
            let format = flag_format.or(loaded.as_ref().ok().map(|c| c.log_format));
            let _log_writer = log(format);
            match loaded {
                Ok(c) => serve(c, Some(path), threads, handed),
                Err(e) => {
                    handed.fail(&e);
                    run::fail(&e)
                }
            }
        }
        Command::Forward { listen, nodes, threads } => {
            let _log_writer = log(flag_format);
            match Config::forward(&listen, &nodes) {
                Ok(c) => serve(c, None, threads, handed),
                Err(e) => run::fail(&e.message),
            }
        }
        Command::Check { config } => {
            let _log_writer = log(flag_format);
            check(&config)
        }
        Command::Ctl {
            admin,
            token,
            token_file,
            action,
        } => {
            let _log_writer = log(flag_format);
            match admin_token(token, token_file) {
                Ok(token) => on_runtime(crate::admin::ctl::run(&admin, token.as_deref(), action.into())),
                Err(code) => code,
            }
        }
        Command::Upgrade {
            admin,
            token,
            token_file,
        } => {
            let _log_writer = log(flag_format);
            match admin_token(token, token_file) {
                Ok(token) => on_runtime(crate::admin::ctl::run(
                    &admin,
                    token.as_deref(),
                    crate::admin::ctl::Action::Upgrade,
                )),
                Err(code) => code,
            }
        }
        Command::Demo { listen } => {
            let _log_writer = log(flag_format);
            on_runtime(demo::run(&listen))
        }
        Command::Completions { shell } => {
            let shell: clap_complete::Shell = shell.parse().expect("clap checked the shell's name");
            clap_complete::generate(shell, &mut Cli::command(), "protobalance", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Manpage => match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write the man page: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The admin token `ctl` sends: from `--token-file`, which wins, else
/// `--token` or `PROTOBALANCE_TOKEN`.
fn admin_token(token: Option<String>, token_file: Option<PathBuf>) -> Result<Option<String>, ExitCode> {
    let Some(file) = token_file else { return Ok(token) };
    match crate::config::read_regular_file(&file, crate::config::MAX_TOKEN_FILE) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(why) => {
            eprintln!("error: --token-file {}: {why}", file.display());
            Err(ExitCode::FAILURE)
        }
    }
}

/// `check`: exit 0 and the summary, or 1 and the error with its line.
fn check(config: &std::path::Path) -> ExitCode {
    match Config::load(config) {
        Ok(c) => {
            println!("{}: {}", config.display(), c.summary());
            // Valid, but this process could not serve it as it is: say so
            // (the service may run with more privileges than `check`).
            if let Err(missing) = crate::proxy::identity::transparent_is_possible(&c) {
                eprintln!("warning: {missing}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` on the control plane's runtime.
fn on_runtime(work: impl Future<Output = ExitCode>) -> ExitCode {
    match control_runtime() {
        Ok(rt) => rt.block_on(work),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
