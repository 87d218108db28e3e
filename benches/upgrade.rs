//! How long an upgrade in place takes, and what the new process holds
//! afterwards: the balancer binary runs with N open connections (each has
//! made one request and stays open), gets SIGUSR2, and the time from the
//! signal to the old process's exit is measured; then the resident memory
//! of the old process (before) and of the new one (after it adopted the N
//! connections), and one more request on every connection, which must pass.
//!
//! ```text
//! cargo bench --bench upgrade                       # N = 0, 1000, 9000; 3 rounds each
//! cargo bench --bench upgrade -- --conns 0,1000 --rounds 5
//! ```
//! `cargo test --benches` runs it once with a few connections, as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, PATIENCE, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let smoke = !args.iter().any(|a| a == "--bench");
    let counts: Vec<usize> = value("--conns")
        .unwrap_or_else(|| if smoke { "0,20".into() } else { "0,1000,9000".into() })
        .split(',')
        .map(|n| n.parse().expect("a count"))
        .collect();
    let rounds: usize = value("--rounds").map_or(if smoke { 1 } else { 3 }, |r| r.parse().expect("a count"));
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let node = serve(|mut s| async move {
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        })
        .await;
        println!(
            "{:>6} {:>5} {:>12} {:>12} {:>12}",
            "conns", "round", "upgrade ms", "old RSS MB", "new RSS MB"
        );
        for &n in &counts {
            for round in 1..=rounds {
                let run = measure(node, n).await;
                println!(
                    "{n:>6} {round:>5} {:>12.1} {:>12.1} {:>12.1}",
                    run.upgrade.as_secs_f64() * 1000.0,
                    run.old_rss_kb as f64 / 1024.0,
                    run.new_rss_kb as f64 / 1024.0
                );
            }
        }
    });
}

struct Run {
    upgrade: Duration,
    old_rss_kb: u64,
    new_rss_kb: u64,
}

/// One balancer, `n` connections, one upgrade.
async fn measure(node: SocketAddr, n: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"\"\nshutdown_grace = \"30s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[service]]\nname = \"svc\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
             [[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"a\"\naddress = \"{node}\"\n"
        ),
    )
    .unwrap();
    let mut old = Command::new(BIN)
        .args([
            "--log-level",
            "warn,protobalance::cli=info,protobalance::proxy::plane=info",
            "run",
            "--config",
        ])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = listen_addr(&mut old);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        exchange(&mut c, i).await;
        conns.push(c);
    }
    let old_rss_kb = rss_kb(old.id());
    let started = Instant::now();
    // SAFETY: kill(2) on the balancer this benchmark started.
    assert_eq!(unsafe { libc::kill(old.id() as i32, libc::SIGUSR2) }, 0);
    let status = tokio::task::spawn_blocking(move || old.wait()).await.unwrap().unwrap();
    let upgrade = started.elapsed();
    assert!(status.success(), "the old process exited with {status}");
    let new = pid_on(addr);
    for (i, c) in conns.iter_mut().enumerate() {
        exchange(c, i).await;
    }
    let new_rss_kb = rss_kb(new);
    drop(conns);
    // SAFETY: the pid of the balancer the upgrade started.
    unsafe { libc::kill(new as i32, libc::SIGKILL) };
    Run {
        upgrade,
        old_rss_kb,
        new_rss_kb,
    }
}

async fn exchange(c: &mut TcpStream, i: usize) {
    let request = format!("{i:08}\n");
    c.write_all(request.as_bytes()).await.expect("request");
    let mut answer = vec![0u8; request.len()];
    tokio::time::timeout(PATIENCE, c.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(answer, request.as_bytes());
}

/// The service's address, from the `listening on ADDR` line.
fn listen_addr(child: &mut Child) -> SocketAddr {
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("the balancer logs its listener").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1)
            && !line.contains("admin")
        {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Keep draining its log (and its successors', which inherit the pipe).
    std::thread::spawn(move || lines.for_each(drop));
    addr
}

/// The pid of the process that owns the listening socket on `addr` now.
fn pid_on(addr: SocketAddr) -> u32 {
    let port = format!(":{:04X}", addr.port());
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let inode = tcp
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9 && f[1].ends_with(&port) && f[3] == "0A"
        })
        .map(|l| l.split_whitespace().nth(9).unwrap().to_string())
        .expect("the listener");
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target))
        {
            return pid;
        }
    }
    panic!("no process holds {addr}");
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
