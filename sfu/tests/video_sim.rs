//! Video through the SFU worker core with real str0m peers over a simulated network and
//! clock: a publisher sends three-layer VP8 simulcast (real payload descriptors, real
//! keyframe bits, keyframes on request), subscribers receive one layer each. Checks
//! layer choice and switching, continuity on the wire, keyframe-request throttling,
//! NACK/RTX repair, audio-only subscribers, and the glare defect.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chorus_protocol::control::{FromNode, ToNode};
use chorus_protocol::track::{Quality, TrackDecl, TrackInfo, TrackSource};
use chorus_sfu::worker::{Worker, WorkerConfig};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionValues, RtpWrite, Vp8Descriptor};
use str0m::{Candidate, Event, Input, Output, Rtc};

const RIDS: [&str; 3] = ["q", "h", "f"];

/// A video packet as a subscriber's stack delivered it.
#[derive(Debug, Clone)]
struct Got {
    ssrc: u32,
    seq: u64,
    /// Which publisher layer it came from (the fake payload carries it).
    layer: u8,
    picture_id: u16,
    keyframe: bool,
}

struct Client {
    id: u64,
    addr: SocketAddr,
    rtc: Rtc,
    pending: Option<SdpPendingOffer>,
    connected: bool,
    mic: Option<Mid>,
    cam: Option<Mid>,
    /// Ignore the SFU's offers (to provoke glare) while set.
    hold_offers: bool,
    held: Vec<String>,
    video: Vec<Got>,
    audio: usize,
    /// Keyframe requests this client received, per rid.
    kf_requests: [u32; 3],
    /// Layers that owe a keyframe (asked for).
    kf_due: [bool; 3],
    seq: [u64; 3],
    pid: [u16; 3],
    /// Outgoing video datagrams to this client to drop, by wire sequence number.
    drop_wire: Vec<u16>,
    dropped: Vec<u16>,
    offers_seen: Vec<String>,
    joined_at: Instant,
    first_video_at: Option<Instant>,
    /// Drop every datagram from the SFU while now is in this range (an outage), and
    /// record the RTP ones: (ssrc, seq, when).
    blackhole: Option<(Instant, Instant)>,
    blackholed: Vec<(u32, u16, Instant)>,
}

fn vp8_payload(layer: u8, pid: u16, key: bool) -> Vec<u8> {
    // X=1, S=1, PID=0 | I,L,T,K present | 15-bit picture id | TL0PICIDX | TID/Y/KEYIDX |
    // VP8 payload header (P bit 0 for a keyframe) | a byte naming the layer.
    vec![
        0x90,
        0xf0,
        0x80 | (pid >> 8) as u8,
        pid as u8,
        pid as u8,
        0x20,
        if key { 0x00 } else { 0x01 },
        layer,
        0xaa,
    ]
}

impl Client {
    fn new(id: u64, now: Instant) -> Self {
        let addr: SocketAddr = format!("10.0.1.{id}:4000").parse().unwrap();
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .clear_extension_map()
            .set_extension(1, Extension::AudioLevel)
            .set_extension(4, Extension::RtpMid)
            .set_extension(10, Extension::RtpStreamId)
            .set_extension(11, Extension::RepairedRtpStreamId)
            .build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        Client {
            id,
            addr,
            rtc,
            pending: None,
            connected: false,
            mic: None,
            cam: None,
            hold_offers: false,
            held: Vec::new(),
            video: Vec::new(),
            audio: 0,
            kf_requests: [0; 3],
            kf_due: [true; 3],
            seq: [1000, 20000, 40000],
            pid: [100, 5000, 30000],
            drop_wire: Vec::new(),
            dropped: Vec::new(),
            offers_seen: Vec::new(),
            joined_at: now,
            first_video_at: None,
            blackhole: None,
            blackholed: Vec::new(),
        }
    }

    /// The first offer: a microphone, a data channel, and with `camera` a three-layer
    /// simulcast camera.
    fn offer(&mut self, camera: bool) -> (String, Vec<TrackDecl>) {
        let mut api = self.rtc.sdp_api();
        self.mic = Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
        if camera {
            let mut sim = Simulcast::new();
            for r in RIDS {
                sim.add_send_layer(SimulcastLayer::new(r));
            }
            self.cam =
                Some(api.add_media(MediaKind::Video, Direction::SendOnly, None, None, Some(sim)));
        }
        api.add_channel("chat".into());
        let (offer, pending) = api.apply().unwrap();
        self.pending = Some(pending);
        let decls = self
            .cam
            .map(|m| {
                vec![TrackDecl {
                    mid: m.to_string(),
                    source: TrackSource::Camera,
                }]
            })
            .unwrap_or_default();
        (offer.to_sdp_string(), decls)
    }

    /// One frame on every layer; keyframes where one is due.
    fn send_frame(&mut self, now: Instant, frame: u32) {
        let Some(cam) = self.cam else { return };
        let pt = self
            .rtc
            .codec_config()
            .iter()
            .find(|p| p.spec().codec == Codec::Vp8)
            .map(|p| p.pt())
            .unwrap();
        for l in 0..3u8 {
            let i = l as usize;
            let key = std::mem::take(&mut self.kf_due[i]);
            let mut api = self.rtc.direct_api();
            let Some(tx) = api.stream_tx_by_mid(cam, Some(Rid::from(RIDS[i]))) else {
                continue;
            };
            // Two packets per frame; the marker on the last.
            for k in 0..2 {
                let payload = vp8_payload(l, self.pid[i], key && k == 0);
                let mut p = payload;
                if k == 1 {
                    p[0] = 0x80; // not the start of the frame
                }
                tx.write_rtp(
                    RtpWrite::new(pt, self.seq[i].into(), frame * 3000, now, p)
                        .marker(k == 1)
                        .nackable(true),
                );
                self.seq[i] += 1;
            }
            self.pid[i] = (self.pid[i] + 1) % (1 << 15);
        }
    }
}

/// (ssrc, seq) of an RTP (not RTCP) datagram, read from its clear-text header.
fn rtp_header(d: &[u8]) -> Option<(u32, u16)> {
    if d.len() < 12 || d[0] >> 6 != 2 || (192..=223).contains(&d[1]) {
        return None;
    }
    Some((
        u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        u16::from_be_bytes([d[2], d[3]]),
    ))
}

struct Sim {
    now: Instant,
    start: Instant,
    worker: Worker,
    sfu_addr: SocketAddr,
    clients: Vec<Client>,
    tracks: Vec<(u64, Vec<TrackInfo>)>,
    qualities: Vec<(u64, String, Quality)>,
    /// Dynacast messages: (publisher, track, layers), with the sim time.
    publish_layers: Vec<(Duration, u64, String, Vec<Quality>)>,
}

impl Sim {
    fn new() -> Self {
        Self::with_config(WorkerConfig::default())
    }

    fn with_config(config: WorkerConfig) -> Self {
        let sfu_addr: SocketAddr = "10.0.1.100:7882".parse().unwrap();
        let now = Instant::now();
        Sim {
            now,
            start: now,
            worker: Worker::with_config(sfu_addr, vec![sfu_addr], config),
            sfu_addr,
            clients: Vec::new(),
            tracks: Vec::new(),
            qualities: Vec::new(),
            publish_layers: Vec::new(),
        }
    }

    fn join(&mut self, id: u64, camera: bool, video: bool) {
        self.worker.handle_command(
            self.now,
            ToNode::AddParticipant {
                participant: id,
                room: "room".into(),
                identity: format!("user{id}"),
                name: format!("User {id}"),
                publish: true,
                subscribe: true,
                video,
            },
        );
        let mut c = Client::new(id, self.now);
        let (sdp, tracks) = c.offer(camera);
        self.clients.push(c);
        self.worker.handle_command(
            self.now,
            ToNode::ClientOffer {
                participant: id,
                sdp,
                tracks,
            },
        );
        self.pump();
    }

    fn client(&mut self, id: u64) -> &mut Client {
        self.clients.iter_mut().find(|c| c.id == id).unwrap()
    }

    fn answer_offer(&mut self, participant: u64, sdp: &str) {
        let now = self.now;
        let c = self.client(participant);
        c.offers_seen.push(sdp.to_string());
        let answer = c
            .rtc
            .sdp_api()
            .accept_offer(SdpOffer::from_sdp_string(sdp).unwrap())
            .unwrap();
        let sdp = answer.to_sdp_string();
        self.worker
            .handle_command(now, ToNode::ClientAnswer { participant, sdp });
    }

    /// Polls client `i` until it only has a timeout left. str0m in RTP mode hands out
    /// one received packet per poll, so every datagram delivered must be followed by
    /// a poll.
    fn poll_client(&mut self, i: usize) -> bool {
        let now = self.now;
        let mut moved = false;
        loop {
            let c = &mut self.clients[i];
            match c.rtc.poll_output().unwrap() {
                Output::Transmit(t) => {
                    let (src, data) = (c.addr, t.contents.to_vec());
                    self.worker.handle_datagram(now, src, &data);
                    moved = true;
                }
                Output::Event(Event::Connected) => c.connected = true,
                Output::Event(Event::RtpPacket(p)) => {
                    if p.payload.len() == 9 {
                        c.first_video_at.get_or_insert(now);
                        let d = Vp8Descriptor::parse(&p.payload).unwrap();
                        c.video.push(Got {
                            ssrc: *p.header.ssrc,
                            seq: *p.seq_no,
                            layer: p.payload[7],
                            picture_id: d.picture_id().unwrap(),
                            keyframe: d.starts_keyframe(&p.payload),
                        });
                    } else {
                        c.audio += 1;
                    }
                }
                Output::Event(Event::KeyframeRequest(r)) => {
                    if let Some(i) = r.rid.and_then(|rid| RIDS.iter().position(|x| **x == *rid)) {
                        c.kf_requests[i] += 1;
                        c.kf_due[i] = true;
                    }
                }
                Output::Event(_) => {}
                Output::Timeout(_) => return moved,
            }
        }
    }

    fn pump(&mut self) {
        for _ in 0..50 {
            let mut moved = false;
            let now = self.now;
            for i in 0..self.clients.len() {
                moved |= self.poll_client(i);
            }
            let transmits: Vec<_> = self.worker.take_transmits().collect();
            for t in transmits {
                moved = true;
                let sfu = self.sfu_addr;
                let Some(i) = self.clients.iter().position(|c| c.addr == t.destination) else {
                    continue;
                };
                let c = &mut self.clients[i];
                if c.blackhole.is_some_and(|(a, b)| now >= a && now < b) {
                    if let Some((ssrc, seq)) = rtp_header(&t.contents) {
                        c.blackholed.push((ssrc, seq, now));
                    }
                    continue;
                }
                if let Some((_, seq)) = rtp_header(&t.contents) {
                    if let Some(k) = c.drop_wire.iter().position(|s| *s == seq) {
                        c.drop_wire.remove(k);
                        c.dropped.push(seq);
                        continue;
                    }
                }
                let input = Input::Receive(
                    now,
                    Receive {
                        proto: Protocol::Udp,
                        source: sfu,
                        destination: c.addr,
                        contents: t.contents.as_slice().try_into().unwrap(),
                    },
                );
                c.rtc.handle_input(input).unwrap();
                self.poll_client(i);
            }
            let events: Vec<_> = self.worker.take_events().collect();
            for ev in events {
                moved = true;
                match ev {
                    FromNode::Answer { participant, sdp } => {
                        let c = self.client(participant);
                        if let Some(pending) = c.pending.take() {
                            c.rtc
                                .sdp_api()
                                .accept_answer(pending, SdpAnswer::from_sdp_string(&sdp).unwrap())
                                .unwrap();
                        }
                    }
                    FromNode::Offer { participant, sdp } => {
                        if self.client(participant).hold_offers {
                            self.client(participant).held.push(sdp);
                        } else {
                            self.answer_offer(participant, &sdp);
                        }
                    }
                    FromNode::Tracks {
                        participant,
                        tracks,
                    } => self.tracks.push((participant, tracks)),
                    FromNode::TrackQuality {
                        participant,
                        track,
                        quality,
                        ..
                    } => self.qualities.push((participant, track, quality)),
                    FromNode::PublishLayers {
                        participant,
                        track,
                        layers,
                    } => self.publish_layers.push((
                        self.now - self.start,
                        participant,
                        track,
                        layers,
                    )),
                    FromNode::Error { message, .. } => panic!("unexpected error event: {message}"),
                    _ => {}
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Advances time in 1 ms steps; camera frames every 33 ms, audio every 20 ms.
    fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.now += Duration::from_millis(1);
            let now = self.now;
            let t = now.saturating_duration_since(self.start).as_millis() as u64;
            for c in &mut self.clients {
                c.rtc.handle_input(Input::Timeout(now)).unwrap();
                if !c.connected {
                    continue;
                }
                if t.is_multiple_of(33) {
                    c.send_frame(now, (t / 33) as u32);
                }
                if t.is_multiple_of(20) {
                    if let Some(mic) = c.mic {
                        let pt = c
                            .rtc
                            .codec_config()
                            .iter()
                            .find(|p| p.spec().codec == Codec::Opus)
                            .map(|p| p.pt())
                            .unwrap();
                        let seq = (t / 20) + 1;
                        if let Some(tx) = c.rtc.direct_api().stream_tx_by_mid(mic, None) {
                            tx.write_rtp(
                                RtpWrite::new(
                                    pt,
                                    seq.into(),
                                    (t / 20) as u32 * 960,
                                    now,
                                    vec![0xfc, 0xff, 0xfe],
                                )
                                .ext_vals(ExtensionValues {
                                    audio_level: Some(-30),
                                    ..Default::default()
                                }),
                            );
                        }
                    }
                }
            }
            if self.worker.next_deadline(now) <= now {
                self.worker.handle_timeout(now);
            }
            self.pump();
        }
    }

    fn camera_sid(&self, publisher: u64) -> String {
        self.tracks
            .iter()
            .rev()
            .find(|(p, _)| *p == publisher)
            .and_then(|(_, ts)| ts.iter().find(|t| t.source == TrackSource::Camera))
            .map(|t| t.sid.clone())
            .expect("the publisher's camera is listed")
    }
}

/// Sequence numbers +1 and picture ids +1 per frame across everything received.
fn assert_continuous(got: &[Got]) {
    assert!(!got.is_empty());
    for w in got.windows(2) {
        assert_eq!(w[1].ssrc, w[0].ssrc, "one SSRC per down track");
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "sequence gap: {:?} -> {:?}",
            w[0],
            w[1]
        );
        let d = (w[1].picture_id + (1 << 15) - w[0].picture_id) % (1 << 15);
        assert!(d <= 1, "picture id jumped: {:?} -> {:?}", w[0], w[1]);
        if w[1].layer != w[0].layer {
            assert!(w[1].keyframe, "layer switch without a keyframe: {:?}", w[1]);
        }
    }
}

#[test]
fn simulcast_camera_reaches_subscribers_on_the_top_layer_and_switches_with_the_cap() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    sim.join(2, false, true);
    // The allocator starts from its start estimate and the nominal layer rates
    // (medium fits, high does not); once the layers are measured (this sim's are tiny)
    // the top layer fits, and is taken after the allocator's 3 s up hold.
    sim.run(5000);
    assert!(sim.client(1).connected && sim.client(2).connected);
    let cam = sim.camera_sid(1);
    let info = sim
        .tracks
        .iter()
        .rev()
        .find(|(p, _)| *p == 1)
        .unwrap()
        .1
        .clone();
    let t = info.iter().find(|t| t.sid == cam).unwrap();
    assert_eq!(t.layers, vec![Quality::Low, Quality::Medium, Quality::High]);
    assert_eq!(t.codec, "vp8");

    let got = sim.client(2).video.clone();
    assert!(got.len() > 40, "subscriber got {} video packets", got.len());
    assert!(got[0].keyframe, "starts at a keyframe");
    let last = got.last().unwrap();
    assert_eq!(last.layer, 2, "default cap is the top layer");
    assert_continuous(&got);
    assert!(sim
        .qualities
        .iter()
        .any(|(p, s, q)| *p == 2 && *s == cam && *q == Quality::High));

    // Cap to low: after low's next keyframe the subscriber gets low, and back up.
    let before = got.len();
    let now = sim.now;
    sim.worker.handle_command(
        now,
        ToNode::SetSubscription {
            participant: 2,
            track: cam.clone(),
            max_quality: Some(Quality::Low),
            visible: None,
            width: None,
            height: None,
        },
    );
    sim.run(600);
    let got = sim.client(2).video.clone();
    assert_eq!(got.last().unwrap().layer, 0, "capped to low");
    // High flows until low's keyframe, then only low: never a mix.
    let first_low = got[before..].iter().position(|g| g.layer == 0).unwrap() + before;
    assert!(got[first_low].keyframe);
    assert!(got[first_low..].iter().all(|g| g.layer == 0));
    assert_continuous(&got);
    assert_eq!(sim.qualities.last().map(|(_, _, q)| *q), Some(Quality::Low));
    let now = sim.now;
    sim.worker.handle_command(
        now,
        ToNode::SetSubscription {
            participant: 2,
            track: cam.clone(),
            max_quality: Some(Quality::High),
            visible: None,
            width: None,
            height: None,
        },
    );
    sim.run(600);
    let got = sim.client(2).video.clone();
    assert_eq!(got.last().unwrap().layer, 2, "back on the top layer");
    assert_continuous(&got);

    // Off: nothing more arrives, and `off` is reported.
    let now = sim.now;
    sim.worker.handle_command(
        now,
        ToNode::SetSubscription {
            participant: 2,
            track: cam.clone(),
            max_quality: Some(Quality::Off),
            visible: None,
            width: None,
            height: None,
        },
    );
    sim.run(50);
    let n = sim.client(2).video.len();
    sim.run(500);
    assert_eq!(sim.client(2).video.len(), n);
    assert_eq!(sim.qualities.last().map(|(_, _, q)| *q), Some(Quality::Off));
}

#[test]
fn keyframe_requests_are_throttled_per_layer_however_many_subscribers_ask() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    for id in 2..22 {
        sim.join(id, false, true);
    }
    sim.run(1200);
    let base = sim.client(1).kf_requests;
    // Every subscriber switches down and up twice within 2 s.
    let cam = sim.camera_sid(1);
    for round in 0..4 {
        let q = if round % 2 == 0 {
            Quality::Low
        } else {
            Quality::High
        };
        let now = sim.now;
        for id in 2..22 {
            sim.worker.handle_command(
                now,
                ToNode::SetSubscription {
                    participant: id,
                    track: cam.clone(),
                    max_quality: Some(q),
                    visible: None,
                    width: None,
                    height: None,
                },
            );
        }
        sim.run(500);
    }
    let after = sim.client(1).kf_requests;
    for l in 0..3 {
        let n = after[l] - base[l];
        // One request per 500 ms at most, however many of the 20 subscribers asked:
        // 2 s of switching → at most 5 per layer.
        assert!(n <= 5, "layer {l}: {n} keyframe requests in 2 s");
    }
    assert!(after[0] > base[0], "low was asked for");
    for id in 2..22 {
        let got = sim.client(id).video.clone();
        assert_eq!(got.last().unwrap().layer, 2, "subscriber {id} back on high");
        assert_continuous(&got);
    }
}

#[test]
fn lost_video_is_repaired_from_the_sfus_send_buffer() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    sim.join(2, false, true);
    sim.run(1000);
    let got = sim.client(2).video.clone();
    let next = got.last().unwrap().seq as u16;
    // Drop five of the next packets to subscriber 2 once each on the wire.
    sim.client(2).drop_wire = (1..=5).map(|k| next.wrapping_add(k * 3)).collect();
    sim.run(1500);
    assert_eq!(sim.client(2).dropped.len(), 5, "the drops happened");
    let mut seqs: Vec<u64> = sim.client(2).video.iter().map(|g| g.seq).collect();
    seqs.sort();
    seqs.dedup();
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "packet {} never arrived (no RTX?)",
            w[0] + 1
        );
    }
}

#[test]
fn audio_only_subscribers_are_never_offered_video_and_still_hear() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    sim.join(2, false, false);
    sim.run(1500);
    let c = sim.client(2);
    assert!(c.connected);
    assert!(c.video.is_empty());
    assert!(
        c.audio > 40,
        "audio-only subscriber heard {} packets",
        c.audio
    );
    assert!(c.offers_seen.iter().all(|o| !o.contains("m=video")));
    // A video subscriber in the same room does get it.
    sim.join(3, false, true);
    sim.run(1000);
    assert!(!sim.client(3).video.is_empty());
}

#[test]
fn a_client_offer_during_our_offer_does_not_lose_the_tracks_we_offered() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    sim.run(300);
    // Subscriber 2 holds back the SFU's offer of 1's tracks and offers itself (glare).
    let now = sim.now;
    sim.worker.handle_command(
        now,
        ToNode::AddParticipant {
            participant: 2,
            room: "room".into(),
            identity: "user2".into(),
            name: "User 2".into(),
            publish: true,
            subscribe: true,
            video: true,
        },
    );
    let mut c = Client::new(2, now);
    c.hold_offers = true;
    let (sdp, tracks) = c.offer(false);
    sim.clients.push(c);
    sim.worker.handle_command(
        now,
        ToNode::ClientOffer {
            participant: 2,
            sdp,
            tracks,
        },
    );
    sim.run(300);
    assert_eq!(sim.client(2).held.len(), 1, "the SFU offered 1's tracks");
    // The client renegotiates on its own before answering (a new m-section).
    let offer = {
        let c = sim.client(2);
        let mut api = c.rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        c.pending = Some(pending);
        offer.to_sdp_string()
    };
    sim.client(2).hold_offers = false;
    let now = sim.now;
    sim.worker.handle_command(
        now,
        ToNode::ClientOffer {
            participant: 2,
            sdp: offer,
            tracks: Vec::new(),
        },
    );
    sim.run(1000);
    let c = sim.client(2);
    assert!(
        c.offers_seen.iter().any(|o| o.contains("m=video")),
        "the abandoned offer's tracks were offered again"
    );
    assert!(
        c.audio > 20,
        "subscriber hears the publisher ({} packets)",
        c.audio
    );
    assert!(!c.video.is_empty(), "and sees it");
}

#[test]
fn a_subscriber_arriving_just_after_another_starts_at_once_on_a_lower_layer() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    sim.run(1500);
    // Subscriber 3's arrival makes the SFU ask for a top-layer keyframe; subscriber 4
    // arrives 150 ms later, inside the 500 ms throttle of that request.
    sim.join(3, false, true);
    sim.run(150);
    sim.join(4, false, true);
    sim.run(1500);
    let first = |sim: &mut Sim, id: u64| {
        let c = sim.client(id);
        c.first_video_at.expect("video arrived") - c.joined_at
    };
    let (t3, t4) = (first(&mut sim, 3), first(&mut sim, 4));
    assert!(
        t4 < Duration::from_millis(300),
        "subscriber 4 waited {t4:?} (3 waited {t3:?})"
    );
    let got = sim.client(4).video.clone();
    assert!(
        got[0].layer < 2,
        "4 started below the throttled top layer: {:?}",
        got[0]
    );
    assert_eq!(got.last().unwrap().layer, 2, "and moved up to it");
    assert_continuous(&got);
}

#[test]
fn nacks_are_answered_from_the_send_buffer_but_not_past_its_age() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    sim.join(2, false, true);
    // The allocator starts from its start estimate and the nominal layer rates
    // (medium fits, high does not); once the layers are measured (this sim's are tiny)
    // the top layer fits, and is taken after the allocator's 3 s up hold.
    sim.run(5000);
    let main_ssrc = sim.client(2).video.last().unwrap().ssrc;
    // 1.3 s in which nothing from the SFU reaches subscriber 2. When packets flow again
    // it NACKs the whole gap: what was sent in the last second is still in the SFU's
    // send buffer (1 s, 1000 packets), what was sent before is not.
    let start = sim.now;
    sim.client(2).blackhole = Some((start, start + Duration::from_millis(1300)));
    sim.run(2500);
    let c = sim.client(2);
    let got: std::collections::HashSet<u16> = c.video.iter().map(|g| g.seq as u16).collect();
    let lost: Vec<(u16, Duration)> = c
        .blackholed
        .iter()
        .filter(|(ssrc, _, _)| *ssrc == main_ssrc)
        .map(|(_, seq, t)| (*seq, *t - start))
        .collect();
    assert!(lost.len() > 50, "the outage dropped video: {}", lost.len());
    let early: Vec<_> = lost
        .iter()
        .filter(|(_, t)| *t < Duration::from_millis(200))
        .collect();
    let late: Vec<_> = lost
        .iter()
        .filter(|(_, t)| *t > Duration::from_millis(900))
        .collect();
    let early_back = early.iter().filter(|(s, _)| got.contains(s)).count();
    let late_back = late.iter().filter(|(s, _)| got.contains(s)).count();
    assert!(!early.is_empty() && !late.is_empty());
    assert_eq!(
        early_back,
        0,
        "packets older than the send buffer were resent: {early_back} of {}",
        early.len()
    );
    assert!(
        late_back * 2 >= late.len(),
        "recent losses were resent: {late_back} of {}",
        late.len()
    );
}

impl Sim {
    fn subscribe(
        &mut self,
        id: u64,
        track: &str,
        q: Option<Quality>,
        visible: Option<bool>,
        size: Option<(u32, u32)>,
    ) {
        let now = self.now;
        self.worker.handle_command(
            now,
            ToNode::SetSubscription {
                participant: id,
                track: track.into(),
                max_quality: q,
                visible,
                width: size.map(|s| s.0),
                height: size.map(|s| s.1),
            },
        );
    }
}

#[test]
fn dynacast_stops_layers_nobody_takes_and_asks_for_them_again() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    sim.join(2, false, true);
    sim.run(5000);
    let cam = sim.camera_sid(1);
    // Medium carried the first seconds (the allocator's start) and then nobody took it:
    // switched off 5 s later; high and low stay.
    assert!(
        sim.publish_layers
            .iter()
            .all(|(_, _, _, l)| l.contains(&Quality::High) && l.contains(&Quality::Low)),
        "{:?}",
        sim.publish_layers
    );
    // The only subscriber caps the camera at low: high is switched off at the publisher
    // once nobody took it for the hold (5 s), not before.
    sim.subscribe(2, &cam, Some(Quality::Low), None, None);
    let capped = sim.now - sim.start;
    sim.run(4000);
    assert!(
        sim.publish_layers
            .iter()
            .all(|(_, _, _, l)| l.contains(&Quality::High)),
        "too early: {:?}",
        sim.publish_layers
    );
    sim.run(2000);
    let (at, p, t, layers) = sim
        .publish_layers
        .last()
        .cloned()
        .expect("a dynacast message");
    assert_eq!(
        (p, t.as_str(), layers.as_slice()),
        (1, cam.as_str(), &[Quality::Low][..])
    );
    assert!(
        at - capped >= Duration::from_secs(5) && at - capped <= Duration::from_secs(6),
        "after {:?}",
        at - capped
    );
    // Lifting the cap asks for the top layer again at once.
    sim.subscribe(2, &cam, Some(Quality::High), None, None);
    let lifted = sim.now - sim.start;
    sim.run(700);
    let (at, _, _, layers) = sim.publish_layers.last().cloned().unwrap();
    assert!(layers.contains(&Quality::High), "{layers:?}");
    assert!(
        at - lifted <= Duration::from_millis(600),
        "took {:?}",
        at - lifted
    );
    // The publisher never stopped sending here (the sim ignores the message), so the
    // subscriber is back on the top layer.
    sim.run(1000);
    assert_eq!(sim.client(2).video.last().unwrap().layer, 2);
}

#[test]
fn dynacast_keeps_the_layers_a_bandwidth_limited_subscriber_asked_for() {
    // The subscriber asks for high, but its downlink (the estimate pinned at 20 kbit/s,
    // estimation off; this sim's layers cost ~34 kbit/s each) carries none of them after
    // the 4 s startup floor, so the track is paused for bandwidth: the publisher must keep encoding
    // every layer, so that room on the link finds them live instead of waiting on a
    // restart (docs/protocol.md "Dynacast").
    let mut sim = Sim::with_config(WorkerConfig {
        initial_estimate_bps: 20_000,
        bandwidth_estimation: false,
        ..WorkerConfig::default()
    });
    sim.join(1, true, true);
    sim.join(2, false, true);
    sim.run(12_000);
    assert!(
        sim.publish_layers
            .iter()
            .all(|(_, _, _, l)| l.contains(&Quality::High) && l.contains(&Quality::Medium)),
        "a layer the subscriber asked for was switched off: {:?}",
        sim.publish_layers
    );
    let got = &sim.client(2).video;
    assert!(
        !got.is_empty(),
        "the startup floor forwards the lowest layer"
    );
    let last = got.last().map(|g| g.seq);
    sim.run(1000);
    assert_eq!(
        sim.client(2).video.last().map(|g| g.seq),
        last,
        "paused for bandwidth after the startup floor"
    );
}

#[test]
fn a_hidden_tile_gets_nothing_and_a_small_one_gets_a_low_layer() {
    let mut sim = Sim::new();
    sim.join(1, true, true);
    sim.join(2, false, true);
    sim.run(5000);
    let cam = sim.camera_sid(1);
    assert_eq!(sim.client(2).video.last().unwrap().layer, 2);
    sim.subscribe(2, &cam, None, Some(false), None);
    sim.run(100);
    let n = sim.client(2).video.len();
    sim.run(1000);
    assert_eq!(sim.client(2).video.len(), n, "hidden: nothing is forwarded");
    // Shown again in a 320x180 tile: the low layer covers it.
    sim.subscribe(2, &cam, None, Some(true), Some((320, 180)));
    sim.run(1500);
    let got = sim.client(2).video.clone();
    assert!(got.len() > n, "shown: video flows again");
    assert_eq!(
        got.last().unwrap().layer,
        0,
        "a small tile gets the low layer"
    );
    assert_continuous(&got);
    // A big tile: the top layer (applied at once, no up hold: the user asked).
    sim.subscribe(2, &cam, None, None, Some((1280, 720)));
    sim.run(1000);
    assert_eq!(sim.client(2).video.last().unwrap().layer, 2);
}
