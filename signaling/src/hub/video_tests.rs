//! Hub tests for protocol 2: track grants on offers, track lists from the node,
//! subscriptions, and the protocol version a seat is taken with.

use std::collections::HashMap;

use chorus_protocol::track::{
    QualityReason, SourceSet, TrackDecl, TrackInfo, TrackKind, TrackSource,
};
use chorus_protocol::{PROTOCOL_AUDIO_ONLY, PROTOCOL_VERSION};

use super::*;
use crate::session::{Outbound, SESSION_QUEUE};
use crate::state::history::MemoryStore;
use crate::state::memory::MemoryState;
use chorus_protocol::client::ParticipantInfo;

struct Fixture {
    hub: Arc<Hub>,
    node_rx: mpsc::UnboundedReceiver<ToNode>,
    sessions: HashMap<u64, mpsc::Receiver<Outbound>>,
    next_conn: u64,
}

fn claims(identity: &str, grants: Grants) -> Claims {
    Claims {
        iss: "k".into(),
        sub: identity.into(),
        name: None,
        room: "room".into(),
        exp: u64::MAX,
        nbf: None,
        grants,
    }
}

async fn fixture() -> Fixture {
    let hub = Hub::start(
        HubConfig {
            reconnect_grace: Duration::from_secs(15),
            ice_servers: vec![],
            turn: None,
            chat: ChatConfig::default(),
            allow_enhanced_audio: true,
        },
        Arc::new(MemoryState::new(Arc::new(MemoryStore::new(100)))),
    )
    .await
    .unwrap();
    let (tx, node_rx) = mpsc::unbounded_channel();
    hub.register_node("n", tx).unwrap();
    Fixture {
        hub,
        node_rx,
        sessions: HashMap::new(),
        next_conn: 1,
    }
}

impl Fixture {
    /// Joins and returns (participant, conn); `joined` is left in the session queue.
    async fn join_with(
        &mut self,
        identity: &str,
        grants: Grants,
        resume: bool,
        version: u32,
    ) -> (u64, u64) {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let conn = self.next_conn;
        self.next_conn += 1;
        let j = self
            .hub
            .join(&claims(identity, grants), resume, version, conn, tx)
            .await
            .unwrap();
        self.sessions.insert(j.participant, rx);
        (j.participant, conn)
    }

    async fn join(&mut self, identity: &str, grants: Grants) -> (u64, u64) {
        self.join_with(identity, grants, false, PROTOCOL_VERSION)
            .await
    }

    fn node_got(&mut self) -> Vec<ToNode> {
        std::iter::from_fn(|| self.node_rx.try_recv().ok()).collect()
    }

    fn received(&mut self, p: u64) -> Vec<ServerMessage> {
        let rx = self.sessions.get_mut(&p).unwrap();
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|o| match o {
                Outbound::Text(t) => Some(serde_json::from_str(t.as_str()).unwrap()),
                Outbound::Close(..) => None,
            })
            .collect()
    }

    async fn publish(&self, p: u64, tracks: Vec<TrackInfo>) {
        self.hub
            .node_event(
                "n",
                FromNode::Tracks {
                    participant: p,
                    tracks,
                },
            )
            .await;
    }
}

fn track(sid: &str, source: TrackSource) -> TrackInfo {
    TrackInfo {
        sid: sid.into(),
        kind: source.kind(),
        source,
        muted: false,
        codec: String::new(),
        layers: vec![],
    }
}

fn offer(participant: u64, sdp: &str, tracks: Vec<TrackDecl>) -> ToNode {
    ToNode::ClientOffer {
        participant,
        sdp: sdp.into(),
        tracks,
    }
}

/// A Chromium offer with a microphone and a simulcast camera (trimmed to what is read).
const MIC_AND_CAMERA: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
    a=group:BUNDLE 0 1 2\r\n\
    m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n\
    a=rtpmap:111 opus/48000/2\r\n\
    m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sendonly\r\n\
    a=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
    a=rid:q send\r\na=rid:h send\r\na=rid:f send\r\na=simulcast:send q;h;f\r\n\
    m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n\
    a=sctp-port:5000\r\n";

#[tokio::test]
async fn a_microphone_only_token_may_not_publish_a_camera_and_nothing_reaches_the_node() {
    let mut f = fixture().await;
    let mic_only = Grants {
        can_publish_sources: Some([TrackSource::Microphone].into_iter().collect::<SourceSet>()),
        ..Grants::default_participant()
    };
    let (a, conn) = f.join("ana", mic_only).await;
    f.node_got();
    let e = f
        .hub
        .to_node(a, conn, offer(a, MIC_AND_CAMERA, vec![]))
        .unwrap_err();
    assert_eq!(
        e,
        (
            ErrorCode::Forbidden,
            "this token may not publish camera".to_string()
        )
    );
    // Declaring the camera as a screen does not help.
    let e = f
        .hub
        .to_node(
            a,
            conn,
            offer(
                a,
                MIC_AND_CAMERA,
                vec![TrackDecl {
                    mid: "1".into(),
                    source: TrackSource::Screen,
                }],
            ),
        )
        .unwrap_err();
    assert_eq!(e.1, "this token may not publish screen");
    assert!(f.node_got().is_empty(), "a refused offer is not forwarded");

    // A full token's offer goes through with every track's source resolved.
    let (b, conn) = f.join("bo", Grants::default_participant()).await;
    f.node_got();
    f.hub
        .to_node(b, conn, offer(b, MIC_AND_CAMERA, vec![]))
        .unwrap();
    assert_eq!(
        f.node_got(),
        [offer(
            b,
            MIC_AND_CAMERA,
            vec![
                TrackDecl {
                    mid: "0".into(),
                    source: TrackSource::Microphone
                },
                TrackDecl {
                    mid: "1".into(),
                    source: TrackSource::Camera
                },
            ]
        )]
    );
}

#[tokio::test]
async fn a_bad_declaration_is_a_bad_request_and_not_forwarded() {
    let mut f = fixture().await;
    let (a, conn) = f.join("ana", Grants::default_participant()).await;
    f.node_got();
    let e = f
        .hub
        .to_node(
            a,
            conn,
            offer(
                a,
                MIC_AND_CAMERA,
                vec![TrackDecl {
                    mid: "1".into(),
                    source: TrackSource::Microphone,
                }],
            ),
        )
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::BadRequest, "{e:?}");
    assert!(f.node_got().is_empty());
}

#[tokio::test]
async fn the_protocol_version_decides_video_and_is_echoed() {
    let mut f = fixture().await;
    let (old, _) = f
        .join_with(
            "old",
            Grants::default_participant(),
            false,
            PROTOCOL_AUDIO_ONLY,
        )
        .await;
    let (new, _) = f
        .join_with(
            "new",
            Grants::default_participant(),
            false,
            PROTOCOL_VERSION,
        )
        .await;
    let video: Vec<(u64, bool)> = f
        .node_got()
        .into_iter()
        .filter_map(|m| match m {
            ToNode::AddParticipant {
                participant, video, ..
            } => Some((participant, video)),
            _ => None,
        })
        .collect();
    assert_eq!(video, [(old, false), (new, true)]);
    for (p, v) in [(old, PROTOCOL_AUDIO_ONLY), (new, PROTOCOL_VERSION)] {
        match f.received(p).first() {
            Some(ServerMessage::Joined { protocol, .. }) => assert_eq!(*protocol, v),
            other => panic!("expected joined, got {other:?}"),
        }
    }
}

// `disconnected` starts the grace timer, a tokio task.
#[tokio::test]
async fn tracks_from_the_node_reach_everyone_and_survive_a_resume() {
    let mut f = fixture().await;
    let (a, _) = f.join("ana", Grants::default_participant()).await;
    let (b, _) = f.join("bo", Grants::default_participant()).await;
    f.received(a);
    f.received(b);
    let list = vec![
        track(&format!("t{a}_1"), TrackSource::Microphone),
        track(&format!("t{a}_2"), TrackSource::Camera),
    ];
    f.publish(a, list.clone()).await;
    let updated: Vec<ParticipantInfo> = f
        .received(b)
        .into_iter()
        .filter_map(|m| match m {
            ServerMessage::ParticipantUpdated { participant } => Some(participant),
            _ => None,
        })
        .collect();
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0].sid, a.to_string());
    assert_eq!(updated[0].tracks, list);
    assert_eq!(f.received(a).len(), 1, "the publisher hears of it too");
    // The same list again changes nothing, so nothing is broadcast.
    f.publish(a, list.clone()).await;
    assert!(f.received(b).is_empty());
    // Events for a participant of another node are ignored.
    f.hub
        .node_event(
            "other",
            FromNode::Tracks {
                participant: a,
                tracks: vec![],
            },
        )
        .await;
    assert!(f.received(b).is_empty());

    // Mute shows on the microphone track at once.
    f.hub.set_muted(a, 1, true).await.unwrap();
    let muted = f.received(b).into_iter().find_map(|m| match m {
        ServerMessage::ParticipantUpdated { participant } => Some(participant),
        _ => None,
    });
    let tracks = muted.unwrap().tracks;
    assert!(tracks[0].muted && tracks[0].source == TrackSource::Microphone);
    assert!(!tracks[1].muted);

    // A late joiner sees the tracks in `joined`; so does the admin view.
    let (c, _) = f.join("cy", Grants::default_participant()).await;
    match f.received(c).first() {
        Some(ServerMessage::Joined { participants, .. }) => {
            let ana = participants
                .iter()
                .find(|p| p.sid == a.to_string())
                .unwrap();
            assert_eq!(ana.tracks.len(), 2);
        }
        other => panic!("expected joined, got {other:?}"),
    }
    let overview = f.hub.rooms_overview(Some("room")).await.unwrap();
    let ana = &overview[0].participants[0];
    assert_eq!(ana.info.tracks[1].kind, TrackKind::Video);

    // A resume (same protocol) keeps the seat and its tracks.
    f.hub.disconnected(b, 2);
    let (b2, _) = f
        .join_with("bo", Grants::default_participant(), true, PROTOCOL_VERSION)
        .await;
    assert_eq!(b2, b);
    match f.received(b).last() {
        Some(ServerMessage::Joined {
            resumed,
            participants,
            ..
        }) => {
            assert!(*resumed);
            let ana = participants
                .iter()
                .find(|p| p.sid == a.to_string())
                .unwrap();
            assert_eq!(ana.tracks.len(), 2);
        }
        other => panic!("expected joined, got {other:?}"),
    }
}

// `disconnected` starts the grace timer, a tokio task.
#[tokio::test]
async fn a_resume_with_another_protocol_takes_a_fresh_seat() {
    let mut f = fixture().await;
    let (a, conn) = f
        .join_with(
            "ana",
            Grants::default_participant(),
            false,
            PROTOCOL_AUDIO_ONLY,
        )
        .await;
    f.hub.disconnected(a, conn);
    f.node_got();
    let (a2, _) = f
        .join_with("ana", Grants::default_participant(), true, PROTOCOL_VERSION)
        .await;
    assert_ne!(a2, a);
    match f.received(a2).first() {
        Some(ServerMessage::Joined {
            resumed, protocol, ..
        }) => {
            assert!(!*resumed);
            assert_eq!(*protocol, PROTOCOL_VERSION);
        }
        other => panic!("expected joined, got {other:?}"),
    }
    let sent = f.node_got();
    assert!(sent.contains(&ToNode::RemoveParticipant { participant: a }));
    assert!(sent
        .iter()
        .any(|m| matches!(m, ToNode::AddParticipant { participant, video: true, .. } if *participant == a2)));
}

#[tokio::test]
async fn subscriptions_name_tracks_someone_else_publishes() {
    let mut f = fixture().await;
    let (a, a_conn) = f.join("ana", Grants::default_participant()).await;
    let (b, b_conn) = f.join("bo", Grants::default_participant()).await;
    let cam = format!("t{a}_2");
    f.publish(a, vec![track(&cam, TrackSource::Camera)]).await;
    f.publish(b, vec![track(&format!("t{b}_1"), TrackSource::Camera)])
        .await;
    f.node_got();

    let e = f
        .hub
        .update_subscription(b, b_conn, "t99_1".into(), cap(Quality::Low))
        .await
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::UnknownTrack);
    // One's own track is not a subscription.
    let e = f
        .hub
        .update_subscription(b, b_conn, format!("t{b}_1"), cap(Quality::Low))
        .await
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::UnknownTrack);
    assert!(f.node_got().is_empty());

    f.hub
        .update_subscription(b, b_conn, cam.clone(), cap(Quality::Low))
        .await
        .unwrap();
    assert_eq!(
        f.node_got(),
        [ToNode::SetSubscription {
            participant: b,
            track: cam.clone(),
            max_quality: Some(Quality::Low),
            visible: None,
            width: None,
            height: None,
        }]
    );
    // Adaptive stream: visibility and size pass through as given.
    f.hub
        .update_subscription(
            b,
            b_conn,
            cam.clone(),
            SubscriptionUpdate {
                visible: Some(false),
                width: Some(320),
                height: Some(180),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        f.node_got(),
        [ToNode::SetSubscription {
            participant: b,
            track: cam.clone(),
            max_quality: None,
            visible: Some(false),
            width: Some(320),
            height: Some(180),
        }]
    );
    // A track that was unpublished is unknown again.
    f.publish(a, vec![]).await;
    let e = f
        .hub
        .update_subscription(b, b_conn, cam.clone(), cap(Quality::High))
        .await
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::UnknownTrack);
    // A stale session may not subscribe for the seat.
    let e = f
        .hub
        .update_subscription(b, a_conn, cam, cap(Quality::High))
        .await
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::NotJoined);
}

#[tokio::test]
async fn track_quality_and_unknown_track_errors_go_to_that_participant_only() {
    let mut f = fixture().await;
    let (a, _) = f.join("ana", Grants::default_participant()).await;
    let (b, _) = f.join("bo", Grants::default_participant()).await;
    f.received(a);
    f.received(b);
    f.hub
        .node_event(
            "n",
            FromNode::TrackQuality {
                participant: b,
                track: format!("t{a}_2"),
                quality: Quality::Medium,
                reason: Some(QualityReason::Bandwidth),
            },
        )
        .await;
    f.hub
        .node_event(
            "n",
            FromNode::PublishLayers {
                participant: a,
                track: format!("t{a}_2"),
                layers: vec![Quality::Low],
            },
        )
        .await;
    f.hub
        .node_event(
            "n",
            FromNode::Error {
                participant: b,
                code: NodeErrorCode::UnknownTrack,
                message: "no such track".into(),
            },
        )
        .await;
    assert_eq!(
        f.received(b),
        [
            ServerMessage::TrackQuality {
                track_sid: format!("t{a}_2"),
                quality: Quality::Medium,
                reason: Some(QualityReason::Bandwidth),
            },
            ServerMessage::Error {
                code: ErrorCode::UnknownTrack,
                message: "no such track".into(),
            },
        ]
    );
    assert_eq!(
        f.received(a),
        [ServerMessage::PublishLayers {
            track_sid: format!("t{a}_2"),
            layers: vec![Quality::Low],
        }]
    );
}

fn cap(q: Quality) -> SubscriptionUpdate {
    SubscriptionUpdate {
        max_quality: Some(q),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_admin_room_view_shows_each_receivers_latest_downlink_report() {
    use chorus_protocol::track::{ReceiveStats, TrackReceive};
    let mut f = fixture().await;
    let (a, _) = f.join("ana", Grants::default_participant()).await;
    let (b, _) = f.join("bo", Grants::default_participant()).await;
    let stats = ReceiveStats {
        estimate_bps: 420_000,
        allocated_bps: 300_000,
        actual_bps: 350_000,
        probing: true,
        tracks: vec![TrackReceive {
            track: format!("t{a}_1"),
            quality: Quality::Low,
            allocated: Quality::Low,
            reason: Some(QualityReason::Bandwidth),
        }],
    };
    f.hub
        .node_event(
            "n",
            FromNode::ReceiveStats {
                participant: b,
                stats: stats.clone(),
            },
        )
        .await;
    // A report from a node the participant is not on is ignored.
    f.hub
        .node_event(
            "other",
            FromNode::ReceiveStats {
                participant: a,
                stats: stats.clone(),
            },
        )
        .await;
    let room = f.hub.rooms_overview(Some("room")).await.unwrap().remove(0);
    let by = |id: u64| {
        room.participants
            .iter()
            .find(|p| p.info.sid == id.to_string())
            .unwrap()
    };
    assert_eq!(by(b).receive, Some(stats));
    assert_eq!(by(a).receive, None);
    let json = serde_json::to_value(&room).unwrap();
    let bo = json["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["identity"] == "bo")
        .unwrap();
    assert_eq!(bo["receive"]["estimate_bps"], 420_000);
    assert_eq!(bo["receive"]["tracks"][0]["reason"], "bandwidth");
    assert!(json["participants"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["identity"] == "ana" && p.get("receive").is_none()));
}
