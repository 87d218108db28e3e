//! Slow start (`slow_start` on a cluster): a node that becomes eligible —
//! back from unavailable, set green, or added by a reload — takes a share
//! of new clients that grows linearly from a twentieth of its weight to all
//! of it over the window. The moment is recorded where it happens
//! (`NodeFigures::begin_ramp`); this task moves every ramp on a few times a
//! second, so the algorithms read a share (`Node::weight_permille`) and no
//! clock. Pins that affinity made elsewhere stay where they are.
//!
//! Owns the ramp's pace only; never decides eligibility.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::model::Live;

/// How often a ramp under way is moved on; the ramp's steps are at most this long.
const STEP: Duration = Duration::from_millis(100);
/// How often the task looks for a ramp when none is under way.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Moves every node's ramp on until `stop` is cancelled.
pub async fn run(live: Arc<Live>, stop: CancellationToken) {
    loop {
        let snapshot = live.snapshot.load_full();
        let now = std::time::Instant::now();
        let mut ramping = false;
        for cluster in snapshot.clusters.values() {
            for node in &cluster.nodes {
                // A cluster that lost its slow start in a reload ends its ramps at once.
                ramping |= node.figures.advance_ramp(cluster.slow_start, now);
            }
        }
        let pause = if ramping { STEP } else { IDLE_TICK };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
