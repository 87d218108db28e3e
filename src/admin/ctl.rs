//! `protobalance ctl`: the admin API from a shell. Each subcommand is one
//! request; answers are printed for people (`status` as tables), errors say
//! what to do about them.

use std::process::ExitCode;

use hyper::Method;

use super::client::{self, ClientError, Reply};
use super::status::Status;

/// What `ctl` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Status,
    State {
        cluster: String,
        node: String,
        state: String,
        /// With yellow: turn red once this has passed.
        deadline: Option<String>,
    },
    Redirect {
        service: String,
        cluster: String,
    },
    Reload,
    Upgrade,
}

/// Runs one `ctl` action against the admin API at `admin` and prints the outcome.
pub async fn run(admin: &str, token: Option<&str>, action: Action) -> ExitCode {
    match execute(admin, token, &action).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The text to print on success, or the error message.
async fn execute(admin: &str, token: Option<&str>, action: &Action) -> Result<String, String> {
    let (method, path, body) = match action {
        Action::Status => (Method::GET, "/api/v1/status".to_string(), None),
        Action::State {
            cluster,
            node,
            state,
            deadline,
        } => (
            Method::PUT,
            format!("/api/v1/clusters/{}/nodes/{}/state", segment(cluster), segment(node)),
            Some(match deadline {
                None => serde_json::json!({ "state": state }).to_string(),
                Some(d) => serde_json::json!({ "state": state, "deadline": d }).to_string(),
            }),
        ),
        Action::Redirect { service, cluster } => (
            Method::PUT,
            format!("/api/v1/services/{}/cluster", segment(service)),
            Some(serde_json::json!({ "cluster": cluster }).to_string()),
        ),
        Action::Reload => (Method::POST, "/api/v1/reload".to_string(), None),
        Action::Upgrade => (Method::POST, "/api/v1/upgrade".to_string(), None),
    };
    let reply = client::request(admin, token, method, &path, body.as_deref())
        .await
        .map_err(|e| explain_unreachable(e, admin))?;
    if reply.status != 200 {
        return Err(explain_refusal(&reply, token.is_some()));
    }
    Ok(match action {
        Action::Status => {
            let status: Status =
                serde_json::from_slice(&reply.body).map_err(|e| format!("unexpected status answer: {e}"))?;
            status_tables(&status)
        }
        Action::State {
            cluster,
            node,
            state,
            deadline: None,
        } => format!("{cluster}/{node} is now {state}\n"),
        Action::State {
            cluster,
            node,
            state,
            deadline: Some(d),
        } => format!("{cluster}/{node} is now {state}; red in {d}\n"),
        Action::Redirect { service, cluster } => {
            format!("service {service}: new connections now go to cluster {cluster}\n")
        }
        Action::Reload => {
            let v = reply.json();
            let list = |key: &str| {
                v[key]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "none".into())
            };
            format!(
                "reloaded; listeners opened: {}; closed: {}; redirects dropped: {}\n",
                list("opened"),
                list("closed"),
                list("redirects_dropped")
            )
        }
        Action::Upgrade => format!("upgraded: process {} serves now\n", reply.json()["pid"]),
    })
}

/// Names go into the URL path: escape what would change its meaning.
fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn explain_unreachable(e: ClientError, admin: &str) -> String {
    match e {
        ClientError::Unreachable { .. } => {
            format!("{e}\n(is protobalance running with its admin API on {admin}? use --admin HOST:PORT or unix:PATH)")
        }
        other => other.to_string(),
    }
}

fn explain_refusal(reply: &Reply, sent_token: bool) -> String {
    let message = reply.json()["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| reply.text());
    match reply.status {
        401 if sent_token => "401 unauthorized: the admin API refused this token".into(),
        401 => "401 unauthorized: the admin API needs a token: pass --token-file FILE, set PROTOBALANCE_TOKEN \
                or pass --token TOKEN"
            .into(),
        404 => format!("404 not found: {message}"),
        status => format!("{status}: {message}"),
    }
}

/// `status` as two tables: services, then nodes.
pub fn status_tables(status: &Status) -> String {
    let mut services = vec![vec![
        "SERVICE".to_string(),
        "LISTEN".into(),
        "CLUSTER".into(),
        "ACTIVE".into(),
        "TOTAL".into(),
        "REFUSED".into(),
    ]];
    for s in &status.services {
        let cluster = match &s.redirected_from {
            Some(file) => format!("{} (redirected from {file})", s.cluster),
            None => s.cluster.clone(),
        };
        services.push(vec![
            s.name.clone(),
            s.listen.join(","),
            cluster,
            s.active_connections.to_string(),
            s.total_connections.to_string(),
            s.refused_connections.to_string(),
        ]);
    }
    let mut nodes = vec![vec![
        "CLUSTER".to_string(),
        "NODE".into(),
        "ADDRESS".into(),
        "WEIGHT".into(),
        "STATE".into(),
        "HEALTH".into(),
        "ACTIVE".into(),
        "TOTAL".into(),
        "BYTES IN".into(),
        "BYTES OUT".into(),
        "CONN/S".into(),
        "BYTES/S".into(),
        "FAILURES".into(),
    ]];
    for c in &status.clusters {
        for n in &c.nodes {
            nodes.push(vec![
                c.name.clone(),
                n.name.clone(),
                n.address.clone(),
                n.weight.to_string(),
                n.state.clone(),
                n.health.clone(),
                n.active_connections.to_string(),
                n.total_connections.to_string(),
                n.bytes_in.to_string(),
                n.bytes_out.to_string(),
                format!("{:.1}", n.connection_rate),
                format!("{:.0}", n.traffic_rate),
                n.connect_failures.to_string(),
            ]);
        }
    }
    let store = match &status.store {
        Some(s) => format!(
            "\nstore {} (instance {}): {}\n",
            s.url,
            s.instance,
            match (s.up, s.slow) {
                (true, false) => "up",
                (true, true) => "SLOW (past the lookup budget; clients are served without it)",
                (false, _) => "DOWN",
            }
        ),
        None => String::new(),
    };
    format!("{}\n{}{store}", table(&services), table(&nodes))
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(segment("web-1.a_b"), "web-1.a_b");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&[vec!["A".into(), "BB".into()], vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }
}
