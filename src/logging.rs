//! Where log lines go: stderr, through a background writer thread, so that
//! no thread of the balancer ever waits on a write(2).
//!
//! The access log writes a line per connection, so its path is kept cheap:
//! a worker thread of the data plane appends its lines to a buffer of its
//! own, and hands the buffer to the writer thread in one piece once it holds
//! `BATCH_BYTES` or `BATCH_DELAY` after its first line, whichever comes
//! first (and when the worker stops). A worker thus pays one hand-off per
//! batch instead of one per line: a channel send, and often a futex wake-up
//! of the writer thread, which cost about 5 µs per connection when batches
//! were handed over each time a worker went idle. A line appears at most
//! `BATCH_DELAY` late. Every other thread (control plane, start-up) writes
//! each line through at once.
//!
//! Access-log lines are also formatted here ([`access`]) rather than by the
//! tracing formatter, which visits fields and escapes every character of the
//! message one by one, a cost paid per connection. The line reads exactly as
//! the formatter would write it — text, or with `log_format = "json"` one
//! JSON object with the fields of [`Access`] — and the `protobalance::access`
//! filter still turns it on and off.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};

use crate::config::LogFormat;

/// A worker's batch is handed over once it holds this much…
const BATCH_BYTES: usize = 32 * 1024;
/// …or this long after its first line.
const BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
/// A batch's buffer larger than this is let go once a batch no longer fills
/// within `BATCH_DELAY` ([`flush_late_batch`]).
const KEPT_BATCH: usize = 4 * 1024;

/// Messages (a line, or a worker's batch of lines) queued for the writer
/// thread at most; when full, threads that log wait rather than lose lines.
/// The queue's slots are allocated up front (32 bytes each): tracing-appender's
/// default, 128,000, would cost megabytes at start.
const QUEUED_LINES: usize = 1024;

/// The writer thread's end of the queue, once logging is set up.
static SINK: OnceLock<NonBlocking> = OnceLock::new();

/// Whether lines are coloured (stderr is a terminal): access lines then go
/// through the tracing formatter, which knows the colours.
static ANSI: AtomicBool = AtomicBool::new(false);

/// Whether lines are JSON objects (`log_format = "json"`).
static JSON: AtomicBool = AtomicBool::new(false);

/// The access log's target: `--log-level info,protobalance::access=off` turns it off.
pub const ACCESS_LOG: &str = "protobalance::access";

thread_local! {
    /// The batch of a thread that batches its lines (a worker); `None` elsewhere.
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Sets up logging to stderr in `format` with `filter`: `LEVEL` or
/// `TARGET=LEVEL` directives separated by commas (e.g.
/// `info,protobalance::access=off`), else `RUST_LOG`, else `info`. Lines are
/// written until the guard is dropped.
pub fn init(filter: Option<&str>, format: LogFormat) -> WorkerGuard {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let text = filter.map(str::to_string).or_else(|| std::env::var("RUST_LOG").ok());
    let filter = text
        .as_deref()
        .unwrap_or("info")
        .parse::<Targets>()
        .unwrap_or_else(|e| {
            eprintln!("warning: bad log filter {text:?} ({e}); using \"info\"");
            Targets::new().with_default(tracing::Level::INFO)
        });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(false)
        // Buffered: the writer thread drains every queued batch, then flushes,
        // so a burst costs one write(2).
        .finish(io::BufWriter::with_capacity(64 * 1024, io::stderr()));
    let _ = SINK.set(writer);
    let json = format == LogFormat::Json;
    JSON.store(json, Relaxed);
    let ansi = !json && io::IsTerminal::is_terminal(&io::stderr());
    ANSI.store(ansi, Relaxed);
    let layer = tracing_subscriber::fmt::layer().with_writer(|| LineWriter);
    let layer = if json {
        // Stable field names: timestamp, level, target, message and the event's fields.
        layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(filter)
            .boxed()
    } else {
        layer.with_ansi(ansi).with_filter(filter).boxed()
    };
    let _ = tracing_subscriber::registry().with(layer).try_init();
    guard
}

/// Whether log lines are JSON objects (`init` was given `LogFormat::Json`).
pub fn is_json() -> bool {
    JSON.load(Relaxed)
}

/// One finished connection, as its access-log line reports it.
pub struct Access<'a> {
    /// The client's address and port.
    pub client: SocketAddr,
    pub service: &'a str,
    pub cluster: &'a str,
    pub node: &'a str,
    /// Client → node.
    pub bytes_in: u64,
    /// Node → client.
    pub bytes_out: u64,
    /// From accept to close.
    pub duration_ms: u128,
    /// How it ended (`closed`, `idle timeout`, `client error: ...`).
    pub end: &'a dyn fmt::Display,
    /// The server name of its ClientHello, in a service with routes.
    pub sni: Option<&'a str>,
}

impl fmt::Display for Access<'_> {
    /// The text line's message: `CLIENT service=S cluster=C node=N in=B out=B ms=D end="E"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} service={} cluster={} node={} in={} out={} ms={} end=\"{}\"",
            self.client,
            self.service,
            self.cluster,
            self.node,
            self.bytes_in,
            self.bytes_out,
            self.duration_ms,
            self.end
        )?;
        match self.sni {
            Some(name) => write!(f, " sni={name}"),
            None => Ok(()),
        }
    }
}

/// Writes one access-log line: level `info`, target [`ACCESS_LOG`].
pub fn access(line: &Access<'_>) {
    if !tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO) {
        return;
    }
    if SINK.get().is_none() || ANSI.load(Relaxed) {
        // Not set up by `init` (a library user's own subscriber), or coloured.
        tracing::info!(target: ACCESS_LOG, "{line}");
        return;
    }
    let json = JSON.load(Relaxed);
    let write = |out: &mut Vec<u8>| {
        if json {
            format_access_json(out, line)
        } else {
            format_access(out, line)
        }
    };
    if !append(write) {
        let mut lines = Vec::with_capacity(256);
        write(&mut lines);
        hand_over(&mut lines);
    }
}

/// Appends to the calling thread's batch with `write`, if the thread batches;
/// returns whether it does. The first line of a batch arms its hand-over.
fn append(write: impl FnOnce(&mut Vec<u8>)) -> bool {
    let first = BATCH.with(|batch| match batch.borrow_mut().as_mut() {
        Some(lines) => {
            let first = lines.is_empty();
            write(lines);
            if lines.len() >= BATCH_BYTES {
                hand_over(lines);
            }
            Some(first)
        }
        None => None,
    });
    match first {
        Some(true) => match tokio::runtime::Handle::try_current() {
            // On the worker's own runtime: the flush runs on this thread.
            Ok(runtime) => {
                runtime.spawn(async {
                    tokio::time::sleep(BATCH_DELAY).await;
                    flush_late_batch();
                });
            }
            Err(_) => flush_thread(),
        },
        Some(false) => {}
        None => return false,
    }
    true
}

/// A `fmt::Write` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The time now, as tracing's formatter writes it: `2026-11-26T13:09:16.066598Z`.
fn write_timestamp(out: &mut Bytes<'_>) {
    use tracing_subscriber::fmt::time::FormatTime;
    let _ =
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut tracing_subscriber::fmt::format::Writer::new(out));
}

/// Appends the line as tracing's formatter writes it without colours:
/// `2026-11-26T13:09:16.066598Z  INFO protobalance::access: MESSAGE`.
fn format_access(out: &mut Vec<u8>, line: &Access<'_>) {
    let mut bytes = Bytes(out);
    write_timestamp(&mut bytes);
    let _ = fmt::Write::write_fmt(&mut bytes, format_args!("  INFO {ACCESS_LOG}: {line}\n"));
}

/// Appends the line as one JSON object, with the field names of tracing's
/// JSON formatter (`timestamp`, `level`, `target`, `message`) and the
/// connection's own.
fn format_access_json(out: &mut Vec<u8>, line: &Access<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    write_timestamp(&mut Bytes(out));
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"");
    out.extend_from_slice(ACCESS_LOG.as_bytes());
    out.extend_from_slice(b"\",\"message\":\"connection ended\",\"client\":\"");
    let _ = fmt::Write::write_fmt(&mut Bytes(out), format_args!("{}", line.client));
    for (key, value) in [
        ("service", line.service),
        ("cluster", line.cluster),
        ("node", line.node),
    ] {
        json_field(out, key, value);
    }
    let _ = fmt::Write::write_fmt(
        &mut Bytes(out),
        format_args!(
            "\",\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{}",
            line.bytes_in, line.bytes_out, line.duration_ms
        ),
    );
    out.extend_from_slice(b",\"end\":");
    // The end may carry an OS error's text: escaped as any JSON string.
    let _ = serde_json::to_writer(&mut *out, &line.end.to_string());
    if let Some(name) = line.sni {
        out.extend_from_slice(b",\"sni\":");
        let _ = serde_json::to_writer(&mut *out, name);
    }
    out.extend_from_slice(b"}\n");
}

/// `","KEY":"VALUE` of a name validated by config (letters, digits, `-_.`: nothing to escape).
fn json_field(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(b"\",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":\"");
    out.extend_from_slice(value.as_bytes());
}

/// Makes the calling thread batch its log lines until [`flush_thread`].
pub fn batch_this_thread() {
    BATCH.with(|batch| *batch.borrow_mut() = Some(Vec::new()));
}

/// Hands the calling thread's batched lines to the writer thread.
pub fn flush_thread() {
    BATCH.with(|batch| {
        if let Some(lines) = batch.borrow_mut().as_mut() {
            hand_over(lines);
        }
    });
}

/// Hands over the batch once `BATCH_DELAY` has passed since a batch's
/// first line. Its buffer goes too, if a load had grown it past
/// [`KEPT_BATCH`]: a worker's batch otherwise keeps its largest size for
/// good, live memory in the middle of the worker's heap that holds its
/// pages resident after the load. Under a load this costs the next batch a
/// few reallocations as it grows again, at most one batch per
/// `BATCH_DELAY`.
fn flush_late_batch() {
    BATCH.with(|batch| {
        if let Some(lines) = batch.borrow_mut().as_mut() {
            hand_over(lines);
            if lines.capacity() > KEPT_BATCH {
                *lines = Vec::new();
            }
        }
    });
}

fn hand_over(lines: &mut Vec<u8>) {
    if lines.is_empty() {
        return;
    }
    if let Some(sink) = SINK.get() {
        // NonBlocking's writes never fail: it queues (lossy(false): or waits).
        let _ = sink.clone().write_all(lines);
    }
    lines.clear();
}

/// What the formatter writes one line into: the thread's batch, or straight
/// to the writer thread.
struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if !append(|lines| lines.extend_from_slice(line))
            && let Some(sink) = SINK.get()
        {
            sink.clone().write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_capacity() -> usize {
        BATCH.with(|batch| batch.borrow().as_ref().map_or(0, Vec::capacity))
    }

    #[test]
    fn a_late_batch_lets_go_of_the_buffer_a_load_grew_and_keeps_a_small_one() {
        batch_this_thread();
        // A busy spell's lines: handed over once full, the buffer kept.
        assert!(append(|lines| lines.extend_from_slice(&[b'x'; BATCH_BYTES + 100])));
        assert!(batch_capacity() > KEPT_BATCH);
        flush_late_batch();
        assert_eq!(batch_capacity(), 0, "the grown buffer is let go");

        assert!(append(|lines| lines.extend_from_slice(&[b'x'; 200])));
        let small = batch_capacity();
        assert!(small > 0);
        flush_late_batch();
        assert_eq!(batch_capacity(), small, "a small buffer is kept");
    }
}
