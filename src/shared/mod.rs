//! State shared by twins through a Redis store (`[shared]`): client pins and
//! run-time overrides (node states, drain deadlines, redirects).
//!
//! - **Pins**: one key per cluster and client IP, `PREFIX:pin:CLUSTER:IP` =
//!   `NODE|LAST_SEEN_MS`, expiring with the cluster's `affinity_ttl`. A new
//!   client's connection looks its pin up within `lookup_budget` (the data
//!   plane's side is `model::PinStore`); every pin made here is written by
//!   this module's task, the newer last-seen winning (a script in the store),
//!   and kept while the store is down, to be written when it is back.
//! - **Overrides**: one hash, `PREFIX:overrides`, a field per override
//!   (`control::shared`), JSON with who set it and when; written last-writer-
//!   wins and announced on the channel `PREFIX:overrides`. Every instance
//!   reads the whole hash when it (re)connects and each announced field as it
//!   comes, and applies what is newer than what it knows.
//! - **Sentinel**: with a `redis+sentinel://` store the task asks the
//!   sentinels for the primary whenever it (re)connects, and moves every
//!   request to the primary they name; a failed-over primary is reached as a
//!   store down then back (the newer pin and the later change win again).
//! - **Faults**: the store down, slow, or never answering costs a new client
//!   at most the budget; the outage and its end are logged once each; the
//!   figures say whether it is up and what it costs (`model::StoreFigures`).
//!
//! Owns the conversation with the store; never decides which node a client
//! gets, never changes an override itself (it hands records to `Control`).
//! The password never reaches a log line: the store is named by
//! `SharedConfig::display_url`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::SharedConfig;
use crate::control::Control;
use crate::control::shared::SharedOverride;
use crate::model::{Lookup, Pin, PinRecord, PinStore, StoreFigures, Written};

/// How long a request of the store's own task may take (writes, reads of
/// the overrides): a store slower than this is down.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait between attempts to reach a store that is down.
const RETRY: Duration = Duration::from_secs(1);
/// The most pins kept for a store that is down; past it the oldest changes
/// are dropped (they are in the local pin file all the same).
const MAX_PENDING_PINS: usize = 100_000;
/// How often the pins that connections made are written out.
const WRITE_TICK: Duration = Duration::from_millis(200);
/// The most pins written in one round trip.
const WRITE_BATCH: usize = 512;
/// How often the store's copy of a pin that keeps its node is refreshed, at
/// most: every connection of a pinned client refreshes the local pin, but
/// the store's needs only to outlive its time to live (a tenth of it, and at
/// most this), so a busy client costs the store nothing on most connections.
const MAX_REFRESH: Duration = Duration::from_secs(60);

/// Sets the key to the new value unless the store holds a pin seen later.
/// KEYS[1] the pin's key; ARGV: value, last seen (ms), time to live (ms).
const NEWER_PIN_WINS: &str = r"
local held = redis.call('GET', KEYS[1])
if held then
  local seen = tonumber(string.match(held, '|(%d+)$'))
  if seen and seen > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
";

/// Sets a field of the overrides unless the store holds a later change of it,
/// and announces it. KEYS[1] the hash; ARGV: field, record (JSON), its time
/// (ms), the channel.
const LATER_OVERRIDE_WINS: &str = r"
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local ok, record = pcall(cjson.decode, held)
  if ok and type(record) == 'table' and tonumber(record.at_ms) and tonumber(record.at_ms) > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
";

/// What the store's task sends: one command, or a batch in one round trip.
enum Query<'a> {
    One(&'a redis::Cmd),
    Batch(&'a redis::Pipeline),
}

/// A pin to write.
struct PinWrite {
    cluster: String,
    client: IpAddr,
    node: String,
    last_seen_ms: u64,
    ttl_ms: u64,
}

/// The store as the data plane reaches it: lookups on the connection's own
/// runtime, writes queued for the store's task.
pub struct Store {
    prefix: String,
    budget: Duration,
    connection: ArcSwapOption<ConnectionManager>,
    /// Pins to write, taken by the store's task every [`WRITE_TICK`]: a
    /// connection pushes under an uncontended lock and wakes nobody (a
    /// wake-up per connection cost pinned clients more than the store did).
    writes: std::sync::Mutex<Vec<PinWrite>>,
    figures: Arc<StoreFigures>,
}

impl Store {
    /// One command for a client's connection, within `budget`, timed and
    /// counted; `None` when the store is down, failed, or ran past it.
    async fn within_budget<T: redis::FromRedisValue>(&self, command: redis::Cmd, budget: Duration) -> Option<T> {
        if !self.figures.is_answering() || budget.is_zero() {
            return None;
        }
        let mut connection = (*self.connection.load_full()?).clone();
        let started = Instant::now();
        match tokio::time::timeout(budget, command.query_async::<T>(&mut connection)).await {
            Ok(answer) => {
                self.figures.count_request(started.elapsed());
                self.figures.answered_in_time();
                if answer.is_err() {
                    self.figures.count_error();
                }
                answer.ok()
            }
            Err(_) => {
                self.figures.count_lookup_timeout();
                None
            }
        }
    }
}

fn pin_key(prefix: &str, cluster: &str, client: IpAddr) -> String {
    format!("{prefix}:pin:{cluster}:{}", crate::config::canonical(client))
}

impl PinStore for Store {
    fn lookup<'a>(&'a self, cluster: &'a str, client: IpAddr) -> Lookup<'a> {
        Box::pin(async move {
            let mut command = redis::cmd("GET");
            command.arg(pin_key(&self.prefix, cluster, client));
            let value = self.within_budget::<Option<String>>(command, self.budget).await??;
            parse_pin(&value)
        })
    }

    fn write_new<'a>(&'a self, pin: PinRecord<'a>, looked_up: Duration) -> Written<'a> {
        Box::pin(async move {
            let command = pin_command(
                &self.prefix,
                pin.cluster,
                pin.client,
                pin.node,
                pin.last_seen_ms,
                ttl_ms(pin.ttl),
            );
            let left = self.budget.saturating_sub(looked_up);
            if self.within_budget::<i64>(command, left).await.is_none() {
                self.write(pin);
            }
        })
    }

    fn write(&self, pin: PinRecord<'_>) {
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        if writes.len() >= MAX_PENDING_PINS {
            // The task is far behind (it stalls on a store that never
            // answers): this refresh is in the local pin file all the same.
            return;
        }
        writes.push(PinWrite {
            cluster: pin.cluster.to_string(),
            client: pin.client,
            node: pin.node.to_string(),
            last_seen_ms: pin.last_seen_ms,
            ttl_ms: ttl_ms(pin.ttl),
        });
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The newer-wins write of one pin.
fn pin_command(prefix: &str, cluster: &str, client: IpAddr, node: &str, last_seen_ms: u64, ttl_ms: u64) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command
        .arg(NEWER_PIN_WINS)
        .arg(1)
        .arg(pin_key(prefix, cluster, client))
        .arg(format!("{node}|{last_seen_ms}"))
        .arg(last_seen_ms)
        .arg(ttl_ms);
    command
}

/// `NODE|LAST_SEEN_MS` as a pin; `None` for anything else (a store that lies).
fn parse_pin(value: &str) -> Option<Pin> {
    let (node, seen) = value.rsplit_once('|')?;
    if node.is_empty() || node.len() > 64 {
        return None;
    }
    Some(Pin {
        node: node.into(),
        last_seen_ms: seen.parse().ok()?,
    })
}

/// Connects to the store of `config` for `control`'s balancer: sets the data
/// plane's store, and runs the store's task until `stop` is cancelled.
/// Nothing here waits for the store: a store that is down at start is
/// reached when it comes up.
pub fn start(
    config: &SharedConfig,
    control: Control,
    stop: CancellationToken,
) -> Option<impl Future<Output = ()> + Send + use<>> {
    // rediss://: TLS through rustls, whose crypto the process chooses once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reached = source(config).and_then(|source| match &source {
        Source::Direct(client) => Ok((Some(Arc::new(manager(client)?)), source)),
        // The primary is whichever the sentinels name, once the task asks them.
        Source::Sentinel { .. } => Ok((None, source)),
    });
    let (connection, source) = match reached {
        Ok(reached) => reached,
        Err(e) => {
            // The error's kind only: its text might quote the URL, password and all.
            warn!(store = %config.display_url(), "shared state disabled: {}", describe(&e));
            return None;
        }
    };
    let live = control.live().clone();
    let store = Arc::new(Store {
        prefix: config.key_prefix.clone(),
        budget: config.lookup_budget,
        connection: ArcSwapOption::new(connection),
        writes: std::sync::Mutex::default(),
        figures: live.store_figures.clone(),
    });
    let _ = live.store.set(store.clone());
    let (changes, changed) = mpsc::unbounded_channel();
    control.share_changes(&config.instance, changes);
    let task = Task {
        store,
        source,
        control,
        display: config.display_url(),
        overrides_key: format!("{}:overrides", config.key_prefix),
        pending_pins: HashMap::new(),
        pending_overrides: HashMap::new(),
        written: HashMap::new(),
        said: std::sync::atomic::AtomicU8::new(UNSAID),
    };
    Some(task.run(changed, stop))
}

/// Where the store is: one address, or the primary the sentinels name.
enum Source {
    Direct(redis::Client),
    Sentinel {
        sentinels: redis::sentinel::Sentinel,
        primary: String,
        /// How to reach the primary: its TLS, database, user and password.
        primary_info: redis::sentinel::SentinelNodeConnectionInfo,
        /// The primary the sentinels named last (`None` until they name one).
        named: Option<Box<redis::Client>>,
    },
}

/// The store of `config`, with `password_file`'s password when there is one.
fn source(config: &SharedConfig) -> redis::RedisResult<Source> {
    let Some(sentinel) = &config.sentinel else {
        let mut info = redis::IntoConnectionInfo::into_connection_info(config.store.as_str())?;
        if let Some(password) = &config.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        return redis::Client::open(info).map(Source::Direct);
    };
    let mut settings = redis::RedisConnectionInfo::default().set_db(sentinel.db);
    if let Some(user) = &sentinel.user {
        settings = settings.set_username(user);
    }
    if let Some(password) = config.password.as_ref().or(sentinel.password.as_ref()) {
        settings = settings.set_password(password);
    }
    let mut primary_info = redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
    if sentinel.tls {
        primary_info = primary_info.set_tls_mode(redis::TlsMode::Secure);
    }
    Ok(Source::Sentinel {
        sentinels: redis::sentinel::Sentinel::build(sentinel.sentinels.clone())?,
        primary: sentinel.primary.clone(),
        primary_info,
        named: None,
    })
}

/// The connection every request but the subscription goes through: it
/// reconnects by itself, and gives up on a request after [`REQUEST_TIMEOUT`].
fn manager(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(REQUEST_TIMEOUT))
        .set_connection_timeout(Some(REQUEST_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(RETRY);
    client.get_connection_manager_lazy(config)
}

/// The store's own task, on the control-plane runtime.
struct Task {
    store: Arc<Store>,
    source: Source,
    control: Control,
    display: String,
    overrides_key: String,
    /// Pins not yet in the store (it was down), the latest per client.
    pending_pins: HashMap<(String, IpAddr), PinWrite>,
    /// Changes of overrides made here not yet in the store.
    pending_overrides: HashMap<String, SharedOverride>,
    /// What this task last wrote of each pin: its node and last-seen time.
    written: HashMap<(String, IpAddr), (String, u64)>,
    /// What the log said of the store last: [`UNSAID`], [`SAID_UP`] or
    /// [`SAID_DOWN`] (a store down at start is said so once, too).
    said: std::sync::atomic::AtomicU8,
}

const UNSAID: u8 = 0;
const SAID_UP: u8 = 1;
const SAID_DOWN: u8 = 2;

impl Task {
    async fn run(mut self, mut changed: mpsc::UnboundedReceiver<SharedOverride>, stop: CancellationToken) {
        let mut announcements = self.subscribe().await;
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut write_tick = tokio::time::interval(WRITE_TICK);
        write_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = write_tick.tick() => {
                    let batch = std::mem::take(&mut *self.store.writes.lock().unwrap_or_else(|p| p.into_inner()));
                    if batch.is_empty() && self.pending_pins.is_empty() {
                        continue;
                    }
                    for w in batch {
                        if self.is_fresh(&w) {
                            continue;
                        }
                        self.pending_pins.insert((w.cluster.clone(), w.client), w);
                    }
                    if self.pending_pins.len() > MAX_PENDING_PINS {
                        self.drop_oldest_pins();
                    }
                    self.flush().await;
                }
                Some(record) = changed.recv() => {
                    self.pending_overrides.insert(record.key.field(), record);
                    self.flush().await;
                }
                field = next_announcement(&mut announcements) => match field {
                    Some(field) => self.read_override(&field).await,
                    // The subscription broke: the store went away.
                    None => {
                        announcements = None;
                        self.went_down("the subscription to its announcements ended");
                    }
                },
                _ = retry.tick() => {
                    // Down (a request failed) or unsubscribed: a subscription
                    // that saw no end of its connection may be dead as well.
                    if announcements.is_none() || !self.store.figures.is_up() {
                        announcements = self.subscribe().await;
                    }
                    if self.store.figures.is_up() {
                        self.flush().await;
                    }
                    // A store too slow for clients: asked again once it
                    // answers this task within the budget.
                    if self.store.figures.is_slow() {
                        self.probe_slow().await;
                    }
                }
            }
        }
    }

    /// Subscribes to the overrides' announcements and reads them all: at
    /// start and after every outage.
    async fn subscribe(&mut self) -> Option<redis::aio::PubSubStream> {
        let client = match self.reach().await {
            Ok(client) => client,
            Err(why) => {
                self.went_down(why);
                return None;
            }
        };
        let subscribed = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&self.overrides_key).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        })
        .await;
        match subscribed {
            Ok(Ok(stream)) => {
                self.came_up();
                self.read_all_overrides().await;
                self.flush().await;
                Some(stream)
            }
            Ok(Err(e)) => {
                self.went_down(format_args!("{}", describe(&e)));
                None
            }
            Err(_) => {
                self.went_down(format_args!("no answer within {REQUEST_TIMEOUT:?}"));
                None
            }
        }
    }

    /// The store's client. With sentinels, the primary they name now: a
    /// primary other than the last one gets every request from here on.
    async fn reach(&mut self) -> Result<redis::Client, String> {
        let (sentinels, primary, primary_info, named) = match &mut self.source {
            Source::Direct(client) => return Ok(client.clone()),
            Source::Sentinel {
                sentinels,
                primary,
                primary_info,
                named,
            } => (sentinels, primary, primary_info, named),
        };
        let found = tokio::time::timeout(REQUEST_TIMEOUT, sentinels.async_master_for(primary, Some(primary_info)))
            .await
            .map_err(|_| format!("no sentinel named the primary within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("the sentinels named no primary ({})", describe(&e)))?;
        let address = found.get_connection_info().addr().to_string();
        let known = named.as_ref().map(|c| c.get_connection_info().addr().to_string());
        if known.as_deref() != Some(address.as_str()) {
            let connection = manager(&found).map_err(|e| describe(&e))?;
            self.store.connection.store(Some(Arc::new(connection)));
            info!(store = %self.display, primary = %address, "shared state store: the sentinels name its primary");
            *named = Some(Box::new(found.clone()));
        }
        Ok(found)
    }

    /// Whether the store holds this pin already, recently enough.
    fn is_fresh(&self, w: &PinWrite) -> bool {
        let refresh = Duration::from_millis(w.ttl_ms / 10).min(MAX_REFRESH);
        let refresh_ms = u64::try_from(refresh.as_millis()).unwrap_or(u64::MAX);
        self.written
            .get(&(w.cluster.clone(), w.client))
            .is_some_and(|(node, at)| *node == w.node && w.last_seen_ms.saturating_sub(*at) < refresh_ms)
    }

    /// Remembers pins written, forgetting those too old to spare a write.
    fn note_written(&mut self, keys: &[(String, IpAddr)]) {
        for key in keys {
            if let Some(w) = self.pending_pins.remove(key) {
                self.written.insert(key.clone(), (w.node, w.last_seen_ms));
            }
        }
        if self.written.len() > MAX_PENDING_PINS {
            let newest = self.written.values().map(|(_, t)| *t).max().unwrap_or(0);
            let horizon = newest.saturating_sub(u64::try_from(MAX_REFRESH.as_millis()).unwrap_or(u64::MAX));
            self.written.retain(|_, (_, t)| *t >= horizon);
            if self.written.len() > MAX_PENDING_PINS {
                self.written.clear();
            }
        }
    }

    fn came_up(&mut self) {
        self.store.figures.set_up(true);
        if self.said.swap(SAID_UP, std::sync::atomic::Ordering::Relaxed) != SAID_UP {
            info!(store = %self.display, "shared state store reachable");
            // A store back from an outage may have lost what was written
            // before it (restarted empty, a primary failed over before it
            // replicated): each client's next connection writes its pin again.
            self.written.clear();
        }
    }

    fn went_down(&self, why: impl std::fmt::Display) {
        self.store.figures.set_up(false);
        if self.said.swap(SAID_DOWN, std::sync::atomic::Ordering::Relaxed) != SAID_DOWN {
            warn!(
                store = %self.display,
                "shared state store unreachable: {why}; serving with what this instance knows, writing it back when the store returns"
            );
        }
    }

    /// A request of this task, timed and counted.
    async fn request<T: redis::FromRedisValue>(&self, query: Query<'_>) -> Option<T> {
        let mut connection = (*self.store.connection.load_full()?).clone();
        let started = Instant::now();
        let sent = async {
            match query {
                Query::One(command) => command.query_async::<T>(&mut connection).await,
                Query::Batch(pipe) => pipe.query_async::<T>(&mut connection).await,
            }
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, sent).await;
        self.store.figures.count_request(started.elapsed());
        match answer {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.store.figures.count_error();
                self.went_down(describe(&e));
                None
            }
            Err(_) => {
                self.store.figures.count_error();
                self.went_down(format_args!("no answer within {REQUEST_TIMEOUT:?}"));
                None
            }
        }
    }

    /// Pings a store that ran past clients' budgets; one that answers
    /// within the budget is asked by clients again.
    async fn probe_slow(&self) {
        let started = Instant::now();
        let answered = self.request::<String>(Query::One(&redis::cmd("PING"))).await.is_some();
        if answered && started.elapsed() <= self.store.budget {
            self.store.figures.answered_in_time();
        }
    }

    /// Writes what is pending, while the store answers.
    async fn flush(&mut self) {
        if !self.store.figures.is_up() {
            return;
        }
        let fields: Vec<String> = self.pending_overrides.keys().cloned().collect();
        for field in fields {
            let record = &self.pending_overrides[&field];
            let Ok(json) = serde_json::to_string(record) else {
                continue;
            };
            let mut command = redis::cmd("EVAL");
            command
                .arg(LATER_OVERRIDE_WINS)
                .arg(1)
                .arg(&self.overrides_key)
                .arg(&field)
                .arg(json)
                .arg(record.at_ms)
                .arg(&self.overrides_key);
            if self.request::<i64>(Query::One(&command)).await.is_none() {
                return;
            }
            self.pending_overrides.remove(&field);
        }
        while !self.pending_pins.is_empty() {
            let keys: Vec<(String, IpAddr)> = self.pending_pins.keys().take(WRITE_BATCH).cloned().collect();
            let mut pipe = redis::pipe();
            for key in &keys {
                let w = &self.pending_pins[key];
                pipe.add_command(pin_command(
                    &self.store.prefix,
                    &w.cluster,
                    w.client,
                    &w.node,
                    w.last_seen_ms,
                    w.ttl_ms,
                ))
                .ignore();
            }
            if self.request::<()>(Query::Batch(&pipe)).await.is_none() {
                return;
            }
            self.note_written(&keys);
        }
    }

    fn drop_oldest_pins(&mut self) {
        let mut seen: Vec<((String, IpAddr), u64)> = self
            .pending_pins
            .iter()
            .map(|(k, w)| (k.clone(), w.last_seen_ms))
            .collect();
        seen.sort_by_key(|(_, t)| *t);
        let excess = self.pending_pins.len() - MAX_PENDING_PINS;
        for (key, _) in seen.into_iter().take(excess) {
            self.pending_pins.remove(&key);
        }
    }

    async fn read_all_overrides(&self) {
        let mut command = redis::cmd("HGETALL");
        command.arg(&self.overrides_key);
        let Some(all) = self.request::<HashMap<String, String>>(Query::One(&command)).await else {
            return;
        };
        for json in all.values() {
            self.apply(json);
        }
    }

    async fn read_override(&self, field: &str) {
        let mut command = redis::cmd("HGET");
        command.arg(&self.overrides_key).arg(field);
        if let Some(Some(json)) = self.request::<Option<String>>(Query::One(&command)).await {
            self.apply(&json);
        }
    }

    /// Applies a record the store holds; one that does not parse (a store
    /// that lies, another version) is ignored.
    fn apply(&self, json: &str) {
        match serde_json::from_str::<SharedOverride>(json) {
            Ok(record) => {
                self.control.apply_shared(&record);
            }
            Err(e) => tracing::debug!(store = %self.display, "ignoring an override record that does not parse: {e}"),
        }
    }
}

/// The next field announced, `None` when the subscription ended; never
/// resolves without a subscription.
async fn next_announcement(stream: &mut Option<redis::aio::PubSubStream>) -> Option<String> {
    match stream {
        Some(s) => s.next().await.map(|m| m.get_payload::<String>().unwrap_or_default()),
        None => std::future::pending().await,
    }
}

/// A store error as a log line says it: its kind and the server's words,
/// never the URL (which may hold the password).
fn describe(e: &redis::RedisError) -> String {
    if e.is_connection_refusal() {
        "connection refused".to_string()
    } else if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connection_dropped() {
        "the connection dropped".to_string()
    } else {
        format!("{:?}", e.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_pin;

    #[test]
    fn a_stored_pin_parses_and_a_lying_one_is_nothing() {
        let pin = parse_pin("n1|1700000000000").unwrap();
        assert_eq!((&*pin.node, pin.last_seen_ms), ("n1", 1_700_000_000_000));
        assert!(parse_pin("n1").is_none());
        assert!(parse_pin("|5").is_none());
        assert!(parse_pin("n1|soon").is_none());
        assert!(parse_pin(&format!("{}|1", "x".repeat(100))).is_none());
    }
}
