//! The wire of an upgrade in place: what the running process tells the
//! process that replaces it, and the descriptors that go with it. Each
//! message is one serde-encoded (JSON), versioned record of a
//! `SOCK_SEQPACKET` socket pair, so records never split or merge, and a
//! record's descriptors travel with it (`SCM_RIGHTS`). The new process
//! finds its end in the environment (`PROTOBALANCE_UPGRADE_FD`).
//!
//! Framing, encoding and descriptor passing only: what each side does with
//! a message is `server::upgrade`'s. The calls block: run them off the
//! runtime (a thread of their own, or `spawn_blocking`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};

use super::state::Override;
use crate::config::NodeState;
use crate::model::{ConnectionState, NodeCounters};

/// The protocol's version: a new process that speaks another refuses.
pub const VERSION: u32 = 1;

/// The environment variable naming the new process's end of the channel.
pub const CHANNEL_ENV: &str = "PROTOBALANCE_UPGRADE_FD";

/// The largest record: state is sent in pieces well below it.
const MAX_RECORD: usize = 256 * 1024;
/// The most descriptors one record carries (a listener's sockets).
const MAX_FDS: usize = 253;

/// One record of the hand-over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Old → new, first: the protocol version and the old process.
    Hello { version: u32, pid: u32 },
    /// Old → new: the admin API's listening socket (attached), and where it listens.
    Admin { listen: String },
    /// Old → new: the listening sockets of one listener (as many as `sockets`, attached).
    Listener {
        service: String,
        /// As the file names it: port 0 stays 0.
        configured: SocketAddr,
        sockets: usize,
    },
    /// Old → new: the run-time overrides in force.
    Overrides {
        node_states: Vec<(String, String, Override<NodeState>)>,
        redirects: Vec<(String, Override<String>)>,
    },
    /// Old → new: a node's counters so far, which go on in the new process.
    Figures(NodeRecord),
    /// Old → new: the state is complete; the new process may start.
    StateDone,
    /// New → old: serving on every listener.
    Ready { pid: u32 },
    /// New → old: it cannot start, and why.
    Failed { reason: String },
    /// Old → new: pins made or seen since the old process closed the pin file.
    Pins(Vec<PinRecord>),
    /// Old → new: one established connection; its client and node sockets
    /// are attached, in that order.
    Connection(ConnectionState),
    /// Old → new, last: `cut` connections could not be handed over.
    Done { cut: usize },
}

/// A node's identity and its counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub cluster: String,
    pub node: String,
    /// The node's address as the file wrote it (its identity with the name).
    pub address: String,
    pub counters: NodeCounters,
    pub available: bool,
}

/// A client's pin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinRecord {
    pub cluster: String,
    pub client: IpAddr,
    /// `None`: the pin went.
    pub node: Option<String>,
    pub last_seen_ms: u64,
}

/// One end of the hand-over channel.
pub struct Channel {
    socket: UnixStream,
}

impl Channel {
    /// A connected pair: this process's end, and the end for the new
    /// process, which it inherits (no close-on-exec).
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (ours, theirs) = socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
        for socket in [&ours, &theirs] {
            socket.set_send_buffer_size(4 * MAX_RECORD)?;
            socket.set_recv_buffer_size(4 * MAX_RECORD)?;
        }
        theirs.set_cloexec(false)?;
        Ok((Channel::from_fd(ours.into()), theirs.into()))
    }

    /// The new process's end, when it was started by an upgrade.
    pub fn from_env() -> Option<io::Result<Channel>> {
        let value = std::env::var(CHANNEL_ENV).ok()?;
        let Ok(fd) = value.parse::<RawFd>() else {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{CHANNEL_ENV}={value:?} is not a descriptor"),
            )));
        };
        // SAFETY: F_GETFD on any number is safe: it only says whether it is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Some(Err(io::Error::last_os_error()));
        }
        // SAFETY: the old process put its end of the pair at `fd` for us, and
        // nothing else in this process uses that descriptor.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = socket2::Socket::from(owned);
        if let Err(e) = socket.set_cloexec(true) {
            return Some(Err(e));
        }
        Some(Ok(Channel::from_fd(socket.into())))
    }

    fn from_fd(fd: OwnedFd) -> Channel {
        Channel {
            socket: UnixStream::from(fd),
        }
    }

    /// Bounds every later `recv` (`None`: wait for ever).
    pub fn set_recv_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(timeout)
    }

    /// Sends `message` with `fds` attached.
    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        if bytes.len() > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "hand-over record too large",
            ));
        }
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many descriptors for one record",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = self.socket.send_with_fd(&bytes, &raw)?;
        if sent != bytes.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "hand-over record cut short"));
        }
        Ok(())
    }

    /// The next message and its descriptors (close-on-exec); `None` once the
    /// other process has closed its end.
    pub fn recv(&self) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut bytes = vec![0u8; MAX_RECORD];
        let mut raw = [-1 as RawFd; MAX_FDS];
        let (len, count) = self.socket.recv_with_fd(&mut bytes, &mut raw)?;
        // SAFETY: recvmsg gave this process these `count` new descriptors.
        let fds: Vec<OwnedFd> = raw[..count]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        for fd in &fds {
            socket2::SockRef::from(fd).set_cloexec(true)?;
        }
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        let message = serde_json::from_slice(&bytes[..len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad hand-over record: {e}")))?;
        Ok(Some((message, fds)))
    }

    /// Gives up the descriptor (for a child that inherits it as a number).
    pub fn into_fd(self) -> RawFd {
        self.socket.into_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn records_keep_their_bounds_and_their_descriptors() {
        let (old, theirs) = Channel::pair().unwrap();
        let new = Channel::from_fd(theirs);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = Message::Hello {
            version: VERSION,
            pid: 7,
        };
        let l = Message::Listener {
            service: "web".into(),
            configured: "127.0.0.1:0".parse().unwrap(),
            sockets: 1,
        };
        old.send(&hello, &[]).unwrap();
        old.send(&l, &[listener.as_fd()]).unwrap();
        drop(old);
        let (first, none) = new.recv().unwrap().unwrap();
        assert_eq!((first, none.len()), (hello, 0));
        let (second, fds) = new.recv().unwrap().unwrap();
        assert_eq!(second, l);
        assert_eq!(fds.len(), 1);
        let passed = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(passed.local_addr().unwrap(), addr, "the very socket");
        assert!(new.recv().unwrap().is_none(), "closed");
    }
}
