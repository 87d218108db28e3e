//! `run` and `forward`: the control plane's runtime, the balancer started on
//! it with its admin API, the signal loop, and the process's descriptor limit.

use std::path::PathBuf;
use std::process::ExitCode;

use tracing::{info, warn};

use super::signals::{Event, Signals};
use super::systemd;
use crate::config::Config;
use crate::proxy::Inherited;
use crate::server::{Options, Server};

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

/// Runs the balancer and its admin API until SIGTERM/SIGINT, then shuts down
/// gracefully. SIGHUP re-reads `path` (when there is one).
/// `activated`: the sockets systemd passed, and what was wrong with others.
pub(super) fn serve(
    mut config: Config,
    path: Option<PathBuf>,
    threads: Option<usize>,
    activated: (Vec<(std::net::TcpListener, String)>, Vec<String>),
) -> ExitCode {
    raise_fd_limit();
    if let Some(threads) = threads {
        config.threads = threads;
    }
    let rt = match control_runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&format_args!("cannot start the runtime: {e}")),
    };
    rt.block_on(async {
        // Before anything says the balancer runs: a signal sent at once is handled.
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => return fail(&format_args!("cannot install the signal handlers: {e}")),
        };
        let options = Options {
            inherited: inherited_listeners(activated),
            ..Options::default()
        };
        let server = match Server::start_with(&config, options).await {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        if let Some(path) = path {
            server.set_config_path(path);
        }
        if let Err(e) = server.start_admin().await {
            server.shutdown(std::time::Duration::ZERO).await;
            return fail(&e);
        }
        info!(
            "protobalance {} running: {}",
            env!("CARGO_PKG_VERSION"),
            config.summary()
        );
        systemd::ready(&running_status(&server));
        let watchdog = tokio::spawn(systemd::feed_watchdog());
        let status = tokio::spawn(report_status(server.clone()));
        loop {
            match signals.next().await {
                Event::Stop => break,
                Event::Reload => reload(&server).await,
                Event::Upgrade => warn!("upgrade in place is not available in this build"),
            }
        }
        systemd::stopping();
        let cut = server.shutdown(config.shutdown_grace).await;
        watchdog.abort();
        status.abort();
        info!("stopped ({cut} connection(s) cut at the end of the grace period)");
        ExitCode::SUCCESS
    })
}

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
fn inherited_listeners(activated: (Vec<(std::net::TcpListener, String)>, Vec<String>)) -> Vec<Inherited> {
    let (listeners, warnings) = activated;
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
