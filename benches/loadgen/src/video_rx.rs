//! The receiving side of video: per subscriber and down track (SSRC), packets are
//! assembled into frames (a frame is complete when every sequence number from its
//! S=1 packet to its marker arrived, retransmissions included), and the VP8
//! descriptors the SFU rewrote are checked packet by packet: picture id +1 per frame,
//! TL0PICIDX with it (every frame of the clip is on temporal layer 0), KEYIDX changing
//! only at keyframes, frame boundaries where the marker and S bits say. A picture-id
//! jump is "explained by loss" when at least as many packets went missing in between as
//! frames were skipped; any other jump is a gap the SFU made.
//!
//! Timing: per-packet one-way delay from the stamp, per-frame delay until the frame is
//! complete, and the time to the first complete keyframe of each camera: from the
//! camera's publish (its offer) when the subscriber was connected before it, else from
//! the subscriber's own offer (a late joiner).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use str0m::rtp::{RtpPacket, Vp8Descriptor};

use crate::stats::{DelayHistogram, SendTimes, Shared};
use crate::video::RIDS;

/// Frames kept open per down track while their packets arrive; an older one still
/// incomplete is counted as such.
const OPEN_FRAMES: usize = 64;
/// Missing sequence numbers remembered per down track (for "repaired later").
const MAX_MISSING: usize = 4096;

macro_rules! video_counts {
    ($($name:ident),* $(,)?) => {
        /// Counters shared by every participant (atomics: updated at packet rate).
        #[derive(Default)]
        pub struct VideoCounters { $(pub $name: AtomicU64,)* }

        /// A snapshot of [`VideoCounters`].
        #[derive(Debug, Default, Clone, Copy, Serialize)]
        pub struct VideoCounts { $(pub $name: u64,)* }

        impl VideoCounters {
            pub fn snapshot(&self) -> VideoCounts {
                VideoCounts { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl std::ops::Sub for VideoCounts {
            type Output = VideoCounts;
            fn sub(self, o: VideoCounts) -> VideoCounts {
                VideoCounts { $($name: self.$name.saturating_sub(o.$name),)* }
            }
        }
    };
}

video_counts!(
    tx_packets,
    rx_packets,
    frames,
    keyframes,
    frames_low,
    frames_medium,
    frames_high,
    // Frames dropped from the open window before all their packets came.
    incomplete,
    // Complete frames on a down track before its first complete keyframe.
    undecodable,
    // Sequence gaps on arrival, and how many of those packets came later (RTX).
    lost,
    repaired,
    pid_gaps,
    pid_gaps_with_loss,
    // Changes of the layer a down track carries; those that left the old layer's frame
    // without its last packet (harmless to a decoder, which drops that frame: the
    // switch lands on a keyframe); those not at a keyframe (a corrupt picture).
    switches,
    switches_mid_frame,
    switches_not_at_keyframe,
    // Descriptor fields that broke continuity without a picture-id jump (TL0PICIDX,
    // KEYIDX, S/marker boundaries) or did not parse.
    descriptor_errors,
    // Packets whose send time had left the ring.
    unmeasured,
);

/// First-frame times, ms.
#[derive(Debug, Default, Clone)]
pub struct FirstFrames {
    pub after_publish_ms: Vec<f64>,
    pub after_join_ms: Vec<f64>,
    /// Publishers: camera offer → the server's answer (after which the camera sends).
    pub answer_ms: Vec<f64>,
    /// Subscribers: their latest answer to a server offer → the first frame (what is
    /// left after renegotiation: mostly waiting for a keyframe).
    pub after_answer_ms: Vec<f64>,
}

pub struct VideoShared {
    pub c: VideoCounters,
    /// Keyframe requests (PLI/FIR) the cameras received, per layer.
    pub keyframe_requests: [AtomicU64; 3],
    /// Per packet, stamp to arrival.
    pub delay: DelayHistogram,
    /// Per frame, stamp to the arrival that completed it.
    pub frame_delay: DelayHistogram,
    pub sent: SendTimes,
    /// The first few continuity problems, described (for the report).
    samples: Mutex<Vec<String>>,
    /// Per camera, when it published (ns since the run's start); u64::MAX before.
    published: Vec<AtomicU64>,
    first: Mutex<FirstFrames>,
}

impl VideoShared {
    pub fn new(cameras: usize) -> Self {
        VideoShared {
            c: VideoCounters::default(),
            keyframe_requests: Default::default(),
            // Only video scenarios need the 800 KB histograms.
            delay: DelayHistogram::with_buckets(if cameras > 0 { usize::MAX } else { 1 }),
            frame_delay: DelayHistogram::with_buckets(if cameras > 0 { usize::MAX } else { 1 }),
            sent: SendTimes::new(cameras),
            samples: Mutex::new(Vec::new()),
            published: (0..cameras).map(|_| AtomicU64::new(u64::MAX)).collect(),
            first: Mutex::new(FirstFrames::default()),
        }
    }

    /// A camera's offer was answered `ms` after it was sent.
    pub fn answered(&self, ms: f64) {
        if let Ok(mut f) = self.first.lock() {
            f.answer_ms.push(ms);
        }
    }

    pub fn published(&self, camera: u32, ns: u64) {
        if let Some(p) = self.published.get(camera as usize) {
            p.store(ns, Ordering::Relaxed);
        }
    }

    fn published_at(&self, camera: u32) -> Option<u64> {
        let v = self.published.get(camera as usize)?.load(Ordering::Relaxed);
        (v != u64::MAX).then_some(v)
    }

    fn sample(&self, what: String) {
        if let Ok(mut s) = self.samples.lock() {
            if s.len() < 10 {
                s.push(what);
            }
        }
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn first_frames(&self) -> FirstFrames {
        self.first.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

struct FrameAcc {
    picture_id: u16,
    start: Option<u64>,
    end: Option<u64>,
    got: u64,
    key: bool,
    sent_ns: Option<u64>,
    done: bool,
}

#[derive(Default)]
struct DownTrack {
    camera: u32,
    highest: Option<u64>,
    last_pid: u16,
    last_tl0: u8,
    last_key_idx: u8,
    last_marker: bool,
    last_layer: u8,
    missing: BTreeSet<u64>,
    frames: VecDeque<FrameAcc>,
    decodable: bool,
    /// Layer of the last complete frame.
    layer: Option<u8>,
}

/// What one subscriber saw of video.
#[derive(Debug, Default)]
pub struct VideoPeerResult {
    /// Complete frames per camera index.
    pub frames_per_camera: HashMap<u32, u64>,
    /// (camera, layer of its last complete frame) per down track.
    pub last_layers: Vec<(u32, u8)>,
}

#[derive(Default)]
pub struct VideoRx {
    tracks: HashMap<u32, DownTrack>,
    offered_ns: Option<u64>,
    ready_ns: Option<u64>,
    answered_ns: Option<u64>,
    first_seen: HashSet<u32>,
    frames_per_camera: HashMap<u32, u64>,
}

/// What the accounting needs of a received RTP packet.
struct Pkt<'a> {
    ssrc: u32,
    /// Extended sequence number.
    seq: u64,
    marker: bool,
    payload: &'a [u8],
}

/// (layer, camera, frame counter) from a video stamp.
pub fn video_stamp(payload: &[u8]) -> Option<(u8, u32, u32)> {
    let s = payload.get(payload.len().checked_sub(crate::peer::STAMP_LEN)?..)?;
    if s[..3] != crate::video::VIDEO_MAGIC || usize::from(s[3]) >= RIDS.len() {
        return None;
    }
    Some((
        s[3],
        u32::from_be_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_be_bytes([s[8], s[9], s[10], s[11]]),
    ))
}

impl VideoRx {
    /// This participant sent its first offer.
    pub fn offered(&mut self, now: Instant, shared: &Shared) {
        self.offered_ns.get_or_insert(shared.elapsed_ns(now));
    }

    /// Its media connected: cameras published from now on count as "after publish".
    pub fn ready(&mut self, now: Instant, shared: &Shared) {
        self.ready_ns.get_or_insert(shared.elapsed_ns(now));
    }

    /// It answered a server offer (which may carry a new camera).
    pub fn answered(&mut self, now: Instant, shared: &Shared) {
        self.answered_ns = Some(shared.elapsed_ns(now));
    }

    pub fn on_rtp(&mut self, p: &RtpPacket, stamp: (u8, u32, u32), shared: &Shared) {
        let pkt = Pkt {
            ssrc: *p.header.ssrc,
            seq: *p.seq_no,
            marker: p.header.marker,
            payload: &p.payload,
        };
        self.on_packet(pkt, stamp, shared);
    }

    fn on_packet(&mut self, pkt: Pkt, stamp: (u8, u32, u32), shared: &Shared) {
        let (layer, camera, counter) = stamp;
        let v = &shared.video;
        let now_ns = shared.elapsed_ns(Instant::now());
        v.c.rx_packets.fetch_add(1, Ordering::Relaxed);
        shared.rx_packets.fetch_add(1, Ordering::Relaxed);
        let sent_ns = v.sent.sent_at(camera, counter);
        match sent_ns {
            Some(s) => v.delay.observe(now_ns.saturating_sub(s)),
            None => {
                v.c.unmeasured.fetch_add(1, Ordering::Relaxed);
            }
        }
        let payload = pkt.payload;
        let Ok(d) = Vp8Descriptor::parse(payload) else {
            v.c.descriptor_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (Some(pid), Some(tl0), Some(key_idx)) = (d.picture_id(), d.tl0_pic_idx(), d.key_idx())
        else {
            v.c.descriptor_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let start = payload[0] & 0x10 != 0 && payload[0] & 0x07 == 0;
        let key = d.starts_keyframe(payload);
        let (marker, seq) = (pkt.marker, pkt.seq);
        let t = self.tracks.entry(pkt.ssrc).or_default();
        t.camera = camera;

        if t.highest.is_none_or(|h| seq > h) {
            if let Some(h) = t.highest {
                let gap = seq - h - 1;
                if gap > 0 {
                    v.c.lost.fetch_add(gap, Ordering::Relaxed);
                    if t.missing.len() + gap as usize > MAX_MISSING {
                        t.missing.clear();
                    }
                    t.missing.extend((h + 1..seq).take(MAX_MISSING));
                }
                let dp = pid.wrapping_sub(t.last_pid) & 0x7fff;
                let dt = tl0.wrapping_sub(t.last_tl0);
                let switched = layer != t.last_layer;
                let mut problem = None;
                if switched {
                    v.c.switches.fetch_add(1, Ordering::Relaxed);
                    if !(key && start) {
                        v.c.switches_not_at_keyframe.fetch_add(1, Ordering::Relaxed);
                        problem = Some("a layer switch not at a keyframe");
                    } else if !t.last_marker {
                        v.c.switches_mid_frame.fetch_add(1, Ordering::Relaxed);
                        v.sample(format!(
                            "camera {camera} ssrc {:#x}: switched from layer {} to {} \
                             before the end of the old layer's frame (picture id {} -> {pid}, seq {h} -> {seq})",
                            pkt.ssrc,
                            RIDS[usize::from(t.last_layer)],
                            RIDS[usize::from(layer)],
                            t.last_pid
                        ));
                        // That frame will never complete; it is not a loss.
                        let last = t.last_pid;
                        if let Some(f) = t.frames.iter_mut().rev().find(|f| f.picture_id == last) {
                            f.done = true;
                        }
                    }
                }
                let problem = if problem.is_some() {
                    problem
                } else if gap == 0 {
                    match dp {
                        0 if t.last_marker => Some("a packet of a frame after its marker"),
                        0 if start => Some("a second S=1 packet in one frame"),
                        0 if dt != 0 => Some("TL0PICIDX changed within a frame"),
                        0 => None,
                        1 if !t.last_marker && !switched => {
                            Some("a new picture id before the marker")
                        }
                        1 if !start => Some("a new frame without S=1"),
                        1 if dt != 1 => Some("TL0PICIDX did not follow the picture id"),
                        1 if !key && key_idx != t.last_key_idx => {
                            Some("KEYIDX changed on a delta frame")
                        }
                        1 => None,
                        _ => {
                            v.c.pid_gaps.fetch_add(1, Ordering::Relaxed);
                            Some("picture id jumped without loss")
                        }
                    }
                } else if dp > 1 {
                    // Each skipped frame needs at least one missing packet.
                    if u64::from(dp - 1) <= gap {
                        v.c.pid_gaps_with_loss.fetch_add(1, Ordering::Relaxed);
                        None
                    } else {
                        v.c.pid_gaps.fetch_add(1, Ordering::Relaxed);
                        Some("picture id jumped further than the loss explains")
                    }
                } else {
                    None
                };
                if let Some(what) = problem {
                    // (Switches and jumps have their own counters.)
                    if dp <= 1 && !(switched && !(key && start)) {
                        v.c.descriptor_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    v.sample(format!(
                        "camera {camera} layer {layer} ssrc {:#x}: {what} (seq {} -> {seq}, \
                         picture id {} -> {pid}, TL0PICIDX {} -> {tl0}, KEYIDX {} -> {key_idx}, \
                         marker before {}, S {start}, keyframe {key})",
                        pkt.ssrc, h, t.last_pid, t.last_tl0, t.last_key_idx, t.last_marker
                    ));
                }
            }
            t.highest = Some(seq);
            t.last_pid = pid;
            t.last_tl0 = tl0;
            t.last_key_idx = key_idx;
            t.last_marker = marker;
            t.last_layer = layer;
        } else if t.missing.remove(&seq) {
            v.c.repaired.fetch_add(1, Ordering::Relaxed);
        }

        let pos = match t.frames.iter().rposition(|f| f.picture_id == pid) {
            Some(i) => i,
            None => {
                if t.frames.len() >= OPEN_FRAMES {
                    if let Some(old) = t.frames.pop_front() {
                        if !old.done {
                            v.c.incomplete.fetch_add(1, Ordering::Relaxed);
                            v.sample(format!(
                                "camera {camera} layer {layer} ssrc {:#x}: frame with picture id {} \
                                 never completed (first seq {:?}, marker seq {:?}, {} packets)",
                                pkt.ssrc, old.picture_id, old.start, old.end, old.got
                            ));
                        }
                    }
                }
                t.frames.push_back(FrameAcc {
                    picture_id: pid,
                    start: None,
                    end: None,
                    got: 0,
                    key: false,
                    sent_ns: None,
                    done: false,
                });
                t.frames.len() - 1
            }
        };
        let f = &mut t.frames[pos];
        if f.done {
            return;
        }
        f.got += 1;
        if start {
            f.start = Some(seq);
            f.key |= key;
        }
        if marker {
            f.end = Some(seq);
        }
        if f.sent_ns.is_none() {
            f.sent_ns = sent_ns;
        }
        let (Some(a), Some(b)) = (f.start, f.end) else {
            return;
        };
        if b < a || f.got != b - a + 1 {
            return;
        }
        // Complete.
        f.done = true;
        let key = f.key;
        if let Some(s) = f.sent_ns {
            v.frame_delay.observe(now_ns.saturating_sub(s));
        }
        v.c.frames.fetch_add(1, Ordering::Relaxed);
        [&v.c.frames_low, &v.c.frames_medium, &v.c.frames_high][usize::from(layer)]
            .fetch_add(1, Ordering::Relaxed);
        if key {
            v.c.keyframes.fetch_add(1, Ordering::Relaxed);
            t.decodable = true;
        } else if !t.decodable {
            v.c.undecodable.fetch_add(1, Ordering::Relaxed);
        }
        t.layer = Some(layer);
        *self.frames_per_camera.entry(camera).or_default() += 1;
        if key && self.first_seen.insert(camera) {
            let published = v.published_at(camera);
            if let Ok(mut first) = v.first.lock() {
                if let Some(a) = self.answered_ns {
                    first
                        .after_answer_ms
                        .push(now_ns.saturating_sub(a) as f64 / 1e6);
                }
                match (published, self.ready_ns, self.offered_ns) {
                    (Some(p), Some(r), _) if p >= r => first
                        .after_publish_ms
                        .push(now_ns.saturating_sub(p) as f64 / 1e6),
                    (_, _, Some(o)) => first
                        .after_join_ms
                        .push(now_ns.saturating_sub(o) as f64 / 1e6),
                    _ => {}
                }
            }
        }
    }

    pub fn finish(self) -> VideoPeerResult {
        VideoPeerResult {
            frames_per_camera: self.frames_per_camera,
            last_layers: self
                .tracks
                .values()
                .filter_map(|t| Some((t.camera, t.layer?)))
                .collect(),
        }
    }
}

/// Quantiles of a list of samples (nearest rank).
#[derive(Debug, Serialize)]
pub struct Spread {
    pub count: usize,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub max: Option<f64>,
}

impl Spread {
    pub fn of(samples: &[f64]) -> Spread {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |q: f64| {
            (!v.is_empty()).then(|| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1])
        };
        Spread {
            count: v.len(),
            p50: q(0.5),
            p90: q(0.9),
            max: v.last().copied(),
        }
    }
}

/// The video part of a run's report.
#[derive(Debug, Serialize)]
pub struct VideoReport {
    pub cameras: usize,
    /// Measured window: packets/s the cameras sent and subscribers received, and
    /// audio received beside it.
    pub sent_pps: f64,
    pub received_pps: f64,
    pub audio_received_pps: f64,
    pub frames_per_sec: f64,
    pub delay_ms_p50: Option<f64>,
    pub delay_ms_p99: Option<f64>,
    pub frame_delay_ms_p50: Option<f64>,
    pub frame_delay_ms_p99: Option<f64>,
    /// Whole run (joins included).
    pub total: VideoCounts,
    pub window: VideoCounts,
    pub keyframe_requests: [u64; 3],
    pub publish_to_first_frame_ms: Spread,
    pub join_to_first_frame_ms: Spread,
    pub publish_to_answer_ms: Spread,
    pub subscriber_answer_to_first_frame_ms: Spread,
    /// The first few continuity problems and incomplete frames, described.
    pub problems: Vec<String>,
}

impl VideoReport {
    pub fn print(&self) {
        let f = |v: Option<f64>| {
            v.map(|x| format!("{x:.1} ms"))
                .unwrap_or_else(|| "n/a".into())
        };
        let (w, t) = (&self.window, &self.total);
        eprintln!(
            "  video              {} cameras · sent {:.0} pkt/s · received {:.0} pkt/s ({:.0} audio) · {:.1} frames/s",
            self.cameras, self.sent_pps, self.received_pps, self.audio_received_pps, self.frames_per_sec
        );
        eprintln!(
            "  video delay        packet p50 {} · p99 {} · complete frame p50 {} · p99 {}",
            f(self.delay_ms_p50),
            f(self.delay_ms_p99),
            f(self.frame_delay_ms_p50),
            f(self.frame_delay_ms_p99)
        );
        let s = |x: &Spread| {
            format!(
                "p50 {} · p90 {} · max {} (n={})",
                f(x.p50),
                f(x.p90),
                f(x.max),
                x.count
            )
        };
        eprintln!(
            "  first frame        after publish {}",
            s(&self.publish_to_first_frame_ms)
        );
        eprintln!(
            "                     after own join {}",
            s(&self.join_to_first_frame_ms)
        );
        eprintln!(
            "                     (camera offer → answer {})",
            s(&self.publish_to_answer_ms)
        );
        eprintln!(
            "                     (subscriber's last answer → first frame {})",
            s(&self.subscriber_answer_to_first_frame_ms)
        );
        eprintln!(
            "  frames (window)    {} ({} keyframes) · by layer q/h/f {}/{}/{} · whole run {} ({} keyframes, {} incomplete, {} before a keyframe)",
            w.frames, w.keyframes, w.frames_low, w.frames_medium, w.frames_high,
            t.frames, t.keyframes, t.incomplete, t.undecodable
        );
        eprintln!(
            "  continuity (run)   picture-id gaps {} · explained by loss {} · other descriptor errors {} · layer switches {} ({} cutting a frame short, {} not at a keyframe) · lost {} ({} repaired) · keyframe requests q/h/f {}/{}/{}",
            t.pid_gaps,
            t.pid_gaps_with_loss,
            t.descriptor_errors,
            t.switches,
            t.switches_mid_frame,
            t.switches_not_at_keyframe,
            t.lost,
            t.repaired,
            self.keyframe_requests[0],
            self.keyframe_requests[1],
            self.keyframe_requests[2]
        );
        for p in &self.problems {
            eprintln!("    {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of `frames` frames of `per` packets each (picture ids from 100, a
    /// keyframe first), as (seq, marker, payload).
    fn stream(frames: u16, per: u64) -> Vec<(u64, bool, Vec<u8>)> {
        let mut out = Vec::new();
        let mut seq = 1000;
        for f in 0..frames {
            let pid = 100 + f;
            for k in 0..per {
                let mut p = vec![
                    0x80 | if k == 0 { 0x10 } else { 0 },
                    0xf0,
                    0x80 | (pid >> 8) as u8,
                    pid as u8,
                    pid as u8,
                    0x21,
                    if f == 0 { 0x10 } else { 0x11 },
                    0xaa,
                ];
                p.extend_from_slice(b"CLV\x02\0\0\0\x03\0\0\0\x01");
                out.push((seq, k + 1 == per, p));
                seq += 1;
            }
        }
        out
    }

    fn feed(rx: &mut VideoRx, shared: &Shared, pkts: &[(u64, bool, Vec<u8>)]) {
        for (seq, marker, payload) in pkts {
            let stamp = video_stamp(payload).unwrap();
            let pkt = Pkt {
                ssrc: 7,
                seq: *seq,
                marker: *marker,
                payload,
            };
            rx.on_packet(pkt, stamp, shared);
        }
    }

    #[test]
    fn a_continuous_stream_has_complete_frames_and_no_gaps() {
        let shared = Shared::with_cameras(1, 4);
        let mut rx = VideoRx::default();
        feed(&mut rx, &shared, &stream(10, 3));
        let c = shared.video.c.snapshot();
        assert_eq!((c.frames, c.keyframes, c.frames_high), (10, 1, 10));
        assert_eq!(
            (c.pid_gaps, c.pid_gaps_with_loss, c.descriptor_errors),
            (0, 0, 0)
        );
        assert_eq!(rx.finish().frames_per_camera[&3], 10);
    }

    #[test]
    fn a_lost_frame_is_a_gap_explained_by_loss_and_a_late_repair_completes_a_frame() {
        let shared = Shared::with_cameras(1, 4);
        let mut rx = VideoRx::default();
        let mut s = stream(10, 3);
        // Frame 4 (packets 12..15) lost for good; packet 20 (frame 6) arrives last.
        let late = s.remove(20);
        s.drain(12..15);
        s.push(late);
        feed(&mut rx, &shared, &s);
        let c = shared.video.c.snapshot();
        assert_eq!((c.pid_gaps, c.pid_gaps_with_loss), (0, 1));
        assert_eq!((c.lost, c.repaired), (4, 1));
        assert_eq!(c.frames, 9, "frame 6 completed by the late packet");
        assert_eq!(c.descriptor_errors, 0);
    }

    #[test]
    fn a_picture_id_jump_without_loss_is_a_gap() {
        let shared = Shared::with_cameras(1, 4);
        let mut rx = VideoRx::default();
        let mut s = stream(6, 2);
        // Frames 3.. renumbered two higher, sequence numbers untouched: the SFU's fault.
        for (i, (_, _, p)) in s.iter_mut().enumerate() {
            if i >= 6 {
                p[3] = p[3].wrapping_add(2);
                p[4] = p[4].wrapping_add(2);
            }
        }
        feed(&mut rx, &shared, &s);
        let c = shared.video.c.snapshot();
        assert_eq!((c.pid_gaps, c.pid_gaps_with_loss), (1, 0));
        // A TL0PICIDX that does not follow the picture id is caught too.
        let shared = Shared::with_cameras(1, 4);
        let mut rx = VideoRx::default();
        let mut s = stream(4, 1);
        s[2].2[4] = 0;
        feed(&mut rx, &shared, &s);
        assert!(shared.video.c.snapshot().descriptor_errors > 0);
    }

    #[test]
    fn a_switch_at_a_keyframe_may_cut_the_old_layers_frame_short() {
        let shared = Shared::with_cameras(1, 4);
        let mut rx = VideoRx::default();
        let mut s = stream(6, 3);
        // Layer q until the middle of frame 2; from there layer f, whose frame 3 is a
        // keyframe (the SFU renumbers it to follow on).
        s.remove(7);
        s.remove(7);
        for (i, (seq, _, p)) in s.iter_mut().enumerate() {
            *seq = 1000 + i as u64;
            let at = p.len() - 9;
            if i < 7 {
                p[at] = 0;
            } else if i == 7 {
                p[6] = 0x10;
            }
        }
        feed(&mut rx, &shared, &s);
        let c = shared.video.c.snapshot();
        assert_eq!(
            (c.switches, c.switches_mid_frame, c.switches_not_at_keyframe),
            (1, 1, 0)
        );
        assert_eq!((c.descriptor_errors, c.pid_gaps), (0, 0));
        assert_eq!((c.frames_low, c.frames_high, c.incomplete), (2, 3, 0));
    }

    #[test]
    fn spread_is_nearest_rank() {
        let s = Spread::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(
            (s.count, s.p50, s.p90, s.max),
            (5, Some(3.0), Some(5.0), Some(5.0))
        );
        assert_eq!(Spread::of(&[]).p50, None);
    }

    #[test]
    fn stamps_name_layer_camera_and_frame() {
        let mut p = vec![0x90, 0, 0];
        p.extend_from_slice(b"CLV\x02");
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(video_stamp(&p), Some((2, 7, 9)));
        let at = p.len() - 9;
        p[at] = 3; // no such layer
        assert_eq!(video_stamp(&p), None);
        assert_eq!(video_stamp(b"CLV"), None);
    }
}
