//! Counters every simulated participant shares (atomics only: hundreds of tasks update
//! them at packet rate) and the send-time table behind the one-way delay.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::peer::SLOTS;
use crate::video_rx::VideoShared;

/// Delay histogram: 10 µs buckets up to 1 s (values above land in the last bucket).
pub struct DelayHistogram {
    buckets: Vec<AtomicU64>,
}

const BUCKET_NS: u64 = 10_000;
const BUCKETS: usize = 100_000;

impl Default for DelayHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl DelayHistogram {
    pub fn new() -> Self {
        Self::with_buckets(BUCKETS)
    }

    /// At most `n` buckets (fewer cover less than a second: a histogram nobody fills
    /// need not cost 800 KB).
    pub fn with_buckets(n: usize) -> Self {
        DelayHistogram {
            buckets: (0..n.clamp(1, BUCKETS))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    pub fn observe(&self, ns: u64) {
        let i = ((ns / BUCKET_NS) as usize).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// The `q` quantile (0..1) of the samples in `counts` (a snapshot difference), in ms.
    pub fn quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                return Some((i as f64 + 0.5) * BUCKET_NS as f64 / 1e6);
            }
        }
        None
    }
}

pub struct Shared {
    start: Instant,
    pub joined: AtomicU64,
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    pub tx_packets: AtomicU64,
    pub rx_packets: AtomicU64,
    pub lost: AtomicU64,
    pub delay: DelayHistogram,
    /// Packets whose send time had left the ring (more than ~10 s in flight).
    pub unmeasured: AtomicU64,
    /// Audio send times, by publisher index and frame counter.
    sent: SendTimes,
    /// Cameras: their own counters and send times (all zero in audio scenarios).
    pub video: VideoShared,
}

const NS_BITS: u32 = 40;
const NS_MASK: u64 = (1 << NS_BITS) - 1;

/// Per publisher, a ring of `SLOTS` entries (counter << 40 | send time in ns since the
/// run's start), indexed by the counter the stamp carries.
pub struct SendTimes {
    sent: Vec<AtomicU64>,
}

impl SendTimes {
    pub fn new(publishers: usize) -> Self {
        SendTimes {
            sent: (0..publishers.max(1) * SLOTS)
                .map(|_| AtomicU64::new(u64::MAX))
                .collect(),
        }
    }

    pub fn stamp(&self, publisher: u32, counter: u32, ns: u64) {
        let slot = publisher as usize * SLOTS + counter as usize % SLOTS;
        if let Some(s) = self.sent.get(slot) {
            let tag = u64::from(counter & 0xff_ffff) << NS_BITS;
            s.store(tag | (ns & NS_MASK), Ordering::Relaxed);
        }
    }

    pub fn sent_at(&self, publisher: u32, counter: u32) -> Option<u64> {
        let slot = publisher as usize * SLOTS + counter as usize % SLOTS;
        let v = self.sent.get(slot)?.load(Ordering::Relaxed);
        if v == u64::MAX || v >> NS_BITS != u64::from(counter & 0xff_ffff) {
            return None;
        }
        Some(v & NS_MASK)
    }
}

impl Shared {
    pub fn with_cameras(publishers: usize, cameras: usize) -> Self {
        Shared {
            start: Instant::now(),
            joined: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
            rx_packets: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            delay: DelayHistogram::new(),
            unmeasured: AtomicU64::new(0),
            sent: SendTimes::new(publishers),
            video: VideoShared::new(cameras),
        }
    }

    pub fn elapsed_ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_nanos() as u64 & NS_MASK
    }

    pub fn stamp(&self, publisher: u32, counter: u32, t: Instant) {
        self.sent.stamp(publisher, counter, self.elapsed_ns(t));
    }

    /// Send time (ns since start) of `counter` from `publisher`, if its slot still
    /// holds it (a packet older than the ring is not measured).
    pub fn sent_at(&self, publisher: u32, counter: u32) -> Option<u64> {
        self.sent.sent_at(publisher, counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_stale_slots_are_refused() {
        let s = Shared::with_cameras(2, 0);
        let t = Instant::now();
        s.stamp(1, 7, t);
        assert_eq!(s.sent_at(1, 7), Some(s.elapsed_ns(t)));
        assert_eq!(s.sent_at(1, 7 + SLOTS as u32), None);
        assert_eq!(s.sent_at(0, 7), None);
        assert_eq!(s.sent_at(9, 7), None);
    }

    #[test]
    fn quantiles_come_from_bucket_counts() {
        let mut c = vec![0u64; 10];
        c[1] = 50; // 10–20 µs
        c[5] = 50; // 50–60 µs
        assert_eq!(DelayHistogram::quantile_ms(&c, 0.5), Some(0.015));
        assert_eq!(DelayHistogram::quantile_ms(&c, 0.99), Some(0.055));
        assert_eq!(DelayHistogram::quantile_ms(&[0; 4], 0.5), None);
    }
}
