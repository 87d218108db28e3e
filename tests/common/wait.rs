//! Waiting, bounded: the one patience of the suite and the one way to wait
//! for a condition that has no signal to await. Where a signal exists (a
//! channel, a log line, a read that returns) a test awaits it, inside
//! [`within`].

use std::time::{Duration, Instant};

/// Generous bound for anything a test waits on: the suite runs on a loaded
/// 2-core machine, and a hang must fail the test rather than block it.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(10);

/// Awaits `f`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?}: {what}"))
}

/// Checks `condition` until it holds, failing the test after [`PATIENCE`].
/// A plain predicate is written `|| async { predicate }`.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Checks `attempt` until it gives a value, and returns that value; fails the
/// test after [`PATIENCE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] for tests without a runtime (it blocks the thread).
pub fn wait_until_blocking(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}
