//! The node's Prometheus metrics: packet counters, the forwarding-time histogram,
//! per-room participant counts, and the video downlinks (estimate, allocated and actual
//! bitrate as histograms over subscribers, layer switches, pauses: low cardinality, no
//! series per participant). Workers update plain atomics (no locks on the packet
//! path); room counts change only on joins and leaves and sit behind a mutex.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the forwarding-time buckets, in microseconds.
pub const FORWARD_BUCKETS_US: [u64; 11] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    buckets: [AtomicU64; FORWARD_BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = FORWARD_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(FORWARD_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (upper bound in µs or None for +Inf, cumulative count) per bucket.
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let mut acc = 0;
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                acc += b.load(Ordering::Relaxed);
                (FORWARD_BUCKETS_US.get(i).copied(), acc)
            })
            .collect()
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }
}

/// Upper bounds of the downlink bitrate buckets, in kbit/s.
pub const RATE_BUCKETS_KBPS: [u64; 9] = [100, 250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 50_000];

/// A histogram of bitrates (one sample per video subscriber every few seconds).
#[derive(Debug, Default)]
pub struct RateHistogram {
    buckets: [AtomicU64; RATE_BUCKETS_KBPS.len() + 1],
    sum_bps: AtomicU64,
    count: AtomicU64,
}

impl RateHistogram {
    pub fn observe(&self, bps: u64) {
        let i = RATE_BUCKETS_KBPS
            .iter()
            .position(|&b| bps <= b * 1000)
            .unwrap_or(RATE_BUCKETS_KBPS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_bps.fetch_add(bps, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Ordering::Relaxed);
            match RATE_BUCKETS_KBPS.get(i) {
                Some(k) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {acc}", k * 1000);
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {acc}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum_bps.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

#[derive(Debug, Default)]
pub struct SfuMetrics {
    pub datagrams_received: AtomicU64,
    pub datagrams_sent: AtomicU64,
    pub datagrams_dropped: AtomicU64,
    pub send_errors: AtomicU64,
    /// Audio datagrams dropped unprocessed because they waited too long in the
    /// socket queue (the worker is overloaded).
    pub datagrams_shed: AtomicU64,
    /// RTP packets received from publishers.
    pub rtp_received: AtomicU64,
    /// RTP packets sent to subscribers (one per subscriber per forwarded packet).
    pub rtp_forwarded: AtomicU64,
    /// Time from the kernel receiving a datagram to having sent everything it caused,
    /// for datagrams that were forwarded to at least one subscriber.
    pub forward_time: Histogram,
    /// Video subscribers' downlinks, sampled every few seconds each.
    pub downlink_estimate: RateHistogram,
    pub downlink_allocated: RateHistogram,
    pub downlink_actual: RateHistogram,
    /// Layer changes made by the stream allocators.
    pub layer_switches_up: AtomicU64,
    pub layer_switches_down: AtomicU64,
    /// Per worker: video tracks paused for bandwidth now (summed over subscribers).
    paused: Vec<AtomicU64>,
    /// Dynacast: layer on/off messages sent to publishers.
    pub publish_layer_updates: AtomicU64,
    /// Per worker: room → participants.
    rooms: Mutex<Vec<BTreeMap<String, usize>>>,
}

impl SfuMetrics {
    pub fn new(workers: usize) -> Self {
        SfuMetrics {
            rooms: Mutex::new(vec![BTreeMap::new(); workers]),
            paused: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    /// Worker `w`'s count of video tracks paused for bandwidth.
    pub fn set_paused(&self, w: usize, n: u64) {
        if let Some(a) = self.paused.get(w) {
            a.store(n, Ordering::Relaxed);
        }
    }

    /// Replaces worker `w`'s room sizes (after joins and leaves).
    pub fn set_rooms(&self, w: usize, rooms: impl Iterator<Item = (String, usize)>) {
        if let Ok(mut all) = self.rooms.lock() {
            if let Some(slot) = all.get_mut(w) {
                slot.clear();
                slot.extend(rooms);
            }
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters: [(&str, &str, u64); 10] = [
            (
                "chorus_sfu_datagrams_received_total",
                "UDP datagrams read from the media sockets.",
                g(&self.datagrams_received),
            ),
            (
                "chorus_sfu_datagrams_sent_total",
                "UDP datagrams written to the media sockets.",
                g(&self.datagrams_sent),
            ),
            (
                "chorus_sfu_datagrams_dropped_total",
                "Datagrams from unknown sources or unparseable.",
                g(&self.datagrams_dropped),
            ),
            (
                "chorus_sfu_datagrams_shed_total",
                "Audio datagrams dropped unread after waiting too long in the socket queue (overload).",
                g(&self.datagrams_shed),
            ),
            (
                "chorus_sfu_send_errors_total",
                "Datagrams the socket refused to send.",
                g(&self.send_errors),
            ),
            (
                "chorus_sfu_rtp_received_total",
                "RTP packets received from publishers.",
                g(&self.rtp_received),
            ),
            (
                "chorus_sfu_rtp_forwarded_total",
                "RTP packets sent to subscribers.",
                g(&self.rtp_forwarded),
            ),
            (
                "chorus_sfu_layer_switches_up_total",
                "Video layer raises made by the stream allocators.",
                g(&self.layer_switches_up),
            ),
            (
                "chorus_sfu_layer_switches_down_total",
                "Video layer drops (and pauses) made by the stream allocators.",
                g(&self.layer_switches_down),
            ),
            (
                "chorus_sfu_publish_layer_updates_total",
                "Dynacast messages telling a publisher which layers to encode.",
                g(&self.publish_layer_updates),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let h = "chorus_sfu_forward_seconds";
        let _ = writeln!(
            out,
            "# HELP {h} Time from the kernel receiving a datagram to having sent all it was forwarded as.\n# TYPE {h} histogram"
        );
        for (le, c) in self.forward_time.cumulative() {
            match le {
                Some(us) => {
                    let _ = writeln!(out, "{h}_bucket{{le=\"{}\"}} {c}", us as f64 / 1e6);
                }
                None => {
                    let _ = writeln!(out, "{h}_bucket{{le=\"+Inf\"}} {c}");
                }
            }
        }
        let _ = writeln!(out, "{h}_sum {}", self.forward_time.sum().as_secs_f64());
        let _ = writeln!(out, "{h}_count {}", self.forward_time.count());
        self.downlink_estimate.render(
            &mut out,
            "chorus_sfu_downlink_estimate_bps",
            "Video subscribers' downlink bandwidth estimates, bit/s (sampled every 2 s each).",
        );
        self.downlink_allocated.render(
            &mut out,
            "chorus_sfu_downlink_allocated_bps",
            "Video bitrate the stream allocator granted each subscriber, bit/s.",
        );
        self.downlink_actual.render(
            &mut out,
            "chorus_sfu_downlink_actual_bps",
            "What was forwarded to each video subscriber over the last second, bit/s.",
        );
        let paused: u64 = self.paused.iter().map(g).sum();
        let _ = writeln!(
            out,
            "# HELP chorus_sfu_video_paused_bandwidth Video tracks paused for bandwidth now (over all subscribers).\n# TYPE chorus_sfu_video_paused_bandwidth gauge\nchorus_sfu_video_paused_bandwidth {paused}"
        );
        let merged: BTreeMap<String, usize> = match self.rooms.lock() {
            Ok(all) => all
                .iter()
                .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), *v)))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        let total: usize = merged.values().sum();
        let _ = writeln!(
            out,
            "# HELP chorus_sfu_rooms Rooms with participants on this node.\n# TYPE chorus_sfu_rooms gauge\nchorus_sfu_rooms {}",
            merged.len()
        );
        let _ = writeln!(
            out,
            "# HELP chorus_sfu_participants Participants on this node.\n# TYPE chorus_sfu_participants gauge\nchorus_sfu_participants {total}"
        );
        let _ = writeln!(
            out,
            "# HELP chorus_sfu_room_participants Participants per room.\n# TYPE chorus_sfu_room_participants gauge"
        );
        for (room, n) in &merged {
            let _ = writeln!(
                out,
                "chorus_sfu_room_participants{{room=\"{}\"}} {n}",
                escape_label(room)
            );
        }
        out
    }
}

/// Prometheus label values escape backslash, quote and newline.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(5));
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_secs(1));
        let c = h.cumulative();
        assert_eq!(c[0], (Some(10), 1));
        assert_eq!(c[2], (Some(50), 3));
        assert_eq!(*c.last().unwrap(), (None, 4));
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn render_has_rooms_and_escapes_labels() {
        let m = SfuMetrics::new(2);
        m.set_rooms(0, [("a\"b".to_string(), 2)].into_iter());
        m.set_rooms(1, [("c".to_string(), 3)].into_iter());
        m.rtp_forwarded.fetch_add(7, Ordering::Relaxed);
        let t = m.render();
        assert!(t.contains("chorus_sfu_rtp_forwarded_total 7"), "{t}");
        assert!(t.contains("chorus_sfu_participants 5"), "{t}");
        assert!(
            t.contains("chorus_sfu_room_participants{room=\"a\\\"b\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("chorus_sfu_forward_seconds_bucket{le=\"+Inf\"} 0"),
            "{t}"
        );
    }
}
