//! Hub tests on one instance over the memory state: chat rules, room settings, and
//! `joined` first whatever races it.

use super::*;
use crate::session::{Outbound, SESSION_QUEUE};
use crate::state::history::{MemoryStore, SqliteStore};
use crate::state::memory::MemoryState;
use crate::state::settings_store::RoomSettingsStore;

fn config() -> HubConfig {
    HubConfig {
        reconnect_grace: Duration::from_secs(15),
        ice_servers: vec![],
        turn: None,
        chat: ChatConfig::default(),
        allow_enhanced_audio: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joined_is_the_first_message_of_every_session_even_when_joins_race() {
    let f = fixture().await;
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let hub = f.hub.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..20 {
                    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                    let who = format!("u{t}-{i}");
                    hub.join(
                        &claims(&who, Grants::default_participant()),
                        false,
                        chorus_protocol::PROTOCOL_VERSION,
                        (t * 100 + i) as u64,
                        tx,
                    )
                    .await
                    .unwrap();
                    out.push(rx);
                }
                out
            })
        })
        .collect();
    for t in tasks {
        for mut rx in t.await.unwrap() {
            match rx.try_recv() {
                Ok(Outbound::Text(t)) => assert!(
                    t.as_str().starts_with(r#"{"type":"joined""#),
                    "first message was {t}"
                ),
                Ok(_) => panic!("first message was not a message"),
                Err(e) => panic!("no message: {e}"),
            }
        }
    }
}

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

async fn fixture() -> Fixture {
    let hub = Hub::start(
        config(),
        Arc::new(MemoryState::new(Arc::new(MemoryStore::new(1000)))),
    )
    .await
    .unwrap();
    let (tx, node_rx) = mpsc::unbounded_channel();
    hub.register_node("n", tx).unwrap();
    Fixture {
        hub,
        node_rx,
        _sessions: vec![],
    }
}

impl Fixture {
    async fn join(&mut self, identity: &str, grants: Grants) -> u64 {
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
            .await
            .unwrap();
        self.hub
            .node_event(
                "n",
                FromNode::ChatReady {
                    participant: j.participant,
                },
            )
            .await;
        j.participant
    }

    async fn say(&self, p: u64, data: &str) {
        self.hub
            .node_event(
                "n",
                FromNode::ChatIn {
                    participant: p,
                    data: data.to_string(),
                },
            )
            .await;
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

#[tokio::test]
async fn messages_reach_everyone_in_order_with_server_ids_and_history_for_late_joiners() {
    let mut f = fixture().await;
    let a = f.join("ana", Grants::default_participant()).await;
    let b = f.join("bo", Grants::default_participant()).await;
    f.chat_out();
    f.say(a, r#"{"type":"send","text":"one","ref":"r1"}"#).await;
    f.say(b, r#"{"type":"send","text":"two"}"#).await;
    f.say(
        a,
        r#"{"type":"send","text":"<img src=x onerror=alert(1)>"}"#,
    )
    .await;
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

    let c = f.join("cy", Grants::default_participant()).await;
    let out = f.chat_out();
    let history = out.iter().find_map(|(r, fr)| match fr {
        ChatServerFrame::History { messages } if r == &vec![c] => Some(messages.clone()),
        _ => None,
    });
    assert_eq!(history.map(|h| h.len()), Some(3));
}

#[tokio::test]
async fn limits_and_permissions_are_errors_to_the_sender_only() {
    let mut f = fixture().await;
    let reader_grants = Grants {
        publish_data: false,
        ..Grants::default_participant()
    };
    let a = f.join("ana", Grants::default_participant()).await;
    let r = f.join("reader", reader_grants).await;
    f.chat_out();

    f.say(r, r#"{"type":"send","text":"hi","ref":"x"}"#).await;
    let out = f.chat_out();
    assert_eq!(error_code(&out), Some(ChatErrorCode::ChatForbidden));
    assert!(
        out.iter().all(|(to, _)| to == &vec![r]),
        "nothing delivered: {out:?}"
    );

    let long = "é".repeat(4001);
    f.say(a, &format!(r#"{{"type":"send","text":"{long}"}}"#))
        .await;
    assert_eq!(error_code(&f.chat_out()), Some(ChatErrorCode::ChatTooLong));
    let exact = "é".repeat(4000);
    f.say(a, &format!(r#"{{"type":"send","text":"{exact}"}}"#))
        .await;
    assert_eq!(
        messages(&f.chat_out(), r).len(),
        1,
        "4000 characters is allowed"
    );
    f.say(a, r#"{"type":"send","text":"   "}"#).await;
    assert_eq!(error_code(&f.chat_out()), Some(ChatErrorCode::ChatTooLong));
    for bad in [
        "nope",
        r#"{"type":"send"}"#,
        r#"{"type":"shout","text":"x"}"#,
        "[1,2]",
    ] {
        f.say(a, bad).await;
        assert_eq!(
            error_code(&f.chat_out()),
            Some(ChatErrorCode::ChatInvalid),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn rate_limit_keeps_the_first_messages_and_reports_the_rest() {
    let mut f = fixture().await;
    let a = f.join("ana", Grants::default_participant()).await;
    let b = f.join("bo", Grants::default_participant()).await;
    f.chat_out();
    for i in 0..30 {
        f.say(
            a,
            &format!(r#"{{"type":"send","text":"m{i}","ref":"{i}"}}"#),
        )
        .await;
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

#[tokio::test]
async fn delete_own_message_or_any_as_admin() {
    let mut f = fixture().await;
    let a = f.join("ana", Grants::default_participant()).await;
    let b = f.join("bo", Grants::default_participant()).await;
    let admin = f
        .join(
            "mod",
            Grants {
                admin: true,
                ..Grants::default_participant()
            },
        )
        .await;
    f.chat_out();
    f.say(a, r#"{"type":"send","text":"a1"}"#).await;
    f.say(a, r#"{"type":"send","text":"a2"}"#).await;
    let ids: Vec<u64> = messages(&f.chat_out(), b).iter().map(|m| m.id).collect();

    f.say(b, &format!(r#"{{"type":"delete","id":{}}}"#, ids[0]))
        .await;
    assert_eq!(
        error_code(&f.chat_out()),
        Some(ChatErrorCode::ChatForbidden)
    );
    f.say(a, &format!(r#"{{"type":"delete","id":{}}}"#, ids[0]))
        .await;
    let out = f.chat_out();
    let deleted_to: Vec<u64> = out
        .iter()
        .filter(|(_, fr)| matches!(fr, ChatServerFrame::Deleted { .. }))
        .flat_map(|(to, _)| to.clone())
        .collect();
    assert_eq!(deleted_to.len(), 3, "everyone hears of the deletion");
    f.say(admin, &format!(r#"{{"type":"delete","id":{}}}"#, ids[1]))
        .await;
    assert!(f
        .chat_out()
        .iter()
        .any(|(_, fr)| matches!(fr, ChatServerFrame::Deleted { id } if *id == ids[1])));
    f.say(a, &format!(r#"{{"type":"delete","id":{}}}"#, ids[1]))
        .await;
    assert_eq!(error_code(&f.chat_out()), Some(ChatErrorCode::ChatNotFound));
    // The history reflects the deletions.
    assert!(f
        .hub
        .state()
        .chat_recent("room", 10)
        .await
        .unwrap()
        .is_empty());
}

// ---- room settings ----

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

async fn hub(store: &Arc<FlakyStore>) -> Arc<Hub> {
    let state = MemoryState::with_settings_store(
        Arc::new(MemoryStore::new(10)),
        store.clone() as Arc<dyn RoomSettingsStore>,
    )
    .unwrap();
    Hub::start(config(), Arc::new(state)).await.unwrap()
}

async fn shown(hub: &Hub, room: &str) -> Option<RoomSettings> {
    hub.rooms_overview(Some(room))
        .await
        .unwrap()
        .into_iter()
        .next()
        .map(|o| o.settings)
}

const OFF: RoomSettings = RoomSettings {
    enhanced_audio: Some(false),
};

#[tokio::test]
async fn settings_are_written_through_and_loaded_by_the_next_hub() {
    let store = Arc::new(FlakyStore::default());
    let h = hub(&store).await;
    h.update_room_settings("quiet", OFF).await.unwrap();
    assert_eq!(store.rows.lock().unwrap().get("quiet"), Some(&OFF));
    drop(h);
    let h = hub(&store).await;
    assert_eq!(shown(&h, "quiet").await, Some(OFF));
    // Back to the default: the row and the entry go.
    h.update_room_settings("quiet", RoomSettings::default())
        .await
        .unwrap();
    assert!(store.rows.lock().unwrap().is_empty());
    assert_eq!(shown(&h, "quiet").await, None);
}

#[tokio::test]
async fn a_failed_write_changes_nothing() {
    let store = Arc::new(FlakyStore::default());
    let h = hub(&store).await;
    store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = h.update_room_settings("quiet", OFF).await.unwrap_err();
    assert!(format!("{e:#}").contains("disk full"));
    assert_eq!(shown(&h, "quiet").await, None, "memory follows the store");
    store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    h.update_room_settings("quiet", OFF).await.unwrap();
    store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    h.update_room_settings("quiet", RoomSettings::default())
        .await
        .unwrap_err();
    assert_eq!(shown(&h, "quiet").await, Some(OFF));
}

#[tokio::test]
async fn a_sqlite_write_failure_is_an_error_and_memory_keeps_the_stored_value() {
    let dir = std::env::temp_dir().join(format!("chorus-hub-settings-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("chat.sqlite3");
    let sqlite = Arc::new(SqliteStore::open(&path).unwrap());
    let state = MemoryState::with_settings_store(sqlite.clone(), sqlite).unwrap();
    let h = Hub::start(config(), Arc::new(state)).await.unwrap();
    h.update_room_settings("quiet", OFF).await.unwrap();
    // Someone breaks the database under a running signaling.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TABLE room_settings;")
        .unwrap();
    let on = RoomSettings {
        enhanced_audio: Some(true),
    };
    let e = h.update_room_settings("quiet", on).await.unwrap_err();
    assert!(format!("{e:#}").contains("room_settings"), "{e:#}");
    assert_eq!(shown(&h, "quiet").await, Some(OFF));
    let _ = std::fs::remove_dir_all(&dir);
}
