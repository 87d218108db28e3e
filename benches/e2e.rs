//! End-to-end load benchmark, self-contained: backends and load generator
//! in this process, the balancer binary as a child process, the same load run
//! against a backend directly for comparison.
//!
//! ```text
//! cargo bench --bench e2e                   # every scenario, 5 s each
//! cargo bench --bench e2e -- --secs 10      # longer runs
//! cargo bench --bench e2e -- --soak 600     # 10-minute soak: churn + long streams, RSS/fds/threads sampled
//! ```
//! Figures: `churn` connections/s (connect, 1 request, close), `keepalive`
//! requests/s over 32 connections, `bulk` Gbit/s over one stream. The ratio
//! column is balancer / direct. Every loop is bounded in time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const BODY_SIZE: usize = 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<u64>().expect("a number"))
    };
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us briefly as a smoke test.
    let smoke = !args.iter().any(|a| a == "--bench");
    let secs = value("--secs").unwrap_or(if smoke { 1 } else { 5 });
    let soak = value("--soak");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = http_backend().await;
        let sink = sink_backend().await;
        let mut balancer = Balancer::start(&[http, sink]);
        let (lb_http, lb_sink) = (balancer.addrs[0], balancer.addrs[1]);
        let run = Duration::from_secs(secs);
        if let Some(soak) = soak {
            soak_run(&balancer, lb_http, lb_sink, Duration::from_secs(soak)).await;
        } else {
            println!(
                "{:<10} {:>14} {:>14} {:>7}",
                "scenario", "direct", "protobalance", "ratio"
            );
            for (name, unit) in [("churn", "conn/s"), ("keepalive", "req/s"), ("bulk", "Gbit/s")] {
                let (direct, through) = match name {
                    "churn" => (churn(http, 16, run).await, churn(lb_http, 16, run).await),
                    "keepalive" => (keepalive(http, 32, run).await, keepalive(lb_http, 32, run).await),
                    _ => (bulk(sink, run).await, bulk(lb_sink, run).await),
                };
                println!(
                    "{name:<10} {:>14} {:>14} {:>7.2}",
                    format!("{direct:.1} {unit}"),
                    format!("{through:.1} {unit}"),
                    through / direct
                );
            }
        }
        balancer.stop();
    });
}

/// An HTTP/1.1 keep-alive responder: a fixed 1 KiB body for every request.
async fn http_backend() -> SocketAddr {
    serve(|mut s| async move {
        let response = {
            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY_SIZE}\r\n\r\n").into_bytes();
            r.resize(r.len() + BODY_SIZE, b'x');
            r
        };
        let mut buf = vec![0u8; 4096];
        let mut have = 0;
        loop {
            match s.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
            while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                if s.write_all(&response).await.is_err() {
                    return;
                }
                buf.copy_within(end + 4..have, 0);
                have -= end + 4;
            }
        }
    })
    .await
}

/// Reads and discards everything.
async fn sink_backend() -> SocketAddr {
    serve(|mut s| async move {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// One request, read the whole response (headers + 1 KiB body).
async fn request(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    s.write_all(REQUEST).await?;
    let mut got = 0;
    let mut need = usize::MAX;
    while got < need {
        let n = s.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
        if need == usize::MAX
            && let Some(end) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n")
        {
            need = end + 4 + BODY_SIZE;
        }
    }
    Ok(())
}

/// `clients` loops of connect → one request → close; connections per second.
async fn churn(addr: SocketAddr, clients: usize, run: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + run;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while Instant::now() < deadline {
                    let Ok(mut s) = TcpStream::connect(addr).await else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    if request(&mut s, &mut buf).await.is_ok() {
                        done.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    done.load(Relaxed) as f64 / run.as_secs_f64()
}

/// `conns` keep-alive connections each sending requests back to back; requests per second.
async fn keepalive(addr: SocketAddr, conns: usize, run: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + run;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    return;
                };
                let _ = s.set_nodelay(true);
                while Instant::now() < deadline && request(&mut s, &mut buf).await.is_ok() {
                    done.fetch_add(1, Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    done.load(Relaxed) as f64 / run.as_secs_f64()
}

/// One stream writing for `run`; Gbit/s.
async fn bulk(addr: SocketAddr, run: Duration) -> f64 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let deadline = Instant::now() + run;
    let start = Instant::now();
    let mut sent = 0u64;
    while Instant::now() < deadline {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    let _ = s.shutdown().await;
    sent as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// The balancer binary, one service per backend, on ports the kernel picks.
struct Balancer {
    child: Child,
    addrs: Vec<SocketAddr>,
    _config: tempfile::NamedTempFile,
}

impl Balancer {
    fn start(backends: &[SocketAddr]) -> Balancer {
        let mut text = String::from("[admin]\nlisten = \"127.0.0.1:0\"\n");
        for (i, b) in backends.iter().enumerate() {
            text.push_str(&format!(
                "[[service]]\nname = \"s{i}\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c{i}\"\n\
                 [[cluster]]\nname = \"c{i}\"\n[[cluster.node]]\nname = \"n\"\naddress = \"{b}\"\n"
            ));
        }
        let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(config.path(), text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_protobalance"))
            .args(["run", "--config"])
            .arg(config.path())
            .args(["--log-level", "info,protobalance::access=off"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("the balancer starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut addrs = Vec::new();
        while addrs.len() < backends.len() {
            let line = lines.next().expect("the balancer logs its listeners").unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                addrs.push(rest.split_whitespace().next().unwrap().parse().unwrap());
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        // Services are listed in config order, one listener each.
        Balancer {
            child,
            addrs,
            _config: config,
        }
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    /// RSS (KB), open descriptors and threads of the balancer, from /proc.
    fn footprint(&self) -> (u64, usize, u64) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        (field("VmRSS:"), fds, field("Threads:"))
    }
}

/// Churn plus a few long streams for `length`; prints the footprint every 10 s.
async fn soak_run(balancer: &Balancer, http: SocketAddr, sink: SocketAddr, length: Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(sink).await.unwrap();
                let chunk = vec![1u8; 16 * 1024];
                while !stop.load(Relaxed) {
                    s.write_all(&chunk).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    println!(
        "{:>6} {:>10} {:>8} {:>6} {:>8} {:>12}",
        "secs", "conn/s", "RSS KB", "fds", "threads", "connections"
    );
    let start = Instant::now();
    let mut total = 0.0;
    while start.elapsed() < length {
        let rate = churn(http, 8, Duration::from_secs(10)).await;
        total += rate * 10.0;
        let (rss, fds, threads) = balancer.footprint();
        println!(
            "{:>6} {:>10.0} {:>8} {:>6} {:>8} {:>12.0}",
            start.elapsed().as_secs(),
            rate,
            rss,
            fds,
            threads,
            total
        );
    }
    stop.store(true, Relaxed);
    for s in streams {
        let _ = s.await;
    }
}
