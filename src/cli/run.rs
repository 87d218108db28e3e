//! `run` and `forward`: the control plane's runtime, the balancer started on
//! it with its admin API, the signal loop, and the process's descriptor limit.

use std::path::PathBuf;
use std::process::ExitCode;

use tracing::{info, warn};

use super::signals::{Event, Signals};
use super::systemd;
use crate::config::Config;
use crate::control::handover::Channel;
use crate::proxy::Inherited;
use crate::server::{Options, Predecessor, Server, Successor};

/// The control plane's runtime: signals, the admin API, health probes. One
/// thread; the data plane has its own workers (`proxy::Workers`).
pub(super) fn control_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Says why the balancer could not run, and exits 1: as a log event (a JSON
/// object with `log_format = "json"`) or a plain `error:` line.
pub(super) fn fail(why: &dyn std::fmt::Display) -> ExitCode {
    if crate::logging::is_json() {
        tracing::error!("{why}");
    } else {
        eprintln!("error: {why}");
    }
    ExitCode::FAILURE
}

/// What this process was handed when it started: listening sockets from
/// systemd (socket activation) and, when it was started by an upgrade, the
/// state of the process it replaces.
pub(super) struct Handed {
    activated: Vec<(std::net::TcpListener, String)>,
    warnings: Vec<String>,
    predecessor: Option<Result<Predecessor, String>>,
}

impl Handed {
    /// Takes them: first thing in the process, before anything opens a
    /// descriptor of its own. Blocking: an old process's state is read whole.
    pub(super) fn take() -> Handed {
        let (activated, warnings) = systemd::activated_listeners();
        let predecessor =
            Channel::from_env().map(|channel| channel.map_err(|e| e.to_string()).and_then(Predecessor::receive));
        Handed {
            activated,
            warnings,
            predecessor,
        }
    }

    /// Tells the process this one was to replace that it will not.
    pub(super) fn fail(&self, why: &dyn std::fmt::Display) {
        if let Some(Ok(predecessor)) = &self.predecessor {
            predecessor.fail(&why.to_string());
        }
    }
}

/// How the main loop ended.
enum Ending {
    Stop,
    Upgraded(Successor),
}

/// Runs the balancer and its admin API until SIGTERM/SIGINT, then shuts down
/// gracefully; SIGHUP re-reads `path` (when there is one); SIGUSR2 and the
/// API's upgrade hand everything to a new process, then this one exits.
pub(super) fn serve(mut config: Config, path: Option<PathBuf>, threads: Option<usize>, handed: Handed) -> ExitCode {
    raise_fd_limit();
    if let Some(threads) = threads {
        config.threads = threads;
    }
    let rt = match control_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            handed.fail(&e);
            return fail(&format_args!("cannot start the runtime: {e}"));
        }
    };
    rt.block_on(async {
        // Before anything says the balancer runs: a signal sent at once is handled.
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                handed.fail(&e);
                return fail(&format_args!("cannot install the signal handlers: {e}"));
            }
        };
        let server = match start(&config, path, handed).await {
            Ok(server) => server,
            Err(code) => return code,
        };
        let watchdog = tokio::spawn(systemd::feed_watchdog());
        let status = tokio::spawn(report_status(server.clone()));
        let ending = main_loop(&server, &mut signals).await;
        watchdog.abort();
        status.abort();
        match ending {
            Ending::Stop => {
                systemd::stopping();
                let cut = server.shutdown(config.shutdown_grace).await;
                info!("stopped ({cut} connection(s) cut at the end of the grace period)");
            }
            Ending::Upgraded(successor) => {
                let pid = successor.pid;
                let cut = server.retire(successor, config.shutdown_grace).await;
                info!("upgraded: process {pid} serves now; exiting ({cut} connection(s) cut)");
            }
        }
        ExitCode::SUCCESS
    })
}

/// Starts the balancer and its admin API, on what this process was handed,
/// and tells the service manager it is ready.
async fn start(config: &Config, path: Option<PathBuf>, handed: Handed) -> Result<Server, ExitCode> {
    let Handed {
        activated,
        warnings,
        predecessor,
    } = handed;
    let mut predecessor = match predecessor.transpose() {
        Ok(p) => p,
        Err(e) => return Err(fail(&format_args!("cannot take over from the old process: {e}"))),
    };
    let mut inherited = inherited_listeners(activated, warnings);
    if let Some(p) = &mut predecessor {
        inherited.extend(p.take_listeners());
    }
    let options = Options {
        inherited,
        ..Options::default()
    };
    let server = match Server::start_with(config, options).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(p) = &predecessor {
                p.fail(&e.to_string());
            }
            return Err(fail(&e));
        }
    };
    if let Some(path) = path {
        server.set_config_path(path);
    }
    let took_over = predecessor.is_some();
    let admin = match predecessor {
        Some(p) => server.take_over(p).await,
        None => server.start_admin().await,
    };
    let dropped = match admin {
        Ok(_) => server.drop_privileges().await,
        Err(e) => Err(e),
    };
    if let Err(e) = dropped {
        server.clone().shutdown(std::time::Duration::ZERO).await;
        return Err(fail(&e));
    }
    // Start-up is done: what only it ran need not stay resident. (A reload
    // maps its parsing back in; that stays, a few hundred KiB at most.) Done
    // before the balancer says it is ready, so that ready means start-up's
    // work, and the descriptor it reads /proc through, are over.
    crate::server::release_mapped_pages();
    info!(
        "protobalance {} running: {}",
        env!("CARGO_PKG_VERSION"),
        config.summary()
    );
    if took_over {
        systemd::took_over(&running_status(&server));
    } else {
        systemd::ready(&running_status(&server));
    }
    Ok(server)
}

/// Answers signals and the API's upgrade requests until one ends the
/// process. An upgrade runs beside the signals: a second one asked for
/// meanwhile is refused, and SIGTERM still stops the balancer.
async fn main_loop(server: &Server, signals: &mut Signals) -> Ending {
    let mut requests = server.control().upgrade_requests();
    let mut running: Option<std::pin::Pin<Box<dyn Future<Output = UpgradeOutcome> + '_>>> = None;
    loop {
        let request = async {
            match &mut requests {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        let upgraded = async {
            match &mut running {
                Some(upgrade) => upgrade.await,
                None => std::future::pending().await,
            }
        };
        let asked = tokio::select! {
            event = signals.next() => match event {
                Event::Stop => return Ending::Stop,
                Event::Reload => {
                    reload(server).await;
                    continue;
                }
                Event::Upgrade => None,
            },
            Some(reply) = request => Some(reply),
            (outcome, reply) = upgraded => {
                running = None;
                match outcome {
                    Ok(successor) => {
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(successor.pid));
                        }
                        return Ending::Upgraded(successor);
                    }
                    Err(e) => {
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
                continue;
            }
        };
        if running.is_some() {
            warn!("upgrade refused: one is already running");
            if let Some(reply) = asked {
                let _ = reply.send(Err("an upgrade is already running".into()));
            }
            continue;
        }
        running = Some(Box::pin(async move { (server.upgrade().await, asked) }));
    }
}

/// How an upgrade ended, and who asked for it through the API.
type UpgradeOutcome = (
    Result<Successor, crate::server::UpgradeError>,
    Option<crate::control::UpgradeReply>,
);

/// Re-reads the config file, telling the service manager around it.
async fn reload(server: &Server) {
    systemd::reloading();
    if let Err(e) = server.reload().await {
        warn!("reload refused, running configuration unchanged: {e}");
    }
    systemd::ready(&running_status(server));
}

/// Tells the service manager what runs, every few seconds (`systemctl status`).
async fn report_status(server: Server) {
    if !systemd::notifying() {
        return;
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        systemd::status(&running_status(&server));
    }
}

/// The `STATUS=` line: what runs now.
fn running_status(server: &Server) -> String {
    let snapshot = server.snapshot();
    format!(
        "{} service(s), {} listener(s), {} connection(s) open",
        snapshot.services.len(),
        server.listen_addrs().len(),
        server.open_connections()
    )
}

/// Listening sockets systemd passed (socket activation), for the listen
/// addresses they are bound to.
fn inherited_listeners(listeners: Vec<(std::net::TcpListener, String)>, warnings: Vec<String>) -> Vec<Inherited> {
    for warning in warnings {
        warn!("{warning}");
    }
    listeners
        .into_iter()
        .map(|(listener, name)| {
            if let Ok(addr) = listener.local_addr() {
                info!("socket activation: {name} is bound to {addr}");
            }
            Inherited::by_address(vec![listener])
        })
        .collect()
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
