//! The data plane's threads: a fixed set of workers, each running its own
//! single-threaded tokio runtime (thread per core).
//!
//! Every listener is opened once per worker, as a group of `SO_REUSEPORT`
//! sockets on the same address: the kernel spreads new clients over the
//! group, and a worker accepts, connects and pumps its clients itself, from
//! start to end. No task ever moves between threads, so there are no
//! cross-thread wake-ups, no work-stealing queues and no futex traffic on the
//! connection path (measured in docs/performance.md).
//!
//! The price: a worker busy with one heavy client delays the other clients
//! the kernel handed to it, where a work-stealing pool would let an idle
//! thread take them. The connection path never blocks, so this only matters
//! under uneven CPU-bound load; NGINX (`reuseport`) makes the same choice.
//! Clients not yet accepted are shared, though: each worker also accepts
//! from its neighbour's socket of the group ([`share_with_neighbours`]), so
//! the kernel's hash, which queues new clients on busy and idle workers
//! alike, no longer leaves a worker idle while its neighbour's queue waits.
//!
//! The control plane (admin API, health probes, the affinity flusher, signals)
//! runs on the caller's runtime, not on the workers.
//!
//! With `pin_workers` (off by default), each worker is pinned to a CPU of its
//! own and every listener group gets a classic BPF program that hands a new
//! client to the worker on the CPU where its SYN was processed: the client's
//! packets, its worker and the worker's wake-ups then stay on one core. Off by
//! default because the kernel can no longer move a busy worker to an idle
//! core, and because clients then spread only as widely as the CPUs that take
//! the network card's interrupts (docs/configuration.md, measured in
//! docs/performance.md).
//!
//! With `busy_poll` (off by default), a worker keeps polling for events for a
//! window after its work instead of sleeping (`proxy::busy_poll`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::model::Padded;

/// How long a worker's spare buffer or pipe may sit unused before it goes:
/// after a load, the pools' peak is given back within two of these.
const SHED_EVERY: Duration = Duration::from_secs(5);

/// Sheds the worker's spares that sat unused through a [`SHED_EVERY`], for
/// the worker's life.
async fn shed_idle_spares() {
    let mut tick = tokio::time::interval(SHED_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let shed = super::channel::shed_idle_spares() + super::connect::shed_idle_spares();
        if shed > 0 {
            tracing::debug!("dropped {shed} spare buffer(s) or pipe(s) unused for {SHED_EVERY:?}");
        }
    }
}

/// The running workers. Dropping this stops them: their runtimes end, and with
/// them any task still running there.
pub struct Workers {
    handles: Vec<Handle>,
    /// The CPU each worker is pinned to, where new clients are steered by CPU.
    steering: Option<Vec<usize>>,
    /// Clients each worker has accepted.
    accepted: Arc<[Padded<AtomicU64>]>,
    stop: CancellationToken,
    /// One per worker, closed when its thread has ended (its log lines handed over).
    ended: std::sync::Mutex<Vec<oneshot::Receiver<()>>>,
}

impl Workers {
    /// Starts `count` worker threads (0: one per CPU), each pinned to a CPU of
    /// its own where `pin` is set, each polling for `busy_poll` after its work
    /// before it sleeps where that is set.
    pub fn start(count: usize, pin: bool, busy_poll: Option<Duration>) -> io::Result<Workers> {
        let count = if count == 0 {
            crate::model::worker_slots()
        } else {
            count
        };
        // The CPUs this process may run on (its affinity mask, which taskset
        // and cgroup cpusets narrow); worker i takes the i-th, wrapping round
        // when there are more workers than CPUs.
        let allowed = if pin { allowed_cpus() } else { Vec::new() };
        // Each pinned worker reports whether its pinning worked. (Nothing of
        // this runs without `pin`: code that runs at start costs resident pages.)
        let (pinned_tx, pinned_rx) = if allowed.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            (Some(tx), Some(rx))
        };
        let stop = CancellationToken::new();
        // Each worker says it runs, so that once `start` returns every thread
        // exists under its name (`/proc/PID/task/*/comm`, `top -H`).
        let (running_tx, running_rx) = std::sync::mpsc::channel::<()>();
        let mut handles = Vec::with_capacity(count);
        let mut ended = Vec::with_capacity(count);
        for i in 0..count {
            let pin_to = pinned_tx.clone().map(|report| (allowed[i % allowed.len()], report));
            let mut builder = tokio::runtime::Builder::new_current_thread();
            if busy_poll.is_some() {
                builder.on_thread_unpark(super::busy_poll::after_unpark);
            }
            let runtime = builder.enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stopped = stop.clone();
            let (end, ended_rx) = oneshot::channel::<()>();
            ended.push(ended_rx);
            let running = running_tx.clone();
            let started = thread::Builder::new()
                .name(format!("protobalance-w{i}"))
                .spawn(move || {
                    let _ = running.send(());
                    if let Some((cpu, report)) = pin_to {
                        // Err: start() has given up already.
                        let _ = report.send(pin_this_thread(cpu));
                    }
                    crate::logging::batch_this_thread();
                    crate::model::bind_worker_slot(i);
                    runtime.spawn(shed_idle_spares());
                    match busy_poll {
                        None => runtime.block_on(stopped.cancelled()),
                        Some(window) => runtime.block_on(async {
                            tokio::select! {
                                _ = stopped.cancelled() => {}
                                _ = super::busy_poll::spin(window) => {}
                            }
                        }),
                    }
                    drop(runtime);
                    crate::logging::flush_thread();
                    drop(end);
                });
            if let Err(e) = started {
                stop.cancel();
                return Err(e);
            }
        }
        drop(pinned_tx);
        drop(running_tx);
        for _ in 0..count {
            // Err: a worker died before it ran; it is reported when stopped.
            let _ = running_rx.recv();
        }
        if let Some(window) = busy_poll {
            tracing::info!("busy_poll: each worker keeps polling for events {window:?} after its last work");
        }
        let steering = if pin {
            steering_after_pinning(count, allowed, pinned_rx)
        } else {
            None
        };
        Ok(Workers {
            handles,
            steering,
            accepted: (0..count).map(|_| Padded::default()).collect(),
            stop,
            ended: std::sync::Mutex::new(ended),
        })
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The CPU of each worker, where listeners steer new clients by CPU.
    pub fn steering(&self) -> Option<&[usize]> {
        self.steering.as_deref()
    }

    /// Worker `i`'s runtime figures: its tasks alive are its load, for a
    /// neighbour deciding whether to take its clients.
    pub fn metrics(&self, i: usize) -> tokio::runtime::RuntimeMetrics {
        self.handles[i].metrics()
    }

    /// Where worker `i`'s accept loops count the clients they accept.
    pub fn accept_count(&self, i: usize) -> AcceptCount {
        AcceptCount {
            all: self.accepted.clone(),
            worker: i,
        }
    }

    /// How many clients each worker has accepted (admitted or refused): how
    /// new clients spread over the workers.
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted.iter().map(|c| c.0.load(Relaxed)).collect()
    }

    /// Runs `future` on worker `i`.
    pub fn spawn_on<F>(&self, i: usize, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handles[i].spawn(super::busy_poll::Counted::new(future));
    }

    /// Stops every worker and waits until their threads have ended. (Dropping
    /// `Workers` stops them without waiting.)
    pub async fn stop(&self) {
        self.stop.cancel();
        let ended = std::mem::take(&mut *self.ended.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in ended {
            // Err: the thread ended (its sender is dropped either way).
            let _ = thread.await;
        }
    }
}

/// One worker's count of accepted clients (see [`Workers::accepted`]). Each
/// count is alone on its cache line: each worker bumps only its own.
#[derive(Clone)]
pub struct AcceptCount {
    all: Arc<[Padded<AtomicU64>]>,
    worker: usize,
}

impl AcceptCount {
    pub fn add_one(&self) {
        self.all[self.worker].0.fetch_add(1, Relaxed);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds one listening socket per worker on `addr`, all sharing it through
/// `SO_REUSEPORT`. Fails, closing any already bound, if one cannot be bound.
/// With `steering` (the CPU of each worker), a client whose SYN arrives on a
/// worker's CPU goes to that worker, any other by the kernel's address hash.
///
/// The first socket binds *without* `SO_REUSEPORT` and sets it only before
/// `listen`: so the address must be free, as with a plain listener, and a
/// second balancer started on the same address by mistake fails with "address
/// in use" instead of silently sharing the clients. Port 0 is resolved by
/// that first bind; the others join the port it got.
pub fn bind_group(
    addr: SocketAddr,
    count: usize,
    steering: Option<&[usize]>,
) -> io::Result<Vec<std::net::TcpListener>> {
    let first = listen_on(addr, false)?;
    let addr = first.local_addr()?;
    let mut group = Vec::with_capacity(count);
    group.push(first);
    for _ in 1..count {
        group.push(listen_on(addr, true)?);
    }
    if let Some(cpus) = steering {
        // A group without the program still works: spread by address hash.
        if let Err(e) = steer_by_cpu(&group[0], cpus) {
            tracing::warn!("pin_workers: cannot steer new clients of {addr} by CPU ({e}); spread by address hash");
        }
    }
    Ok(group)
}

/// A listener group made of handed-over sockets (`plane::Inherited`), with
/// a socket per worker where it can: when there are fewer sockets than
/// workers and they are in an `SO_REUSEPORT` group, new sockets join it.
/// Sockets without `SO_REUSEPORT` (a systemd socket unit without
/// `ReusePort=yes`) stay as they are and the workers share them.
pub fn join_inherited(mut group: Vec<std::net::TcpListener>, workers: usize) -> Vec<std::net::TcpListener> {
    let Some(first) = group.first() else { return group };
    let Ok(addr) = first.local_addr() else { return group };
    if !socket2::SockRef::from(first).reuse_port().unwrap_or(false) {
        return group;
    }
    while group.len() < workers {
        match listen_on(addr, true) {
            Ok(joined) => group.push(joined),
            Err(e) => {
                tracing::warn!("cannot add a socket to the listener on {addr} ({e}); its workers share the others");
                break;
            }
        }
    }
    group
}

/// Which sockets of a listener `group` each of `workers` workers accepts
/// from, as (worker, socket) pairs. With one socket per worker (from
/// [`bind_group`]): worker i takes from its own socket and from a duplicate
/// of worker i+1's (the last from the first's), so every socket is watched
/// by two workers and a client queued on a busy worker's socket is taken by
/// its neighbour if that one is free first. With one watcher per socket,
/// workers on a 16-core machine sat idle under a stream of new connections
/// while clients waited in their neighbours' queues (docs/architecture.md,
/// "Clients not yet accepted are shared with a neighbour"). A handed-over
/// group may have another number of sockets: socket j belongs to worker
/// j % workers, and a worker left without one watches a duplicate of
/// socket i % sockets.
///
/// Why a neighbour and not every worker: a new client wakes every idle worker
/// that watches its socket, and only one of them gets it. Two watchers give
/// most of the balance of a shared queue (the "power of two choices") for at
/// most one needless wake-up per client, where all-to-all would cost up to
/// one per worker. Why not when `steered` (`pin_workers` with a CPU for each
/// worker, see [`Workers::steering`]): steering hands a client to the worker
/// on the CPU its packets arrive on, and a neighbour taking it would undo
/// that; pinned workers that share CPUs, or whose pinning failed, are spread
/// by hash and share like unpinned ones. A socket that cannot be duplicated
/// (out of descriptors) keeps its one watcher, with a warning.
///
/// A worker helps on a neighbour's socket only where the neighbour needs
/// it (`accept::help_neighbour`): with two workers sharing all-to-all, the
/// first to wake would otherwise take a whole burst of new clients from
/// both sockets (docs/architecture.md).
pub fn share_with_neighbours(group: Vec<std::net::TcpListener>, workers: usize, steered: bool) -> Vec<Watch> {
    let (count, workers) = (group.len(), workers.max(1));
    // (worker, socket index) pairs beyond each socket's owner.
    let mut watchers: Vec<(usize, usize)> = (count..workers).map(|w| (w, w % count.max(1))).collect();
    if !steered && workers > 1 {
        for i in 0..count {
            // Worker i-1 (wrapping) watches worker i's socket.
            let neighbour = (i % workers + workers - 1) % workers;
            if neighbour != i % workers && !watchers.contains(&(neighbour, i)) {
                watchers.push((neighbour, i));
            }
        }
    }
    let duplicates: Vec<Watch> = watchers
        .into_iter()
        .filter(|(_, i)| *i < count)
        .filter_map(|(worker, i)| match group[i].try_clone() {
            Ok(socket) => Some(Watch {
                worker,
                owner: i % workers,
                socket,
            }),
            Err(e) => {
                tracing::warn!(
                    "cannot share listening socket {i} with worker {worker} ({e}); it keeps its other watchers"
                );
                None
            }
        })
        .collect();
    group
        .into_iter()
        .enumerate()
        .map(|(i, socket)| Watch {
            worker: i % workers,
            owner: i % workers,
            socket,
        })
        .chain(duplicates)
        .collect()
}

/// One listening socket a worker accepts from, and the worker whose socket
/// it is (the same worker, or the one it helps: [`share_with_neighbours`]).
pub struct Watch {
    pub worker: usize,
    pub owner: usize,
    pub socket: std::net::TcpListener,
}

/// A non-blocking listening socket on `addr`, `SO_REUSEPORT` set before the
/// bind (`join`: joining a group) or only after it (starting one).
fn listen_on(addr: SocketAddr, join: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt per listener instead of one per client.
    socket.set_tcp_nodelay(true)?;
    #[cfg(unix)]
    if join {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    #[cfg(unix)]
    if !join {
        socket.set_reuse_port(true)?;
    }
    socket.listen(4096)?;
    Ok(socket.into())
}

/// What the listeners steer by once the `count` workers are pinned in turn
/// to the `allowed` CPUs (`pinned`: their reports): worker i's CPU for each
/// worker, or `None` with a warning where pinning failed or workers share
/// CPUs.
#[cold]
fn steering_after_pinning(
    count: usize,
    mut allowed: Vec<usize>,
    pinned: Option<std::sync::mpsc::Receiver<io::Result<()>>>,
) -> Option<Vec<usize>> {
    let Some(pinned) = pinned else {
        tracing::warn!("pin_workers: cannot read the CPUs this process may run on; the workers run unpinned");
        return None;
    };
    if let Some(e) = pinned.iter().find_map(Result::err) {
        tracing::warn!("pin_workers: cannot pin the worker threads ({e}); they run unpinned");
        return None;
    }
    if allowed.len() < count {
        tracing::warn!(
            "pin_workers: {count} workers share {} CPUs; pinned in turn, but new clients are spread by \
             address hash, not steered by CPU",
            allowed.len()
        );
        return None;
    }
    allowed.truncate(count);
    tracing::info!(
        "pin_workers: workers pinned to CPUs {allowed:?} in order; new clients steered to the worker on their CPU"
    );
    Some(allowed)
}

/// The CPUs the calling thread may run on, in order (empty where they cannot
/// be read).
#[cfg(target_os = "linux")]
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size passed is the set's own.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads the set within its bounds (CPU_SETSIZE).
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

/// Pins the calling thread to `cpu`, one of [`allowed_cpus`].
#[cfg(target_os = "linux")]
pub fn pin_this_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it
    // (cpu came from sched_getaffinity, so it is below CPU_SETSIZE).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the size passed is the set's own; 0 is the calling thread.
    match unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn pin_this_thread(_cpu: usize) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "CPU pinning needs Linux"))
}

/// Attaches to a listener group (through any of its sockets) a classic BPF
/// program that picks, for each new client, the socket of the worker pinned
/// to the CPU processing its SYN: `cpus[i]` is worker `i`'s CPU, and socket
/// `i` of the group is worker `i`'s, since sockets join a group in the order
/// they listen. For any other CPU it returns an index past the group, which
/// makes the kernel fall back to its address hash.
#[cfg(target_os = "linux")]
fn steer_by_cpu(listener: &std::net::TcpListener, cpus: &[usize]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    // A = the CPU the packet is processed on.
    let mut program = vec![op(
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        0,
        0,
    )];
    for (worker, &cpu) in cpus.iter().enumerate() {
        // if A == cpu { return worker } (jump over the return otherwise)
        program.push(op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, cpu as u32, 0, 1));
        program.push(op(libc::BPF_RET | libc::BPF_K, worker as u32, 0, 0));
    }
    program.push(op(libc::BPF_RET | libc::BPF_K, u32::MAX, 0, 0));
    let len = u16::try_from(program.len())
        .ok()
        .filter(|&n| n <= libc::BPF_MAXINSNS as u16)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many workers to steer by CPU"))?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: fprog points at `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn steer_by_cpu(_listener: &std::net::TcpListener, _cpus: &[usize]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "steering by CPU needs Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_one_port_and_a_second_group_is_refused() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3, None).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert!(group.iter().all(|l| l.local_addr().unwrap() == addr));
        let again = bind_group(addr, 2, None).expect_err("the address is taken");
        assert_eq!(again.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn accepted_clients_inherit_tcp_nodelay_from_the_listener() {
        let listener = listen_on("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// Connects to `addr` from a thread pinned to `cpu` (so its SYN is
    /// processed there: loopback delivers on the sending CPU) and returns the
    /// index of the listener in `group` that got the client.
    fn listener_chosen_from(cpu: usize, addr: SocketAddr, group: &[std::net::TcpListener]) -> usize {
        let client = thread::spawn(move || {
            pin_this_thread(cpu).unwrap();
            std::net::TcpStream::connect(addr).unwrap()
        })
        .join()
        .unwrap();
        use std::os::fd::AsRawFd;
        let mut fds: Vec<libc::pollfd> = group
            .iter()
            .map(|l| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10_000) };
        assert_eq!(ready, 1, "exactly one listener of the group has the client");
        let chosen = fds.iter().position(|f| f.revents & libc::POLLIN != 0).unwrap();
        let (accepted, _) = group[chosen].accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
        chosen
    }

    #[test]
    fn pinned_workers_each_run_on_a_cpu_of_their_own() {
        let allowed = allowed_cpus();
        let count = allowed.len().min(4);
        let workers = Workers::start(count, true, None).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..count {
            let tx = tx.clone();
            workers.spawn_on(i, async move { tx.send((i, allowed_cpus())).unwrap() });
        }
        let mut seen: Vec<(usize, Vec<usize>)> = rx.iter().take(count).collect();
        seen.sort();
        let cpus: Vec<usize> = seen.iter().map(|(_, cpus)| cpus[0]).collect();
        assert!(seen.iter().all(|(_, cpus)| cpus.len() == 1), "{seen:?}");
        assert_eq!(cpus, allowed[..count], "worker i on the i-th allowed CPU");
        assert_eq!(workers.steering(), Some(&cpus[..]));
        assert_eq!(Workers::start(count, false, None).unwrap().steering(), None);
    }

    #[test]
    fn clients_queued_on_a_blocked_workers_socket_are_taken_by_its_neighbour() {
        let workers = Workers::start(3, false, None).unwrap();
        // Worker 1's thread is stuck until `release`, before any accept loop
        // reaches it: it accepts nothing.
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let (is_stuck, now_stuck) = std::sync::mpsc::channel::<()>();
        workers.spawn_on(1, async move {
            is_stuck.send(()).unwrap();
            let _ = stuck.recv();
        });
        now_stuck.recv().unwrap();
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3, None).unwrap();
        let addr = group[0].local_addr().unwrap();
        let watched = share_with_neighbours(group, 3, false);
        let mut pairs: Vec<usize> = watched.iter().map(|w| w.worker).collect();
        pairs.sort();
        assert_eq!(pairs, [0, 0, 1, 1, 2, 2], "two sockets for each worker");
        for Watch {
            worker,
            socket: listener,
            ..
        } in watched
        {
            workers.spawn_on(worker, async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (mut client, _) = listener.accept().await.unwrap();
                    tokio::io::AsyncWriteExt::write_all(&mut client, &[worker as u8])
                        .await
                        .unwrap();
                }
            });
        }
        // The kernel's hash queues about a third of them on worker 1's socket
        // (none of 24: a chance of 6 in 100,000).
        for _ in 0..24 {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            // A bound for a broken build, not a synchronisation.
            client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut answer = [0u8];
            std::io::Read::read_exact(&mut client, &mut answer).expect("an idle worker took the client");
            assert_ne!(answer[0], 1, "worker 1 is stuck");
        }
        release.send(()).unwrap();
    }

    #[test]
    fn steered_workers_keep_to_their_own_sockets() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3, None).unwrap();
        let watched: Vec<usize> = share_with_neighbours(group, 3, true).iter().map(|w| w.worker).collect();
        assert_eq!(watched, [0, 1, 2]);
        let one = bind_group("127.0.0.1:0".parse().unwrap(), 1, None).unwrap();
        assert_eq!(
            share_with_neighbours(one, 1, false).len(),
            1,
            "a lone worker has no neighbour"
        );
    }

    #[test]
    fn a_handed_over_group_of_another_size_still_gives_every_worker_a_socket() {
        let watchers = |sockets: usize, workers: usize| {
            let group = bind_group("127.0.0.1:0".parse().unwrap(), sockets, None).unwrap();
            let mut w: Vec<usize> = share_with_neighbours(group, workers, false)
                .iter()
                .map(|w| w.worker)
                .collect();
            w.sort();
            w
        };
        assert_eq!(watchers(1, 3), [0, 1, 2], "one shared socket: every worker watches it");
        assert_eq!(
            watchers(2, 4),
            [0, 0, 1, 2, 3, 3],
            "workers 2 and 3 watch copies; 3 and 0 are neighbours"
        );
        assert_eq!(
            watchers(4, 2),
            [0, 0, 0, 0, 1, 1, 1, 1],
            "two sockets each, and each other's"
        );
    }

    #[test]
    fn more_workers_than_cpus_are_pinned_but_not_steered() {
        let allowed = allowed_cpus();
        let workers = Workers::start(allowed.len() + 1, true, None).unwrap();
        assert_eq!(workers.steering(), None);
    }

    #[test]
    fn a_steered_group_hands_each_client_to_the_worker_on_its_cpu() {
        let allowed = allowed_cpus();
        // Workers on the allowed CPUs in reverse, so that a listener index
        // equal to the CPU's position would be caught.
        let cpus: Vec<usize> = allowed.iter().rev().take(4).copied().collect();
        let group = bind_group("127.0.0.1:0".parse().unwrap(), cpus.len(), Some(&cpus)).unwrap();
        let addr = group[0].local_addr().unwrap();
        for _round in 0..8 {
            for (worker, &cpu) in cpus.iter().enumerate() {
                assert_eq!(listener_chosen_from(cpu, addr, &group), worker, "client on CPU {cpu}");
            }
        }
    }

    #[test]
    fn a_client_on_a_cpu_without_a_worker_is_spread_by_hash_not_dropped() {
        let allowed = allowed_cpus();
        if allowed.len() < 2 {
            return; // needs a CPU without a worker
        }
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 1, Some(&allowed[..1])).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert_eq!(listener_chosen_from(allowed[1], addr, &group), 0);
        assert_eq!(listener_chosen_from(allowed[0], addr, &group), 0);
    }
}
