//! Small real backends on 127.0.0.1: a handler per connection ([`serve`]),
//! the usual ones (name, echo, holding), a [`Backend`] that can be killed and
//! restarted on its address, and addresses that refuse or never answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// A backend on a free loopback port running `handler` for every connection
/// (TCP_NODELAY set, as a real server would for request/response traffic).
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(handler(stream));
        }
    });
    addr
}

/// A backend that sends its name to every client, then closes.
pub async fn name_backend(name: &'static str) -> SocketAddr {
    serve(move |mut s| async move {
        let _ = s.write_all(name.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// A backend that echoes everything back and half-closes after the client does.
pub async fn echo_backend() -> SocketAddr {
    serve(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A backend that greets with "hi" and then holds the connection until the client closes.
pub async fn holding_backend() -> SocketAddr {
    serve(|mut s| async move {
        let _ = s.write_all(b"hi").await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await
}

/// Runs `f` on a runtime that lives as long as the test process: how a test
/// without a runtime of its own starts the backends above.
pub fn blocking<F: Future>(f: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
        })
        .block_on(f)
}

/// An address on which nothing listens (bound, then released): connecting is refused.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A listener that never accepts, its accept queue already full: a connect to
/// it gets no answer at all (the kernel drops the SYN). Keep the returned
/// sockets alive as long as the address is used.
pub fn never_accepts() -> (SocketAddr, Vec<socket2::Socket>) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut keep = vec![listener];
    for _ in 0..16 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        match s.connect_timeout(&addr.into(), Duration::from_millis(300)) {
            Ok(()) => keep.push(s),
            Err(_) => return (addr, keep), // this one got no answer: the queue is full
        }
    }
    panic!("the accept queue of a backlog-0 listener never filled");
}

/// How a [`Backend`] treats each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Waits for the client's first bytes, answers "NAME\n" followed by them,
    /// then echoes everything.
    Echo,
    /// Sends its name and closes.
    Name,
    /// Accepts and closes at once, reading nothing.
    CloseAtOnce,
    /// Reads the client's first bytes and closes without a word.
    ReadAndClose,
    /// Resets the connection (RST) as soon as the client's bytes arrive, unread.
    ResetOnData,
    /// Reads until the client's EOF, then answers "NAME got N bytes".
    AnswerAfterEof,
    /// Greets "220 NAME\r\n" first, then echoes.
    Greet,
    /// Greets "220 NAME\r\n" and closes.
    GreetAndClose,
}

/// A backend listening on 127.0.0.1. Dropping it (or [`Backend::kill`]) closes
/// its listener and every connection it holds.
pub struct Backend {
    pub addr: SocketAddr,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    /// The listener's descriptor, owned by `task`.
    listener: std::os::fd::RawFd,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str, behaviour: Behaviour) -> Backend {
        Backend::start_on(name, behaviour, "127.0.0.1:0".parse().unwrap()).await
    }

    /// On `addr`, which may be the address of a backend killed a moment ago.
    pub async fn start_on(name: &str, behaviour: Behaviour, addr: SocketAddr) -> Backend {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(128).unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let task = tokio::spawn(run_backend(listener, name.to_string(), behaviour, open.clone()));
        Backend {
            addr,
            open,
            listener: fd,
            task,
        }
    }

    /// Closes the listener and every open connection, as a crash would; when
    /// it returns, connecting to the address is refused.
    pub async fn kill(mut self) -> SocketAddr {
        // Closing the descriptor is not enough: a process that another test
        // forks meanwhile holds a copy of it until it execs, and the socket
        // listens on as long as a copy is open. Shutting a listening socket
        // down ends its listening state for every copy at once.
        // SAFETY: the task owns the descriptor and is still alive (not yet
        // aborted), so the number still names the listener.
        let listener = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.listener) };
        socket2::SockRef::from(&listener)
            .shutdown(std::net::Shutdown::Read)
            .expect("shutting the listener down");
        self.task.abort();
        let _ = (&mut self.task).await;
        self.addr
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_backend(listener: TcpListener, name: String, behaviour: Behaviour, open: Arc<AtomicUsize>) {
    let mut connections = JoinSet::new();
    loop {
        // An error ends the backend: after a kill's shutdown every accept fails.
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let name = name.clone();
        let open = open.clone();
        open.fetch_add(1, SeqCst);
        connections.spawn(async move {
            let _ = answer(&mut stream, &name, behaviour).await;
            open.fetch_sub(1, SeqCst);
        });
    }
}

async fn answer(stream: &mut TcpStream, name: &str, behaviour: Behaviour) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    match behaviour {
        Behaviour::CloseAtOnce => return Ok(()),
        Behaviour::Name => {
            stream.write_all(name.as_bytes()).await?;
            return stream.shutdown().await;
        }
        Behaviour::ResetOnData => {
            stream.readable().await?;
            socket2::SockRef::from(&*stream).set_linger(Some(Duration::ZERO))?;
            return Ok(());
        }
        Behaviour::AnswerAfterEof => {
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await?;
            stream
                .write_all(format!("{name} got {} bytes", got.len()).as_bytes())
                .await?;
            return Ok(());
        }
        Behaviour::ReadAndClose => {
            let _first_bytes = stream.read(&mut buf).await?;
            return Ok(());
        }
        Behaviour::GreetAndClose => {
            stream.write_all(format!("220 {name}\r\n").as_bytes()).await?;
            return Ok(());
        }
        Behaviour::Greet => stream.write_all(format!("220 {name}\r\n").as_bytes()).await?,
        Behaviour::Echo => {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            stream.write_all(format!("{name}\n").as_bytes()).await?;
            stream.write_all(&buf[..n]).await?;
        }
    }
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
