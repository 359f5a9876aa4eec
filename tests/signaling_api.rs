//! In-process integration tests: real signaling and a real SFU node on loopback ports,
//! joined over real WebSockets by the native client library. Covers the protocol's
//! happy path, every documented bad input, reconnect/resume and node authentication.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_native::{Incoming, SignalingClient};
use chorus_protocol::client::{ClientMessage, ErrorCode, Grants, ServerMessage};
use chorus_sfu::{Node, NodeConfig};
use chorus_signaling::token::{mint, participant_claims, Claims};
use chorus_signaling::{Signaling, SignalingConfig};

const T: Duration = Duration::from_secs(5);
const NODE_SECRET: &str = "test-node-secret";

struct Stack {
    sig: Signaling,
    _node: Option<Node>,
    ws: String,
}

/// Signaling on loopback ports with the dev API key; chat and room settings in
/// `chat_db` (SQLite) or in memory.
async fn start_signaling(grace: Duration, chat_db: Option<std::path::PathBuf>) -> Signaling {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Signaling::start(SignalingConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        api_keys: HashMap::from([("devkey".into(), "devsecret".into())]),
        node_secret: NODE_SECRET.into(),
        control_cert: None,
        https: None,
        dev_key: None,
        reconnect_grace: grace,
        ice_servers: vec![],
        turn: None,
        chat_db,
        redis: None,
        chat: Default::default(),
        allow_enhanced_audio: true,
    })
    .await
    .unwrap()
}

async fn stack_with(nodes: usize, grace: Duration) -> Stack {
    let sig = start_signaling(grace, None).await;
    let node = if nodes > 0 {
        Some(start_node(&sig, "node-a", NODE_SECRET).await)
    } else {
        None
    };
    if nodes > 0 {
        wait_nodes(&sig, 1).await;
    }
    let ws = format!("ws://{}/ws", sig.http_addr);
    Stack {
        sig,
        _node: node,
        ws,
    }
}

async fn stack() -> Stack {
    stack_with(1, Duration::from_secs(15)).await
}

async fn start_node(sig: &Signaling, id: &str, secret: &str) -> Node {
    Node::start(NodeConfig {
        node_id: id.into(),
        signaling: vec![sig.control_addr],
        control_ca_pem: sig.control_cert_pem.clone(),
        node_secret: secret.into(),
        media_listen: "127.0.0.1:0".parse().unwrap(),
        advertise: vec![],
        workers: 1,
        worker: Default::default(),
    })
    .await
    .unwrap()
}

async fn wait_nodes(sig: &Signaling, n: usize) {
    for _ in 0..250 {
        if sig.hub.stats().nodes == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("expected {n} nodes, have {}", sig.hub.stats().nodes);
}

fn token(room: &str, identity: &str) -> String {
    let c = participant_claims(
        "devkey",
        room,
        identity,
        Some(identity),
        Duration::from_secs(600),
        Grants::default_participant(),
    );
    mint(&c, "devsecret").unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn expect_error(c: &mut SignalingClient, code: ErrorCode) -> String {
    match c.recv_timeout(T).await.unwrap() {
        Incoming::Message(ServerMessage::Error { code: got, message }) => {
            assert_eq!(got, code, "message: {message}");
            assert!(!message.is_empty());
            message
        }
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

async fn expect_closed(c: &mut SignalingClient) {
    match c.recv_timeout(T).await.unwrap() {
        Incoming::Closed(_) => {}
        other => panic!("expected the socket to close, got {other:?}"),
    }
}

async fn ping_pong(c: &mut SignalingClient, ts: f64) {
    c.send(&ClientMessage::Ping { ts }).await.unwrap();
    let m = c
        .wait_for(T, |m| matches!(m, ServerMessage::Pong { .. }))
        .await
        .unwrap();
    assert_eq!(m, ServerMessage::Pong { ts });
}

fn join_msg(token: String) -> ClientMessage {
    ClientMessage::Join {
        token,
        room: None,
        resume: false,
        protocol: None,
    }
}

fn self_sid(m: &ServerMessage) -> String {
    match m {
        ServerMessage::Joined { me, .. } => me.sid.clone(),
        other => panic!("not joined: {other:?}"),
    }
}

#[tokio::test]
async fn join_presence_mute_and_leave() {
    let s = stack().await;
    let (mut a, ja) = SignalingClient::join(&s.ws, &token("lobby", "ana"))
        .await
        .unwrap();
    match &ja {
        ServerMessage::Joined {
            room,
            me,
            participants,
            resumed,
            reconnect_grace_secs,
            ..
        } => {
            assert_eq!(room, "lobby");
            assert_eq!(me.identity, "ana");
            assert!(participants.is_empty());
            assert!(!resumed);
            assert_eq!(*reconnect_grace_secs, 15);
        }
        other => panic!("{other:?}"),
    }
    let (mut b, jb) = SignalingClient::join(&s.ws, &token("lobby", "bo"))
        .await
        .unwrap();
    match &jb {
        ServerMessage::Joined { participants, .. } => {
            assert_eq!(participants.len(), 1);
            assert_eq!(participants[0].identity, "ana");
        }
        other => panic!("{other:?}"),
    }
    let m = a
        .wait_for(T, |m| matches!(m, ServerMessage::ParticipantJoined { .. }))
        .await
        .unwrap();
    assert!(
        matches!(m, ServerMessage::ParticipantJoined { participant } if participant.identity == "bo")
    );

    a.send(&ClientMessage::Mute { muted: true }).await.unwrap();
    let m = b
        .wait_for(T, |m| matches!(m, ServerMessage::ParticipantUpdated { .. }))
        .await
        .unwrap();
    assert!(
        matches!(m, ServerMessage::ParticipantUpdated { participant } if participant.identity == "ana" && participant.muted)
    );

    a.send(&ClientMessage::Leave).await.unwrap();
    let m = b
        .wait_for(T, |m| matches!(m, ServerMessage::ParticipantLeft { .. }))
        .await
        .unwrap();
    assert!(
        matches!(m, ServerMessage::ParticipantLeft { identity, reason, .. } if identity == "ana" && reason == "left")
    );
    assert_eq!(s.sig.hub.stats().participants, 1);
}

#[tokio::test]
async fn bad_tokens_get_documented_errors_and_close() {
    let s = stack().await;

    // Expired (beyond the 5 s leeway).
    let expired = Claims {
        iss: "devkey".into(),
        sub: "old".into(),
        name: None,
        room: "lobby".into(),
        exp: now() - 60,
        nbf: None,
        grants: Grants::default_participant(),
    };
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&join_msg(mint(&expired, "devsecret").unwrap()))
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::TokenExpired).await;
    expect_closed(&mut c).await;

    // A token for another room.
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&ClientMessage::Join {
        token: token("a", "x"),
        room: Some("b".into()),
        resume: false,
        protocol: None,
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::Forbidden).await;
    expect_closed(&mut c).await;

    // Signed with the wrong secret.
    let c2 = participant_claims(
        "devkey",
        "lobby",
        "x",
        None,
        Duration::from_secs(60),
        Grants::default_participant(),
    );
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&join_msg(mint(&c2, "wrong-secret").unwrap()))
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::InvalidToken).await;
    expect_closed(&mut c).await;

    // No join grant.
    let nojoin = participant_claims(
        "devkey",
        "lobby",
        "x",
        None,
        Duration::from_secs(60),
        Grants::default(),
    );
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&join_msg(mint(&nojoin, "devsecret").unwrap()))
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::Forbidden).await;

    // Unsupported protocol version.
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&ClientMessage::Join {
        token: token("lobby", "x"),
        room: None,
        resume: false,
        protocol: Some(99),
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::UnsupportedProtocol).await;
    assert_eq!(s.sig.hub.stats().participants, 0);
}

#[tokio::test]
async fn protocols_1_and_2_are_served_and_track_grants_hold_over_the_socket() {
    use chorus_protocol::track::{Quality, TrackSource};
    let s = stack().await;
    for (asked, echoed) in [(None, 1), (Some(1), 1), (Some(2), 2)] {
        let mut c = SignalingClient::connect(&s.ws).await.unwrap();
        c.send(&ClientMessage::Join {
            token: token("lobby", &format!("v{echoed}-{asked:?}")),
            room: None,
            resume: false,
            protocol: asked,
        })
        .await
        .unwrap();
        match c.recv_timeout(T).await.unwrap() {
            Incoming::Message(ServerMessage::Joined { protocol, .. }) => {
                assert_eq!(protocol, echoed, "asked {asked:?}")
            }
            other => panic!("expected joined, got {other:?}"),
        }
    }
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&ClientMessage::Join {
        token: token("lobby", "v3"),
        room: None,
        resume: false,
        protocol: Some(3),
    })
    .await
    .unwrap();
    let m = expect_error(&mut c, ErrorCode::UnsupportedProtocol).await;
    assert!(m.contains("1 (audio only) and 2"), "{m}");
    expect_closed(&mut c).await;

    // A microphone-only token offering a camera: forbidden, and the session goes on.
    let mic_only = participant_claims(
        "devkey",
        "lobby",
        "mic",
        None,
        Duration::from_secs(600),
        Grants {
            can_publish_sources: Some([TrackSource::Microphone].into_iter().collect()),
            ..Grants::default_participant()
        },
    );
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&ClientMessage::Join {
        token: mint(&mic_only, "devsecret").unwrap(),
        room: None,
        resume: false,
        protocol: Some(2),
    })
    .await
    .unwrap();
    c.wait_for(T, |m| matches!(m, ServerMessage::Joined { .. }))
        .await
        .unwrap();
    c.send(&ClientMessage::Offer {
        sdp: "v=0\r\na=group:BUNDLE 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n\
              a=sendonly\r\na=rtpmap:96 VP8/90000\r\n"
            .into(),
        tracks: vec![],
    })
    .await
    .unwrap();
    let m = expect_error(&mut c, ErrorCode::Forbidden).await;
    assert_eq!(m, "this token may not publish camera");
    c.send(&ClientMessage::UpdateSubscription {
        track_sid: "t1_1".into(),
        max_quality: Some(Quality::Low),
        visible: None,
        width: None,
        height: None,
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::UnknownTrack).await;
    // Adaptive stream sizes come in pairs and within bounds.
    for (w, h) in [(Some(640), None), (Some(100_000), Some(100))] {
        c.send(&ClientMessage::UpdateSubscription {
            track_sid: "t1_1".into(),
            max_quality: None,
            visible: Some(true),
            width: w,
            height: h,
        })
        .await
        .unwrap();
        expect_error(&mut c, ErrorCode::BadRequest).await;
    }
    ping_pong(&mut c, 2.0).await;
}

#[tokio::test]
async fn malformed_input_gets_errors_while_others_keep_being_served() {
    let s = stack().await;
    let (mut other, _) = SignalingClient::join(&s.ws, &token("lobby", "other"))
        .await
        .unwrap();
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();

    // Before join.
    c.send(&ClientMessage::Offer {
        sdp: "v=0".into(),
        tracks: vec![],
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::NotJoined).await;
    // Garbage JSON, a JSON object of the wrong shape, a binary frame.
    c.send_text("{not json".into()).await.unwrap();
    expect_error(&mut c, ErrorCode::BadRequest).await;
    c.send_text(r#"{"type":"launch_missiles"}"#.into())
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::BadRequest).await;
    c.send_text(r#"{"type":"join"}"#.into()).await.unwrap();
    expect_error(&mut c, ErrorCode::BadRequest).await;
    c.send_binary(vec![0, 1, 2, 3]).await.unwrap();
    expect_error(&mut c, ErrorCode::BadRequest).await;
    // A 1 MiB frame.
    c.send_text("x".repeat(1024 * 1024)).await.unwrap();
    let msg = expect_error(&mut c, ErrorCode::MessageTooLarge).await;
    assert!(msg.contains("65536"), "{msg}");
    ping_pong(&mut c, 1.0).await;

    // Join, then an SDP that is not SDP, a bad candidate, a second join.
    c.send(&join_msg(token("lobby", "mallory"))).await.unwrap();
    let joined = c
        .wait_for(T, |m| matches!(m, ServerMessage::Joined { .. }))
        .await
        .unwrap();
    let _ = self_sid(&joined);
    c.send(&ClientMessage::Offer {
        sdp: "hello".into(),
        tracks: vec![],
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::InvalidSdp).await;
    // A 40 KiB message (over the socket's 8 KiB initial read buffer, under the
    // limit) arrives whole: it is answered as the bad SDP it is.
    c.send(&ClientMessage::Offer {
        sdp: format!("v=0\r\n{}", "a=x-filler\r\n".repeat(3500)),
        tracks: vec![],
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::InvalidSdp).await;
    c.send(&ClientMessage::Answer {
        sdp: "v=0\r\n".into(),
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::InvalidSdp).await;
    c.send_text(r#"{"type":"candidate","candidate":{"candidate":"not a candidate"}}"#.into())
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::InvalidCandidate).await;
    c.send(&join_msg(token("lobby", "mallory"))).await.unwrap();
    expect_error(&mut c, ErrorCode::AlreadyJoined).await;
    ping_pong(&mut c, 2.0).await;

    // Everyone else is still served.
    ping_pong(&mut other, 3.0).await;
    assert_eq!(s.sig.hub.stats().participants, 2);
}

#[tokio::test]
async fn flooding_is_rate_limited_with_an_error() {
    let s = stack().await;
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    for i in 0..150 {
        c.send(&ClientMessage::Ping { ts: i as f64 }).await.unwrap();
    }
    c.wait_for(T, |m| {
        matches!(
            m,
            ServerMessage::Error {
                code: ErrorCode::RateLimited,
                ..
            }
        )
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_dropped_socket_resumes_its_seat_and_a_second_join_replaces_it() {
    let s = stack().await;
    let (mut watcher, _) = SignalingClient::join(&s.ws, &token("r", "watcher"))
        .await
        .unwrap();
    let tok = token("r", "ana");
    let (a, ja) = SignalingClient::join(&s.ws, &tok).await.unwrap();
    let sid = self_sid(&ja);
    a.abort();

    // Resume within the grace period: same seat, no participant_left for others.
    let mut a2 = SignalingClient::connect(&s.ws).await.unwrap();
    a2.send(&ClientMessage::Join {
        token: tok.clone(),
        room: None,
        resume: true,
        protocol: Some(1),
    })
    .await
    .unwrap();
    let j = a2
        .wait_for(T, |m| matches!(m, ServerMessage::Joined { .. }))
        .await
        .unwrap();
    match &j {
        ServerMessage::Joined { resumed, me, .. } => {
            assert!(resumed);
            assert_eq!(me.sid, sid);
        }
        _ => unreachable!(),
    }

    // A fresh join (no resume) for the same identity replaces the seat.
    let (_a3, j3) = SignalingClient::join(&s.ws, &tok).await.unwrap();
    assert_ne!(self_sid(&j3), sid);
    a2.wait_for(
        T,
        |m| matches!(m, ServerMessage::Left { reason } if reason == "replaced"),
    )
    .await
    .unwrap();
    let left = watcher
        .wait_for(T, |m| matches!(m, ServerMessage::ParticipantLeft { .. }))
        .await
        .unwrap();
    assert!(
        matches!(left, ServerMessage::ParticipantLeft { reason, sid: s2, .. } if reason == "replaced" && s2 == sid)
    );
}

#[tokio::test]
async fn a_seat_is_freed_after_the_grace_period() {
    let s = stack_with(1, Duration::from_millis(300)).await;
    let (mut watcher, _) = SignalingClient::join(&s.ws, &token("r", "watcher"))
        .await
        .unwrap();
    let (a, _) = SignalingClient::join(&s.ws, &token("r", "ana"))
        .await
        .unwrap();
    a.abort();
    let left = watcher
        .wait_for(T, |m| matches!(m, ServerMessage::ParticipantLeft { .. }))
        .await
        .unwrap();
    assert!(
        matches!(left, ServerMessage::ParticipantLeft { reason, .. } if reason == "disconnected")
    );
}

#[tokio::test]
async fn nodes_must_authenticate_and_rooms_go_to_the_least_loaded_node() {
    let s = stack().await;
    // A node with the wrong secret never registers.
    let _intruder = start_node(&s.sig, "intruder", "wrong-secret-123").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        s.sig.hub.stats().nodes,
        1,
        "an unauthenticated node registered"
    );

    // Room r1 lands on node-a (the only one), then node-b arrives: r2 goes to node-b.
    let (_a, _) = SignalingClient::join(&s.ws, &token("r1", "a"))
        .await
        .unwrap();
    let _b_node = start_node(&s.sig, "node-b", NODE_SECRET).await;
    wait_nodes(&s.sig, 2).await;
    let (_b, _) = SignalingClient::join(&s.ws, &token("r2", "b"))
        .await
        .unwrap();
    let (_c, _) = SignalingClient::join(&s.ws, &token("r1", "c"))
        .await
        .unwrap();
    let placement = s.sig.hub.placements();
    assert_eq!(placement.get("r1").map(String::as_str), Some("node-a"));
    assert_eq!(placement.get("r2").map(String::as_str), Some("node-b"));
}

#[tokio::test]
async fn without_a_media_node_join_fails_clearly() {
    let s = stack_with(0, Duration::from_secs(15)).await;
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&join_msg(token("lobby", "x"))).await.unwrap();
    expect_error(&mut c, ErrorCode::NoMediaNode).await;
    expect_closed(&mut c).await;
}

/// A minimal HTTP/1.1 client for the admin API: (status, body).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(t) = token {
        req += &format!("Authorization: Bearer {t}\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

fn admin_token(room: &str) -> String {
    let grants = Grants {
        admin: true,
        ..Grants::default_participant()
    };
    mint(
        &participant_claims(
            "devkey",
            room,
            "ops",
            None,
            Duration::from_secs(600),
            grants,
        ),
        "devsecret",
    )
    .unwrap()
}

#[tokio::test]
async fn admins_can_turn_enhanced_audio_off_per_room() {
    let s = stack().await;
    let addr = s.sig.http_addr;
    let (mut a, _) = SignalingClient::join(&s.ws, &token("quiet", "ana"))
        .await
        .unwrap();

    // Allowed by default.
    a.send(&ClientMessage::Enhance { enabled: true })
        .await
        .unwrap();
    ping_pong(&mut a, 1.0).await;

    // Without a token, with a participant token, or an admin token for another room: no.
    assert_eq!(http(addr, "GET", "/admin/rooms", None, None).await.0, 401);
    assert_eq!(
        http(
            addr,
            "GET",
            "/admin/rooms",
            Some(&token("quiet", "x")),
            None
        )
        .await
        .0,
        403
    );
    let other = admin_token("elsewhere");
    let (st, _) = http(
        addr,
        "PATCH",
        "/admin/rooms/quiet",
        Some(&other),
        Some(r#"{"enhanced_audio":false}"#),
    )
    .await;
    assert_eq!(st, 403);

    // A room admin turns it off; asking again is forbidden.
    let admin = admin_token("quiet");
    let (st, body) = http(
        addr,
        "PATCH",
        "/admin/rooms/quiet",
        Some(&admin),
        Some(r#"{"enhanced_audio":false}"#),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(r#""enhanced_audio":false"#), "{body}");
    a.send(&ClientMessage::Enhance { enabled: true })
        .await
        .unwrap();
    expect_error(&mut a, ErrorCode::Forbidden).await;

    // The room shows up with its participant and setting; a "*" admin sees every room.
    let (st, body) = http(addr, "GET", "/admin/rooms/quiet", Some(&admin), None).await;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["participants"][0]["identity"], "ana");
    assert_eq!(v["settings"]["enhanced_audio"], false);
    let (st, body) = http(addr, "GET", "/admin/rooms", Some(&admin_token("*")), None).await;
    assert_eq!(st, 200);
    assert!(body.contains(r#""room":"quiet""#), "{body}");
    let (st, _) = http(
        addr,
        "PATCH",
        "/admin/rooms/quiet",
        Some(&admin),
        Some("not json"),
    )
    .await;
    assert_eq!(st, 400);

    // A wildcard admin token cannot be used to join.
    let mut c = SignalingClient::connect(&s.ws).await.unwrap();
    c.send(&join_msg(admin_token("*"))).await.unwrap();
    expect_error(&mut c, ErrorCode::Forbidden).await;
}

/// Signaling alone (no node) keeping its chat and room settings in `data_dir`.
async fn signaling_on(data_dir: &std::path::Path) -> Signaling {
    start_signaling(Duration::from_secs(15), Some(data_dir.join("chat.sqlite3"))).await
}

#[tokio::test]
async fn room_settings_survive_a_signaling_restart_on_the_same_data_dir() {
    let dir = std::env::temp_dir().join(format!(
        "chorus-settings-restart-{}-{}",
        std::process::id(),
        now()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let admin = admin_token("*");

    let first = signaling_on(&dir).await;
    let (st, body) = http(
        first.http_addr,
        "PATCH",
        "/admin/rooms/quiet",
        Some(&admin),
        Some(r#"{"enhanced_audio":false}"#),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // A room set and then put back to the default is forgotten.
    for body in [r#"{"enhanced_audio":true}"#, r#"{"enhanced_audio":null}"#] {
        let (st, body) = http(
            first.http_addr,
            "PATCH",
            "/admin/rooms/fickle",
            Some(&admin),
            Some(body),
        )
        .await;
        assert_eq!(st, 200, "{body}");
    }
    first.shutdown();
    drop(first);

    let s = signaling_on(&dir).await;
    let addr = s.http_addr;
    let (st, body) = http(addr, "GET", "/admin/rooms", Some(&admin), None).await;
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rooms = v["rooms"].as_array().unwrap();
    assert_eq!(rooms.len(), 1, "{body}");
    assert_eq!(rooms[0]["room"], "quiet");
    assert_eq!(rooms[0]["settings"]["enhanced_audio"], false);
    let (st, body) = http(addr, "GET", "/admin/rooms/quiet", Some(&admin), None).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(r#""enhanced_audio":false"#), "{body}");
    assert_eq!(
        http(addr, "GET", "/admin/rooms/fickle", Some(&admin), None)
            .await
            .0,
        404
    );

    // The restored setting is enforced: enhanced audio is refused in that room.
    let _node = start_node(&s, "node-a", NODE_SECRET).await;
    wait_nodes(&s, 1).await;
    let ws = format!("ws://{addr}/ws");
    let (mut a, _) = SignalingClient::join(&ws, &token("quiet", "ana"))
        .await
        .unwrap();
    a.send(&ClientMessage::Enhance { enabled: true })
        .await
        .unwrap();
    expect_error(&mut a, ErrorCode::Forbidden).await;
    let (mut b, _) = SignalingClient::join(&ws, &token("fickle", "bo"))
        .await
        .unwrap();
    b.send(&ClientMessage::Enhance { enabled: true })
        .await
        .unwrap();
    b.send(&ClientMessage::Ping { ts: 2.0 }).await.unwrap();
    loop {
        match b.recv_timeout(T).await.unwrap() {
            Incoming::Message(ServerMessage::Pong { .. }) => break,
            Incoming::Message(ServerMessage::Error { code, message }) => {
                panic!("enhance refused in a default room: {code:?} {message}")
            }
            Incoming::Message(_) => {}
            other => panic!("{other:?}"),
        }
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
