//! The shared state in Redis (`--redis`), for many instances behind a load balancer.
//!
//! Every change that must be atomic (a join with its placement, a seat update with its
//! event) is one Lua script: Redis runs it alone, and the event it publishes is ordered
//! with the change on the one events channel. Key names and expiries are documented in
//! `docs/fleet.md`; they all start with the prefix (`chorus` by default):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:seq` | string | the event sequence (one for every room) |
//! | `P:seat_id` | string | the last seat id handed out |
//! | `P:rooms` | set | rooms with seats |
//! | `P:room:{room}:seats` | hash | seat id → seat JSON |
//! | `P:room:{room}:owners` | hash | seat id → instance holding its WebSocket |
//! | `P:room:{room}:identities` | hash | identity → seat id |
//! | `P:room:{room}:node` | string | the room's placement |
//! | `P:room:{room}:dominant` | string | the last dominant speaker |
//! | `P:settings` | hash | room → settings JSON |
//! | `P:instance:{id}` | string | an instance is alive (expires 15 s after its last heartbeat) |
//! | `P:chat_id` | string | the last chat message id |
//! | `P:chat:{room}` | stream | the room's history, capped, expiring `retention` after the last use |
//! | `P:events` | channel | every room event |
//!
//! The two counters start from the current time in microseconds when missing, so they
//! keep growing across a Redis restart that lost its data.
//!
//! Two connections: one for commands (with a response timeout, so a join gets an error
//! instead of hanging when Redis is away) and one RESP3 connection that only receives
//! the events channel and resubscribes by itself after a reconnect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chorus_protocol::chat::{ChatMessage, Sender};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, ProtocolVersion, PushKind, Value};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

mod lua;

use lua::Scripts;

use super::{
    EventKind, EventSink, JoinOutcome, JoinRequest, OwnedSeat, RoomEvent, RoomSettings,
    RoomSnapshot, Seat, SharedState, StateError, StateResult,
};

/// How long a command may take before the caller gets `Unavailable`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the events connection is checked (see [`read_events`]).
const EVENTS_PING: Duration = Duration::from_secs(1);

/// Settings for [`RedisState::connect`].
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Key prefix, so several fleets (or test runs) can share one Redis.
    pub prefix: String,
    /// Messages kept per room.
    pub chat_history: usize,
    /// How long a room's chat outlives its last message or reader.
    pub chat_retention: Duration,
}

pub struct RedisState {
    conn: ConnectionManager,
    /// Kept so the subscription (and its automatic resubscription) lives as long as we do.
    _events_conn: ConnectionManager,
    sinks: Arc<Mutex<Vec<EventSink>>>,
    prefix: String,
    channel: String,
    history_cap: usize,
    retention_ms: u64,
    scripts: Scripts,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for RedisState {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn unavailable(e: redis::RedisError) -> StateError {
    StateError::Unavailable(e.to_string())
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Corrupt(format!("{what}: {e}"))
}

/// What the join and snapshot scripts return.
#[derive(Deserialize)]
struct ScriptReply {
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    seat: Option<Seat>,
    #[serde(default)]
    replaced: Option<OwnedSeat>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    seats: Vec<OwnedSeat>,
    #[serde(default)]
    dominant: String,
    /// The stored settings JSON as a string ("" for none), read leniently: settings
    /// someone wrote by hand must not stop every join.
    #[serde(default)]
    settings: String,
}

impl ScriptReply {
    fn snapshot(&mut self) -> RoomSnapshot {
        let mut seats = std::mem::take(&mut self.seats);
        seats.sort_by_key(|s| s.seat.id);
        RoomSnapshot {
            seq: self.seq,
            seats,
            node: (!self.node.is_empty()).then(|| self.node.clone()),
            dominant: self.dominant.parse().ok(),
            settings: match self.settings.as_str() {
                "" => RoomSettings::default(),
                json => serde_json::from_str(json).unwrap_or_else(|e| {
                    warn!("unreadable room settings in Redis ignored: {e}");
                    RoomSettings::default()
                }),
            },
        }
    }
}

impl RedisState {
    /// Connects, subscribes to the events channel, and checks that Redis answers.
    pub async fn connect(config: RedisConfig) -> anyhow::Result<RedisState> {
        use anyhow::Context;
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .with_context(|| format!("--redis {:?} is not a Redis URL", config.url))?;
        // RESP3: pub/sub messages arrive as pushes on a connection manager, which
        // reconnects and resubscribes by itself.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))
            .context("opening the Redis client")?;
        let base = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = client
            .get_connection_manager_with_config(base.clone())
            .await
            .with_context(|| format!("connecting to Redis at {}", config.url))?;
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let mut events_conn = client
            .get_connection_manager_with_config(
                base.set_push_sender(push_tx).set_automatic_resubscription(),
            )
            .await
            .with_context(|| format!("connecting to Redis at {}", config.url))?;
        let channel = format!("{}:events", config.prefix);
        events_conn
            .subscribe(&channel)
            .await
            .with_context(|| format!("subscribing to {channel} in Redis"))?;
        let sinks: Arc<Mutex<Vec<EventSink>>> = Arc::default();
        let reader = tokio::spawn(read_events(push_rx, sinks.clone(), events_conn.clone()));
        info!(url = %config.url, prefix = %config.prefix, "shared state in Redis");
        Ok(RedisState {
            conn,
            _events_conn: events_conn,
            sinks,
            channel,
            prefix: config.prefix,
            history_cap: config.chat_history.max(1),
            retention_ms: config.chat_retention.as_millis().max(1) as u64,
            scripts: Scripts::new(),
            reader,
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    fn room_key(&self, room: &str, what: &str) -> String {
        format!("{}:room:{room}:{what}", self.prefix)
    }

    fn chat_key(&self, room: &str) -> String {
        format!("{}:chat:{room}", self.prefix)
    }

    async fn snapshot(&self, room: &str) -> StateResult<RoomSnapshot> {
        let raw: String = self
            .scripts
            .snapshot
            .key(self.room_key(room, "seats"))
            .key(self.room_key(room, "owners"))
            .key(self.room_key(room, "node"))
            .key(self.room_key(room, "dominant"))
            .key(self.key("settings"))
            .key(self.key("seq"))
            .arg(room)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut reply: ScriptReply =
            serde_json::from_str(&raw).map_err(|e| corrupt("room snapshot", e))?;
        Ok(reply.snapshot())
    }
}

/// Decodes the events channel and hands each event to every sink, in arrival order
/// (which is publication order: one channel, one connection).
///
/// The connection manager only reconnects when a command fails, and nothing else is
/// sent on this connection: a PING every [`EVENTS_PING`] (and at once when it drops)
/// notices a dead connection and brings it back, and the manager then resubscribes.
async fn read_events(
    mut rx: mpsc::UnboundedReceiver<redis::PushInfo>,
    sinks: Arc<Mutex<Vec<EventSink>>>,
    mut conn: ConnectionManager,
) {
    let mut every = tokio::time::interval(EVENTS_PING);
    let mut down = false;
    loop {
        let push = tokio::select! {
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
            _ = every.tick() => {
                let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
                match (ping, down) {
                    (Ok(_), true) => {
                        down = false;
                        info!("the Redis events subscription is back");
                    }
                    (Err(e), false) => {
                        down = true;
                        warn!("the Redis events connection does not answer: {e}");
                    }
                    _ => {}
                }
                continue;
            }
        };
        match push.kind {
            PushKind::Message => {
                let Some(Value::BulkString(payload)) = push.data.get(1) else {
                    warn!("Redis event without a payload ignored");
                    continue;
                };
                let ev: RoomEvent = match serde_json::from_slice(payload) {
                    Ok(ev) => ev,
                    Err(e) => {
                        warn!("unreadable room event from Redis ignored: {e}");
                        continue;
                    }
                };
                let sinks = sinks.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for sink in sinks {
                    sink(ev.clone());
                }
            }
            PushKind::Disconnection => {
                warn!(
                    "lost the Redis events subscription; room events published until it \
                     is back are not seen by this instance"
                );
                down = true;
                // Try again soon rather than at the next tick.
                every.reset_after(Duration::from_millis(200));
            }
            PushKind::Subscribe => debug!("subscribed to the Redis events channel"),
            _ => {}
        }
    }
}

#[async_trait]
impl SharedState for RedisState {
    async fn subscribe(&self, sink: EventSink) -> StateResult<()> {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sink);
        Ok(())
    }

    async fn next_seat_id(&self) -> StateResult<u64> {
        self.scripts
            .seat_id
            .key(self.key("seat_id"))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn join(&self, req: JoinRequest<'_>, id: u64) -> StateResult<JoinOutcome> {
        let nodes = serde_json::to_string(req.nodes).map_err(|e| corrupt("node list", e))?;
        let raw: String = self
            .scripts
            .join
            .key(self.room_key(req.room, "seats"))
            .key(self.room_key(req.room, "owners"))
            .key(self.room_key(req.room, "identities"))
            .key(self.room_key(req.room, "node"))
            .key(self.room_key(req.room, "dominant"))
            .key(self.key("settings"))
            .key(self.key("rooms"))
            .key(self.key("seq"))
            .arg(req.room)
            .arg(req.identity)
            .arg(req.name)
            .arg(req.protocol)
            .arg(req.instance)
            .arg(if req.resume { "1" } else { "0" })
            .arg(nodes)
            .arg(id)
            .arg(&self.channel)
            .arg(self.key("instance:"))
            .arg(super::INSTANCE_TTL.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut reply: ScriptReply =
            serde_json::from_str(&raw).map_err(|e| corrupt("join reply", e))?;
        let room = reply.snapshot();
        let seat = reply.seat.take();
        Ok(match (reply.outcome.as_str(), seat) {
            ("seated", Some(seat)) => JoinOutcome::Seated {
                seat,
                room,
                replaced: reply.replaced,
            },
            ("resumed", Some(seat)) => JoinOutcome::Resumed {
                seat,
                room,
                from: reply.from,
            },
            ("unreachable", _) => JoinOutcome::NodeUnreachable { node: reply.node },
            ("no_node", _) => JoinOutcome::NoNode,
            (other, _) => return Err(corrupt("join reply", format!("outcome {other:?}"))),
        })
    }

    async fn update_seat(&self, instance: &str, seat: &Seat, announce: bool) -> StateResult<bool> {
        let json = serde_json::to_string(seat).map_err(|e| corrupt("seat", e))?;
        let n: i64 = self
            .scripts
            .update
            .key(self.room_key(&seat.room, "seats"))
            .key(self.room_key(&seat.room, "owners"))
            .key(self.key("seq"))
            .arg(&seat.room)
            .arg(seat.id)
            .arg(instance)
            .arg(json)
            .arg(&self.channel)
            .arg(if announce { "1" } else { "0" })
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn remove_seat(
        &self,
        instance: &str,
        room: &str,
        id: u64,
        reason: &str,
    ) -> StateResult<Option<Seat>> {
        let raw: Option<String> = self
            .scripts
            .remove
            .key(self.room_key(room, "seats"))
            .key(self.room_key(room, "owners"))
            .key(self.room_key(room, "identities"))
            .key(self.room_key(room, "node"))
            .key(self.room_key(room, "dominant"))
            .key(self.key("rooms"))
            .key(self.key("seq"))
            .arg(room)
            .arg(id)
            .arg(instance)
            .arg(reason)
            .arg(&self.channel)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        raw.map(|j| serde_json::from_str(&j).map_err(|e| corrupt("removed seat", e)))
            .transpose()
    }

    async fn room(&self, room: &str) -> StateResult<RoomSnapshot> {
        self.snapshot(room).await
    }

    async fn rooms(&self) -> StateResult<Vec<String>> {
        let mut conn = self.conn.clone();
        let (mut with_seats, with_settings): (Vec<String>, Vec<String>) = redis::pipe()
            .smembers(self.key("rooms"))
            .hkeys(self.key("settings"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        with_seats.extend(with_settings);
        with_seats.sort();
        with_seats.dedup();
        Ok(with_seats)
    }

    async fn set_dominant(&self, room: &str, node: &str, dominant: Option<u64>) -> StateResult<()> {
        let _: i64 = self
            .scripts
            .dominant
            .key(self.room_key(room, "node"))
            .key(self.room_key(room, "dominant"))
            .arg(node)
            .arg(dominant.map(|d| d.to_string()).unwrap_or_default())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn put_settings(&self, room: &str, settings: RoomSettings) -> StateResult<()> {
        let event = serde_json::to_string(&RoomEvent {
            room: room.to_string(),
            seq: 0,
            kind: EventKind::Settings(settings),
        })
        .map_err(|e| corrupt("settings event", e))?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        if settings == RoomSettings::default() {
            pipe.hdel(self.key("settings"), room).ignore();
        } else {
            let json = serde_json::to_string(&settings).map_err(|e| corrupt("settings", e))?;
            pipe.hset(self.key("settings"), room, json).ignore();
        }
        pipe.publish(&self.channel, event).ignore();
        let () = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn chat_append(
        &self,
        room: &str,
        sender: u64,
        from: &Sender,
        text: &str,
        ts: u64,
    ) -> StateResult<ChatMessage> {
        let id: u64 = self
            .scripts
            .chat_append
            .key(self.key("chat_id"))
            .key(self.chat_key(room))
            .arg(self.history_cap)
            .arg(self.retention_ms)
            .arg(&from.identity)
            .arg(&from.name)
            .arg(text)
            .arg(ts)
            .arg(&self.channel)
            .arg(room)
            .arg(sender)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(ChatMessage {
            id,
            from: from.clone(),
            text: text.to_string(),
            ts,
        })
    }

    async fn chat_recent(&self, room: &str, limit: usize) -> StateResult<Vec<ChatMessage>> {
        let key = self.chat_key(room);
        let mut conn = self.conn.clone();
        // Reading the history is using the room: its retention starts again.
        let (reply, _): (redis::streams::StreamRangeReply, i64) = redis::pipe()
            .xrevrange_count(&key, "+", "-", limit.max(1))
            .pexpire(&key, self.retention_ms as i64)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids.into_iter().rev() {
            match message_from_entry(&entry.id, &entry.map) {
                Some(m) => out.push(m),
                None => warn!(%room, id = %entry.id, "skipping an unreadable chat entry in Redis"),
            }
        }
        if limit == 0 {
            out.clear();
        }
        Ok(out)
    }

    async fn chat_author(&self, room: &str, id: u64) -> StateResult<Option<String>> {
        let entry = format!("{id}-0");
        let reply: redis::streams::StreamRangeReply = self
            .conn
            .clone()
            .xrange(self.chat_key(room), &entry, &entry)
            .await
            .map_err(unavailable)?;
        Ok(reply.ids.first().and_then(|e| field(&e.map, "identity")))
    }

    async fn chat_delete(&self, room: &str, id: u64) -> StateResult<bool> {
        let n: i64 = self
            .scripts
            .chat_delete
            .key(self.chat_key(room))
            .arg(id)
            .arg(&self.channel)
            .arg(room)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(n > 0)
    }

    async fn purge_idle_chat(&self, _cutoff_ms: u64) -> StateResult<usize> {
        // Each room's stream expires `retention` after its last message or reader.
        Ok(0)
    }

    async fn heartbeat(&self, instance: &str) -> StateResult<()> {
        let () = redis::cmd("SET")
            .arg(self.key(&format!("instance:{instance}")))
            .arg(1)
            .arg("PX")
            .arg(super::INSTANCE_TTL.as_millis() as u64)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn check(&self) -> StateResult<()> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn field(map: &HashMap<String, Value>, name: &str) -> Option<String> {
    match map.get(name)? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn message_from_entry(id: &str, map: &HashMap<String, Value>) -> Option<ChatMessage> {
    let (ms, _) = id.split_once('-')?;
    Some(ChatMessage {
        id: ms.parse().ok()?,
        from: Sender {
            identity: field(map, "identity")?,
            name: field(map, "name")?,
        },
        text: field(map, "text")?,
        ts: field(map, "ts")?.parse().ok()?,
    })
}
