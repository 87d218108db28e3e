//! `protobalance ctl` against a running balancer, and SIGHUP reloading the
//! binary's config file.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_protobalance");
const TOKEN: &str = "ctl-test-token";

/// Runs `protobalance ctl ARGS` off the runtime and returns its output.
async fn ctl(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("ctl")
            .args(&args)
            .env_remove("PROTOBALANCE_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_subcommands() {
    let (b, g) = (echo_backend().await, echo_backend().await);
    let text = format!(
        "{}{}{}{}",
        head_toml(Some(TOKEN)),
        service_toml("web", "blue"),
        cluster_toml("blue", &[("a", b)]),
        cluster_toml("green", &[("g", g)])
    );
    let (server, admin, _file) = start_from_file(&text).await;
    let a = admin.as_str();

    let out = ctl(&["--admin", a, "--token", TOKEN, "status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.lines().next().unwrap().starts_with("SERVICE"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("web ") && l.contains("blue")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("blue ") && l.contains(&b.to_string()) && l.contains("green")),
        "{table}"
    );

    let out = ctl(&[
        "--admin",
        &format!("http://{a}/"),
        "--token",
        TOKEN,
        "state",
        "blue",
        "a",
        "yellow",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        node_status(&status(a, Some(TOKEN)).await, "blue", "a")["state"],
        "yellow"
    );

    let out = ctl(&["--admin", a, "--token", TOKEN, "redirect", "web", "green"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(service_status(&status(a, Some(TOKEN)).await, "web")["cluster"], "green");
    let out = ctl(&["--admin", a, "--token", TOKEN, "status"]).await;
    assert!(
        stdout(&out).contains("green (redirected from blue)"),
        "{}",
        stdout(&out)
    );

    let out = ctl(&["--admin", a, "--token", TOKEN, "reload"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("reloaded"), "{}", stdout(&out));

    // Errors: 401 without or with a wrong token, 404 for unknown names, a bad colour.
    let out = ctl(&["--admin", a, "status"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("401") && stderr(&out).contains("--token"),
        "{}",
        stderr(&out)
    );
    let out = ctl(&["--admin", a, "--token", "wrong-token", "status"]).await;
    assert!(stderr(&out).contains("refused this token"), "{}", stderr(&out));
    let out = ctl(&["--admin", a, "--token", TOKEN, "state", "blue", "zz", "red"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("404") && stderr(&out).contains("zz"),
        "{}",
        stderr(&out)
    );
    let out = ctl(&["--admin", a, "--token", TOKEN, "redirect", "nope", "blue"]).await;
    assert!(
        stderr(&out).contains("404") && stderr(&out).contains("nope"),
        "{}",
        stderr(&out)
    );
    let out = ctl(&["--admin", a, "--token", TOKEN, "state", "blue", "a", "purple"]).await;
    assert!(!out.status.success());
    assert_eq!(
        node_status(&status(a, Some(TOKEN)).await, "blue", "a")["state"],
        "yellow"
    );
    server.shutdown(PATIENCE).await;

    // Unreachable: a port nothing listens on (just closed).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = ctl(&["--admin", &closed.to_string(), "status"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach the admin API"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file() {
    let (one, two) = (tag_backend("one").await, tag_backend("two").await);
    let file = tempfile::NamedTempFile::new().unwrap();
    let text = |backend| {
        format!(
            "{}{}{}",
            head_toml(None),
            service_toml("web", "c"),
            cluster_toml("c", &[("n", backend)])
        )
    };
    std::fs::write(file.path(), text(one)).unwrap();
    let mut child = Balancer(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(file.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The log says where the admin API and the service listen.
    let stderr = child.0.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut admin, mut web) = (None, None);
    while admin.is_none() || web.is_none() {
        let line = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .expect("the balancer starts");
        let after = |marker: &str| line.split(marker).nth(1)?.split_whitespace().next().map(str::to_string);
        if let Some(a) = after("admin listening on ") {
            admin = Some(a);
        } else if line.contains("service=web")
            && let Some(w) = after("listening on ")
        {
            web = Some(w.parse::<std::net::SocketAddr>().unwrap());
        }
    }
    let (admin, web) = (admin.unwrap(), web.unwrap());
    assert_eq!(read_tag(web).await.unwrap(), "one");

    std::fs::write(file.path(), text(two)).unwrap();
    // SAFETY: kill(2) on the child this test started.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGHUP) }, 0);
    let node_address = || {
        let admin = admin.clone();
        async move { node_status(&status(&admin, None).await, "c", "n")["address"].clone() }
    };
    wait_until("the reload after SIGHUP", || {
        let fut = node_address();
        async move { fut.await == two.to_string() }
    })
    .await;
    assert_eq!(read_tag(web).await.unwrap(), "two");

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
}

/// The balancer process this test started; killed if the test fails before stopping it.
struct Balancer(std::process::Child);

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
