//! One simulated participant: joins through signaling with a real token, runs a real
//! WebRTC peer (str0m: ICE, DTLS-SRTP) on its own UDP socket, and either publishes
//! pre-encoded Opus at 50 packets/s or only listens. Subscribers count what arrives.
//!
//! In video scenarios every participant joins with protocol 2 and runs str0m in RTP
//! mode (the camera packetizes VP8 itself, see `video.rs`); a camera is published in
//! the first offer or, like pressing the camera button, by a second offer later.
//! Audio is the same packets either way; audio-only scenarios keep str0m's frame mode
//! and protocol 1, exactly as before video existed.
//!
//! One-way delay: each publisher appends a 12-byte stamp (`CLG\x01`, publisher index,
//! frame counter) to every Opus payload and writes the send time into a shared table
//! slot for that counter; a subscriber reads the stamp and looks the send time up.
//! Everything runs in one process, so both ends read the same clock. The stamped
//! payload is no longer valid Opus, which the SFU does not look at (enhanced audio is
//! off) and nobody here decodes.
//!
//! The media side ([`Pc`], [`Sender`], [`Receiver`]) is shared with the Janus peer
//! (`janus.rs`), so both servers get exactly the same packets and the same accounting.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chorus_native::SignalingClient;
use chorus_protocol::client::{ClientMessage, ServerMessage};
use chorus_protocol::track::{TrackDecl, TrackSource};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaData, MediaKind, MediaTime, Mid, Pt, Rid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionValues, RtpPacket, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

use crate::stats::Shared;
use crate::video::{self, VideoClip, VideoSender};
use crate::video_rx::{video_stamp, VideoPeerResult, VideoRx};

pub const STAMP_LEN: usize = 12;
const MAGIC: [u8; 4] = *b"CLG\x01";
/// Send-time slots per publisher (a ring indexed by frame counter).
pub const SLOTS: usize = 512;

/// Pre-encoded audio every publisher sends: (Opus payload, RFC 6464 level) per 20 ms.
pub struct Clip {
    pub frames: Vec<(Vec<u8>, u8)>,
}

/// When a publisher talks.
#[derive(Debug, Clone, Copy)]
pub enum Talk {
    Continuous,
    /// Talk for `on`, then silent (no packets) for `off`, repeatedly; each publisher
    /// starts at a different phase.
    Pattern {
        on: Duration,
        off: Duration,
    },
}

pub struct PeerSpec {
    pub index: usize,
    pub url: String,
    pub token: String,
    /// Publisher index into the send-time table when this peer talks.
    pub publisher: Option<u32>,
    pub talk: Talk,
    /// Set in video scenarios (protocol 2, RTP mode).
    pub video: Option<VideoSpec>,
    /// Becomes true when the run is over: leave.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

pub struct VideoSpec {
    /// Camera index when this participant publishes one.
    pub camera: Option<u32>,
    /// Publish the camera by a second offer this long after media connected; `None`:
    /// in the first offer.
    pub camera_after: Option<Duration>,
    pub clip: Arc<VideoClip>,
    /// `max_quality` to set on every video track this participant receives.
    pub cap: Option<chorus_protocol::track::Quality>,
}

/// A UDP socket on `ip` with a receive buffer big enough for bursts (a listener of
/// a busy room gets several streams' packets at once).
fn bind_socket(ip: IpAddr) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(1 << 20);
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::new(ip, 0).into())?;
    Ok(UdpSocket::from_std(s.into())?)
}

/// What one participant saw, returned when it ends.
#[derive(Debug, Default)]
pub struct PeerResult {
    pub identity: String,
    pub room: String,
    pub publisher: Option<u32>,
    pub camera: Option<u32>,
    /// The `max_quality` this participant set on every camera it receives (video).
    pub video_cap: Option<chorus_protocol::track::Quality>,
    /// Packets received per publisher index.
    pub per_publisher: HashMap<u32, u64>,
    pub lost: u64,
    pub jitter_ms: Vec<f64>,
    pub video: VideoPeerResult,
    pub error: Option<String>,
}

/// One str0m PeerConnection (Opus only, or in video scenarios Opus and VP8 in RTP
/// mode) on its own UDP socket.
pub struct Pc {
    pub rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    buf: Vec<u8>,
    /// ICE and DTLS are up.
    pub connected: bool,
    /// Keyframe requests (by rid) the SFU sent, for the camera to answer.
    pub keyframe_requests: Vec<Option<Rid>>,
}

impl Pc {
    /// A PC whose socket (and so its one host candidate) is on `ip`: loopback for
    /// Chorus, the address Janus gathers on for Janus.
    pub fn new(ip: IpAddr) -> anyhow::Result<Pc> {
        let socket = bind_socket(ip)?;
        let local = socket.local_addr()?;
        let rtc = Rtc::builder()
            .clear_codecs()
            .enable_opus(true, false)
            // Loss is measured from sequence numbers as packets arrive; a reordering
            // buffer would only hide it (and delay delivery).
            .set_reordering_size_audio(0)
            .build(Instant::now());
        Self::with_rtc(rtc, socket, local)
    }

    /// A video-capable PC on `ip`: RTP mode, Opus and VP8, and the header
    /// extensions the SFU negotiates (audio level, mid, rid, repaired rid, transport-wide
    /// sequence numbers) at its ids.
    pub fn new_video(ip: IpAddr) -> anyhow::Result<Pc> {
        let socket = bind_socket(ip)?;
        let local = socket.local_addr()?;
        let rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .clear_extension_map()
            .set_extension(1, Extension::AudioLevel)
            .set_extension(4, Extension::RtpMid)
            .set_extension(10, Extension::RtpStreamId)
            .set_extension(11, Extension::RepairedRtpStreamId)
            // Transport-wide sequence numbers, so this peer sends the congestion feedback
            // a browser sends: the SFU's bandwidth estimate (and so the layers its
            // allocator grants) comes from it. Without it the estimate never leaves its
            // 1 Mbit/s start.
            .set_extension(3, Extension::TransportSequenceNumber)
            .build(Instant::now());
        Self::with_rtc(rtc, socket, local)
    }

    fn with_rtc(mut rtc: Rtc, socket: UdpSocket, local: SocketAddr) -> anyhow::Result<Pc> {
        rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| anyhow!("{e}"))?);
        Ok(Pc {
            rtc,
            socket,
            local,
            buf: vec![0u8; 2000],
            connected: false,
            keyframe_requests: Vec::new(),
        })
    }

    /// Runs str0m until it has nothing more to say; returns when it next wants time.
    pub fn drive(&mut self, rx: &mut Receiver, shared: &Shared) -> anyhow::Result<Instant> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    // Loopback: a full socket buffer is the only failure, and that is
                    // loss the receivers will count.
                    let _ = self.socket.try_send_to(&t.contents, t.destination);
                }
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::MediaData(d)) => rx.on_media(&d, shared),
                // RTP mode (video scenarios): one packet per poll, hence the loop.
                Output::Event(Event::RtpPacket(p)) => rx.on_rtp(&p, shared),
                Output::Event(Event::KeyframeRequest(r)) => self.keyframe_requests.push(r.rid),
                Output::Event(_) => {}
            }
        }
    }

    /// Waits for one datagram and hands it to str0m. Cancel-safe: the only await is
    /// the receive, so a `select!` that drops this loses nothing.
    pub async fn receive(&mut self) -> anyhow::Result<()> {
        let Ok((n, source)) = self.socket.recv_from(&mut self.buf).await else {
            return Ok(());
        };
        let Ok(contents) = self.buf[..n].try_into() else {
            return Ok(());
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        if self.rtc.accepts(&input) {
            self.rtc.handle_input(input)?;
        }
        Ok(())
    }

    /// [`Pc::receive`] on an optional PC: without one, never returns.
    pub async fn receive_opt(pc: Option<&mut Pc>) -> anyhow::Result<()> {
        match pc {
            Some(pc) => pc.receive().await,
            None => std::future::pending().await,
        }
    }

    pub fn timeout(&mut self) -> anyhow::Result<()> {
        self.rtc.handle_input(Input::Timeout(Instant::now()))?;
        Ok(())
    }
}

/// The publishing side: one stamped clip frame per 20 ms tick.
pub struct Sender {
    publisher: u32,
    mid: Mid,
    talk: Talk,
    phase: Duration,
    frame_no: u64,
    rtp_ts: u32,
    pt: Option<Pt>,
    payload: Vec<u8>,
    /// RTP mode: the next sequence number (str0m numbers packets only in frame mode).
    rtp_seq: Option<u64>,
}

impl Sender {
    /// A sender for an RTP-mode session (video scenarios): the same packets, written
    /// through str0m's direct API.
    pub fn new_rtp(index: usize, publisher: u32, mid: Mid, talk: Talk) -> Sender {
        Sender {
            rtp_seq: Some(1 + index as u64 * 1000),
            ..Self::new(index, publisher, mid, talk)
        }
    }

    pub fn new(index: usize, publisher: u32, mid: Mid, talk: Talk) -> Sender {
        Sender {
            publisher,
            mid,
            talk,
            // Spreads the talk patterns so that not every publisher pauses at once.
            phase: Duration::from_millis(index as u64 * 370),
            frame_no: 0,
            rtp_ts: 0x1234_5678u32.wrapping_mul(index as u32 + 1),
            pt: None,
            payload: Vec::with_capacity(1500),
            rtp_seq: None,
        }
    }

    /// One 20 ms tick: writes the next frame unless the talk pattern is silent now.
    pub fn tick(&mut self, rtc: &mut Rtc, clip: &Clip, shared: &Shared) {
        let talking = match self.talk {
            Talk::Continuous => true,
            Talk::Pattern { on, off } => {
                let cycle = (on + off).as_millis().max(1) as u64;
                let t = (self.frame_no * 20 + self.phase.as_millis() as u64) % cycle;
                t < on.as_millis() as u64
            }
        };
        let (opus, level) = &clip.frames[(self.frame_no as usize) % clip.frames.len()];
        self.frame_no += 1;
        let ts = self.rtp_ts;
        self.rtp_ts = self.rtp_ts.wrapping_add(960);
        if !talking {
            return;
        }
        if self.pt.is_none() {
            self.pt = if self.rtp_seq.is_some() {
                // `writer` is frame mode only (it panics in RTP mode).
                rtc.codec_config()
                    .iter()
                    .find(|p| p.spec().codec == Codec::Opus)
                    .map(|p| p.pt())
            } else {
                rtc.writer(self.mid).and_then(|w| {
                    w.payload_params()
                        .find(|p| p.spec().codec == Codec::Opus)
                        .map(|p| p.pt())
                })
            };
        }
        let Some(pt) = self.pt else { return };
        let counter = self.frame_no as u32;
        self.payload.clear();
        self.payload.extend_from_slice(opus);
        self.payload.extend_from_slice(&MAGIC);
        self.payload
            .extend_from_slice(&self.publisher.to_be_bytes());
        self.payload.extend_from_slice(&counter.to_be_bytes());
        let now = Instant::now();
        shared.stamp(self.publisher, counter, now);
        if let Some(seq) = self.rtp_seq.as_mut() {
            let mut api = rtc.direct_api();
            if let Some(tx) = api.stream_tx_by_mid(self.mid, None) {
                let ext = ExtensionValues {
                    audio_level: Some(-(*level.min(&127) as i8)),
                    voice_activity: Some(true),
                    ..Default::default()
                };
                tx.write_rtp(
                    RtpWrite::new(pt, (*seq).into(), ts, now, self.payload.as_slice())
                        .ext_vals(ext),
                );
                *seq += 1;
                shared.tx_packets.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        if let Some(w) = rtc.writer(self.mid) {
            let level = -(*level.min(&127) as i8);
            if w.audio_level(level, true)
                .write(
                    pt,
                    now,
                    MediaTime::new(u64::from(ts), Frequency::FORTY_EIGHT_KHZ),
                    self.payload.as_slice(),
                )
                .is_ok()
            {
                shared.tx_packets.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

struct RxStream {
    highest: Option<u64>,
    jitter: f64,
    last: Option<(Instant, u64)>,
}

/// A received audio stream: by mid in frame mode, by SSRC in RTP mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum StreamKey {
    Mid(Mid),
    Ssrc(u32),
}

/// The receiving side's accounting: packets per publisher, loss from sequence gaps,
/// interarrival jitter, and one-way delay from the stamps; video in [`VideoRx`].
#[derive(Default)]
pub struct Receiver {
    streams: HashMap<StreamKey, RxStream>,
    per_publisher: HashMap<u32, u64>,
    lost: u64,
    pub video: VideoRx,
}

impl Receiver {
    fn on_media(&mut self, d: &MediaData, shared: &Shared) {
        self.on_audio(
            StreamKey::Mid(d.mid),
            &d.data,
            **d.seq_range.start(),
            d.time.numer(),
            shared,
        );
    }

    /// RTP mode: a video packet (it carries a video stamp) or an audio one.
    fn on_rtp(&mut self, p: &RtpPacket, shared: &Shared) {
        if let Some(stamp) = video_stamp(&p.payload) {
            self.video.on_rtp(p, stamp, shared);
            return;
        }
        self.on_audio(
            StreamKey::Ssrc(*p.header.ssrc),
            &p.payload,
            *p.seq_no,
            p.time.numer(),
            shared,
        );
    }

    fn on_audio(&mut self, key: StreamKey, data: &[u8], seq: u64, ts: u64, shared: &Shared) {
        let now = Instant::now();
        shared.rx_packets.fetch_add(1, Ordering::Relaxed);
        if data.len() >= STAMP_LEN {
            let s = &data[data.len() - STAMP_LEN..];
            if s[..4] == MAGIC {
                let publisher = u32::from_be_bytes([s[4], s[5], s[6], s[7]]);
                let counter = u32::from_be_bytes([s[8], s[9], s[10], s[11]]);
                *self.per_publisher.entry(publisher).or_default() += 1;
                match shared.sent_at(publisher, counter) {
                    Some(sent) => shared
                        .delay
                        .observe(shared.elapsed_ns(now).saturating_sub(sent)),
                    // Older than the send-time ring (> 10 s late).
                    None => {
                        shared.unmeasured.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let st = self.streams.entry(key).or_insert(RxStream {
            highest: None,
            jitter: 0.0,
            last: None,
        });
        if let Some(h) = st.highest {
            if seq > h + 1 {
                let gap = seq - h - 1;
                self.lost += gap;
                shared.lost.fetch_add(gap, Ordering::Relaxed);
            }
        }
        if st.highest.is_none_or(|h| seq > h) {
            st.highest = Some(seq);
        }
        // RFC 3550 interarrival jitter, in ms.
        if let Some((t0, ts0)) = st.last {
            let arrival = now.duration_since(t0).as_secs_f64() * 1000.0;
            let media = (ts as f64 - ts0 as f64) / 48.0;
            st.jitter += ((arrival - media).abs() - st.jitter) / 16.0;
        }
        st.last = Some((now, ts));
    }

    /// Moves what was counted into the participant's result.
    pub fn finish(self, result: &mut PeerResult) {
        result.per_publisher = self.per_publisher;
        result.lost = self.lost;
        result.jitter_ms = self.streams.values().map(|s| s.jitter).collect();
        result.video = self.video.finish();
    }
}

/// Records how a participant's run ended: a failure is counted in `shared` and
/// carried in the result (the run goes on without it).
pub fn record_outcome(
    outcome: anyhow::Result<()>,
    index: usize,
    shared: &Shared,
    result: &mut PeerResult,
) {
    if let Err(e) = outcome {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        result.error = Some(format!("participant {index}: {e:#}"));
    }
}

pub async fn run(mut spec: PeerSpec, clip: Arc<Clip>, shared: Arc<Shared>) -> PeerResult {
    let mut result = PeerResult {
        publisher: spec.publisher,
        camera: spec.video.as_ref().and_then(|v| v.camera),
        video_cap: spec.video.as_ref().and_then(|v| v.cap),
        ..Default::default()
    };
    let outcome = run_inner(&mut spec, &clip, &shared, &mut result).await;
    record_outcome(outcome, spec.index, &shared, &mut result);
    result
}

/// Joins with protocol 2 (video). `SignalingClient::join` asks for protocol 1, which
/// the native client needs (it plays no video).
async fn join_video(url: &str, token: &str) -> anyhow::Result<(SignalingClient, ServerMessage)> {
    let mut c = SignalingClient::connect(url).await?;
    c.send(&ClientMessage::Join {
        token: token.to_string(),
        room: None,
        resume: false,
        protocol: Some(chorus_protocol::PROTOCOL_VERSION),
    })
    .await?;
    match c.recv_timeout(Duration::from_secs(10)).await? {
        chorus_native::Incoming::Message(m @ ServerMessage::Joined { .. }) => Ok((c, m)),
        chorus_native::Incoming::Message(ServerMessage::Error { code, message }) => {
            bail!("join refused: {} ({message})", code.as_str())
        }
        other => bail!("unexpected reply to join: {other:?}"),
    }
}

fn camera_decl(cam: Mid) -> Vec<TrackDecl> {
    vec![TrackDecl {
        mid: cam.to_string(),
        source: TrackSource::Camera,
    }]
}

async fn run_inner(
    spec: &mut PeerSpec,
    clip: &Clip,
    shared: &Shared,
    result: &mut PeerResult,
) -> anyhow::Result<()> {
    let video = spec.video.take();
    let (mut sig, joined) = match &video {
        Some(_) => join_video(&spec.url, &spec.token).await?,
        None => SignalingClient::join(&spec.url, &spec.token).await?,
    };
    let ServerMessage::Joined { me, room, .. } = joined else {
        bail!("unexpected join reply");
    };
    let my_sid = me.sid.clone();
    result.identity = me.identity;
    result.room = room;
    shared.joined.fetch_add(1, Ordering::Relaxed);

    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut pc = match &video {
        Some(_) => Pc::new_video(localhost)?,
        None => Pc::new(localhost)?,
    };
    let mut api = pc.rtc.sdp_api();
    let dir = if spec.publisher.is_some() {
        Direction::SendOnly
    } else {
        Direction::RecvOnly
    };
    let mic = api.add_media(MediaKind::Audio, dir, None, None, None);
    let camera = video.as_ref().and_then(|v| v.camera);
    // The camera in the first offer, or later (`camera_after`).
    let mut cam = None;
    if camera.is_some() && video.as_ref().is_some_and(|v| v.camera_after.is_none()) {
        cam = Some(video::add_camera(&mut api));
    }
    let (offer, pending) = api.apply().context("offer")?;
    let mut pending = Some(pending);
    let now = Instant::now();
    if let (Some(c), Some(_)) = (camera, cam) {
        shared.video.published(c, shared.elapsed_ns(now));
    }
    let mut rx = Receiver::default();
    rx.video.offered(now, shared);
    sig.send(&ClientMessage::Offer {
        sdp: offer.to_sdp_string(),
        tracks: cam.map(camera_decl).unwrap_or_default(),
    })
    .await?;

    let mut sender = spec.publisher.map(|p| match &video {
        Some(_) => Sender::new_rtp(spec.index, p, mic, spec.talk),
        None => Sender::new(spec.index, p, mic, spec.talk),
    });
    // The camera sends once the offer that published it is answered.
    let mut camera_tx: Option<VideoSender> = None;
    let mut camera_pending = cam.is_some();
    // When the offer that publishes the camera went out.
    let mut camera_offered = cam.map(|_| now);
    let mut camera_at: Option<tokio::time::Instant> = None;
    let mut counted = false;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut frame_tick = tokio::time::interval(video::FRAME_INTERVAL);
    frame_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    // Video tracks this subscriber has set its cap on.
    let mut capped: std::collections::HashSet<String> = std::collections::HashSet::new();

    loop {
        let deadline = pc.drive(&mut rx, shared)?;
        for rid in pc.keyframe_requests.drain(..) {
            if let Some(c) = camera_tx.as_mut() {
                c.request_keyframe(rid, shared);
            }
        }
        if pc.connected && !counted {
            counted = true;
            shared.connected.fetch_add(1, Ordering::Relaxed);
            rx.video.ready(Instant::now(), shared);
            if let (Some(_), None, Some(after)) =
                (camera, cam, video.as_ref().and_then(|v| v.camera_after))
            {
                camera_at = Some(tokio::time::Instant::now() + after);
            }
        }
        if *spec.stop.borrow() {
            break;
        }
        tokio::select! {
            r = pc.receive() => r?,
            m = sig.recv() => match m? {
                chorus_native::Incoming::Message(ServerMessage::Answer { sdp }) => {
                    let answer = SdpAnswer::from_sdp_string(&sdp)?;
                    let p = pending.take().ok_or_else(|| anyhow!("answer without offer"))?;
                    pc.rtc.sdp_api().accept_answer(p, answer)?;
                    if let (true, Some(c), Some(mid)) = (camera_pending, camera, cam) {
                        camera_pending = false;
                        if let Some(t) = camera_offered.take() {
                            shared.video.answered(t.elapsed().as_secs_f64() * 1000.0);
                        }
                        camera_tx = Some(VideoSender::new(spec.index, c, mid));
                    }
                }
                // While our own offer is unanswered the server's offer is ignored: it
                // abandons it on our offer and offers again after answering (protocol
                // 2, "No glare"). Audio-only peers never have an offer out then.
                chorus_native::Incoming::Message(ServerMessage::Offer { .. })
                    if pending.is_some() => {}
                chorus_native::Incoming::Message(ServerMessage::Offer { sdp }) => {
                    let offer = SdpOffer::from_sdp_string(&sdp)?;
                    let answer = pc.rtc.sdp_api().accept_offer(offer)?;
                    sig.send(&ClientMessage::Answer { sdp: answer.to_sdp_string() }).await?;
                    rx.video.answered(Instant::now(), shared);
                }
                chorus_native::Incoming::Message(ServerMessage::Error { code, message }) => {
                    bail!("server error {}: {message}", code.as_str());
                }
                chorus_native::Incoming::Message(ServerMessage::Left { reason }) => {
                    bail!("server ended the session: {reason}");
                }
                chorus_native::Incoming::Message(
                    ServerMessage::ParticipantJoined { participant }
                    | ServerMessage::ParticipantUpdated { participant },
                ) => {
                    // Mixed subscriber caps: each new video track gets this one's cap.
                    let theirs = participant.sid != my_sid;
                    if let Some(cap) = video.as_ref().and_then(|v| v.cap).filter(|_| theirs) {
                        for t in participant.tracks.iter().filter(|t| {
                            t.kind == chorus_protocol::track::TrackKind::Video
                        }) {
                            if capped.insert(t.sid.clone()) {
                                sig.send(&ClientMessage::UpdateSubscription {
                                    track_sid: t.sid.clone(),
                                    max_quality: Some(cap),
                                    visible: None,
                                    width: None,
                                    height: None,
                                })
                                .await?;
                            }
                        }
                    }
                }
                chorus_native::Incoming::Message(_) => {}
                chorus_native::Incoming::Closed(c) => bail!("signaling closed: {c:?}"),
            },
            _ = tick.tick(), if sender.is_some() && pc.connected => {
                if let Some(s) = sender.as_mut() {
                    s.tick(&mut pc.rtc, clip, shared);
                }
            }
            _ = frame_tick.tick(), if camera_tx.is_some() && pc.connected => {
                if let (Some(c), Some(v)) = (camera_tx.as_mut(), video.as_ref()) {
                    c.tick(&mut pc.rtc, &v.clip, shared);
                }
            }
            // Turning the camera on: a new offer (never while one is out).
            _ = tokio::time::sleep_until(camera_at.unwrap_or(far)),
                if camera_at.is_some() && pending.is_none() =>
            {
                camera_at = None;
                let mut api = pc.rtc.sdp_api();
                let mid = video::add_camera(&mut api);
                let (offer, p) = api.apply().context("camera offer")?;
                pending = Some(p);
                cam = Some(mid);
                camera_pending = true;
                let now = Instant::now();
                camera_offered = Some(now);
                if let Some(c) = camera {
                    shared.video.published(c, shared.elapsed_ns(now));
                }
                sig.send(&ClientMessage::Offer {
                    sdp: offer.to_sdp_string(),
                    tracks: camera_decl(mid),
                })
                .await?;
            }
            _ = tokio::time::sleep_until(deadline.into()) => pc.timeout()?,
            _ = spec.stop.changed() => break,
        }
    }
    rx.finish(result);
    let _ = sig.send(&ClientMessage::Leave).await;
    sig.close().await;
    if !pc.connected {
        bail!("media never connected");
    }
    if camera.is_some() && camera_tx.is_none() {
        bail!("the camera was never published (no answer to its offer)");
    }
    Ok(())
}
