//! The Debian package, built by `packaging/build-deb` (cargo-deb, with the man
//! page and completions generated from the binary): what it holds, and, as
//! root, that installing it creates the service user and a config that
//! `check` accepts, and that systemd accepts its unit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the package from the test build (`PROFILE=dev`); its path.
fn build_package() -> PathBuf {
    let out = Command::new(repo().join("packaging/build-deb"))
        .env("PROFILE", "dev")
        .current_dir(repo())
        .output()
        .expect("packaging/build-deb runs");
    assert!(
        out.status.success(),
        "packaging/build-deb failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = env!("CARGO_PKG_VERSION");
    let deb = repo().join(format!("target/debian/protobalance_{version}-1_amd64.deb"));
    assert!(deb.is_file(), "no {}", deb.display());
    deb
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn succeeds(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_package_installs_the_service_with_its_user_unit_and_man_page() {
    if !require_tools(&["cargo-deb", "dpkg-deb"]) {
        return;
    }
    let deb = build_package();
    let deb = deb.to_str().unwrap();
    let contents = succeeds("dpkg-deb", &["--contents", deb]);
    for path in [
        "./usr/bin/protobalance",
        "./lib/systemd/system/protobalance.service",
        "./etc/protobalance/protobalance.toml",
        "./usr/share/man/man1/protobalance.1.gz",
        "./usr/share/bash-completion/completions/protobalance",
        "./usr/share/zsh/vendor-completions/_protobalance",
        "./usr/share/fish/vendor_completions.d/protobalance.fish",
        "./usr/share/doc/protobalance/configuration.md",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} is not in the package:\n{contents}"
        );
    }
    let conffiles = succeeds(
        "sh",
        &["-c", &format!("dpkg-deb --ctrl-tarfile {deb} | tar -xO ./conffiles")],
    );
    assert_eq!(
        conffiles.trim(),
        "/etc/protobalance/protobalance.toml",
        "the config is a conffile"
    );

    // Installing changes the machine: only as root (CI's case), and undone at the end.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("installing the package needs root");
        return;
    }
    if !require_tools(&["systemd-analyze"]) {
        return;
    }
    let _purge = Purge;
    succeeds("dpkg", &["-i", deb]);
    let user = succeeds("getent", &["passwd", "protobalance"]);
    assert!(user.starts_with("protobalance:"), "{user}");
    let checked = succeeds(
        "/usr/bin/protobalance",
        &["check", "-c", "/etc/protobalance/protobalance.toml"],
    );
    assert!(checked.contains("ok: 1 service(s)"), "{checked}");
    let man = succeeds("sh", &["-c", "gzip -dc /usr/share/man/man1/protobalance.1.gz"]);
    assert!(man.contains(".TH protobalance"), "{}", &man[..man.len().min(300)]);
    // systemd's own reading of the unit: unknown keys, bad values, a missing binary.
    let verify = run(
        "systemd-analyze",
        &["verify", "/lib/systemd/system/protobalance.service"],
    );
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !said.contains("protobalance.service:"),
        "systemd-analyze verify:\n{said}"
    );
}

/// Removes the package (and, through its postrm, the user) when dropped.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "protobalance"]).output();
    }
}
