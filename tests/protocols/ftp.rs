//! Passive FTP: two vsftpd behind one balancer address. The control port and a
//! port range are listeners of one service; nodes have no port, so each
//! connection goes to the port the client used; the cluster sends a client's
//! data connections to the node of its control connection.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

use crate::common::{
    Cluster, ConfigText, Node, PATIENCE, Server, Service, StartError, ip, random_bytes, require_tools, tool,
};
use crate::{Daemon, chown_to, curl, require_root, run_client, work_dir};

/// How many passive ports the balancer and each vsftpd share.
pub(crate) const PASSIVE_PORTS: u16 = 10;

/// vsftpd in the foreground on `ip:control`, anonymous, uploads allowed in
/// `/pub`, passive only, announcing the balancer's address and `passive` ports.
pub(crate) fn vsftpd(
    name: &str,
    dir: &Path,
    ip: IpAddr,
    control: u16,
    passive: (u16, u16),
    announce: IpAddr,
) -> Daemon {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("pub")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    chown_to(&root.join("pub"), "ftp");
    let d = dir.display();
    let conf = format!(
        "listen=YES\nlisten_ipv6=NO\nlisten_address={ip}\nlisten_port={control}\nbackground=NO\n\
         anonymous_enable=YES\nno_anon_password=YES\nanon_root={d}/root\nftp_username=ftp\n\
         write_enable=YES\nanon_upload_enable=YES\nanon_umask=022\nlocal_enable=NO\n\
         port_enable=NO\npasv_enable=YES\npasv_address={announce}\npasv_min_port={}\npasv_max_port={}\n\
         seccomp_sandbox=NO\nisolate=NO\nisolate_network=NO\nsecure_chroot_dir={d}/empty\n\
         xferlog_enable=NO\nsyslog_enable=NO\nvsftpd_log_file=/dev/stderr\n",
        passive.0, passive.1
    );
    std::fs::write(dir.join("vsftpd.conf"), conf).unwrap();
    let mut command = Command::new(tool("vsftpd"));
    command.arg(dir.join("vsftpd.conf"));
    Daemon::start(name, command, dir.join("daemon.log"), &[SocketAddr::new(ip, control)])
}

/// vsftpd "one" on 127.0.0.2 and "two" on 127.0.0.3, under `work`, on the
/// balancer's `control` port and `passive` range, announcing 127.0.0.1.
pub(crate) fn two_vsftpd(work: &Path, control: u16, passive: (u16, u16)) -> Vec<Daemon> {
    [("one", ip(0, 0, 2)), ("two", ip(0, 0, 3))]
        .iter()
        .map(|(name, node_ip)| {
            vsftpd(
                &format!("vsftpd {name}"),
                &work.join(name),
                *node_ip,
                control,
                passive,
                ip(0, 0, 1),
            )
        })
        .collect()
}

/// curl from `source` uploads `local` to `/pub/` through the balancer's
/// `control` port, then downloads it again into `back`; both in passive
/// mode with PASV (not EPSV), so the announced pasv_address is what it uses.
pub(crate) async fn upload_and_download(control: u16, source: &str, local: &Path, back: &Path) {
    let file = local.file_name().unwrap().to_string_lossy();
    let url = format!("ftp://127.0.0.1:{control}/pub/{file}");
    run_client({
        let mut c = curl();
        c.args(["--disable-epsv", "--interface", source, "--upload-file"])
            .arg(local)
            .arg(&url);
        c
    })
    .await;
    run_client({
        let mut c = curl();
        c.args(["--disable-epsv", "--interface", source, "--output"])
            .arg(back)
            .arg(&url);
        c
    })
    .await;
}

/// Starts the balancer on a control port and a passive range below the
/// kernel's ephemeral ports, trying other ports while some are taken.
pub(crate) async fn start_balancer(cluster: &str) -> (Server, u16, (u16, u16)) {
    for _ in 0..20 {
        let control = fastrand::u16(20_000..32_000);
        let low = control + 1;
        let high = low + PASSIVE_PORTS - 1;
        let (control_port, passive_ports) = (format!("127.0.0.1:{control}"), format!("127.0.0.1:{low}-{high}"));
        let config = ConfigText::new()
            .service(Service::new("ftp", "ftp").listen(&[&control_port, &passive_ports]))
            .cluster(
                Cluster::new("ftp")
                    .key(cluster)
                    .node(Node::new("one", "127.0.0.2"))
                    .node(Node::new("two", "127.0.0.3")),
            );
        match config.try_start().await {
            Ok(server) => return (server, control, (low, high)),
            Err(StartError::Bind { .. }) => continue,
            Err(e) => panic!("balancer does not start: {e}"),
        }
    }
    panic!("no free control port and passive range found in 20 tries");
}

/// Uploads and downloads through the balancer from several client addresses
/// until both vsftpd have served; every file comes back byte-identical, and
/// no data connection ever went to the wrong node first.
async fn passive_ftp_through_two_vsftpd(cluster: &str) {
    if !require_tools(&["vsftpd", "curl"]) || !require_root() {
        return;
    }
    let work = work_dir();
    let (server, control, passive) = start_balancer(cluster).await;
    let nodes = [("one", ip(0, 0, 2)), ("two", ip(0, 0, 3))];
    let _daemons = two_vsftpd(work.path(), control, passive);

    let mut served = [0usize; 2];
    for client in 10..30u8 {
        let source = ip(0, 0, client).to_string();
        let sent = random_bytes(256 * 1024 + usize::from(client));
        let file = format!("up-{client}.bin");
        let local = work.path().join(&file);
        std::fs::write(&local, &sent).unwrap();
        let back = work.path().join(format!("back-{client}.bin"));
        upload_and_download(control, &source, &local, &back).await;
        let got = std::fs::read(&back).unwrap();
        assert!(
            got == sent,
            "download of {file} differs from the upload ({} of {} bytes)",
            got.len(),
            sent.len()
        );
        let holders: Vec<usize> = (0..2)
            .filter(|&i| work.path().join(nodes[i].0).join("root/pub").join(&file).exists())
            .collect();
        assert_eq!(holders.len(), 1, "{file} was stored by exactly one vsftpd: {holders:?}");
        served[holders[0]] += 1;
        if served.iter().all(|&n| n > 0) {
            break;
        }
    }
    assert!(served.iter().all(|&n| n > 0), "both vsftpd served clients: {served:?}");

    let snapshot = server.snapshot();
    for node in &snapshot.clusters["ftp"].nodes {
        assert_eq!(
            node.figures.connect_failures(),
            0,
            "node {}: a data connection was sent to a node without the session",
            node.name
        );
    }
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ftp_with_ip_hash() {
    passive_ftp_through_two_vsftpd("algorithm = \"ip-hash\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ftp_with_round_robin_and_affinity() {
    passive_ftp_through_two_vsftpd("algorithm = \"round-robin\"\naffinity = true").await;
}
