//! The hub composes one instance: the seats whose WebSocket this instance holds, the
//! shared state ([`crate::state`]) every instance sees, the chat rules
//! ([`crate::chat`]) and the node connections ([`crate::nodes`]).
//!
//! Imports run one way: `http → ws → hub → {state, chat, nodes, session}`.
//!
//! Changes go to the shared state first; what clients see of them comes back as room
//! events ([`RoomEvent`]), from this instance or another, in the room's order. Each event
//! is encoded once and its bytes shared by every local recipient.
//!
//! Locks: `local` (this instance's seats) is a plain mutex, never held across an
//! `.await` and never while calling the state; the state may call [`Hub::on_event`]
//! (which takes `local`) under its own lock, so the order is always state → local →
//! nodes. Nothing blocking (SQLite, Redis) runs under `local`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chorus_protocol::chat::{ChatErrorCode, ChatServerFrame, Sender};
use chorus_protocol::client::{ErrorCode, Grants, IceServer, ServerMessage};
use chorus_protocol::control::{FromNode, NodeErrorCode, ToNode};
use chorus_protocol::track::{Quality, ReceiveStats};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::chat::{check, error_frame, ChatBucket, ChatConfig, ChatRequest};
use crate::nodes::Nodes;
use crate::session::{encode, Session, SessionTx};
use crate::state::{
    EventKind, JoinOutcome, JoinRequest, RoomEvent, RoomSettings, RoomSnapshot, Seat, SharedState,
    StateError,
};
use crate::token::Claims;

mod admin;
mod events;
mod node_events;
mod seats;

pub use admin::{AdminParticipant, RoomOverview};

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub reconnect_grace: Duration,
    /// ICE servers every client gets (STUN, static TURN).
    pub ice_servers: Vec<IceServer>,
    /// TURN REST credentials minted per join.
    pub turn: Option<TurnRest>,
    pub chat: ChatConfig,
    /// Whether clients may ask for server-side noise suppression (it costs SFU CPU).
    pub allow_enhanced_audio: bool,
}

/// TURN REST API (shared secret) settings: signaling mints a username/password pair per
/// join that the TURN relay verifies with the same secret.
#[derive(Debug, Clone)]
pub struct TurnRest {
    pub urls: Vec<String>,
    pub secret: String,
    pub ttl: Duration,
}

impl TurnRest {
    pub fn credentials(&self, identity: &str) -> IceServer {
        use base64::Engine;
        use hmac::{Hmac, Mac};
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + self.ttl.as_secs();
        let username = format!("{expiry}:{identity}");
        let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(self.secret.as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(username.as_bytes());
        let credential =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        IceServer {
            urls: self.urls.clone(),
            username: Some(username),
            credential: Some(credential),
        }
    }
}

/// What a client's `update_subscription` changes (each field left out stays).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionUpdate {
    pub max_quality: Option<Quality>,
    pub visible: Option<bool>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// Largest tile size (device pixels) a client may report for adaptive stream.
pub const MAX_VIEW_PIXELS: u32 = 16_384;

/// Where a seat's chat channel is.
enum ChatChannel {
    Closed,
    /// Open; the history is being read. Live chat events wait here so that none is
    /// lost or shown twice around the history.
    Opening(Vec<EventKind>),
    Ready,
}

/// A seat whose client's WebSocket this instance holds.
struct LocalSeat {
    /// This instance's copy is the authoritative one; the shared state gets it after
    /// every change (see [`Hub::write_seat`]).
    seat: Seat,
    grants: Grants,
    session: Option<Session>,
    /// The room events up to this sequence number are reflected in what the client
    /// was shown (its `joined` snapshot, then each event).
    seen_seq: u64,
    chat: ChatChannel,
    chat_bucket: ChatBucket,
    /// The node's latest report on this participant's downlink (video receivers only).
    receive: Option<ReceiveStats>,
    /// Bumped on every disconnect so a stale grace timer does not remove a seat that
    /// was resumed (and perhaps dropped again) in the meantime.
    disconnect_epoch: u64,
    /// The seat changed since the last write to the shared state; `announce`: in a way
    /// clients see (mute, speaking, tracks), so the write is broadcast as
    /// `participant_updated`; `writing`: a task is writing it (it writes again until the
    /// seat is clean, so writes never reorder).
    dirty: bool,
    announce: bool,
    writing: bool,
}

impl LocalSeat {
    fn send(&self, msg: &ServerMessage) {
        if let Some(s) = &self.session {
            s.send(self.seat.id, encode(msg));
        }
    }
}

/// A join waiting for the shared state: events of its room are kept until its
/// `joined` is sent, then the ones its snapshot does not cover are delivered.
struct Pending {
    room: String,
    events: Vec<RoomEvent>,
}

#[derive(Default)]
struct Local {
    seats: HashMap<u64, LocalSeat>,
    /// Local seats per room.
    rooms: HashMap<String, BTreeSet<u64>>,
    /// Joins in flight, by connection.
    pending: HashMap<u64, Pending>,
}

impl Local {
    fn insert(&mut self, s: LocalSeat) {
        self.rooms
            .entry(s.seat.room.clone())
            .or_default()
            .insert(s.seat.id);
        self.seats.insert(s.seat.id, s);
    }

    fn take(&mut self, id: u64) -> Option<LocalSeat> {
        let s = self.seats.remove(&id)?;
        if let Some(r) = self.rooms.get_mut(&s.seat.room) {
            r.remove(&id);
            if r.is_empty() {
                self.rooms.remove(&s.seat.room);
            }
        }
        Some(s)
    }

    fn in_room(&self, room: &str) -> Vec<u64> {
        self.rooms
            .get(room)
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default()
    }
}

pub struct Hub {
    config: HubConfig,
    /// This instance's name in the shared state (random per process).
    instance: String,
    state: Arc<dyn SharedState>,
    nodes: Nodes,
    local: Mutex<Local>,
}

/// A successful join: the seat's id. The `joined` message is already queued on the
/// session (see [`Hub::join`]).
pub struct Joined {
    pub participant: u64,
}

pub type HubError = (ErrorCode, String);

/// Aggregate figures for `/metrics`: this instance's share of the fleet.
#[derive(Debug, Clone, Copy, Default)]
pub struct HubStats {
    pub rooms: usize,
    pub participants: usize,
    pub connected_sessions: usize,
    pub nodes: usize,
}

fn unavailable(e: StateError) -> HubError {
    warn!("shared state: {e}");
    (
        ErrorCode::Unavailable,
        format!("{e}; try again in a moment"),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hub {
    /// A hub over `state`, subscribed to its room events.
    pub async fn start(
        config: HubConfig,
        state: Arc<dyn SharedState>,
    ) -> anyhow::Result<Arc<Self>> {
        let hub = Arc::new(Hub {
            config,
            instance: format!("{:012x}", rand::random::<u64>() >> 16),
            state,
            nodes: Nodes::default(),
            local: Mutex::new(Local::default()),
        });
        let weak = Arc::downgrade(&hub);
        hub.state
            .subscribe(Arc::new(move |ev| {
                if let Some(hub) = weak.upgrade() {
                    hub.on_event(ev);
                }
            }))
            .await?;
        // Alive before the first join, then every few seconds while the hub lives.
        hub.state.heartbeat(&hub.instance).await?;
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::state::HEARTBEAT);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(hub) = weak.upgrade() else { return };
                if let Err(e) = hub.state.heartbeat(&hub.instance).await {
                    debug!("heartbeat not stored: {e}");
                }
            }
        });
        info!(instance = %hub.instance, "signaling instance started");
        Ok(hub)
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        // A panic while holding the lock would be a bug in this file; keep serving with
        // the data as it is rather than taking the whole front door down.
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn state(&self) -> &Arc<dyn SharedState> {
        &self.state
    }

    pub fn stats(&self) -> HubStats {
        let local = self.lock();
        HubStats {
            rooms: local.rooms.len(),
            participants: local.seats.len(),
            connected_sessions: local.seats.values().filter(|s| s.session.is_some()).count(),
            nodes: self.nodes.len(),
        }
    }

    /// Room → node placement of the rooms this instance has seats in.
    pub fn placements(&self) -> HashMap<String, String> {
        self.lock()
            .seats
            .values()
            .map(|s| (s.seat.room.clone(), s.seat.node.clone()))
            .collect()
    }

    /// Seats the token's identity in the token's room (or takes back its seat).
    /// `protocol` is the client protocol version the client asked for (1 or 2).
    ///
    /// `joined` is the first message the session gets: it is queued under the local
    /// lock together with the seat, and events of the room that arrive meanwhile wait
    /// in [`Pending`] until then.
    pub async fn join(
        &self,
        claims: &Claims,
        resume: bool,
        protocol: u32,
        conn: u64,
        tx: SessionTx,
    ) -> Result<Joined, HubError> {
        self.lock().pending.insert(
            conn,
            Pending {
                room: claims.room.clone(),
                events: Vec::new(),
            },
        );
        let outcome = self.join_state(claims, resume, protocol).await;
        let finished = self.finish_join(claims, protocol, Session { conn, tx }, outcome);
        match finished {
            Ok(joined) => joined,
            // Seated in the shared state, but the node went away meanwhile.
            Err((room, id, error)) => {
                self.release(&room, id, "media_failed").await;
                Err(error)
            }
        }
    }

    /// The local half of a join, under the local lock. `Err` asks the caller to
    /// release a seat the state gave but this instance cannot serve.
    #[allow(clippy::type_complexity)]
    fn finish_join(
        &self,
        claims: &Claims,
        protocol: u32,
        session: Session,
        outcome: Result<JoinOutcome, HubError>,
    ) -> Result<Result<Joined, HubError>, (String, u64, HubError)> {
        let mut local = self.lock();
        let pending = local
            .pending
            .remove(&session.conn)
            .map(|p| p.events)
            .unwrap_or_default();
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => return Ok(Err(e)),
        };
        Ok(match outcome {
            JoinOutcome::NoNode => Err((
                ErrorCode::NoMediaNode,
                "no media server is connected; try again in a moment".to_string(),
            )),
            JoinOutcome::NodeUnreachable { node } => Err((
                ErrorCode::NoMediaNode,
                format!(
                    "this room's media server ({node}) is not connected to this signaling \
                     instance; try again in a moment"
                ),
            )),
            JoinOutcome::Seated { seat, room, .. } => {
                let id = seat.id;
                let sent = self.nodes.send(
                    &seat.node,
                    ToNode::AddParticipant {
                        participant: id,
                        room: seat.room.clone(),
                        identity: seat.identity.clone(),
                        name: seat.name.clone(),
                        publish: claims.grants.publish,
                        subscribe: claims.grants.subscribe,
                        video: protocol >= 2,
                    },
                );
                if !sent {
                    return Err((
                        seat.room,
                        id,
                        (
                            ErrorCode::NoMediaNode,
                            "the media server for this room went away; try again".into(),
                        ),
                    ));
                }
                self.nodes.seat_added(&seat.node);
                info!(participant = id, room = %seat.room, identity = %seat.identity, node = %seat.node, "joined");
                self.seat_locally(
                    &mut local,
                    seat,
                    claims.grants,
                    session,
                    &room,
                    false,
                    pending,
                );
                Ok(Joined { participant: id })
            }
            JoinOutcome::Resumed { seat, room, from } => {
                let id = seat.id;
                let here = local.seats.get_mut(&id);
                match (from, here) {
                    (None, Some(s)) => {
                        if let Some(old) = s.session.take() {
                            // The old socket is presumably dead; make sure its writer stops.
                            old.close(4001, "resumed elsewhere");
                        }
                        s.grants = claims.grants;
                        let mine = s.seat.clone();
                        let s = local.take(id).expect("seat checked above");
                        info!(participant = id, room = %mine.room, "seat resumed");
                        let keep = LocalSeat { session: None, ..s };
                        self.first_message(&mut local, keep, session, &room, true, pending);
                        Ok(Joined { participant: id })
                    }
                    (from, _) => {
                        // The seat lived on another instance (or this one let go of it
                        // meanwhile): the node hands its media session to this one.
                        if !self
                            .nodes
                            .send(&seat.node, ToNode::Adopt { participant: id })
                        {
                            return Err((
                                seat.room,
                                id,
                                (
                                    ErrorCode::NoMediaNode,
                                    "the media server for this room went away; rejoin".into(),
                                ),
                            ));
                        }
                        self.nodes.seat_added(&seat.node);
                        info!(participant = id, room = %seat.room, from = ?from, "seat resumed from another instance");
                        self.seat_locally(
                            &mut local,
                            seat,
                            claims.grants,
                            session,
                            &room,
                            true,
                            pending,
                        );
                        Ok(Joined { participant: id })
                    }
                }
            }
        })
    }

    async fn join_state(
        &self,
        claims: &Claims,
        resume: bool,
        protocol: u32,
    ) -> Result<JoinOutcome, HubError> {
        let nodes = self.nodes.ranked();
        let id = self.state.next_seat_id().await.map_err(unavailable)?;
        let req = JoinRequest {
            room: &claims.room,
            identity: &claims.sub,
            name: claims.display_name(),
            protocol,
            instance: &self.instance,
            resume,
            nodes: &nodes,
        };
        self.state.join(req, id).await.map_err(unavailable)
    }

    #[allow(clippy::too_many_arguments)]
    fn seat_locally(
        &self,
        local: &mut Local,
        seat: Seat,
        grants: Grants,
        session: Session,
        room: &RoomSnapshot,
        resumed: bool,
        pending: Vec<RoomEvent>,
    ) {
        let chat = if seat.chat_ready {
            ChatChannel::Ready
        } else {
            ChatChannel::Closed
        };
        let s = LocalSeat {
            seat,
            grants,
            session: None,
            seen_seq: 0,
            chat,
            chat_bucket: ChatBucket::new(),
            receive: None,
            disconnect_epoch: 0,
            dirty: false,
            announce: false,
            writing: false,
        };
        self.first_message(local, s, session, room, resumed, pending);
    }

    /// Puts the seat in place with its session, queues `joined`, then whatever
    /// happened in the room after the snapshot.
    fn first_message(
        &self,
        local: &mut Local,
        mut s: LocalSeat,
        session: Session,
        room: &RoomSnapshot,
        resumed: bool,
        pending: Vec<RoomEvent>,
    ) {
        let id = s.seat.id;
        let joined = self.joined_message(&s, room, resumed);
        session.send(id, encode(&joined));
        s.session = Some(session);
        s.seen_seq = room.seq;
        local.insert(s);
        for ev in pending
            .iter()
            .filter(|e| e.kind.is_seat_change() && e.seq > room.seq)
        {
            self.apply(local, ev, Some(id));
        }
    }

    fn joined_message(&self, me: &LocalSeat, room: &RoomSnapshot, resumed: bool) -> ServerMessage {
        let mut ice_servers = self.config.ice_servers.clone();
        if let Some(turn) = &self.config.turn {
            ice_servers.push(turn.credentials(&me.seat.identity));
        }
        ServerMessage::Joined {
            protocol: me.seat.protocol,
            room: me.seat.room.clone(),
            me: me.seat.info(),
            participants: room
                .seats
                .iter()
                .filter(|s| s.seat.id != me.seat.id)
                .map(|s| s.seat.info())
                .collect(),
            ice_servers,
            grants: me.grants,
            resumed,
            reconnect_grace_secs: self.config.reconnect_grace.as_secs(),
            dominant_speaker: room
                .dominant
                .filter(|d| room.seats.iter().any(|s| s.seat.id == *d))
                .map(|d| d.to_string()),
        }
    }
}

fn owned(local: &Local, participant: u64, conn: u64) -> Result<&LocalSeat, HubError> {
    match local.seats.get(&participant) {
        Some(s) if s.session.as_ref().map(|s| s.conn) == Some(conn) => Ok(s),
        _ => Err((
            ErrorCode::NotJoined,
            "this session no longer holds a seat".into(),
        )),
    }
}

/// The chat frame for an error reading or writing the history.
fn store_error(reference: Option<String>, what: &str, e: &StateError) -> ChatServerFrame {
    warn!("chat {what} failed: {e}");
    error_frame(
        ChatErrorCode::ChatInvalid,
        &format!("the message could not be {what}; try again"),
        reference,
    )
}

fn sender_of(seat: &Seat) -> Sender {
    Sender {
        identity: seat.identity.clone(),
        name: seat.name.clone(),
    }
}

#[cfg(test)]
mod fleet_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod video_tests;
