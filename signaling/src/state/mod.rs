//! The state signaling instances share: rooms, seats (participants and their presence),
//! room → node placement, room settings, chat history, and the room events that fan out
//! to every instance.
//!
//! One trait, [`SharedState`], two implementations: [`memory::MemoryState`] (one process,
//! the embedded default and dev mode; chat history and settings optionally in SQLite) and
//! [`redis::RedisState`] (`--redis`: any number of instances behind a plain load
//! balancer). Both are tested by the same suite (`state/tests.rs`).
//!
//! What stays out of here is what only the instance holding a client's WebSocket needs:
//! the socket itself, rate-limit buckets, the control connection to a node. A seat's
//! record is written only by the instance that owns it ([`OwnedSeat::instance`]); the
//! others learn about it from [`RoomEvent`]s.
//!
//! Ordering: every change to a room's seats bumps the room's sequence number and
//! publishes the change with it, atomically with the change itself. A joiner gets the
//! sequence number its snapshot was taken at, so an instance shows it exactly the events
//! that came after its `joined` message, whichever instance they came from.

pub mod history;
pub mod memory;
pub mod redis;
pub mod settings_store;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use chorus_protocol::chat::{ChatMessage, Sender};
use chorus_protocol::client::ParticipantInfo;
use chorus_protocol::track::{TrackInfo, TrackSource};
use serde::{Deserialize, Serialize};

/// Room names are shown in URLs, logs and Redis keys; keep them to a safe, readable
/// alphabet.
pub fn valid_room_name(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= 64
        && room
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Per-room settings an admin can change (`PATCH /admin/rooms/{room}`). They outlive
/// the room's seats: in SQLite (a data dir) or Redis they survive restarts; in memory
/// they last as long as signaling runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSettings {
    /// Whether participants may ask for server-side noise suppression; `None` follows the
    /// server default. The server-wide `--no-enhanced-audio` always wins.
    #[serde(default)]
    pub enhanced_audio: Option<bool>,
}

/// A participant's seat as every instance sees it. The owning instance is kept beside
/// it ([`OwnedSeat`]) because it changes on its own when a session resumes elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seat {
    /// Unique across every instance sharing the state (nodes route by it).
    pub id: u64,
    pub room: String,
    pub identity: String,
    pub name: String,
    /// The client protocol version the seat was taken with (1: audio only, 2: video).
    pub protocol: u32,
    pub muted: bool,
    pub speaking: bool,
    pub publishing: bool,
    /// What the node last said the participant publishes.
    #[serde(default)]
    pub tracks: Vec<TrackInfo>,
    /// The node the participant's media session lives on.
    pub node: String,
    /// The participant's chat channel is open (an instance taking the seat over must
    /// keep delivering chat to it).
    #[serde(default)]
    pub chat_ready: bool,
    /// Server-side noise suppression is on.
    #[serde(default)]
    pub enhanced: bool,
}

impl Seat {
    /// The participant as clients see it.
    pub fn info(&self) -> ParticipantInfo {
        ParticipantInfo {
            sid: self.id.to_string(),
            identity: self.identity.clone(),
            name: self.name.clone(),
            muted: self.muted,
            speaking: self.speaking,
            publishing: self.publishing,
            tracks: self
                .tracks
                .iter()
                .map(|t| TrackInfo {
                    // Signaling owns the mute state: show it on the microphone at once,
                    // not when the node next reports the tracks.
                    muted: if t.source == TrackSource::Microphone {
                        self.muted
                    } else {
                        t.muted
                    },
                    ..t.clone()
                })
                .collect(),
        }
    }
}

/// A seat and the instance that holds its client's WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnedSeat {
    pub instance: String,
    pub seat: Seat,
}

/// A room as one atomic read saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoomSnapshot {
    /// The room's sequence number when the snapshot was taken: every later change to
    /// its seats carries a larger one.
    pub seq: u64,
    /// Every seat, ordered by id.
    pub seats: Vec<OwnedSeat>,
    /// The room's placement, if it has one.
    pub node: Option<String>,
    /// The last dominant speaker a node reported.
    pub dominant: Option<u64>,
    pub settings: RoomSettings,
}

/// A change in a room, delivered to every instance (including the one that made it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEvent {
    pub room: String,
    /// The room's sequence number after a seat change; 0 for events that are not about
    /// seats (chat, settings, takeovers), which need no ordering against `joined`.
    #[serde(default)]
    pub seq: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Joined(OwnedSeat),
    Updated(OwnedSeat),
    /// `reason` as clients see it in `participant_left` (`left`, `disconnected`,
    /// `replaced`, `media_failed`).
    Left {
        #[serde(flatten)]
        seat: OwnedSeat,
        reason: String,
    },
    /// The seat's session resumed on `seat.instance`: the previous owner lets go of it
    /// without touching its media session.
    Moved(OwnedSeat),
    /// A chat message from participant `sender`, who gets its own copy (with its `ref`)
    /// from its instance directly.
    Chat {
        sender: u64,
        message: ChatMessage,
    },
    ChatDeleted {
        id: u64,
    },
    Settings(RoomSettings),
}

impl EventKind {
    /// Whether this is a change to the room's seats, ordered by the room's sequence.
    pub fn is_seat_change(&self) -> bool {
        matches!(
            self,
            EventKind::Joined(_) | EventKind::Updated(_) | EventKind::Left { .. }
        )
    }
}

/// How long an instance counts as alive after its last [`SharedState::heartbeat`].
pub const INSTANCE_TTL: std::time::Duration = std::time::Duration::from_secs(15);

/// How often an instance says it is alive.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where an implementation delivers room events. Called in per-room order; it must not
/// block (it runs under the memory state's lock, or on the Redis subscriber task).
pub type EventSink = Arc<dyn Fn(RoomEvent) + Send + Sync>;

/// A request for a seat.
#[derive(Debug, Clone)]
pub struct JoinRequest<'a> {
    pub room: &'a str,
    pub identity: &'a str,
    pub name: &'a str,
    pub protocol: u32,
    /// The instance asking (and holding the client's WebSocket).
    pub instance: &'a str,
    /// Take back the identity's seat if it has one with the same protocol.
    pub resume: bool,
    /// Nodes this instance has a control connection to, best first: a room without a
    /// placement is placed on the first, and a seat can only be resumed here if its
    /// node is among them.
    pub nodes: &'a [String],
}

#[derive(Debug, Clone, PartialEq)]
pub enum JoinOutcome {
    /// A fresh seat. `replaced` is the identity's previous seat, which was removed.
    Seated {
        seat: Seat,
        room: RoomSnapshot,
        replaced: Option<OwnedSeat>,
    },
    /// The identity's seat, taken back. `from` is the instance that held it when that
    /// was another one (it got [`EventKind::Moved`]).
    Resumed {
        seat: Seat,
        room: RoomSnapshot,
        from: Option<String>,
    },
    /// The room lives on a node this instance has no connection to.
    NodeUnreachable { node: String },
    /// No node to place the room on.
    NoNode,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Redis cannot be reached (or answered too slowly).
    #[error("the shared state is unavailable: {0}")]
    Unavailable(String),
    /// The state holds data this instance cannot read.
    #[error("the shared state holds unreadable data: {0}")]
    Corrupt(String),
    /// The chat or settings store failed (SQLite).
    #[error("{0:#}")]
    Store(anyhow::Error),
}

pub type StateResult<T> = Result<T, StateError>;

/// Everything instances share. Methods that change a room publish the matching
/// [`RoomEvent`] to every subscriber, atomically with the change.
#[async_trait]
pub trait SharedState: Send + Sync + 'static {
    /// Starts delivering every room's events to `sink`.
    async fn subscribe(&self, sink: EventSink) -> StateResult<()>;

    /// A fresh id for a seat, unique across every instance sharing this state.
    async fn next_seat_id(&self) -> StateResult<u64>;

    /// Seats `req.identity` in `req.room` with the seat id `id` (from
    /// [`SharedState::next_seat_id`]), or gives back its seat when resuming. Placement
    /// is taken here, atomically: two instances never place one room twice.
    async fn join(&self, req: JoinRequest<'_>, id: u64) -> StateResult<JoinOutcome>;

    /// Writes a seat its owner changed and, when `announce` (a change clients see),
    /// publishes `Updated`. False (nothing written) when the seat is gone or `instance`
    /// no longer owns it.
    async fn update_seat(&self, instance: &str, seat: &Seat, announce: bool) -> StateResult<bool>;

    /// Removes a seat `instance` owns and publishes `Left`; the room's placement goes
    /// with its last seat. The removed seat, or `None` if it was gone or owned elsewhere.
    async fn remove_seat(
        &self,
        instance: &str,
        room: &str,
        id: u64,
        reason: &str,
    ) -> StateResult<Option<Seat>>;

    /// The room as it is now (empty when it has no seats).
    async fn room(&self, room: &str) -> StateResult<RoomSnapshot>;

    /// Every room with seats or settings, sorted.
    async fn rooms(&self) -> StateResult<Vec<String>>;

    /// Records a node's dominant-speaker report (for late joiners' `joined`). Ignored
    /// unless the room is placed on `node`.
    async fn set_dominant(&self, room: &str, node: &str, dominant: Option<u64>) -> StateResult<()>;

    /// Stores a room's settings (the default forgets them) and publishes `Settings`.
    async fn put_settings(&self, room: &str, settings: RoomSettings) -> StateResult<()>;

    /// Appends a chat message (ids strictly increase per room), keeps the room's history
    /// bounded, and publishes `Chat`.
    async fn chat_append(
        &self,
        room: &str,
        sender: u64,
        from: &Sender,
        text: &str,
        ts: u64,
    ) -> StateResult<ChatMessage>;

    /// The last `limit` messages of a room, oldest first.
    async fn chat_recent(&self, room: &str, limit: usize) -> StateResult<Vec<ChatMessage>>;

    /// The identity that wrote message `id` in `room`, if it exists.
    async fn chat_author(&self, room: &str, id: u64) -> StateResult<Option<String>>;

    /// Deletes a message and publishes `ChatDeleted`; false if it did not exist.
    async fn chat_delete(&self, room: &str, id: u64) -> StateResult<bool>;

    /// Forgets the chat of rooms without seats whose newest message is older than
    /// `cutoff_ms`. Returns how many messages went. (Redis expires them by itself.)
    async fn purge_idle_chat(&self, cutoff_ms: u64) -> StateResult<usize>;

    /// Says `instance` is alive, for a while ([`INSTANCE_TTL`]); instances call it every
    /// [`HEARTBEAT`]. The seats of an instance that stopped saying so are removed by the
    /// next join of their room (reason `disconnected`).
    async fn heartbeat(&self, instance: &str) -> StateResult<()>;

    /// Whether the state can be used right now (for `/readyz`), and why not.
    async fn check(&self) -> StateResult<()>;
}
