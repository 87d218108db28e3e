//! The signals the balancer answers: SIGTERM and SIGINT stop it, SIGHUP
//! reloads it, SIGUSR2 upgrades it in place. Registered all at once, before
//! the balancer says it runs, so a signal sent as soon as the start is
//! reported is never lost; waiting for them, nothing else.

use std::io;

use tracing::info;

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
    /// SIGUSR2.
    Upgrade,
}

/// The handlers of every signal the balancer answers.
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
    #[cfg(unix)]
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (on the current runtime).
    pub fn install() -> io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
                usr2: signal(SignalKind::user_defined2())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal's request.
    pub async fn next(&mut self) -> Event {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => { info!("SIGTERM received"); Event::Stop }
                _ = self.int.recv() => { info!("SIGINT received"); Event::Stop }
                _ = self.hup.recv() => { info!("SIGHUP received: reloading"); Event::Reload }
                _ = self.usr2.recv() => { info!("SIGUSR2 received: upgrading in place"); Event::Upgrade }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            info!("Ctrl-C received");
            Event::Stop
        }
    }
}

/// Waits for SIGTERM or SIGINT (Ctrl-C); other signals are ignored.
pub async fn stop_signal() -> io::Result<()> {
    let mut signals = Signals::install()?;
    while signals.next().await != Event::Stop {}
    Ok(())
}
