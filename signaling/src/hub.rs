//! Rooms, participants, presence and node placement: the state signaling owns.
//!
//! One `Hub` per signaling process. Its state sits behind one mutex that is never held
//! across an `.await`; this is the control plane (a few messages per participant per
//! second), not the media path, so a lock is the simple and right tool here.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chorus_protocol::client::{ErrorCode, Grants, IceServer, ParticipantInfo, ServerMessage};
use chorus_protocol::control::{FromNode, NodeErrorCode, ToNode};
use chorus_protocol::track::{Quality, ReceiveStats, TrackInfo, TrackSource};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::chat::{ChatBucket, ChatConfig, ChatStore};
use crate::room_settings::RoomSettingsStore;
use crate::token::Claims;
use chorus_protocol::chat::{
    ChatClientFrame, ChatErrorCode, ChatServerFrame, Sender, MAX_CHAT_CHARS, MAX_REF_CHARS,
};

/// What the WebSocket writer task of one session is asked to do.
#[derive(Debug)]
pub enum Outbound {
    Msg(ServerMessage),
    /// Send a close frame with this code and reason, then stop.
    Close(u16, String),
}

pub type SessionTx = mpsc::Sender<Outbound>;

/// Queue length per client socket; a client this far behind is not reading and is cut.
pub const SESSION_QUEUE: usize = 1024;

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

struct Session {
    conn: u64,
    tx: SessionTx,
}

struct Participant {
    id: u64,
    room: String,
    identity: String,
    name: String,
    grants: Grants,
    /// The client protocol version the seat was taken with (1: audio only, 2: video).
    protocol: u32,
    muted: bool,
    speaking: bool,
    publishing: bool,
    /// What the node last said the participant publishes (`FromNode::Tracks`).
    tracks: Vec<TrackInfo>,
    /// The node's latest report on this participant's downlink (video receivers only).
    receive: Option<ReceiveStats>,
    node: String,
    session: Option<Session>,
    /// Server-side noise suppression is on for this participant.
    enhanced: bool,
    /// The participant's chat channel is open and has had its history.
    chat_ready: bool,
    chat_bucket: ChatBucket,
    /// Bumped on every disconnect so a stale grace timer does not remove a seat that
    /// was resumed (and perhaps dropped again) in the meantime.
    disconnect_epoch: u64,
}

impl Participant {
    fn info(&self) -> ParticipantInfo {
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

    fn send(&self, msg: ServerMessage) {
        if let Some(s) = &self.session {
            match s.tx.try_send(Outbound::Msg(msg)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => warn!(
                    participant = self.id,
                    "client is not reading its socket (queue full); message dropped"
                ),
                // The socket just went away (a leave or a drop racing this broadcast);
                // the seat is being removed or waits for a resume. Nothing to report.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    debug!(participant = self.id, "message to a closed session dropped")
                }
            }
        }
    }
}

/// Per-room settings an admin can change (`PATCH /admin/rooms/{room}`). They outlive
/// the room's seats: with a data dir they are kept in SQLite and survive restarts
/// (see [`crate::room_settings`]); otherwise they last as long as signaling runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoomSettings {
    /// Whether participants may ask for server-side noise suppression; `None` follows the
    /// server default. The server-wide `--no-enhanced-audio` always wins.
    #[serde(default)]
    pub enhanced_audio: Option<bool>,
}

/// A room as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomOverview {
    pub room: String,
    pub node: Option<String>,
    pub participants: Vec<AdminParticipant>,
    pub settings: RoomSettings,
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

/// A participant in the admin API's room view: what every client sees, plus how the
/// node serves its downlink (bandwidth estimate, allocation, layer and pause state per
/// video track) when it receives video.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdminParticipant {
    #[serde(flatten)]
    pub info: ParticipantInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive: Option<ReceiveStats>,
}

struct Room {
    node: String,
    participants: BTreeSet<u64>,
    /// Last dominant speaker the node reported, for late joiners.
    dominant: Option<u64>,
}

struct Node {
    tx: mpsc::UnboundedSender<ToNode>,
    participants: usize,
    reported_participants: u32,
}

#[derive(Default)]
struct State {
    next_id: u64,
    rooms: HashMap<String, Room>,
    participants: HashMap<u64, Participant>,
    nodes: HashMap<String, Node>,
    settings: HashMap<String, RoomSettings>,
}

pub struct Hub {
    config: HubConfig,
    state: Mutex<State>,
    chat: Arc<dyn ChatStore>,
    /// Where room settings are written through to; `None` keeps them in memory only.
    settings_store: Option<Arc<dyn RoomSettingsStore>>,
    /// Serialises settings updates (store write, then memory) so two concurrent PATCHes
    /// of one room cannot leave memory and the store disagreeing. Never taken while
    /// holding `state`.
    settings_write: Mutex<()>,
}

/// A successful join: the seat's id. The `joined` message is already queued on the
/// session (see [`Hub::join`]).
pub struct Joined {
    pub participant: u64,
}

pub type HubError = (ErrorCode, String);

/// Aggregate figures for `/metrics` and the admin view.
#[derive(Debug, Clone, Copy, Default)]
pub struct HubStats {
    pub rooms: usize,
    pub participants: usize,
    pub connected_sessions: usize,
    pub nodes: usize,
}

impl Hub {
    /// A hub whose room settings live in memory only.
    pub fn new(config: HubConfig, chat: Arc<dyn ChatStore>) -> Arc<Self> {
        Self::build(config, chat, None, HashMap::new())
    }

    /// A hub whose room settings are written through to `store`, starting with every
    /// room settings row the store can read (unreadable rows are logged and skipped).
    pub fn with_settings_store(
        config: HubConfig,
        chat: Arc<dyn ChatStore>,
        store: Arc<dyn RoomSettingsStore>,
    ) -> anyhow::Result<Arc<Self>> {
        let settings: HashMap<String, RoomSettings> = store
            .load_all()?
            .into_iter()
            .filter(|(_, s)| *s != RoomSettings::default())
            .collect();
        if !settings.is_empty() {
            info!(rooms = settings.len(), "loaded stored room settings");
        }
        Ok(Self::build(config, chat, Some(store), settings))
    }

    fn build(
        config: HubConfig,
        chat: Arc<dyn ChatStore>,
        settings_store: Option<Arc<dyn RoomSettingsStore>>,
        settings: HashMap<String, RoomSettings>,
    ) -> Arc<Self> {
        Arc::new(Hub {
            config,
            chat,
            settings_store,
            settings_write: Mutex::new(()),
            state: Mutex::new(State {
                next_id: 1,
                settings,
                ..Default::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this file; keep serving with
        // the data as it is rather than taking the whole front door down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    pub fn stats(&self) -> HubStats {
        let st = self.lock();
        HubStats {
            rooms: st.rooms.len(),
            participants: st.participants.len(),
            connected_sessions: st
                .participants
                .values()
                .filter(|p| p.session.is_some())
                .count(),
            nodes: st.nodes.len(),
        }
    }

    /// Rooms with at least one seat.
    pub fn active_rooms(&self) -> std::collections::HashSet<String> {
        self.lock().rooms.keys().cloned().collect()
    }

    pub fn chat_store(&self) -> &Arc<dyn ChatStore> {
        &self.chat
    }

    /// Room → node placement, for operators and tests.
    pub fn placements(&self) -> HashMap<String, String> {
        let st = self.lock();
        st.rooms
            .iter()
            .map(|(r, room)| (r.clone(), room.node.clone()))
            .collect()
    }

    /// Seats the token's identity in the token's room (or takes back its seat).
    /// `protocol` is the client protocol version the client asked for (1 or 2).
    pub fn join(
        &self,
        claims: &Claims,
        resume: bool,
        protocol: u32,
        conn: u64,
        tx: SessionTx,
    ) -> Result<Joined, HubError> {
        // `joined` must be the first message the session sees. It is queued while the
        // hub lock is held: queued after unlocking, another member's join could
        // broadcast `participant_joined` to this session first (seen in a 300-person
        // load test: the client rejected the join).
        let first = tx.clone();
        let mut st = self.lock();
        let existing = st
            .rooms
            .get(&claims.room)
            .and_then(|r| {
                r.participants.iter().find(|id| {
                    st.participants
                        .get(id)
                        .is_some_and(|p| p.identity == claims.sub)
                })
            })
            .copied();

        if let Some(id) = existing {
            // The media session was set up for the seat's protocol (video offered or
            // not); a client speaking another version cannot take it over as it is, so
            // it gets a fresh seat (`resumed: false`) and negotiates anew.
            let same_protocol = st
                .participants
                .get(&id)
                .is_some_and(|p| p.protocol == protocol);
            if resume && same_protocol {
                let p = st
                    .participants
                    .get_mut(&id)
                    .ok_or((ErrorCode::Internal, "seat vanished".into()))?;
                if let Some(old) = p.session.take() {
                    // The old socket is presumably dead; make sure its writer stops.
                    let _ = old
                        .tx
                        .try_send(Outbound::Close(4001, "resumed elsewhere".into()));
                }
                p.session = Some(Session { conn, tx });
                p.grants = claims.grants;
                info!(participant = id, room = %claims.room, identity = %claims.sub, "seat resumed");
                let message = joined_message(&st, &self.config, id, true);
                let _ = first.try_send(Outbound::Msg(message));
                return Ok(Joined { participant: id });
            }
            if let Some(p) = st.participants.get(&id) {
                if let Some(s) = &p.session {
                    let _ = s.tx.try_send(Outbound::Msg(ServerMessage::Left {
                        reason: "replaced".into(),
                    }));
                    let _ =
                        s.tx.try_send(Outbound::Close(4000, "replaced by a newer join".into()));
                }
            }
            remove_locked(&mut st, id, "replaced");
        }

        let node = match st.rooms.get(&claims.room) {
            Some(r) if st.nodes.contains_key(&r.node) => r.node.clone(),
            _ => st
                .nodes
                .iter()
                .min_by_key(|(id, n)| (n.participants, n.reported_participants, (*id).clone()))
                .map(|(id, _)| id.clone())
                .ok_or((
                    ErrorCode::NoMediaNode,
                    "no media server is connected; try again in a moment".to_string(),
                ))?,
        };

        let id = st.next_id;
        st.next_id += 1;
        let p = Participant {
            id,
            room: claims.room.clone(),
            identity: claims.sub.clone(),
            name: claims.display_name().to_string(),
            grants: claims.grants,
            protocol,
            muted: false,
            speaking: false,
            publishing: false,
            tracks: Vec::new(),
            receive: None,
            node: node.clone(),
            session: Some(Session { conn, tx }),
            enhanced: false,
            chat_ready: false,
            chat_bucket: ChatBucket::new(),
            disconnect_epoch: 0,
        };
        let info = p.info();
        if let Some(n) = st.nodes.get_mut(&node) {
            n.participants += 1;
            let _ = n.tx.send(ToNode::AddParticipant {
                participant: id,
                room: claims.room.clone(),
                identity: claims.sub.clone(),
                name: claims.display_name().to_string(),
                publish: claims.grants.publish,
                subscribe: claims.grants.subscribe,
                video: protocol >= 2,
            });
        }
        st.participants.insert(id, p);
        let room = st.rooms.entry(claims.room.clone()).or_insert_with(|| Room {
            node: node.clone(),
            participants: BTreeSet::new(),
            dominant: None,
        });
        room.node = node.clone();
        room.participants.insert(id);
        broadcast_locked(
            &st,
            &claims.room,
            Some(id),
            ServerMessage::ParticipantJoined { participant: info },
        );
        info!(participant = id, room = %claims.room, identity = %claims.sub, node = %node, "joined");
        let message = joined_message(&st, &self.config, id, false);
        let _ = first.try_send(Outbound::Msg(message));
        Ok(Joined { participant: id })
    }

    /// Relays a client's SDP/ICE to the participant's node. Returns an error for the
    /// client when the seat is gone. An offer's `tracks` are the client's declarations
    /// on the way in; they are resolved against the SDP and checked against the grants
    /// here ([`crate::tracks::resolve_offer`]), and a refused offer never reaches the
    /// node.
    pub fn to_node(&self, participant: u64, conn: u64, mut msg: ToNode) -> Result<(), HubError> {
        let st = self.lock();
        let p = owned(&st, participant, conn)?;
        if let ToNode::ClientOffer { sdp, tracks, .. } = &mut msg {
            *tracks = crate::tracks::resolve_offer(sdp, tracks, &p.grants)
                .map_err(|e| (e.code(), e.to_string()))?;
        }
        let node = st.nodes.get(&p.node).ok_or((
            ErrorCode::NoMediaNode,
            "the media server for this room went away".into(),
        ))?;
        let _ = node.tx.send(msg);
        Ok(())
    }

    /// The most `participant` wants of another participant's track. Only tracks someone
    /// else in the room publishes now are passed on; anything else is `unknown_track`.
    pub fn update_subscription(
        &self,
        participant: u64,
        conn: u64,
        track: String,
        view: SubscriptionUpdate,
    ) -> Result<(), HubError> {
        if view.width.is_some() != view.height.is_some() {
            return Err((
                ErrorCode::BadRequest,
                "update_subscription needs width and height together".into(),
            ));
        }
        if view
            .width
            .max(view.height)
            .is_some_and(|v| v > MAX_VIEW_PIXELS)
        {
            return Err((
                ErrorCode::BadRequest,
                format!("width and height are device pixels, at most {MAX_VIEW_PIXELS}"),
            ));
        }
        let st = self.lock();
        let p = owned(&st, participant, conn)?;
        let published = st.rooms.get(&p.room).is_some_and(|r| {
            r.participants
                .iter()
                .filter(|id| **id != participant)
                .filter_map(|id| st.participants.get(id))
                .any(|o| o.tracks.iter().any(|t| t.sid == track))
        });
        if !published {
            return Err((
                ErrorCode::UnknownTrack,
                format!("no one else in this room publishes a track {track:?}"),
            ));
        }
        let node = st.nodes.get(&p.node).ok_or((
            ErrorCode::NoMediaNode,
            "the media server for this room went away".into(),
        ))?;
        let _ = node.tx.send(ToNode::SetSubscription {
            participant,
            track,
            max_quality: view.max_quality,
            visible: view.visible,
            width: view.width,
            height: view.height,
        });
        Ok(())
    }

    pub fn set_muted(&self, participant: u64, conn: u64, muted: bool) -> Result<(), HubError> {
        let mut st = self.lock();
        owned(&st, participant, conn)?;
        let (room, info, node) = {
            let Some(p) = st.participants.get_mut(&participant) else {
                return Ok(());
            };
            if p.muted == muted {
                return Ok(());
            }
            p.muted = muted;
            if muted {
                p.speaking = false;
            }
            (p.room.clone(), p.info(), p.node.clone())
        };
        if let Some(n) = st.nodes.get(&node) {
            let _ = n.tx.send(ToNode::SetMuted { participant, muted });
        }
        broadcast_locked(
            &st,
            &room,
            None,
            ServerMessage::ParticipantUpdated { participant: info },
        );
        Ok(())
    }

    /// Server-side noise suppression for the participant's microphone.
    pub fn set_enhanced(&self, participant: u64, conn: u64, enabled: bool) -> Result<(), HubError> {
        let mut st = self.lock();
        owned(&st, participant, conn)?;
        let Some(p) = st.participants.get(&participant) else {
            return Ok(());
        };
        if enabled && !self.config.allow_enhanced_audio {
            return Err((
                ErrorCode::Forbidden,
                "server-side noise suppression is disabled on this server".into(),
            ));
        }
        let room_allows = st.settings.get(&p.room).and_then(|s| s.enhanced_audio) != Some(false);
        if enabled && !room_allows {
            return Err((
                ErrorCode::Forbidden,
                "server-side noise suppression is turned off in this room".into(),
            ));
        }
        let node = p.node.clone();
        if let Some(n) = st.nodes.get(&node) {
            let _ = n.tx.send(ToNode::SetEnhanced {
                participant,
                enabled,
            });
        }
        if let Some(p) = st.participants.get_mut(&participant) {
            p.enhanced = enabled;
        }
        Ok(())
    }

    /// Every room with seats (or `only` that one), for the admin API.
    pub fn rooms_overview(&self, only: Option<&str>) -> Vec<RoomOverview> {
        let st = self.lock();
        let mut names: Vec<&String> = st.rooms.keys().chain(st.settings.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|r| only.is_none_or(|o| o == r.as_str()))
            .map(|r| RoomOverview {
                room: r.clone(),
                node: st.rooms.get(r).map(|x| x.node.clone()),
                participants: st
                    .rooms
                    .get(r)
                    .map(|x| {
                        x.participants
                            .iter()
                            .filter_map(|id| {
                                st.participants.get(id).map(|p| AdminParticipant {
                                    info: p.info(),
                                    receive: p.receive.clone(),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                settings: st.settings.get(r).copied().unwrap_or_default(),
            })
            .collect()
    }

    /// Changes a room's settings; turning enhanced audio off stops it for everyone in
    /// the room at once. Settings equal to the default forget the room's entry.
    ///
    /// With a store, the store is written first and memory only changes when that
    /// worked, so a failed write (returned as the error) leaves the room as it was and
    /// memory never disagrees with what a restart would load. The SQLite write happens
    /// outside the hub lock (joins, SDP relay and chat never wait on the disk for an
    /// admin change); `settings_write` keeps write + memory update atomic with respect to
    /// other updates. It is a blocking call: async callers should use `spawn_blocking`.
    pub fn update_room_settings(
        &self,
        room: &str,
        settings: RoomSettings,
    ) -> anyhow::Result<RoomSettings> {
        let _serial = self
            .settings_write
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(store) = &self.settings_store {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            store.put(room, &settings, now_ms).map_err(|e| {
                warn!(room, "storing room settings failed: {e:#}");
                e
            })?;
        }
        let mut st = self.lock();
        if settings == RoomSettings::default() {
            st.settings.remove(room);
        } else {
            st.settings.insert(room.to_string(), settings);
        }
        if settings.enhanced_audio == Some(false) {
            let ids: Vec<u64> = st
                .participants
                .values()
                .filter(|p| p.room == room && p.enhanced)
                .map(|p| p.id)
                .collect();
            for id in ids {
                if let Some(p) = st.participants.get_mut(&id) {
                    p.enhanced = false;
                    let node = p.node.clone();
                    if let Some(n) = st.nodes.get(&node) {
                        let _ = n.tx.send(ToNode::SetEnhanced {
                            participant: id,
                            enabled: false,
                        });
                    }
                }
            }
        }
        Ok(settings)
    }

    /// The client left on purpose.
    pub fn leave(&self, participant: u64, conn: u64) {
        let mut st = self.lock();
        if owned(&st, participant, conn).is_ok() {
            remove_locked(&mut st, participant, "left");
        }
    }

    /// The client's socket dropped: keep the seat for the grace period.
    pub fn disconnected(self: &Arc<Self>, participant: u64, conn: u64) {
        let epoch = {
            let mut st = self.lock();
            let Some(p) = st.participants.get_mut(&participant) else {
                return;
            };
            if p.session.as_ref().map(|s| s.conn) != Some(conn) {
                return;
            }
            p.session = None;
            p.disconnect_epoch += 1;
            p.disconnect_epoch
        };
        debug!(
            participant,
            "socket dropped; keeping the seat for the grace period"
        );
        let hub = self.clone();
        let grace = self.config.reconnect_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let mut st = hub.lock();
            let expired = st
                .participants
                .get(&participant)
                .is_some_and(|p| p.session.is_none() && p.disconnect_epoch == epoch);
            if expired {
                info!(participant, "grace period over; seat freed");
                remove_locked(&mut st, participant, "disconnected");
            }
        });
    }

    // ---- node side ----

    pub fn register_node(
        &self,
        node_id: &str,
        tx: mpsc::UnboundedSender<ToNode>,
    ) -> Result<(), String> {
        let mut st = self.lock();
        if st.nodes.contains_key(node_id) {
            return Err(format!("a node with id {node_id:?} is already connected"));
        }
        st.nodes.insert(
            node_id.to_string(),
            Node {
                tx,
                participants: 0,
                reported_participants: 0,
            },
        );
        info!(node = node_id, "media node registered");
        Ok(())
    }

    pub fn node_gone(&self, node_id: &str) {
        let mut st = self.lock();
        if st.nodes.remove(node_id).is_none() {
            return;
        }
        warn!(
            node = node_id,
            "media node disconnected; its participants lose their seats"
        );
        let ids: Vec<u64> = st
            .participants
            .values()
            .filter(|p| p.node == node_id)
            .map(|p| p.id)
            .collect();
        for id in ids {
            if let Some(p) = st.participants.get(&id) {
                p.send(ServerMessage::Error {
                    code: ErrorCode::NoMediaNode,
                    message: "the media server for this room went away; rejoin".into(),
                });
                p.send(ServerMessage::Left {
                    reason: "media_failed".into(),
                });
            }
            remove_locked(&mut st, id, "media_failed");
        }
    }

    pub fn node_event(&self, node_id: &str, ev: FromNode) {
        let mut st = self.lock();
        match ev {
            FromNode::Load { participants, .. } => {
                if let Some(n) = st.nodes.get_mut(node_id) {
                    n.reported_participants = participants;
                }
            }
            FromNode::Answer { participant, sdp } => {
                if let Some(p) = on_node(&st, participant, node_id) {
                    p.send(ServerMessage::Answer { sdp });
                }
            }
            FromNode::Offer { participant, sdp } => {
                if let Some(p) = on_node(&st, participant, node_id) {
                    p.send(ServerMessage::Offer { sdp });
                }
            }
            FromNode::Speaking {
                participant,
                speaking,
            } => {
                update_locked(&mut st, participant, node_id, |p| {
                    // A muted participant is never shown as speaking, whatever trickles in.
                    let v = speaking && !p.muted;
                    std::mem::replace(&mut p.speaking, v) != v
                });
            }
            FromNode::Track {
                participant,
                publishing,
            } => {
                update_locked(&mut st, participant, node_id, |p| {
                    std::mem::replace(&mut p.publishing, publishing) != publishing
                });
            }
            FromNode::Tracks {
                participant,
                tracks,
            } => {
                update_locked(&mut st, participant, node_id, |p| {
                    std::mem::replace(&mut p.tracks, tracks) != p.tracks
                });
            }
            FromNode::TrackQuality {
                participant,
                track,
                quality,
                reason,
            } => {
                if let Some(p) = on_node(&st, participant, node_id) {
                    p.send(ServerMessage::TrackQuality {
                        track_sid: track,
                        quality,
                        reason,
                    });
                }
            }
            FromNode::PublishLayers {
                participant,
                track,
                layers,
            } => {
                if let Some(p) = on_node(&st, participant, node_id) {
                    p.send(ServerMessage::PublishLayers {
                        track_sid: track,
                        layers,
                    });
                }
            }
            FromNode::ReceiveStats { participant, stats } => {
                if let Some(p) = st.participants.get_mut(&participant) {
                    if p.node == node_id {
                        p.receive = Some(stats);
                    }
                }
            }
            FromNode::ParticipantGone {
                participant,
                reason,
            } => {
                if let Some(p) = on_node(&st, participant, node_id) {
                    warn!(participant, %reason, "media session ended by the node");
                    p.send(ServerMessage::Error {
                        code: ErrorCode::Internal,
                        message: format!("media connection failed: {reason}"),
                    });
                    p.send(ServerMessage::Left {
                        reason: "media_failed".into(),
                    });
                    remove_locked(&mut st, participant, "media_failed");
                }
            }
            FromNode::Error {
                participant,
                code,
                message,
            } => {
                if let Some(p) = on_node(&st, participant, node_id) {
                    let code = match code {
                        NodeErrorCode::InvalidSdp => ErrorCode::InvalidSdp,
                        NodeErrorCode::InvalidCandidate => ErrorCode::InvalidCandidate,
                        NodeErrorCode::UnknownTrack => ErrorCode::UnknownTrack,
                        NodeErrorCode::UnknownParticipant | NodeErrorCode::Internal => {
                            ErrorCode::Internal
                        }
                    };
                    p.send(ServerMessage::Error { code, message });
                }
            }
            FromNode::Dominant { room, participant } => {
                let member = participant
                    .is_none_or(|p| st.participants.get(&p).is_some_and(|x| x.room == room));
                let Some(r) = st.rooms.get_mut(&room).filter(|r| r.node == node_id) else {
                    return;
                };
                if member {
                    r.dominant = participant;
                    let sid = participant.map(|p| p.to_string());
                    broadcast_locked(&st, &room, None, ServerMessage::DominantSpeaker { sid });
                }
            }
            FromNode::ChatReady { participant } => {
                let Some(p) = st
                    .participants
                    .get_mut(&participant)
                    .filter(|p| p.node == node_id)
                else {
                    return;
                };
                p.chat_ready = true;
                let room = p.room.clone();
                let frame = match self.chat.recent(&room, self.config.chat.history) {
                    Ok(messages) => ChatServerFrame::History { messages },
                    Err(e) => {
                        warn!(%room, "chat history unavailable: {e:#}");
                        ChatServerFrame::History { messages: vec![] }
                    }
                };
                send_chat(&st, node_id, vec![participant], &frame);
            }
            FromNode::ChatIn { participant, data } => {
                self.chat_in(&mut st, node_id, participant, &data)
            }
            FromNode::Hello { .. } | FromNode::Auth { .. } => {
                warn!(
                    node = node_id,
                    "unexpected handshake message after registration"
                );
            }
        }
    }

    /// One frame from a participant's chat channel: every chat rule is applied here.
    fn chat_in(&self, st: &mut State, node_id: &str, participant: u64, data: &str) {
        let Some(p) = st
            .participants
            .get_mut(&participant)
            .filter(|p| p.node == node_id)
        else {
            return;
        };
        let error = |code: ChatErrorCode, message: &str, reference: Option<String>| {
            ChatServerFrame::Error {
                code,
                message: message.to_string(),
                reference,
            }
        };
        let frame: ChatClientFrame = match serde_json::from_str(data) {
            Ok(f) => f,
            Err(e) => {
                let f = error(
                    ChatErrorCode::ChatInvalid,
                    &format!("not a chat frame: {e}"),
                    None,
                );
                return send_chat(st, node_id, vec![participant], &f);
            }
        };
        let room = p.room.clone();
        match frame {
            ChatClientFrame::Send { text, reference } => {
                if reference
                    .as_ref()
                    .is_some_and(|r| r.chars().count() > MAX_REF_CHARS)
                {
                    let f = error(
                        ChatErrorCode::ChatInvalid,
                        "ref is longer than 64 characters",
                        None,
                    );
                    return send_chat(st, node_id, vec![participant], &f);
                }
                let chars = text.chars().count();
                let rejected = if !p.grants.publish_data {
                    Some(error(
                        ChatErrorCode::ChatForbidden,
                        "your access token does not allow sending chat messages",
                        reference.clone(),
                    ))
                } else if chars == 0 || text.trim().is_empty() {
                    Some(error(
                        ChatErrorCode::ChatTooLong,
                        "message is empty",
                        reference.clone(),
                    ))
                } else if chars > MAX_CHAT_CHARS {
                    Some(error(
                        ChatErrorCode::ChatTooLong,
                        &format!("message has {chars} characters; the limit is {MAX_CHAT_CHARS}"),
                        reference.clone(),
                    ))
                } else if !p
                    .chat_bucket
                    .take(&self.config.chat, std::time::Instant::now())
                {
                    Some(error(
                        ChatErrorCode::ChatRateLimited,
                        "you are sending messages too fast (limit 5 per second)",
                        reference.clone(),
                    ))
                } else {
                    None
                };
                if let Some(f) = rejected {
                    return send_chat(st, node_id, vec![participant], &f);
                }
                let from = Sender {
                    identity: p.identity.clone(),
                    name: p.name.clone(),
                };
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let message = match self.chat.append(&room, &from, &text, ts) {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(%room, "chat store failed: {e:#}");
                        let f = error(
                            ChatErrorCode::ChatInvalid,
                            "the message could not be stored; try again",
                            reference,
                        );
                        return send_chat(st, node_id, vec![participant], &f);
                    }
                };
                let others = chat_members(st, &room, Some(participant));
                send_chat(
                    st,
                    node_id,
                    others,
                    &ChatServerFrame::Message {
                        message: message.clone(),
                        reference: None,
                    },
                );
                send_chat(
                    st,
                    node_id,
                    vec![participant],
                    &ChatServerFrame::Message { message, reference },
                );
            }
            ChatClientFrame::Delete { id } => {
                let admin = p.grants.admin;
                let identity = p.identity.clone();
                let outcome = match self.chat.author(&room, id) {
                    Ok(None) => Err(error(
                        ChatErrorCode::ChatNotFound,
                        "no such message in this room",
                        None,
                    )),
                    Ok(Some(author)) if author != identity && !admin => Err(error(
                        ChatErrorCode::ChatForbidden,
                        "you can only delete your own messages",
                        None,
                    )),
                    Ok(Some(_)) => self.chat.delete(&room, id).map_err(|e| {
                        error(
                            ChatErrorCode::ChatInvalid,
                            &format!("delete failed: {e}"),
                            None,
                        )
                    }),
                    Err(e) => Err(error(
                        ChatErrorCode::ChatInvalid,
                        &format!("delete failed: {e}"),
                        None,
                    )),
                };
                match outcome {
                    Ok(_) => {
                        let all = chat_members(st, &room, None);
                        send_chat(st, node_id, all, &ChatServerFrame::Deleted { id });
                    }
                    Err(f) => send_chat(st, node_id, vec![participant], &f),
                }
            }
        }
    }
}

/// Participants of `room` whose chat channel is ready, optionally without one.
fn chat_members(st: &State, room: &str, except: Option<u64>) -> Vec<u64> {
    st.rooms
        .get(room)
        .map(|r| {
            r.participants
                .iter()
                .copied()
                .filter(|id| Some(*id) != except)
                .filter(|id| st.participants.get(id).is_some_and(|p| p.chat_ready))
                .collect()
        })
        .unwrap_or_default()
}

fn send_chat(st: &State, node_id: &str, participants: Vec<u64>, frame: &ChatServerFrame) {
    if participants.is_empty() {
        return;
    }
    if let Some(n) = st.nodes.get(node_id) {
        let _ = n.tx.send(ToNode::ChatTo {
            participants,
            data: frame.to_json(),
        });
    }
}

fn owned(st: &State, participant: u64, conn: u64) -> Result<&Participant, HubError> {
    match st.participants.get(&participant) {
        Some(p) if p.session.as_ref().map(|s| s.conn) == Some(conn) => Ok(p),
        _ => Err((
            ErrorCode::NotJoined,
            "this session no longer holds a seat".into(),
        )),
    }
}

fn on_node<'a>(st: &'a State, participant: u64, node_id: &str) -> Option<&'a Participant> {
    st.participants
        .get(&participant)
        .filter(|p| p.node == node_id)
}

fn update_locked(
    st: &mut State,
    participant: u64,
    node_id: &str,
    f: impl FnOnce(&mut Participant) -> bool,
) {
    let Some(p) = st.participants.get_mut(&participant) else {
        return;
    };
    if p.node != node_id || !f(p) {
        return;
    }
    let room = p.room.clone();
    let info = p.info();
    broadcast_locked(
        st,
        &room,
        None,
        ServerMessage::ParticipantUpdated { participant: info },
    );
}

fn broadcast_locked(st: &State, room: &str, except: Option<u64>, msg: ServerMessage) {
    let Some(r) = st.rooms.get(room) else {
        return;
    };
    for id in &r.participants {
        if Some(*id) == except {
            continue;
        }
        if let Some(p) = st.participants.get(id) {
            p.send(msg.clone());
        }
    }
}

fn remove_locked(st: &mut State, id: u64, reason: &str) {
    let Some(p) = st.participants.remove(&id) else {
        return;
    };
    if let Some(n) = st.nodes.get_mut(&p.node) {
        n.participants = n.participants.saturating_sub(1);
        let _ = n.tx.send(ToNode::RemoveParticipant { participant: id });
    }
    if let Some(r) = st.rooms.get_mut(&p.room) {
        r.participants.remove(&id);
        if r.participants.is_empty() {
            st.rooms.remove(&p.room);
        }
    }
    info!(participant = id, room = %p.room, reason, "left");
    broadcast_locked(
        st,
        &p.room,
        None,
        ServerMessage::ParticipantLeft {
            sid: id.to_string(),
            identity: p.identity.clone(),
            reason: reason.to_string(),
        },
    );
}

fn joined_message(st: &State, config: &HubConfig, id: u64, resumed: bool) -> ServerMessage {
    let Some(me) = st.participants.get(&id) else {
        return ServerMessage::Error {
            code: ErrorCode::Internal,
            message: "seat vanished".into(),
        };
    };
    let participants = st
        .rooms
        .get(&me.room)
        .map(|r| {
            r.participants
                .iter()
                .filter(|pid| **pid != id)
                .filter_map(|pid| st.participants.get(pid).map(Participant::info))
                .collect()
        })
        .unwrap_or_default();
    let mut ice_servers = config.ice_servers.clone();
    if let Some(turn) = &config.turn {
        ice_servers.push(turn.credentials(&me.identity));
    }
    ServerMessage::Joined {
        protocol: me.protocol,
        room: me.room.clone(),
        me: me.info(),
        participants,
        ice_servers,
        grants: me.grants,
        resumed,
        reconnect_grace_secs: config.reconnect_grace.as_secs(),
        dominant_speaker: st
            .rooms
            .get(&me.room)
            .and_then(|r| r.dominant)
            .filter(|d| st.participants.contains_key(d))
            .map(|d| d.to_string()),
    }
}

#[cfg(test)]
mod video_tests;

#[cfg(test)]
mod chat_tests {
    use super::*;
    use crate::chat::MemoryStore;
    use chorus_protocol::chat::ChatMessage;

    struct Fixture {
        hub: Arc<Hub>,
        node_rx: mpsc::UnboundedReceiver<ToNode>,
        _sessions: Vec<mpsc::Receiver<Outbound>>,
    }

    fn claims(identity: &str, grants: Grants) -> Claims {
        Claims {
            iss: "k".into(),
            sub: identity.into(),
            name: Some(identity.to_uppercase()),
            room: "room".into(),
            exp: u64::MAX,
            nbf: None,
            grants,
        }
    }

    fn fixture() -> Fixture {
        let hub = Hub::new(
            HubConfig {
                reconnect_grace: Duration::from_secs(15),
                ice_servers: vec![],
                turn: None,
                chat: ChatConfig::default(),
                allow_enhanced_audio: true,
            },
            Arc::new(MemoryStore::new(1000)),
        );
        let (tx, node_rx) = mpsc::unbounded_channel();
        hub.register_node("n", tx).unwrap();
        Fixture {
            hub,
            node_rx,
            _sessions: vec![],
        }
    }

    impl Fixture {
        fn join(&mut self, identity: &str, grants: Grants) -> u64 {
            let (tx, rx) = mpsc::channel(SESSION_QUEUE);
            self._sessions.push(rx);
            let j = self
                .hub
                .join(
                    &claims(identity, grants),
                    false,
                    chorus_protocol::PROTOCOL_VERSION,
                    self._sessions.len() as u64,
                    tx,
                )
                .unwrap();
            self.hub.node_event(
                "n",
                FromNode::ChatReady {
                    participant: j.participant,
                },
            );
            j.participant
        }

        fn say(&self, p: u64, data: &str) {
            self.hub.node_event(
                "n",
                FromNode::ChatIn {
                    participant: p,
                    data: data.to_string(),
                },
            );
        }

        /// Every chat frame sent since the last call, as (recipients, frame).
        fn chat_out(&mut self) -> Vec<(Vec<u64>, ChatServerFrame)> {
            let mut out = vec![];
            while let Ok(m) = self.node_rx.try_recv() {
                if let ToNode::ChatTo { participants, data } = m {
                    out.push((participants, serde_json::from_str(&data).unwrap()));
                }
            }
            out
        }
    }

    #[test]
    fn joined_is_the_first_message_of_every_session_even_when_joins_race() {
        let f = fixture();
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let hub = f.hub.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|i| {
                            let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                            let who = format!("u{t}-{i}");
                            hub.join(
                                &claims(&who, Grants::default_participant()),
                                false,
                                chorus_protocol::PROTOCOL_VERSION,
                                (t * 100 + i) as u64,
                                tx,
                            )
                            .unwrap();
                            rx
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for th in threads {
            for mut rx in th.join().unwrap() {
                match rx.try_recv() {
                    Ok(Outbound::Msg(ServerMessage::Joined { .. })) => {}
                    Ok(Outbound::Msg(other)) => panic!("first message was {other:?}"),
                    Ok(_) => panic!("first message was not a message"),
                    Err(e) => panic!("no message: {e}"),
                }
            }
        }
    }

    fn error_code(frames: &[(Vec<u64>, ChatServerFrame)]) -> Option<ChatErrorCode> {
        frames.iter().find_map(|(_, f)| match f {
            ChatServerFrame::Error { code, .. } => Some(*code),
            _ => None,
        })
    }

    fn messages(frames: &[(Vec<u64>, ChatServerFrame)], to: u64) -> Vec<ChatMessage> {
        frames
            .iter()
            .filter(|(r, _)| r.contains(&to))
            .filter_map(|(_, f)| match f {
                ChatServerFrame::Message { message, .. } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn messages_reach_everyone_in_order_with_server_ids_and_history_for_late_joiners() {
        let mut f = fixture();
        let a = f.join("ana", Grants::default_participant());
        let b = f.join("bo", Grants::default_participant());
        f.chat_out();
        f.say(a, r#"{"type":"send","text":"one","ref":"r1"}"#);
        f.say(b, r#"{"type":"send","text":"two"}"#);
        f.say(
            a,
            r#"{"type":"send","text":"<img src=x onerror=alert(1)>"}"#,
        );
        let out = f.chat_out();
        let to_b = messages(&out, b);
        assert_eq!(
            to_b.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["one", "two", "<img src=x onerror=alert(1)>"]
        );
        assert!(to_b.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(to_b[0].from.identity, "ana");
        assert_eq!(to_b[0].from.name, "ANA");
        // The sender's own copy carries its ref; the others' do not.
        let own_ref = out.iter().find_map(|(r, fr)| match fr {
            ChatServerFrame::Message {
                reference: Some(x), ..
            } if r == &vec![a] => Some(x.clone()),
            _ => None,
        });
        assert_eq!(own_ref.as_deref(), Some("r1"));

        let c = f.join("cy", Grants::default_participant());
        let out = f.chat_out();
        let history = out.iter().find_map(|(r, fr)| match fr {
            ChatServerFrame::History { messages } if r == &vec![c] => Some(messages.clone()),
            _ => None,
        });
        assert_eq!(history.map(|h| h.len()), Some(3));
    }

    #[test]
    fn limits_and_permissions_are_errors_to_the_sender_only() {
        let mut f = fixture();
        let reader_grants = Grants {
            publish_data: false,
            ..Grants::default_participant()
        };
        let a = f.join("ana", Grants::default_participant());
        let r = f.join("reader", reader_grants);
        f.chat_out();

        f.say(r, r#"{"type":"send","text":"hi","ref":"x"}"#);
        let out = f.chat_out();
        assert_eq!(error_code(&out), Some(ChatErrorCode::ChatForbidden));
        assert!(
            out.iter().all(|(to, _)| to == &vec![r]),
            "nothing delivered: {out:?}"
        );

        let long = "é".repeat(4001);
        f.say(a, &format!(r#"{{"type":"send","text":"{long}"}}"#));
        assert_eq!(error_code(&f.chat_out()), Some(ChatErrorCode::ChatTooLong));
        let exact = "é".repeat(4000);
        f.say(a, &format!(r#"{{"type":"send","text":"{exact}"}}"#));
        assert_eq!(
            messages(&f.chat_out(), r).len(),
            1,
            "4000 characters is allowed"
        );
        f.say(a, r#"{"type":"send","text":"   "}"#);
        assert_eq!(error_code(&f.chat_out()), Some(ChatErrorCode::ChatTooLong));
        for bad in [
            "nope",
            r#"{"type":"send"}"#,
            r#"{"type":"shout","text":"x"}"#,
            "[1,2]",
        ] {
            f.say(a, bad);
            assert_eq!(
                error_code(&f.chat_out()),
                Some(ChatErrorCode::ChatInvalid),
                "{bad}"
            );
        }
    }

    #[test]
    fn rate_limit_keeps_the_first_messages_and_reports_the_rest() {
        let mut f = fixture();
        let a = f.join("ana", Grants::default_participant());
        let b = f.join("bo", Grants::default_participant());
        f.chat_out();
        for i in 0..30 {
            f.say(
                a,
                &format!(r#"{{"type":"send","text":"m{i}","ref":"{i}"}}"#),
            );
        }
        let out = f.chat_out();
        let got = messages(&out, b);
        assert!((10..=11).contains(&got.len()), "{} delivered", got.len());
        assert_eq!(got[0].text, "m0");
        let limited = out
            .iter()
            .filter(|(_, fr)| {
                matches!(
                    fr,
                    ChatServerFrame::Error {
                        code: ChatErrorCode::ChatRateLimited,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(limited + got.len(), 30);
    }

    #[test]
    fn delete_own_message_or_any_as_admin() {
        let mut f = fixture();
        let a = f.join("ana", Grants::default_participant());
        let b = f.join("bo", Grants::default_participant());
        let admin = f.join(
            "mod",
            Grants {
                admin: true,
                ..Grants::default_participant()
            },
        );
        f.chat_out();
        f.say(a, r#"{"type":"send","text":"a1"}"#);
        f.say(a, r#"{"type":"send","text":"a2"}"#);
        let ids: Vec<u64> = messages(&f.chat_out(), b).iter().map(|m| m.id).collect();

        f.say(b, &format!(r#"{{"type":"delete","id":{}}}"#, ids[0]));
        assert_eq!(
            error_code(&f.chat_out()),
            Some(ChatErrorCode::ChatForbidden)
        );
        f.say(a, &format!(r#"{{"type":"delete","id":{}}}"#, ids[0]));
        let out = f.chat_out();
        let deleted_to: Vec<u64> = out
            .iter()
            .filter(|(_, fr)| matches!(fr, ChatServerFrame::Deleted { .. }))
            .flat_map(|(to, _)| to.clone())
            .collect();
        assert_eq!(deleted_to.len(), 3, "everyone hears of the deletion");
        f.say(admin, &format!(r#"{{"type":"delete","id":{}}}"#, ids[1]));
        assert!(f
            .chat_out()
            .iter()
            .any(|(_, fr)| matches!(fr, ChatServerFrame::Deleted { id } if *id == ids[1])));
        f.say(a, &format!(r#"{{"type":"delete","id":{}}}"#, ids[1]));
        assert_eq!(error_code(&f.chat_out()), Some(ChatErrorCode::ChatNotFound));
        // The history reflects the deletions.
        assert!(f.hub.chat_store().recent("room", 10).unwrap().is_empty());
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;
    use crate::chat::MemoryStore;
    use crate::room_settings::RoomSettingsStore;

    /// A store that keeps rows in memory and can be told to fail.
    #[derive(Default)]
    struct FlakyStore {
        rows: Mutex<HashMap<String, RoomSettings>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl RoomSettingsStore for FlakyStore {
        fn load_all(&self) -> anyhow::Result<Vec<(String, RoomSettings)>> {
            Ok(self.rows.lock().unwrap().clone().into_iter().collect())
        }
        fn put(&self, room: &str, s: &RoomSettings, _now_ms: u64) -> anyhow::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                anyhow::bail!("disk full");
            }
            let mut rows = self.rows.lock().unwrap();
            if *s == RoomSettings::default() {
                rows.remove(room);
            } else {
                rows.insert(room.to_string(), *s);
            }
            Ok(())
        }
    }

    fn config() -> HubConfig {
        HubConfig {
            reconnect_grace: Duration::from_secs(15),
            ice_servers: vec![],
            turn: None,
            chat: ChatConfig::default(),
            allow_enhanced_audio: true,
        }
    }

    fn hub(store: &Arc<FlakyStore>) -> Arc<Hub> {
        Hub::with_settings_store(
            config(),
            Arc::new(MemoryStore::new(10)),
            store.clone() as Arc<dyn RoomSettingsStore>,
        )
        .unwrap()
    }

    fn shown(hub: &Hub, room: &str) -> Option<RoomSettings> {
        hub.rooms_overview(Some(room))
            .into_iter()
            .next()
            .map(|o| o.settings)
    }

    const OFF: RoomSettings = RoomSettings {
        enhanced_audio: Some(false),
    };

    #[test]
    fn settings_are_written_through_and_loaded_by_the_next_hub() {
        let store = Arc::new(FlakyStore::default());
        let h = hub(&store);
        h.update_room_settings("quiet", OFF).unwrap();
        assert_eq!(store.rows.lock().unwrap().get("quiet"), Some(&OFF));
        drop(h);
        let h = hub(&store);
        assert_eq!(shown(&h, "quiet"), Some(OFF));
        // Back to the default: the row and the entry go.
        h.update_room_settings("quiet", RoomSettings::default())
            .unwrap();
        assert!(store.rows.lock().unwrap().is_empty());
        assert_eq!(shown(&h, "quiet"), None);
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let store = Arc::new(FlakyStore::default());
        let h = hub(&store);
        store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = h.update_room_settings("quiet", OFF).unwrap_err();
        assert!(format!("{e:#}").contains("disk full"));
        assert_eq!(shown(&h, "quiet"), None, "memory follows the store");
        store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        h.update_room_settings("quiet", OFF).unwrap();
        store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        h.update_room_settings("quiet", RoomSettings::default())
            .unwrap_err();
        assert_eq!(shown(&h, "quiet"), Some(OFF));
    }

    #[test]
    fn a_sqlite_write_failure_is_an_error_and_memory_keeps_the_stored_value() {
        let dir =
            std::env::temp_dir().join(format!("chorus-hub-settings-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("chat.sqlite3");
        let sqlite = Arc::new(crate::chat::SqliteStore::open(&path).unwrap());
        let h = Hub::with_settings_store(config(), sqlite.clone(), sqlite).unwrap();
        h.update_room_settings("quiet", OFF).unwrap();
        // Someone breaks the database under a running signaling.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE room_settings;")
            .unwrap();
        let on = RoomSettings {
            enhanced_audio: Some(true),
        };
        let e = h.update_room_settings("quiet", on).unwrap_err();
        assert!(format!("{e:#}").contains("room_settings"), "{e:#}");
        assert_eq!(shown(&h, "quiet"), Some(OFF));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
