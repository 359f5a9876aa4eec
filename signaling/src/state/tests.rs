//! One suite, both implementations: each test gets two handles on one shared state (two
//! "instances"): the same `MemoryState` twice, or two `RedisState`s on one real
//! `redis-server`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_protocol::chat::Sender;

use super::history::MemoryStore;
use super::memory::MemoryState;
use super::redis::{RedisConfig, RedisState};
use super::*;
use crate::testing::RedisServer;

struct Fleet {
    a: Arc<dyn SharedState>,
    b: Arc<dyn SharedState>,
    /// Every event each handle delivered, in order.
    seen_a: Arc<Mutex<Vec<RoomEvent>>>,
    seen_b: Arc<Mutex<Vec<RoomEvent>>>,
    _server: Option<RedisServer>,
}

async fn collect(state: &Arc<dyn SharedState>) -> Arc<Mutex<Vec<RoomEvent>>> {
    let seen: Arc<Mutex<Vec<RoomEvent>>> = Arc::default();
    let s = seen.clone();
    state
        .subscribe(Arc::new(move |ev| s.lock().unwrap().push(ev)))
        .await
        .unwrap();
    seen
}

async fn memory() -> Fleet {
    let state: Arc<dyn SharedState> = Arc::new(MemoryState::new(Arc::new(MemoryStore::new(3))));
    let seen_a = collect(&state).await;
    let seen_b = collect(&state).await;
    Fleet {
        a: state.clone(),
        b: state,
        seen_a,
        seen_b,
        _server: None,
    }
}

async fn redis() -> Option<Fleet> {
    let server = RedisServer::start()?;
    let config = RedisConfig {
        url: server.url(),
        prefix: "test".into(),
        chat_history: 3,
        chat_retention: Duration::from_secs(60),
    };
    let a: Arc<dyn SharedState> = Arc::new(RedisState::connect(config.clone()).await.unwrap());
    let b: Arc<dyn SharedState> = Arc::new(RedisState::connect(config).await.unwrap());
    // The suite's instances are alive; a seat of any other is a dead instance's.
    a.heartbeat("A").await.unwrap();
    b.heartbeat("B").await.unwrap();
    let seen_a = collect(&a).await;
    let seen_b = collect(&b).await;
    Some(Fleet {
        a,
        b,
        seen_a,
        seen_b,
        _server: Some(server),
    })
}

/// Runs `suite` against the memory state, then against Redis.
macro_rules! both {
    ($name:ident, $suite:ident) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn memory() {
                $suite(super::memory().await).await;
            }
            #[tokio::test]
            async fn redis() {
                if let Some(f) = super::redis().await {
                    $suite(f).await;
                }
            }
        }
    };
}

both!(placement, placement_is_taken_once_and_kept_while_seated);
both!(
    racing_joins,
    racing_joins_from_two_instances_place_a_room_once
);
both!(events, seat_changes_reach_every_instance_in_order);
both!(rejoin, a_second_join_replaces_and_a_resume_takes_back);
both!(ownership, only_the_owner_writes_or_removes_a_seat);
both!(settings, settings_are_shared_and_announced);
both!(chat, chat_history_is_bounded_ordered_and_shared);
both!(dominant, dominant_speaker_is_kept_for_the_placed_node_only);

fn nodes(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn req<'a>(room: &'a str, who: &'a str, instance: &'a str, nodes: &'a [String]) -> JoinRequest<'a> {
    JoinRequest {
        room,
        identity: who,
        name: who,
        protocol: 2,
        instance,
        resume: false,
        nodes,
    }
}

async fn seat(state: &Arc<dyn SharedState>, r: JoinRequest<'_>) -> (Seat, RoomSnapshot) {
    let id = state.next_seat_id().await.unwrap();
    match state.join(r, id).await.unwrap() {
        JoinOutcome::Seated { seat, room, .. } => (seat, room),
        other => panic!("expected a seat, got {other:?}"),
    }
}

/// Waits until `seen` holds at least `n` events (Redis delivers them asynchronously).
async fn wait_events(seen: &Arc<Mutex<Vec<RoomEvent>>>, n: usize) -> Vec<RoomEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = seen.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} events arrived: {got:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn placement_is_taken_once_and_kept_while_seated(f: Fleet) {
    let none: Vec<String> = vec![];
    let id = f.a.next_seat_id().await.unwrap();
    assert_eq!(
        f.a.join(req("r", "ana", "A", &none), id).await.unwrap(),
        JoinOutcome::NoNode
    );
    let (ana, room) = seat(&f.a, req("r", "ana", "A", &nodes(&["n1", "n2"]))).await;
    assert_eq!(ana.node, "n1");
    assert_eq!(room.node.as_deref(), Some("n1"));
    // Instance B prefers n2 but the room is on n1, which B also reaches.
    let (bo, room) = seat(&f.b, req("r", "bo", "B", &nodes(&["n2", "n1"]))).await;
    assert_eq!(bo.node, "n1");
    assert_eq!(room.seats.len(), 2);
    assert!(bo.id != ana.id, "seat ids are unique across instances");
    // An instance without n1 cannot seat anyone in this room.
    let id = f.b.next_seat_id().await.unwrap();
    assert_eq!(
        f.b.join(req("r", "cy", "B", &nodes(&["n2"])), id)
            .await
            .unwrap(),
        JoinOutcome::NodeUnreachable { node: "n1".into() }
    );
    // The placement goes with the last seat; the next join places the room anew.
    assert!(f
        .a
        .remove_seat("A", "r", ana.id, "left")
        .await
        .unwrap()
        .is_some());
    assert!(f
        .b
        .remove_seat("B", "r", bo.id, "left")
        .await
        .unwrap()
        .is_some());
    let empty = f.a.room("r").await.unwrap();
    assert!(empty.seats.is_empty() && empty.node.is_none(), "{empty:?}");
    assert!(f.a.rooms().await.unwrap().is_empty());
    let (cy, _) = seat(&f.b, req("r", "cy", "B", &nodes(&["n2"]))).await;
    assert_eq!(cy.node, "n2");
    assert_eq!(f.a.rooms().await.unwrap(), ["r"]);
}

async fn racing_joins_from_two_instances_place_a_room_once(f: Fleet) {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (state, inst, prefer) = if i % 2 == 0 {
            (f.a.clone(), "A", nodes(&["n1", "n2"]))
        } else {
            (f.b.clone(), "B", nodes(&["n2", "n1"]))
        };
        tasks.push(tokio::spawn(async move {
            let who = format!("p{i}");
            let id = state.next_seat_id().await.unwrap();
            match state.join(req("race", &who, inst, &prefer), id).await {
                Ok(JoinOutcome::Seated { seat, .. }) => seat,
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut placed = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let s = t.await.unwrap();
        placed.insert(s.node);
        ids.insert(s.id);
    }
    assert_eq!(placed.len(), 1, "one room, one node: {placed:?}");
    assert_eq!(ids.len(), 20);
    assert_eq!(f.b.room("race").await.unwrap().seats.len(), 20);
}

async fn seat_changes_reach_every_instance_in_order(f: Fleet) {
    let n = nodes(&["n1"]);
    let (ana, snap_a) = seat(&f.a, req("r", "ana", "A", &n)).await;
    let (mut bo, snap_b) = seat(&f.b, req("r", "bo", "B", &n)).await;
    assert!(snap_b.seq > snap_a.seq);
    bo.muted = true;
    assert!(f.b.update_seat("B", &bo, true).await.unwrap());
    f.a.remove_seat("A", "r", ana.id, "left").await.unwrap();
    for seen in [&f.seen_a, &f.seen_b] {
        let evs = wait_events(seen, 4).await;
        let seats: Vec<&RoomEvent> = evs.iter().filter(|e| e.kind.is_seat_change()).collect();
        assert_eq!(seats.len(), 4, "{evs:?}");
        assert!(seats.windows(2).all(|w| w[0].seq < w[1].seq), "{seats:?}");
        // The joiner's snapshot was taken at its own `joined` event.
        assert_eq!(seats[1].seq, snap_b.seq);
        assert!(
            matches!(&seats[0].kind, EventKind::Joined(s) if s.seat.identity == "ana" && s.instance == "A")
        );
        assert!(
            matches!(&seats[2].kind, EventKind::Updated(s) if s.seat.muted && s.instance == "B")
        );
        assert!(
            matches!(&seats[3].kind, EventKind::Left { seat, reason } if seat.seat.id == ana.id && reason == "left")
        );
    }
}

async fn a_second_join_replaces_and_a_resume_takes_back(f: Fleet) {
    let n = nodes(&["n1"]);
    let (first, _) = seat(&f.a, req("r", "ana", "A", &n)).await;
    // Resume on the same instance: the same seat.
    let id = f.a.next_seat_id().await.unwrap();
    let resumed =
        f.a.join(
            JoinRequest {
                resume: true,
                ..req("r", "ana", "A", &n)
            },
            id,
        )
        .await
        .unwrap();
    assert!(
        matches!(&resumed, JoinOutcome::Resumed { seat, from: None, .. } if seat.id == first.id),
        "{resumed:?}"
    );
    // Resume on instance B, which reaches the seat's node: B takes the seat over.
    let id = f.b.next_seat_id().await.unwrap();
    let moved =
        f.b.join(
            JoinRequest {
                resume: true,
                ..req("r", "ana", "B", &n)
            },
            id,
        )
        .await
        .unwrap();
    assert!(
        matches!(&moved, JoinOutcome::Resumed { seat, from: Some(a), .. } if seat.id == first.id && a == "A"),
        "{moved:?}"
    );
    let evs = wait_events(&f.seen_a, 2).await;
    assert!(
        evs.iter().any(
            |e| matches!(&e.kind, EventKind::Moved(s) if s.instance == "B" && s.seat.id == first.id)
        ),
        "{evs:?}"
    );
    assert!(
        f.a.remove_seat("A", "r", first.id, "left")
            .await
            .unwrap()
            .is_none(),
        "A let go"
    );
    // A plain join (or another protocol) replaces the seat.
    let id = f.a.next_seat_id().await.unwrap();
    let again =
        f.a.join(
            JoinRequest {
                protocol: 1,
                resume: true,
                ..req("r", "ana", "A", &n)
            },
            id,
        )
        .await
        .unwrap();
    let JoinOutcome::Seated {
        seat,
        room,
        replaced,
    } = again
    else {
        panic!("{again:?}");
    };
    assert_eq!(
        replaced.map(|r| (r.seat.id, r.instance)),
        Some((first.id, "B".to_string()))
    );
    assert_eq!(room.seats.len(), 1);
    assert_eq!(seat.protocol, 1);
    let evs = wait_events(&f.seen_b, 4).await;
    assert!(evs.iter().any(|e| matches!(&e.kind, EventKind::Left { seat, reason } if seat.seat.id == first.id && reason == "replaced" && seat.instance == "B")), "{evs:?}");
}

async fn only_the_owner_writes_or_removes_a_seat(f: Fleet) {
    let n = nodes(&["n1"]);
    let (mut ana, _) = seat(&f.a, req("r", "ana", "A", &n)).await;
    ana.speaking = true;
    assert!(!f.b.update_seat("B", &ana, true).await.unwrap());
    assert_eq!(
        f.b.remove_seat("B", "r", ana.id, "left").await.unwrap(),
        None
    );
    assert!(!f.a.room("r").await.unwrap().seats[0].seat.speaking);
    ana.tracks.push(chorus_protocol::track::TrackInfo {
        sid: "TR_a".into(),
        kind: chorus_protocol::track::TrackKind::Audio,
        source: chorus_protocol::track::TrackSource::Microphone,
        muted: false,
        codec: "opus".into(),
        layers: vec![],
    });
    assert!(f.a.update_seat("A", &ana, true).await.unwrap());
    let snap = f.b.room("r").await.unwrap();
    assert_eq!(snap.seats[0].seat, ana, "B reads what A wrote");
    // A change clients do not see is stored without an event.
    ana.chat_ready = true;
    assert!(f.a.update_seat("A", &ana, false).await.unwrap());
    assert!(f.b.room("r").await.unwrap().seats[0].seat.chat_ready);
    ana.muted = true;
    assert!(f.a.update_seat("A", &ana, true).await.unwrap());
    let evs = wait_events(&f.seen_b, 3).await;
    let updates: Vec<bool> = evs
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Updated(s) => Some(s.seat.muted),
            _ => None,
        })
        .collect();
    assert_eq!(updates, [false, true], "only the announced writes: {evs:?}");
    let gone = f.a.remove_seat("A", "r", ana.id, "left").await.unwrap();
    assert_eq!(gone.map(|s| s.id), Some(ana.id));
    assert!(
        !f.a.update_seat("A", &ana, true).await.unwrap(),
        "a removed seat stays removed"
    );
}

async fn settings_are_shared_and_announced(f: Fleet) {
    let off = RoomSettings {
        enhanced_audio: Some(false),
    };
    f.a.put_settings("quiet", off).await.unwrap();
    assert_eq!(f.b.room("quiet").await.unwrap().settings, off);
    assert_eq!(f.b.rooms().await.unwrap(), ["quiet"]);
    let evs = wait_events(&f.seen_b, 1).await;
    assert_eq!(evs[0].kind, EventKind::Settings(off));
    f.b.put_settings("quiet", RoomSettings::default())
        .await
        .unwrap();
    assert_eq!(
        f.a.room("quiet").await.unwrap().settings,
        RoomSettings::default()
    );
    assert!(f.a.rooms().await.unwrap().is_empty());
}

async fn chat_history_is_bounded_ordered_and_shared(f: Fleet) {
    let ana = Sender {
        identity: "ana".into(),
        name: "Ana ✓ <b>\"x\"".into(),
    };
    let mut ids = vec![];
    for (i, text) in ["one", "two", "three", "four"].iter().enumerate() {
        let state = if i % 2 == 0 { &f.a } else { &f.b };
        ids.push(
            state
                .chat_append("r", 7, &ana, text, 100 + i as u64)
                .await
                .unwrap()
                .id,
        );
    }
    state_other_room(&f, &ana).await;
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let recent = f.b.chat_recent("r", 10).await.unwrap();
    assert_eq!(
        recent.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["two", "three", "four"],
        "capped at 3 per room"
    );
    assert_eq!(recent[0].from, ana);
    assert_eq!(recent[0].ts, 101);
    assert_eq!(f.a.chat_recent("r", 1).await.unwrap()[0].text, "four");
    assert_eq!(
        f.a.chat_author("r", ids[3]).await.unwrap().as_deref(),
        Some("ana")
    );
    assert_eq!(f.a.chat_author("other", ids[3]).await.unwrap(), None);
    assert!(f.b.chat_delete("r", ids[3]).await.unwrap());
    assert!(!f.a.chat_delete("r", ids[3]).await.unwrap());
    assert_eq!(f.a.chat_recent("r", 10).await.unwrap().len(), 2);
    let evs = wait_events(&f.seen_a, 6).await;
    let chat: Vec<&str> = evs
        .iter()
        .filter(|e| e.room == "r")
        .filter_map(|e| match &e.kind {
            EventKind::Chat { sender: 7, message } => Some(message.text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(chat, ["one", "two", "three", "four"]);
    assert!(evs
        .iter()
        .any(|e| e.kind == EventKind::ChatDeleted { id: ids[3] }));
}

async fn state_other_room(f: &Fleet, from: &Sender) {
    f.b.chat_append("other", 8, from, "elsewhere", 1)
        .await
        .unwrap();
    assert_eq!(f.a.chat_recent("other", 10).await.unwrap().len(), 1);
}

async fn dominant_speaker_is_kept_for_the_placed_node_only(f: Fleet) {
    let n = nodes(&["n1"]);
    let (ana, _) = seat(&f.a, req("r", "ana", "A", &n)).await;
    f.b.set_dominant("r", "n9", Some(99)).await.unwrap();
    assert_eq!(f.a.room("r").await.unwrap().dominant, None);
    f.b.set_dominant("r", "n1", Some(ana.id)).await.unwrap();
    assert_eq!(f.a.room("r").await.unwrap().dominant, Some(ana.id));
    f.a.set_dominant("r", "n1", None).await.unwrap();
    assert_eq!(f.b.room("r").await.unwrap().dominant, None);
}

/// Redis goes away and comes back (empty: no persistence): calls fail fast with
/// `Unavailable` instead of hanging, and everything works again by itself afterwards,
/// the events subscription included.
#[tokio::test]
async fn redis_outage_fails_fast_and_recovers_by_itself() {
    let Some(mut f) = redis().await else {
        return;
    };
    let n = nodes(&["n1"]);
    let (ana, before) = seat(&f.a, req("r", "ana", "A", &n)).await;
    wait_events(&f.seen_b, 1).await;
    let server = f._server.as_mut().unwrap();
    server.stop();
    let started = std::time::Instant::now();
    match f.a.next_seat_id().await {
        Err(StateError::Unavailable(_)) => {}
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(matches!(f.b.check().await, Err(StateError::Unavailable(_))));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "errors took {:?}",
        started.elapsed()
    );
    eprintln!(
        "with Redis down, two calls failed in {:?}",
        started.elapsed()
    );
    server.restart();
    let restarted = std::time::Instant::now();
    // Both connections come back without anyone doing anything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while f.a.check().await.is_err() || f.b.check().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "both connections answered {:?} after the restart",
        restarted.elapsed()
    );
    // The restarted Redis is empty; a join works and B hears of it (resubscribed).
    let (bo, after) = seat(&f.a, req("r", "bo", "A", &n)).await;
    // Its counters went on growing: nodes still hold ana's id, instances ana's sequence.
    assert!(bo.id > ana.id, "{} after {}", bo.id, ana.id);
    assert!(after.seq > before.seq, "{} after {}", after.seq, before.seq);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = f.seen_b.lock().unwrap().clone();
        if got
            .iter()
            .any(|e| matches!(&e.kind, EventKind::Joined(s) if s.seat.id == bo.id))
        {
            eprintln!(
                "events flowed again {:?} after the restart",
                restarted.elapsed()
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never heard of the join after the outage: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Settings written into Redis by hand (or by a newer version) that this version cannot
/// read are ignored with a warning; they do not stop joins.
#[tokio::test]
async fn unreadable_settings_in_redis_do_not_stop_joins() {
    let Some(f) = redis().await else {
        return;
    };
    let client = ::redis::Client::open(f._server.as_ref().unwrap().url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("HSET")
        .arg("test:settings")
        .arg("r")
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (_, room) = seat(&f.a, req("r", "ana", "A", &nodes(&["n1"]))).await;
    assert_eq!(room.settings, RoomSettings::default());
}

/// An instance that stops saying it is alive (crashed) leaves seats behind; the next join
/// of the room removes them, and a room they held on a node nobody reaches any more is
/// placed anew instead of refusing every join.
#[tokio::test]
async fn a_dead_instances_seats_go_with_the_next_join_of_their_room() {
    let Some(f) = redis().await else {
        return;
    };
    let (ghost, _) = seat(&f.a, req("r", "ghost", "C", &nodes(&["gone"]))).await;
    // "C" dies: its liveness expires (here: goes at once).
    let client = ::redis::Client::open(f._server.as_ref().unwrap().url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let gone: i64 = ::redis::cmd("DEL")
        .arg("test:instance:C")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(gone, 1, "the join said C was alive");
    let (ana, room) = seat(&f.a, req("r", "ana", "A", &nodes(&["n1"]))).await;
    assert_eq!(ana.node, "n1", "placed anew");
    assert_eq!(
        room.seats.iter().map(|s| s.seat.id).collect::<Vec<_>>(),
        [ana.id]
    );
    let evs = wait_events(&f.seen_b, 3).await;
    assert!(
        evs.iter().any(|e| matches!(&e.kind, EventKind::Left { seat, reason } if seat.seat.id == ghost.id && reason == "disconnected")),
        "{evs:?}"
    );
    // A live instance's seats stay.
    let (bo, room) = seat(&f.b, req("r", "bo", "B", &nodes(&["n1"]))).await;
    assert_eq!(room.seats.len(), 2);
    assert!(room.seats.iter().any(|s| s.seat.id == bo.id));
}
