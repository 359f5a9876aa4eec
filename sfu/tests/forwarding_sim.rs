//! Drives the SFU worker core with real str0m peers over a simulated network and a
//! simulated clock: ICE, DTLS-SRTP, SDP renegotiation and RTP forwarding all run for
//! real, only the sockets and the clock are ours.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chorus_protocol::control::{FromNode, ToNode};
use chorus_sfu::worker::Worker;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc};

struct Client {
    id: u64,
    addr: SocketAddr,
    rtc: Rtc,
    mic: Option<Mid>,
    pending: Option<SdpPendingOffer>,
    connected: bool,
    /// (ssrc, seq, audio level) of every RTP packet received, and its payload.
    received: Vec<(u32, u16, Option<i8>)>,
    payloads: Vec<Vec<u8>>,
    /// (ssrc, seq) of every SRTP datagram the SFU sent to this client.
    wire: Vec<(u32, u16)>,
    /// Data channels by label, once open, and text received on them.
    channels: Vec<(ChannelId, String)>,
    channel_in: Vec<(String, String)>,
    next_seq: u64,
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

impl Client {
    fn new(id: u64, now: Instant) -> Self {
        let addr: SocketAddr = format!("10.0.0.{id}:4000").parse().unwrap();
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        Client {
            id,
            addr,
            rtc,
            mic: None,
            pending: None,
            connected: false,
            received: Vec::new(),
            payloads: Vec::new(),
            wire: Vec::new(),
            channels: Vec::new(),
            channel_in: Vec::new(),
            next_seq: 1,
        }
    }

    fn offer(&mut self) -> String {
        let mut api = self.rtc.sdp_api();
        self.mic = Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
        api.add_channel("chat".into());
        api.add_channel_with_config(ChannelConfig {
            label: "signal".into(),
            ordered: false,
            reliability: Reliability::MaxRetransmits { retransmits: 0 },
            ..Default::default()
        });
        let (offer, pending) = api.apply().unwrap();
        self.pending = Some(pending);
        offer.to_sdp_string()
    }

    /// One 20 ms frame of (fake) Opus at RFC 6464 `level`.
    fn send_audio(&mut self, now: Instant, frame: u32, level: i8) {
        self.send_payload(now, frame, &[0xfc, 0xff, 0xfe], level);
    }
}

struct Sim {
    now: Instant,
    worker: Worker,
    sfu_addr: SocketAddr,
    clients: Vec<Client>,
    speaking: Vec<(u64, bool)>,
    chat_ready: Vec<u64>,
    chat_in: Vec<(u64, String)>,
    dominant: Vec<Option<u64>>,
    start: Instant,
}

impl Sim {
    fn new() -> Self {
        let sfu_addr: SocketAddr = "10.0.0.100:7882".parse().unwrap();
        let now = Instant::now();
        Sim {
            start: now,
            now,
            worker: Worker::new(sfu_addr, vec![sfu_addr]),
            sfu_addr,
            clients: Vec::new(),
            speaking: Vec::new(),
            chat_ready: Vec::new(),
            chat_in: Vec::new(),
            dominant: Vec::new(),
        }
    }

    fn join(&mut self, id: u64) {
        self.worker.handle_command(
            self.now,
            ToNode::AddParticipant {
                participant: id,
                room: "room".into(),
                identity: format!("user{id}"),
                name: format!("User {id}"),
                publish: true,
                subscribe: true,
                video: false,
            },
        );
        let mut c = Client::new(id, self.now);
        let sdp = c.offer();
        self.clients.push(c);
        self.worker.handle_command(
            self.now,
            ToNode::ClientOffer {
                participant: id,
                sdp,
                tracks: Vec::new(),
            },
        );
        self.pump();
    }

    fn client(&mut self, id: u64) -> &mut Client {
        self.clients.iter_mut().find(|c| c.id == id).unwrap()
    }

    /// Moves everything that is ready to move, without advancing time.
    fn pump(&mut self) {
        for _ in 0..50 {
            let mut moved = false;
            let now = self.now;
            // Clients → SFU.
            for i in 0..self.clients.len() {
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
                            c.payloads.push(p.payload.to_vec());
                            c.received.push((
                                *p.header.ssrc,
                                p.header.sequence_number,
                                p.header.ext_vals.audio_level,
                            ))
                        }
                        Output::Event(Event::ChannelOpen(id, label)) => {
                            c.channels.push((id, label))
                        }
                        Output::Event(Event::ChannelData(d)) => {
                            let label = c
                                .channels
                                .iter()
                                .find(|(id, _)| *id == d.id)
                                .map(|(_, l)| l.clone());
                            c.channel_in.push((
                                label.unwrap_or_default(),
                                String::from_utf8_lossy(&d.data).into_owned(),
                            ));
                        }
                        Output::Event(_) => {}
                        Output::Timeout(_) => break,
                    }
                }
            }
            // SFU → clients.
            let transmits: Vec<_> = self.worker.take_transmits().collect();
            for t in transmits {
                moved = true;
                let sfu = self.sfu_addr;
                if let Some(c) = self.clients.iter_mut().find(|c| c.addr == t.destination) {
                    // SRTP leaves the RTP header in the clear: record what the SFU put
                    // on the wire, independent of how the receiving stack reports it.
                    if let Some(h) = rtp_header(&t.contents) {
                        c.wire.push(h);
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
                }
            }
            // Control events (what signaling would relay).
            let events: Vec<_> = self.worker.take_events().collect();
            for ev in events {
                moved = true;
                match ev {
                    FromNode::Answer { participant, sdp } => {
                        let c = self.client(participant);
                        let pending = c.pending.take().expect("an offer was pending");
                        c.rtc
                            .sdp_api()
                            .accept_answer(pending, SdpAnswer::from_sdp_string(&sdp).unwrap())
                            .unwrap();
                    }
                    FromNode::Offer { participant, sdp } => {
                        let c = self.client(participant);
                        let answer = c
                            .rtc
                            .sdp_api()
                            .accept_offer(SdpOffer::from_sdp_string(&sdp).unwrap())
                            .unwrap();
                        let sdp = answer.to_sdp_string();
                        self.worker
                            .handle_command(now, ToNode::ClientAnswer { participant, sdp });
                    }
                    FromNode::Speaking {
                        participant,
                        speaking,
                    } => self.speaking.push((participant, speaking)),
                    FromNode::ChatReady { participant } => self.chat_ready.push(participant),
                    FromNode::Dominant { participant, .. } => self.dominant.push(participant),
                    FromNode::ChatIn { participant, data } => {
                        self.chat_in.push((participant, data))
                    }
                    FromNode::Error { message, .. } => panic!("unexpected error event: {message}"),
                    _ => {}
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Advances time by `ms` in 1 ms steps; every 20 ms the given clients talk.
    fn run(&mut self, ms: u64, talkers: &[(u64, i8)]) {
        for _ in 0..ms {
            self.now += Duration::from_millis(1);
            let now = self.now;
            if let Some(f) = self.frame() {
                for (id, level) in talkers {
                    let c = self.client(*id);
                    if c.connected {
                        c.send_audio(now, f, *level);
                    }
                }
            }
            for c in &mut self.clients {
                c.rtc.handle_input(Input::Timeout(now)).unwrap();
            }
            if self.worker.next_deadline(now) <= now {
                self.worker.handle_timeout(now);
            }
            self.pump();
        }
    }

    /// Every 20 ms of simulated time a frame is due; returns its index.
    fn frame(&self) -> Option<u32> {
        let t = self.now.saturating_duration_since(self.start).as_millis() as u64;
        t.is_multiple_of(20).then_some((t / 20) as u32)
    }
}

fn assert_consecutive(received: &[(u32, u16, Option<i8>)]) {
    assert!(!received.is_empty());
    let ssrc = received[0].0;
    for w in received.windows(2) {
        assert_eq!(w[0].0, ssrc, "one outgoing SSRC per track");
        assert_eq!(
            w[1].1,
            w[0].1.wrapping_add(1),
            "sequence gap between {:?} and {:?}",
            w[0],
            w[1]
        );
    }
}

#[test]
fn audio_is_forwarded_both_ways_with_continuous_numbering() {
    let mut sim = Sim::new();
    sim.join(1);
    sim.run(300, &[]);
    sim.join(2);
    sim.run(500, &[]);
    assert!(
        sim.client(1).connected && sim.client(2).connected,
        "both peers connect"
    );

    sim.run(1000, &[(1, -20), (2, -30)]);
    let got_by_2 = sim.client(2).received.clone();
    let got_by_1 = sim.client(1).received.clone();
    assert!(
        got_by_2.len() >= 45,
        "client 2 received {} of ~50 packets",
        got_by_2.len()
    );
    assert!(
        got_by_1.len() >= 45,
        "client 1 received {} of ~50 packets",
        got_by_1.len()
    );
    assert_consecutive(&got_by_2);
    assert_consecutive(&got_by_1);
    // The RFC 6464 level is passed through to subscribers.
    assert_eq!(got_by_2.last().unwrap().2, Some(-20));

    // Both talked loudly for a second: both are speaking.
    assert!(sim.speaking.contains(&(1, true)), "{:?}", sim.speaking);
    assert!(sim.speaking.contains(&(2, true)), "{:?}", sim.speaking);

    // Client 1 goes quiet: it stops speaking after the hangover, client 2 does not.
    sim.run(1500, &[(1, -127), (2, -30)]);
    assert_eq!(sim.speaking.iter().rfind(|e| e.0 == 1), Some(&(1, false)));
    assert_eq!(sim.speaking.iter().rfind(|e| e.0 == 2), Some(&(2, true)));
}

#[test]
fn mute_stops_forwarding_and_unmute_resumes_without_a_sequence_gap() {
    let mut sim = Sim::new();
    sim.join(1);
    sim.join(2);
    sim.run(800, &[]);
    sim.run(500, &[(1, -20)]);
    let before = sim.client(2).received.len();
    assert!(before >= 20);

    sim.worker.handle_command(
        sim.now,
        ToNode::SetMuted {
            participant: 1,
            muted: true,
        },
    );
    sim.run(500, &[(1, -20)]);
    let during = sim.client(2).received.len() - before;
    assert!(during <= 1, "{during} packets leaked through mute");
    assert!(
        sim.speaking.contains(&(1, false)),
        "muting ends speaking: {:?}",
        sim.speaking
    );

    sim.worker.handle_command(
        sim.now,
        ToNode::SetMuted {
            participant: 1,
            muted: false,
        },
    );
    sim.run(500, &[(1, -20)]);
    let got = sim.client(2).received.clone();
    assert!(got.len() >= before + 20);
    assert_consecutive(&got);
}

#[test]
fn a_third_joiner_is_sent_every_publisher_and_a_leaver_is_renegotiated_away() {
    let mut sim = Sim::new();
    sim.join(1);
    sim.join(2);
    sim.run(800, &[]);
    sim.join(3);
    sim.run(800, &[]);
    sim.run(600, &[(1, -20), (2, -20)]);
    // Client 3 is sent both publishers' streams, each continuously numbered.
    let wire = sim.client(3).wire.clone();
    let mut by_ssrc: std::collections::HashMap<u32, Vec<u16>> = Default::default();
    for (ssrc, seq) in wire {
        by_ssrc.entry(ssrc).or_default().push(seq);
    }
    let streams: Vec<&Vec<u16>> = by_ssrc.values().filter(|v| v.len() >= 25).collect();
    assert_eq!(
        streams.len(),
        2,
        "client 3 is sent both publishers: {by_ssrc:?}"
    );
    for seqs in streams {
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0].wrapping_add(1), "gap in {seqs:?}");
        }
    }

    sim.worker
        .handle_command(sim.now, ToNode::RemoveParticipant { participant: 1 });
    sim.run(300, &[(2, -20)]);
    assert_eq!(sim.worker.participant_count(), 2);
    // No error events were raised by the renegotiation (Sim panics on errors).
}

impl Client {
    fn write_channel(&mut self, label: &str, binary: bool, data: &[u8]) {
        let id = self
            .channels
            .iter()
            .find(|(_, l)| l == label)
            .map(|(id, _)| *id)
            .expect("channel open");
        self.rtc.channel(id).unwrap().write(binary, data).unwrap();
    }
}

#[test]
fn chat_and_signal_channels_are_relayed() {
    let mut sim = Sim::new();
    sim.join(1);
    sim.join(2);
    sim.run(1000, &[]);
    assert_eq!(
        {
            let mut r = sim.chat_ready.clone();
            r.sort();
            r
        },
        vec![1, 2],
        "both chat channels open"
    );

    // Client → node: text frames go to signaling unparsed.
    sim.client(1)
        .write_channel("chat", false, br#"{"type":"send","text":"hi"}"#);
    sim.run(50, &[]);
    assert_eq!(
        sim.chat_in,
        vec![(1, r#"{"type":"send","text":"hi"}"#.to_string())]
    );

    // Binary frames are answered by the node itself and never reach signaling.
    sim.client(1)
        .write_channel("chat", true, &[0, 159, 146, 150]);
    sim.run(50, &[]);
    assert_eq!(sim.chat_in.len(), 1);
    let err = sim
        .client(1)
        .channel_in
        .iter()
        .find(|(l, t)| l == "chat" && t.contains("chat_invalid"))
        .cloned();
    assert!(
        err.is_some(),
        "binary frame got an error: {:?}",
        sim.client(1).channel_in
    );

    // Node → clients: signaling's frames are written on the chat channel.
    let now = sim.now;
    sim.worker.handle_command(
        now,
        ToNode::ChatTo {
            participants: vec![1, 2],
            data: r#"{"type":"deleted","id":1}"#.into(),
        },
    );
    sim.run(50, &[]);
    for id in [1, 2] {
        assert!(sim
            .client(id)
            .channel_in
            .iter()
            .any(|(l, t)| l == "chat" && t.contains("deleted")));
    }

    // Typing signals are stamped with the sender and relayed to the others.
    sim.client(2)
        .write_channel("signal", false, br#"{"type":"typing","typing":true}"#);
    sim.run(50, &[]);
    let typing = sim
        .client(1)
        .channel_in
        .iter()
        .find(|(l, _)| l == "signal")
        .cloned();
    let (_, text) = typing.expect("client 1 got the typing signal");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["from"]["identity"], "user2");
    assert_eq!(v["typing"], true);
    assert!(
        sim.client(2).channel_in.iter().all(|(l, _)| l != "signal"),
        "not echoed to the sender"
    );
}

/// Packets per SSRC in `wire[from..]`, largest first, checking each stream has no gap.
fn streams_since(wire: &[(u32, u16)], from: usize) -> Vec<usize> {
    let mut by_ssrc: std::collections::HashMap<u32, Vec<u16>> = Default::default();
    for (ssrc, seq) in &wire[from..] {
        by_ssrc.entry(*ssrc).or_default().push(*seq);
    }
    let mut counts: Vec<usize> = by_ssrc.values().map(|v| v.len()).collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    counts
}

fn assert_no_gaps(wire: &[(u32, u16)]) {
    let mut last: std::collections::HashMap<u32, u16> = Default::default();
    for (ssrc, seq) in wire {
        if let Some(prev) = last.insert(*ssrc, *seq) {
            assert_eq!(
                *seq,
                prev.wrapping_add(1),
                "sequence gap on ssrc {ssrc}: {prev} -> {seq}"
            );
        }
    }
}

#[test]
fn big_rooms_forward_only_the_loudest_speakers_without_sequence_gaps() {
    let mut sim = Sim::new();
    for id in 1..=10 {
        sim.join(id);
        sim.run(100, &[]);
    }
    sim.run(1000, &[]);
    assert!(sim.clients.iter().all(|c| c.connected));
    let silent = |ids: &[u64]| -> Vec<(u64, i8)> {
        (1..=10)
            .filter(|i| !ids.contains(i))
            .map(|i| (i, -127))
            .collect()
    };

    // Two people talk, eight send silence: the listener is sent only the two.
    let mark = sim.client(10).wire.len();
    let mut talk = vec![(1, -20), (2, -25)];
    talk.extend(silent(&[1, 2]));
    sim.run(1500, &talk);
    let counts = streams_since(&sim.client(10).wire, mark);
    assert_eq!(
        counts.len(),
        2,
        "only the two talkers are forwarded: {counts:?}"
    );
    assert!(counts.iter().all(|c| *c >= 60), "{counts:?}");

    // Speaker 1 pauses past the hangover, then talks again: its stream resumes with
    // no sequence gap.
    let mut talk = vec![(2, -25)];
    talk.extend(silent(&[2]));
    sim.run(1500, &talk);
    let mut talk = vec![(1, -20), (2, -25)];
    talk.extend(silent(&[1, 2]));
    sim.run(1000, &talk);

    // Four talk at once: only the three loudest get through (the fourth at most for
    // the few packets before the detector ranks it).
    let mark = sim.client(10).wire.len();
    let mut talk = vec![(1, -20), (2, -25), (3, -30), (4, -45)];
    talk.extend(silent(&[1, 2, 3, 4]));
    sim.run(1500, &talk);
    let counts = streams_since(&sim.client(10).wire, mark);
    assert!(counts.len() <= 4, "{counts:?}");
    assert!(
        counts[..3].iter().all(|c| *c >= 60),
        "three speakers forwarded: {counts:?}"
    );
    assert!(
        counts.get(3).is_none_or(|c| *c <= 6),
        "the fourth is held back: {counts:?}"
    );

    assert_no_gaps(&sim.client(10).wire);
}

#[test]
fn small_rooms_forward_everyone_even_when_silent() {
    let mut sim = Sim::new();
    for id in 1..=3 {
        sim.join(id);
    }
    sim.run(1000, &[]);
    let mark = sim.client(3).wire.len();
    sim.run(1000, &[(1, -20), (2, -127)]);
    let counts = streams_since(&sim.client(3).wire, mark);
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.iter().all(|c| *c >= 45), "{counts:?}");
}

impl Client {
    fn send_payload(&mut self, now: Instant, frame: u32, payload: &[u8], level: i8) {
        let Some(mid) = self.mic else { return };
        let pt = self
            .rtc
            .codec_config()
            .iter()
            .find(|p| p.spec().codec == Codec::Opus)
            .unwrap()
            .pt();
        let seq = self.next_seq;
        self.next_seq += 1;
        let ext = ExtensionValues {
            audio_level: Some(level),
            voice_activity: Some(level > -50),
            ..Default::default()
        };
        if let Some(tx) = self.rtc.direct_api().stream_tx_by_mid(mid, None) {
            tx.write_rtp(
                RtpWrite::new(pt, seq.into(), frame * 960, now, payload.to_vec()).ext_vals(ext),
            );
        }
    }
}

fn read_fixture(name: &str) -> Vec<i16> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../media-core/fixtures")
        .join(name);
    let mut r = hound::WavReader::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    r.samples::<i16>().map(|s| s.unwrap()).collect()
}

/// Estimated SNR (dB) of a signal from the labelled speech/silence segments of the
/// fixture (`speech.labels`): speech-segment power over silence-segment power, with
/// 60 ms trimmed at each boundary so codec and denoiser delay do not blur them.
fn labelled_snr(x: &[i16]) -> f64 {
    let labels = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../media-core/fixtures/speech.labels"),
    )
    .unwrap();
    let speech: Vec<(f64, f64)> = labels
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(|v| v.parse::<f64>().ok());
            Some((it.next()??, it.next()??))
        })
        .collect();
    let end = x.len() as f64 / 48_000.0;
    let mut silence = Vec::new();
    for w in speech.windows(2) {
        silence.push((w[0].1, w[1].0));
    }
    if let Some(last) = speech.last() {
        silence.push((last.1, end));
    }
    let power = |segs: &[(f64, f64)]| {
        let (mut sum, mut n) = (0.0, 0usize);
        for &(a, b) in segs {
            let (a, b) = (
                ((a + 0.06) * 48_000.0) as usize,
                (((b - 0.06) * 48_000.0) as usize).min(x.len()),
            );
            for &v in x.get(a..b).unwrap_or_default() {
                sum += (v as f64).powi(2);
                n += 1;
            }
        }
        sum / n.max(1) as f64
    };
    let (ps, pn) = (power(&speech), power(&silence));
    10.0 * ((ps - pn).max(1e-9) / pn.max(1e-9)).log10()
}

/// Publishes the speech fixture mixed with `noise` at `snr_db` through an enhanced
/// publisher; returns the estimated SNR of the plain and the enhanced stream (both
/// decoded, after checking the enhanced one decodes cleanly and was re-encoded).
fn enhanced_through_sfu(noise_name: &str, snr_db: f64) -> (f64, f64) {
    use chorus_media_core::opus::{EncoderConfig, OpusDecoder, OpusEncoder};

    let clean = read_fixture("speech.wav");
    let noise = read_fixture(&format!("noise-{noise_name}.wav"));
    let frames = clean.len() / 960;
    let clean = &clean[..frames * 960];
    let pc: f64 = clean.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / clean.len() as f64;
    let pn: f64 = noise.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / noise.len() as f64;
    let k = (pc / pn / 10f64.powf(snr_db / 10.0)).sqrt();
    let noisy: Vec<i16> = clean
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            (s as f64 + k * noise[i % noise.len()] as f64).clamp(-32768.0, 32767.0) as i16
        })
        .collect();
    let mut enc = OpusEncoder::new(EncoderConfig::default()).unwrap();
    let mut buf = vec![0u8; 1500];
    let packets: Vec<Vec<u8>> = noisy
        .chunks_exact(960)
        .map(|f| {
            let n = enc.encode(f, &mut buf).unwrap();
            buf[..n].to_vec()
        })
        .collect();

    let mut sim = Sim::new();
    sim.join(1);
    sim.join(2);
    sim.run(1000, &[]);
    sim.worker.handle_command(
        sim.now,
        ToNode::SetEnhanced {
            participant: 1,
            enabled: true,
        },
    );
    let mark = sim.client(2).received.len();
    let mut payloads_in: Vec<Vec<u8>> = Vec::new();
    for (i, pkt) in packets.iter().enumerate() {
        let now = sim.now;
        sim.client(1).send_payload(now, i as u32, pkt, -30);
        payloads_in.push(pkt.clone());
        sim.run(20, &[]);
    }
    sim.run(200, &[]);
    let got = sim.client(2).received.len() - mark;
    assert!(got >= frames - 2, "received {got} of {frames}");
    let payloads = sim.client(2).payloads[mark..].to_vec();

    let decode = |ps: &[Vec<u8>]| -> Vec<i16> {
        let mut dec = OpusDecoder::new().unwrap();
        let mut out = Vec::new();
        let mut pcm = vec![0i16; 960];
        for p in ps {
            dec.decode(p, &mut pcm)
                .expect("enhanced output decodes cleanly");
            out.extend_from_slice(&pcm);
        }
        out
    };
    let passthrough = decode(&payloads_in);
    let enhanced = decode(&payloads);
    assert_ne!(
        payloads,
        payloads_in[..payloads.len()].to_vec(),
        "the payload was re-encoded"
    );
    let snr_in = labelled_snr(&passthrough);
    let snr_out = labelled_snr(&enhanced);
    eprintln!(
        "{noise_name} noise: estimated SNR through the codec: {snr_in:.1} dB plain, {snr_out:.1} dB enhanced"
    );
    (snr_in, snr_out)
}

#[test]
fn enhanced_audio_is_denoised_once_per_publisher_and_decodes_cleanly() {
    let (snr_in, snr_out) = enhanced_through_sfu("white", 5.0);
    assert!(
        snr_out > snr_in + 6.0,
        "enhanced {snr_out:.1} dB vs plain {snr_in:.1} dB"
    );
}

#[test]
fn enhanced_audio_lowers_babble_between_sentences() {
    // RNNoise keeps babble (it is speech); the gate after the VAD lowers it in the
    // pauses. Measured: 12.7 dB plain, 14.7 dB denoised only, 22.6 dB with the gate.
    let (snr_in, snr_out) = enhanced_through_sfu("babble", 10.0);
    assert!(
        snr_out > snr_in + 5.0,
        "enhanced {snr_out:.1} dB vs plain {snr_in:.1} dB"
    );
}

#[test]
fn the_dominant_speaker_is_reported_per_room() {
    let mut sim = Sim::new();
    sim.join(1);
    sim.join(2);
    sim.run(1000, &[]);
    sim.run(1000, &[(1, -30), (2, -127)]);
    assert_eq!(sim.dominant.last(), Some(&Some(1)), "{:?}", sim.dominant);
    // Participant 2 talks much louder while 1 carries on: 2 takes over.
    sim.run(1500, &[(1, -30), (2, -10)]);
    assert_eq!(sim.dominant.last(), Some(&Some(2)), "{:?}", sim.dominant);
}
