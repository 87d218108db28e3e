//! The control plane and the process against whoever does not belong, each
//! finding of a review as a test through real sockets or the binary:
//!
//! - a reload cannot take the token off an admin socket still bound off
//!   loopback (the file's new `listen` waits for a restart);
//! - `Host`, `Origin` and `Content-Type` rules, and the security headers;
//! - the admin budget: 500 idle and slowloris connections closed by the
//!   timeouts while the data plane serves under `RLIMIT_NOFILE` 256;
//! - the admin API on a Unix socket (0600, `socket_mode`), `ctl --admin
//!   unix:PATH` and `--token-file`;
//! - a token never echoed (written as a TOML integer), `token_file`'s rules,
//!   a config path that is a FIFO;
//! - a balancer that drops to a user: `/proc/PID/status` (Uid, Gid, CapEff,
//!   NoNewPrivs), and a reload that needs a capability it dropped.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "security-test-token";
const RED: &str = r#"{"state":"red"}"#;

// ---------------------------------------------------------------------------
// Finding 1: the token rule is judged against the socket actually bound.

#[test]
fn a_reload_cannot_take_the_token_off_an_exposed_admin_socket() {
    if std::net::TcpListener::bind("[::ffff:127.0.0.1]:0").is_err() {
        skip_or_fail("this machine cannot bind an IPv4-mapped IPv6 address");
        return;
    }
    let node = blocking(echo_backend());
    let config = ConfigText::one_service(Cluster::of("c", &[("n", node)]))
        .admin_listen("[::ffff:127.0.0.1]:0")
        .token(TOKEN);
    let proc = Running::run(&config, &[]);
    let admin = proc.admin_addr();
    assert!(admin.starts_with("[::ffff:127.0.0.1]:"), "{admin}");

    // The file now says loopback, without a token; the socket bound at start
    // stays where it is until a restart.
    let open = config.clone().admin_listen("127.0.0.1:0").no_token();
    std::fs::write(proc.config_path(), open.text()).unwrap();
    proc.signal(libc::SIGHUP);
    let refused = proc.wait_for("reload refused");
    assert!(refused.contains("not a loopback address"), "{refused}");

    blocking(async {
        let path = "/api/v1/clusters/c/nodes/n/state";
        assert_eq!(api(&admin, None, Method::GET, "/api/v1/status", None).await.status, 401);
        assert_eq!(api(&admin, None, Method::PUT, path, Some(RED)).await.status, 401);
        let reload = api(&admin, Some(TOKEN), Method::POST, "/api/v1/reload", None).await;
        assert_eq!(reload.status, 409, "{}", reload.text());
        assert!(reload.text().contains("not a loopback address"), "{}", reload.text());
        assert_eq!(api(&admin, None, Method::GET, "/api/v1/status", None).await.status, 401);
        let s = status(&admin, Some(TOKEN)).await;
        assert_eq!(node_status(&s, "c", "n")["state"], "green");
    });

    // With the token kept, the same file reloads (its listen waits for a restart).
    std::fs::write(proc.config_path(), open.token(TOKEN).text()).unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("reloaded");
}

// ---------------------------------------------------------------------------
// Findings 2 and 4: Host, Origin, Content-Type; 6: framing.

/// A raw request to the admin API at `admin` with `Host: host` and `extra` header lines.
fn request(method: &str, path: &str, host: &str, extra: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

const JSON: &str = "Content-Type: application/json\r\n";

#[tokio::test]
async fn a_foreign_host_is_refused() {
    let (server, admin, file) = start_web_blue_green(TOKEN).await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let port = admin.rsplit(':').next().unwrap().to_string();
    let path = "/api/v1/clusters/blue/nodes/b/state";
    let before = control_view(&status(&admin, Some(TOKEN)).await);
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("localhost:{}", port.parse::<u16>().unwrap() + 1),
        format!("127.0.0.2:{port}"),
    ] {
        for (method, path, extra, body) in [
            ("PUT", path, format!("{auth}{JSON}"), RED),
            ("GET", "/api/v1/status", auth.clone(), ""),
            ("GET", "/", String::new(), ""),
        ] {
            let reply = raw_http(&admin, &request(method, path, &host, &extra, body)).await;
            assert_eq!(reply.status, 421, "{method} {path} Host {host}: {reply:?}");
            assert!(reply.body.contains("\"error\""), "{reply:?}");
            assert!(
                reply.header("www-authenticate").is_none(),
                "no password prompt for a foreign page"
            );
        }
    }
    let no_host = format!("GET /api/v1/status HTTP/1.1\r\n{auth}Connection: close\r\n\r\n");
    assert_eq!(raw_http(&admin, &no_host).await.status, 421);
    assert_eq!(control_view(&status(&admin, Some(TOKEN)).await), before);

    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("LocalHost:{port}"),
    ] {
        let reply = raw_http(&admin, &request("GET", "/api/v1/status", &host, &auth, "")).await;
        assert_eq!(reply.status, 200, "Host {host}: {reply:?}");
    }

    // allowed_hosts, which a reload may change.
    let host = format!("lb1.example.com:{port}");
    assert_eq!(
        raw_http(&admin, &request("GET", "/api/v1/status", &host, &auth, ""))
            .await
            .status,
        421
    );
    let text = std::fs::read_to_string(file.path()).unwrap();
    let allowing = text.replace("[admin]\n", "[admin]\nallowed_hosts = [\"LB1.example.com\"]\n");
    std::fs::write(file.path(), &allowing).unwrap();
    server.reload().await.unwrap();
    assert_eq!(
        raw_http(&admin, &request("GET", "/api/v1/status", &host, &auth, ""))
            .await
            .status,
        200
    );
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn a_state_change_needs_json_from_its_own_origin() {
    let (server, admin, file) = start_web_blue_green(TOKEN).await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let path = "/api/v1/clusters/blue/nodes/b/state";
    // A reload would show: the file says b is red.
    let text = std::fs::read_to_string(file.path()).unwrap();
    std::fs::write(
        file.path(),
        text.replace("name = \"b\"\n", "name = \"b\"\nstate = \"red\"\n"),
    )
    .unwrap();
    let before = control_view(&status(&admin, Some(TOKEN)).await);
    for (what, method, path, extra, code) in [
        (
            "text/plain",
            "PUT",
            path,
            "Content-Type: text/plain\r\n".to_string(),
            415,
        ),
        (
            "a form",
            "PUT",
            path,
            "Content-Type: application/x-www-form-urlencoded\r\n".into(),
            415,
        ),
        ("no content type", "PUT", path, String::new(), 415),
        (
            "a reload as text/plain",
            "POST",
            "/api/v1/reload",
            "Content-Type: text/plain\r\n".into(),
            415,
        ),
        ("a reload without a body", "POST", "/api/v1/reload", String::new(), 415),
        (
            "another origin",
            "PUT",
            path,
            format!("{JSON}Origin: http://evil.example\r\n"),
            403,
        ),
        ("a null origin", "PUT", path, format!("{JSON}Origin: null\r\n"), 403),
        (
            "another port",
            "POST",
            "/api/v1/reload",
            format!("{JSON}Origin: http://127.0.0.1:1\r\n"),
            403,
        ),
    ] {
        let body = if method == "PUT" { RED } else { "" };
        let reply = raw_http(&admin, &request(method, path, &admin, &format!("{auth}{extra}"), body)).await;
        assert_eq!(reply.status, code, "{what}: {reply:?}");
        assert!(reply.body.contains("\"error\""), "{what}: {reply:?}");
    }
    assert_eq!(
        control_view(&status(&admin, Some(TOKEN)).await),
        before,
        "nothing changed"
    );

    // JSON from the API's own origin (the dashboard's requests) goes through.
    let own = format!("{auth}{JSON}Origin: http://{admin}\r\n");
    let reply = raw_http(&admin, &request("PUT", path, &admin, &own, r#"{"state":"yellow"}"#)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let reply = raw_http(&admin, &request("POST", "/api/v1/reload", &admin, &own, "")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        node_status(&status(&admin, Some(TOKEN)).await, "blue", "b")["state"],
        "red"
    );
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let (server, admin, _file) = start_web_blue_green(TOKEN).await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let page = raw_http(&admin, &request("GET", "/", &admin, &auth, "")).await;
    assert_eq!(page.status, 200);
    let policy = page.header("content-security-policy").expect("a CSP on the dashboard");
    for part in [
        "frame-ancestors 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        "default-src 'none'",
    ] {
        assert!(policy.contains(part), "{part} in {policy}");
    }
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    for (method, path, extra, code) in [
        ("GET", "/api/v1/status", auth.clone(), 200),
        ("GET", "/metrics", auth.clone(), 200),
        ("GET", "/", String::new(), 401),
        ("GET", "/nope", auth.clone(), 404),
    ] {
        let reply = raw_http(&admin, &request(method, path, &admin, &extra, "")).await;
        assert_eq!(reply.status, code, "{path}");
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"), "{path}");
        assert_eq!(reply.header("referrer-policy"), Some("no-referrer"), "{path}");
        assert_eq!(reply.header("x-frame-options"), Some("DENY"), "{path}");
        assert!(
            reply
                .header("content-security-policy")
                .is_some_and(|p| p.contains("frame-ancestors 'none'")),
            "{path}: {reply:?}"
        );
    }
    server.shutdown(PATIENCE).await;
}

// ---------------------------------------------------------------------------
// Finding 3: the admin API's own budget.

/// Sends `head`, then one byte of `pad` every 100 ms, 300 at most (30 s),
/// watching for an answer or a close between bytes. Returns how many bytes
/// went out before the balancer closed, and what it answered.
async fn trickle(admin: &str, head: &str, pad: u8) -> (usize, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut answer, mut buf) = (Vec::new(), [0u8; 1024]);
    for sent in 0..300 {
        if stream.write_all(&[pad]).await.is_err() {
            return (sent, String::from_utf8_lossy(&answer).into_owned());
        }
        // The pace of the attack, and a look for what came back meanwhile.
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return (sent, String::from_utf8_lossy(&answer).into_owned()),
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
    panic!("still open after 300 bytes over 30 s: no timeout closed it");
}

/// `n` echo exchanges through `data` held open at once.
async fn clients_served(data: std::net::SocketAddr, n: usize) {
    let mut held = Vec::new();
    for i in 0..n {
        let mut c = within("a client of the data plane", TcpStream::connect(data))
            .await
            .unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        within(&format!("client {i}'s echo"), c.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf, b"ping");
        held.push(c);
    }
}

/// Lowers the descriptor limit of the command's process to `n` (soft and hard).
fn descriptor_limit(command: &mut Command, n: u64) {
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        command.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn admin_abuse_leaves_the_data_plane_its_descriptors() {
    let node = blocking(echo_backend());
    let config = ConfigText::one_service(Cluster::of("c", &[("n", node)]))
        .top("threads = 2")
        .admin_key("header_timeout = \"1s\"\nrequest_timeout = \"2s\"");
    let proc = Running::run_with(&config, &[], |c| descriptor_limit(c, 256));
    let (admin, data) = (proc.admin_addr(), proc.listen_addr());
    blocking(async {
        // 500 idle connections: 64 held (the cap, a quarter of 256), the rest closed at once.
        let mut idle = Vec::new();
        for _ in 0..500 {
            idle.push(TcpStream::connect(&admin).await.unwrap());
        }
        clients_served(data, 40).await;
        for (i, mut s) in idle.into_iter().enumerate() {
            let mut buf = [0u8; 64];
            let end = within(&format!("idle admin connection {i} to be closed"), s.read(&mut buf)).await;
            assert!(matches!(end, Ok(0) | Err(_)), "connection {i}: {end:?}");
        }

        // Slowloris, on the headers and on a body, while clients are served.
        let headers = format!("GET /api/v1/status HTTP/1.1\r\nHost: {admin}\r\nX-Slow: ");
        let body = format!(
            "PUT /api/v1/clusters/c/nodes/n/state HTTP/1.1\r\nHost: {admin}\r\n{JSON}Content-Length: 10000\r\n\r\n"
        );
        let (by_headers, by_body, ()) = tokio::join!(
            trickle(&admin, &headers, b'a'),
            trickle(&admin, &body, b' '),
            clients_served(data, 40)
        );
        assert!(by_headers.0 < 300, "header_timeout closed it: {by_headers:?}");
        assert!(
            by_body.1.starts_with("HTTP/1.1 408"),
            "request_timeout answered: {by_body:?}"
        );
        // The API itself is fine afterwards.
        let s = status(&admin, None).await;
        assert_eq!(node_status(&s, "c", "n")["state"], "green");
    });
}

// ---------------------------------------------------------------------------
// The admin API on a Unix socket; ctl over it, with a token file.

fn ctl(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("ctl")
        .args(args)
        .env_remove("PROTOBALANCE_TOKEN")
        .output()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let listen = format!("unix:{}", socket.display());
    let node = echo_backend().await;
    let config = ConfigText::one_service(Cluster::of("c", &[("n", node)])).admin_listen(&listen);
    let (server, admin, _file) = config.start_with_admin().await;
    assert_eq!(admin, listen);
    assert_eq!(mode(&socket), 0o600, "owner only");
    let s = status(&admin, None).await;
    assert_eq!(node_status(&s, "c", "n")["state"], "green");
    let set = tokio::task::spawn_blocking({
        let admin = admin.clone();
        move || ctl(&["--admin", &admin, "state", "c", "n", "yellow"])
    })
    .await
    .unwrap();
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    assert_eq!(node_status(&status(&admin, None).await, "c", "n")["state"], "yellow");
    server.shutdown(PATIENCE).await;
    assert!(!socket.exists(), "the socket file goes with the balancer");

    // socket_mode widens it to a group; a token still applies where set.
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let config = config
        .admin_key("socket_mode = \"0660\"")
        .admin_key(&format!("token_file = {:?}", token_file.display().to_string()));
    let (server, admin, _file) = config.start_with_admin().await;
    assert_eq!(mode(&socket), 0o660);
    let (with, without) = tokio::task::spawn_blocking({
        let (admin, token_file) = (admin.clone(), token_file.display().to_string());
        move || {
            (
                ctl(&["--admin", &admin, "--token-file", &token_file, "status"]),
                ctl(&["--admin", &admin, "status"]),
            )
        }
    })
    .await
    .unwrap();
    assert!(with.status.success(), "{}", String::from_utf8_lossy(&with.stderr));
    assert!(String::from_utf8_lossy(&with.stdout).contains("CLUSTER"));
    assert!(String::from_utf8_lossy(&without.stderr).contains("401"));
    assert!(!String::from_utf8_lossy(&without.stderr).contains(TOKEN));
    server.shutdown(PATIENCE).await;

    // A stale socket (nobody listening) is replaced; a regular file is left alone.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let (server, _, _file) = config.start_with_admin().await;
    server.shutdown(PATIENCE).await;
    std::fs::write(&socket, b"not a socket").unwrap();
    let (server, _) = config.start().await;
    let err = server.start_admin().await.unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&socket).unwrap(), b"not a socket");
    server.shutdown(PATIENCE).await;
}

// ---------------------------------------------------------------------------
// Finding 6: secrets in errors, token files, a FIFO for a config file.

fn check(text: &str) -> (bool, String) {
    let file = toml_file(text);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_token_is_never_echoed_and_a_token_file_is_checked() {
    let base = ConfigText::one_service(Cluster::of("c", &[("n", dead_addr())]));
    for secret in [
        "token = 987654321012",
        "token = 98765.4321",
        "token = [\"9876543210a\"]",
    ] {
        let (ok, err) = check(&base.clone().admin_key(secret).text());
        assert!(!ok);
        assert!(err.contains("token: expected a string (value not shown)"), "{err}");
        assert!(!err.contains("98765"), "the value is echoed: {err}");
    }
    let (ok, err) = check(&base.clone().admin_key("token = \"ab cd efgh\"").text());
    assert!(
        !ok && err.contains("printable ASCII") && !err.contains("ab cd"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "  file-token-1234\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let with_file = |path: &Path| {
        base.clone()
            .admin_key(&format!("token_file = {:?}", path.display().to_string()))
    };
    assert!(check(&with_file(&file).text()).0, "a private token file");
    assert_eq!(
        with_file(&file).config().admin.token.as_deref(),
        Some("file-token-1234")
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, err) = check(&with_file(&file).text());
    assert!(!ok && err.contains("readable by every user"), "{err}");
    assert!(!err.contains("file-token-1234"), "{err}");
    let (ok, err) = check(&with_file(&file).token(TOKEN).text());
    assert!(!ok && err.contains("not both"), "{err}");
    let (ok, err) = check(&with_file(&dir.path().join("missing")).text());
    assert!(!ok && err.contains("token_file"), "{err}");
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_config_path_that_is_not_a_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("lb.toml");
    mkfifo(&fifo);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&fifo)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file (a FIFO)"));

    // A reload of a path that became a FIFO is refused, and the next SIGHUP is still heard.
    let node = blocking(echo_backend());
    let config = ConfigText::one_service(Cluster::of("c", &[("n", node)]));
    let proc = Running::run(&config, &[]);
    proc.admin_addr();
    let path = proc.config_path().to_path_buf();
    std::fs::remove_file(&path).unwrap();
    mkfifo(&path);
    proc.signal(libc::SIGHUP);
    let refused = proc.wait_for("reload refused");
    assert!(refused.contains("not a regular file (a FIFO)"), "{refused}");
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, config.text()).unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("reloaded");
}

// ---------------------------------------------------------------------------
// Finding 5: the process drops to a user and keeps what it needs only.

/// Low ports for the test that must see one stay closed, and for the test
/// that opens two. Disjoint because the two tests run at once: drawn from
/// one range, the first could pick a port that the second's reload then
/// opens, and find it open.
const LOW_PORTS_KEPT_CLOSED: std::ops::Range<u16> = 900..950;
const LOW_PORTS_OPENED: std::ops::Range<u16> = 950..1000;

/// A port of `ports` (below 1024) that is free on 127.0.0.1 now (we are root).
fn free_low_port(ports: std::ops::Range<u16>, skip: u16) -> u16 {
    ports
        .filter(|p| *p != skip)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024")
}

fn needs_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("dropping privileges needs root");
        return false;
    }
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").is_ok_and(|s| s.trim() != "1024") {
        skip_or_fail("net.ipv4.ip_unprivileged_port_start is not 1024 here");
        return false;
    }
    true
}

fn dropping_config(state: &Path, listen: &[&str]) -> ConfigText {
    let node = blocking(echo_backend());
    ConfigText::new()
        .top(&format!("user = {TEST_USER:?}"))
        .state_dir(state)
        .service(Service::new("web", "c").listen(listen))
        .cluster(Cluster::of("c", &[("n", node)]).key("affinity = true"))
}

#[test]
fn a_dropped_balancer_runs_as_its_user_with_no_capability() {
    if !needs_root() {
        return;
    }
    let (uid, gid) = test_user();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let socket = dir.path().join("admin.sock");
    let config = dropping_config(&state, &["127.0.0.1:0"]).admin_listen(&format!("unix:{}", socket.display()));
    let proc = Running::run(&config, &[]);
    let admin = proc.admin_addr();
    proc.wait_for("running as user protobalance-test");
    let pid = proc.child.id();
    assert_eq!(proc_status(pid, None, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(proc_status(pid, None, "Gid"), format!("{gid}\t{gid}\t{gid}\t{gid}"));
    assert_eq!(proc_status(pid, None, "Groups"), gid.to_string());
    assert_eq!(proc_status(pid, None, "NoNewPrivs"), "1");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().file_name().to_string_lossy().into_owned();
        for key in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(
                proc_status(pid, Some(&task), key),
                "0000000000000000",
                "{key} of thread {task}"
            );
        }
        assert_eq!(
            proc_status(pid, Some(&task), "Uid"),
            format!("{uid}\t{uid}\t{uid}\t{uid}")
        );
    }
    // Opened before the drop: the store (0600 in a 0700 state_dir) and the socket (the user's).
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("affinity.redb")), 0o600);
    assert_eq!(std::fs::metadata(&socket).unwrap().uid(), uid);
    assert_eq!(mode(&socket), 0o600);

    // A reload that opens a port below 1024 needs CAP_NET_BIND_SERVICE, dropped: refused, nothing changes.
    let low = free_low_port(LOW_PORTS_KEPT_CLOSED, 0);
    let low_listen = format!("127.0.0.1:{low}");
    let with_low = dropping_config(&state, &["127.0.0.1:0", low_listen.as_str()])
        .admin_listen(&format!("unix:{}", socket.display()));
    let before = blocking(status(&admin, None));
    std::fs::write(proc.config_path(), with_low.text()).unwrap();
    // The file must be readable by the user for a reload to read it.
    std::fs::set_permissions(proc.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    proc.signal(libc::SIGHUP);
    let refused = proc.wait_for("reload refused");
    assert!(
        refused.contains(&format!(
            "service \"web\" listen 127.0.0.1:{low} needs CAP_NET_BIND_SERVICE"
        )),
        "{refused}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", low)).is_err(),
        "port {low} is not open"
    );
    assert_eq!(control_view(&blocking(status(&admin, None))), control_view(&before));
}

#[test]
fn a_balancer_on_a_low_port_keeps_only_the_bind_capability() {
    if !needs_root() {
        return;
    }
    let (uid, _) = test_user();
    let dir = tempfile::tempdir().unwrap();
    let low = free_low_port(LOW_PORTS_OPENED, 0);
    let first = format!("127.0.0.1:{low}");
    let config = dropping_config(&dir.path().join("state"), &[first.as_str()]);
    let proc = Running::run(&config, &[]);
    let admin = proc.admin_addr();
    proc.wait_for("capabilities kept: CAP_NET_BIND_SERVICE");
    let pid = proc.child.id();
    assert_eq!(proc_status(pid, None, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    // Bit 10: CAP_NET_BIND_SERVICE, alone.
    assert_eq!(proc_status(pid, None, "CapEff"), "0000000000000400");
    assert_eq!(proc_status(pid, None, "CapPrm"), "0000000000000400");
    assert_eq!(proc_status(pid, None, "CapBnd"), "0000000000000400");
    assert_eq!(proc_status(pid, None, "NoNewPrivs"), "1");

    // So a reload may open another port below 1024.
    let second = free_low_port(LOW_PORTS_OPENED, low);
    let second_listen = format!("127.0.0.1:{second}");
    let more = dropping_config(&dir.path().join("state"), &[first.as_str(), second_listen.as_str()]);
    std::fs::write(proc.config_path(), more.text()).unwrap();
    std::fs::set_permissions(proc.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("reloaded");
    blocking(async {
        let mut c = TcpStream::connect(("127.0.0.1", second)).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        within("the echo through the new low port", c.read_exact(&mut buf))
            .await
            .unwrap();
        let s = status(&admin, None).await;
        assert_eq!(service_status(&s, "web")["bound"].as_array().unwrap().len(), 2);
    });
}

// ---------------------------------------------------------------------------
// The new keys: each refusal names the key, the value and the line.

#[test]
fn each_new_key_is_validated_with_its_line() {
    // Line 1: top; line 2: [admin]; line 3: the key under test (admin cases).
    let admin = |line: &str| format!("state_dir = \"\"\n[admin]\n{line}\n");
    let unix = |line: &str| admin(&format!("listen = \"unix:/run/pb/admin.sock\"\n{line}"));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            admin("listen = \"unix:admin.sock\""),
            vec![":3:", "listen = \"unix:admin.sock\"", "absolute path"],
        ),
        (admin("listen = \"nonsense\""), vec![":3:", "unix:PATH"]),
        (
            admin("socket_mode = \"0660\""),
            vec![":3:", "socket_mode = \"0660\"", "only for listen = \"unix:PATH\""],
        ),
        (
            unix("socket_mode = \"0666\""),
            vec![":4:", "socket_mode = \"0666\"", "others nothing"],
        ),
        (unix("socket_mode = \"rw\""), vec![":4:", "octal"]),
        (unix("socket_mode = \"0400\""), vec![":4:", "read and write"]),
        (
            admin("allowed_hosts = [\"a b\"]"),
            vec![":3:", "allowed_hosts = \"a b\"", "host name or IP"],
        ),
        (admin("allowed_hosts = [\"a:99999\"]"), vec![":3:", "a:99999"]),
        (
            admin("max_connections = 0"),
            vec![":3:", "[admin] max_connections = 0", "1 to 4096"],
        ),
        (admin("max_connections = 5000"), vec![":3:", "1 to 4096"]),
        (
            admin("header_timeout = \"10ms\""),
            vec![":3:", "header_timeout = \"10ms\"", "at least 100ms"],
        ),
        (
            admin("request_timeout = \"soon\""),
            vec![":3:", "request_timeout = \"soon\""],
        ),
        (admin("token = \"short\""), vec![":3:", "too short"]),
        (
            "user = \"no-such-user-here\"\n".into(),
            vec![":1:", "user = \"no-such-user-here\"", "no such user"],
        ),
        (
            "group = \"root\"\n".into(),
            vec![":1:", "group = \"root\"", "needs user"],
        ),
        (
            "user = \"root\"\ngroup = \"no-such-group-here\"\n".into(),
            vec![":2:", "group = \"no-such-group-here\"", "no such group"],
        ),
    ];
    let mut wrong = Vec::new();
    for (text, expected) in &cases {
        let (ok, err) = check(text);
        if ok || !expected.iter().all(|e| err.contains(e)) {
            wrong.push(format!("{text:?}: expected {expected:?}, got: {err}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        check(&unix(
            "socket_mode = \"0660\"\nallowed_hosts = [\"lb1.example.com\", \"[::1]:9\"]"
        ))
        .0
    );
    assert!(check("user = \"root\"\ngroup = \"root\"\n").0);
}
