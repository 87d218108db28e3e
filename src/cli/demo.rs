//! `protobalance demo`: three tiny HTTP backends inside the process, a
//! balancer in front of them, and a line to paste into a shell.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::server::Server;

/// Number of demo backends.
pub const BACKENDS: usize = 3;

/// Starts `BACKENDS` HTTP backends on free loopback ports; each answers every
/// request with `hello from backend N`.
pub async fn start_backends() -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(BACKENDS);
    for n in 1..=BACKENDS {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, n));
            }
        });
    }
    Ok(addrs)
}

/// Reads one request head and answers it, then closes.
async fn answer(mut stream: TcpStream, backend: usize) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("hello from backend {backend}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The demo's configuration: one service on `listen`, round robin over `backends`.
pub fn config(listen: SocketAddr, backends: &[SocketAddr]) -> Config {
    let mut text = format!(
        "state_dir = \"\"\nshutdown_grace = \"1s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"demo\"\nlisten = [\"{listen}\"]\ncluster = \"demo\"\n\
         [[cluster]]\nname = \"demo\"\nalgorithm = \"round-robin\"\n"
    );
    for (i, b) in backends.iter().enumerate() {
        text.push_str(&format!(
            "[[cluster.node]]\nname = \"backend{}\"\naddress = \"{b}\"\n",
            i + 1
        ));
    }
    Config::parse(&text, "demo").expect("the demo config is valid")
}

/// Runs the demo until Ctrl-C.
pub async fn run(listen: &str) -> ExitCode {
    let listen: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("error: --listen {listen:?} is not an ADDR:PORT");
            return ExitCode::FAILURE;
        }
    };
    let backends = match start_backends().await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot start the demo backends: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(&config(listen, &backends)).await {
        Ok(s) => s,
        Err(first) => {
            let fallback = SocketAddr::new(listen.ip(), 0);
            match Server::start(&config(fallback, &backends)).await {
                Ok(s) => {
                    eprintln!("note: {first}; using a free port instead");
                    s
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let addr = server.addr_of("demo").expect("the demo service listens");
    let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    println!(
        "Proto Balance demo: {BACKENDS} backends ({}) behind http://{addr}/",
        list.join(", ")
    );
    println!("Try:   for i in 1 2 3 4 5 6; do curl -s http://{addr}/; done");
    match server.start_admin().await {
        Ok(admin) => println!("Dashboard: http://{admin}/   (protobalance ctl --admin {admin} status)"),
        Err(e) => eprintln!("note: no dashboard: {e}"),
    }
    println!("Press Ctrl-C to stop.");
    if let Err(e) = super::signals::stop_signal().await {
        eprintln!("error: cannot wait for Ctrl-C: {e}");
    }
    server.shutdown(std::time::Duration::from_secs(1)).await;
    ExitCode::SUCCESS
}
