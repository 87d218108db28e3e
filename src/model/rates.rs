//! Per-node load figures that need time to be meaningful: the EWMA rates of
//! new connections and of bytes each way, and the load a node's agent last
//! reported. This module owns [`LoadFigures`] (one per node, inside
//! [`NodeFigures`], so it survives reloads like the counters do), the rate
//! getters the algorithms read, and the background sampler that turns the
//! node's monotonic counters into rates.
//!
//! # The rates
//!
//! Every [`SAMPLE_PERIOD`] the sampler takes, per node, the growth `Δ` of a
//! counter over the elapsed `dt` seconds and folds it into an exponentially
//! weighted moving average with time constant [`TIME_CONSTANT`] (τ):
//!
//! ```text
//! α = 1 − exp(−dt / τ)
//! ewma ← ewma + α · (Δ / dt − ewma)
//! ```
//!
//! A rate as read by an algorithm is *live*: the EWMA of the last sample plus
//! what the counter grew since, divided by τ (`rate = ewma + pending / τ`, the
//! first-order share that `pending` will add at the next sample). So a pick
//! sees every connection opened and every byte moved since the last sample:
//! a burst does not all land on the node that was lightest at the last tick,
//! and a long-lived connection weighs from its first bytes, not when it ends.
//! Readers use no clock: the rates are a pure function of atomics.
//!
//! # Warm-up
//!
//! A node whose figures are new (it just joined, or the balancer just started)
//! has no history; read as zero it would take every new connection until its
//! EWMA caught up with its peers — a flood. Instead, until the sampler has seen
//! it once, a node is *unseeded*: algorithms take its EWMA to be the mean
//! per-weight EWMA of its cluster's seeded eligible nodes ([`seeded_mean`])
//! times its weight, plus, like any node, what it took since it joined; the
//! sampler's first visit seeds its EWMA with that same mean times its weight.
//! From then on its own traffic moves its rate like any other node's. When no
//! node is seeded yet (start-up) the mean is 0: every node starts equal.
//!
//! # Agent load
//!
//! `agent_load` is whatever number the node's load agent last answered
//! (`crate::health::agent`); 0 until it first answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Live, Node, NodeFigures};

/// τ, the time constant of every EWMA rate: a step change in load shows as
/// 63% of its size after τ and 95% after 3τ. Five seconds follows a change
/// within a few seconds while smoothing out single bursts.
pub const TIME_CONSTANT: Duration = Duration::from_secs(5);

/// How often the sampler folds the counters into the rates.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(250);

/// An `f64` in an `AtomicU64`, as its bits.
#[derive(Debug, Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed);
    }
}

/// EWMA rates (as of the last sample), the counters they were sampled at, and
/// the agent's reported load. Written by the sampler and the agent poller only.
#[derive(Debug, Default)]
pub struct LoadFigures {
    /// New connections per second.
    connection_rate: AtomicF64,
    /// Bytes per second, client → node.
    rx_rate: AtomicF64,
    /// Bytes per second, node → client.
    tx_rate: AtomicF64,
    sampled_total: AtomicU64,
    sampled_bytes_in: AtomicU64,
    sampled_bytes_out: AtomicU64,
    /// Whether the sampler has seen this node once (see "Warm-up" above).
    seeded: AtomicBool,
    agent_load: AtomicF64,
}

fn pending_per_second(now: u64, sampled: &AtomicU64) -> f64 {
    now.saturating_sub(sampled.load(Relaxed)) as f64 / TIME_CONSTANT.as_secs_f64()
}

/// Which rate: what the rate-based algorithms and the warm-up rule ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// New connections per second.
    Connections,
    /// Bytes per second, client → node.
    Rx,
    /// Bytes per second, node → client.
    Tx,
    /// Bytes per second, both directions.
    Traffic,
}

/// The live rates of a node, read without a clock (see the module doc).
impl NodeFigures {
    /// The live `rate`: its EWMA plus what the counter grew since the last sample, over τ.
    pub fn rate(&self, rate: Rate) -> f64 {
        let l = &self.load;
        let pending = match rate {
            Rate::Connections => pending_per_second(self.total_connections(), &l.sampled_total),
            Rate::Rx => pending_per_second(self.bytes_in(), &l.sampled_bytes_in),
            Rate::Tx => pending_per_second(self.bytes_out(), &l.sampled_bytes_out),
            Rate::Traffic => {
                pending_per_second(self.bytes_in(), &l.sampled_bytes_in)
                    + pending_per_second(self.bytes_out(), &l.sampled_bytes_out)
            }
        };
        self.sampled_rate(rate) + pending
    }
    /// The EWMA of `rate` as of the last sample.
    fn sampled_rate(&self, rate: Rate) -> f64 {
        let l = &self.load;
        match rate {
            Rate::Connections => l.connection_rate.get(),
            Rate::Rx => l.rx_rate.get(),
            Rate::Tx => l.tx_rate.get(),
            Rate::Traffic => l.rx_rate.get() + l.tx_rate.get(),
        }
    }
    /// New connections per second.
    pub fn connection_rate(&self) -> f64 {
        self.rate(Rate::Connections)
    }
    /// Bytes per second, client → node.
    pub fn rx_rate(&self) -> f64 {
        self.rate(Rate::Rx)
    }
    /// Bytes per second, node → client.
    pub fn tx_rate(&self) -> f64 {
        self.rate(Rate::Tx)
    }
    /// Bytes per second, both directions.
    pub fn traffic_rate(&self) -> f64 {
        self.rate(Rate::Traffic)
    }
    /// Whether the sampler has seen this node; unseeded nodes are rated at
    /// their cluster's mean (see "Warm-up" in the module doc).
    pub fn is_seeded(&self) -> bool {
        self.load.seeded.load(Relaxed)
    }
    /// The load the node's agent last reported; 0 before its first answer.
    pub fn agent_load(&self) -> f64 {
        self.load.agent_load.get()
    }
    pub fn set_agent_load(&self, load: f64) {
        self.load.agent_load.set(load);
    }

    /// Sets the EWMA rates directly and marks the node seeded: for tests and
    /// benchmarks that feed synthetic figures.
    pub fn set_rates(&self, connection_rate: f64, rx_rate: f64, tx_rate: f64) {
        let l = &self.load;
        l.connection_rate.set(connection_rate);
        l.rx_rate.set(rx_rate);
        l.tx_rate.set(tx_rate);
        l.sampled_total.store(self.total_connections(), Relaxed);
        l.sampled_bytes_in.store(self.bytes_in(), Relaxed);
        l.sampled_bytes_out.store(self.bytes_out(), Relaxed);
        l.seeded.store(true, Relaxed);
    }
}

/// The mean of `EWMA / weight` of `rate` over the seeded eligible nodes, or 0
/// when there are none: the EWMA per unit of weight an unseeded node is taken
/// to have. (The EWMA, not the live rate: the unseeded node's own connections
/// since it joined count on top, as every node's do.)
pub fn seeded_mean(nodes: &[Node], rate: Rate) -> f64 {
    let (mut sum, mut count) = (0.0, 0u32);
    for n in nodes.iter().filter(|n| n.is_eligible() && n.figures.is_seeded()) {
        sum += n.figures.sampled_rate(rate) / f64::from(n.weight);
        count += 1;
    }
    if count == 0 { 0.0 } else { sum / f64::from(count) }
}

/// Folds `dt` of counter growth into the rates of one cluster's `nodes`, and
/// seeds the nodes it sees for the first time.
pub fn sample(nodes: &[Node], dt: Duration) {
    let dt = dt.as_secs_f64();
    if dt <= 0.0 {
        return;
    }
    let alpha = 1.0 - libm::exp(-dt / TIME_CONSTANT.as_secs_f64());
    let mean_connections = seeded_mean(nodes, Rate::Connections);
    let mean_rx = seeded_mean(nodes, Rate::Rx);
    let mean_tx = seeded_mean(nodes, Rate::Tx);
    for node in nodes {
        let f = &node.figures;
        let l = &f.load;
        let (total, bytes_in, bytes_out) = (f.total_connections(), f.bytes_in(), f.bytes_out());
        let grown = |now: u64, sampled: &AtomicU64| now.saturating_sub(sampled.swap(now, Relaxed)) as f64;
        let d_total = grown(total, &l.sampled_total);
        let d_in = grown(bytes_in, &l.sampled_bytes_in);
        let d_out = grown(bytes_out, &l.sampled_bytes_out);
        if !l.seeded.swap(true, Relaxed) {
            // Seed at the cluster's mean, keeping what the node already took
            // as pending so that its live rate does not jump.
            let w = f64::from(node.weight);
            let tau = TIME_CONSTANT.as_secs_f64();
            l.connection_rate.set(mean_connections * w + d_total / tau);
            l.rx_rate.set(mean_rx * w + d_in / tau);
            l.tx_rate.set(mean_tx * w + d_out / tau);
            continue;
        }
        let fold = |ewma: &AtomicF64, delta: f64| ewma.set(ewma.get() + alpha * (delta / dt - ewma.get()));
        fold(&l.connection_rate, d_total);
        fold(&l.rx_rate, d_in);
        fold(&l.tx_rate, d_out);
    }
}

/// Samples every cluster of the current snapshot every [`SAMPLE_PERIOD`],
/// until `stop` is cancelled. One of the control plane's background tasks.
pub async fn sample_forever(live: Arc<Live>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(SAMPLE_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let snapshot = live.snapshot.load();
        for cluster in snapshot.clusters.values() {
            sample(&cluster.nodes, now - last);
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::nodes;

    const TAU: f64 = 5.0;

    #[test]
    fn steady_rate_converges_and_a_step_shows_63_percent_after_tau() {
        let ns = nodes(&[1]);
        let f = &ns[0].figures;
        sample(&ns, Duration::from_secs(1)); // seeds at 0
        // 20 connections a second for 20 τ: the EWMA reaches 20.
        for _ in 0..(20.0 * TAU) as usize * 4 {
            for _ in 0..5 {
                drop(f.open_connection());
            }
            sample(&ns, Duration::from_millis(250));
        }
        assert!((f.connection_rate() - 20.0).abs() < 0.01, "{}", f.connection_rate());
        // Then nothing for τ: 1/e of it is left.
        for _ in 0..(TAU as usize * 4) {
            sample(&ns, Duration::from_millis(250));
        }
        let expected = 20.0 * (-1.0f64).exp();
        assert!((f.connection_rate() - expected).abs() < 0.05, "{}", f.connection_rate());
    }

    #[test]
    fn bytes_count_while_they_flow_before_the_next_sample() {
        let ns = nodes(&[1]);
        let f = &ns[0].figures;
        sample(&ns, Duration::from_secs(1));
        f.add_bytes_in(1000);
        f.add_bytes_out(4000);
        assert_eq!(f.rx_rate(), 1000.0 / TAU);
        assert_eq!(f.traffic_rate(), 5000.0 / TAU);
        // The sample folds the pending bytes in (≈ the same live rate).
        sample(&ns, Duration::from_millis(250));
        let folded = f.traffic_rate();
        assert!((folded - 5000.0 / TAU).abs() < 0.03 * 5000.0 / TAU, "{folded}");
    }

    #[test]
    fn a_new_node_is_seeded_at_its_clusters_mean_per_weight() {
        let ns = nodes(&[1, 2, 3]);
        ns[0].figures.set_rates(10.0, 100.0, 300.0);
        ns[1].figures.set_rates(30.0, 300.0, 900.0);
        assert!(!ns[2].figures.is_seeded());
        // Per weight: (10/1 + 30/2) / 2 = 12.5 connections/s.
        assert_eq!(seeded_mean(&ns, Rate::Connections), 12.5);
        sample(&ns, Duration::from_millis(250));
        let new = &ns[2].figures;
        assert!(new.is_seeded());
        assert_eq!(new.connection_rate(), 37.5);
        assert_eq!(new.rx_rate(), 375.0);
        assert_eq!(new.tx_rate(), 1125.0);
    }
}
