//! Controller deployment: redirecting a service between two clusters under a
//! steady stream of new connections loses none of them.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use hyper::Method;
use tokio::sync::Mutex;

const CONNECTIONS: usize = 2_000;
const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_under_load_fails_no_connection() {
    let (blue1, blue2, green1) = (
        name_backend("blue").await,
        name_backend("blue").await,
        name_backend("green").await,
    );
    let (server, admin, _file) = ConfigText::new()
        .service(Service::new("web", "blue"))
        .cluster(Cluster::of("blue", &[("b1", blue1), ("b2", blue2)]))
        .cluster(Cluster::of("green", &[("g1", green1)]))
        .start_with_admin()
        .await;
    let web = server.addr_of("web").unwrap();

    // The service flips between the clusters when these many connections have started.
    const FLIPS: [(usize, &str); 4] = [(400, "green"), (800, "blue"), (1_200, "green"), (1_600, "blue")];
    // How far the stream may run ahead of a flip that is late (a starved test
    // task on a loaded machine): it keeps every segment between flips non-empty,
    // and in the normal run is never reached, so the stream does not pause.
    const MAX_LEAD: usize = 300;

    // CLIENTS tasks open CONNECTIONS connections in all, one after the other each;
    // every connection must read a whole tag.
    let started = Arc::new(AtomicUsize::new(0));
    let (flips_done, flips_seen) = tokio::sync::watch::channel(0usize);
    let answers = Arc::new(Mutex::new(Vec::with_capacity(CONNECTIONS)));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (started, answers, mut flips_seen) = (started.clone(), answers.clone(), flips_seen.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            loop {
                let n = started.fetch_add(1, Ordering::Relaxed);
                if n >= CONNECTIONS {
                    return failures;
                }
                let due = FLIPS.iter().filter(|(at, _)| n >= at + MAX_LEAD).count();
                flips_seen.wait_for(|done| *done >= due).await.unwrap();
                match read_tag(web).await {
                    Ok(tag) if tag == "blue" || tag == "green" => answers.lock().await.push((n, tag)),
                    Ok(other) => failures.push(format!("connection {n}: answer {other:?}")),
                    Err(e) => failures.push(format!("connection {n}: {e}")),
                }
            }
        }));
    }

    for (i, (at, cluster)) in FLIPS.into_iter().enumerate() {
        let started = started.clone();
        wait_until(&format!("{at} connections started"), || {
            let n = started.load(Ordering::Relaxed);
            async move { n >= at }
        })
        .await;
        let body = format!(r#"{{"cluster":"{cluster}"}}"#);
        let reply = api(&admin, None, Method::PUT, "/api/v1/services/web/cluster", Some(&body)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        flips_done.send_replace(i + 1);
    }

    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed connection(s): {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let answers = answers.lock().await;
    assert_eq!(answers.len(), CONNECTIONS);
    let count = |tag: &str| answers.iter().filter(|(_, t)| t == tag).count();
    assert!(
        count("green") > 0 && count("blue") > 0,
        "both clusters served: green {}, blue {}",
        count("green"),
        count("blue")
    );

    let s = status(&admin, None).await;
    assert_eq!(service_status(&s, "web")["cluster"], "blue");
    assert_eq!(service_status(&s, "web")["total_connections"], CONNECTIONS as u64);
    assert_eq!(service_status(&s, "web")["refused_connections"], 0);
    let served: u64 = [("blue", "b1"), ("blue", "b2"), ("green", "g1")]
        .iter()
        .map(|(c, n)| node_status(&s, c, n)["total_connections"].as_u64().unwrap())
        .sum();
    assert_eq!(served, CONNECTIONS as u64);
    assert_eq!(
        node_status(&s, "green", "g1")["total_connections"],
        count("green") as u64
    );

    // After the last flip (back to blue) the next connection goes to blue.
    assert_eq!(read_tag(web).await.unwrap(), "blue");
    server.shutdown(PATIENCE).await;
}
