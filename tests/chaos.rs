//! Chaos: while clients run echo exchanges with end-to-end checks, nodes are
//! killed, restarted and switched between green, yellow and red at random
//! for a bounded time. No client may see an error unless the node serving it
//! was killed or cut (red) during its connection; no byte may change; and
//! the figures must add up.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;
use protobalance::model::{NodeState, Refusal};
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const NODES: usize = 4;
const CLIENTS: usize = 8;
const CHAOS: Duration = Duration::from_secs(6);

/// A node that greets with its index, then echoes; it can be killed (every
/// connection dropped, listener closed) and restarted on the same port.
struct Node {
    index: u8,
    addr: SocketAddr,
    /// Bumped before every disruption (kill or red): a client that saw its
    /// connection fail checks whether its node was disrupted meanwhile.
    disruptions: AtomicU64,
    running: std::sync::Mutex<Option<JoinSet<()>>>,
}

impl Node {
    async fn start(index: u8) -> Arc<Node> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = Arc::new(Node {
            index,
            addr: listener.local_addr().unwrap(),
            disruptions: AtomicU64::new(0),
            running: std::sync::Mutex::new(None),
        });
        node.run(listener);
        node
    }

    fn run(&self, listener: TcpListener) {
        let index = self.index;
        let mut set = JoinSet::new();
        set.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut s, _)) = listener.accept().await {
                conns.spawn(async move {
                    if s.write_all(&[index]).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        *self.running.lock().unwrap() = Some(set);
    }

    fn is_running(&self) -> bool {
        self.running.lock().unwrap().is_some()
    }

    /// Closes the listener and, with the accept loop, every connection; the
    /// listener is closed when this returns.
    async fn kill(&self) {
        self.disruptions.fetch_add(1, SeqCst);
        let running = self.running.lock().unwrap().take();
        if let Some(mut set) = running {
            set.shutdown().await;
        }
    }

    async fn restart(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("node {} could not rebind {}: {e}", self.index, self.addr));
        self.run(listener);
    }
}

struct Tally {
    /// Every disruption of any node, for failures before the client knows its node.
    disruptions: AtomicU64,
    attempts: AtomicU64,
    ok: AtomicU64,
    cut: AtomicU64,
    bytes: AtomicU64,
    /// The chaos driver's rounds so far; `u64::MAX` once it has stopped.
    rounds: tokio::sync::watch::Sender<u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            disruptions: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            rounds: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// Whether `counter` moved past `before`. The chaos driver bumps a node's
/// counter before disrupting it and again at the start of the next round,
/// once the disruption has surely taken effect; so after the next round has
/// begun, a failure the disruption caused shows here even if the first bump
/// preceded `before`.
async fn disrupted_since(counter: &AtomicU64, before: u64, tally: &Tally) -> bool {
    let now = *tally.rounds.borrow();
    // The driver has finished (rounds = MAX): every disruption is counted
    // already, and no later round will come to wait for.
    if now != u64::MAX {
        let mut rounds = tally.rounds.subscribe();
        within(
            "the chaos driver's next round",
            rounds.wait_for(|r| *r > now.saturating_add(1)),
        )
        .await
        .expect("the driver keeps the round counter");
    }
    counter.load(SeqCst) != before
}

/// One exchange: read the node's index, send a random payload, read it back.
/// Returns Ok(true) when clean, Ok(false) when it failed because its node was
/// disrupted, Err(description) for any other failure.
async fn exchange(addr: SocketAddr, nodes: &[Arc<Node>], tally: &Tally) -> Result<bool, String> {
    tally.attempts.fetch_add(1, SeqCst);
    let any_before = tally.disruptions.load(SeqCst);
    let before: Vec<u64> = nodes.iter().map(|n| n.disruptions.load(SeqCst)).collect();
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        // The balancer accepted, a node greeted and was cut (red: reset)
        // before this task got round to finishing its connect, which then
        // reports the reset: the same case as a lost greeting below.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            if disrupted_since(&tally.disruptions, any_before, tally).await {
                tally.cut.fetch_add(1, SeqCst);
                return Ok(false);
            }
            return Err(format!("connect reset and no disruption meanwhile: {e}"));
        }
        Err(e) => return Err(format!("connect: {e}")),
    };
    let mut id = [0u8; 1];
    if let Err(e) = s.read_exact(&mut id).await {
        // The node had greeted the balancer and was disrupted before the
        // greeting reached the client: the client cannot tell which node it
        // was, so any disruption meanwhile accounts for it.
        if disrupted_since(&tally.disruptions, any_before, tally).await {
            tally.cut.fetch_add(1, SeqCst);
            return Ok(false);
        }
        return Err(format!("no greeting and no disruption meanwhile: {e}"));
    }
    let node = &nodes[id[0] as usize];
    let len = rand::rng().random_range(1..64 * 1024);
    let payload = random_bytes(len);
    let (mut r, mut w) = s.into_split();
    let send = async {
        w.write_all(&payload).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(len);
    let (sent, got) = tokio::join!(send, r.read_to_end(&mut back));
    if sent.is_ok() && got.is_ok() && back.len() == len {
        assert!(back == payload, "bytes changed through node {}", node.index);
        tally.ok.fetch_add(1, SeqCst);
        tally.bytes.fetch_add(len as u64, SeqCst);
        return Ok(true);
    }
    // Any difference other than a truncation is corruption.
    assert!(payload.starts_with(&back), "bytes changed through node {}", node.index);
    if disrupted_since(&node.disruptions, before[node.index as usize], tally).await {
        tally.cut.fetch_add(1, SeqCst);
        Ok(false)
    } else {
        Err(format!(
            "node {} failed without being disrupted: {sent:?} {got:?}, {} of {len} bytes",
            node.index,
            back.len()
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_keeps_every_client_served_while_a_green_node_can() {
    let mut nodes = Vec::new();
    for i in 0..NODES {
        nodes.push(Node::start(i as u8).await);
    }
    // A ring of fall-over nodes would be a loop; a chain: n0 -> n1 -> n2 -> n3.
    let mut cluster = Cluster::new("pool")
        .key("connect_timeout = \"500ms\"")
        .key("retry_interval = \"100ms\"");
    for n in &nodes {
        let node = common::Node::new(&format!("n{}", n.index), n.addr);
        let next = n.index as usize + 1;
        cluster = cluster.node(if next < NODES {
            node.fallover(&format!("n{next}"))
        } else {
            node
        });
    }
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    let server = Arc::new(server);

    let nodes = Arc::new(nodes);
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        let (nodes, tally, stop) = (nodes.clone(), tally.clone(), stop.clone());
        clients.spawn(async move {
            while !stop.load(SeqCst) {
                exchange(addr, &nodes, &tally).await?;
            }
            Ok::<(), String>(())
        });
    }

    // The chaos: never disrupt the last node that is running, green and available.
    let started = Instant::now();
    let mut states = [NodeState::Green; NODES];
    let mut actions = Vec::new();
    let mut disrupted_last_round: Option<usize> = None;
    while started.elapsed() < CHAOS {
        // Paced: the clients run a few exchanges between two actions.
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(50..250))).await;
        if let Some(j) = disrupted_last_round.take() {
            nodes[j].disruptions.fetch_add(1, SeqCst);
            tally.disruptions.fetch_add(1, SeqCst);
        }
        tally.rounds.send_modify(|r| *r += 1);
        let i = rand::rng().random_range(0..NODES);
        // Healthy: running, green, and known to the balancer as available (a
        // node restarted moments ago stays unavailable until its next retry).
        let snapshot = server.snapshot();
        let available = |j: usize| {
            snapshot.clusters["pool"]
                .nodes
                .iter()
                .any(|n| *n.name == format!("n{j}") && n.figures.is_available())
        };
        let healthy_others = (0..NODES)
            .filter(|&j| j != i && nodes[j].is_running() && states[j] == NodeState::Green && available(j))
            .count();
        let action = rand::rng().random_range(0..4);
        match action {
            0 if nodes[i].is_running() && healthy_others > 0 => {
                tally.disruptions.fetch_add(1, SeqCst);
                nodes[i].kill().await;
                disrupted_last_round = Some(i);
                actions.push(format!("kill n{i}"));
            }
            0 if !nodes[i].is_running() => {
                nodes[i].restart().await;
                actions.push(format!("restart n{i}"));
            }
            1 if healthy_others > 0 => {
                tally.disruptions.fetch_add(1, SeqCst);
                nodes[i].disruptions.fetch_add(1, SeqCst);
                server.set_node_state("pool", &format!("n{i}"), NodeState::Red).unwrap();
                disrupted_last_round = Some(i);
                states[i] = NodeState::Red;
                actions.push(format!("red n{i}"));
            }
            2 if healthy_others > 0 => {
                server
                    .set_node_state("pool", &format!("n{i}"), NodeState::Yellow)
                    .unwrap();
                states[i] = NodeState::Yellow;
                actions.push(format!("yellow n{i}"));
            }
            _ => {
                server
                    .set_node_state("pool", &format!("n{i}"), NodeState::Green)
                    .unwrap();
                states[i] = NodeState::Green;
                actions.push(format!("green n{i}"));
            }
        }
    }
    stop.store(true, SeqCst);
    // The last disruption's second bump, then no more rounds: a client still
    // asking whether its failure had a cause gets its answer now.
    if let Some(j) = disrupted_last_round.take() {
        nodes[j].disruptions.fetch_add(1, SeqCst);
        tally.disruptions.fetch_add(1, SeqCst);
    }
    tally.rounds.send_replace(u64::MAX);
    while let Some(result) = within("clients finish", clients.join_next()).await {
        if let Err(e) = result.unwrap() {
            panic!("{e}\nchaos so far: {}", actions.join(", "));
        }
    }

    // The figures add up: every accepted connection finished and is counted.
    let figures = server.snapshot().services["svc"].figures.clone();
    wait_until("connections drain", || async { figures.active_connections() == 0 }).await;
    let attempts = tally.attempts.load(SeqCst);
    assert_eq!(
        figures.accepted(),
        attempts,
        "every client connection was accepted and counted once"
    );
    assert_eq!(
        figures.refused(Refusal::NoNode),
        0,
        "no client was turned away while a green node could serve it"
    );
    let snapshot = server.snapshot();
    let served: u64 = snapshot.clusters["pool"]
        .nodes
        .iter()
        .map(|n| n.figures.total_connections())
        .sum();
    let bytes_in: u64 = snapshot.clusters["pool"]
        .nodes
        .iter()
        .map(|n| n.figures.bytes_in())
        .sum();
    assert_eq!(
        served, attempts,
        "each accepted connection was served by exactly one node"
    );
    assert!(
        bytes_in >= tally.bytes.load(SeqCst),
        "the nodes' byte counts cover every byte the clients sent"
    );
    let (ok, cut) = (tally.ok.load(SeqCst), tally.cut.load(SeqCst));
    assert!(ok > 100, "the load ran ({ok} clean exchanges)");
    eprintln!(
        "chaos: {} actions, {attempts} connections, {ok} clean, {cut} cut with their node",
        actions.len()
    );
    Arc::try_unwrap(server)
        .ok()
        .expect("no other handle")
        .shutdown(Duration::ZERO)
        .await;
}
