//! Load agents: a node may name an `agent = "HOST:PORT"`, a small service on or
//! near the node that says how loaded the node is (as HAProxy's agent-check).
//! Every `retry_interval` of the node's cluster the balancer connects, reads
//! one line holding a number (e.g. `0.75\n`; surrounding blanks ignored), and
//! stores it as the node's `agent_load`, a figure of least-load's
//! `load_rating`. The exchange must finish within the cluster's
//! `connect_timeout`.
//!
//! An agent that cannot be reached, is too slow, or answers something that is
//! not a finite number leaves `agent_load` at its last value: a node whose
//! agent hiccups keeps the load it last reported rather than suddenly looking
//! idle (0) or unusable. A number below 0 counts as 0 and one above
//! [`MAX_AGENT_LOAD`] as that: a negative load would turn a load rating
//! upside down, so that the node looked less loaded the more connections it
//! took, and took them all. Before the first answer `agent_load` is 0. A failing
//! agent is logged as a warning once when it starts failing and once when it
//! answers again, not at every poll. Agents only inform the load figure;
//! whether a node is available is health's business.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use tokio_util::sync::CancellationToken;

use crate::model::{Live, NodeFigures};

/// How often the poller looks for agents that are due.
const TICK: Duration = Duration::from_millis(100);
/// Longest answer accepted, newline included.
const MAX_ANSWER: usize = 64;
/// The largest load an agent may report; more counts as this.
pub const MAX_AGENT_LOAD: f64 = 1_000_000.0;

/// Why an agent gave no load.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach it: {0}")]
    Io(#[from] io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answer {0:?} is not a number (expected one line such as \"0.75\")")]
    BadAnswer(String),
}

/// Asks the agent at `addr` for its load, within `timeout`.
pub async fn query(addr: SocketAddr, timeout: Duration) -> Result<f64, AgentError> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut buf = [0u8; MAX_ANSWER];
        let mut len = 0;
        while len < buf.len() && !buf[..len].contains(&b'\n') {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Ok::<_, AgentError>(buf[..len].to_vec())
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| AgentError::Timeout(timeout))??;
    let text = String::from_utf8_lossy(&answer);
    let line = text.split('\n').next().unwrap_or_default().trim();
    match line.parse::<f64>() {
        // Also turns -0 into 0.
        Ok(v) if v.is_finite() && (text.contains('\n') || answer.len() < MAX_ANSWER) => {
            Ok(if v > 0.0 { v.min(MAX_AGENT_LOAD) } else { 0.0 })
        }
        _ => Err(AgentError::BadAnswer(line.to_string())),
    }
}

/// One agent being polled: when next, and whether it is failing now.
struct Agent {
    due: Instant,
    failing: Arc<AtomicBool>,
    seen: bool,
}

/// Polls the agents of every node of the current snapshot, each every
/// `retry_interval` of its cluster, until `stop` is cancelled. One of the
/// control plane's background tasks; follows reloads (agents of nodes that leave
/// stop being polled, new ones start at once).
pub async fn poll_forever(live: Arc<Live>, stop: CancellationToken) {
    // Keyed by node identity and agent address.
    let mut agents: HashMap<(String, String, SocketAddr), Agent> = HashMap::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Polls in flight: they end with this task (dropping the set aborts them).
    let mut polls = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        while polls.try_join_next().is_some() {}
        let snapshot = live.snapshot.load_full();
        let now = Instant::now();
        agents.values_mut().for_each(|a| a.seen = false);
        for cluster in snapshot.clusters.values() {
            for node in &cluster.nodes {
                let Some(addr) = node.agent else { continue };
                let key = (cluster.name.clone(), node.name.clone(), addr);
                let agent = agents.entry(key).or_insert_with(|| Agent {
                    due: now,
                    failing: Arc::new(AtomicBool::new(false)),
                    seen: true,
                });
                agent.seen = true;
                if agent.due > now {
                    continue;
                }
                agent.due = now + cluster.retry_interval;
                let timeout = cluster.connect_timeout;
                let what = format!("cluster \"{}\" node \"{}\": agent {addr}", cluster.name, node.name);
                polls.spawn(poll_once(
                    addr,
                    timeout,
                    node.figures.clone(),
                    agent.failing.clone(),
                    what,
                ));
            }
        }
        agents.retain(|_, a| a.seen);
    }
}

async fn poll_once(
    addr: SocketAddr,
    timeout: Duration,
    figures: Arc<NodeFigures>,
    failing: Arc<AtomicBool>,
    what: String,
) {
    match query(addr, timeout).await {
        Ok(load) => {
            figures.set_agent_load(load);
            if failing.swap(false, Relaxed) {
                info!("{what} answers again: load {load}");
            } else {
                debug!("{what}: load {load}");
            }
        }
        Err(e) => {
            if !failing.swap(true, Relaxed) {
                warn!(
                    "{what}: {e}; keeping its last load {} until it answers",
                    figures.agent_load()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// An agent that answers `answer` to each of `n` connections.
    async fn agent(answer: &'static [u8], n: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..n {
                let (mut s, _) = listener.accept().await.unwrap();
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn reads_one_line_with_a_number() {
        assert_eq!(query(agent(b"0.75\n", 1).await, T).await.unwrap(), 0.75);
        assert_eq!(query(agent(b" 42 \r\nignored\n", 1).await, T).await.unwrap(), 42.0);
        assert_eq!(query(agent(b"7", 1).await, T).await.unwrap(), 7.0); // EOF ends the line
    }

    #[tokio::test]
    async fn loads_are_held_between_zero_and_the_maximum() {
        for (answer, load) in [
            (
                &b"-1e300
"[..],
                0.0,
            ),
            (
                b"-0.5
", 0.0,
            ),
            (
                b"-0
", 0.0,
            ),
            (
                b"1e300
",
                MAX_AGENT_LOAD,
            ),
            (
                b"999999
", 999_999.0,
            ),
        ] {
            let answer: &'static [u8] = Box::leak(answer.to_vec().into_boxed_slice());
            let got = query(agent(answer, 1).await, T).await.unwrap();
            assert_eq!(
                got.to_bits(),
                f64::to_bits(load),
                "{:?}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_number() {
        for bad in [&b"busy\n"[..], b"\n", b"NaN\n", b"inf\n", &[b'1'; 100]] {
            let bad: &'static [u8] = Box::leak(bad.to_vec().into_boxed_slice());
            let err = query(agent(bad, 1).await, T).await.unwrap_err();
            assert!(matches!(err, AgentError::BadAnswer(_)), "{err}");
        }
    }

    #[tokio::test]
    async fn unreachable_and_silent_agents_are_errors() {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(query(closed, T).await, Err(AgentError::Io(_))));
        // Accepts (in the backlog) but never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = query(silent.local_addr().unwrap(), Duration::from_millis(200)).await;
        assert!(matches!(err, Err(AgentError::Timeout(_))));
    }

    #[tokio::test]
    async fn a_failing_poll_keeps_the_last_load() {
        let figures = Arc::new(NodeFigures::new(crate::model::NodeState::Green));
        let failing = Arc::new(AtomicBool::new(false));
        poll_once(
            agent(b"3.5\n", 1).await,
            T,
            figures.clone(),
            failing.clone(),
            "t".into(),
        )
        .await;
        assert_eq!(figures.agent_load(), 3.5);
        poll_once(
            agent(b"what\n", 1).await,
            T,
            figures.clone(),
            failing.clone(),
            "t".into(),
        )
        .await;
        assert_eq!(figures.agent_load(), 3.5);
        assert!(failing.load(Relaxed));
        poll_once(agent(b"1\n", 1).await, T, figures.clone(), failing.clone(), "t".into()).await;
        assert_eq!(figures.agent_load(), 1.0);
        assert!(!failing.load(Relaxed));
    }
}
