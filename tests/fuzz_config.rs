//! Hostile config input: random text, random mutations of a valid file and
//! random values for every key never panic the parser; every refusal is an
//! error naming a line or the file. Bounded: a few thousand cases per run.

mod common;

use proptest::prelude::*;

const VALID: &str = r#"state_dir = "/tmp/pb"
threads = 2
shutdown_grace = "5s"
max_connections = 100
[admin]
listen = "127.0.0.1:9900"
allowed_hosts = ["lb1.example.com"]
max_connections = 8
header_timeout = "5s"
request_timeout = "10s"
[defaults]
connect_timeout = "3s"
retry_interval = "10s"
[[service]]
name = "web"
listen = ["127.0.0.1:8080", "127.0.0.1:30000-30009"]
cluster = "blue"
max_connections_per_client = 4
idle_timeout = "1m"
allow = ["127.0.0.0/8"]
[[cluster]]
name = "blue"
algorithm = "round-robin"
affinity = true
affinity_ttl = "30d"
[[cluster.node]]
name = "a"
address = "10.0.0.1:80"
weight = 2
fallover = "b"
[[cluster.node]]
name = "b"
address = "10.0.0.2"
"#;

/// Raw text on purpose: the parser is what is under test.
fn parse(text: &str) {
    if let Err(e) = common::parse_offline(text, "fuzz.toml") {
        let msg = e.to_string();
        assert!(msg.starts_with("fuzz.toml"), "{msg}");
        assert!(!e.message.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics(text in "\\PC{0,400}") {
        parse(&text);
    }

    #[test]
    fn mutated_valid_file_never_panics(
        edits in proptest::collection::vec((0usize..VALID.len(), 0usize..8, "\\PC{0,6}"), 1..6)
    ) {
        let mut text = VALID.as_bytes().to_vec();
        for (at, remove, insert) in edits {
            let at = at.min(text.len());
            let end = (at + remove).min(text.len());
            text.splice(at..end, insert.into_bytes());
        }
        parse(&String::from_utf8_lossy(&text));
    }

    #[test]
    fn any_value_for_any_key_never_panics(
        line in 0usize..33,
        value in prop_oneof![
            Just("\"\"".to_string()),
            Just("-1".to_string()),
            Just("0".to_string()),
            Just("99999999999999999999".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("true".to_string()),
            Just("1.5e308".to_string()),
            "\"[\\PC]{0,20}\"",
            "\"[0-9a-f:.\\[\\]/-]{0,24}\"",
            "-?[0-9]{1,12}",
        ]
    ) {
        let lines: Vec<String> = VALID
            .lines()
            .enumerate()
            .map(|(i, l)| match (i == line, l.split_once(" = ")) {
                (true, Some((key, _))) => format!("{key} = {value}"),
                _ => l.to_string(),
            })
            .collect();
        parse(&lines.join("\n"));
    }
}

#[test]
fn the_valid_file_is_valid() {
    common::parse_offline(VALID, "fuzz.toml").unwrap();
}
