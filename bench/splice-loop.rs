//! The floor a splice(2) proxy reaches on this machine, for comparison with
//! the balancer (the `floor` variant of `bench/ab`): the "bare splice loop"
//! the team's bulk target was set from. Every accepted connection gets a connection
//! to NODE and one blocking thread per direction, each moving bytes through
//! its own pipe (1 MiB unless PIPE_BYTES says otherwise): no event loop, no
//! pools, no balancing, no logging. A measuring tool only.
//!
//! Built by `bench/ab` with plain `rustc` into target/bench/ (std only, so
//! that it needs no crate and leaves the project's build alone: as a Cargo
//! example it would pull the dev-dependencies' features into the balancer's
//! own release build).
//!
//! Usage: splice-loop LISTEN NODE [PIPE_BYTES]

use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::raw::{c_int, c_long, c_uint};

unsafe extern "C" {
    fn pipe(fds: *mut c_int) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, arg: c_int) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn splice(fd_in: c_int, off_in: *mut i64, fd_out: c_int, off_out: *mut i64, len: usize, flags: c_uint) -> c_long;
}
const F_SETPIPE_SZ: c_int = 1031;
const SPLICE_F_MOVE: c_uint = 1;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: splice-loop LISTEN NODE [PIPE_BYTES]";
    let listen = args.next().expect(usage);
    let node = args.next().expect(usage);
    let pipe_bytes: c_int = args.next().map_or(1 << 20, |s| s.parse().expect(usage));
    for client in TcpListener::bind(&listen)?.incoming() {
        let Ok(client) = client else { continue };
        let node = node.clone();
        std::thread::spawn(move || {
            let Ok(upstream) = TcpStream::connect(&node) else {
                return;
            };
            for socket in [&client, &upstream] {
                let _ = socket.set_nodelay(true);
            }
            let (client_out, upstream_in) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let up = std::thread::spawn(move || forward(&client, &upstream, pipe_bytes));
            forward(&upstream_in, &client_out, pipe_bytes);
            let _ = up.join();
        });
    }
    Ok(())
}

/// Splices `from` into `to` until EOF or an error, then half-closes `to`.
fn forward(from: &TcpStream, to: &TcpStream, pipe_bytes: c_int) {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe writes two new descriptors into the array on success.
    if unsafe { pipe(fds.as_mut_ptr()) } < 0 {
        return;
    }
    let [read_end, write_end] = fds;
    // SAFETY: fcntl on the pipe just created; failure leaves its default size.
    unsafe { fcntl(write_end, F_SETPIPE_SZ, pipe_bytes) };
    // SAFETY: descriptors owned by this function or borrowed for its duration;
    // null offsets, as sockets and pipes have none.
    let move_bytes = |from: c_int, to: c_int, len: usize| unsafe {
        splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, SPLICE_F_MOVE)
    };
    'moving: loop {
        let mut in_pipe = move_bytes(from.as_raw_fd(), write_end, pipe_bytes as usize);
        if in_pipe <= 0 {
            break;
        }
        while in_pipe > 0 {
            let written = move_bytes(read_end, to.as_raw_fd(), in_pipe as usize);
            if written <= 0 {
                break 'moving;
            }
            in_pipe -= written;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    // SAFETY: both ends were created above and are closed once.
    unsafe {
        close(read_end);
        close(write_end);
    }
}
