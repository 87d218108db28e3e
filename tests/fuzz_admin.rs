//! Hostile admin requests over real sockets: random methods, paths, headers,
//! tokens, bodies and raw garbage. Never a 5xx, never a dropped server, and a
//! refused request changes nothing. Bounded: a few hundred requests per run.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "fuzz-admin-token";

/// One request as raw bytes, to the admin API at `admin` (mostly with its
/// own `Host`, sometimes another or none, and sometimes not JSON).
fn request(admin: &str) -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET"),
        Just("PUT"),
        Just("POST"),
        Just("DELETE"),
        Just("PATCH"),
        Just("OPTIONS"),
        Just("G\u{0}T"),
    ];
    let path = prop_oneof![
        Just("/".to_string()),
        Just("/metrics".to_string()),
        Just("/api/v1/status".to_string()),
        Just("/api/v1/reload".to_string()),
        Just("/api/v1/clusters/blue/nodes/a/state".to_string()),
        Just("/api/v1/clusters/blue/nodes/zz/state".to_string()),
        Just("/api/v1/services/web/cluster".to_string()),
        Just("/api/v1/services/../../etc/passwd/cluster".to_string()),
        "/[a-z0-9/%._-]{0,40}",
    ];
    let auth = prop_oneof![
        Just(String::new()),
        Just(format!("Authorization: Bearer {TOKEN}\r\n")),
        Just("Authorization: Bearer wrong-token\r\n".to_string()),
        Just("Authorization: Basic Og==\r\n".to_string()),
        "Authorization: [ -~]{0,30}\r\n",
    ];
    let body = prop_oneof![
        Just(String::new()),
        Just("{\"state\":\"yellow\"}".to_string()),
        Just("{\"state\":\"purple\"}".to_string()),
        Just("{\"cluster\":\"nowhere\"}".to_string()),
        Just("{\"state\":\"red\",\"extra\":1}".to_string()),
        Just("{\"state\":".to_string()),
        Just("[1,2,3]".to_string()),
        "\\PC{0,64}",
    ];
    let host = prop_oneof![
        6 => Just(format!("Host: {admin}\r\n")),
        1 => Just("Host: evil.example\r\n".to_string()),
        1 => Just(String::new()),
    ];
    let extra = prop_oneof![
        6 => Just("Content-Type: application/json\r\n".to_string()),
        1 => Just("Content-Type: text/plain\r\n".to_string()),
        1 => Just(format!("Content-Type: application/json\r\nOrigin: http://{admin}\r\n")),
        1 => Just("Content-Type: application/json\r\nOrigin: http://evil.example\r\n".to_string()),
    ];
    let garbage = proptest::collection::vec(any::<u8>(), 0..200);
    prop_oneof![
        4 => (method, path, (host, auth, extra), body, any::<bool>()).prop_map(|(m, p, (h, a, x), b, lie)| {
            // Sometimes the Content-Length lies.
            let len = if lie { b.len() + 7 } else { b.len() };
            format!("{m} {p} HTTP/1.1\r\n{h}{a}{x}Content-Length: {len}\r\nConnection: close\r\n\r\n{b}").into_bytes()
        }),
        1 => garbage,
    ]
}

/// Sends `raw`, half-closes, returns the HTTP status code if a response came.
/// The API may close (or reset) a connection without answering garbage, but
/// it must not leave one hanging: that fails the test.
async fn send(admin: &str, raw: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(admin).await.expect("the admin API still listens");
    // Writing may fail once the API has closed on the first bad bytes.
    let _ = s.write_all(raw).await;
    let _ = s.shutdown().await;
    let mut reply = Vec::new();
    let ended = within(
        &format!("an answer or a close for {:?}", String::from_utf8_lossy(raw)),
        s.read_to_end(&mut reply),
    )
    .await;
    if let Err(e) = ended {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "reading the answer: {e}");
    }
    let text = String::from_utf8_lossy(&reply);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_admin_requests_never_panic_or_change_state_when_refused() {
    let (server, admin, _file) = start_web_blue_green(TOKEN).await;

    // A fixed seed: the same 300 requests every run, so the categories the
    // end asserts on (served, no token, wrong Host) are always among them.
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig {
            cases: 300,
            failure_persistence: None,
            ..RunnerConfig::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    // One request of each kind the end asserts on, whatever the draw.
    let mut requests: Vec<Vec<u8>> = [
        format!(
            "GET /api/v1/status HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        ),
        format!("GET /api/v1/status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"),
        "GET /api/v1/status HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".to_string(),
    ]
    .map(String::into_bytes)
    .to_vec();
    for _ in 0..300 {
        requests.push(request(&admin).new_tree(&mut runner).unwrap().current());
    }
    let mut codes = std::collections::BTreeMap::new();
    for raw in requests {
        let before = control_view(&status(&admin, Some(TOKEN)).await);
        let code = send(&admin, &raw).await;
        assert!(
            code.is_none_or(|c| c < 500),
            "a 5xx answer to {:?}",
            String::from_utf8_lossy(&raw)
        );
        let after = control_view(&status(&admin, Some(TOKEN)).await);
        if code.is_none_or(|c| c >= 400) {
            assert_eq!(
                before,
                after,
                "a refused request changed state: {:?}",
                String::from_utf8_lossy(&raw)
            );
        }
        *codes.entry(code.unwrap_or(0)).or_insert(0) += 1;
    }
    eprintln!("admin fuzz: answers by status code (0 = no answer): {codes:?}");
    for (code, why) in [
        (401, "some requests went without a valid token"),
        (421, "some went to another Host"),
        (200, "some were served"),
    ] {
        assert!(codes.contains_key(&code), "{why}: {codes:?}");
    }
    drop(server);
}

/// The token never appears in the balancer's output, whatever is asked of it
/// and at any log level; the admin API is on loopback unless a token is set.
#[test]
fn no_secret_is_ever_logged() {
    let config = ConfigText::new()
        .token(TOKEN)
        .service(Service::new("web", "blue"))
        .cluster(Cluster::of("blue", &[("a", dead_addr())]));
    let mut proc = Running::run(&config, &["--log-level", "trace"]);
    let admin = proc.admin_addr();
    blocking(async {
        for raw in [
            format!(
                "GET /api/v1/status HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
            ),
            format!(
                "GET /api/v1/status HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {TOKEN}x\r\nConnection: close\r\n\r\n"
            ),
            format!(
                "POST /api/v1/reload HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
            ),
            format!(
                "POST /api/v1/reload HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
            ),
        ] {
            send(&admin, raw.as_bytes()).await;
        }
    });
    // A reload that fails on a bad token value must not echo it either.
    std::fs::write(proc.config_path(), config.clone().token("short").text()).unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("reload refused");
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
    let output = proc.all_output();
    assert!(output.len() > 5, "the balancer logged at trace level: {output:?}");
    assert!(
        output.iter().any(|l| l.contains("token")),
        "the refused reload names the key: {output:?}"
    );
    for line in &output {
        assert!(
            !line.contains(TOKEN) && !line.contains("short\""),
            "a secret in the log: {line}"
        );
    }

    // Off loopback without a token the balancer refuses to start.
    let open = config.admin_listen("0.0.0.0:0").no_token().file();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(open.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token is required"));
}
