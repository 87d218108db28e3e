//! The dashboard in a real headless browser (Debian's chromium driven by
//! playwright-core, tests/browser/dashboard.mjs): under load the page shows
//! numbers that move, and a click on yellow (confirmed) sets the node's state
//! on the server. Before that, a page from another origin (served here on
//! another loopback port) tries what a page can through the browser — a
//! `no-cors` reload, a form posted to the reload, a JSON `PUT` to a node's
//! state, framing the dashboard — and changes nothing.
//!
//! Needs `chromium` and `node` (scripts/test installs them and runs
//! `npm ci` in tests/browser through scripts/test.d/browser.sh). Without
//! them the test fails, or is counted as skipped under
//! PROTOBALANCE_ALLOW_SKIP=1 (tests/common/skip.rs). Set
//! PROTOBALANCE_SCREENSHOT=PATH to keep the screenshot (docs/dashboard.png
//! is made this way).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound of the load loop: the browser part takes seconds, not this many connections.
const MAX_CONNECTIONS: usize = 200_000;
/// Longer than the suite's PATIENCE: dashboard.mjs gives chromium's launch
/// and each of its steps bounds of their own, which this one must outlast so
/// that their errors, not a bare timeout, are what a failure shows.
const BROWSER_RUN: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_numbers_and_sets_a_state() {
    if !require_tools(&["chromium", "node", "npm"]) {
        return;
    }
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !browser_dir.join("node_modules/playwright-core").exists() {
        let ok = tokio::process::Command::new(tool("npm"))
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&browser_dir)
            .status()
            .await
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "npm ci in tests/browser failed: playwright-core is needed (see scripts/test.d/browser.sh)"
        );
    }

    let (a, b, g) = (echo_backend().await, echo_backend().await, echo_backend().await);
    // A node whose active check fails: the page says why.
    let checked = || {
        Cluster::new("checked")
            .key("check = { type = \"tcp\", interval = \"200ms\", timeout = \"100ms\", fall = 1 }")
            .node(Node::new("down", dead_addr()))
    };
    let config = ConfigText::new()
        .service(Service::new("web", "blue"))
        .cluster(Cluster::of("blue", &[("a", a), ("b", b)]))
        .cluster(Cluster::of("green", &[("g", g)]))
        .cluster(checked());
    let (server, admin, file) = config.start_with_admin().await;
    let web = server.addr_of("web").unwrap();
    // A reload, however the attacking page got one, would show: the file now says b is red.
    let b_red = ConfigText::new()
        .service(Service::new("web", "blue"))
        .cluster(
            Cluster::new("blue")
                .node(Node::new("a", a))
                .node(Node::new("b", b).key("state = \"red\"")),
        )
        .cluster(Cluster::of("green", &[("g", g)]))
        .cluster(checked());
    std::fs::write(file.path(), b_red.text()).unwrap();
    let attack = attack_page(&format!("http://{admin}"), "blue", "b").await;

    // Steady load: short connections with a little traffic each, until the browser is done.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let payload = vec![7u8; 4096];
            let mut buf = vec![0u8; 4096];
            for _ in 0..MAX_CONNECTIONS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut c) = TcpStream::connect(web).await
                    && c.write_all(&payload).await.is_ok()
                {
                    let _ = c.read_exact(&mut buf).await;
                }
                // Pace the load so the browser gets the CPU too.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let screenshot = std::env::var("PROTOBALANCE_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join(format!("protobalance-dashboard-{}.png", std::process::id())));
    let run = tokio::process::Command::new(tool("node"))
        .env("CHROMIUM", tool("chromium"))
        .arg(browser_dir.join("dashboard.mjs"))
        .arg(format!("http://{admin}/"))
        .arg(&screenshot)
        .args(["blue", "a"])
        .arg(format!("http://{attack}/"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BROWSER_RUN, run)
        .await
        .expect("the browser run finishes")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let result: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result from the browser script\nstdout: {stdout}\nstderr: {stderr}"));
    assert!(
        output.status.success() && result["ok"] == true,
        "browser run failed: {result}\nstderr: {stderr}"
    );
    assert!(
        result["total_after"].as_u64() > result["total_before"].as_u64(),
        "numbers move: {result}"
    );
    assert_eq!(result["state_shown"], "yellow");
    let notes = result["notes"].as_array().cloned().unwrap_or_default();
    assert!(
        notes
            .iter()
            .any(|n| n[0] == "checked/down" && n[1] == "check failing: connection refused"),
        "the failing check and why, beside the node's health: {notes:?}"
    );
    assert!(
        result["dialogs"][0].as_str().is_some_and(|d| d.contains("yellow")),
        "a confirmation was asked: {result}"
    );
    assert!(
        std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000),
        "a screenshot was saved"
    );
    if std::env::var_os("PROTOBALANCE_SCREENSHOT").is_none() {
        let _ = std::fs::remove_file(&screenshot);
    }

    eprintln!("browser run: {result}");
    // The other origin's page tried, and was answered or blocked, but changed nothing.
    let tried = result["attack"]
        .as_array()
        .unwrap_or_else(|| panic!("no attack log: {result}"));
    assert_eq!(tried.len(), 4, "every attempt ran: {result}");
    assert!(
        !result["framed_url"]
            .as_str()
            .is_some_and(|u| u.starts_with(&format!("http://{admin}"))),
        "the dashboard loaded in another origin's frame: {result}"
    );
    assert!(
        result["framed_rows"].as_i64() <= Some(0),
        "the framed dashboard drew nodes: {result}"
    );

    // The click changed the server, not just the page; the attack did not.
    let s = status(&admin, None).await;
    assert_eq!(node_status(&s, "blue", "a")["state"], "yellow");
    assert_eq!(
        node_status(&s, "blue", "b")["state"],
        "green",
        "no reload, no state change: {result}"
    );
    server.shutdown(PATIENCE).await;
}

/// A page on another loopback port (another origin) that tries to change
/// node `node` of `cluster` on the admin API at `admin` through the browser
/// (each attempt noted in `window.attackLog`, `window.attackDone` at the
/// end), with the dashboard in a frame named `framed`. Returns its address.
async fn attack_page(admin: &str, cluster: &str, node: &str) -> std::net::SocketAddr {
    let page = format!(
        r#"<!doctype html><html><head><title>not the balancer</title></head><body>
<form id="f" method="POST" action="{admin}/api/v1/reload" enctype="text/plain" target="sink">
<input name='{{"a":"' value='"}}'></form>
<iframe name="sink"></iframe>
<iframe name="framed" src="{admin}/"></iframe>
<script>
window.attackLog = [];
const target = "{admin}/api/v1/clusters/{cluster}/nodes/{node}/state";
async function attempt(what, run) {{
  try {{ const r = await run(); window.attackLog.push(what + ": answered " + (r.type === "opaque" ? "(opaque)" : r.status)); }}
  catch (e) {{ window.attackLog.push(what + ": failed: " + e.message); }}
}}
(async () => {{
  await attempt("no-cors POST reload", () => fetch("{admin}/api/v1/reload", {{ method: "POST", mode: "no-cors" }}));
  await attempt("no-cors POST reload, form body", () =>
    fetch("{admin}/api/v1/reload", {{ method: "POST", mode: "no-cors", body: new URLSearchParams({{ a: "b" }}) }}));
  await attempt("PUT state as JSON", () =>
    fetch(target, {{ method: "PUT", headers: {{ "Content-Type": "application/json" }}, body: '{{"state":"red"}}' }}));
  await new Promise((done) => {{
    document.querySelector("iframe[name=sink]").onload = done;
    setTimeout(done, 5000);
    document.getElementById("f").submit();
  }});
  window.attackLog.push("form POST reload: submitted");
  window.attackDone = true;
}})();
</script></body></html>"#
    );
    serve(move |mut stream| {
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
            page.len()
        );
        async move {
            // The request's head, then the page, whatever was asked.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    })
    .await
}
