//! `protobalance ctl` against a running balancer, and SIGHUP reloading the
//! binary's config file.

mod common;

use std::process::{Command, Output};

use common::*;

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
    let (server, admin, _file) = ConfigText::new()
        .token(TOKEN)
        .service(Service::new("web", "blue"))
        .cluster(Cluster::of("blue", &[("a", b)]))
        .cluster(Cluster::of("green", &[("g", g)]))
        .start_with_admin()
        .await;
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
    let out = ctl(&["--admin", &dead_addr().to_string(), "status"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach the admin API"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file() {
    let (one, two) = (name_backend("one").await, name_backend("two").await);
    let config = |backend| {
        ConfigText::new()
            .service(Service::new("web", "c"))
            .cluster(Cluster::of("c", &[("n", backend)]))
    };
    let mut balancer = Running::run(&config(one), &[]);
    let web = balancer.listen_addr();
    let admin = balancer.admin_addr();
    assert_eq!(read_tag(web).await.unwrap(), "one");

    std::fs::write(balancer.config_path(), config(two).text()).unwrap();
    balancer.signal(libc::SIGHUP);
    wait_until("the reload after SIGHUP", || {
        let admin = admin.clone();
        async move { node_status(&status(&admin, None).await, "c", "n")["address"] == two.to_string() }
    })
    .await;
    assert_eq!(read_tag(web).await.unwrap(), "two");

    balancer.signal(libc::SIGTERM);
    let exit = tokio::task::spawn_blocking(move || balancer.wait_exit()).await.unwrap();
    assert!(exit.success());
}
