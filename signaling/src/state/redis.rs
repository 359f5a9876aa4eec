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
use redis::{AsyncCommands, IntoConnectionInfo, ProtocolVersion, PushKind, Script, Value};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    EventKind, EventSink, JoinOutcome, JoinRequest, OwnedSeat, RoomEvent, RoomSettings,
    RoomSnapshot, Seat, SharedState, StateError, StateResult,
};

/// How long a command may take before the caller gets `Unavailable`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the events connection is checked (see [`read_events`]).
const EVENTS_PING: Duration = Duration::from_secs(1);

/// Shared Lua helpers, prepended to the scripts that need them. `owned` wraps a seat
/// with its owner; `snapshot` is the reply every seat-changing script returns.
const LUA_HELPERS: &str = r#"
local function has(list, x)
  for _, v in ipairs(list) do if v == x then return true end end
  return false
end
local function owned(owners, sid, json)
  return '{"instance":' .. cjson.encode(redis.call('HGET', owners, sid) or '') .. ',"seat":' .. json .. '}'
end
-- INCR, but a counter that is missing (a Redis that restarted without its data) starts
-- from the current time in microseconds, so it still only ever grows: instances compare
-- sequence numbers with ones they saw before the restart, and nodes still hold seat ids.
-- Returns the value as a string: Lua numbers are doubles, and concatenating one this
-- large prints it rounded in exponent form.
local function bump(k)
  if redis.call('EXISTS', k) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', k, t[1] .. string.rep('0', 6 - #t[2]) .. t[2])
  end
  redis.call('INCR', k)
  return redis.call('GET', k)
end
local function publish(channel, room, seq, kind)
  redis.call('PUBLISH', channel, '{"room":' .. cjson.encode(room) .. ',"seq":' .. seq .. ',"kind":' .. kind .. '}')
end
-- Removes the room's seats whose owner stopped saying it is alive (it crashed or lost
-- Redis for longer than the instance TTL); everyone hears they left.
local function purge_dead(seats, owners, idents, seqk, channel, room, live_prefix)
  local all = redis.call('HGETALL', owners)
  local alive = {}
  for i = 1, #all, 2 do
    local sid, inst = all[i], all[i + 1]
    if alive[inst] == nil then alive[inst] = redis.call('EXISTS', live_prefix .. inst) == 1 end
    if not alive[inst] then
      local json = redis.call('HGET', seats, sid)
      redis.call('HDEL', seats, sid)
      redis.call('HDEL', owners, sid)
      if json then
        local identity = cjson.decode(json).identity
        if redis.call('HGET', idents, identity) == sid then redis.call('HDEL', idents, identity) end
        publish(channel, room, bump(seqk), '{"left":{"instance":' .. cjson.encode(inst) .. ',"seat":' .. json .. ',"reason":"disconnected"}}')
      end
    end
  end
end
local function snapshot(seats, owners, nodek, domk, settingsk, seqk, room)
  local all = redis.call('HGETALL', seats)
  local parts = {}
  for i = 1, #all, 2 do parts[#parts + 1] = owned(owners, all[i], all[i + 1]) end
  local node = ''
  if #all > 0 then node = redis.call('GET', nodek) or '' end
  return '"seq":' .. (redis.call('GET', seqk) or '0')
    .. ',"seats":[' .. table.concat(parts, ',') .. ']'
    .. ',"node":' .. cjson.encode(node)
    .. ',"dominant":' .. cjson.encode(redis.call('GET', domk) or '')
    .. ',"settings":' .. cjson.encode(redis.call('HGET', settingsk, room) or '')
end
"#;

/// KEYS: seats owners identities node dominant settings rooms seq
/// ARGV: room identity name protocol instance resume(0/1) nodes(JSON array) id channel
///       live-prefix live-ttl-ms
const JOIN: &str = r#"
local seats, owners, idents, nodek, domk, settingsk, roomsk, seqk =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local room, identity, name, protocol, instance = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local resume, nodes, id, channel = ARGV[6] == '1', cjson.decode(ARGV[7]), ARGV[8], ARGV[9]
-- The joiner's instance is alive (also right after a Redis restart, before its next
-- heartbeat).
redis.call('SET', ARGV[10] .. instance, '1', 'PX', ARGV[11])
purge_dead(seats, owners, idents, seqk, channel, room, ARGV[10])
local function reply(outcome, extra)
  return '{"outcome":"' .. outcome .. '",' .. extra
    .. snapshot(seats, owners, nodek, domk, settingsk, seqk, room) .. '}'
end
local replaced = 'null'
local existing = redis.call('HGET', idents, identity)
if existing then
  local json = redis.call('HGET', seats, existing)
  if json then
    local old = cjson.decode(json)
    local owner = redis.call('HGET', owners, existing) or ''
    if resume and tostring(old.protocol) == protocol and (owner == instance or has(nodes, old.node)) then
      local from = 'null'
      if owner ~= instance then
        redis.call('HSET', owners, existing, instance)
        publish(channel, room, 0, '{"moved":' .. owned(owners, existing, json) .. '}')
        from = cjson.encode(owner)
      end
      return reply('resumed', '"seat":' .. json .. ',"from":' .. from .. ',')
    end
    replaced = owned(owners, existing, json)
    redis.call('HDEL', seats, existing)
    redis.call('HDEL', owners, existing)
    local seq = bump(seqk)
    publish(channel, room, seq, '{"left":{"instance":' .. cjson.encode(owner) .. ',"seat":' .. json .. ',"reason":"replaced"}}')
  end
  redis.call('HDEL', idents, identity)
end
local node = redis.call('GET', nodek)
if node and redis.call('HLEN', seats) > 0 then
  if not has(nodes, node) then
    return '{"outcome":"unreachable","node":' .. cjson.encode(node) .. '}'
  end
else
  if #nodes == 0 then
    redis.call('DEL', nodek, domk)
    redis.call('SREM', roomsk, room)
    return '{"outcome":"no_node"}'
  end
  node = nodes[1]
  redis.call('SET', nodek, node)
  redis.call('DEL', domk)
end
local seat = '{"id":' .. id .. ',"room":' .. cjson.encode(room) .. ',"identity":' .. cjson.encode(identity)
  .. ',"name":' .. cjson.encode(name) .. ',"protocol":' .. protocol
  .. ',"muted":false,"speaking":false,"publishing":false,"tracks":[],"node":' .. cjson.encode(node)
  .. ',"chat_ready":false,"enhanced":false}'
redis.call('HSET', seats, id, seat)
redis.call('HSET', owners, id, instance)
redis.call('HSET', idents, identity, id)
redis.call('SADD', roomsk, room)
local seq = bump(seqk)
publish(channel, room, seq, '{"joined":{"instance":' .. cjson.encode(instance) .. ',"seat":' .. seat .. '}}')
return reply('seated', '"seat":' .. seat .. ',"replaced":' .. replaced .. ',')
"#;

/// KEYS: seats owners seq   ARGV: room id instance seat-json channel announce(0/1)
const UPDATE: &str = r#"
local seats, owners, seqk = KEYS[1], KEYS[2], KEYS[3]
local room, id, instance, json, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('HGET', owners, id) ~= instance or redis.call('HEXISTS', seats, id) == 0 then
  return 0
end
redis.call('HSET', seats, id, json)
if ARGV[6] ~= '1' then return 1 end
local seq = bump(seqk)
publish(channel, room, seq, '{"updated":{"instance":' .. cjson.encode(instance) .. ',"seat":' .. json .. '}}')
return 1
"#;

/// KEYS: seats owners identities node dominant rooms seq   ARGV: room id instance reason channel
const REMOVE: &str = r#"
local seats, owners, idents, nodek, domk, roomsk, seqk =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local room, id, instance, reason, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('HGET', owners, id) ~= instance then return false end
local json = redis.call('HGET', seats, id)
if not json then return false end
redis.call('HDEL', seats, id)
redis.call('HDEL', owners, id)
local identity = cjson.decode(json).identity
if redis.call('HGET', idents, identity) == id then redis.call('HDEL', idents, identity) end
if redis.call('HLEN', seats) == 0 then
  redis.call('DEL', seats, owners, idents, nodek, domk)
  redis.call('SREM', roomsk, room)
end
local seq = bump(seqk)
publish(channel, room, seq, '{"left":{"instance":' .. cjson.encode(instance) .. ',"seat":' .. json .. ',"reason":' .. cjson.encode(reason) .. '}}')
return json
"#;

/// KEYS: seats owners node dominant settings seq   ARGV: room
const SNAPSHOT: &str = r#"
return '{' .. snapshot(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[1]) .. '}'
"#;

/// KEYS: seat_id
const SEAT_ID: &str = "return bump(KEYS[1])";

/// KEYS: node dominant   ARGV: node participant-or-empty
const DOMINANT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"#;

/// KEYS: chat_id stream   ARGV: maxlen retention_ms identity name text ts channel room sender
const CHAT_APPEND: &str = r#"
redis.call('INCR', KEYS[1])
local id = redis.call('GET', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], id .. '-0',
  'identity', ARGV[3], 'name', ARGV[4], 'text', ARGV[5], 'ts', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
publish(ARGV[7], ARGV[8], 0, '{"chat":{"sender":' .. ARGV[9] .. ',"message":{"id":' .. id
  .. ',"from":{"identity":' .. cjson.encode(ARGV[3]) .. ',"name":' .. cjson.encode(ARGV[4])
  .. '},"text":' .. cjson.encode(ARGV[5]) .. ',"ts":' .. ARGV[6] .. '}}}')
return id
"#;

/// KEYS: stream   ARGV: id channel room
const CHAT_DELETE: &str = r#"
local n = redis.call('XDEL', KEYS[1], ARGV[1] .. '-0')
if n > 0 then publish(ARGV[2], ARGV[3], 0, '{"chat_deleted":{"id":' .. ARGV[1] .. '}}') end
return n
"#;

struct Scripts {
    seat_id: Script,
    join: Script,
    update: Script,
    remove: Script,
    snapshot: Script,
    dominant: Script,
    chat_append: Script,
    chat_delete: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_helpers = |body: &str| Script::new(&format!("{LUA_HELPERS}\n{body}"));
        Scripts {
            seat_id: with_helpers(SEAT_ID),
            join: with_helpers(JOIN),
            update: with_helpers(UPDATE),
            remove: with_helpers(REMOVE),
            snapshot: with_helpers(SNAPSHOT),
            dominant: Script::new(DOMINANT),
            chat_append: with_helpers(CHAT_APPEND),
            chat_delete: with_helpers(CHAT_DELETE),
        }
    }
}

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
