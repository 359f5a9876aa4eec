//! One media worker: every participant of the rooms it owns, one UDP socket, one thread.
//!
//! [`Worker`] is the sans-IO core: it takes datagrams, commands and time, and produces
//! datagrams to send, control events and its next deadline. The shell in `node.rs` moves
//! bytes between it and the socket. The worker owns its participants outright (`&mut
//! self`, no locks): commands from the control plane arrive as messages.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use chorus_media_core::rewrite::RtpRewriter;
use chorus_media_core::speaker::{DominantEvent, SpeakerConfig, SpeakerDetector, SpeakerEvent};
use chorus_protocol::chat::{ChatErrorCode, ChatServerFrame, Sender, SignalFrame};
use chorus_protocol::control::{FromNode, NodeErrorCode, ToNode};
use chorus_protocol::track::{Quality, QualityReason, TrackDecl, TrackKind, TrackSource};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::Pt;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionValues, RtpPacket, RtpWrite};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tracing::{debug, info, warn};

use crate::demux::{is_stun, stun_local_ufrag};
use crate::enhance::Enhancer;
use crate::fasthash::FastMap;
use crate::forwarder::VideoForwarder;
use crate::track::{PubTrack, MAX_TRACKS};

mod adapt;
mod negotiation;
mod video;

use adapt::Downlink;

use video::publish_track;

/// A datagram to send.
pub struct Transmit {
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// Signals (typing indicators) relayed per sender per second; more are dropped.
const SIGNALS_PER_SEC: u32 = 10;

/// Largest data-channel frame the node passes on (chat text is 4000 characters at most,
/// up to 4 bytes each, plus JSON).
const MAX_CHANNEL_FRAME: usize = 20 * 1024;

/// Period of the room tick: speaker detection and selection, ICE give-up checks.
const TICK: Duration = Duration::from_millis(20);

/// Due timeouts `drive` handles on the spot before leaving the rest to the timer heap
/// (a bound in case a session keeps reporting a deadline in the past).
const MAX_INLINE_TIMEOUTS: u32 = 4;

/// How long a participant's ICE may stay disconnected before the node gives up.
const ICE_DISCONNECT_GRACE: Duration = Duration::from_secs(10);

/// A track as one subscriber receives it: its m-section in the subscriber's session and
/// the per-subscriber rewriting state.
struct DownTrack {
    mid: Mid,
    kind: TrackKind,
    /// Audio: sequence/timestamp continuity across pauses and publisher restarts.
    rewriter: RtpRewriter,
    /// Video: layer choice and rewriting.
    video: VideoForwarder,
    /// The subscriber's `max_quality` for this track.
    cap: Quality,
    /// Adaptive stream: whether the client shows the track, and its tile's size in
    /// device pixels (`None`: not said).
    visible: bool,
    size: Option<(u32, u32)>,
    /// The highest layer to forward: the least of `cap`, the view and the allocator's
    /// grant (`None`: nothing), and why it is less than `cap` allows. Set by the
    /// allocation pass ([`adapt`]), read per packet.
    limit: Option<u8>,
    limit_reason: Option<QualityReason>,
    /// The highest layer the subscriber would take of this track (its cap and its tile
    /// together), granted or not: dynacast keeps the publisher encoding every layer up to
    /// it, so that a drop in the estimate and its recovery find live layers.
    wanted: Option<u8>,
    /// The quality (and reason) last reported to the subscriber (`track_quality`).
    reported: Option<(Quality, Option<QualityReason>)>,
    /// (publisher payload type, subscriber payload type) last mapped.
    pt_map: Option<(Pt, Option<Pt>)>,
    /// True once the subscriber answered the offer that added this track.
    ready: bool,
}

impl DownTrack {
    fn new(mid: Mid, kind: TrackKind, cap: Quality) -> Self {
        DownTrack {
            mid,
            kind,
            rewriter: RtpRewriter::new(48_000),
            video: VideoForwarder::new(),
            cap,
            visible: true,
            size: None,
            // Nothing until the allocator has run for it (on the next tick).
            limit: None,
            limit_reason: None,
            wanted: None,
            reported: None,
            pt_map: None,
            ready: false,
        }
    }
}

/// Key of a down track in a subscriber's map: (publisher, the publisher's track index).
type TrackKey = (u64, u8);

struct Participant {
    id: u64,
    room: String,
    identity: String,
    name: String,
    /// The `chat` and `signal` data channels, once open.
    chat: Option<ChannelId>,
    signal: Option<ChannelId>,
    /// Start of the current one-second window of relayed signals, and its count.
    signal_window: (Instant, u32),
    /// Smoothed RFC 6464 level (lower is louder), for ranking speakers.
    level_ema: f32,
    /// Server-side noise suppression of this publisher's audio, when asked for.
    enhancer: Option<Box<Enhancer>>,
    /// Whether this publisher's last packet was forwarded; when forwarding resumes
    /// after a pause (muted, not selected) subscribers' numbering is resynced once.
    forwarding: bool,
    rtc: Rtc,
    ufrag: String,
    publish: bool,
    subscribe: bool,
    muted: bool,
    /// Offer this participant other participants' video (a protocol 2 client).
    video: bool,
    /// The client's first offer has been answered; only after that does the node offer.
    initial_done: bool,
    /// What this participant publishes, in the order it first published it.
    tracks: Vec<PubTrack>,
    /// Sources the client declared for its m-sections in its latest offer.
    decls: Vec<TrackDecl>,
    /// Publisher SSRC → (index into `tracks`, layer), learned from str0m on first sight.
    ssrcs: Vec<(u32, usize, u8)>,
    /// Opus payload type negotiated with this participant.
    opus_pt: Option<str0m::format::PayloadParams>,
    downtracks: FastMap<TrackKey, DownTrack>,
    /// `max_quality` the client set per track, kept for tracks not (yet) offered to it.
    caps: Vec<(TrackKey, Quality)>,
    /// Tracks whose publisher left: to be stopped in the next offer.
    stale: Vec<Mid>,
    /// Stale tracks the outstanding offer stops; back to `stale` if it is abandoned.
    stale_in_flight: Vec<Mid>,
    pending_offer: Option<SdpPendingOffer>,
    /// str0m's latest deadline for this participant.
    next_timeout: Instant,
    /// The time of this participant's live entry in the worker's timer heap, if any.
    /// At most one entry is live: a deadline that moves later leaves the earlier entry
    /// in place, which re-queues the new deadline when it pops.
    queued: Option<Instant>,
    /// Audio was written to this participant's session since it was last polled.
    dirty: bool,
    disconnected_since: Option<Instant>,
    /// The microphone's `track` event was sent.
    mic_reported: bool,
    /// Bandwidth estimate and stream allocation (video-capable sessions only).
    downlink: Option<Box<Downlink>>,
}

/// The media worker core.
pub struct Worker {
    config: WorkerConfig,
    /// One DTLS certificate for every session of this worker (a server presents one
    /// identity; its fingerprint is in each answer) instead of a key pair generated
    /// per join: building a session took 1.3 ms of CPU with its own certificate,
    /// 1.1 ms with the shared one.
    dtls_cert: Option<str0m::config::DtlsCert>,
    /// The latest time an input carried: work that has no input of its own (removing a
    /// participant after a fault, `reset`) uses it, so the core never reads the clock.
    now: Option<Instant>,
    /// Levels at or below this count as voice (the speaker detector's threshold).
    voice_threshold: u8,
    /// Rooms above the selection size → the speakers currently forwarded there.
    selected: FastMap<String, Vec<u64>>,
    /// Reused list of forwarding targets (no allocation per packet).
    scratch: Vec<u64>,
    /// Bumped whenever a participant is added or removed, so the shell refreshes its
    /// per-room gauges only then (not on every command and event: that took the
    /// metrics lock and allocated room names on the media thread).
    membership_epoch: u64,
    /// Reused list of (subscriber, quality) changes found while forwarding video.
    quality_scratch: Vec<video::QualityChange>,
    local_addr: SocketAddr,
    candidate_addrs: Vec<SocketAddr>,
    participants: FastMap<u64, Participant>,
    rooms: FastMap<String, Vec<u64>>,
    by_ufrag: FastMap<String, u64>,
    by_addr: FastMap<SocketAddr, u64>,
    /// One speaker detector per room: dominance is a per-room notion.
    detectors: FastMap<String, SpeakerDetector<u64>>,
    transmits: Vec<Transmit>,
    events: Vec<FromNode>,
    /// Reused buffer of packets a publisher produced in one poll.
    packets: Vec<RtpPacket>,
    last_tick: Option<Instant>,
    stats: WorkerStats,
    /// Participants' str0m deadlines, earliest first. Entries go stale when a
    /// participant's deadline moves or it leaves; they are skipped when popped. This
    /// keeps finding the next deadline O(1) and due participants O(log N) each, instead
    /// of a scan over every participant per datagram.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Reused list of participants due in one `handle_timeout`.
    due: Vec<u64>,
    /// Subscribers with forwarded audio not yet polled out of their session. Polling a
    /// str0m session walks ICE, DTLS, SCTP and every stream, so it is done once per
    /// subscriber per batch of datagrams (in [`Worker::flush`]) rather than once per
    /// forwarded packet.
    dirty: Vec<u64>,
    /// Reused list of subscribers due for allocation.
    adapt_ids: Vec<u64>,
    next_dynacast: Option<Instant>,
}

/// Tunables of a worker.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Rooms with more participants than this forward only selected speakers.
    pub selection_above: usize,
    /// At most this many speakers are forwarded at once in such rooms.
    pub max_active_speakers: usize,
    /// Where each video subscriber's bandwidth estimate starts (bits per second).
    pub initial_estimate_bps: u64,
    /// Estimate video subscribers' downlinks from their congestion feedback (str0m's
    /// estimator and pacer). Off, the allocator works from `initial_estimate_bps` as if
    /// it were measured: for benchmarks of the forwarding path alone.
    pub bandwidth_estimation: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            selection_above: 6,
            max_active_speakers: 3,
            initial_estimate_bps: adapt::INITIAL_ESTIMATE,
            bandwidth_estimation: true,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerStats {
    pub packets_in: u64,
    pub packets_forwarded: u64,
    pub datagrams_dropped: u64,
    /// Layer changes the stream allocators made, up and down.
    pub layer_switches_up: u64,
    pub layer_switches_down: u64,
    /// Video tracks paused for bandwidth now (summed over subscribers).
    pub video_paused_bandwidth: u64,
}

impl Worker {
    /// `local_addr` is the socket's address; `candidate_addrs` are the addresses put in
    /// SDP as host candidates (the socket address itself when it is not a wildcard).
    pub fn new(local_addr: SocketAddr, candidate_addrs: Vec<SocketAddr>) -> Self {
        Self::with_config(local_addr, candidate_addrs, WorkerConfig::default())
    }

    pub fn with_config(
        local_addr: SocketAddr,
        candidate_addrs: Vec<SocketAddr>,
        config: WorkerConfig,
    ) -> Self {
        let dtls_cert = str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate();
        if dtls_cert.is_none() {
            warn!("could not generate a shared DTLS certificate; each session makes its own");
        }
        Worker {
            config,
            dtls_cert,
            now: None,
            voice_threshold: SpeakerConfig::default().threshold,
            selected: FastMap::default(),
            scratch: Vec::new(),
            quality_scratch: Vec::new(),
            membership_epoch: 0,
            local_addr,
            candidate_addrs,
            participants: FastMap::default(),
            rooms: FastMap::default(),
            by_ufrag: FastMap::default(),
            by_addr: FastMap::default(),
            detectors: FastMap::default(),
            transmits: Vec::new(),
            events: Vec::new(),
            packets: Vec::new(),
            last_tick: None,
            stats: WorkerStats::default(),
            timers: BinaryHeap::new(),
            due: Vec::new(),
            dirty: Vec::new(),
            adapt_ids: Vec::new(),
            next_dynacast: None,
        }
    }

    pub fn participant_count(&self) -> usize {
        self.participants.len()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Each room on this worker with its participant count.
    pub fn room_sizes(&self) -> impl Iterator<Item = (&str, usize)> + '_ {
        self.rooms.iter().map(|(r, ids)| (r.as_str(), ids.len()))
    }

    /// Changes whenever the set of participants (and so of rooms) changes.
    pub fn membership_epoch(&self) -> u64 {
        self.membership_epoch
    }

    pub fn stats(&self) -> WorkerStats {
        self.stats
    }

    /// Datagrams to send. Polls every subscriber that was written to first (see
    /// [`Worker::flush`]), so nothing forwarded is left behind.
    pub fn take_transmits(&mut self) -> std::vec::Drain<'_, Transmit> {
        self.flush();
        self.transmits.drain(..)
    }

    /// Polls the sessions of subscribers that forwarded audio was written to. The
    /// shell feeds a batch of datagrams and then takes the transmits, which flushes;
    /// calling it earlier only trades batching for latency.
    pub fn flush(&mut self) {
        let Some(now) = self.now else {
            return;
        };
        // `drive` can forward (a subscriber's own audio) and so mark more dirty.
        while let Some(id) = self.dirty.pop() {
            if self.participants.get(&id).is_some_and(|p| p.dirty) {
                self.drive(id, now);
            }
        }
    }

    pub fn take_events(&mut self) -> std::vec::Drain<'_, FromNode> {
        self.events.drain(..)
    }

    /// The earliest instant at which [`Worker::handle_timeout`] must be called.
    pub fn next_deadline(&self, now: Instant) -> Instant {
        // The room tick (speaker detection, selection, ICE give-up) is due 20 ms after
        // the last one whatever else happens: under steady traffic the node's loop
        // never idles long enough for a relative timeout to expire.
        let tick = self.last_tick.map_or(now, |t| t + TICK);
        // A stale top entry only makes this earlier: the worker then wakes once for
        // nothing and `handle_timeout` discards it.
        self.timers
            .peek()
            .map_or(tick, |Reverse((t, _))| (*t).min(tick))
    }

    // ---- inputs ----

    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, buf: &[u8]) {
        self.now = Some(self.now.map_or(now, |t| t.max(now)));
        let id = if is_stun(buf) {
            match stun_local_ufrag(buf)
                .and_then(|u| self.by_ufrag.get(u))
                .copied()
            {
                Some(id) => {
                    if self.by_addr.get(&source) != Some(&id) {
                        self.by_addr.insert(source, id);
                    }
                    id
                }
                None => {
                    self.stats.datagrams_dropped += 1;
                    return;
                }
            }
        } else {
            match self.by_addr.get(&source) {
                Some(id) => *id,
                None => {
                    self.stats.datagrams_dropped += 1;
                    return;
                }
            }
        };
        let Ok(contents) = buf.try_into() else {
            self.stats.datagrams_dropped += 1;
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local_addr,
                contents,
            },
        );
        if let Some(Err(e)) = self.guarded(id, |p| p.rtc.handle_input(input)) {
            debug!(participant = id, "input rejected: {e}");
        }
        self.drive(id, now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(self.now.map_or(now, |t| t.max(now)));
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.participants.get_mut(&id) else {
                continue;
            };
            if p.queued != Some(t) {
                // Superseded by an earlier deadline pushed after this one.
                continue;
            }
            p.queued = None;
            if p.next_timeout <= now {
                // `drive` queues whatever deadline str0m reports next.
                due.push(id);
            } else {
                // The deadline moved later since this entry was pushed.
                p.queued = Some(p.next_timeout);
                self.timers.push(Reverse((p.next_timeout, id)));
            }
        }
        for &id in &due {
            if let Some(Err(e)) = self.guarded(id, |p| p.rtc.handle_input(Input::Timeout(now))) {
                debug!(participant = id, "timeout input failed: {e}");
            }
            self.drive(id, now);
        }
        self.due = due;
        if self
            .last_tick
            .is_none_or(|t| now.saturating_duration_since(t) >= TICK)
        {
            self.last_tick = Some(now);
            for (room, d) in self.detectors.iter_mut() {
                d.tick(now);
                drain_detector(d, room, &mut self.events);
            }
            self.update_selection();
            self.adapt(now);
            let gone: Vec<u64> = self
                .participants
                .values()
                .filter(|p| {
                    p.disconnected_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= ICE_DISCONNECT_GRACE)
                })
                .map(|p| p.id)
                .collect();
            for id in gone {
                self.fail(id, "media connection lost (ICE disconnected)");
            }
        }
    }

    pub fn handle_command(&mut self, now: Instant, cmd: ToNode) {
        self.now = Some(self.now.map_or(now, |t| t.max(now)));
        match cmd {
            ToNode::AddParticipant {
                participant,
                room,
                identity,
                name,
                publish,
                subscribe,
                video,
            } => self.add(
                now,
                participant,
                room,
                identity,
                name,
                publish,
                subscribe,
                video,
            ),
            ToNode::ChatTo { participants, data } => {
                for id in participants {
                    self.write_chat(id, &data, now);
                }
            }
            ToNode::RemoveParticipant { participant } => self.remove(participant),
            ToNode::ClientOffer {
                participant,
                sdp,
                tracks,
            } => self.client_offer(now, participant, &sdp, tracks),
            ToNode::SetSubscription {
                participant,
                track,
                max_quality,
                visible,
                width,
                height,
            } => {
                let size = width.zip(height);
                self.set_subscription(participant, &track, max_quality, visible, size)
            }
            ToNode::ClientAnswer { participant, sdp } => self.client_answer(now, participant, &sdp),
            ToNode::ClientCandidate {
                participant,
                candidate,
            } => {
                let Some(p) = self.participants.get_mut(&participant) else {
                    return self.unknown(participant);
                };
                match Candidate::from_sdp_string(&candidate) {
                    Ok(c) => p.rtc.add_remote_candidate(c),
                    Err(e) => self.events.push(FromNode::Error {
                        participant,
                        code: NodeErrorCode::InvalidCandidate,
                        message: format!("could not parse ICE candidate: {e}"),
                    }),
                }
                self.drive(participant, now);
            }
            ToNode::SetMuted { participant, muted } => {
                if let Some(p) = self.participants.get_mut(&participant) {
                    let changed = p.muted != muted;
                    p.muted = muted;
                    if changed && !p.tracks.is_empty() {
                        self.report_tracks(participant);
                    }
                    let Some(p) = self.participants.get_mut(&participant) else {
                        return;
                    };
                    // Unmuting needs nothing here: the first forwarded packet after the
                    // pause resyncs subscribers' numbering (see `forward`).
                    if muted {
                        if let Some(d) = self.detectors.get_mut(p.room.as_str()) {
                            d.remove(participant);
                            drain_detector(d, &p.room, &mut self.events);
                        }
                    }
                }
            }
            ToNode::SetEnhanced {
                participant,
                enabled,
            } => {
                let Some(p) = self.participants.get_mut(&participant) else {
                    return self.unknown(participant);
                };
                match (enabled, p.enhancer.is_some()) {
                    (true, false) => match Enhancer::new() {
                        Ok(e) => p.enhancer = Some(Box::new(e)),
                        Err(e) => warn!(participant, "enhanced audio unavailable: {e}"),
                    },
                    (false, true) => p.enhancer = None,
                    _ => {}
                }
                info!(participant, enabled, "enhanced audio");
            }
            ToNode::Challenge { .. }
            | ToNode::Welcome { .. }
            | ToNode::Rejected { .. }
            | ToNode::Adopt { .. } => {}
        }
    }

    /// Drops every participant (the control connection was lost: signaling has already
    /// forgotten them).
    pub fn reset(&mut self) {
        let ids: Vec<u64> = self.participants.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
        self.events.clear();
    }

    // ---- participants ----

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        now: Instant,
        id: u64,
        room: String,
        identity: String,
        name: String,
        publish: bool,
        subscribe: bool,
        video: bool,
    ) {
        if self.participants.contains_key(&id) {
            return;
        }
        let mut builder = Rtc::builder();
        if let Some(cert) = &self.dtls_cert {
            builder = builder.set_dtls_cert(cert.clone());
        }
        builder = builder
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            // Video codecs in the order offered: VP8 first (simulcast everywhere, cheap
            // to decode), H264 constrained baseline with packetization mode 1 (the one
            // profile every browser and hardware decoder shares), then VP9 and AV1,
            // forwarded single-layer.
            .enable_vp8(true);
        // One H264 profile after VP8 (payload types as Chromium numbers them).
        builder
            .codec_config()
            .add_h264(108.into(), Some(109.into()), true, 0x42e01f);
        builder = builder
            .enable_vp9(true)
            .enable_av1(true)
            // Audio levels for speaker detection, mid for clients' demux, and rid /
            // repaired rid so simulcast layers can be told apart. Transport-wide
            // sequence numbers (TWCC) cost feedback traffic and bookkeeping on every
            // packet (~3.5% of the SFU's CPU in a 100-participant audio profile), so
            // only sessions that may carry video get them (below).
            .clear_extension_map()
            .set_extension(1, Extension::AudioLevel)
            .set_extension(4, Extension::RtpMid)
            .set_extension(10, Extension::RtpStreamId)
            .set_extension(11, Extension::RepairedRtpStreamId);
        if video {
            // A browser that publishes video estimates its uplink from our transport-wide
            // congestion feedback: without it Chromium starts at 300 kb/s and needs ~25 s
            // to reach a 720p layer. Only video-capable (protocol 2) sessions pay for
            // the feedback; audio-only clients keep the cheaper session.
            builder = builder.set_extension(3, Extension::TransportSequenceNumber);
            // The same feedback drives our estimate of this subscriber's downlink.
            if self.config.bandwidth_estimation {
                let start = str0m::bwe::Bitrate::bps(self.config.initial_estimate_bps);
                builder = builder.enable_bwe(Some(start));
                // Peer stats carry str0m's raw estimate and the downlink's loss (adapt.rs).
                builder = builder.set_stats_interval(Some(adapt::PEER_STATS_EVERY));
            }
        }
        let mut rtc = builder.build(now);
        for addr in &self.candidate_addrs {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => warn!("unusable candidate address {addr}: {e}"),
            }
        }
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        info!(participant = id, %room, %identity, "participant added");
        self.membership_epoch += 1;
        self.by_ufrag.insert(ufrag.clone(), id);
        self.rooms.entry(room.clone()).or_default().push(id);
        self.detectors
            .entry(room.clone())
            .or_insert_with(|| SpeakerDetector::new(SpeakerConfig::default()));
        self.timers.push(Reverse((now, id)));
        self.participants.insert(
            id,
            Participant {
                id,
                room,
                identity,
                name,
                chat: None,
                signal: None,
                signal_window: (now, 0),
                level_ema: 127.0,
                enhancer: None,
                forwarding: true,
                rtc,
                ufrag,
                publish,
                subscribe,
                muted: false,
                video,
                initial_done: false,
                tracks: Vec::new(),
                decls: Vec::new(),
                ssrcs: Vec::new(),
                opus_pt: None,
                downtracks: FastMap::default(),
                caps: Vec::new(),
                stale: Vec::new(),
                stale_in_flight: Vec::new(),
                pending_offer: None,
                next_timeout: now,
                queued: Some(now),
                dirty: false,
                disconnected_since: None,
                mic_reported: false,
                downlink: video
                    .then(|| Box::new(Downlink::new(now, self.config.initial_estimate_bps))),
            },
        );
    }

    fn remove(&mut self, id: u64) {
        let Some(p) = self.participants.remove(&id) else {
            return;
        };
        info!(participant = id, "participant removed");
        self.membership_epoch += 1;
        if let Some(dl) = &p.downlink {
            self.stats.video_paused_bandwidth = self
                .stats
                .video_paused_bandwidth
                .saturating_sub(dl.paused());
        }
        self.by_ufrag.remove(&p.ufrag);
        self.by_addr.retain(|_, v| *v != id);
        if let Some(d) = self.detectors.get_mut(p.room.as_str()) {
            d.remove(id);
            drain_detector(d, &p.room, &mut self.events);
        }
        let mut peers = Vec::new();
        if let Some(members) = self.rooms.get_mut(&p.room) {
            members.retain(|m| *m != id);
            if members.is_empty() {
                self.rooms.remove(&p.room);
                self.detectors.remove(&p.room);
            } else {
                peers = members.clone();
            }
        }
        // Subscribers of the leaver drop its track in their next offer. (A participant
        // exists only after a command, which set `now`.)
        let Some(now) = self.now else {
            return;
        };
        for s in peers {
            if let Some(sp) = self.participants.get_mut(&s) {
                let mut gone = Vec::new();
                sp.downtracks.retain(|k, dt| {
                    if k.0 == id {
                        gone.push(dt.mid);
                    }
                    k.0 != id
                });
                sp.caps.retain(|(k, _)| k.0 != id);
                sp.stale.extend(gone);
            }
            self.maybe_offer(s, now);
            self.drive(s, now);
        }
    }

    fn unknown(&mut self, participant: u64) {
        self.events.push(FromNode::Error {
            participant,
            code: NodeErrorCode::UnknownParticipant,
            message: "no such participant on this node".into(),
        });
    }

    /// Runs `f` on a participant, catching a panic inside its media session: str0m asks
    /// callers to treat a panicking `Rtc` as dead, so the participant is removed and
    /// everyone else carries on. `None` if the participant is unknown or panicked.
    fn guarded<R>(&mut self, id: u64, f: impl FnOnce(&mut Participant) -> R) -> Option<R> {
        let p = self.participants.get_mut(&id)?;
        match catch_unwind(AssertUnwindSafe(|| f(p))) {
            Ok(r) => Some(r),
            Err(_) => {
                self.fail(id, "internal error in media session");
                None
            }
        }
    }

    /// Removes a participant after a fault and tells signaling why.
    fn fail(&mut self, id: u64, reason: &str) {
        warn!(participant = id, reason, "dropping participant");
        self.remove(id);
        self.events.push(FromNode::ParticipantGone {
            participant: id,
            reason: reason.to_string(),
        });
    }

    /// Polls a participant's `Rtc` until it only has a timeout left, handling events
    /// and forwarding any audio it received.
    fn drive(&mut self, id: u64, now: Instant) {
        let mut newly_published = false;
        let mut tracks_changed = false;
        // Keyframe requests from this participant as a subscriber, by mid.
        let mut keyframe_asks: Vec<Mid> = Vec::new();
        // (is chat, binary, bytes) frames received on data channels during this poll.
        let mut channel_frames: Vec<(bool, bool, Vec<u8>)> = Vec::new();
        let mut inline_timeouts = 0;
        // Tracks of this publisher that started again (dynacast starts over for them).
        let mut restarted: Vec<usize> = Vec::new();
        loop {
            let Some(p) = self.participants.get_mut(&id) else {
                return;
            };
            let out = match catch_unwind(AssertUnwindSafe(|| p.rtc.poll_output())) {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    return self.fail(id, &format!("media session error: {e}"));
                }
                Err(_) => return self.fail(id, "internal error in media session"),
            };
            match out {
                Output::Timeout(t) if t <= now && inline_timeouts < MAX_INLINE_TIMEOUTS => {
                    // str0m wants time handled before it will send what was just
                    // written (and again after sending, for its pacer). Doing it here
                    // saves a trip through the timer heap and the node's loop for every
                    // forwarded packet.
                    inline_timeouts += 1;
                    let r =
                        catch_unwind(AssertUnwindSafe(|| p.rtc.handle_input(Input::Timeout(now))));
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return self.fail(id, &format!("media session error: {e}")),
                        Err(_) => return self.fail(id, "internal error in media session"),
                    }
                }
                Output::Timeout(t) => {
                    p.next_timeout = t;
                    p.dirty = false;
                    if p.queued.is_none_or(|q| t < q) {
                        p.queued = Some(t);
                        self.timers.push(Reverse((t, id)));
                    }
                    break;
                }
                Output::Transmit(t) => self.transmits.push(Transmit {
                    destination: t.destination,
                    contents: t.contents.into(),
                }),
                Output::Event(ev) => match ev {
                    Event::RtpPacket(pkt) => self.packets.push(pkt),
                    Event::MediaAdded(m) => {
                        debug!(participant = id, mid = %m.mid, kind = ?m.kind, direction = ?m.direction, "media added");
                        let receiving =
                            matches!(m.direction, Direction::RecvOnly | Direction::SendRecv);
                        if receiving && p.publish {
                            let rids = m
                                .simulcast
                                .map(|s| if s.recv.is_empty() { s.send } else { s.recv })
                                .unwrap_or_default()
                                .into_iter()
                                .map(|l| l.rid)
                                .collect();
                            if publish_track(p, m.mid, m.kind, rids) {
                                newly_published = true;
                                tracks_changed = true;
                            }
                        }
                    }
                    Event::MediaChanged(m) => {
                        let receiving =
                            matches!(m.direction, Direction::RecvOnly | Direction::SendRecv);
                        debug!(participant = id, mid = %m.mid, direction = ?m.direction, "media changed");
                        if let Some(pos) = p.tracks.iter().position(|t| t.mid == m.mid) {
                            let t = &mut p.tracks[pos];
                            if t.active != receiving {
                                t.active = receiving;
                                // A track that comes back is a new stream: wait for it.
                                t.receiver.reset();
                                tracks_changed = true;
                                newly_published |= receiving;
                                if receiving {
                                    restarted.push(pos);
                                }
                            }
                        } else if receiving && p.publish {
                            // A transceiver that was not sending before (recvonly at
                            // first) now publishes.
                            let kind = p
                                .rtc
                                .media(m.mid)
                                .map(|md| md.kind())
                                .unwrap_or(MediaKind::Audio);
                            if publish_track(p, m.mid, kind, Vec::new()) {
                                newly_published = true;
                                tracks_changed = true;
                            }
                        }
                    }
                    Event::KeyframeRequest(r) => keyframe_asks.push(r.mid),
                    Event::EgressBitrateEstimate(k) => {
                        if let Some(dl) = p.downlink.as_mut() {
                            dl.on_estimate(&k);
                        }
                    }
                    Event::PeerStats(st) => {
                        if let Some(dl) = p.downlink.as_mut() {
                            let raw = st.bwe_tx.map(|b| b.as_u64());
                            dl.on_peer_stats(now, raw, st.egress_loss_fraction);
                        }
                    }
                    Event::IceConnectionStateChange(state) => {
                        debug!(participant = id, ?state, "ICE state");
                        match state {
                            IceConnectionState::Disconnected => p.disconnected_since = Some(now),
                            _ => p.disconnected_since = None,
                        }
                    }
                    Event::Connected => info!(participant = id, "media connected"),
                    Event::ChannelOpen(cid, label) => match label.as_str() {
                        "chat" => {
                            p.chat = Some(cid);
                            self.events.push(FromNode::ChatReady { participant: id });
                        }
                        "signal" => p.signal = Some(cid),
                        other => debug!(
                            participant = id,
                            label = other,
                            "ignoring unknown data channel"
                        ),
                    },
                    Event::ChannelClose(cid) => {
                        if p.chat == Some(cid) {
                            p.chat = None;
                        }
                        if p.signal == Some(cid) {
                            p.signal = None;
                        }
                    }
                    Event::ChannelData(d) => {
                        if Some(d.id) == p.chat {
                            channel_frames.push((true, d.binary, d.data));
                        } else if Some(d.id) == p.signal {
                            channel_frames.push((false, d.binary, d.data));
                        }
                    }
                    _ => {}
                },
            }
        }
        if !self.packets.is_empty() {
            let mut packets = std::mem::take(&mut self.packets);
            for pkt in packets.drain(..) {
                self.forward(id, &pkt, now);
            }
            // Keep the buffer's capacity for the next burst.
            self.packets = packets;
        }
        for (is_chat, binary, data) in channel_frames {
            if is_chat {
                self.chat_in(id, binary, data, now);
            } else {
                self.signal_in(id, binary, &data, now);
            }
        }
        for mid in keyframe_asks {
            self.subscriber_keyframe_request(id, mid, now);
        }
        for pos in restarted {
            self.dynacast_restart(id, pos);
        }
        if tracks_changed {
            self.tracks_changed(id);
        }
        if newly_published {
            // str0m reports the publisher's track on a later poll than the one that
            // accepted its offer, so subscribers are offered the new track from here.
            self.subscribe_all(id, now);
        }
    }

    /// A publisher's tracks changed (published, unpublished, codec learned, muted):
    /// tell signaling, stop forwarding what stopped, and the microphone's `track` event
    /// for protocol 1 bookkeeping.
    fn tracks_changed(&mut self, id: u64) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let mic = p
            .tracks
            .iter()
            .any(|t| t.active && t.source == TrackSource::Microphone);
        if mic && !p.mic_reported {
            p.mic_reported = true;
            self.events.push(FromNode::Track {
                participant: id,
                publishing: true,
            });
        }
        let inactive: Vec<u8> = p
            .tracks
            .iter()
            .filter(|t| !t.active && t.kind == TrackKind::Video)
            .map(|t| t.index)
            .collect();
        if !inactive.is_empty() {
            self.stop_video_forwarding(id, &inactive);
        }
        self.report_tracks(id);
    }

    /// Sends signaling the publisher's current list of active tracks.
    fn report_tracks(&mut self, id: u64) {
        let Some(p) = self.participants.get(&id) else {
            return;
        };
        let tracks = p
            .tracks
            .iter()
            .filter(|t| t.active)
            .map(|t| t.info(p.muted))
            .collect();
        self.events.push(FromNode::Tracks {
            participant: id,
            tracks,
        });
    }

    /// Which speakers each large room forwards: those the detector says are speaking,
    /// loudest first, at most `max_active_speakers`. Small rooms forward everyone.
    fn update_selection(&mut self) {
        let (above, max) = (self.config.selection_above, self.config.max_active_speakers);
        self.selected
            .retain(|room, _| self.rooms.get(room).is_some_and(|m| m.len() > above));
        for (room, members) in &self.rooms {
            if members.len() <= above {
                continue;
            }
            // Only a room crossing the size threshold allocates its key.
            if !self.selected.contains_key(room) {
                self.selected.insert(room.clone(), Vec::new());
            }
            let Some(sel) = self.selected.get_mut(room) else {
                continue;
            };
            sel.clear();
            sel.extend(members.iter().copied().filter(|m| {
                self.detectors
                    .get(room.as_str())
                    .is_some_and(|d| d.is_speaking(*m))
                    && self.participants.get(m).is_some_and(|p| !p.muted)
            }));
            sel.sort_by(|a, b| {
                let la = self.participants.get(a).map_or(127.0, |p| p.level_ema);
                let lb = self.participants.get(b).map_or(127.0, |p| p.level_ema);
                la.total_cmp(&lb)
            });
            sel.truncate(max);
        }
    }

    /// Forwards one publisher packet to every subscriber in its room.
    fn forward(&mut self, from: u64, pkt: &RtpPacket, now: Instant) {
        self.stats.packets_in += 1;
        let Some((pos, layer)) = self.track_of(from, *pkt.header.ssrc) else {
            return;
        };
        let Some(p) = self.participants.get_mut(&from) else {
            return;
        };
        let Some(t) = p.tracks.get(pos) else {
            return;
        };
        match t.source {
            TrackSource::Microphone => {}
            TrackSource::ScreenAudio => return self.forward_screen_audio(from, pos, pkt, now),
            TrackSource::Camera | TrackSource::Screen => {
                return self.forward_video(from, pos, layer, pkt, now)
            }
        }
        let index = t.index;
        if p.opus_pt
            .is_some_and(|pt| pt.pt() != pkt.header.payload_type)
        {
            return;
        }
        let mut level = pkt
            .header
            .ext_vals
            .audio_level
            .map(|l| l.unsigned_abs().min(127));
        let mut payload = pkt.payload.clone();
        let mut voice_activity = pkt.header.ext_vals.voice_activity;
        if let Some(enh) = p.enhancer.as_mut() {
            // Denoise once here; every subscriber gets the same processed payload and the
            // level measured on it. A packet the pipeline cannot handle goes out as is.
            if let Ok(out) = enh.process(pkt.header.sequence_number, &pkt.payload) {
                payload = out.payload;
                level = Some(out.level);
                voice_activity = Some(out.speech);
            }
        }
        if let Some(l) = level {
            p.level_ema = 0.8 * p.level_ema + 0.2 * l as f32;
        }
        let allowed = p.publish && !p.muted && {
            match self.selected.get(p.room.as_str()) {
                // Large room: selected speakers, or a voice packet while a slot is free
                // (so the start of a new speaker's first word is not clipped).
                Some(sel) => {
                    sel.contains(&from)
                        || (sel.len() < self.config.max_active_speakers
                            && level.is_some_and(|l| l <= self.voice_threshold))
                }
                None => true,
            }
        };
        if let (Some(l), false) = (level, p.muted) {
            if let Some(d) = self.detectors.get_mut(p.room.as_str()) {
                d.observe(from, l, now);
                drain_detector(d, &p.room, &mut self.events);
            }
        }
        if !allowed {
            p.forwarding = false;
            return;
        }
        let resume = !std::mem::replace(&mut p.forwarding, true);
        let Some(members) = self.rooms.get(p.room.as_str()) else {
            return;
        };
        let mut targets = std::mem::take(&mut self.scratch);
        targets.clear();
        targets.extend(members.iter().copied().filter(|m| *m != from));
        for &sid in &targets {
            let Some(s) = self.participants.get_mut(&sid) else {
                continue;
            };
            let Some(pt) = s.opus_pt.map(|p| p.pt()) else {
                continue;
            };
            let Some(dt) = s.downtracks.get_mut(&(from, index)) else {
                continue;
            };
            if !dt.ready {
                continue;
            }
            if resume {
                // Packets were withheld: continue the subscriber's numbering without a gap.
                dt.rewriter.resync();
            }
            let Some(rw) = dt.rewriter.rewrite(
                *pkt.header.ssrc,
                pkt.header.sequence_number,
                pkt.header.timestamp,
                now,
            ) else {
                continue;
            };
            let ext = ExtensionValues {
                audio_level: level.map(|l| -(l as i8)),
                voice_activity,
                ..Default::default()
            };
            let write = RtpWrite::new(pt, rw.seq.into(), rw.ts, pkt.timestamp, payload.clone())
                .marker(pkt.header.marker)
                .ext_vals(ext);
            self.write_down(sid, (from, index), write, payload.len(), false);
        }
        self.scratch = targets;
    }

    /// A frame from a participant's `chat` channel: chat rules live in signaling, so the
    /// node only checks it is text of a sane size and passes it on.
    fn chat_in(&mut self, id: u64, binary: bool, data: Vec<u8>, now: Instant) {
        let reject = |why: &str| ChatServerFrame::Error {
            code: ChatErrorCode::ChatInvalid,
            message: why.to_string(),
            reference: None,
        };
        let text = if binary {
            Err(reject("chat frames are JSON text, not binary"))
        } else if data.len() > MAX_CHANNEL_FRAME {
            Err(ChatServerFrame::Error {
                code: ChatErrorCode::ChatTooLong,
                message: format!("frame of {} bytes exceeds {MAX_CHANNEL_FRAME}", data.len()),
                reference: None,
            })
        } else {
            String::from_utf8(data).map_err(|_| reject("chat frames must be valid UTF-8"))
        };
        match text {
            Ok(data) => self.events.push(FromNode::ChatIn {
                participant: id,
                data,
            }),
            Err(frame) => self.write_chat(id, &frame.to_json(), now),
        }
    }

    /// A frame from a participant's lossy `signal` channel: stamped with the sender and
    /// relayed to the rest of the room, at most [`SIGNALS_PER_SEC`] per second.
    fn signal_in(&mut self, id: u64, binary: bool, data: &[u8], now: Instant) {
        if binary || data.len() > 1024 {
            return;
        }
        let Ok(SignalFrame::Typing { typing, .. }) = serde_json::from_slice::<SignalFrame>(data)
        else {
            return;
        };
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if now.saturating_duration_since(p.signal_window.0) >= Duration::from_secs(1) {
            p.signal_window = (now, 0);
        }
        p.signal_window.1 += 1;
        if p.signal_window.1 > SIGNALS_PER_SEC {
            return;
        }
        let out = SignalFrame::Typing {
            from: Some(Sender {
                identity: p.identity.clone(),
                name: p.name.clone(),
            }),
            typing,
        };
        let Ok(json) = serde_json::to_string(&out) else {
            return;
        };
        let room = p.room.clone();
        let members = self.rooms.get(&room).cloned().unwrap_or_default();
        for m in members.into_iter().filter(|m| *m != id) {
            let wrote = self.guarded(m, |p| match p.signal {
                Some(cid) => p
                    .rtc
                    .channel(cid)
                    .map(|mut ch| ch.write(false, json.as_bytes())),
                None => None,
            });
            if matches!(wrote, Some(Some(Ok(_)))) {
                self.drive(m, now);
            }
        }
    }

    /// Writes one text frame on a participant's `chat` channel (dropped if not open).
    fn write_chat(&mut self, id: u64, data: &str, now: Instant) {
        let wrote = self.guarded(id, |p| match p.chat {
            Some(cid) => p
                .rtc
                .channel(cid)
                .map(|mut ch| ch.write(false, data.as_bytes())),
            None => None,
        });
        match wrote {
            Some(Some(Ok(_))) => self.drive(id, now),
            Some(Some(Err(e))) => warn!(participant = id, "chat write failed: {e}"),
            _ => debug!(participant = id, "chat frame dropped: channel not open"),
        }
    }
}

/// Turns a room detector's pending events into control messages.
fn drain_detector(d: &mut SpeakerDetector<u64>, room: &str, events: &mut Vec<FromNode>) {
    while let Some(ev) = d.poll_event() {
        let (participant, speaking) = match ev {
            SpeakerEvent::Started(p) => (p, true),
            SpeakerEvent::Stopped(p) => (p, false),
        };
        events.push(FromNode::Speaking {
            participant,
            speaking,
        });
    }
    while let Some(ev) = d.poll_dominant() {
        let participant = match ev {
            DominantEvent::Changed(p) => Some(p),
            DominantEvent::Cleared => None,
        };
        debug!(room, ?participant, "dominant speaker");
        events.push(FromNode::Dominant {
            room: room.to_string(),
            participant,
        });
    }
}

fn opus_params(rtc: &Rtc) -> Option<str0m::format::PayloadParams> {
    rtc.codec_config()
        .iter()
        .find(|p| p.spec().codec == Codec::Opus)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd_add(id: u64, room: &str) -> ToNode {
        ToNode::AddParticipant {
            participant: id,
            room: room.into(),
            identity: format!("user{id}"),
            name: format!("User {id}"),
            publish: true,
            subscribe: true,
            video: false,
        }
    }

    #[test]
    fn a_panicking_media_session_removes_only_that_participant() {
        let now = Instant::now();
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut w = Worker::new(addr, vec![addr]);
        w.handle_command(now, cmd_add(1, "r"));
        w.handle_command(now, cmd_add(2, "r"));
        assert_eq!(w.participant_count(), 2);
        let r: Option<()> = w.guarded(1, |_| panic!("simulated str0m bug"));
        assert!(r.is_none());
        assert_eq!(w.participant_count(), 1);
        assert!(w.participants.contains_key(&2));
        let events: Vec<FromNode> = w.take_events().collect();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, FromNode::ParticipantGone { participant: 1, .. })),
            "{events:?}"
        );
        // The survivor still works.
        w.handle_timeout(now + Duration::from_millis(100));
        assert_eq!(w.participant_count(), 1);
    }

    #[test]
    fn garbage_datagrams_are_dropped_without_harm() {
        let now = Instant::now();
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut w = Worker::new(addr, vec![addr]);
        w.handle_command(now, cmd_add(1, "r"));
        let src: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        for len in [0usize, 1, 12, 20, 100, 1500] {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            w.handle_datagram(now, src, &junk);
        }
        assert_eq!(w.participant_count(), 1);
        assert_eq!(w.stats().datagrams_dropped, 6);
    }

    #[test]
    fn bad_sdp_is_an_error_event_and_the_session_survives() {
        let now = Instant::now();
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut w = Worker::new(addr, vec![addr]);
        w.handle_command(now, cmd_add(1, "r"));
        w.handle_command(
            now,
            ToNode::ClientOffer {
                participant: 1,
                sdp: "hello".into(),
                tracks: Vec::new(),
            },
        );
        w.handle_command(
            now,
            ToNode::ClientAnswer {
                participant: 1,
                sdp: "v=0".into(),
            },
        );
        w.handle_command(
            now,
            ToNode::ClientCandidate {
                participant: 1,
                candidate: "candidate:nonsense".into(),
            },
        );
        let events: Vec<FromNode> = w.take_events().collect();
        let codes: Vec<NodeErrorCode> = events
            .iter()
            .filter_map(|e| match e {
                FromNode::Error { code, .. } => Some(*code),
                _ => None,
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                NodeErrorCode::InvalidSdp,
                NodeErrorCode::InvalidSdp,
                NodeErrorCode::InvalidCandidate
            ]
        );
        assert_eq!(w.participant_count(), 1);
    }
}
