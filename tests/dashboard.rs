//! The dashboard in a real headless browser (Debian's chromium driven by
//! playwright-core, tests/browser/dashboard.mjs): under load the page shows
//! numbers that move, and a click on yellow (confirmed) sets the node's state
//! on the server.
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
    let (server, admin, _file) = ConfigText::new()
        .service(Service::new("web", "blue"))
        .cluster(Cluster::of("blue", &[("a", a), ("b", b)]))
        .cluster(Cluster::of("green", &[("g", g)]))
        .start_with_admin()
        .await;
    let web = server.addr_of("web").unwrap();

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

    // The click changed the server, not just the page.
    let s = status(&admin, None).await;
    assert_eq!(node_status(&s, "blue", "a")["state"], "yellow");
    assert_eq!(node_status(&s, "blue", "b")["state"], "green");
    server.shutdown(PATIENCE).await;
}
