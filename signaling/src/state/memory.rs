//! The shared state of a single instance: everything in this process's memory, with chat
//! history and room settings optionally kept in SQLite (a data dir) so they survive
//! restarts. Events are delivered to the subscribers synchronously, in order, under the
//! state's lock (a subscriber only queues them).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chorus_protocol::chat::{ChatMessage, Sender};
use tracing::info;

use super::history::ChatStore;
use super::settings_store::RoomSettingsStore;
use super::{
    EventKind, EventSink, JoinOutcome, JoinRequest, OwnedSeat, RoomEvent, RoomSettings,
    RoomSnapshot, Seat, SharedState, StateError, StateResult,
};

#[derive(Default)]
struct Room {
    seats: BTreeMap<u64, OwnedSeat>,
    node: String,
    dominant: Option<u64>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// One sequence for every room: per-room order follows from it.
    seq: u64,
    rooms: HashMap<String, Room>,
    settings: HashMap<String, RoomSettings>,
    sinks: Vec<EventSink>,
}

impl Inner {
    fn publish(&mut self, room: &str, kind: EventKind) {
        let seq = if kind.is_seat_change() {
            self.seq += 1;
            self.seq
        } else {
            0
        };
        let ev = RoomEvent {
            room: room.to_string(),
            seq,
            kind,
        };
        for sink in &self.sinks {
            sink(ev.clone());
        }
    }

    fn snapshot(&self, room: &str) -> RoomSnapshot {
        let r = self.rooms.get(room);
        RoomSnapshot {
            seq: self.seq,
            seats: r
                .map(|r| r.seats.values().cloned().collect())
                .unwrap_or_default(),
            node: r.map(|r| r.node.clone()),
            dominant: r.and_then(|r| r.dominant),
            settings: self.settings.get(room).copied().unwrap_or_default(),
        }
    }
}

pub struct MemoryState {
    inner: Mutex<Inner>,
    history: Arc<dyn ChatStore>,
    settings_store: Option<Arc<dyn RoomSettingsStore>>,
    /// Keeps "append, then publish" of chat messages in id order, and a settings write
    /// and its memory update together. Held across the blocking store call, never by a
    /// join.
    chat_order: tokio::sync::Mutex<()>,
    settings_order: tokio::sync::Mutex<()>,
}

impl MemoryState {
    /// Everything in memory; chat history as kept by `history`.
    pub fn new(history: Arc<dyn ChatStore>) -> Self {
        MemoryState {
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Default::default()
            }),
            history,
            settings_store: None,
            chat_order: tokio::sync::Mutex::new(()),
            settings_order: tokio::sync::Mutex::new(()),
        }
    }

    /// Room settings written through to `store`, starting with every row it can read
    /// (unreadable rows are logged and skipped).
    pub fn with_settings_store(
        history: Arc<dyn ChatStore>,
        store: Arc<dyn RoomSettingsStore>,
    ) -> anyhow::Result<Self> {
        let settings: HashMap<String, RoomSettings> = store
            .load_all()?
            .into_iter()
            .filter(|(_, s)| *s != RoomSettings::default())
            .collect();
        if !settings.is_empty() {
            info!(rooms = settings.len(), "loaded stored room settings");
        }
        let state = MemoryState {
            settings_store: Some(store),
            ..Self::new(history)
        };
        state.lock().settings = settings;
        Ok(state)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under this lock would be a bug here; keep serving with the data as it
        // is rather than taking the front door down.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs a blocking store call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> StateResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(StateError::Store),
        Err(e) => Err(StateError::Store(anyhow::anyhow!("store task failed: {e}"))),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl SharedState for MemoryState {
    async fn subscribe(&self, sink: EventSink) -> StateResult<()> {
        self.lock().sinks.push(sink);
        Ok(())
    }

    async fn next_seat_id(&self) -> StateResult<u64> {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        Ok(id)
    }

    async fn join(&self, req: JoinRequest<'_>, id: u64) -> StateResult<JoinOutcome> {
        let mut st = self.lock();
        let existing = st.rooms.get(req.room).and_then(|r| {
            r.seats
                .values()
                .find(|s| s.seat.identity == req.identity)
                .cloned()
        });
        let mut replaced = None;
        if let Some(old) = existing {
            let here = old.instance == req.instance || req.nodes.contains(&old.seat.node);
            if req.resume && old.seat.protocol == req.protocol && here {
                let from = (old.instance != req.instance).then(|| old.instance.clone());
                if from.is_some() {
                    let moved = OwnedSeat {
                        instance: req.instance.to_string(),
                        seat: old.seat.clone(),
                    };
                    if let Some(r) = st.rooms.get_mut(req.room) {
                        r.seats.insert(old.seat.id, moved.clone());
                    }
                    st.publish(req.room, EventKind::Moved(moved));
                }
                return Ok(JoinOutcome::Resumed {
                    seat: old.seat,
                    room: st.snapshot(req.room),
                    from,
                });
            }
            remove_locked(&mut st, req.room, old.seat.id, "replaced");
            replaced = Some(old);
        }
        let node = match st.rooms.get(req.room) {
            Some(r) if !r.seats.is_empty() => {
                if !req.nodes.contains(&r.node) {
                    return Ok(JoinOutcome::NodeUnreachable {
                        node: r.node.clone(),
                    });
                }
                r.node.clone()
            }
            _ => match req.nodes.first() {
                Some(n) => n.clone(),
                None => return Ok(JoinOutcome::NoNode),
            },
        };
        let seat = Seat {
            id,
            room: req.room.to_string(),
            identity: req.identity.to_string(),
            name: req.name.to_string(),
            protocol: req.protocol,
            muted: false,
            speaking: false,
            publishing: false,
            tracks: Vec::new(),
            node: node.clone(),
            chat_ready: false,
            enhanced: false,
        };
        let owned = OwnedSeat {
            instance: req.instance.to_string(),
            seat: seat.clone(),
        };
        let room = st.rooms.entry(req.room.to_string()).or_default();
        room.node = node;
        room.seats.insert(id, owned.clone());
        st.publish(req.room, EventKind::Joined(owned));
        Ok(JoinOutcome::Seated {
            seat,
            room: st.snapshot(req.room),
            replaced,
        })
    }

    async fn update_seat(&self, instance: &str, seat: &Seat, announce: bool) -> StateResult<bool> {
        let mut st = self.lock();
        let Some(slot) = st
            .rooms
            .get_mut(&seat.room)
            .and_then(|r| r.seats.get_mut(&seat.id))
            .filter(|s| s.instance == instance)
        else {
            return Ok(false);
        };
        slot.seat = seat.clone();
        let owned = slot.clone();
        if announce {
            st.publish(&seat.room, EventKind::Updated(owned));
        }
        Ok(true)
    }

    async fn remove_seat(
        &self,
        instance: &str,
        room: &str,
        id: u64,
        reason: &str,
    ) -> StateResult<Option<Seat>> {
        let mut st = self.lock();
        let owned = st
            .rooms
            .get(room)
            .and_then(|r| r.seats.get(&id))
            .is_some_and(|s| s.instance == instance);
        if !owned {
            return Ok(None);
        }
        Ok(remove_locked(&mut st, room, id, reason).map(|s| s.seat))
    }

    async fn room(&self, room: &str) -> StateResult<RoomSnapshot> {
        Ok(self.lock().snapshot(room))
    }

    async fn rooms(&self) -> StateResult<Vec<String>> {
        let st = self.lock();
        let mut names: Vec<String> = st.rooms.keys().chain(st.settings.keys()).cloned().collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn set_dominant(&self, room: &str, node: &str, dominant: Option<u64>) -> StateResult<()> {
        let mut st = self.lock();
        if let Some(r) = st.rooms.get_mut(room).filter(|r| r.node == node) {
            r.dominant = dominant;
        }
        Ok(())
    }

    async fn put_settings(&self, room: &str, settings: RoomSettings) -> StateResult<()> {
        let _order = self.settings_order.lock().await;
        // The store first: memory only changes when the write worked, so it never
        // disagrees with what a restart would load.
        if let Some(store) = self.settings_store.clone() {
            let name = room.to_string();
            blocking(move || store.put(&name, &settings, now_ms())).await?;
        }
        let mut st = self.lock();
        if settings == RoomSettings::default() {
            st.settings.remove(room);
        } else {
            st.settings.insert(room.to_string(), settings);
        }
        st.publish(room, EventKind::Settings(settings));
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
        let _order = self.chat_order.lock().await;
        let history = self.history.clone();
        let (r, f, t) = (room.to_string(), from.clone(), text.to_string());
        let message = blocking(move || history.append(&r, &f, &t, ts)).await?;
        self.lock().publish(
            room,
            EventKind::Chat {
                sender,
                message: message.clone(),
            },
        );
        Ok(message)
    }

    async fn chat_recent(&self, room: &str, limit: usize) -> StateResult<Vec<ChatMessage>> {
        let history = self.history.clone();
        let r = room.to_string();
        blocking(move || history.recent(&r, limit)).await
    }

    async fn chat_author(&self, room: &str, id: u64) -> StateResult<Option<String>> {
        let history = self.history.clone();
        let r = room.to_string();
        blocking(move || history.author(&r, id)).await
    }

    async fn chat_delete(&self, room: &str, id: u64) -> StateResult<bool> {
        let _order = self.chat_order.lock().await;
        let history = self.history.clone();
        let r = room.to_string();
        let gone = blocking(move || history.delete(&r, id)).await?;
        if gone {
            self.lock().publish(room, EventKind::ChatDeleted { id });
        }
        Ok(gone)
    }

    async fn purge_idle_chat(&self, cutoff_ms: u64) -> StateResult<usize> {
        let active = self.lock().rooms.keys().cloned().collect();
        let history = self.history.clone();
        blocking(move || history.purge_idle(cutoff_ms, &active)).await
    }

    async fn heartbeat(&self, _instance: &str) -> StateResult<()> {
        // Every instance sharing a memory state lives in this process.
        Ok(())
    }

    async fn check(&self) -> StateResult<()> {
        Ok(())
    }
}

fn remove_locked(st: &mut Inner, room: &str, id: u64, reason: &str) -> Option<OwnedSeat> {
    let r = st.rooms.get_mut(room)?;
    let gone = r.seats.remove(&id)?;
    if r.seats.is_empty() {
        st.rooms.remove(room);
    }
    st.publish(
        room,
        EventKind::Left {
            seat: gone.clone(),
            reason: reason.to_string(),
        },
    );
    Some(gone)
}
