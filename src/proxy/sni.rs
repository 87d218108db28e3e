//! The server name of a TLS client, for `[[service.route]]`: its ClientHello
//! is peeked (never consumed: every byte of it goes to the node as the
//! client sent it), however it is split across TCP segments and TLS
//! records, up to [`MAX_HELLO`] bytes and a timeout.
//!
//! The parse is written here rather than taken from a TLS crate because it
//! must allocate nothing per connection and read only the few fields on the
//! way to the `server_name` extension; it works on two buffers of the
//! worker thread, borrowed only between awaits. Every length is checked
//! against what is there: a hostile ClientHello is "not a name", never a
//! panic.
//!
//! Owns reading the name; never chooses the cluster (that is
//! `config::route_of`), never reads anything but a ClientHello.

use std::cell::RefCell;
use std::io;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::identity::peek;
use crate::config::MAX_SERVER_NAME;

/// The most bytes peeked for a ClientHello; a longer one routes as one
/// without a name.
pub const MAX_HELLO: usize = 16 * 1024;
/// How long a client has to send its whole ClientHello; a slower one
/// routes as one without a name.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A server name read from a ClientHello (lower case as sent: matching
/// ignores case), held without allocating.
pub struct ServerName {
    bytes: [u8; MAX_SERVER_NAME],
    len: usize,
}

impl ServerName {
    pub fn as_str(&self) -> &str {
        // Checked as ASCII host-name bytes when parsed.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

/// What the bytes of a connection's start say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello<'a> {
    /// A ClientHello may still come: more bytes are needed.
    Incomplete,
    /// Not a TLS handshake, or a malformed or oversized one.
    NotTls,
    /// A ClientHello without a server name.
    NoName,
    Name(&'a str),
}

/// A worker's buffers: the peeked bytes, and the handshake reassembled from its records.
struct Buffers {
    raw: Box<[u8]>,
    joined: Box<[u8]>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers {
        raw: vec![0; MAX_HELLO].into_boxed_slice(),
        joined: vec![0; MAX_HELLO].into_boxed_slice(),
    });
}

/// The server name `client`'s ClientHello carries; `None` for a client
/// that sends no ClientHello, or none with a name, within the bounds.
pub async fn server_name(client: &TcpStream) -> Option<ServerName> {
    tokio::time::timeout(HELLO_TIMEOUT, read(client)).await.ok().flatten()
}

async fn read(client: &TcpStream) -> Option<ServerName> {
    loop {
        let ready = client.ready(Interest::READABLE).await.ok()?;
        let outcome = BUFFERS.with_borrow_mut(|Buffers { raw, joined }| {
            let n = match client.try_io(Interest::READABLE, || peek(client, raw)) {
                Ok(0) => return Some(None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(_) => return Some(None),
            };
            match parse(&raw[..n], joined) {
                Hello::Incomplete if n < MAX_HELLO && !ready.is_read_closed() => None,
                Hello::Name(name) => {
                    let mut out = ServerName {
                        bytes: [0; MAX_SERVER_NAME],
                        len: name.len(),
                    };
                    out.bytes[..name.len()].copy_from_slice(name.as_bytes());
                    Some(Some(out))
                }
                _ => Some(None),
            }
        });
        match outcome {
            Some(name) => return name,
            None => {
                // Wait for more bytes: the readiness just seen is spent.
                let _ = client.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
            }
        }
    }
}

/// Reads the bytes of a slice in order, every length checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
    /// A vector with a length prefix of `width` bytes.
    fn vector(&mut self, width: usize) -> Option<Cursor<'a>> {
        let len = match width {
            1 => self.u8()?,
            2 => self.u16()?,
            _ => self.u24()?,
        };
        self.take(len).map(Cursor)
    }
}

/// Parses the start of a connection: the TLS records that hold a
/// ClientHello, their handshake bytes joined into `joined`.
pub fn parse<'j>(bytes: &[u8], joined: &'j mut [u8]) -> Hello<'j> {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    // The handshake message's bytes, gathered from consecutive records.
    let mut have = 0;
    let mut records = Cursor(bytes);
    let mut needed: Option<usize> = None;
    loop {
        if let Some(total) = needed
            && have >= total
        {
            break;
        }
        let Some(header) = records.take(5) else {
            return if needed.is_none() && !looks_like_tls(bytes) {
                Hello::NotTls
            } else {
                Hello::Incomplete
            };
        };
        if header[0] != HANDSHAKE || header[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 + 256 {
            return Hello::NotTls;
        }
        let Some(payload) = records.take(len) else {
            return Hello::Incomplete;
        };
        if have + payload.len() > joined.len() {
            return Hello::NotTls;
        }
        joined[have..have + payload.len()].copy_from_slice(payload);
        have += payload.len();
        if needed.is_none() && have >= 4 {
            if joined[0] != CLIENT_HELLO {
                return Hello::NotTls;
            }
            let body = (usize::from(joined[1]) << 16) | (usize::from(joined[2]) << 8) | usize::from(joined[3]);
            if 4 + body > joined.len() {
                return Hello::NotTls;
            }
            needed = Some(4 + body);
        }
    }
    let total = needed.unwrap_or(have);
    let joined: &'j [u8] = &joined[..total];
    client_hello_name(&joined[4..]).unwrap_or(Hello::NotTls)
}

/// Whether the first bytes could still start a TLS record.
fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [] | [22] | [22, 3, ..])
}

/// The server name of a ClientHello's body; `None` when it is malformed.
fn client_hello_name(body: &[u8]) -> Option<Hello<'_>> {
    const SERVER_NAME: usize = 0;
    const HOST_NAME: usize = 0;
    let mut hello = Cursor(body);
    hello.take(2 + 32)?; // version, random
    hello.vector(1)?; // session id
    hello.vector(2)?; // cipher suites
    hello.vector(1)?; // compression methods
    if hello.0.is_empty() {
        return Some(Hello::NoName);
    }
    let mut extensions = hello.vector(2)?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vector(2)?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut names = data.vector(2)?;
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vector(2)?.0;
            if name_type == HOST_NAME {
                let valid = !name.is_empty()
                    && name.len() <= MAX_SERVER_NAME
                    && name.iter().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(b));
                return Some(match (valid, std::str::from_utf8(name)) {
                    (true, Ok(text)) => Hello::Name(text),
                    _ => Hello::NoName,
                });
            }
        }
        return Some(Hello::NoName);
    }
    Some(Hello::NoName)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello for `name` (none: no server_name extension), as one record.
    pub(crate) fn client_hello(name: Option<&str>) -> Vec<u8> {
        let mut extensions = Vec::new();
        // An extension before SNI, to be skipped.
        extensions.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
        if let Some(name) = name {
            let n = name.len() as u16;
            extensions.extend_from_slice(&[0x00, 0x00]);
            extensions.extend_from_slice(&(n + 5).to_be_bytes());
            extensions.extend_from_slice(&(n + 3).to_be_bytes());
            extensions.push(0);
            extensions.extend_from_slice(&n.to_be_bytes());
            extensions.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
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

    fn name_of(bytes: &[u8]) -> Hello<'static> {
        let joined = Box::leak(vec![0u8; MAX_HELLO].into_boxed_slice());
        parse(bytes, joined)
    }

    #[test]
    fn a_name_is_found_whole_and_every_prefix_is_incomplete() {
        let hello = client_hello(Some("a.test"));
        assert_eq!(name_of(&hello), Hello::Name("a.test"));
        for cut in 0..hello.len() {
            assert_eq!(name_of(&hello[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert_eq!(name_of(&client_hello(None)), Hello::NoName);
    }

    #[test]
    fn a_hello_split_over_two_records_is_joined() {
        let hello = client_hello(Some("split.test"));
        let handshake = &hello[5..];
        let (first, second) = handshake.split_at(20);
        let mut two = Vec::new();
        for part in [first, second] {
            two.extend_from_slice(&[22, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(name_of(&two), Hello::Name("split.test"));
    }

    #[test]
    fn plain_text_and_hostile_lengths_are_not_names() {
        assert_eq!(name_of(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(
            name_of(b"\x16\x03\x01\xff\xff"),
            Hello::NotTls,
            "longer than a record may be"
        );
        assert_eq!(name_of(b"\x16\x03\x01\x00\x00"), Hello::NotTls);
        let mut lying = client_hello(Some("a.test"));
        // The extensions' length says more than there is.
        let at = lying.len() - ("a.test".len() + 9 + 6) - 2;
        lying[at] = 0xff;
        assert!(
            matches!(name_of(&lying), Hello::NotTls | Hello::NoName),
            "{:?}",
            name_of(&lying)
        );
        let mut bad_name = client_hello(Some("a.test"));
        let last = bad_name.len() - 1;
        bad_name[last] = b'/';
        assert_eq!(name_of(&bad_name), Hello::NoName);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, .. Default::default() })]
        #[test]
        fn no_input_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), flip in 0usize..600) {
            let _ = name_of(&bytes);
            let mut hello = client_hello(Some("fuzz.test"));
            if !hello.is_empty() {
                let i = flip % hello.len();
                hello[i] ^= bytes.first().copied().unwrap_or(0xff);
            }
            let _ = name_of(&hello);
            let mut tls = vec![22, 3, 1];
            tls.extend_from_slice(&bytes);
            let _ = name_of(&tls);
        }
    }
}
