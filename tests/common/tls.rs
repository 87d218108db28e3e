//! TLS for tests: self-signed certificates for real servers, made with
//! `openssl req` (Debian's, from scripts/test-deps.txt) in the test's own
//! directory, valid for a day; and ClientHellos of the tests' own encoder.

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

/// A ClientHello naming `name` (none: no server_name extension), with
/// `padding` extra extensions before it, as one TLS record: the test's own
/// encoder, written from RFC 8446 §4.1.2, not the balancer's parser.
pub fn client_hello(name: Option<&str>, padding: usize) -> Vec<u8> {
    let mut extensions = Vec::new();
    for i in 0..padding {
        extensions.extend_from_slice(&(0x7a00 + i as u16).to_be_bytes());
        extensions.extend_from_slice(&[0, 1, 0]);
    }
    if let Some(name) = name {
        let n = name.len() as u16;
        extensions.extend_from_slice(&[0, 0]);
        extensions.extend_from_slice(&(n + 5).to_be_bytes());
        extensions.extend_from_slice(&(n + 3).to_be_bytes());
        extensions.push(0);
        extensions.extend_from_slice(&n.to_be_bytes());
        extensions.extend_from_slice(name.as_bytes());
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x42; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}
