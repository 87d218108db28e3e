//! Active checks (`[cluster.check]`): every node of a cluster that has one,
//! healthy or not, is checked every `interval`, each node at its own moment
//! within the interval (spread by its place in the cluster), one check per
//! node at a time. `fall` consecutive failures make an available node
//! unavailable (and, with `on_unavailable = "cut"`, cut its connections);
//! `rise` consecutive passes make an unavailable one available again, also
//! after a client's failed connect marked it down (passive marking stays).
//!
//! Runs on the control-plane runtime, never on a worker. A check opens one
//! connection and closes it when it is done, so an idle checker holds no
//! descriptor. What a check says about a node goes into its figures (the
//! verdict, the failures counted) for status, metrics and the dashboard,
//! and into the log once per change of verdict.
//!
//! Owns the conversations of each check type; never marks a port of a
//! port-following node (that is `probe`'s), never touches a client socket.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::probe::{figures_id, local_header, mark_available, mark_unavailable};
use crate::config::{CheckConfig, CheckKind, OnUnavailable, ProxyHeader, Step};
use crate::model::{Cluster, Live};

/// How long the checker sleeps when no cluster has a check.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// The most bytes a check reads of a greeting or status line.
const MAX_LINE: usize = 1024;
/// The most bytes a `send-expect` check keeps while it waits for an `expect`.
const MAX_EXPECT_WINDOW: usize = 64 * 1024;
/// How much of a bad reply a failure quotes.
const QUOTED: usize = 60;

/// Where one node's checks stand.
struct NodeChecks {
    next: Instant,
    passes: u32,
    failures: u32,
    in_flight: bool,
    /// The interval it was scheduled with: a reload that changes it reschedules.
    interval: Duration,
}

/// A finished check: the node (figures identity), its cluster and index, the result.
type Checked = (usize, Arc<Cluster>, usize, Result<(), String>);

/// Checks the nodes of every cluster with a check until `stop` is cancelled.
/// Reads the snapshot afresh every round, so reloads add, change and remove
/// checks, nodes and clusters; a node's count of passes and failures lives
/// as long as its figures (across reloads).
pub async fn run(live: Arc<Live>, stop: CancellationToken) {
    let mut nodes: HashMap<usize, NodeChecks> = HashMap::new();
    let mut checks: JoinSet<Checked> = JoinSet::new();
    loop {
        let snapshot = live.snapshot.load_full();
        let now = Instant::now();
        let mut seen = HashSet::new();
        let mut wake = now + IDLE_TICK;
        for cluster in snapshot.clusters.values() {
            let Some(check) = &cluster.check else { continue };
            let count = cluster.nodes.len().max(1) as u32;
            for (i, node) in cluster.nodes.iter().enumerate() {
                let id = figures_id(&node.figures);
                seen.insert(id);
                // Spread over the interval: node i of n starts i/n of the way in.
                let first = now + check.interval / count * i as u32;
                let entry = nodes.entry(id).or_insert_with(|| NodeChecks {
                    next: first,
                    passes: 0,
                    failures: 0,
                    in_flight: false,
                    interval: check.interval,
                });
                if entry.interval != check.interval {
                    entry.interval = check.interval;
                    entry.next = first;
                }
                if entry.next <= now && !entry.in_flight {
                    // The next one at its own moment, not from when this one ends.
                    entry.next += check.interval;
                    if entry.next <= now {
                        entry.next = now + check.interval;
                    }
                    if let Some(target) = node.checked_target(check.port) {
                        entry.in_flight = true;
                        let cluster = cluster.clone();
                        let check = check.clone();
                        let send_proxy = node.send_proxy;
                        checks.spawn(async move {
                            let result = check_once(&check, target, send_proxy).await;
                            (id, cluster, i, result)
                        });
                    }
                }
                wake = wake.min(entry.next);
            }
        }
        nodes.retain(|id, entry| entry.in_flight || seen.contains(id));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(wake) => {}
            Some(done) = checks.join_next() => {
                if let Ok((id, cluster, i, result)) = done
                    && let Some(entry) = nodes.get_mut(&id)
                {
                    entry.in_flight = false;
                    if let Some(check) = &cluster.check
                        && i < cluster.nodes.len()
                    {
                        judge(&cluster, check, i, entry, result);
                    }
                }
            }
        }
    }
}

/// Takes one check's result into the node's counts, verdict and health.
fn judge(cluster: &Cluster, check: &CheckConfig, i: usize, entry: &mut NodeChecks, result: Result<(), String>) {
    let node = &cluster.nodes[i];
    let figures = &node.figures;
    let before = figures.record_check(result.as_ref().map(|_| ()).map_err(String::as_str));
    let was_passing = before.as_ref().map(|b| b.passing);
    match result {
        Ok(()) => {
            entry.failures = 0;
            entry.passes = entry.passes.saturating_add(1);
            if was_passing == Some(false) {
                info!(cluster = %cluster.name, node = %node.name, "{} check passing again", check.kind.name());
            }
            if entry.passes >= check.rise && !figures.is_available() {
                mark_available(
                    cluster,
                    node,
                    format_args!("{} check passed {} time(s) in a row", check.kind.name(), entry.passes),
                );
            }
        }
        Err(why) => {
            entry.passes = 0;
            entry.failures = entry.failures.saturating_add(1);
            if was_passing != Some(false) {
                warn!(cluster = %cluster.name, node = %node.name, "{} check failing: {why}", check.kind.name());
            }
            if entry.failures >= check.fall && figures.is_available() {
                let why = format_args!(
                    "{} check failed {} time(s) in a row: {why}",
                    check.kind.name(),
                    entry.failures
                );
                if mark_unavailable(cluster, node, why) && cluster.on_unavailable == OnUnavailable::Cut {
                    warn!(
                        cluster = %cluster.name, node = %node.name,
                        "cutting the node's {} open connection(s) (on_unavailable = \"cut\")",
                        figures.active_connections()
                    );
                    figures.cut_connections();
                }
            }
        }
    }
}

/// One check of `target`, within the check's timeout; `Err` says why it failed.
pub async fn check_once(check: &CheckConfig, target: SocketAddr, send_proxy: ProxyHeader) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, converse(&check.kind, target, send_proxy)).await {
        Ok(result) => result,
        Err(_) => Err(format!("timeout after {:?}", check.timeout)),
    }
}

async fn converse(kind: &CheckKind, target: SocketAddr, send_proxy: ProxyHeader) -> Result<(), String> {
    let mut stream = TcpStream::connect(target).await.map_err(|e| describe(&e))?;
    let _ = stream.set_nodelay(true);
    match send_proxy {
        ProxyHeader::None => {}
        // The node reads a header first on every connection: say this one is ours.
        ProxyHeader::V1 => write(&mut stream, b"PROXY UNKNOWN\r\n").await?,
        ProxyHeader::V2 => write(&mut stream, &local_header()).await?,
    }
    match kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http {
            path,
            host,
            expect_status,
        } => {
            let host = host.clone().unwrap_or_else(|| target.to_string());
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: protobalance-check\r\nConnection: close\r\n\r\n"
            );
            write(&mut stream, request.as_bytes()).await?;
            let line = read_line(&mut stream).await?;
            let status = http_status(&line).ok_or_else(|| format!("not an HTTP answer: {}", quote(&line)))?;
            if (expect_status.0..=expect_status.1).contains(&status) {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
        CheckKind::Smtp => greeting(&mut stream, b"220", b"QUIT\r\n").await,
        CheckKind::Ftp => greeting(&mut stream, b"220", b"QUIT\r\n").await,
        CheckKind::Imap => greeting(&mut stream, b"* OK", b"a1 LOGOUT\r\n").await,
        CheckKind::Pop3 => greeting(&mut stream, b"+OK", b"QUIT\r\n").await,
        CheckKind::SendExpect(steps) => send_expect(&mut stream, steps).await,
    }
}

/// The greeting must start with `expected`; then `goodbye` is sent, so the
/// server logs a polite client rather than a broken one.
async fn greeting(stream: &mut TcpStream, expected: &[u8], goodbye: &[u8]) -> Result<(), String> {
    let line = read_line(stream).await?;
    if !line.starts_with(expected) {
        return Err(format!("greeting {}", quote(&line)));
    }
    let _ = stream.write_all(goodbye).await;
    Ok(())
}

async fn send_expect(stream: &mut TcpStream, steps: &[Step]) -> Result<(), String> {
    let mut window = Vec::new();
    for step in steps {
        match step {
            Step::Send(bytes) => {
                write(stream, bytes).await?;
                window.clear();
            }
            Step::Expect(wanted) => loop {
                if contains(&window, wanted) {
                    break;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.map_err(|e| describe(&e))?;
                if n == 0 {
                    return Err(format!(
                        "expected {}, the node closed after {}",
                        quote(wanted),
                        quote(&window)
                    ));
                }
                window.extend_from_slice(&chunk[..n]);
                if window.len() > MAX_EXPECT_WINDOW {
                    // Keep what may still hold the start of a match.
                    let keep = window.len() - wanted.len().min(window.len());
                    window.drain(..keep);
                }
            },
        }
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    stream.write_all(bytes).await.map_err(|e| describe(&e))
}

/// The first line the node sends (without its line end), at most [`MAX_LINE`] bytes.
async fn read_line(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| describe(&e))?;
        if n == 0 {
            return if line.is_empty() {
                Err("closed before answering".to_string())
            } else {
                Ok(line)
            };
        }
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        if line.len() >= MAX_LINE {
            line.truncate(MAX_LINE);
            return Ok(line);
        }
    }
}

/// The status code of an HTTP status line (`HTTP/1.1 200 OK`).
fn http_status(line: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ');
    if !words.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = words.next()?;
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

/// A node's bytes as a short, printable quotation for a log line or the
/// status (control characters escaped, long replies cut with `…`).
fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(QUOTED)]);
    let mut quoted = format!("{:?}", text.as_ref());
    if bytes.len() > QUOTED {
        quoted.insert(quoted.len() - 1, '…');
    }
    quoted
}

/// An I/O error as a check failure says it: the words an operator reads.
fn describe(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".to_string(),
        ConnectionReset => "connection reset".to_string(),
        ConnectionAborted => "connection aborted".to_string(),
        BrokenPipe => "the node closed the connection".to_string(),
        TimedOut => "timed out".to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(http_status(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(http_status(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(http_status(b"HTTP/1.1 2000 OK"), None);
        assert_eq!(http_status(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(http_status(b"\xff\xfe"), None);
    }

    #[test]
    fn quotations_are_short_and_printable() {
        assert_eq!(
            quote(b"421 Service not available\x07"),
            "\"421 Service not available\\u{7}\""
        );
        let long = quote(&[b'a'; 200]);
        assert!(long.chars().count() < 70 && long.ends_with("…\""), "{long}");
    }

    #[test]
    fn a_match_split_over_reads_is_found() {
        assert!(contains(b"xx+PO", b"+PO"));
        assert!(!contains(b"+P", b"+PONG"));
    }
}
