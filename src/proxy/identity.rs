//! Who the client is, across balancers: the PROXY protocol header written
//! first to a node (`send_proxy`), the header read from an upstream balancer
//! (`accept_proxy_from`), and the local address a node connection is bound
//! to (`source`). The header's codec is the `ppp` crate's; this module only
//! decides what goes in and how much of a hostile client it reads. Never
//! parses the bytes of a client outside `accept_proxy_from`.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v2::{Builder, Command, Protocol, Version};
use ppp::{HeaderResult, PartialResult};
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};

use crate::config::{ProxyHeader, Source};

/// The longest header read from an upstream balancer. A v1 header is at
/// most 107 bytes; v2 allows 64 KiB of TLVs, which no balancer sends to
/// name a TCP client (HAProxy's own limit is its buffer): past this the
/// header is refused as oversized.
pub const MAX_HEADER: usize = 1024;

/// The header `kind` that tells a node the connection came from `client` to
/// `to` (the address the client connected to). Mixed families (an IPv4
/// client reaching an IPv6 listener, or the reverse) are written as IPv6,
/// the IPv4 side mapped.
pub fn header(kind: ProxyHeader, client: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let (client, to) = same_family(client, to);
    match kind {
        ProxyHeader::None => Vec::new(),
        ProxyHeader::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                to.ip(),
                client.port(),
                to.port()
            )
            .into_bytes()
        }
        ProxyHeader::V2 => Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (client, to))
            .build()
            .expect("a v2 header of two socket addresses fits in memory"),
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a.is_ipv4() == b.is_ipv4() {
        return (a, b);
    }
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    (v6(a), v6(b))
}

/// What an upstream balancer's header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// A proxied client: its address, and the address it connected to.
    Client { client: SocketAddr, to: SocketAddr },
    /// `LOCAL` (v2) or `UNKNOWN` (v1): the upstream's own connection, to be
    /// treated as coming from the socket's own peer.
    Own,
}

/// Why an upstream balancer's header was refused.
#[derive(Debug)]
pub enum HeaderError {
    /// The bytes are not a PROXY header (or a malformed one).
    Malformed(String),
    /// Longer than [`MAX_HEADER`] without being complete.
    Oversized,
    /// The client closed before the header was complete.
    Truncated,
    /// Not complete within `accept_proxy_timeout`.
    Timeout(Duration),
    Io(io::Error),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Malformed(why) => write!(f, "not a valid PROXY header ({why})"),
            HeaderError::Oversized => write!(f, "PROXY header longer than {MAX_HEADER} bytes"),
            HeaderError::Truncated => f.write_str("closed before its PROXY header was complete"),
            HeaderError::Timeout(t) => write!(f, "no complete PROXY header within {t:?}"),
            HeaderError::Io(e) => write!(f, "error while reading its PROXY header: {e}"),
        }
    }
}

/// Reads the PROXY header that `client` must start with, within `timeout`,
/// consuming exactly the header: the bytes after it stay in the socket for
/// the node. The bytes are peeked until the header is complete, so nothing
/// of what follows is read here, however the header was split.
pub async fn take_header(client: &TcpStream, timeout: Duration) -> Result<Carried, HeaderError> {
    match tokio::time::timeout(timeout, read_header(client)).await {
        Ok(result) => result,
        Err(_) => Err(HeaderError::Timeout(timeout)),
    }
}

async fn read_header(client: &TcpStream) -> Result<Carried, HeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let ready = client.ready(Interest::READABLE).await.map_err(HeaderError::Io)?;
        let peeked = client.try_io(Interest::READABLE, || peek(client, &mut buf));
        let n = match peeked {
            Ok(0) => return Err(HeaderError::Truncated),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(HeaderError::Io(e)),
        };
        let parsed = HeaderResult::parse(&buf[..n]);
        if parsed.is_incomplete() {
            if n == MAX_HEADER {
                return Err(HeaderError::Oversized);
            }
            if ready.is_read_closed() {
                return Err(HeaderError::Truncated);
            }
            // Wait for more bytes: the readiness just seen is spent (tokio
            // keeps any that arrived since, so none is lost).
            let _ = client.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
            continue;
        }
        let (length, carried) = decode(parsed)?;
        // The header's bytes are queued already (peeked above): take them,
        // and nothing after them.
        let mut taken = 0;
        while taken < length {
            client.readable().await.map_err(HeaderError::Io)?;
            match client.try_read(&mut buf[taken..length]) {
                Ok(0) => return Err(HeaderError::Truncated),
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(HeaderError::Io(e)),
            }
        }
        return Ok(carried);
    }
}

/// A peek of the socket's queued bytes, without taking them.
pub(super) fn peek(client: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let socket = socket2::SockRef::from(client);
    // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout, and recv
    // only writes initialised bytes into the buffer.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    socket.peek(uninit)
}

/// The length of a complete header and what it carries.
fn decode(parsed: HeaderResult<'_>) -> Result<(usize, Carried), HeaderError> {
    match parsed {
        HeaderResult::V1(Ok(h)) => {
            let carried = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Carried::Client {
                    client: SocketAddr::new(a.source_address.into(), a.source_port),
                    to: SocketAddr::new(a.destination_address.into(), a.destination_port),
                },
                ppp::v1::Addresses::Tcp6(a) => Carried::Client {
                    client: SocketAddr::new(a.source_address.into(), a.source_port),
                    to: SocketAddr::new(a.destination_address.into(), a.destination_port),
                },
                ppp::v1::Addresses::Unknown => Carried::Own,
            };
            Ok((h.header.len(), carried))
        }
        HeaderResult::V2(Ok(h)) => {
            // TLVs are skipped: their bytes are part of `len()`.
            let carried = match (h.command, h.addresses) {
                (Command::Local, _) => Carried::Own,
                (Command::Proxy, ppp::v2::Addresses::IPv4(a)) => Carried::Client {
                    client: SocketAddr::new(a.source_address.into(), a.source_port),
                    to: SocketAddr::new(a.destination_address.into(), a.destination_port),
                },
                (Command::Proxy, ppp::v2::Addresses::IPv6(a)) => Carried::Client {
                    client: SocketAddr::new(a.source_address.into(), a.source_port),
                    to: SocketAddr::new(a.destination_address.into(), a.destination_port),
                },
                // UNIX or unspecified families name no TCP client.
                (Command::Proxy, _) => Carried::Own,
            };
            Ok((h.len(), carried))
        }
        HeaderResult::V1(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
    }
}

/// A socket for a connection to a node at `target`, bound as `source` says
/// for a client at `client`. `None`: the kernel's choice (a plain connect).
/// A transparent bind to a client of the other address family than the
/// node's cannot be made: that connection goes from the kernel's address.
pub fn bound_socket(source: Source, client: IpAddr, target: SocketAddr) -> io::Result<Option<TcpSocket>> {
    let (ip, transparent) = match source {
        Source::Kernel => return Ok(None),
        Source::Address(ip) => (ip, false),
        Source::Client => (crate::config::canonical(client), true),
    };
    if ip.is_ipv4() != target.is_ipv4() {
        return Ok(None);
    }
    let domain = if target.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    if transparent {
        set_transparent(&socket, target.is_ipv4())?;
    }
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    Ok(Some(TcpSocket::from_std_stream(socket.into())))
}

/// `IP_TRANSPARENT` / `IPV6_TRANSPARENT`: lets a socket bind to an address
/// that is not local (the client's). Needs `CAP_NET_ADMIN`.
pub fn set_transparent(socket: &socket2::Socket, ipv4: bool) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if ipv4 {
            socket.set_ip_transparent_v4(true)
        } else {
            socket.set_ip_transparent_v6(true)
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, ipv4);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "transparent source needs Linux",
        ))
    }
}

/// Whether this process may make the transparent connections `config`
/// asks for (`source = "client"`): a probe socket with `IP_TRANSPARENT`, so
/// that `check` and the start say what is missing instead of every client
/// being refused later.
pub fn transparent_is_possible(config: &crate::config::Config) -> Result<(), String> {
    let Some(cluster) = config.clusters.iter().find(|c| c.source == Source::Client) else {
        return Ok(());
    };
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|socket| set_transparent(&socket, true));
    probe.map_err(|e| {
        format!(
            "cluster \"{}\": source = \"client\" needs CAP_NET_ADMIN (IP_TRANSPARENT: {e}), and the \
             routing of docs/deployments.md \"Transparent source\"",
            cluster.name
        )
    })?;
    for cluster in config.clusters.iter().filter(|c| c.source == Source::Client) {
        for node in &cluster.nodes {
            // A UDP connect sends nothing: it only asks the kernel for a route.
            let target = node.address.target(9);
            let unspecified: SocketAddr = if target.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let route = std::net::UdpSocket::bind(unspecified).and_then(|s| s.connect(target));
            if let Err(e) = route {
                return Err(format!(
                    "cluster \"{}\" node \"{}\": no route from the balancer to {} ({e}): with source = \
                     \"client\" the node's replies must come back through the balancer (docs/deployments.md \
                     \"Transparent source\")",
                    cluster.name,
                    node.name,
                    target.ip()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn headers_carry_the_client_and_the_address_it_reached() {
        let (client, to) = (addr("192.0.2.7:40000"), addr("198.51.100.1:443"));
        let v1 = header(ProxyHeader::V1, client, to);
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n");
        for kind in [ProxyHeader::V1, ProxyHeader::V2] {
            let bytes = header(kind, client, to);
            let (len, carried) = decode(HeaderResult::parse(&bytes)).unwrap();
            assert_eq!(len, bytes.len());
            assert_eq!(carried, Carried::Client { client, to });
        }
        assert!(header(ProxyHeader::None, client, to).is_empty());
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let bytes = header(ProxyHeader::V2, addr("192.0.2.7:1"), addr("[2001:db8::1]:2"));
        let (_, carried) = decode(HeaderResult::parse(&bytes)).unwrap();
        let Carried::Client { client, .. } = carried else {
            panic!("{carried:?}")
        };
        assert_eq!(client, addr("[::ffff:192.0.2.7]:1"));
    }

    #[test]
    fn a_local_header_means_the_connection_is_its_own() {
        let bytes = crate::health::probe::local_header();
        assert_eq!(decode(HeaderResult::parse(&bytes)).unwrap(), (16, Carried::Own));
    }

    #[test]
    fn what_is_no_header_is_refused() {
        assert!(decode(HeaderResult::parse(b"GET / HTTP/1.1\r\n\r\n")).is_err());
        assert!(HeaderResult::parse(b"PROXY TCP4 1.2").is_incomplete());
        assert!(HeaderResult::parse(&crate::health::probe::local_header()[..10]).is_incomplete());
    }
}
