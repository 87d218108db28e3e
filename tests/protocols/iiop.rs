//! IIOP: two omniORB (Python) servers, an omniORB client calling through the
//! balancer by a corbaloc URL. omniORBpy comes from scripts/test.d/omniorb.sh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use crate::common::{Cluster, ConfigText, Node, PATIENCE, skip_or_fail};
use crate::{Daemon, free_port, run_client, work_dir};

/// The virtual environment scripts/test.d/omniorb.sh installs omniORBpy
/// into; `None` after [`skip_or_fail`] when it is not there.
fn omniorb_venv() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/omniorb");
    if venv.join("bin/omniidl").is_file() && venv.join("bin/python").is_file() {
        return Some(venv);
    }
    skip_or_fail(&format!(
        "omniORBpy is not installed in {} (scripts/test installs it through scripts/test.d/omniorb.sh)",
        venv.display()
    ));
    None
}

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/protocols/iiop")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iiop_call_through_the_balancer_by_corbaloc() {
    let Some(venv) = omniorb_venv() else {
        return;
    };
    let work = work_dir();
    // Stubs and skeletons for Demo::Greeter, compiled from the IDL by omniidl.
    let stubs = work.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    run_client({
        let mut c = Command::new(venv.join("bin/omniidl"));
        c.args(["-bpython", "-C"])
            .arg(&stubs)
            .arg(scripts().join("greeter.idl"));
        c
    })
    .await;
    let python = |script: &str| {
        let mut c = Command::new(venv.join("bin/python"));
        c.env("PYTHONPATH", &stubs).arg(scripts().join(script));
        c
    };

    let mut cluster = Cluster::new("orb").key("algorithm = \"round-robin\"");
    let mut daemons = Vec::new();
    for name in ["one", "two"] {
        let port = free_port("127.0.0.1");
        let mut server = python("server.py");
        server.args([name, "127.0.0.1", &port.to_string()]);
        let log = work.path().join(format!("{name}.log"));
        daemons.push(Daemon::start(
            name,
            server,
            log,
            &[SocketAddr::from(([127, 0, 0, 1], port))],
        ));
        cluster = cluster.node(Node::new(name, format!("127.0.0.1:{port}")));
    }
    let (server, orb) = ConfigText::one_service(cluster).start().await;

    // Each client process opens its own connection: round robin gives one to each server.
    let mut servers = Vec::new();
    for n in 0..2 {
        let mut client = python("client.py");
        client
            .arg(format!("corbaloc::1.2@{orb}/Greeter"))
            .arg(format!("hello {n}"));
        let out = run_client(client).await;
        let answer = String::from_utf8(out.stdout).unwrap();
        let (name, echoed) = answer
            .trim()
            .split_once(": ")
            .unwrap_or_else(|| panic!("answer: {answer:?}"));
        assert_eq!(echoed, format!("hello {n}"), "the server echoes the request");
        servers.push(name.to_string());
    }
    servers.sort();
    assert_eq!(servers, ["one", "two"], "round robin sends one call to each ORB");
    server.shutdown(PATIENCE).await;
    drop(daemons);
}
