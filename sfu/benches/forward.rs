//! Micro-benchmarks of the SFU worker core (no sockets): forwarding one publisher's
//! SRTP packet to N subscribers (str0m decrypt, speaker detection, rewrite, encrypt
//! per subscriber), demuxing a datagram, and a speaker-detector update. Allocations per
//! forwarded packet are counted with a counting global allocator and printed.
//!
//! `cargo bench -p chorus-sfu --bench forward`

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chorus_media_core::speaker::{SpeakerConfig, SpeakerDetector};
use chorus_protocol::control::{FromNode, ToNode};
use chorus_sfu::worker::Worker;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Bytes currently allocated (for the memory-per-participant figure).
static LIVE: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(l.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(n as u64, Ordering::Relaxed);
        LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Peer {
    id: u64,
    addr: SocketAddr,
    rtc: Rtc,
    mic: Option<Mid>,
    /// A single-layer VP8 camera (the video benchmark's publisher).
    cam: Option<Mid>,
    pending: Option<SdpPendingOffer>,
    connected: bool,
}

/// A worker with one room of peers, all connected.
struct Room {
    worker: Worker,
    sfu: SocketAddr,
    peers: Vec<Peer>,
    now: Instant,
}

impl Room {
    /// One publisher and `subscribers` listeners.
    fn new(subscribers: usize) -> Room {
        Room::with_publishers(subscribers + 1, 1)
    }

    /// `total` peers of which the first `publishers` publish (all subscribe).
    fn with_publishers(total: usize, publishers: usize) -> Room {
        Room::build(total, publishers, false)
    }

    /// One publisher of a VP8 camera and `subscribers` video subscribers, already
    /// forwarding (the forwarders start at the first keyframe, packet 600 here).
    fn video(subscribers: usize) -> Room {
        let mut room = Room::build(subscribers + 1, 1, true);
        let from = room.peers[0].addr;
        for d in room.video_datagrams(0, 400, 500) {
            let t = room.now;
            room.worker.handle_datagram(t, from, &d);
            room.worker.take_transmits().for_each(drop);
        }
        room.run(Duration::from_millis(20));
        room
    }

    fn build(total: usize, publishers: usize, video: bool) -> Room {
        let sfu: SocketAddr = "10.0.0.1:7882".parse().unwrap();
        let now = Instant::now();
        // This measures the forwarding path: no bandwidth estimation (whose pacer would
        // hold packets for timers this loop does not run) and an estimate no stream
        // fits under, since the bench's clock runs a million packets a second.
        let config = chorus_sfu::WorkerConfig {
            bandwidth_estimation: false,
            initial_estimate_bps: 1_000_000_000_000,
            ..Default::default()
        };
        let mut room = Room {
            worker: Worker::with_config(sfu, vec![sfu], config),
            sfu,
            peers: Vec::new(),
            now,
        };
        for id in 1..=(total as u64) {
            room.join(id, id <= publishers as u64, video);
            room.run(Duration::from_millis(100));
        }
        room.run(Duration::from_millis(500));
        assert!(room.peers.iter().all(|p| p.connected), "all peers connect");
        room
    }

    fn join(&mut self, id: u64, publish: bool, video: bool) {
        self.worker.handle_command(
            self.now,
            ToNode::AddParticipant {
                participant: id,
                room: "bench".into(),
                identity: format!("u{id}"),
                name: format!("U{id}"),
                publish,
                subscribe: true,
                video,
            },
        );
        let addr: SocketAddr = format!("10.1.{}.{}:4000", id / 250, id % 250 + 1)
            .parse()
            .unwrap();
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(video)
            .build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut api = rtc.sdp_api();
        let dir = if publish {
            Direction::SendOnly
        } else {
            Direction::RecvOnly
        };
        let mid = api.add_media(MediaKind::Audio, dir, None, None, None);
        let cam = (video && publish)
            .then(|| api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None));
        let (offer, pending) = api.apply().unwrap();
        self.peers.push(Peer {
            id,
            addr,
            rtc,
            mic: publish.then_some(mid),
            cam,
            pending: Some(pending),
            connected: false,
        });
        self.worker.handle_command(
            self.now,
            ToNode::ClientOffer {
                participant: id,
                sdp: offer.to_sdp_string(),
                tracks: Vec::new(),
            },
        );
    }

    fn pump(&mut self) {
        let now = self.now;
        for _ in 0..50 {
            let mut moved = false;
            for p in &mut self.peers {
                loop {
                    match p.rtc.poll_output().unwrap() {
                        Output::Transmit(t) => {
                            self.worker.handle_datagram(now, p.addr, &t.contents);
                            moved = true;
                        }
                        Output::Event(Event::Connected) => p.connected = true,
                        Output::Event(_) => {}
                        Output::Timeout(_) => break,
                    }
                }
            }
            let out: Vec<_> = self.worker.take_transmits().collect();
            for t in out {
                moved = true;
                if let Some(p) = self.peers.iter_mut().find(|p| p.addr == t.destination) {
                    let input = Input::Receive(
                        now,
                        Receive {
                            proto: Protocol::Udp,
                            source: self.sfu,
                            destination: p.addr,
                            contents: t.contents.as_slice().try_into().unwrap(),
                        },
                    );
                    let _ = p.rtc.handle_input(input);
                }
            }
            let events: Vec<_> = self.worker.take_events().collect();
            for ev in events {
                moved = true;
                match ev {
                    FromNode::Answer { participant, sdp } => {
                        let p = self.peers.iter_mut().find(|p| p.id == participant).unwrap();
                        let pending = p.pending.take().unwrap();
                        p.rtc
                            .sdp_api()
                            .accept_answer(pending, SdpAnswer::from_sdp_string(&sdp).unwrap())
                            .unwrap();
                    }
                    FromNode::Offer { participant, sdp } => {
                        let p = self.peers.iter_mut().find(|p| p.id == participant).unwrap();
                        let answer = p
                            .rtc
                            .sdp_api()
                            .accept_offer(SdpOffer::from_sdp_string(&sdp).unwrap())
                            .unwrap();
                        self.worker.handle_command(
                            now,
                            ToNode::ClientAnswer {
                                participant,
                                sdp: answer.to_sdp_string(),
                            },
                        );
                    }
                    _ => {}
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(5);
            let now = self.now;
            for p in &mut self.peers {
                let _ = p.rtc.handle_input(Input::Timeout(now));
            }
            if self.worker.next_deadline(now) <= now {
                self.worker.handle_timeout(now);
            }
            self.pump();
        }
    }

    /// `n` SRTP datagrams from publisher `k` (peer index), 1 µs of simulated time
    /// apart (no timers fire while they are fed).
    fn publisher_datagrams(&mut self, k: usize, n: usize, first_seq: u64) -> Vec<Vec<u8>> {
        self.datagrams(k, n, first_seq, false)
    }

    /// Like [`Room::publisher_datagrams`], from the publisher's camera: VP8 packets of a
    /// typical 1.5 Mb/s stream's size (1100 bytes), 15-bit picture id, a keyframe every
    /// 300 packets, four packets per frame.
    fn video_datagrams(&mut self, k: usize, n: usize, first_seq: u64) -> Vec<Vec<u8>> {
        self.datagrams(k, n, first_seq, true)
    }

    fn datagrams(&mut self, k: usize, n: usize, first_seq: u64, video: bool) -> Vec<Vec<u8>> {
        let p = &mut self.peers[k];
        let (mid, codec) = if video {
            (p.cam.unwrap(), Codec::Vp8)
        } else {
            (p.mic.unwrap(), Codec::Opus)
        };
        let pt = p
            .rtc
            .codec_config()
            .iter()
            .find(|c| c.spec().codec == codec)
            .unwrap()
            .pt();
        let audio_payload = vec![0x78u8; 80]; // a typical 32 kb/s Opus frame size
        let mut out = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let now = self.now + Duration::from_micros(i);
            let seq = first_seq + i;
            let write = if video {
                let frame = seq / 4;
                let start = seq.is_multiple_of(4);
                let key = seq.is_multiple_of(300);
                let pid = (frame % (1 << 15)) as u16;
                let mut payload = vec![0u8; 1100];
                payload[..7].copy_from_slice(&[
                    if start { 0x90 } else { 0x80 },
                    0xe0,
                    0x80 | (pid >> 8) as u8,
                    pid as u8,
                    frame as u8,
                    0x20,
                    if key { 0x00 } else { 0x01 },
                ]);
                RtpWrite::new(pt, seq.into(), (frame * 3000) as u32, now, payload)
                    .marker(seq % 4 == 3)
                    .nackable(true)
            } else {
                let ext = ExtensionValues {
                    audio_level: Some(-30),
                    voice_activity: Some(true),
                    ..Default::default()
                };
                RtpWrite::new(
                    pt,
                    seq.into(),
                    (seq * 960) as u32,
                    now,
                    audio_payload.clone(),
                )
                .ext_vals(ext)
            };
            if let Some(tx) = p.rtc.direct_api().stream_tx_by_mid(mid, None) {
                tx.write_rtp(write);
            }
            // str0m sends queued RTP when it handles time.
            let _ = p.rtc.handle_input(Input::Timeout(now));
            loop {
                match p.rtc.poll_output().unwrap() {
                    Output::Transmit(t) => {
                        if t.contents.len() > 50 {
                            out.push(t.contents.to_vec());
                        }
                    }
                    Output::Event(_) => {}
                    Output::Timeout(_) => break,
                }
            }
        }
        out
    }
}

fn forward(c: &mut Criterion) {
    forward_kind(c, false);
    forward_kind(c, true);
}

/// One publisher packet (audio, or VP8 video) to N subscribers, per packet in.
fn forward_kind(c: &mut Criterion, video: bool) {
    let mut g = c.benchmark_group(if video {
        "forward_one_video_packet"
    } else {
        "forward_one_packet"
    });
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_millis(500));
    for subs in [1usize, 4, 20] {
        let mut room = if video {
            Room::video(subs)
        } else {
            Room::new(subs)
        };
        let mut seq = 1_000u64;
        let mut reported = false;
        if video {
            eprintln!("  (video: a keyframe every 300 packets, 4 packets of 1100 bytes per frame)");
        }
        g.throughput(Throughput::Elements(subs as u64));
        g.bench_with_input(BenchmarkId::from_parameter(subs), &subs, |b, _| {
            b.iter_custom(|iters| {
                let packets = if video {
                    room.video_datagrams(0, iters as usize, seq)
                } else {
                    room.publisher_datagrams(0, iters as usize, seq)
                };
                seq += iters;
                let from = room.peers[0].addr;
                let base = room.now;
                let a0 = ALLOCS.load(Ordering::Relaxed);
                let t0 = Instant::now();
                let mut sent = 0usize;
                for (i, d) in packets.iter().enumerate() {
                    // What the node's loop does per datagram.
                    let t = base + Duration::from_micros(i as u64);
                    room.worker.handle_datagram(t, from, d);
                    if room.worker.next_deadline(t) <= t {
                        room.worker.handle_timeout(t);
                    }
                    sent += room.worker.take_transmits().count();
                }
                let el = t0.elapsed();
                let allocs = ALLOCS.load(Ordering::Relaxed) - a0;
                room.now = base + Duration::from_micros(iters);
                assert!(sent > 0 || iters < 10, "nothing was forwarded");
                if iters > 1000 && !reported {
                    reported = true;
                    eprintln!(
                        "  {subs} subscribers: {sent} datagrams out for {iters} in, {:.2} allocations per forwarded packet",
                        allocs as f64 / sent.max(1) as f64
                    );
                }
                el
            })
        });
    }
    g.finish();
}

/// One 20 ms round of a room of 5 where everyone talks: one datagram from each
/// publisher (20 forwarded packets). `per_datagram` takes the transmits after every
/// datagram, as the node did before it batched; `batched` feeds the round's datagrams
/// and then takes the transmits once, as the node does with a batch from `recvmmsg`.
fn round(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_5_talking");
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Elements(20));
    for batched in [false, true] {
        let mut room = Room::with_publishers(5, 5);
        let mut seq = 1_000u64;
        let name = if batched { "batched" } else { "per_datagram" };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let per_pub: Vec<Vec<Vec<u8>>> = (0..5)
                    .map(|k| room.publisher_datagrams(k, iters as usize, seq))
                    .collect();
                seq += iters;
                let addrs: Vec<SocketAddr> = room.peers.iter().map(|p| p.addr).collect();
                let base = room.now;
                let t0 = Instant::now();
                let mut sent = 0usize;
                for i in 0..iters as usize {
                    let t = base + Duration::from_micros(i as u64);
                    for (k, dgrams) in per_pub.iter().enumerate() {
                        let Some(d) = dgrams.get(i) else { continue };
                        room.worker.handle_datagram(t, addrs[k], d);
                        if !batched {
                            sent += room.worker.take_transmits().count();
                        }
                    }
                    if room.worker.next_deadline(t) <= t {
                        room.worker.handle_timeout(t);
                    }
                    sent += room.worker.take_transmits().count();
                }
                let el = t0.elapsed();
                room.now = base + Duration::from_micros(iters);
                assert!(sent > 0 || iters < 10, "nothing was forwarded");
                el
            })
        });
    }
    g.finish();
}

/// Heap held by the worker per participant: a room of 5 everyone talking, after
/// 2 s of audio (str0m's buffers and stats warmed up). Printed, not timed.
fn memory(_c: &mut Criterion) {
    let live0 = LIVE.load(Ordering::Relaxed);
    let mut room = Room::with_publishers(5, 5);
    for seq in 10..110u64 {
        let per_pub: Vec<Vec<Vec<u8>>> = (0..5)
            .map(|k| room.publisher_datagrams(k, 1, seq))
            .collect();
        let addrs: Vec<SocketAddr> = room.peers.iter().map(|p| p.addr).collect();
        for (k, d) in per_pub.iter().enumerate() {
            room.worker.handle_datagram(room.now, addrs[k], &d[0]);
        }
        room.worker.take_transmits().count();
        room.run(Duration::from_millis(20));
    }
    let with_clients = LIVE.load(Ordering::Relaxed) - live0;
    // The simulated clients' own sessions are in the same heap: measure them apart.
    let clients: Vec<Rtc> = room.peers.drain(..).map(|p| p.rtc).collect();
    let before_drop = LIVE.load(Ordering::Relaxed);
    drop(clients);
    let client_bytes = before_drop - LIVE.load(Ordering::Relaxed);
    eprintln!(
        "  memory: worker heap {:.1} KB per participant (room of 5 talking; clients' {:.1} KB each excluded)",
        (with_clients - client_bytes) as f64 / 5.0 / 1024.0,
        client_bytes as f64 / 5.0 / 1024.0
    );
}

fn demux(c: &mut Criterion) {
    let room = Room::new(20);
    let mut worker = room.worker;
    // A datagram from an address nobody uses: the demux lookup and the drop.
    let stranger: SocketAddr = "192.0.2.9:5000".parse().unwrap();
    let pkt = vec![0x80u8; 120];
    let now = room.now;
    c.bench_function("demux_unknown_source", |b| {
        b.iter(|| worker.handle_datagram(now, stranger, &pkt))
    });
}

fn speaker(c: &mut Criterion) {
    let mut d: SpeakerDetector<u64> = SpeakerDetector::new(SpeakerConfig::default());
    let t0 = Instant::now();
    let mut i = 0u64;
    c.bench_function("speaker_detector_update", |b| {
        b.iter(|| {
            i += 1;
            d.observe(i % 50, 30, t0 + Duration::from_millis(i / 50 * 20));
        })
    });
}

criterion_group!(benches, forward, round, memory, demux, speaker);
criterion_main!(benches);
