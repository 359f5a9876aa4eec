//! The video forwarder: one per (subscriber, video track). Decides which of the
//! publisher's simulcast layers this subscriber receives, switches only at a keyframe
//! of the new layer, and rewrites the RTP sequence number, timestamp and the VP8
//! picture id / TL0PICIDX / KEYIDX so the subscriber sees one continuous stream across
//! layer switches, pauses and publisher restarts.
//!
//! Sans-IO and allocation-free: the worker hands in a parsed packet and gets back the
//! numbering to send it with, or nothing.

use std::time::Instant;

use chorus_media_core::rewrite::RtpRewriter;
use chorus_protocol::track::Quality;

/// Simulcast layers a track can have: 0 = low (`q`), 1 = medium (`h`), 2 = high (`f`).
/// A single-layer track uses layer 0.
pub const MAX_LAYERS: usize = 3;

/// The layer a quality cap allows at most (`None` for `off`).
pub fn cap_layer(cap: Quality) -> Option<u8> {
    match cap {
        Quality::Off => None,
        Quality::Low => Some(0),
        Quality::Medium => Some(1),
        Quality::High => Some(2),
    }
}

/// The quality a layer index stands for, given how many layers the track has: a
/// single-layer track is `high`, whatever its index.
pub fn layer_quality(layer: u8, simulcast: bool) -> Quality {
    if !simulcast {
        return Quality::High;
    }
    match layer {
        0 => Quality::Low,
        1 => Quality::Medium,
        _ => Quality::High,
    }
}

/// Picks the layer to forward: the highest live layer at or under the cap; if none is
/// under the cap, the lowest live layer (a cap never means "nothing" unless it is `off`).
/// `live` is a bit mask of layers that are arriving.
///
/// The bandwidth-driven stream allocator plugs in here by lowering the cap per track
/// (see [`select_layer_at`]); everything after the choice stays as it is.
pub fn select_layer(live: u8, cap: Quality) -> Option<u8> {
    select_layer_at(live, cap_layer(cap))
}

/// [`select_layer`] with the cap as a layer index: the worker passes the least of the
/// subscriber's `max_quality`, its adaptive-stream limit and the allocator's grant.
pub fn select_layer_at(live: u8, max: Option<u8>) -> Option<u8> {
    let max = max?;
    let under = (0..=max).rev().find(|l| live & (1 << l) != 0);
    under.or_else(|| (0..MAX_LAYERS as u8).find(|l| live & (1 << l) != 0))
}

/// The layer a forwarder that shows nothing yet should start on. Normally the target;
/// but if a keyframe request for the target went out within the throttle interval (for
/// another subscriber, whose keyframe has passed), waiting for the next one could take
/// 500 ms: start at once on the highest lower layer that can still be asked for a
/// keyframe, and move up at the target's next keyframe. `requestable` is the mask of
/// layers a request may go out for now.
pub fn startup_layer(target: Option<u8>, requestable: u8) -> Option<u8> {
    let t = target?;
    if requestable & (1 << t) != 0 {
        return Some(t);
    }
    (0..t)
        .rev()
        .find(|l| requestable & (1 << l) != 0)
        .or(Some(t))
}

/// The VP8 payload descriptor fields the forwarder rewrites, as parsed from a packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Vp8Fields {
    /// Picture id and whether it is the 15-bit form.
    pub picture_id: Option<(u16, bool)>,
    pub tl0_pic_idx: Option<u8>,
    pub key_idx: Option<u8>,
}

/// One incoming video packet as the forwarder sees it.
#[derive(Debug, Clone, Copy)]
pub struct VideoIn {
    pub layer: u8,
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    /// The first packet of a keyframe.
    pub keyframe: bool,
    pub vp8: Option<Vp8Fields>,
    pub now: Instant,
}

/// How to send a forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoOut {
    /// Extended output sequence number.
    pub seq: u64,
    pub ts: u32,
    /// Rewritten VP8 fields (same widths as the input), when the input had them.
    pub vp8: Option<Vp8Fields>,
}

/// Continuous VP8 picture numbering across sources.
#[derive(Debug, Clone, Copy, Default)]
struct Vp8Rewriter {
    /// Offsets for the current source (added modulo the field's width).
    pid_offset: u16,
    tl0_offset: u8,
    key_offset: u8,
    /// The fields of the packet with the highest output sequence number so far.
    last: Option<Vp8Fields>,
    /// The next packet starts a new source: compute new offsets from it.
    resync: bool,
}

fn pid_mod(is_15_bit: bool) -> u16 {
    if is_15_bit {
        1 << 15
    } else {
        1 << 7
    }
}

impl Vp8Rewriter {
    fn rewrite(&mut self, f: Vp8Fields, newest: bool) -> Vp8Fields {
        if self.resync {
            self.resync = false;
            if let Some(last) = self.last {
                if let (Some((pin, w)), Some((pout, _))) = (f.picture_id, last.picture_id) {
                    let m = pid_mod(w);
                    let want = (pout + 1) % m;
                    self.pid_offset = (want + m - pin % m) % m;
                }
                if let (Some(tin), Some(tout)) = (f.tl0_pic_idx, last.tl0_pic_idx) {
                    self.tl0_offset = tout.wrapping_add(1).wrapping_sub(tin);
                }
                if let (Some(kin), Some(kout)) = (f.key_idx, last.key_idx) {
                    self.key_offset = (kout + 1).wrapping_sub(kin) & 0x1f;
                }
            }
        }
        let out = Vp8Fields {
            picture_id: f
                .picture_id
                .map(|(p, w)| ((p + self.pid_offset) % pid_mod(w), w)),
            tl0_pic_idx: f.tl0_pic_idx.map(|t| t.wrapping_add(self.tl0_offset)),
            key_idx: f.key_idx.map(|k| (k + self.key_offset) & 0x1f),
        };
        if newest || self.last.is_none() {
            self.last = Some(out);
        }
        out
    }
}

/// Per (subscriber, video track) forwarding state.
#[derive(Debug, Clone)]
pub struct VideoForwarder {
    /// The layer and source SSRC being forwarded now, if any.
    current: Option<(u8, u32)>,
    /// The layer this subscriber should get (from the cap and what is live).
    target: Option<u8>,
    rtp: RtpRewriter,
    vp8: Vp8Rewriter,
    /// Highest output sequence number so far (to tell in-order from late packets).
    max_out: u64,
}

impl Default for VideoForwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl VideoForwarder {
    pub fn new() -> Self {
        VideoForwarder {
            current: None,
            target: None,
            rtp: RtpRewriter::new(90_000),
            vp8: Vp8Rewriter::default(),
            max_out: 0,
        }
    }

    /// The layer being forwarded now.
    pub fn current_layer(&self) -> Option<u8> {
        self.current.map(|(l, _)| l)
    }

    pub fn target(&self) -> Option<u8> {
        self.target
    }

    /// Sets the layer to move to; the move happens at that layer's next keyframe.
    /// `None` stops forwarding at once.
    pub fn set_target(&mut self, target: Option<u8>) {
        self.target = target;
        if target.is_none() {
            self.current = None;
        }
    }

    /// The layer a keyframe is needed on before this forwarder can show the target
    /// (`None` when it already forwards the target).
    pub fn wants_keyframe(&self) -> Option<u8> {
        let t = self.target?;
        (self.current_layer() != Some(t)).then_some(t)
    }

    /// The publisher's stream on the current layer restarted (new SSRC or a jump in
    /// numbering): wait for its next keyframe and continue the numbering from there.
    pub fn restart(&mut self) {
        self.current = None;
    }

    /// Maps one packet; `None` means do not send it to this subscriber.
    pub fn forward(&mut self, p: &VideoIn) -> Option<VideoOut> {
        let target = self.target?;
        let on_current = self.current == Some((p.layer, p.ssrc));
        if !on_current {
            // Only the target layer's keyframe starts (or changes) what is forwarded;
            // until then the current layer keeps flowing, so a switch never freezes
            // the picture or shows a frame the decoder has no reference for.
            if p.layer != target || !p.keyframe {
                return None;
            }
            self.current = Some((p.layer, p.ssrc));
            self.rtp.resync();
            self.vp8.resync = true;
        }
        let rw = self.rtp.rewrite(p.ssrc, p.seq, p.ts, p.now)?;
        let newest = rw.seq > self.max_out;
        if newest {
            self.max_out = rw.seq;
        }
        let vp8 = p.vp8.map(|f| self.vp8.rewrite(f, newest));
        Some(VideoOut {
            seq: rw.seq,
            ts: rw.ts,
            vp8,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A synthetic simulcast publisher: three layers, each with its own SSRC, sequence,
    /// timestamp base and VP8 picture numbering, frames of `pkts` packets every 33 ms.
    struct Pub {
        t0: Instant,
        seq: [u16; 3],
        ts: [u32; 3],
        pid: [u16; 3],
        tl0: [u8; 3],
        key: [u8; 3],
        ssrc: [u32; 3],
        frame: u32,
    }

    impl Pub {
        fn new() -> Self {
            Pub {
                t0: Instant::now(),
                seq: [65530, 100, 30000],
                ts: [u32::MAX - 5000, 7, 1 << 31],
                pid: [32760, 5, 1000],
                tl0: [250, 0, 77],
                key: [30, 0, 9],
                ssrc: [111, 222, 333],
                frame: 0,
            }
        }

        /// The packets of the next frame on every layer; `key` marks a keyframe on the
        /// given layers.
        fn frame(&mut self, key: &[u8], pkts: usize) -> Vec<VideoIn> {
            let now = self.t0 + Duration::from_millis(33 * self.frame as u64);
            self.frame += 1;
            let mut out = Vec::new();
            for l in 0..3u8 {
                let i = l as usize;
                let is_key = key.contains(&l);
                if is_key {
                    self.key[i] = (self.key[i] + 1) & 0x1f;
                }
                self.tl0[i] = self.tl0[i].wrapping_add(1);
                for k in 0..pkts {
                    out.push(VideoIn {
                        layer: l,
                        ssrc: self.ssrc[i],
                        seq: self.seq[i],
                        ts: self.ts[i],
                        keyframe: is_key && k == 0,
                        vp8: Some(Vp8Fields {
                            picture_id: Some((self.pid[i], true)),
                            tl0_pic_idx: Some(self.tl0[i]),
                            key_idx: Some(self.key[i]),
                        }),
                        now,
                    });
                    self.seq[i] = self.seq[i].wrapping_add(1);
                }
                self.ts[i] = self.ts[i].wrapping_add(3000);
                self.pid[i] = (self.pid[i] + 1) % (1 << 15);
            }
            out
        }
    }

    /// Checks packet-by-packet continuity of what a subscriber received: sequence
    /// numbers +1, timestamps non-decreasing and moving once per frame, picture id +1
    /// per frame, TL0PICIDX +1 per frame (every frame is TL0 here), KEYIDX constant
    /// between keyframes and +1 at each.
    fn assert_continuous(out: &[(VideoIn, VideoOut)]) {
        for w in out.windows(2) {
            let (pi, a) = w[0];
            let (ci, b) = w[1];
            assert_eq!(b.seq, a.seq + 1, "sequence gap between {a:?} and {b:?}");
            let (fa, fb) = (a.vp8.unwrap(), b.vp8.unwrap());
            let (pa, pb) = (fa.picture_id.unwrap().0, fb.picture_id.unwrap().0);
            let new_frame = ci.now != pi.now || ci.layer != pi.layer || ci.ssrc != pi.ssrc;
            if new_frame {
                assert_ne!(b.ts, a.ts, "a new frame needs a new timestamp");
                assert!(
                    b.ts.wrapping_sub(a.ts) < 90_000,
                    "timestamp went back or jumped: {} -> {}",
                    a.ts,
                    b.ts
                );
                assert_eq!(pb, (pa + 1) % (1 << 15), "picture id not continuous");
                assert_eq!(
                    fb.tl0_pic_idx.unwrap(),
                    fa.tl0_pic_idx.unwrap().wrapping_add(1),
                    "TL0PICIDX not continuous"
                );
                let (ka, kb) = (fa.key_idx.unwrap(), fb.key_idx.unwrap());
                if ci.keyframe {
                    assert_eq!(kb, (ka + 1) & 0x1f, "KEYIDX must step at a keyframe");
                } else {
                    assert_eq!(kb, ka, "KEYIDX changed without a keyframe");
                }
            } else {
                assert_eq!(b.ts, a.ts, "packets of one frame share a timestamp");
                assert_eq!(pb, pa);
            }
        }
    }

    fn run(f: &mut VideoForwarder, pkts: &[VideoIn], out: &mut Vec<(VideoIn, VideoOut)>) {
        for p in pkts {
            if let Some(o) = f.forward(p) {
                out.push((*p, o));
            }
        }
    }

    #[test]
    fn layer_selection_follows_cap_and_liveness() {
        let all = 0b111;
        // (live, cap, expected)
        let table = [
            (all, Quality::High, Some(2)),
            (all, Quality::Medium, Some(1)),
            (all, Quality::Low, Some(0)),
            (all, Quality::Off, None),
            (0b011, Quality::High, Some(1)),
            (0b001, Quality::High, Some(0)),
            (0b110, Quality::Low, Some(1)),
            (0b100, Quality::Medium, Some(2)),
            (0, Quality::High, None),
        ];
        for (live, cap, want) in table {
            assert_eq!(select_layer(live, cap), want, "live {live:03b} cap {cap:?}");
        }
    }

    #[test]
    fn a_new_subscriber_starts_lower_while_the_target_is_throttled() {
        // (target, requestable, expected start)
        let table = [
            (Some(2), 0b111, Some(2)),
            (Some(2), 0b011, Some(1)),
            (Some(2), 0b001, Some(0)),
            (Some(2), 0b000, Some(2)),
            (Some(1), 0b101, Some(0)),
            (Some(0), 0b110, Some(0)),
            (None, 0b111, None),
        ];
        for (target, req, want) in table {
            assert_eq!(startup_layer(target, req), want, "{target:?} {req:03b}");
        }
    }

    #[test]
    fn starts_only_at_a_keyframe_of_the_target() {
        let mut p = Pub::new();
        let mut f = VideoForwarder::new();
        f.set_target(Some(2));
        assert_eq!(f.wants_keyframe(), Some(2));
        let mut out = Vec::new();
        for _ in 0..5 {
            run(&mut f, &p.frame(&[], 3), &mut out);
        }
        assert!(out.is_empty(), "nothing before a keyframe");
        // A keyframe on another layer does not start it either.
        run(&mut f, &p.frame(&[0, 1], 3), &mut out);
        assert!(out.is_empty());
        run(&mut f, &p.frame(&[2], 3), &mut out);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|(i, _)| i.layer == 2));
        assert!(out[0].0.keyframe);
        assert_eq!(f.wants_keyframe(), None);
    }

    #[test]
    fn switches_down_and_up_only_at_keyframes_and_stays_continuous() {
        let mut p = Pub::new();
        let mut f = VideoForwarder::new();
        let mut out = Vec::new();
        f.set_target(Some(2));
        run(&mut f, &p.frame(&[0, 1, 2], 4), &mut out);
        for _ in 0..10 {
            run(&mut f, &p.frame(&[], 4), &mut out);
        }
        // Cap to low: high keeps flowing until low's keyframe.
        f.set_target(select_layer(0b111, Quality::Low));
        assert_eq!(f.wants_keyframe(), Some(0));
        for _ in 0..3 {
            run(&mut f, &p.frame(&[], 4), &mut out);
        }
        assert!(out.iter().all(|(i, _)| i.layer == 2));
        run(&mut f, &p.frame(&[0], 4), &mut out);
        assert_eq!(out.last().unwrap().0.layer, 0);
        for _ in 0..5 {
            run(&mut f, &p.frame(&[], 4), &mut out);
        }
        // Up again to medium, then high; a keyframe of high arriving while the target is
        // medium is not taken.
        f.set_target(Some(1));
        run(&mut f, &p.frame(&[2], 4), &mut out);
        assert_eq!(out.last().unwrap().0.layer, 0);
        run(&mut f, &p.frame(&[1], 4), &mut out);
        assert_eq!(out.last().unwrap().0.layer, 1);
        f.set_target(Some(2));
        run(&mut f, &p.frame(&[], 4), &mut out);
        run(&mut f, &p.frame(&[2], 4), &mut out);
        assert_eq!(out.last().unwrap().0.layer, 2);
        for _ in 0..3 {
            run(&mut f, &p.frame(&[], 4), &mut out);
        }
        assert_continuous(&out);
        // Every layer change happened on a keyframe's first packet.
        for w in out.windows(2) {
            if w[1].0.layer != w[0].0.layer {
                assert!(w[1].0.keyframe, "switched without a keyframe: {:?}", w[1].0);
            }
        }
    }

    #[test]
    fn pause_and_publisher_restart_continue_the_numbering() {
        let mut p = Pub::new();
        let mut f = VideoForwarder::new();
        let mut out = Vec::new();
        f.set_target(Some(1));
        run(&mut f, &p.frame(&[1], 2), &mut out);
        run(&mut f, &p.frame(&[], 2), &mut out);
        // Paused (max_quality off) for a while, then resumed.
        f.set_target(None);
        for _ in 0..20 {
            run(&mut f, &p.frame(&[1], 2), &mut out);
        }
        let paused_len = out.len();
        assert_eq!(paused_len, 4);
        f.set_target(Some(1));
        run(&mut f, &p.frame(&[], 2), &mut out);
        assert_eq!(out.len(), paused_len, "resume waits for a keyframe");
        run(&mut f, &p.frame(&[1], 2), &mut out);
        // The publisher restarts: new SSRC and numbering on every layer.
        p.ssrc = [444, 555, 666];
        p.seq = [1, 2, 3];
        p.ts = [10, 20, 30];
        p.pid = [0, 0, 0];
        p.tl0 = [0, 0, 0];
        p.key = [0, 0, 0];
        f.restart();
        run(&mut f, &p.frame(&[], 2), &mut out);
        run(&mut f, &p.frame(&[1], 2), &mut out);
        run(&mut f, &p.frame(&[], 2), &mut out);
        assert_continuous(&out);
        assert_eq!(out.last().unwrap().0.ssrc, 555);
        // Timestamps advanced with the wall clock over the pause.
        let first = out[3].1.ts;
        let resumed = out[4].1.ts;
        assert!(
            resumed.wrapping_sub(first) >= 20 * 3000,
            "{first} -> {resumed}"
        );
    }

    #[test]
    fn late_packets_keep_their_place_and_stale_layers_are_dropped() {
        let mut p = Pub::new();
        let mut f = VideoForwarder::new();
        f.set_target(Some(0));
        let k = p.frame(&[0], 3);
        let mut out = Vec::new();
        run(&mut f, &k, &mut out);
        let next = p.frame(&[], 3);
        let low: Vec<_> = next.iter().filter(|i| i.layer == 0).copied().collect();
        // Packet 1 of the frame is late (retransmitted): it maps to its own slot.
        let a = f.forward(&low[0]).unwrap();
        let c = f.forward(&low[2]).unwrap();
        let b = f.forward(&low[1]).unwrap();
        assert_eq!((a.seq + 1, a.seq + 2), (b.seq, c.seq));
        assert_eq!(b.vp8, a.vp8, "a late packet carries its own frame's fields");
        // A packet from before the keyframe that started this layer is never sent.
        let mut old = k[0];
        old.seq = old.seq.wrapping_sub(1);
        old.keyframe = false;
        assert_eq!(f.forward(&old), None);
        // After a switch to layer 1, layer 0's stragglers are dropped.
        f.set_target(Some(1));
        run(&mut f, &p.frame(&[1], 3), &mut out);
        assert_eq!(f.current_layer(), Some(1));
        assert_eq!(f.forward(&low[1]), None);
    }

    #[test]
    fn seven_bit_picture_ids_wrap_in_their_own_width() {
        let mut r = Vp8Rewriter::default();
        let f = |p| Vp8Fields {
            picture_id: Some((p, false)),
            tl0_pic_idx: None,
            key_idx: None,
        };
        assert_eq!(r.rewrite(f(126), true).picture_id, Some((126, false)));
        assert_eq!(r.rewrite(f(127), true).picture_id, Some((127, false)));
        r.resync = true;
        assert_eq!(r.rewrite(f(40), true).picture_id, Some((0, false)));
        assert_eq!(r.rewrite(f(41), true).picture_id, Some((1, false)));
    }
}
