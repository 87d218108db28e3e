//! Certificates for tests that speak TLS to real servers: self-signed, made
//! with `openssl req` (Debian's, from scripts/test-deps.txt) in the test's
//! own directory, valid for a day.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::tool;

/// A self-signed certificate and its key in `dir`, for `subject` and the
/// subject alternative names `sans` (`"DNS:a.test"`, `"IP:127.0.0.1"`).
pub fn self_signed(dir: &Path, subject: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new(tool("openssl"))
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"])
        .arg("-subj")
        .arg(format!("/CN={subject}"))
        .arg("-addext")
        .arg(format!("subjectAltName={}", sans.join(",")))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "openssl made a certificate for {subject}");
    (cert, key)
}
