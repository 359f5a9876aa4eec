//! Receive-side jitter buffer for one audio stream of 20 ms packets.
//!
//! Packets go in as they arrive ([`JitterBuffer::push`], any order, duplicates
//! allowed); the playout clock pulls one frame every 20 ms ([`JitterBuffer::pop`]) and
//! is told what to do with it: decode a packet, recover a lost one from the next
//! packet's in-band FEC, or conceal it (PLC). Those map one-to-one onto
//! [`crate::opus::OpusDecoder`]'s `decode`, `decode_fec` and `conceal`.
//!
//! **Delay.** Playout starts once the first packet has waited the target delay. The
//! target follows the measured interarrival jitter (RFC 3550 §6.4.1's `D`, smoothed
//! with a fast rise and a slow fall so one late burst raises the delay at once but
//! calm periods bring it down gradually). The buffer grows its delay by concealing
//! without advancing when it runs dry (late packets are then still played, not lost),
//! and shrinks it by skipping a frame when it holds more than the target plus a
//! margin.
//!
//! **Ordering** is by RTP sequence number (unwrapped to 64 bits). Slots are a fixed
//! ring whose payload buffers are reused, so steady-state operation does not allocate.
//! Clock-free: arrival and playout times are arguments.

use crate::rewrite::SeqUnwrapper;
use std::time::{Duration, Instant};

/// RTP clock ticks per millisecond for Opus (48 kHz).
const TICKS_PER_MS: f64 = 48.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterConfig {
    /// Duration of one packet (Chorus uses 20 ms).
    pub frame: Duration,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Ring size in packets; packets further ahead than this restart the buffer.
    pub capacity: usize,
    /// Target delay = frame + `jitter_multiplier` × smoothed jitter, clamped.
    pub jitter_multiplier: f64,
    /// Consecutive empty pops after which the stream is considered paused (muted,
    /// DTX, gone): `pop` returns `None` and playout restarts with the next packet.
    pub idle_after: u32,
}

impl Default for JitterConfig {
    fn default() -> Self {
        JitterConfig {
            frame: Duration::from_millis(20),
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(300),
            capacity: 64,
            jitter_multiplier: 2.0,
            idle_after: 10,
        }
    }
}

/// What [`JitterBuffer::push`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Buffered,
    /// Already buffered (or already played and still in its slot): ignored.
    Duplicate,
    /// Arrived after its playout slot passed: ignored, but it still counts towards
    /// the jitter estimate.
    Late,
    /// Too far from the current position (a new stream or a long outage): the buffer
    /// was cleared and restarted with this packet.
    Restarted,
}

/// What to play for the next 20 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Playout<'a> {
    /// Decode this packet.
    Packet(&'a [u8]),
    /// The packet for this slot was lost but the next one is here: decode it with
    /// FEC (`OpusDecoder::decode_fec`) to recover this slot. The same packet comes out
    /// again as `Packet` on the next pop.
    Fec(&'a [u8]),
    /// Nothing to decode: conceal (PLC). Either a packet was lost with no FEC source,
    /// or the buffer ran dry and is growing its delay.
    Conceal,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    pub buffered: u64,
    pub duplicates: u64,
    pub late: u64,
    pub restarts: u64,
    pub played: u64,
    /// Lost packets answered with `Fec`.
    pub fec: u64,
    /// Lost packets answered with `Conceal`.
    pub concealed_lost: u64,
    /// Empty pops (buffer ran dry) answered with `Conceal`.
    pub underruns: u64,
    /// Frames skipped to bring the delay back down.
    pub skipped: u64,
    /// Talkspurts after a silence pause that re-started playout with the target delay.
    pub talkspurts: u64,
}

#[derive(Debug, Clone)]
struct Slot {
    seq: Option<u64>,
    payload: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct JitterBuffer {
    config: JitterConfig,
    slots: Vec<Slot>,
    unwrapper: SeqUnwrapper,
    /// Next sequence number to play; `None` until playout starts.
    next: Option<u64>,
    highest: Option<u64>,
    /// RTP timestamp of the packet at `highest`.
    highest_ts: u32,
    first_arrival: Option<Instant>,
    last_arrival: Option<(Instant, u32)>,
    jitter_ms: f64,
    empty_pops: u32,
    stats: JitterStats,
}

impl JitterBuffer {
    pub fn new(config: JitterConfig) -> Self {
        let capacity = config.capacity.max(4);
        JitterBuffer {
            config: JitterConfig { capacity, ..config },
            slots: vec![
                Slot {
                    seq: None,
                    payload: Vec::new()
                };
                capacity
            ],
            unwrapper: SeqUnwrapper::default(),
            next: None,
            highest: None,
            highest_ts: 0,
            first_arrival: None,
            last_arrival: None,
            jitter_ms: 0.0,
            empty_pops: 0,
            stats: JitterStats::default(),
        }
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Smoothed interarrival jitter in milliseconds.
    pub fn jitter_ms(&self) -> f64 {
        self.jitter_ms
    }

    /// Current target delay (whole frames).
    pub fn target_delay(&self) -> Duration {
        let frame_ms = self.frame_ms();
        let want = frame_ms + self.config.jitter_multiplier * self.jitter_ms;
        let min = self.config.min_delay.as_secs_f64() * 1000.0;
        let max = self.config.max_delay.as_secs_f64() * 1000.0;
        let ms = want.clamp(min, max.max(min));
        let frames = (ms / frame_ms).ceil().max(1.0);
        self.config.frame.mul_f64(frames)
    }

    fn target_frames(&self) -> u64 {
        let f = self.config.frame.as_secs_f64();
        if f <= 0.0 {
            return 1;
        }
        (self.target_delay().as_secs_f64() / f).round().max(1.0) as u64
    }

    fn frame_ms(&self) -> f64 {
        (self.config.frame.as_secs_f64() * 1000.0).max(1.0)
    }

    /// Frames held from the playout position to the newest packet, gaps included.
    pub fn depth(&self) -> u64 {
        match (self.next, self.highest) {
            (Some(n), Some(h)) if h >= n => h - n + 1,
            (None, Some(_)) => self.slots.iter().filter(|s| s.seq.is_some()).count() as u64,
            _ => 0,
        }
    }

    /// A packet arrived at `now` with RTP sequence number `seq` and timestamp `ts`.
    pub fn push(&mut self, seq: u16, ts: u32, payload: &[u8], now: Instant) -> PushOutcome {
        let ext = self.unwrapper.unwrap(seq);
        let cap = self.slots.len() as u64;
        let slot_of = |e: u64| (e % cap) as usize;

        if self.slots[slot_of(ext)].seq == Some(ext) {
            self.stats.duplicates += 1;
            return PushOutcome::Duplicate;
        }
        self.update_jitter(ts, now);

        let reference = self.next.or(self.highest);
        let far = reference.is_some_and(|r| ext >= r + cap || ext + cap <= r);
        if far {
            self.restart();
            self.unwrapper = SeqUnwrapper::default();
            let ext = self.unwrapper.unwrap(seq);
            self.store(ext, ts, payload, now);
            self.stats.restarts += 1;
            return PushOutcome::Restarted;
        }
        if self.next.is_some_and(|n| ext < n) {
            self.stats.late += 1;
            return PushOutcome::Late;
        }
        if self.is_talkspurt_start(ext, ts) {
            // The sender paused (Opus DTX, a gate, push-to-talk) and starts again:
            // the next sequence number but a timestamp that moved on by more than a
            // frame. The buffer ran dry during the pause, so playing this at the next
            // pop would start the talkspurt with no margin for jitter and underrun
            // on its second packet. Start playout over instead: wait the target delay.
            self.resync_playout();
            self.stats.talkspurts += 1;
        }
        self.store(ext, ts, payload, now);
        self.stats.buffered += 1;
        PushOutcome::Buffered
    }

    /// `ext` continues the sequence but its timestamp skipped ahead, while nothing is
    /// left to play: a new talkspurt after a pause shorter than the idle threshold.
    fn is_talkspurt_start(&self, ext: u64, ts: u32) -> bool {
        let frame_ticks = self.config.frame.as_secs_f64() * TICKS_PER_MS * 1000.0;
        self.next.is_some()
            && self.depth() == 0
            && self.highest.is_some_and(|h| ext == h + 1)
            && f64::from(ts.wrapping_sub(self.highest_ts) as i32) > 1.5 * frame_ticks
    }

    /// Forgets what was played and waits for the target delay again, keeping
    /// `highest` so stragglers from before are still recognised as late.
    fn resync_playout(&mut self) {
        self.next = None;
        self.first_arrival = None;
        self.empty_pops = 0;
        for s in &mut self.slots {
            s.seq = None;
        }
    }

    fn store(&mut self, ext: u64, ts: u32, payload: &[u8], now: Instant) {
        let cap = self.slots.len() as u64;
        let slot = &mut self.slots[(ext % cap) as usize];
        slot.seq = Some(ext);
        slot.payload.clear();
        slot.payload.extend_from_slice(payload);
        if self.highest.is_none_or(|h| ext >= h) {
            self.highest_ts = ts;
        }
        self.highest = Some(self.highest.map_or(ext, |h| h.max(ext)));
        if self.first_arrival.is_none() {
            self.first_arrival = Some(now);
        }
    }

    fn restart(&mut self) {
        for s in &mut self.slots {
            s.seq = None;
        }
        self.next = None;
        self.highest = None;
        self.first_arrival = None;
        self.empty_pops = 0;
    }

    fn update_jitter(&mut self, ts: u32, now: Instant) {
        if let Some((prev_at, prev_ts)) = self.last_arrival {
            // D(i-1, i): arrival spacing minus send spacing (RFC 3550 §6.4.1). Arrival
            // order, not sequence order, as the RFC does; `now` may be earlier than the
            // previous arrival if the caller's clock is odd, so go through signed ms.
            let arrival_ms = if now >= prev_at {
                now.duration_since(prev_at).as_secs_f64() * 1000.0
            } else {
                -(prev_at.duration_since(now).as_secs_f64() * 1000.0)
            };
            let send_ms = f64::from(ts.wrapping_sub(prev_ts) as i32) / TICKS_PER_MS;
            let d = (arrival_ms - send_ms).abs();
            if d > 2000.0 {
                // A timestamp discontinuity (new source, long pause with odd
                // timestamps), not network jitter: skip this sample.
                self.last_arrival = Some((now, ts));
                return;
            }
            // Fast rise, slow fall: under-buffering is audible at once, over-buffering
            // only costs latency.
            let gain = if d > self.jitter_ms {
                0.125
            } else {
                1.0 / 64.0
            };
            self.jitter_ms += gain * (d - self.jitter_ms);
        }
        self.last_arrival = Some((now, ts));
    }

    /// What to play for the 20 ms starting at `now`; `None` before playout starts (or
    /// after the stream went idle): play nothing or silence.
    pub fn pop(&mut self, now: Instant) -> Option<Playout<'_>> {
        let cap = self.slots.len() as u64;
        let n = match self.next {
            Some(n) => n,
            None => {
                let first = self.first_arrival?;
                if now.saturating_duration_since(first) < self.target_delay() {
                    return None;
                }
                let lowest = self.slots.iter().filter_map(|s| s.seq).min()?;
                self.next = Some(lowest);
                lowest
            }
        };
        let present = |buf: &Self, e: u64| buf.slots[(e % cap) as usize].seq == Some(e);

        let depth = self.depth();
        if depth == 0 {
            self.empty_pops += 1;
            if self.empty_pops >= self.config.idle_after {
                self.resync_playout();
                return None;
            }
            self.stats.underruns += 1;
            return Some(Playout::Conceal);
        }
        self.empty_pops = 0;

        let mut n = n;
        // Too much buffered (jitter calmed down): skip one frame per pop. Only skip
        // a frame that is here and followed by one that is, so a skip never creates a
        // loss on top of a loss.
        if depth > self.target_frames() + 2 && present(self, n) && present(self, n + 1) {
            n += 1;
            self.stats.skipped += 1;
        }
        self.next = Some(n + 1);
        if present(self, n) {
            self.stats.played += 1;
            return Some(Playout::Packet(&self.slots[(n % cap) as usize].payload));
        }
        if present(self, n + 1) {
            self.stats.fec += 1;
            return Some(Playout::Fec(&self.slots[((n + 1) % cap) as usize].payload));
        }
        self.stats.concealed_lost += 1;
        Some(Playout::Conceal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[derive(Debug, PartialEq, Eq)]
    enum P {
        Pkt(u8),
        Fec(u8),
        Plc,
    }

    fn tag(p: Option<Playout<'_>>) -> Option<P> {
        p.map(|p| match p {
            Playout::Packet(b) => P::Pkt(b[0]),
            Playout::Fec(b) => P::Fec(b[0]),
            Playout::Conceal => P::Plc,
        })
    }

    /// Pushes packets `(seq, arrival_ms)` (payload = [seq as u8]) and pops every 20 ms
    /// from `pop_from_ms` for `pops` frames.
    fn run(cfg: JitterConfig, arrivals: &[(u16, u64)], pop_from_ms: u64, pops: usize) -> Vec<P> {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(cfg);
        let mut out = Vec::new();
        let mut i = 0;
        let mut sorted = arrivals.to_vec();
        sorted.sort_by_key(|a| a.1);
        for k in 0..pops as u64 {
            let now_ms = pop_from_ms + k * 20;
            while i < sorted.len() && sorted[i].1 <= now_ms {
                let (seq, at) = sorted[i];
                jb.push(seq, u32::from(seq) * 960, &[seq as u8], t0 + MS * at as u32);
                i += 1;
            }
            if let Some(p) = tag(jb.pop(t0 + MS * now_ms as u32)) {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn in_order_stream_plays_in_order() {
        let arrivals: Vec<(u16, u64)> = (0..10).map(|s| (s, s as u64 * 20)).collect();
        let out = run(JitterConfig::default(), &arrivals, 0, 11);
        let want: Vec<P> = (0..10).map(P::Pkt).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn reordered_and_duplicated_packets_come_out_once_in_order() {
        // 2 before 1, 1 twice, 4 before 3 and 3 twice.
        let arrivals = [
            (0, 0),
            (2, 20),
            (1, 21),
            (1, 22),
            (4, 60),
            (3, 61),
            (3, 62),
            (5, 100),
        ];
        let cfg = JitterConfig {
            min_delay: Duration::from_millis(60),
            ..JitterConfig::default()
        };
        let out = run(cfg, &arrivals, 0, 12);
        assert_eq!(
            out[..6],
            [
                P::Pkt(0),
                P::Pkt(1),
                P::Pkt(2),
                P::Pkt(3),
                P::Pkt(4),
                P::Pkt(5)
            ]
        );
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        assert_eq!(jb.push(1, 960, &[1], t0), PushOutcome::Buffered);
        assert_eq!(jb.push(1, 960, &[1], t0), PushOutcome::Duplicate);
        assert_eq!(jb.stats().duplicates, 1);
    }

    #[test]
    fn losses_become_fec_or_conceal_requests() {
        // 2 lost (3 present → FEC from 3); 6 and 7 lost (6: nothing → PLC, 7: FEC from 8).
        let arrivals: Vec<(u16, u64)> = [0u16, 1, 3, 4, 5, 8, 9]
            .iter()
            .map(|&s| (s, s as u64 * 20))
            .collect();
        let cfg = JitterConfig {
            min_delay: Duration::from_millis(60),
            ..JitterConfig::default()
        };
        let out = run(cfg, &arrivals, 0, 14);
        assert_eq!(
            out,
            vec![
                P::Pkt(0),
                P::Pkt(1),
                P::Fec(3),
                P::Pkt(3),
                P::Pkt(4),
                P::Pkt(5),
                P::Plc,
                P::Fec(8),
                P::Pkt(8),
                P::Pkt(9),
                // Then the buffer has run dry: conceal without advancing.
                P::Plc,
            ]
        );
    }

    #[test]
    fn late_packet_after_its_slot_is_dropped() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(10, 0, &[10], t0);
        jb.push(12, 1920, &[12], t0 + MS * 40);
        assert_eq!(tag(jb.pop(t0 + MS * 40)), Some(P::Pkt(10)));
        assert_eq!(tag(jb.pop(t0 + MS * 60)), Some(P::Fec(12)));
        assert_eq!(jb.push(11, 960, &[11], t0 + MS * 70), PushOutcome::Late);
        assert_eq!(tag(jb.pop(t0 + MS * 80)), Some(P::Pkt(12)));
        assert_eq!(jb.stats().late, 1);
    }

    #[test]
    fn sequence_wrap_keeps_order() {
        let seqs = [65533u16, 65535, 65534, 0, 1];
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig {
            min_delay: Duration::from_millis(60),
            ..JitterConfig::default()
        });
        for (i, &s) in seqs.iter().enumerate() {
            // RTP timestamps run on independently of the 16-bit sequence wrap.
            let ts = u32::from(s.wrapping_sub(65533)) * 960;
            jb.push(s, ts, &[s as u8], t0 + MS * i as u32);
        }
        let mut got = Vec::new();
        for k in 0..5 {
            if let Some(p) = tag(jb.pop(t0 + MS * (100 + 20 * k))) {
                got.push(p);
            }
        }
        assert_eq!(
            got,
            vec![P::Pkt(253), P::Pkt(254), P::Pkt(255), P::Pkt(0), P::Pkt(1)]
        );
    }

    #[test]
    fn far_jump_restarts() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(100, 0, &[1], t0);
        assert_eq!(jb.push(30_000, 0, &[2], t0), PushOutcome::Restarted);
        assert_eq!(tag(jb.pop(t0 + MS * 100)), Some(P::Pkt(2)));
    }

    #[test]
    fn target_delay_adapts_up_under_jitter_and_back_down() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let mut x: u32 = 99;
        let mut rand_ms = |max: u32| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) % max
        };
        // 5 s of calm, 5 s of up to 80 ms random extra delay, 10 s of calm again.
        let mut arrivals: Vec<(u16, u64)> = Vec::new();
        for s in 0..1000u16 {
            let jitter = if (250..500).contains(&s) {
                rand_ms(80)
            } else {
                0
            };
            arrivals.push((s, u64::from(s) * 20 + u64::from(jitter)));
        }
        arrivals.sort_by_key(|a| a.1);
        let mut i = 0;
        let mut samples = Vec::new();
        let mut played_during_jitter = 0;
        let mut lost_during_jitter = 0;
        for k in 0..1010u64 {
            let now_ms = k * 20;
            while i < arrivals.len() && arrivals[i].1 <= now_ms {
                let (s, at) = arrivals[i];
                jb.push(s, u32::from(s) * 960, &[0], t0 + MS * at as u32);
                i += 1;
            }
            let before = jb.stats();
            jb.pop(t0 + MS * now_ms as u32);
            let after = jb.stats();
            // Measure losses once the buffer had a second to adapt to the jitter.
            if (6000..10_000).contains(&now_ms) {
                played_during_jitter += after.played - before.played;
                lost_during_jitter +=
                    (after.fec - before.fec) + (after.concealed_lost - before.concealed_lost);
            }
            if now_ms % 1000 == 0 {
                samples.push((now_ms, jb.target_delay()));
            }
        }
        let at = |ms: u64| samples.iter().find(|s| s.0 == ms).map(|s| s.1).unwrap();
        println!(
            "target delay: calm {:?}, jitter {:?}, calm again {:?}; stats {:?}",
            at(4000),
            at(7000),
            at(19_000),
            jb.stats()
        );
        assert_eq!(at(4000), Duration::from_millis(20), "calm start");
        assert!(
            at(7000) >= Duration::from_millis(80),
            "under jitter: {:?}",
            at(7000)
        );
        assert!(
            at(19_000) <= Duration::from_millis(40),
            "calm again: {:?}",
            at(19_000)
        );
        // With the adapted delay, late losses under 0–80 ms jitter stay rare.
        let loss = lost_during_jitter as f64 / (played_during_jitter + lost_during_jitter) as f64;
        println!("loss under jitter {loss:.3}");
        assert!(loss < 0.05, "loss under jitter {loss:.3}");
        // And the buffer shed the extra delay once calm: it skipped frames.
        assert!(jb.stats().skipped > 0);
        assert!(jb.depth() <= 3, "depth at end {}", jb.depth());
    }

    #[test]
    fn a_talkspurt_after_a_short_pause_waits_the_target_delay_again() {
        // 20 ms packets, then a 100 ms DTX pause (sequence continues, timestamps jump
        // by 6 frames), then talking again. Packet `seq` arrives 5 ms into its slot.
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let target = jb.target_delay();
        let mut arrivals: Vec<(u16, u32, u32)> = (0..5u16)
            .map(|s| (s, u32::from(s) * 960, 5 + 20 * u32::from(s)))
            .collect();
        // seq 5 carries frame 10 (timestamps skipped frames 5..=9), arriving at 205 ms.
        arrivals
            .extend((5..25u16).map(|s| (s, (u32::from(s) + 5) * 960, 5 + 20 * (u32::from(s) + 5))));
        let mut played_at = Vec::new();
        let mut next = 0;
        for k in 1..35u32 {
            let now_ms = 20 * k;
            while next < arrivals.len() && arrivals[next].2 <= now_ms {
                let (seq, ts, at) = arrivals[next];
                jb.push(seq, ts, &[seq as u8], t0 + MS * at);
                next += 1;
            }
            if let Some(P::Pkt(b)) = tag(jb.pop(t0 + MS * now_ms)) {
                played_at.push((b, now_ms));
            }
        }
        let before: Vec<u8> = played_at
            .iter()
            .map(|(b, _)| *b)
            .filter(|b| *b < 5)
            .collect();
        assert_eq!(before, vec![0, 1, 2, 3, 4], "{played_at:?}");
        let first = played_at
            .iter()
            .find(|(b, _)| *b == 5)
            .expect("talkspurt played");
        // Arrived at 205 ms; without the resync it played at the very next pop (220).
        let waited = Duration::from_millis(u64::from(first.1 - 205));
        assert!(
            waited >= target,
            "talkspurt waited {waited:?}, target {target:?}: {played_at:?}"
        );
        assert_eq!(jb.stats().talkspurts, 1);
        // And it plays on without gaps.
        let after: Vec<u8> = played_at
            .iter()
            .map(|(b, _)| *b)
            .filter(|b| *b >= 5)
            .collect();
        assert_eq!(after, (5..after.len() as u8 + 5).collect::<Vec<_>>());
    }

    #[test]
    fn underrun_conceals_then_goes_idle_and_restarts() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(0, 0, &[0], t0);
        assert_eq!(tag(jb.pop(t0 + MS * 20)), Some(P::Pkt(0)));
        for k in 0..9 {
            assert_eq!(tag(jb.pop(t0 + MS * (40 + 20 * k))), Some(P::Plc));
        }
        assert_eq!(tag(jb.pop(t0 + MS * 220)), None);
        // The stream resumes after a 200 ms pause (timestamps moved on by as much):
        // playout restarts with it after the target delay.
        jb.push(1, 11 * 960, &[1], t0 + MS * 230);
        let mut t = 240;
        let first = loop {
            if let Some(p) = tag(jb.pop(t0 + MS * t)) {
                break p;
            }
            t += 20;
            assert!(t < 400, "playout did not resume");
        };
        assert_eq!(first, P::Pkt(1));
    }
}
