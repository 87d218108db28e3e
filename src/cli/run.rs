//! `run` and `forward`: the control plane's runtime, the balancer started on
//! it with its admin API, the signal loop, and the process's descriptor limit.

use std::path::PathBuf;
use std::process::ExitCode;

use tracing::{info, warn};

use super::signals::stop_signal;
use crate::config::Config;
use crate::server::Server;

/// The control plane's runtime: signals, the admin API, health probes. One
/// thread; the data plane has its own workers (`proxy::Workers`).
pub(super) fn control_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Runs the balancer and its admin API until SIGTERM/SIGINT, then shuts down
/// gracefully. SIGHUP re-reads `path` (when there is one).
pub(super) fn serve(mut config: Config, path: Option<PathBuf>, threads: Option<usize>) -> ExitCode {
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
        let admin = server.start_admin().await;
        let dropped = match admin {
            Ok(_) => server.drop_privileges().await,
            Err(e) => Err(e),
        };
        if let Err(e) = dropped {
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
