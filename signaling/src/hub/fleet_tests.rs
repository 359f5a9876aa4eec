//! Two instances (two hubs) over one shared state, each with its own control connection
//! to the same node "n": run over one `MemoryState`, then over a real `redis-server`.

use std::collections::{HashMap, HashSet};

use chorus_protocol::chat::ChatServerFrame;
use chorus_protocol::client::ParticipantInfo;

use super::*;
use crate::session::{Outbound, SESSION_QUEUE};
use crate::state::history::MemoryStore;
use crate::state::memory::MemoryState;
use crate::state::redis::{RedisConfig, RedisState};
use crate::testing::RedisServer;

const WAIT: Duration = Duration::from_secs(5);

struct Instance {
    hub: Arc<Hub>,
    node_rx: mpsc::UnboundedReceiver<ToNode>,
    node_seen: Vec<ToNode>,
}

struct Fleet {
    i: [Instance; 2],
    sessions: HashMap<u64, mpsc::Receiver<Outbound>>,
    /// Everything each session received, in order (text frames decoded; a close as
    /// `None`).
    got: HashMap<u64, Vec<Option<ServerMessage>>>,
    next_conn: u64,
    _server: Option<RedisServer>,
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

async fn instance(state: Arc<dyn SharedState>) -> Instance {
    let hub = Hub::start(config(), state).await.unwrap();
    let (tx, node_rx) = mpsc::unbounded_channel();
    hub.register_node("n", tx).unwrap();
    Instance {
        hub,
        node_rx,
        node_seen: vec![],
    }
}

async fn memory() -> Fleet {
    let state: Arc<dyn SharedState> = Arc::new(MemoryState::new(Arc::new(MemoryStore::new(100))));
    fleet([instance(state.clone()).await, instance(state).await], None)
}

async fn redis() -> Option<Fleet> {
    let server = RedisServer::start()?;
    let config = RedisConfig {
        url: server.url(),
        prefix: "hub".into(),
        chat_history: 100,
        chat_retention: Duration::from_secs(60),
    };
    let a = RedisState::connect(config.clone()).await.unwrap();
    let b = RedisState::connect(config).await.unwrap();
    Some(fleet(
        [instance(Arc::new(a)).await, instance(Arc::new(b)).await],
        Some(server),
    ))
}

fn fleet(i: [Instance; 2], server: Option<RedisServer>) -> Fleet {
    Fleet {
        i,
        sessions: HashMap::new(),
        got: HashMap::new(),
        next_conn: 1,
        _server: server,
    }
}

macro_rules! both {
    ($name:ident) => {
        mod $name {
            // Several threads, so joins and events really interleave.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(super::memory().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                if let Some(f) = super::redis().await {
                    super::$name(f).await;
                }
            }
        }
    };
}

both!(presence_mute_speaking_and_leave_cross_instances);
both!(chat_crosses_instances_and_a_late_joiner_gets_the_history);
both!(a_session_resumes_on_the_other_instance);
both!(a_second_join_on_the_other_instance_replaces_the_first);
both!(racing_joins_on_two_instances_see_everyone_exactly_once);

fn claims(identity: &str) -> Claims {
    Claims {
        iss: "k".into(),
        sub: identity.into(),
        name: None,
        room: "room".into(),
        exp: u64::MAX,
        nbf: None,
        grants: Grants::default_participant(),
    }
}

impl Fleet {
    /// Joins through instance `at`; returns (participant, conn).
    async fn join(&mut self, at: usize, identity: &str, resume: bool) -> (u64, u64) {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let conn = self.next_conn;
        self.next_conn += 1;
        let j = self.i[at]
            .hub
            .join(
                &claims(identity),
                resume,
                chorus_protocol::PROTOCOL_VERSION,
                conn,
                tx,
            )
            .await
            .unwrap();
        self.sessions.insert(j.participant, rx);
        self.got.insert(j.participant, vec![]);
        (j.participant, conn)
    }

    fn drain(&mut self, p: u64) {
        let Some(rx) = self.sessions.get_mut(&p) else {
            return;
        };
        let got = self.got.entry(p).or_default();
        while let Ok(o) = rx.try_recv() {
            got.push(match o {
                Outbound::Text(t) => Some(serde_json::from_str(t.as_str()).unwrap()),
                Outbound::Close(..) => None,
            });
        }
    }

    /// Waits until session `p` has received a message `f` accepts; returns it.
    async fn expect<T>(&mut self, p: u64, f: impl Fn(&ServerMessage) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.drain(p);
            if let Some(t) = self.got[&p].iter().flatten().find_map(&f) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "participant {p} never got it; got {:?}",
                self.got[&p]
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until instance `at`'s node connection carried a command `f` accepts.
    async fn node_expect<T>(&mut self, at: usize, f: impl Fn(&ToNode) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let inst = &mut self.i[at];
            while let Ok(m) = inst.node_rx.try_recv() {
                inst.node_seen.push(m);
            }
            if let Some(t) = inst.node_seen.iter().find_map(&f) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {at}'s node never got it; got {:?}",
                inst.node_seen
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn node_event(&self, at: usize, ev: FromNode) {
        self.i[at].hub.node_event("n", ev).await;
    }

    async fn chat(&mut self, at: usize, p: u64, data: &str) {
        self.node_event(
            at,
            FromNode::ChatIn {
                participant: p,
                data: data.into(),
            },
        )
        .await;
    }
}

fn updated(who: u64) -> impl Fn(&ServerMessage) -> Option<ParticipantInfo> {
    move |m| match m {
        ServerMessage::ParticipantUpdated { participant } if participant.sid == who.to_string() => {
            Some(participant.clone())
        }
        _ => None,
    }
}

async fn presence_mute_speaking_and_leave_cross_instances(mut f: Fleet) {
    let (ana, ana_conn) = f.join(0, "ana", false).await;
    let (bo, bo_conn) = f.join(1, "bo", false).await;
    let others = f
        .expect(bo, |m| match m {
            ServerMessage::Joined { participants, .. } => Some(participants.clone()),
            _ => None,
        })
        .await;
    assert_eq!(others.len(), 1);
    assert_eq!(others[0].identity, "ana");
    let joined = f
        .expect(ana, |m| match m {
            ServerMessage::ParticipantJoined { participant } => Some(participant.clone()),
            _ => None,
        })
        .await;
    assert_eq!(joined.sid, bo.to_string());
    // Each instance seated its own participant on the node, through its own connection.
    f.node_expect(0, |m| {
        matches!(m, ToNode::AddParticipant { participant, .. } if *participant == ana).then_some(())
    })
    .await;
    f.node_expect(1, |m| {
        matches!(m, ToNode::AddParticipant { participant, .. } if *participant == bo).then_some(())
    })
    .await;

    f.i[0].hub.set_muted(ana, ana_conn, true).await.unwrap();
    let seen = f.expect(bo, |m| updated(ana)(m).filter(|p| p.muted)).await;
    assert!(seen.muted && !seen.speaking);

    f.node_event(
        1,
        FromNode::Speaking {
            participant: bo,
            speaking: true,
        },
    )
    .await;
    f.expect(ana, |m| updated(bo)(m).filter(|p| p.speaking).map(|_| ()))
        .await;
    // A report about bo from instance A's connection is not about A's seat: ignored.
    f.node_event(
        0,
        FromNode::Speaking {
            participant: bo,
            speaking: false,
        },
    )
    .await;

    f.i[1].hub.leave(bo, bo_conn).await;
    let reason = f
        .expect(ana, |m| match m {
            ServerMessage::ParticipantLeft { sid, reason, .. } if *sid == bo.to_string() => {
                Some(reason.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(reason, "left");
    f.node_expect(1, |m| {
        (*m == ToNode::RemoveParticipant { participant: bo }).then_some(())
    })
    .await;
    assert!(
        !f.i[0]
            .node_seen
            .contains(&ToNode::RemoveParticipant { participant: bo }),
        "only bo's instance frees its media session"
    );
    // bo was never shown as not speaking after A's stray report.
    f.drain(ana);
    assert!(!f.got[&ana]
        .iter()
        .flatten()
        .any(|m| updated(bo)(m).is_some_and(|p| !p.speaking && !p.muted)));
    assert_eq!(f.i[0].hub.stats().participants, 1);
    assert_eq!(f.i[1].hub.stats().participants, 0);
}

fn chat_frames(seen: &[ToNode], to: u64) -> Vec<ChatServerFrame> {
    seen.iter()
        .filter_map(|m| match m {
            ToNode::ChatTo { participants, data } if participants.contains(&to) => {
                Some(serde_json::from_str(data).unwrap())
            }
            _ => None,
        })
        .collect()
}

async fn chat_crosses_instances_and_a_late_joiner_gets_the_history(mut f: Fleet) {
    let (ana, _) = f.join(0, "ana", false).await;
    let (bo, _) = f.join(1, "bo", false).await;
    f.node_event(0, FromNode::ChatReady { participant: ana })
        .await;
    f.node_event(1, FromNode::ChatReady { participant: bo })
        .await;
    f.chat(
        0,
        ana,
        r#"{"type":"send","text":"hello from A","ref":"r1"}"#,
    )
    .await;
    f.chat(1, bo, r#"{"type":"send","text":"hi from B"}"#).await;
    // Each side hears the other's message over its own node connection.
    let to_bo = f
        .node_expect(1, |m| match m {
            ToNode::ChatTo { participants, data }
                if *participants == [bo] && data.contains("hello from A") =>
            {
                Some(data.clone())
            }
            _ => None,
        })
        .await;
    assert!(
        !to_bo.contains("r1"),
        "the ref is the sender's own: {to_bo}"
    );
    f.node_expect(0, |m| match m {
        ToNode::ChatTo { participants, data }
            if *participants == [ana] && data.contains("hi from B") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    // The sender's own copy carries its ref, and only once.
    let own: Vec<_> = chat_frames(&f.i[0].node_seen, ana)
        .into_iter()
        .filter(|fr| matches!(fr, ChatServerFrame::Message { message, .. } if message.text == "hello from A"))
        .collect();
    assert_eq!(own.len(), 1, "{own:?}");
    assert!(matches!(&own[0], ChatServerFrame::Message { reference: Some(r), .. } if r == "r1"));

    // A late joiner on instance B gets both messages as history, in order.
    let (cy, _) = f.join(1, "cy", false).await;
    f.node_event(1, FromNode::ChatReady { participant: cy })
        .await;
    let history = f
        .node_expect(1, |m| match m {
            ToNode::ChatTo { participants, data } if *participants == [cy] => {
                match serde_json::from_str(data).unwrap() {
                    ChatServerFrame::History { messages } => Some(messages),
                    _ => None,
                }
            }
            _ => None,
        })
        .await;
    assert_eq!(
        history.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["hello from A", "hi from B"]
    );
    // Opening a chat channel is nothing other clients are shown.
    for p in [ana, bo] {
        f.drain(p);
        assert!(
            !f.got[&p]
                .iter()
                .flatten()
                .any(|m| matches!(m, ServerMessage::ParticipantUpdated { .. })),
            "{:?}",
            f.got[&p]
        );
    }
    // Deleting on A reaches cy on B.
    let id = history[0].id;
    f.chat(0, ana, &format!(r#"{{"type":"delete","id":{id}}}"#))
        .await;
    f.node_expect(1, |m| match m {
        ToNode::ChatTo { participants, data }
            if participants.contains(&cy) && data.contains("deleted") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
}

async fn a_session_resumes_on_the_other_instance(mut f: Fleet) {
    let (ana, ana_conn) = f.join(0, "ana", false).await;
    let (bo, _) = f.join(0, "bo", false).await;
    f.node_event(0, FromNode::ChatReady { participant: ana })
        .await;
    f.i[0].hub.disconnected(ana, ana_conn);
    let (again, conn) = f.join(1, "ana", true).await;
    assert_eq!(again, ana, "the same seat");
    let resumed = f
        .expect(ana, |m| match m {
            ServerMessage::Joined { resumed, .. } => Some(*resumed),
            _ => None,
        })
        .await;
    assert!(resumed);
    f.node_expect(1, |m| {
        (*m == ToNode::Adopt { participant: ana }).then_some(())
    })
    .await;
    // A lets go of the seat without ending its media session.
    let deadline = tokio::time::Instant::now() + WAIT;
    while f.i[0].hub.stats().participants != 1 {
        assert!(tokio::time::Instant::now() < deadline, "A kept the seat");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!f.i[0]
        .node_seen
        .contains(&ToNode::RemoveParticipant { participant: ana }));
    // B now serves it: a mute through B reaches bo on A; chat still reaches ana.
    f.i[1].hub.set_muted(ana, conn, true).await.unwrap();
    f.expect(bo, |m| updated(ana)(m).filter(|p| p.muted).map(|_| ()))
        .await;
    f.node_event(0, FromNode::ChatReady { participant: bo })
        .await;
    f.chat(0, bo, r#"{"type":"send","text":"still there?"}"#)
        .await;
    f.node_expect(1, |m| match m {
        ToNode::ChatTo { participants, data }
            if *participants == [ana] && data.contains("still there?") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
}

async fn a_second_join_on_the_other_instance_replaces_the_first(mut f: Fleet) {
    let (old, _) = f.join(0, "ana", false).await;
    let (new, _) = f.join(1, "ana", false).await;
    assert_ne!(old, new);
    let reason = f
        .expect(old, |m| match m {
            ServerMessage::Left { reason } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert_eq!(reason, "replaced");
    f.node_expect(0, |m| {
        (*m == ToNode::RemoveParticipant { participant: old }).then_some(())
    })
    .await;
    let others = f
        .expect(new, |m| match m {
            ServerMessage::Joined { participants, .. } => Some(participants.len()),
            _ => None,
        })
        .await;
    assert_eq!(others, 0, "the replaced seat is not in the new one's room");
}

async fn racing_joins_on_two_instances_see_everyone_exactly_once(mut f: Fleet) {
    const N: usize = 24;
    let mut tasks = Vec::new();
    for k in 0..N {
        let hub = f.i[k % 2].hub.clone();
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(SESSION_QUEUE);
            let j = hub
                .join(
                    &claims(&format!("p{k}")),
                    false,
                    chorus_protocol::PROTOCOL_VERSION,
                    1000 + k as u64,
                    tx,
                )
                .await
                .unwrap();
            (j.participant, rx)
        }));
    }
    for t in tasks {
        let (p, rx) = t.await.unwrap();
        f.sessions.insert(p, rx);
        f.got.insert(p, vec![]);
    }
    let everyone: HashSet<String> = f.sessions.keys().map(|p| p.to_string()).collect();
    let ids: Vec<u64> = f.sessions.keys().copied().collect();
    for p in ids {
        let me = p.to_string();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            f.drain(p);
            let msgs: Vec<&ServerMessage> = f.got[&p].iter().flatten().collect();
            let ServerMessage::Joined { participants, .. } = msgs[0] else {
                panic!("{p}'s first message was {:?}", msgs[0]);
            };
            let mut seen: Vec<String> = participants.iter().map(|x| x.sid.clone()).collect();
            seen.extend(msgs[1..].iter().filter_map(|m| match m {
                ServerMessage::ParticipantJoined { participant } => Some(participant.sid.clone()),
                _ => None,
            }));
            let unique: HashSet<String> = seen.iter().cloned().collect();
            assert_eq!(unique.len(), seen.len(), "{p} saw someone twice: {seen:?}");
            assert!(!unique.contains(&me), "{p} was told about itself");
            if unique.len() == N - 1 {
                let mut all = unique;
                all.insert(me);
                assert_eq!(all, everyone);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{p} saw {} of {} others",
                unique.len(),
                N - 1
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
