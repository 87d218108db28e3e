//! Every admin route: success, 401, malformed JSON, unknown names (404),
//! invalid values (400), and that a refused request changes nothing.

mod common;

use common::*;
use hyper::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "s3cret-admin-token";

async fn setup() -> (Server, String, tempfile::NamedTempFile) {
    start_web_blue_green(TOKEN).await
}

fn assert_error(reply: &Reply, status: u16) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert!(
        reply.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error body is not {{\"error\": ...}}: {}",
        reply.text()
    );
}

#[tokio::test]
async fn status_has_the_documented_shape() {
    let (server, admin, _file) = setup().await;
    let web = server.addr_of("web").unwrap();
    let mut client = TcpStream::connect(web).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).await.unwrap();
    // A chunk is counted once its write returned, which may be just after the
    // client has read it: wait for the count rather than race it.
    wait_until("the echo to be counted", || async {
        let s = status(&admin, Some(TOKEN)).await;
        ["a", "b"].iter().any(|n| node_status(&s, "blue", n)["bytes_out"] == 5)
    })
    .await;

    let s = status(&admin, Some(TOKEN)).await;
    let svc = service_status(&s, "web");
    assert_eq!(svc["cluster"], "blue");
    assert_eq!(svc["listen"], serde_json::json!(["127.0.0.1:0"]));
    assert_eq!(svc["bound"], serde_json::json!([web.to_string()]));
    assert_eq!(svc["total_connections"], 1);
    let blue = s["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "blue")
        .unwrap();
    assert_eq!(blue["algorithm"], "round-robin");
    assert_eq!(blue["affinity"], false);
    let used: Vec<&Value> = ["a", "b"].iter().map(|n| node_status(&s, "blue", n)).collect();
    let node = used
        .iter()
        .find(|n| n["total_connections"] == 1)
        .expect("one node took the client");
    assert_eq!(node["active_connections"], 1, "{s}");
    assert_eq!(node["bytes_in"], 5, "{s}");
    assert_eq!(node["bytes_out"], 5, "{s}");
    for key in [
        "name",
        "address",
        "weight",
        "fallover",
        "state",
        "health",
        "connection_rate",
        "traffic_rate",
        "connect_failures",
    ] {
        assert!(node.get(key).is_some(), "node status lacks {key}: {node}");
    }
    assert!(node["connection_rate"].as_f64().unwrap() > 0.0, "live rate: {node}");
    assert!(node["traffic_rate"].as_f64().unwrap() > 0.0, "live rate: {node}");
    assert_eq!(node["state"], "green");
    assert_eq!(node["health"], "available");
    drop(client);
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn every_route_needs_the_token() {
    let (server, admin, _file) = setup().await;
    let before = control_view(&status(&admin, Some(TOKEN)).await);
    let routes = [
        (Method::GET, "/", None),
        (Method::GET, "/api/v1/status", None),
        (Method::GET, "/metrics", None),
        (
            Method::PUT,
            "/api/v1/clusters/blue/nodes/a/state",
            Some(r#"{"state":"red"}"#),
        ),
        (
            Method::PUT,
            "/api/v1/services/web/cluster",
            Some(r#"{"cluster":"green"}"#),
        ),
        (Method::POST, "/api/v1/reload", None),
        (Method::GET, "/no/such/route", None),
    ];
    for (method, path, body) in routes {
        for token in [None, Some("wrong-token-value"), Some("s3cret-admin-toke")] {
            let reply = api(&admin, token, method.clone(), path, body).await;
            assert_error(&reply, 401);
        }
    }
    assert_eq!(control_view(&status(&admin, Some(TOKEN)).await), before);

    // A browser sends the token as the Basic password; the 401 offers it.
    let reply = api(&admin, None, Method::GET, "/", None).await;
    assert_eq!(reply.status, 401);
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("anyone:{TOKEN}"));
    let raw = format!(
        "GET /api/v1/status HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Basic {basic}\r\nConnection: close\r\n\r\n"
    );
    let mut stream = TcpStream::connect(&admin).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn node_state_route() {
    let (server, admin, _file) = setup().await;
    let path = "/api/v1/clusters/blue/nodes/a/state";
    let reply = api(&admin, Some(TOKEN), Method::PUT, path, Some(r#"{"state":"yellow"}"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["state"], "yellow");
    assert_eq!(
        node_status(&status(&admin, Some(TOKEN)).await, "blue", "a")["state"],
        "yellow"
    );

    let before = control_view(&status(&admin, Some(TOKEN)).await);
    let bad: [(&str, &str, u16); 9] = [
        (path, r#"{"state":"purple"}"#, 400),
        (path, r#"{"state":"GREEN"}"#, 400),
        (path, r#"{"state":1}"#, 400),
        (path, r#"{"colour":"red"}"#, 400),
        (path, r#"{"state":"red","extra":1}"#, 400),
        (path, r#"{"state":"#, 400),
        (path, "", 400),
        ("/api/v1/clusters/blue/nodes/zz/state", r#"{"state":"red"}"#, 404),
        ("/api/v1/clusters/nope/nodes/a/state", r#"{"state":"red"}"#, 404),
    ];
    for (p, body, code) in bad {
        let reply = api(&admin, Some(TOKEN), Method::PUT, p, Some(body)).await;
        assert_error(&reply, code);
    }
    let huge = format!(r#"{{"state":"red","pad":"{}"}}"#, "x".repeat(64 * 1024));
    assert_error(&api(&admin, Some(TOKEN), Method::PUT, path, Some(&huge)).await, 413);
    assert_error(&api(&admin, Some(TOKEN), Method::GET, path, None).await, 405);
    assert_eq!(control_view(&status(&admin, Some(TOKEN)).await), before);
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn redirect_route() {
    let (server, admin, _file) = setup().await;
    let web = server.addr_of("web").unwrap();
    let path = "/api/v1/services/web/cluster";

    let before = control_view(&status(&admin, Some(TOKEN)).await);
    let bad: [(&str, &str, u16); 6] = [
        (path, r#"{"cluster":"nope"}"#, 404),
        ("/api/v1/services/nope/cluster", r#"{"cluster":"green"}"#, 404),
        (path, r#"{"cluster":7}"#, 400),
        (path, r#"{"cluster":"green""#, 400),
        (path, r#"{}"#, 400),
        (path, r#"["green"]"#, 400),
    ];
    for (p, body, code) in bad {
        assert_error(&api(&admin, Some(TOKEN), Method::PUT, p, Some(body)).await, code);
    }
    assert_eq!(control_view(&status(&admin, Some(TOKEN)).await), before);

    let reply = api(&admin, Some(TOKEN), Method::PUT, path, Some(r#"{"cluster":"green"}"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let s = status(&admin, Some(TOKEN)).await;
    assert_eq!(service_status(&s, "web")["cluster"], "green");
    assert_eq!(service_status(&s, "web")["redirected_from"], "blue");
    // The very next connection goes to green's only node.
    let mut c = TcpStream::connect(web).await.unwrap();
    c.write_all(b"x").await.unwrap();
    c.read_exact(&mut [0u8; 1]).await.unwrap();
    assert_eq!(
        node_status(&status(&admin, Some(TOKEN)).await, "green", "g")["total_connections"],
        1
    );
    drop(c);

    // The same call with the file's cluster reverts.
    let reply = api(&admin, Some(TOKEN), Method::PUT, path, Some(r#"{"cluster":"blue"}"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let s = status(&admin, Some(TOKEN)).await;
    assert_eq!(service_status(&s, "web")["cluster"], "blue");
    assert!(service_status(&s, "web")["redirected_from"].is_null());
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn reload_route() {
    let (server, admin, file) = setup().await;
    let extra = echo_backend().await;
    let good = ConfigText::new()
        .token(TOKEN)
        .service(Service::new("web", "blue"))
        .service(Service::new("extra", "green"))
        .cluster(Cluster::of("blue", &[("a", extra), ("b", extra)]))
        .cluster(Cluster::of("green", &[("g", extra)]))
        .text();

    // A bad file is refused with its error; nothing changes.
    let before = control_view(&status(&admin, Some(TOKEN)).await);
    for broken in [
        "this is not toml".to_string(),
        good.replace("cluster = \"green\"\n", "cluster = \"missing\"\n"),
        good.replace("name = \"g\"", "name = \"g\"\nweight = -1"),
    ] {
        std::fs::write(file.path(), &broken).unwrap();
        let reply = api(&admin, Some(TOKEN), Method::POST, "/api/v1/reload", None).await;
        assert_error(&reply, 400);
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap()
                .contains(&file.path().display().to_string()),
            "the error names the file: {}",
            reply.text()
        );
        assert_eq!(control_view(&status(&admin, Some(TOKEN)).await), before);
    }

    std::fs::write(file.path(), &good).unwrap();
    let reply = api(&admin, Some(TOKEN), Method::POST, "/api/v1/reload", None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["opened"].as_array().unwrap().len(), 1);
    let s = status(&admin, Some(TOKEN)).await;
    assert_eq!(node_status(&s, "blue", "a")["address"], extra.to_string());
    let extra_addr = server.addr_of("extra").expect("the new service listens");
    let mut c = TcpStream::connect(extra_addr).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    drop(c);
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn reload_without_a_file_is_refused() {
    let backend = echo_backend().await;
    let (server, _) = ConfigText::one_service(Cluster::of("c", &[("n", backend)]))
        .start()
        .await;
    let admin = server.start_admin().await.unwrap().to_string();
    assert_error(&api(&admin, None, Method::POST, "/api/v1/reload", None).await, 409);
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn metrics_route() {
    let (server, admin, _file) = setup().await;
    let web = server.addr_of("web").unwrap();
    for _ in 0..4 {
        let mut c = TcpStream::connect(web).await.unwrap();
        c.write_all(b"abc").await.unwrap();
        c.read_exact(&mut [0u8; 3]).await.unwrap();
    }
    let red = api(
        &admin,
        Some(TOKEN),
        Method::PUT,
        "/api/v1/clusters/green/nodes/g/state",
        Some(r#"{"state":"red"}"#),
    )
    .await;
    assert_eq!(red.status, 200, "{}", red.text());
    let reply = api(&admin, Some(TOKEN), Method::GET, "/metrics", None).await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    let has = |line: &str| assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    has(r#"protobalance_node_connections_total{cluster="blue",node="a"} 2"#);
    has(r#"protobalance_node_connections_total{cluster="blue",node="b"} 2"#);
    has(r#"protobalance_node_bytes_total{cluster="blue",node="a",direction="in"} 6"#);
    has(r#"protobalance_node_bytes_total{cluster="blue",node="a",direction="out"} 6"#);
    has(r#"protobalance_node_connect_failures_total{cluster="blue",node="a"} 0"#);
    has(r#"protobalance_node_health_transitions_total{cluster="blue",node="a"} 0"#);
    has(r#"protobalance_node_available{cluster="blue",node="a"} 1"#);
    has(r#"protobalance_node_state{cluster="green",node="g",state="red"} 1"#);
    has(r#"protobalance_node_state{cluster="green",node="g",state="green"} 0"#);
    has(r#"protobalance_service_accepted_total{service="web"} 4"#);
    has(r#"protobalance_service_refused_total{service="web",reason="no_node"} 0"#);
    let by_worker: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("protobalance_worker_accepted_total{worker=\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(by_worker.len(), server.accepted_by_worker().len(), "{text}");
    assert_eq!(
        by_worker.iter().sum::<u64>(),
        4,
        "the 4 clients, over the workers: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("protobalance_node_active_connections{"))
    );
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn dashboard_route_is_self_contained() {
    let (server, admin, _file) = setup().await;
    let reply = api(&admin, Some(TOKEN), Method::GET, "/", None).await;
    assert_eq!(reply.status, 200);
    let page = reply.text();
    assert!(page.contains("<html"), "{page}");
    assert!(page.contains("/api/v1/status"));
    for external in ["src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import"] {
        assert!(
            !page.contains(external),
            "the page loads something from elsewhere: {external}"
        );
    }
    let missing = api(&admin, Some(TOKEN), Method::GET, "/nope", None).await;
    assert_error(&missing, 404);
    server.shutdown(PATIENCE).await;
}
