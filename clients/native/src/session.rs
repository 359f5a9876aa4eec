//! One participant's session: the signaling socket, a client-side `str0m::Rtc` on one
//! UDP socket, and the audio pipeline of [`crate::audio`], driven by a 20 ms audio
//! clock.
//!
//! [`run`] is the whole client: the desktop app, the CLI and the tests all call it with
//! an [`AudioSource`] (microphone, WAV file, tone) and an [`AudioSink`] (speakers, WAV
//! file), steer it with [`Command`]s and watch its [`Event`]s. It returns a [`Report`]
//! when the session ends.
//!
//! The signaling socket lives in its own task so a dropped connection can be retried
//! (with `resume: true`, within the server's grace period) while media keeps flowing.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use chorus_media_core::jitter::JitterConfig;
use chorus_media_core::opus::EncoderConfig;
use chorus_protocol::chat::{ChatClientFrame, ChatServerFrame, Sender};
use chorus_protocol::client::{ClientMessage, ParticipantInfo, ServerMessage};
use serde::Serialize;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};

use str0m::{Candidate, Event as RtcEvent, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, MissedTickBehavior};

use crate::audio::{Capture, Frame, Gate, Playback, StreamStats};
use crate::signaling::{Incoming, SignalingClient};

/// Where the microphone's frames come from.
pub trait AudioSource: Send {
    /// Fills `frame` with the next 20 ms; returns `false` once the input has ended (the
    /// frame is then silence).
    fn read(&mut self, frame: &mut Frame) -> bool;
}

/// Where the mixed playback goes.
pub trait AudioSink: Send {
    fn write(&mut self, frame: &Frame);
}

/// Silence in, nothing out: for listen-only or send-only use.
pub struct Silence;

impl AudioSource for Silence {
    fn read(&mut self, frame: &mut Frame) -> bool {
        frame.fill(0);
        true
    }
}

impl AudioSink for Silence {
    fn write(&mut self, _frame: &Frame) {}
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Signaling WebSocket URL, `ws://host:port/ws` or `wss://…`.
    pub url: String,
    pub token: String,
    pub denoise: bool,
    pub gate: Gate,
    pub muted: bool,
    pub encoder: EncoderConfig,
    pub jitter: JitterConfig,
    /// Testing aid: drop this share (0–100) of received media datagrams after the
    /// media connection is up, as a lossy network would.
    pub drop_inbound_percent: f64,
    /// Reconnect (with resume) when the signaling socket drops.
    pub reconnect: bool,
}

impl Config {
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        Config {
            url: url.into(),
            token: token.into(),
            denoise: false,
            gate: Gate::Open,
            muted: false,
            encoder: EncoderConfig {
                // Cheaper than the library default and indistinguishable for speech.
                complexity: 5,
                // Silence costs (almost) no packets.
                dtx: true,
                ..EncoderConfig::default()
            },
            jitter: JitterConfig::default(),
            drop_inbound_percent: 0.0,
            reconnect: true,
        }
    }
}

/// What the application can ask of a running session.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    SetMuted(bool),
    /// Silence playback (and mute, as voice apps do).
    SetDeafened(bool),
    /// Linear volume (1.0 = unchanged, up to 4.0) for the participant with `sid`.
    SetVolume {
        sid: String,
        volume: f32,
    },
    SetDenoise(bool),
    SetGate(Gate),
    PushToTalk(bool),
    SendChat(String),
    SetTyping(bool),
    /// Drop the signaling connection as a network failure would, and reconnect with
    /// resume (media keeps flowing meanwhile). For a "reconnect" button and for tests.
    ReconnectSignaling,
    /// Leave the room and end the session.
    Leave,
}

/// What happens in the session, for the application to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Joined {
        room: String,
        me: ParticipantInfo,
        participants: Vec<ParticipantInfo>,
    },
    ParticipantJoined(ParticipantInfo),
    ParticipantUpdated(ParticipantInfo),
    ParticipantLeft {
        sid: String,
        identity: String,
        reason: String,
    },
    DominantSpeaker(Option<String>),
    /// ICE and DTLS are up: audio flows.
    MediaConnected {
        after: Duration,
    },
    /// The first audio packet from this participant arrived.
    FirstAudio {
        sid: String,
        after: Duration,
    },
    /// The signaling socket dropped; trying again.
    Reconnecting {
        attempt: u32,
    },
    /// The socket is back and the seat was resumed (`resumed`) or had to start over.
    Reconnected {
        resumed: bool,
    },
    /// The microphone state after each captured frame is not sent as an event (50 a
    /// second); these arrive when it changes.
    Transmitting(bool),
    /// The chat and signal data channels are open: chat and typing can be sent.
    ChatReady,
    Chat(ChatServerFrame),
    Typing {
        from: Sender,
        typing: bool,
    },
    /// A server error that did not end the session.
    ServerError {
        code: String,
        message: String,
    },
    Ended {
        reason: String,
    },
}

/// Receive statistics for one remote participant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamReport {
    pub sid: String,
    pub identity: String,
    pub packets: u64,
    pub lost: u64,
    pub loss_percent: f64,
    pub jitter_ms: f64,
    pub late: u64,
    pub fec_recovered: u64,
    pub concealed: u64,
    pub underruns: u64,
}

/// What a finished session measured. Times are milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Report {
    pub room: String,
    pub identity: String,
    pub sid: String,
    /// WebSocket connect started → `joined` received.
    pub join_ms: Option<f64>,
    /// WebSocket connect started → ICE/DTLS connected.
    pub media_connected_ms: Option<f64>,
    /// WebSocket connect started → first audio packet from anyone.
    pub first_audio_ms: Option<f64>,
    pub packets_sent: u64,
    /// Unix time (ms) of the first captured frame; frame `i` of the input was captured
    /// at `capture_start_unix_ms + 20 i`.
    pub capture_start_unix_ms: Option<f64>,
    /// Unix time (ms) at which the first output frame was played; output frame `i`
    /// plays at `playback_start_unix_ms + 20 i`.
    pub playback_start_unix_ms: Option<f64>,
    pub frames_captured: u64,
    pub frames_played: u64,
    pub dropped_inbound: u64,
    pub reconnects: u32,
    pub streams: Vec<StreamReport>,
    pub end_reason: String,
}

/// What the signaling task tells the session.
#[derive(Debug)]
enum Sig {
    Message(ServerMessage),
    Reconnecting(u32),
    /// Joined again after a drop.
    Rejoined(ServerMessage),
    Closed(String),
}

const FRAME: Duration = Duration::from_millis(20);
const SAMPLES: u32 = 960;

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The host and port signaling listens on, to find which local address routes there.
fn signaling_host(url: &str) -> anyhow::Result<(String, u16)> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = url
        .parse()
        .with_context(|| format!("bad server URL {url:?}"))?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("server URL {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("wss") | Some("https") => 443,
        _ => 80,
    });
    Ok((host, port))
}

/// The local IP the OS would use to reach `host` (no packet is sent: connecting a UDP
/// socket only picks a route).
fn local_ip_towards(host: &str, port: u16) -> anyhow::Result<IpAddr> {
    use std::net::ToSocketAddrs;
    let target = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} resolves to no address"))?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let probe = std::net::UdpSocket::bind(bind)?;
    probe.connect(target)?;
    Ok(probe.local_addr()?.ip())
}

/// Turns a `ws://` URL given as `http://…` or without `/ws` into the socket URL.
pub fn normalize_url(url: &str) -> String {
    let mut u = url.trim().to_string();
    if let Some(rest) = u.strip_prefix("http://") {
        u = format!("ws://{rest}");
    } else if let Some(rest) = u.strip_prefix("https://") {
        u = format!("wss://{rest}");
    } else if !u.starts_with("ws://") && !u.starts_with("wss://") {
        u = format!("ws://{u}");
    }
    // Path-less URLs mean the default endpoint.
    let after_scheme = u.split_once("://").map(|x| x.1).unwrap_or("");
    if !after_scheme.contains('/') {
        u.push_str("/ws");
    } else if u.ends_with('/') {
        u.push_str("ws");
    }
    u
}

/// Small deterministic generator for the loss simulation (no crypto needed).
struct XorShift(u64);

impl XorShift {
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The WebRTC side: str0m and what it negotiated.
struct Media {
    rtc: Rtc,
    local: SocketAddr,
    mic: Option<Mid>,
    opus_pt: Option<str0m::media::Pt>,
    pending: Option<SdpPendingOffer>,
    connected: bool,
    /// Remote audio tracks: mid → participant sid (from the stream id `p<sid>`).
    tracks: HashMap<Mid, String>,
    chat: Option<ChannelId>,
    signal: Option<ChannelId>,
    channels: HashMap<ChannelId, String>,
    rtp_ts: u32,
}

impl Media {
    fn new(local: SocketAddr, now: Instant) -> anyhow::Result<Self> {
        let mut rtc = Rtc::builder()
            .clear_codecs()
            .enable_opus(true, false)
            // Hand every packet over as it arrives, reordered or not: our jitter
            // buffer orders them and decides what is late.
            .set_reordering_size_audio(0)
            .build(now);
        rtc.add_local_candidate(
            Candidate::host(local, "udp").context("local candidate for the media socket")?,
        );
        Ok(Media {
            rtc,
            local,
            mic: None,
            opus_pt: None,
            pending: None,
            connected: false,
            tracks: HashMap::new(),
            chat: None,
            signal: None,
            channels: HashMap::new(),
            rtp_ts: rand_u32(),
        })
    }

    /// The one offer this client makes: the microphone (if allowed) and the chat and
    /// signal data channels.
    fn offer(&mut self, publish: bool) -> String {
        let mut api = self.rtc.sdp_api();
        let dir = if publish {
            Direction::SendOnly
        } else {
            Direction::RecvOnly
        };
        let mid = api.add_media(MediaKind::Audio, dir, None, None, None);
        if publish {
            self.mic = Some(mid);
        }
        api.add_channel("chat".into());
        api.add_channel_with_config(ChannelConfig {
            label: "signal".into(),
            ordered: false,
            reliability: Reliability::MaxRetransmits { retransmits: 0 },
            ..Default::default()
        });
        // `apply` only returns None when nothing changed, and we just added media.
        match api.apply() {
            Some((offer, pending)) => {
                self.pending = Some(pending);
                offer.to_sdp_string()
            }
            None => String::new(),
        }
    }
}

fn rand_u32() -> u32 {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(1);
    n.wrapping_mul(2_654_435_761) ^ std::process::id()
}

/// Runs one participant's session until `Command::Leave`, the server ends it, or an
/// unrecoverable error.
pub async fn run(
    config: Config,
    mut source: Box<dyn AudioSource>,
    mut sink: Box<dyn AudioSink>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let url = normalize_url(&config.url);
    let (host, port) = signaling_host(&url)?;
    let local_ip = local_ip_towards(&host, port)?;
    let socket = UdpSocket::bind(SocketAddr::new(
        if local_ip.is_ipv4() {
            IpAddr::from([0u8, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    ))
    .await
    .context("binding the media socket")?;
    let local = SocketAddr::new(local_ip, socket.local_addr()?.port());

    // Join first: an error here (bad token, no media node) ends the run with a clear
    // message instead of a session that never connects.
    let (client, joined) = SignalingClient::join(&url, &config.token).await?;
    let join_ms = ms(started.elapsed());
    let ServerMessage::Joined {
        room,
        me,
        participants,
        grants,
        ..
    } = joined
    else {
        bail!("unexpected reply to join");
    };
    let _ = events.send(Event::Joined {
        room: room.clone(),
        me: me.clone(),
        participants: participants.clone(),
    });
    let mut report = Report {
        room: room.clone(),
        identity: me.identity.clone(),
        sid: me.sid.clone(),
        join_ms: Some(join_ms),
        ..Report::default()
    };
    let mut people: HashMap<String, ParticipantInfo> = participants
        .into_iter()
        .map(|p| (p.sid.clone(), p))
        .collect();

    let (sig_out, sig_out_rx) = mpsc::unbounded_channel::<ClientMessage>();
    let (sig_in_tx, mut sig_in) = mpsc::unbounded_channel::<Sig>();
    let (sig_drop, sig_drop_rx) = mpsc::unbounded_channel::<()>();
    let sig_task = tokio::spawn(signaling_task(
        client,
        url.clone(),
        config.token.clone(),
        config.reconnect,
        sig_out_rx,
        sig_drop_rx,
        sig_in_tx,
    ));

    let mut media = Media::new(local, Instant::now())?;
    let mut publish = grants.publish;
    let sdp = media.offer(publish);
    let _ = sig_out.send(ClientMessage::Offer {
        sdp,
        tracks: Vec::new(),
    });
    // Our host candidate is in the offer; the SFU is ICE-lite and needs no trickle.

    let mut capture = Capture::new(config.encoder, config.denoise, config.gate)?;
    capture.set_muted(config.muted);
    if config.muted {
        let _ = sig_out.send(ClientMessage::Mute { muted: true });
    }
    let mut playback: Playback<Mid> = Playback::new(config.jitter);
    let mut deafened = false;
    let mut volumes: HashMap<String, f32> = HashMap::new();
    let mut rng = XorShift(u64::from(rand_u32()) | 1);
    let mut first_audio_from: HashSet<String> = HashSet::new();
    let mut transmitting = false;
    let mut finished: Vec<StreamReport> = Vec::new();

    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut frame: Frame = [0; 960];
    let mut out: Frame = [0; 960];
    let mut buf = vec![0u8; 2000];
    let mut ticks: u64 = 0;
    let mut capture_started: Option<u64> = None;
    let wall_origin = SystemTime::now();

    let end_reason: String;
    'session: loop {
        // Let str0m say everything it has to say, and learn when it next needs us.
        let deadline = loop {
            let out = match media.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    end_reason = format!("media session failed: {e}");
                    break 'session;
                }
            };
            match out {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    // A full socket buffer loses this datagram, as the network might.
                    let _ = socket.try_send_to(&t.contents, t.destination);
                }
                Output::Event(ev) => match ev {
                    RtcEvent::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        tracing::warn!("media connection lost");
                    }
                    RtcEvent::Connected => {
                        media.connected = true;
                        let after = started.elapsed();
                        report.media_connected_ms.get_or_insert(ms(after));
                        let _ = events.send(Event::MediaConnected { after });
                    }
                    RtcEvent::MediaAdded(added)
                        if added.kind == MediaKind::Audio
                            && Some(added.mid) != media.mic
                            && matches!(
                                added.direction,
                                Direction::RecvOnly | Direction::SendRecv
                            ) =>
                    {
                        let stream_id = media
                            .rtc
                            .media(added.mid)
                            .map(|m| m.stream_id().to_string())
                            .unwrap_or_default();
                        let sid = stream_id.strip_prefix('p').unwrap_or(&stream_id);
                        media.tracks.insert(added.mid, sid.to_string());
                        if let Some(v) = volumes.get(sid) {
                            playback.set_volume(added.mid, *v);
                        }
                    }
                    RtcEvent::MediaData(data) => {
                        let Some(sid) = media.tracks.get(&data.mid) else {
                            continue;
                        };
                        if first_audio_from.insert(sid.clone()) {
                            let after = started.elapsed();
                            report.first_audio_ms.get_or_insert(ms(after));
                            let _ = events.send(Event::FirstAudio {
                                sid: sid.clone(),
                                after,
                            });
                        }
                        let seq = (*data.seq_range.start()).as_u16();
                        let ts = data.time.numer() as u32;
                        if let Err(e) =
                            playback.push(data.mid, seq, ts, &data.data, data.network_time)
                        {
                            tracing::warn!("dropping a stream's packet: {e}");
                        }
                    }
                    RtcEvent::ChannelOpen(id, label) => {
                        match label.as_str() {
                            "chat" => media.chat = Some(id),
                            "signal" => media.signal = Some(id),
                            _ => {}
                        }
                        media.channels.insert(id, label);
                        // Ready once both are open, so typing works from the start too.
                        if media.chat.is_some() && media.signal.is_some() {
                            let _ = events.send(Event::ChatReady);
                        }
                    }
                    RtcEvent::ChannelData(d) => {
                        let label = media.channels.get(&d.id).map(String::as_str);
                        match label {
                            Some("chat") => {
                                match serde_json::from_slice::<ChatServerFrame>(&d.data) {
                                    Ok(frame) => {
                                        let _ = events.send(Event::Chat(frame));
                                    }
                                    Err(e) => tracing::warn!("unreadable chat frame: {e}"),
                                }
                            }
                            Some("signal") => {
                                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&d.data)
                                {
                                    if v["type"] == "typing" {
                                        if let Ok(from) =
                                            serde_json::from_value::<Sender>(v["from"].clone())
                                        {
                                            let _ = events.send(Event::Typing {
                                                from,
                                                typing: v["typing"].as_bool().unwrap_or(false),
                                            });
                                        }
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                },
            }
        };

        tokio::select! {
            biased;
            r = socket.recv_from(&mut buf) => {
                let (n, source) = match r {
                    Ok(x) => x,
                    // ICMP port unreachable and the like: nothing to do but go on.
                    Err(_) => continue,
                };
                let data = &buf[..n];
                if config.drop_inbound_percent > 0.0
                    && media.connected
                    && (128..192).contains(&data[0])
                    && rng.next_f64() * 100.0 < config.drop_inbound_percent
                {
                    report.dropped_inbound += 1;
                    continue;
                }
                let Ok(contents) = data.try_into() else { continue };
                let input = Input::Receive(
                    Instant::now(),
                    Receive {
                        proto: Protocol::Udp,
                        source,
                        destination: media.local,
                        contents,
                    },
                );
                if media.rtc.accepts(&input) {
                    if let Err(e) = media.rtc.handle_input(input) {
                        tracing::debug!("dropping a datagram from {source}: {e}");
                    }
                }
            }
            m = sig_in.recv() => {
                let Some(m) = m else {
                    end_reason = "signaling task ended".into();
                    break 'session;
                };
                match m {
                    Sig::Closed(reason) => {
                        end_reason = reason;
                        break 'session;
                    }
                    Sig::Reconnecting(attempt) => {
                        report.reconnects += 1;
                        let _ = events.send(Event::Reconnecting { attempt });
                    }
                    Sig::Rejoined(ServerMessage::Joined { resumed, participants, me, grants, .. }) => {
                        let _ = events.send(Event::Reconnected { resumed });
                        if !resumed {
                            // The seat was gone: start media over with a fresh session.
                            report.sid = me.sid.clone();
                            people = participants.iter().map(|p| (p.sid.clone(), p.clone())).collect();
                            for mid in media.tracks.keys() {
                                playback.remove(*mid);
                            }
                            media = Media::new(local, Instant::now())?;
                            publish = grants.publish;
                            let sdp = media.offer(publish);
                            let _ = sig_out.send(ClientMessage::Offer { sdp, tracks: Vec::new() });
                            let _ = events.send(Event::Joined { room: room.clone(), me, participants });
                        }
                    }
                    Sig::Rejoined(_) => {}
                    Sig::Message(msg) => {
                        if let Some(reason) = handle_server_message(
                            msg, &mut media, &sig_out, &events, &mut people, &mut playback, &mut finished,
                        ) {
                            end_reason = reason;
                            break 'session;
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                // Capture: only once media is up, so frame 0 of the input is the first
                // one the others can hear.
                if media.connected && media.mic.is_some() {
                    // An ended input reads as silence; the application decides when
                    // to leave (the CLI stops after its input's length).
                    let _ = source.read(&mut frame);
                    if capture_started.is_none() {
                        capture_started = Some(ticks);
                    }
                    report.frames_captured += 1;
                    let ts = media.rtp_ts;
                    media.rtp_ts = media.rtp_ts.wrapping_add(SAMPLES);
                    match capture.process(&mut frame) {
                        Ok(Some(enc)) => {
                            if media.opus_pt.is_none() {
                                media.opus_pt = media.mic.and_then(|mid| media.rtc.writer(mid)).and_then(|w| {
                                    w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt())
                                });
                            }
                            if let (Some(mid), Some(pt)) = (media.mic, media.opus_pt) {
                                if let Some(w) = media.rtc.writer(mid) {
                                    let r = w
                                        .audio_level(-(enc.level.min(127) as i8), enc.voice)
                                        .write(pt, now, MediaTime::new(u64::from(ts), Frequency::FORTY_EIGHT_KHZ), enc.payload);
                                    match r {
                                        Ok(()) => report.packets_sent += 1,
                                        Err(e) => tracing::debug!("audio frame not sent: {e}"),
                                    }
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!("encoder: {e}"),
                    }
                    let tx = capture.state().transmitting;
                    if tx != transmitting {
                        transmitting = tx;
                        let _ = events.send(Event::Transmitting(tx));
                    }
                }
                // Playback starts with media too, and then runs on every tick.
                if media.connected || report.frames_played > 0 {
                    if report.playback_start_unix_ms.is_none() {
                        let at = wall_origin + FRAME * ticks as u32;
                        report.playback_start_unix_ms = Some(unix_ms(at));
                    }
                    playback.pull(now, &mut out);
                    sink.write(&out);
                    report.frames_played += 1;
                }
                ticks += 1;
            }
            c = commands.recv() => {
                let Some(c) = c else {
                    end_reason = "the application went away".into();
                    break 'session;
                };
                match c {
                    Command::Leave => {
                        end_reason = "left".into();
                        break 'session;
                    }
                    Command::SetMuted(m) => {
                        capture.set_muted(m || deafened);
                        let _ = sig_out.send(ClientMessage::Mute { muted: m || deafened });
                    }
                    Command::SetDeafened(d) => {
                        deafened = d;
                        playback.set_deafened(d);
                        capture.set_muted(d);
                        let _ = sig_out.send(ClientMessage::Mute { muted: d });
                    }
                    Command::SetVolume { sid, volume } => {
                        if let Some((mid, _)) = media.tracks.iter().find(|(_, s)| **s == sid) {
                            playback.set_volume(*mid, volume);
                        }
                        volumes.insert(sid, volume);
                    }
                    Command::ReconnectSignaling => {
                        let _ = sig_drop.send(());
                    }
                    Command::SetDenoise(on) => capture.set_denoise(on),
                    Command::SetGate(g) => capture.set_gate(g),
                    Command::PushToTalk(down) => capture.set_push_to_talk(down),
                    Command::SendChat(text) => {
                        let frame = ChatClientFrame::Send { text, reference: None };
                        let id = media.chat;
                        send_channel(&mut media, id, &frame);
                    }
                    Command::SetTyping(typing) => {
                        let v = serde_json::json!({"type": "typing", "typing": typing});
                        let id = media.signal;
                        send_channel(&mut media, id, &v);
                    }
                }
            }
            _ = sleep_until(deadline.into()) => {
                if let Err(e) = media.rtc.handle_input(Input::Timeout(Instant::now())) {
                    end_reason = format!("media session failed: {e}");
                    break 'session;
                }
            }
        }
    }

    let _ = sig_out.send(ClientMessage::Leave);
    drop(sig_out);
    // Give the leave a moment to reach the server; it also ends the task.
    let _ = tokio::time::timeout(Duration::from_secs(2), sig_task).await;

    if let Some(t) = capture_started {
        let at = wall_origin + FRAME * t as u32;
        report.capture_start_unix_ms = Some(unix_ms(at));
    }
    let mut streams = std::mem::take(&mut finished);
    for (mid, sid) in &media.tracks {
        if let Some(st) = playback.stats(*mid) {
            streams.push(stream_report(sid, &people, st));
        }
    }
    report.streams = streams;
    report.streams.sort_by(|a, b| a.sid.cmp(&b.sid));
    report.end_reason = end_reason.clone();
    let _ = events.send(Event::Ended { reason: end_reason });
    Ok(report)
}

fn stream_report(
    sid: &str,
    people: &HashMap<String, ParticipantInfo>,
    s: StreamStats,
) -> StreamReport {
    let expected = s.packets + s.lost;
    StreamReport {
        sid: sid.to_string(),
        identity: people
            .get(sid)
            .map(|p| p.identity.clone())
            .unwrap_or_default(),
        packets: s.packets,
        lost: s.lost,
        loss_percent: if expected > 0 {
            100.0 * s.lost as f64 / expected as f64
        } else {
            0.0
        },
        jitter_ms: s.jitter_ms,
        late: s.buffer.late,
        fec_recovered: s.buffer.fec,
        concealed: s.buffer.concealed_lost,
        underruns: s.buffer.underruns,
    }
}

fn send_channel<T: Serialize>(media: &mut Media, id: Option<ChannelId>, value: &T) {
    let Some(id) = id else {
        tracing::warn!("data channel not open yet; message dropped");
        return;
    };
    let Ok(bytes) = serde_json::to_vec(value) else {
        return;
    };
    if let Some(mut ch) = media.rtc.channel(id) {
        if let Err(e) = ch.write(false, &bytes) {
            tracing::warn!("data channel write failed: {e}");
        }
    }
}

/// Applies one signaling message; returns `Some(reason)` when the session must end.
fn handle_server_message(
    msg: ServerMessage,
    media: &mut Media,
    sig_out: &mpsc::UnboundedSender<ClientMessage>,
    events: &mpsc::UnboundedSender<Event>,
    people: &mut HashMap<String, ParticipantInfo>,
    playback: &mut Playback<Mid>,
    finished: &mut Vec<StreamReport>,
) -> Option<String> {
    match msg {
        ServerMessage::Answer { sdp } => {
            let Some(pending) = media.pending.take() else {
                tracing::warn!("answer without a pending offer; ignored");
                return None;
            };
            match SdpAnswer::from_sdp_string(&sdp) {
                Ok(answer) => {
                    if let Err(e) = media.rtc.sdp_api().accept_answer(pending, answer) {
                        return Some(format!("the server's answer could not be applied: {e}"));
                    }
                }
                Err(e) => return Some(format!("the server's answer is not valid SDP: {e}")),
            }
        }
        ServerMessage::Offer { sdp } => match SdpOffer::from_sdp_string(&sdp) {
            Ok(offer) => match media.rtc.sdp_api().accept_offer(offer) {
                Ok(answer) => {
                    let _ = sig_out.send(ClientMessage::Answer {
                        sdp: answer.to_sdp_string(),
                    });
                }
                Err(e) => return Some(format!("the server's offer could not be applied: {e}")),
            },
            Err(e) => return Some(format!("the server's offer is not valid SDP: {e}")),
        },
        ServerMessage::Candidate { candidate } => {
            if !candidate.candidate.is_empty() {
                match Candidate::from_sdp_string(&candidate.candidate) {
                    Ok(c) => media.rtc.add_remote_candidate(c),
                    Err(e) => tracing::debug!("ignoring a remote candidate: {e}"),
                }
            }
        }
        ServerMessage::ParticipantJoined { participant } => {
            people.insert(participant.sid.clone(), participant.clone());
            let _ = events.send(Event::ParticipantJoined(participant));
        }
        ServerMessage::ParticipantUpdated { participant } => {
            people.insert(participant.sid.clone(), participant.clone());
            let _ = events.send(Event::ParticipantUpdated(participant));
        }
        ServerMessage::ParticipantLeft {
            sid,
            identity,
            reason,
        } => {
            let gone: Vec<Mid> = media
                .tracks
                .iter()
                .filter(|(_, s)| **s == sid)
                .map(|(m, _)| *m)
                .collect();
            for mid in gone {
                // Keep what we measured of them for the final report.
                if let Some(st) = playback.stats(mid) {
                    finished.push(stream_report(&sid, people, st));
                }
                playback.remove(mid);
                media.tracks.remove(&mid);
            }
            people.remove(&sid);
            let _ = events.send(Event::ParticipantLeft {
                sid,
                identity,
                reason,
            });
        }
        ServerMessage::DominantSpeaker { sid } => {
            let _ = events.send(Event::DominantSpeaker(sid));
        }
        ServerMessage::Error { code, message } => {
            let _ = events.send(Event::ServerError {
                code: code.as_str().to_string(),
                message,
            });
        }
        ServerMessage::Left { reason } => {
            return Some(format!("the server ended the session: {reason}"))
        }
        // Layer reports are for video, which this audio-only client never receives.
        ServerMessage::Pong { .. }
        | ServerMessage::Joined { .. }
        | ServerMessage::TrackQuality { .. }
        | ServerMessage::PublishLayers { .. } => {}
    }
    None
}

/// Owns the signaling socket: relays messages both ways and, when the socket drops,
/// rejoins with `resume: true` until the server's grace period has passed.
async fn signaling_task(
    mut client: SignalingClient,
    url: String,
    token: String,
    reconnect: bool,
    mut out: mpsc::UnboundedReceiver<ClientMessage>,
    mut drop_requests: mpsc::UnboundedReceiver<()>,
    to_session: mpsc::UnboundedSender<Sig>,
) {
    let grace = Duration::from_secs(15);
    loop {
        let lost: String = loop {
            tokio::select! {
                m = out.recv() => match m {
                    None => { client.close().await; return; }
                    Some(msg) => {
                        let leaving = msg == ClientMessage::Leave;
                        if let Err(e) = client.send(&msg).await {
                            break format!("{e}");
                        }
                        if leaving { client.close().await; return; }
                    }
                },
                r = client.recv() => match r {
                    Ok(Incoming::Message(m)) => {
                        if to_session.send(Sig::Message(m)).is_err() { return; }
                    }
                    Ok(Incoming::Closed(c)) => break format!("closed by the server: {c:?}"),
                    Err(e) => break format!("{e}"),
                },
                Some(()) = drop_requests.recv() => break "dropped on request".to_string(),
            }
        };
        // Without a close handshake, as a failing network would leave it.
        client.abort();
        if !reconnect {
            let _ = to_session.send(Sig::Closed(format!("signaling connection lost: {lost}")));
            return;
        }
        tracing::warn!("signaling connection lost ({lost}); reconnecting");
        let deadline = Instant::now() + grace;
        let mut attempt = 0u32;
        let rejoined = loop {
            attempt += 1;
            let _ = to_session.send(Sig::Reconnecting(attempt));
            let backoff = Duration::from_millis(250 * u64::from(attempt.min(8)));
            tokio::time::sleep(backoff).await;
            match SignalingClient::join_with(&url, &token, true).await {
                Ok(x) => break Some(x),
                Err(e) => {
                    tracing::warn!("reconnect attempt {attempt} failed: {e:#}");
                    if e.to_string().contains("join refused") || Instant::now() > deadline {
                        break None;
                    }
                }
            }
        };
        match rejoined {
            Some((c, joined)) => {
                client = c;
                if to_session.send(Sig::Rejoined(joined)).is_err() {
                    return;
                }
            }
            None => {
                let _ = to_session.send(Sig::Closed(format!(
                    "signaling connection lost and not regained: {lost}"
                )));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized() {
        assert_eq!(normalize_url("localhost:7880"), "ws://localhost:7880/ws");
        assert_eq!(normalize_url("http://h:1/"), "ws://h:1/ws");
        assert_eq!(normalize_url("https://h"), "wss://h/ws");
        assert_eq!(normalize_url("ws://h:1/ws"), "ws://h:1/ws");
        assert_eq!(normalize_url("wss://h/custom"), "wss://h/custom");
    }

    #[test]
    fn host_and_port_come_from_the_url() {
        assert_eq!(
            signaling_host("ws://127.0.0.1:7880/ws").unwrap(),
            ("127.0.0.1".into(), 7880)
        );
        assert_eq!(
            signaling_host("wss://example.org/ws").unwrap(),
            ("example.org".into(), 443)
        );
        assert_eq!(
            signaling_host("ws://[::1]:9/ws").unwrap(),
            ("::1".into(), 9)
        );
    }

    #[test]
    fn loss_generator_is_roughly_uniform() {
        let mut r = XorShift(42);
        let n = 100_000;
        let below = (0..n).filter(|_| r.next_f64() < 0.1).count();
        assert!((9_000..11_000).contains(&below), "{below}");
    }
}
