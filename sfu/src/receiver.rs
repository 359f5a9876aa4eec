//! The receiver of one published video track: which simulcast layers arrive (and on
//! which SSRC), and keyframe requests to the publisher, throttled per layer so twenty
//! subscribers asking at once cost the publisher one keyframe, not twenty.
//!
//! It also measures each layer's bitrate and keeps its picture size (from VP8 keyframes)
//! for the stream allocator and adaptive stream.
//!
//! Sans-IO: the worker tells it about packets and requests with the time, and sends the
//! PLI/FIR it returns.

use std::time::{Duration, Instant};

use crate::forwarder::MAX_LAYERS;

/// At most one keyframe request per publisher layer in this interval.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(500);

/// Bytes a packet costs on the wire beyond its payload (IPv4, UDP, RTP with the usual
/// extensions, SRTP tag): a 50 packets/s audio stream spends ~20 kbit/s on them, so rates
/// that feed the allocator count them as the bandwidth estimate does.
pub const PACKET_OVERHEAD: u64 = 20 + 8 + 12 + 12 + 10;

/// Length of the window a layer's bitrate is measured over.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// A layer that sent nothing for this long is taken as stopped (the publisher's encoder
/// dropped it, or the track was unpublished); subscribers move to another layer.
pub const LAYER_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, Default)]
struct Layer {
    ssrc: Option<u32>,
    last_packet: Option<Instant>,
    /// When the last keyframe request for this layer went out.
    last_request: Option<Instant>,
    /// A request was wanted while the layer's SSRC was unknown (nothing arrived yet):
    /// sent as soon as it is.
    pending: bool,
    /// Bytes (with [`PACKET_OVERHEAD`]) since `window_start`.
    window_bytes: u64,
    window_start: Option<Instant>,
    /// Smoothed bits per second; kept (not decayed) while the layer is stopped, so a
    /// paused layer still has a price when the allocator considers asking for it.
    rate: u64,
    /// Picture size from the layer's latest VP8 keyframe.
    dims: Option<(u16, u16)>,
}

/// State of one published video track.
#[derive(Debug, Clone, Default)]
pub struct Receiver {
    layers: [Layer; MAX_LAYERS],
}

/// A keyframe request to send to the publisher on this SSRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyframeRequest {
    pub layer: u8,
    pub ssrc: u32,
}

impl Receiver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a packet of `layer` with `len` payload bytes. A request that waited for
    /// this layer's SSRC is returned through `request`.
    pub fn on_packet(
        &mut self,
        layer: u8,
        ssrc: u32,
        len: usize,
        now: Instant,
        request: &mut Option<KeyframeRequest>,
    ) {
        let Some(l) = self.layers.get_mut(layer as usize) else {
            return;
        };
        l.ssrc = Some(ssrc);
        let resumed = l
            .last_packet
            .is_none_or(|t| now.saturating_duration_since(t) >= LAYER_TIMEOUT);
        l.last_packet = Some(now);
        if resumed {
            // A gap is not part of the rate: start a fresh window.
            l.window_start = Some(now);
            l.window_bytes = 0;
        }
        l.window_bytes += len as u64 + PACKET_OVERHEAD;
        if let Some(start) = l.window_start {
            let el = now.saturating_duration_since(start);
            if el >= RATE_WINDOW {
                let r = l.window_bytes * 8 * 1000 / (el.as_millis() as u64).max(1);
                l.rate = if l.rate == 0 { r } else { (l.rate + r) / 2 };
                l.window_start = Some(now);
                l.window_bytes = 0;
            }
        }
        if l.pending {
            l.pending = false;
            *request = self.request(layer, now);
        }
    }

    /// The layer's measured bitrate (bits per second), if it has been measured.
    pub fn rate(&self, layer: u8) -> Option<u64> {
        self.layers
            .get(layer as usize)
            .map(|l| l.rate)
            .filter(|r| *r > 0)
    }

    /// Whether anything arrived on the layer since the track (re)started.
    pub fn seen(&self, layer: u8) -> bool {
        self.layers
            .get(layer as usize)
            .is_some_and(|l| l.last_packet.is_some())
    }

    /// The layer's picture size, from its latest VP8 keyframe.
    pub fn dims(&self, layer: u8) -> Option<(u16, u16)> {
        self.layers.get(layer as usize).and_then(|l| l.dims)
    }

    pub fn set_dims(&mut self, layer: u8, dims: (u16, u16)) {
        if let Some(l) = self.layers.get_mut(layer as usize) {
            l.dims = Some(dims);
        }
    }

    /// Bit mask of layers that arrived within [`LAYER_TIMEOUT`].
    pub fn live(&self, now: Instant) -> u8 {
        let mut m = 0;
        for (i, l) in self.layers.iter().enumerate() {
            if l.last_packet
                .is_some_and(|t| now.saturating_duration_since(t) < LAYER_TIMEOUT)
            {
                m |= 1 << i;
            }
        }
        m
    }

    /// Bit mask of live layers a keyframe request could go out for now (not within
    /// [`KEYFRAME_INTERVAL`] of the last one).
    pub fn requestable(&self, now: Instant) -> u8 {
        let mut m = 0;
        for (i, l) in self.layers.iter().enumerate() {
            let throttled = l
                .last_request
                .is_some_and(|t| now.saturating_duration_since(t) < KEYFRAME_INTERVAL);
            if l.ssrc.is_some() && !throttled {
                m |= 1 << i;
            }
        }
        m & self.live(now)
    }

    /// The SSRC a layer arrives on.
    pub fn ssrc(&self, layer: u8) -> Option<u32> {
        self.layers.get(layer as usize).and_then(|l| l.ssrc)
    }

    /// Asks for a keyframe on `layer`: returns the request to send now, or `None` if one
    /// went out within [`KEYFRAME_INTERVAL`] (that keyframe serves this asker too) or
    /// the layer has not arrived yet (then it is sent when it does).
    pub fn request(&mut self, layer: u8, now: Instant) -> Option<KeyframeRequest> {
        let l = self.layers.get_mut(layer as usize)?;
        if l.last_request
            .is_some_and(|t| now.saturating_duration_since(t) < KEYFRAME_INTERVAL)
        {
            return None;
        }
        let Some(ssrc) = l.ssrc else {
            l.pending = true;
            return None;
        };
        l.last_request = Some(now);
        Some(KeyframeRequest { layer, ssrc })
    }

    /// The publisher's stream restarted (unpublished and published again): forget what
    /// arrived before, so subscribers wait for the new stream.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.last_packet = None;
            l.pending = false;
        }
    }

    /// Whether the layer's SSRC changed from what was recorded (a publisher restart).
    pub fn ssrc_changed(&self, layer: u8, ssrc: u32) -> bool {
        self.ssrc(layer).is_some_and(|s| s != ssrc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_subscribers_asking_cost_one_request_per_interval() {
        let t0 = Instant::now();
        let mut r = Receiver::new();
        let mut req = None;
        r.on_packet(2, 99, 1000, t0, &mut req);
        assert_eq!(req, None);
        let mut sent = Vec::new();
        // Twenty subscribers each ask every 50 ms for two seconds.
        for step in 0..40u64 {
            let now = t0 + Duration::from_millis(step * 50);
            for _ in 0..20 {
                if let Some(k) = r.request(2, now) {
                    sent.push((now, k));
                }
            }
        }
        assert_eq!(sent.len(), 4, "one per 500 ms over 2 s: {sent:?}");
        for w in sent.windows(2) {
            assert!(w[1].0 - w[0].0 >= KEYFRAME_INTERVAL);
        }
        assert!(sent.iter().all(|(_, k)| k.ssrc == 99 && k.layer == 2));
        let just_after = sent[3].0 + Duration::from_millis(10);
        assert_eq!(r.requestable(just_after) & 0b100, 0, "layer 2 is throttled");
        // Another layer has its own budget.
        assert!(
            r.request(1, t0).is_none(),
            "layer 1 has not arrived: deferred"
        );
        let mut req = None;
        r.on_packet(1, 77, 1000, t0 + Duration::from_millis(10), &mut req);
        assert_eq!(req, Some(KeyframeRequest { layer: 1, ssrc: 77 }));
    }

    #[test]
    fn layers_go_live_and_time_out() {
        let t0 = Instant::now();
        let mut r = Receiver::new();
        let mut req = None;
        r.on_packet(0, 1, 1000, t0, &mut req);
        r.on_packet(0, 1, 1000, t0 + Duration::from_millis(30), &mut req);
        r.on_packet(2, 3, 1000, t0 + Duration::from_millis(40), &mut req);
        assert_eq!(r.live(t0 + Duration::from_millis(50)), 0b101);
        // Layer 2 stops; layer 0 keeps coming.
        for i in 1..60u64 {
            r.on_packet(
                0,
                1,
                1000,
                t0 + Duration::from_millis(40 + i * 33),
                &mut req,
            );
        }
        assert_eq!(r.live(t0 + Duration::from_millis(40 + 59 * 33)), 0b001);
        assert!(r.ssrc_changed(0, 5));
        assert!(!r.ssrc_changed(0, 1));
        r.reset();
        assert_eq!(r.live(t0 + Duration::from_millis(40 + 59 * 33)), 0);
    }

    #[test]
    fn layer_rates_are_measured_with_packet_overhead_and_kept_while_stopped() {
        let t0 = Instant::now();
        let mut r = Receiver::new();
        let mut req = None;
        // 100 packets/s of 1188 bytes (+62 overhead = 1250 B = 10 kbit): 1 Mbit/s.
        for i in 0..300u64 {
            r.on_packet(1, 5, 1188, t0 + Duration::from_millis(i * 10), &mut req);
        }
        let rate = r.rate(1).expect("measured");
        assert!((950_000..=1_050_000).contains(&rate), "{rate}");
        assert_eq!(r.rate(0), None);
        // The layer stops for 5 s and comes back: the gap does not drag the rate down.
        let back = t0 + Duration::from_secs(8);
        for i in 0..100u64 {
            r.on_packet(1, 5, 1188, back + Duration::from_millis(i * 10), &mut req);
        }
        let rate = r.rate(1).expect("measured");
        assert!((950_000..=1_050_000).contains(&rate), "after a gap: {rate}");
    }
}
