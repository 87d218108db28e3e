//! The binary: `check` names every config problem with its line, `run`
//! refuses a bad file, `forward` and `demo` work end to end, SIGTERM exits 0.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `protobalance check` on `text` (raw: these tests are about its lines).
fn check(text: &str) -> (bool, String) {
    let f = toml_file(text);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(f.path())
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), msg)
}

const GOOD: &str = r#"state_dir = "/tmp/pb-test-state"
threads = 2
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:9900"

[defaults]
connect_timeout = "3s"
retry_interval = "10s"

[[service]]
name = "web"
listen = ["127.0.0.1:8080", "127.0.0.1:30000-30009"]
cluster = "blue"

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
state = "green"

[[cluster.node]]
name = "b"
address = "10.0.0.2"
"#;

#[test]
fn check_accepts_the_interface_example() {
    let (ok, msg) = check(GOOD);
    assert!(ok, "{msg}");
    assert!(
        msg.contains("ok: 1 service(s) on 11 listening port(s), 1 cluster(s), 2 node(s)"),
        "{msg}"
    );
}

/// Each broken config, with what the error must say (key, bad value, line).
#[test]
fn check_names_every_problem_with_key_value_and_line() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown key",
            "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:1\"]\ncluster = \"blue\"\nport = 3\n",
            &[":5:", "unknown field `port`"],
        ),
        (
            "duplicate service",
            &GOOD.replace(
                "[[cluster]]",
                "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:7\"]\ncluster = \"blue\"\n[[cluster]]",
            ),
            &[":18:", "name = \"web\"", "duplicate service name"],
        ),
        (
            "duplicate cluster",
            &format!(
                "{GOOD}\n[[cluster]]\nname = \"blue\"\n[[cluster.node]]\nname = \"x\"\naddress = \"10.0.0.3:1\"\n"
            ),
            &[":35:", "name = \"blue\"", "duplicate cluster name"],
        ),
        (
            "duplicate node",
            &GOOD.replace("name = \"b\"", "name = \"a\""),
            &[":31:", "\"a\"", "duplicate node name"],
        ),
        (
            "missing cluster",
            &GOOD.replace("cluster = \"blue\"", "cluster = \"green\""),
            &[":15:", "cluster = \"green\"", "no [[cluster]] has this name"],
        ),
        (
            "missing fallover node",
            &GOOD.replace("fallover = \"b\"", "fallover = \"z\""),
            &[":27:", "fallover = \"z\"", "no node of this cluster"],
        ),
        (
            "fallover loop",
            &format!("{GOOD}fallover = \"a\"\n"),
            &[":27:", "forms a loop: a -> b -> a"],
        ),
        (
            "self fallover",
            &GOOD.replace("fallover = \"b\"", "fallover = \"a\""),
            &[":27:", "its own fall-over"],
        ),
        (
            "weight 0",
            &GOOD.replace("weight = 2", "weight = 0"),
            &[":26:", "weight = 0", "must be 1 to"],
        ),
        (
            "overlapping listen",
            &GOOD.replace("\"127.0.0.1:8080\"", "\"0.0.0.0:30005\""),
            &[
                ":14:",
                "listen = \"127.0.0.1:30000-30009\"",
                "overlaps 0.0.0.0:30005 of this service",
            ],
        ),
        (
            "bad duration",
            &GOOD.replace("\"30d\"", "\"30 days\""),
            &[":21:", "affinity_ttl = \"30 days\"", "unit"],
        ),
        (
            "duration without unit",
            &GOOD.replace("connect_timeout = \"3s\"", "connect_timeout = \"3\""),
            &[":9:", "connect_timeout = \"3\"", "missing unit"],
        ),
        (
            "reversed range",
            &GOOD.replace("30000-30009", "30009-30000"),
            &[":14:", "30009-30000", "reversed"],
        ),
        (
            "port out of range",
            &GOOD.replace("30000-30009", "30000-70000"),
            &[":14:", "70000", "not a port number"],
        ),
        (
            "bad listen address",
            &GOOD.replace("127.0.0.1:8080", "localhost:8080"),
            &[":14:", "localhost", "not an IP address"],
        ),
        (
            "bad node address",
            &GOOD.replace("10.0.0.1:80", "10.0.0.1:http"),
            &[":25:", "10.0.0.1:http", "not a port number"],
        ),
        (
            "unknown algorithm",
            &GOOD.replace("round-robin", "fastest"),
            &[":19:", "algorithm = \"fastest\"", "unknown algorithm"],
        ),
        (
            "bad state",
            &GOOD.replace("state = \"green\"", "state = \"blue\""),
            &[":28:", "state = \"blue\"", "green, yellow or red"],
        ),
        (
            "admin without token",
            &GOOD.replace("listen = \"127.0.0.1:9900\"", "listen = \"0.0.0.0:9900\""),
            &[":6:", "token is required"],
        ),
        (
            "threads",
            &GOOD.replace("threads = 2", "threads = -1"),
            &[":2:", "threads = -1"],
        ),
        (
            "pin_workers",
            &GOOD.replace("threads = 2", "threads = 2\npin_workers = \"yes\""),
            &[":3:", "invalid type"],
        ),
        (
            "busy_poll",
            &GOOD.replace("threads = 2", "threads = 2\nbusy_poll = \"0us\""),
            &[":3:", "busy_poll = \"0us\"", "above zero"],
        ),
        (
            "empty listen",
            &GOOD.replace(
                "listen = [\"127.0.0.1:8080\", \"127.0.0.1:30000-30009\"]",
                "listen = []",
            ),
            &[":14:", "at least one"],
        ),
        (
            "cluster without nodes",
            "[[cluster]]\nname = \"c\"\n",
            &[":2:", "has no [[cluster.node]]"],
        ),
        (
            "wrong type",
            &GOOD.replace("weight = 2", "weight = \"two\""),
            &[":26:", "invalid type"],
        ),
        ("not toml", "[[service]\n", &[":1:"]),
    ];
    let mut wrong = Vec::new();
    for (what, text, expected) in cases {
        let (ok, msg) = check(text);
        if ok || !expected.iter().all(|e| msg.contains(e)) {
            wrong.push(format!("{what}: expected {expected:?} in the error, got: {msg}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn check_reports_a_missing_file() {
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/pb.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));
}

#[test]
fn run_refuses_to_start_with_a_bad_config() {
    let f = toml_file(&GOOD.replace("weight = 2", "weight = 0"));
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("weight = 0"));
}

fn fetch(addr: SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Backends that send their name and close.
fn name_backends(names: &[&'static str]) -> Vec<SocketAddr> {
    names.iter().map(|name| blocking(name_backend(name))).collect()
}

#[test]
fn forward_round_robins_over_its_nodes() {
    let nodes = name_backends(&["one", "two"]);
    let proc = Running::spawn(&["forward", "127.0.0.1:0", &nodes[0].to_string(), &nodes[1].to_string()]);
    let addr = proc.listen_addr();
    let answers: Vec<String> = (0..4).map(|_| fetch(addr)).collect();
    assert_eq!(answers, ["one", "two", "one", "two"]);
}

#[test]
fn forward_refuses_a_bad_address() {
    let out = Command::new(BIN)
        .args(["forward", "127.0.0.1:0", "nowhere:port"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere:port"));
}

#[test]
fn run_serves_and_exits_0_on_sigterm_after_open_connections_finish() {
    // A grace as long as the test's patience: exiting at once shows that
    // the balancer waits for open connections only, not for the grace.
    let (mut proc, addr) = run_with_one_node_config(|c| c.shutdown_grace("30s"));
    assert_eq!(fetch(addr), "a");
    proc.wait_for("protobalance::access");
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
}

#[test]
fn pin_workers_puts_each_worker_on_a_cpu_of_its_own_and_still_serves() {
    if std::thread::available_parallelism().unwrap().get() < 2 {
        skip_or_fail("two workers on CPUs of their own need two CPUs");
        return;
    }
    let (mut proc, addr) = run_with_one_node("threads = 2\npin_workers = true");
    for _ in 0..50 {
        assert_eq!(fetch(addr), "a");
    }
    let pid = proc.child.id();
    let mut worker_cpus: Vec<String> = worker_threads(pid, 2)
        .into_iter()
        .map(|(_, dir)| {
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
            line.split_whitespace().nth(1).unwrap().to_string()
        })
        .collect();
    worker_cpus.sort();
    assert_eq!(worker_cpus.len(), 2);
    assert!(
        worker_cpus.iter().all(|c| c.parse::<usize>().is_ok()),
        "one CPU each: {worker_cpus:?}"
    );
    assert_ne!(worker_cpus[0], worker_cpus[1], "a CPU of its own");
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
    let said = proc.all_output();
    assert!(
        said.iter()
            .any(|l| l.contains("new clients steered to the worker on their CPU")),
        "{said:?}"
    );
}

#[test]
fn busy_poll_keeps_a_worker_on_its_cpu_after_work_and_lets_it_sleep_when_idle() {
    let (mut proc, addr) = run_with_one_node("threads = 1\nbusy_poll = \"300ms\"");
    let (_, worker) = worker_threads(proc.child.id(), 1).remove(0);
    // The scheduler's state of the worker thread: R running or runnable, S asleep.
    let state = || {
        let stat = std::fs::read_to_string(worker.join("stat")).unwrap();
        stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap()
    };
    // Without busy polling a worker is back asleep in epoll_wait microseconds
    // after its client has gone; with it, it keeps polling (runnable) for the
    // window, unless it lost its CPU to another thread meanwhile.
    let mut polling = 0;
    for _ in 0..40 {
        assert_eq!(fetch(addr), "a");
        std::thread::sleep(Duration::from_millis(5));
        polling += usize::from(state() == 'R');
    }
    assert!(polling >= 20, "polling 5 ms after a client in {polling} of 40");
    wait_until_blocking("the idle worker to go back to sleep", || state() == 'S');
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
}

/// `run` with `top` (top-level lines) and one service on an ephemeral port
/// whose cluster is one node answering "a"; returns the process and the
/// service's address.
fn run_with_one_node(top: &str) -> (Running, SocketAddr) {
    run_with_one_node_config(|c| c.top(top))
}

/// [`run_with_one_node`], its config as `tweak` leaves it.
fn run_with_one_node_config(tweak: impl FnOnce(ConfigText) -> ConfigText) -> (Running, SocketAddr) {
    let nodes = name_backends(&["a"]);
    let config = tweak(ConfigText::one_service(Cluster::of("c", &[("a", nodes[0])])));
    let proc = Running::run(&config, &[]);
    let addr = proc.listen_addr();
    (proc, addr)
}

/// Each of `pid`'s threads: its name and its directory under /proc.
fn threads(pid: u32) -> Vec<(String, std::path::PathBuf)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let dir = t.unwrap().path();
            let name = std::fs::read_to_string(dir.join("comm")).unwrap().trim().to_string();
            (name, dir)
        })
        .collect()
}

/// The names of `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    threads(pid).into_iter().map(|(name, _)| name).collect()
}

/// `pid`'s worker threads, once at least `count` carry their name: a thread
/// names itself as it starts, which may be just after the balancer has
/// logged that it listens.
fn worker_threads(pid: u32, count: usize) -> Vec<(String, std::path::PathBuf)> {
    let workers = || {
        threads(pid)
            .into_iter()
            .filter(|(name, _)| name.starts_with("protobalance-w"))
            .collect::<Vec<_>>()
    };
    wait_until_blocking(&format!("{count} named worker threads"), || workers().len() >= count);
    workers()
}

#[test]
fn run_uses_exactly_the_worker_threads_asked_for_however_many_clients() {
    let nodes = name_backends(&["a"]);
    let listen = nodes[0].to_string();
    let mut proc = Running::spawn(&["forward", "--threads", "3", "127.0.0.1:0", &listen]);
    let addr = proc.listen_addr();
    let workers = |pid| worker_threads(pid, 3).len();
    assert_eq!(workers(proc.child.id()), 3);
    let before = thread_names(proc.child.id()).len();
    let clients: Vec<_> = (0..100).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    for _ in 0..100 {
        assert_eq!(fetch(addr), "a");
    }
    assert_eq!(workers(proc.child.id()), 3);
    assert_eq!(thread_names(proc.child.id()).len(), before, "no thread per client");
    drop(clients);
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
}

/// The shared libraries mapped into process `pid`, by file name.
fn mapped_libraries(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut libraries: Vec<String> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter_map(|path| path.rsplit('/').next())
        .filter(|name| name.contains(".so"))
        .map(str::to_string)
        .collect();
    libraries.sort();
    libraries.dedup();
    libraries
}

#[test]
fn a_running_balancer_maps_no_libm() {
    let nodes = name_backends(&["a"]);
    let mut proc = Running::spawn(&["forward", "127.0.0.1:0", &nodes[0].to_string()]);
    assert_eq!(fetch(proc.listen_addr()), "a");
    let libraries = mapped_libraries(proc.child.id());
    assert!(
        libraries.iter().any(|l| l.starts_with("libc.so")),
        "the reading works: {libraries:?}"
    );
    assert!(
        !libraries.iter().any(|l| l.starts_with("libm.so")),
        "libm.so costs resident memory for two functions (see src/main.rs): {libraries:?}"
    );
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
}

#[test]
fn a_running_balancer_lets_go_of_the_pages_start_up_mapped() {
    let nodes = name_backends(&["a"]);
    let mut proc = Running::spawn(&["--log-level", "debug", "forward", "127.0.0.1:0", &nodes[0].to_string()]);
    let line = proc.wait_for("of mapped code and read-only data");
    let released = line
        .split("let go of ")
        .nth(1)
        .and_then(|l| l.split(" KiB").next()?.parse::<u64>().ok());
    assert!(
        released.is_some_and(|kib| kib > 0),
        "start-up's code and read-only data are let go once it is done: {line}"
    );
    assert_eq!(fetch(proc.listen_addr()), "a", "what was let go maps back in");
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
}

#[test]
fn every_connection_gets_its_access_log_line_even_when_stopped_right_after() {
    let nodes = name_backends(&["a"]);
    let listen = nodes[0].to_string();
    let mut proc = Running::spawn(&["forward", "127.0.0.1:0", &listen]);
    let addr = proc.listen_addr();
    for _ in 0..300 {
        assert_eq!(fetch(addr), "a");
    }
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
    let lines = proc.all_output();
    let access: Vec<&String> = lines.iter().filter(|l| l.contains("protobalance::access")).collect();
    assert_eq!(
        access.len(),
        300,
        "one access-log line per connection, none lost at exit"
    );
    // The same shape as every other log line: timestamp, level, target, message.
    let line = access[0];
    let (stamp, rest) = line.split_once(' ').unwrap();
    assert!(
        stamp.len() == 27 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
        "{line}"
    );
    assert!(rest.starts_with(" INFO protobalance::access: 127.0.0.1:"), "{line}");
    for field in ["service=forward ", "node=", " in=", " out=", " ms=", " end=\"closed\""] {
        assert!(rest.contains(field), "{field:?} missing from {line}");
    }
}

#[test]
fn the_access_log_can_be_turned_off_by_its_target() {
    let nodes = name_backends(&["a"]);
    let listen = nodes[0].to_string();
    let mut proc = Running::spawn(&[
        "--log-level",
        "info,protobalance::access=off",
        "forward",
        "127.0.0.1:0",
        &listen,
    ]);
    let addr = proc.listen_addr();
    for _ in 0..20 {
        assert_eq!(fetch(addr), "a");
    }
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
    let lines = proc.all_output();
    assert!(lines.iter().any(|l| l.contains("stopped")), "other lines still come");
    assert!(!lines.iter().any(|l| l.contains("protobalance::access")));
}

#[test]
fn demo_answers_from_alternating_backends_through_the_printed_curl_line() {
    let proc = Running::spawn(&["demo", "--listen", "127.0.0.1:0"]);
    proc.wait_for("Proto Balance demo");
    let line = proc.wait_for("Try:");
    let command = line.trim_start_matches("Try:").trim();
    let out = Command::new("bash")
        .args(["-c", command])
        .output()
        .expect("bash runs the printed line");
    let answers = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = answers.lines().collect();
    assert_eq!(
        lines,
        [1, 2, 3, 1, 2, 3].map(|n| format!("hello from backend {n}")),
        "curl output: {answers}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
