//! One simulated participant: joins through signaling with a real token, runs a real
//! WebRTC peer (str0m: ICE, DTLS-SRTP) on its own UDP socket, and either publishes
//! pre-encoded Opus at 50 packets/s or only listens. Subscribers count what arrives.
//!
//! One-way delay: each publisher appends a 12-byte stamp (`CLG\x01`, publisher index,
//! frame counter) to every Opus payload and writes the send time into a shared table
//! slot for that counter; a subscriber reads the stamp and looks the send time up.
//! Everything runs in one process, so both ends read the same clock. The stamped
//! payload is no longer valid Opus, which the SFU does not look at (enhanced audio is
//! off) and nobody here decodes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chorus_native::SignalingClient;
use chorus_protocol::client::{ClientMessage, ServerMessage};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

use crate::stats::Shared;

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
    /// Becomes true when the run is over: leave.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// A loopback UDP socket with a receive buffer big enough for bursts (a listener of
/// a busy room gets several streams' packets at once).
fn bind_socket() -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(1 << 20);
    s.set_nonblocking(true)?;
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    Ok(UdpSocket::from_std(s.into())?)
}

/// What one participant saw, returned when it ends.
#[derive(Debug, Default)]
pub struct PeerResult {
    pub identity: String,
    pub room: String,
    pub publisher: Option<u32>,
    /// Packets received per publisher index.
    pub per_publisher: HashMap<u32, u64>,
    pub lost: u64,
    pub jitter_ms: Vec<f64>,
    pub error: Option<String>,
}

struct RxStream {
    highest: Option<u64>,
    jitter: f64,
    last: Option<(Instant, u64)>,
}

pub async fn run(mut spec: PeerSpec, clip: Arc<Clip>, shared: Arc<Shared>) -> PeerResult {
    let mut result = PeerResult {
        publisher: spec.publisher,
        ..Default::default()
    };
    if let Err(e) = run_inner(&mut spec, &clip, &shared, &mut result).await {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        result.error = Some(format!("participant {}: {e:#}", spec.index));
    }
    result
}

async fn run_inner(
    spec: &mut PeerSpec,
    clip: &Clip,
    shared: &Shared,
    result: &mut PeerResult,
) -> anyhow::Result<()> {
    let (mut sig, joined) = SignalingClient::join(&spec.url, &spec.token).await?;
    let ServerMessage::Joined { me, room, .. } = joined else {
        bail!("unexpected join reply");
    };
    result.identity = me.identity;
    result.room = room;
    shared.joined.fetch_add(1, Ordering::Relaxed);

    let socket = bind_socket()?;
    let local = socket.local_addr()?;
    let mut rtc = Rtc::builder()
        .clear_codecs()
        .enable_opus(true, false)
        .set_reordering_size_audio(0)
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| anyhow!("{e}"))?);
    let mut api = rtc.sdp_api();
    let dir = if spec.publisher.is_some() {
        Direction::SendOnly
    } else {
        Direction::RecvOnly
    };
    let mic = api.add_media(MediaKind::Audio, dir, None, None, None);
    let (offer, pending) = api.apply().context("offer")?;
    let mut pending = Some(pending);
    sig.send(&ClientMessage::Offer {
        sdp: offer.to_sdp_string(),
    })
    .await?;

    let mut connected = false;
    let mut buf = vec![0u8; 2000];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut frame_no: u64 = 0;
    let mut rtp_ts: u32 = 0x1234_5678u32.wrapping_mul(spec.index as u32 + 1);
    let mut payload = Vec::with_capacity(1500);
    let mut pt = None;
    let mut streams: HashMap<Mid, RxStream> = HashMap::new();
    let phase = Duration::from_millis(spec.index as u64 * 370);

    loop {
        let deadline = loop {
            match rtc.poll_output()? {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = socket.try_send_to(&t.contents, t.destination);
                }
                Output::Event(Event::Connected) => {
                    connected = true;
                    shared.connected.fetch_add(1, Ordering::Relaxed);
                }
                Output::Event(Event::MediaData(d)) => {
                    let now = Instant::now();
                    shared.rx_packets.fetch_add(1, Ordering::Relaxed);
                    let data = &d.data;
                    if data.len() >= STAMP_LEN {
                        let s = &data[data.len() - STAMP_LEN..];
                        if s[..4] == MAGIC {
                            let publisher = u32::from_be_bytes([s[4], s[5], s[6], s[7]]);
                            let counter = u32::from_be_bytes([s[8], s[9], s[10], s[11]]);
                            *result.per_publisher.entry(publisher).or_default() += 1;
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
                    let seq = *d.seq_range.start();
                    let seq: u64 = *seq;
                    let st = streams.entry(d.mid).or_insert(RxStream {
                        highest: None,
                        jitter: 0.0,
                        last: None,
                    });
                    if let Some(h) = st.highest {
                        if seq > h + 1 {
                            let gap = seq - h - 1;
                            result.lost += gap;
                            shared.lost.fetch_add(gap, Ordering::Relaxed);
                        }
                    }
                    if st.highest.is_none_or(|h| seq > h) {
                        st.highest = Some(seq);
                    }
                    // RFC 3550 interarrival jitter, in ms.
                    let ts = d.time.numer();
                    if let Some((t0, ts0)) = st.last {
                        let arrival = now.duration_since(t0).as_secs_f64() * 1000.0;
                        let media = (ts as f64 - ts0 as f64) / 48.0;
                        st.jitter += ((arrival - media).abs() - st.jitter) / 16.0;
                    }
                    st.last = Some((now, ts));
                }
                Output::Event(_) => {}
            }
        };
        if *spec.stop.borrow() {
            break;
        }
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, source)) = r else { continue };
                let Ok(contents) = buf[..n].try_into() else { continue };
                let input = Input::Receive(Instant::now(), Receive {
                    proto: Protocol::Udp, source, destination: local, contents,
                });
                if rtc.accepts(&input) {
                    rtc.handle_input(input)?;
                }
            }
            m = sig.recv() => match m? {
                chorus_native::Incoming::Message(ServerMessage::Answer { sdp }) => {
                    let answer = SdpAnswer::from_sdp_string(&sdp)?;
                    let p = pending.take().ok_or_else(|| anyhow!("answer without offer"))?;
                    rtc.sdp_api().accept_answer(p, answer)?;
                }
                chorus_native::Incoming::Message(ServerMessage::Offer { sdp }) => {
                    let offer = SdpOffer::from_sdp_string(&sdp)?;
                    let answer = rtc.sdp_api().accept_offer(offer)?;
                    sig.send(&ClientMessage::Answer { sdp: answer.to_sdp_string() }).await?;
                }
                chorus_native::Incoming::Message(ServerMessage::Error { code, message }) => {
                    bail!("server error {}: {message}", code.as_str());
                }
                chorus_native::Incoming::Message(ServerMessage::Left { reason }) => {
                    bail!("server ended the session: {reason}");
                }
                chorus_native::Incoming::Message(_) => {}
                chorus_native::Incoming::Closed(c) => bail!("signaling closed: {c:?}"),
            },
            _ = tick.tick(), if spec.publisher.is_some() && connected => {
                let publisher = spec.publisher.unwrap_or(0);
                let talking = match spec.talk {
                    Talk::Continuous => true,
                    Talk::Pattern { on, off } => {
                        let cycle = (on + off).as_millis().max(1) as u64;
                        let t = (frame_no * 20 + phase.as_millis() as u64) % cycle;
                        t < on.as_millis() as u64
                    }
                };
                let (opus, level) = &clip.frames[(frame_no as usize) % clip.frames.len()];
                frame_no += 1;
                let ts = rtp_ts;
                rtp_ts = rtp_ts.wrapping_add(960);
                if !talking {
                    continue;
                }
                if pt.is_none() {
                    pt = rtc.writer(mic).and_then(|w| {
                        w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt())
                    });
                }
                let Some(pt) = pt else { continue };
                let counter = frame_no as u32;
                payload.clear();
                payload.extend_from_slice(opus);
                payload.extend_from_slice(&MAGIC);
                payload.extend_from_slice(&publisher.to_be_bytes());
                payload.extend_from_slice(&counter.to_be_bytes());
                let now = Instant::now();
                shared.stamp(publisher, counter, now);
                if let Some(w) = rtc.writer(mic) {
                    let level = -(*level.min(&127) as i8);
                    if w.audio_level(level, true)
                        .write(pt, now, MediaTime::new(u64::from(ts), Frequency::FORTY_EIGHT_KHZ), payload.as_slice())
                        .is_ok()
                    {
                        shared.tx_packets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                rtc.handle_input(Input::Timeout(Instant::now()))?;
            }
            _ = spec.stop.changed() => break,
        }
    }
    result.jitter_ms = streams.values().map(|s| s.jitter).collect();
    let _ = sig.send(&ClientMessage::Leave).await;
    sig.close().await;
    if !connected {
        bail!("media never connected");
    }
    Ok(())
}
