//! Command-line interface: arguments, logging set-up, exit codes. The work
//! itself is done by `server`, `config` and `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{info, warn};

use crate::config::Config;
use crate::server::Server;

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
        /// The admin API: HOST:PORT or http://HOST:PORT.
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN_LISTEN, value_name = "ADDR")]
        admin: String,
        /// The admin token, if the balancer has one.
        #[arg(long, env = "PROTOBALANCE_TOKEN", hide_env_values = true, value_name = "TOKEN")]
        token: Option<String>,
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
        Command::Ctl { admin, token, action } => match control_runtime() {
            Ok(rt) => rt.block_on(crate::admin::ctl::run(&admin, token.as_deref(), action.into())),
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo { listen } => match control_runtime() {
            Ok(rt) => rt.block_on(crate::demo::run(&listen)),
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The control plane's runtime: signals, the admin API, health probes. One
/// thread; the data plane has its own workers (`proxy::Workers`).
fn control_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Runs the balancer and its admin API until SIGTERM/SIGINT, then shuts down
/// gracefully. SIGHUP re-reads `path` (when there is one).
fn serve(mut config: Config, path: Option<PathBuf>, threads: Option<usize>) -> ExitCode {
    raise_fd_limit();
    if let Some(threads) = threads {
        config.threads = threads;
    }
    let rt = match control_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let server = match Server::start(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(path) = path {
            server.set_config_path(path);
        }
        if let Err(e) = server.start_admin().await {
            eprintln!("error: {e}");
            server.shutdown(std::time::Duration::ZERO).await;
            return ExitCode::FAILURE;
        }
        info!(
            "protobalance {} running: {}",
            env!("CARGO_PKG_VERSION"),
            config.summary()
        );
        tokio::select! {
            stopped = stop_signal() => if let Err(e) = stopped {
                warn!("cannot wait for signals ({e}); stopping");
            },
            _ = reload_on_hangup(&server) => {}
        }
        let cut = server.shutdown(config.shutdown_grace).await;
        info!("stopped ({cut} connection(s) cut at the end of the grace period)");
        ExitCode::SUCCESS
    })
}

/// Reloads the config file on each SIGHUP; never returns (unless SIGHUP cannot be
/// watched, in which case it waits forever so as not to stop the balancer).
async fn reload_on_hangup(server: &Server) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                while hup.recv().await.is_some() {
                    info!("SIGHUP received: reloading");
                    if let Err(e) = server.reload().await {
                        warn!("reload refused, running configuration unchanged: {e}");
                    }
                }
            }
            Err(e) => warn!("cannot watch SIGHUP ({e}): reload through the admin API only"),
        }
    }
    std::future::pending::<()>().await
}

/// Waits for SIGTERM or SIGINT (Ctrl-C).
pub async fn stop_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        Ok(())
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}

/// Raises the soft descriptor limit to the hard one: each proxied connection
/// needs two descriptors.
fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return;
            }
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
        }
        info!(
            "descriptor limit {} (about {} concurrent proxied connections)",
            lim.rlim_cur,
            lim.rlim_cur.saturating_sub(64) / 2
        );
    }
}
