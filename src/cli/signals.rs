//! The signals the balancer answers: SIGTERM and SIGINT stop it, SIGHUP
//! reloads it. Waiting for them, nothing else.

use tracing::info;

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
