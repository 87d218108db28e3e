//! SMTP (exim) and IMAP/POP3 (dovecot): two backends of each, curl through
//! the balancer.
//!
//! SMTP uses exim rather than OpenSMTPD: OpenSMTPD's queue directory and
//! control socket are fixed at build time (/var/spool/smtpd,
//! /run/smtpd.sock), so two instances cannot run side by side with private
//! state. exim takes its spool, log and pid paths from its config file.

use crate::common::{Cluster, ConfigText, Node, PATIENCE, Service, require_tools, tool, wait_until_blocking};
use crate::{Daemon, chown_to, curl, free_port, require_root, run_client, work_dir};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// exim in the foreground (`-bdf`), accepting any recipient on `port` and
/// appending every message to `dir/inbox` (mbox). Started by root with `-C`,
/// exim drops to its own user, which owns `dir`.
pub(crate) fn exim(name: &str, dir: &Path, port: u16) -> Daemon {
    std::fs::create_dir_all(dir.join("spool")).unwrap();
    let d = dir.display();
    let conf = format!(
        "primary_hostname = {name}.test\n\
         spool_directory = {d}/spool\nlog_file_path = {d}/%slog\npid_file_path = {d}/exim.pid\n\
         local_interfaces = 127.0.0.1\ndomainlist local_domains = *\n\
         acl_smtp_rcpt = accept_all\nnever_users =\nhost_lookup =\nrfc1413_hosts =\n\
         tls_advertise_hosts =\nkeep_environment =\n\
         begin acl\naccept_all:\n  accept\n\
         begin routers\neverything:\n  driver = accept\n  transport = to_inbox\n\
         begin transports\nto_inbox:\n  driver = appendfile\n  file = {d}/inbox\n  user = Debian-exim\n\
         begin retry\n*  *  F,1m,1m\n"
    );
    chown_to(dir, "Debian-exim");
    // exim wants its config owned by root and writable by nobody else.
    std::fs::write(dir.join("exim.conf"), conf).unwrap();
    std::fs::set_permissions(dir.join("exim.conf"), std::fs::Permissions::from_mode(0o644)).unwrap();
    // Started again in the same directory, the file was given away above.
    std::os::unix::fs::chown(dir.join("exim.conf"), Some(0), Some(0)).unwrap();
    let mut command = Command::new(tool("exim4"));
    command
        .args(["-bdf", "-odi", "-C"])
        .arg(dir.join("exim.conf"))
        .arg("-oX")
        .arg(port.to_string());
    Daemon::start(
        name,
        command,
        dir.join("daemon.log"),
        &[SocketAddr::from(([127, 0, 0, 1], port))],
    )
}

/// Waits until `file` contains `needle` (exim delivers after it has answered
/// the client, and says nothing when it has); returns the file's text. A
/// failure shows the daemon's log (see [`Daemon`]).
fn wait_for_text(file: &Path, needle: &str, _daemon: &Daemon) -> String {
    let mut text = String::new();
    wait_until_blocking(&format!("{needle:?} to reach {}", file.display()), || {
        text = std::fs::read_to_string(file).unwrap_or_default();
        text.contains(needle)
    });
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_through_exim_delivers_to_a_backend() {
    if !require_tools(&["exim4", "curl"]) || !require_root() {
        return;
    }
    let work = work_dir();
    let mut cluster = Cluster::new("mta").key("algorithm = \"round-robin\"");
    let mut backends = Vec::new();
    for name in ["one", "two"] {
        let dir = work.path().join(name);
        let port = free_port("127.0.0.1");
        let daemon = exim(&format!("exim {name}"), &dir, port);
        cluster = cluster.node(Node::new(name, format!("127.0.0.1:{port}")));
        backends.push((dir.join("inbox"), daemon));
    }
    let (server, smtp) = ConfigText::one_service(cluster).start().await;

    // Round robin: the first mail goes to one backend, the second to the other.
    for (n, (inbox, daemon)) in backends.iter().enumerate() {
        let mail = work.path().join(format!("mail{n}.eml"));
        let subject = format!("through the balancer {n}");
        std::fs::write(
            &mail,
            format!("From: alice@client.test\r\nTo: bob@backend.test\r\nSubject: {subject}\r\n\r\nbody {n}\r\n"),
        )
        .unwrap();
        run_client({
            let mut c = curl();
            c.arg(format!("smtp://{smtp}"))
                .args([
                    "--mail-from",
                    "alice@client.test",
                    "--mail-rcpt",
                    "bob@backend.test",
                    "--upload-file",
                ])
                .arg(&mail);
            c
        })
        .await;
        let text = wait_for_text(inbox, &format!("Subject: {subject}"), daemon);
        assert!(text.contains(&format!("body {n}")), "message body arrived: {text}");
        assert!(
            text.contains("for bob@backend.test"),
            "exim received it for bob: {text}"
        );
    }
    server.shutdown(PATIENCE).await;
}

/// dovecot in the foreground serving IMAP and POP3 for user `tester`
/// (password `secret`), whose Maildir holds one message naming `name`.
pub(crate) fn dovecot(name: &str, dir: &Path, imap: u16, pop3: u16) -> Daemon {
    dovecot_with(name, dir, imap, pop3, false)
}

/// As [`dovecot`]; `behind_proxy`: its IMAP listener takes a PROXY header
/// from loopback (`haproxy = yes`), and logins log the address it names.
fn dovecot_with(name: &str, dir: &Path, imap: u16, pop3: u16, behind_proxy: bool) -> Daemon {
    let maildir = dir.join("home/tester/Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    std::fs::write(
        maildir.join("new/1.stored"),
        format!("From: alice@client.test\r\nSubject: stored at {name}\r\n\r\nThe message kept by {name}.\r\n"),
    )
    .unwrap();
    chown_to(&dir.join("home"), "nobody");
    std::fs::write(dir.join("passwd"), "tester:{PLAIN}secret\n").unwrap();
    let d = dir.display();
    let (trusted, haproxy) = if behind_proxy {
        ("haproxy_trusted_networks = 127.0.0.0/8\n", "    haproxy = yes\n")
    } else {
        ("", "")
    };
    let conf = format!(
        "{trusted}protocols = imap pop3\nlisten = 127.0.0.1\nbase_dir = {d}/run\nstate_dir = {d}/state\n\
         instance_name = {name}\nlog_path = /dev/stderr\nssl = no\ndisable_plaintext_auth = no\n\
         auth_mechanisms = plain\n\
         passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {d}/passwd\n}}\n\
         userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={d}/home/%u\n}}\n\
         mail_location = maildir:~/Maildir\n\
         service imap-login {{\n  inet_listener imap {{\n    port = {imap}\n{haproxy}  }}\n  inet_listener imaps {{\n    port = 0\n  }}\n}}\n\
         service pop3-login {{\n  inet_listener pop3 {{\n    port = {pop3}\n  }}\n  inet_listener pop3s {{\n    port = 0\n  }}\n}}\n"
    );
    std::fs::write(dir.join("dovecot.conf"), conf).unwrap();
    let mut command = Command::new(tool("dovecot"));
    command.arg("-F").arg("-c").arg(dir.join("dovecot.conf"));
    let ready = [imap, pop3].map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    Daemon::start(name, command, dir.join("daemon.log"), &ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_and_pop3_through_dovecot_fetch_the_stored_message() {
    if !require_tools(&["dovecot", "curl"]) || !require_root() {
        return;
    }
    let work = work_dir();
    let mut imap_cluster = Cluster::new("imap").key("algorithm = \"round-robin\"");
    let mut pop3_cluster = Cluster::new("pop3").key("algorithm = \"round-robin\"");
    let mut daemons = Vec::new();
    for name in ["one", "two"] {
        let dir: PathBuf = work.path().join(name);
        let (imap, pop3) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
        daemons.push(dovecot(&format!("dovecot-{name}"), &dir, imap, pop3));
        imap_cluster = imap_cluster.node(Node::new(name, format!("127.0.0.1:{imap}")));
        pop3_cluster = pop3_cluster.node(Node::new(name, format!("127.0.0.1:{pop3}")));
    }
    let (server, imap) = ConfigText::new()
        .service(Service::new("imap", "imap"))
        .service(Service::new("pop3", "pop3"))
        .cluster(imap_cluster)
        .cluster(pop3_cluster)
        .start()
        .await;
    let pop3 = server.addr_of("pop3").unwrap();

    for (url, what) in [
        (format!("imap://{imap}/INBOX;UID=1"), "IMAP"),
        (format!("pop3://{pop3}/1"), "POP3"),
    ] {
        // Round robin: two fetches, one from each dovecot.
        let mut kept_by = Vec::new();
        for _ in 0..2 {
            let out = run_client({
                let mut c = curl();
                c.args(["--user", "tester:secret"]).arg(&url);
                c
            })
            .await;
            let text = String::from_utf8(out.stdout).unwrap();
            assert!(text.contains("Subject: stored at dovecot-"), "{what} message: {text}");
            let name = if text.contains("The message kept by dovecot-one.") {
                "one"
            } else {
                "two"
            };
            assert!(
                text.contains(&format!("The message kept by dovecot-{name}.")),
                "{what} body: {text}"
            );
            kept_by.push(name);
        }
        kept_by.sort();
        assert_eq!(kept_by, ["one", "two"], "{what} fetched from both dovecots in turn");
    }
    server.shutdown(PATIENCE).await;
    drop(daemons);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_behind_send_proxy_logs_the_clients_own_address() {
    if !require_tools(&["dovecot", "curl"]) || !require_root() {
        return;
    }
    let work = work_dir();
    let dir: PathBuf = work.path().join("proxied");
    let (imap, pop3) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let daemon = dovecot_with("dovecot-proxied", &dir, imap, pop3, true);
    let cluster = Cluster::new("imap")
        .key("send_proxy = \"v2\"")
        .node(Node::new("d", format!("127.0.0.1:{imap}")));
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    let out = run_client({
        let mut c = curl();
        c.args(["--interface", "127.0.0.25", "--user", "tester:secret"])
            .arg(format!("imap://{addr}/INBOX;UID=1"));
        c
    })
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("Subject: stored at dovecot-proxied"));
    let login = daemon
        .log_text()
        .lines()
        .find(|l| l.contains("Login: user=<tester>"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no login in dovecot's log:\n{}", daemon.log_text()));
    assert!(
        login.contains("rip=127.0.0.25"),
        "dovecot saw the client's own address: {login}"
    );
    server.shutdown(PATIENCE).await;
}
