//! The stream allocator: one per subscriber. Given the subscriber's bandwidth estimate
//! and the video tracks it subscribes to, it decides which simulcast layer each track
//! gets, or pauses the track when even its lowest layer does not fit.
//!
//! Priorities: audio is outside the allocator (always forwarded, never paused; the
//! caller takes its bitrate off the estimate), then screen share, then the dominant
//! speaker's camera, then other cameras. Within one priority, tracks go up one layer at
//! a time in turn, so three cameras share a link instead of one taking it all.
//!
//! Hysteresis: go down fast (once the estimate has stayed under what is granted for
//! [`AllocatorConfig::down_hold`], at once when it is far under), go up slowly (only
//! after a better allocation has fitted for [`AllocatorConfig::up_hold`], sized by the
//! lowest estimate of that time, with a margin). A noisy but steady estimate therefore
//! settles on one allocation. What the user does (a new track, a cap raised, a tile
//! shown, a new dominant speaker) is applied at once, within the margin.
//!
//! Sans-IO: time, the estimate and the demands come in; decisions go out.

use std::time::{Duration, Instant};

use crate::forwarder::MAX_LAYERS;

/// The order in which video gets bandwidth: higher first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Camera,
    DominantCamera,
    Screen,
}

/// One video track a subscriber wants, as the allocator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand<K> {
    pub key: K,
    pub priority: Priority,
    /// The highest layer the subscription allows (the client's `max_quality` and
    /// adaptive stream together); `None`: the subscriber wants none of it.
    pub max_layer: Option<u8>,
    /// Bits per second of each layer the track has (measured, or a nominal figure for a
    /// layer not seen yet); `None` for a layer the track does not have.
    pub bitrates: [Option<u64>; MAX_LAYERS],
}

impl<K> Demand<K> {
    fn rate(&self, layer: Option<u8>) -> u64 {
        layer
            .and_then(|l| self.bitrates.get(l as usize).copied().flatten())
            .unwrap_or(0)
    }

    /// The highest layer the track has at or under `limit`.
    fn clip(&self, limit: Option<u8>) -> Option<u8> {
        let limit = limit?;
        (0..=limit.min(MAX_LAYERS as u8 - 1))
            .rev()
            .find(|l| self.bitrates[*l as usize].is_some())
    }

    fn lowest(&self) -> Option<u8> {
        (0..MAX_LAYERS as u8).find(|l| self.bitrates[*l as usize].is_some())
    }

    /// The next layer the track has above `layer`, at or under `limit`.
    fn next_up(&self, layer: u8, limit: Option<u8>) -> Option<u8> {
        let limit = limit?;
        (layer + 1..=limit.min(MAX_LAYERS as u8 - 1)).find(|l| self.bitrates[*l as usize].is_some())
    }
}

/// Tunables; the defaults are what the node uses.
#[derive(Debug, Clone, Copy)]
pub struct AllocatorConfig {
    /// The estimate must stay under what is granted this long before layers drop.
    pub down_hold: Duration,
    /// Dropping is immediate when the estimate is under this share (percent) of what is
    /// granted: a collapse is not noise.
    pub down_at_once_pct: u64,
    /// A better allocation must have fitted this long before it is taken.
    pub up_hold: Duration,
    /// Going up (and anything the user asks for) keeps this margin (percent) between the
    /// estimate and what is granted.
    pub margin_pct: u64,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            down_hold: Duration::from_millis(300),
            down_at_once_pct: 75,
            up_hold: Duration::from_secs(3),
            margin_pct: 15,
        }
    }
}

/// The decision for one track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant<K> {
    pub key: K,
    /// The layer granted (`None`: paused, for bandwidth when `max_layer` is `Some`).
    pub layer: Option<u8>,
    /// The demand's `max_layer` when this was decided.
    pub max_layer: Option<u8>,
    pub priority: Priority,
}

/// Layer switches the allocator made, by direction (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switches {
    pub up: u64,
    pub down: u64,
}

/// The allocator of one subscriber.
#[derive(Debug, Clone)]
pub struct Allocator<K> {
    config: AllocatorConfig,
    grants: Vec<Grant<K>>,
    /// Since when the estimate has been under what is granted.
    over_since: Option<Instant>,
    /// Since when a better allocation has fitted, and the lowest estimate since then.
    up_since: Option<(Instant, u64)>,
    switches: Switches,
    /// Go up without the hold (a session's first seconds, while the estimate climbs
    /// from its start value: waiting 3 s per step would keep a new subscriber on low
    /// layers for ten seconds).
    pub fast_up: bool,
    /// Reused buffers (the allocator runs every few hundred milliseconds per subscriber).
    order: Vec<usize>,
    next: Vec<Option<u8>>,
    cand: Vec<Option<u8>>,
}

impl<K: Copy + PartialEq> Default for Allocator<K> {
    fn default() -> Self {
        Self::new(AllocatorConfig::default())
    }
}

impl<K: Copy + PartialEq> Allocator<K> {
    pub fn new(config: AllocatorConfig) -> Self {
        Allocator {
            config,
            grants: Vec::new(),
            over_since: None,
            up_since: None,
            switches: Switches::default(),
            fast_up: false,
            order: Vec::new(),
            next: Vec::new(),
            cand: Vec::new(),
        }
    }

    /// The current decisions, in the order of the last `demands`.
    pub fn grants(&self) -> &[Grant<K>] {
        &self.grants
    }

    /// The layer granted to one track (`None`: paused or unknown).
    pub fn layer(&self, key: K) -> Option<u8> {
        self.grants
            .iter()
            .find(|g| g.key == key)
            .and_then(|g| g.layer)
    }

    pub fn switches(&self) -> Switches {
        self.switches
    }

    /// Bits per second the current grants add up to.
    pub fn granted_bps(&self, demands: &[Demand<K>]) -> u64 {
        demands.iter().map(|d| d.rate(self.layer(d.key))).sum()
    }

    /// What the subscriber would take with no bandwidth limit: the rate the estimator
    /// should probe towards.
    pub fn wanted_bps(demands: &[Demand<K>]) -> u64 {
        demands.iter().map(|d| d.rate(d.clip(d.max_layer))).sum()
    }

    /// Decides again with a new estimate (bits per second available for video) or new
    /// demands. Returns true if any grant changed.
    pub fn update(&mut self, now: Instant, estimate: u64, demands: &[Demand<K>]) -> bool {
        let pct = self.config.margin_pct;
        let margin = |b: u64| b.saturating_mul(100) / (100 + pct);
        // Carry the grants over, clipped to what each subscription allows now; note
        // whether the user asked for something new.
        let mut structural = false;
        self.next.clear();
        for d in demands {
            match self.grants.iter().find(|g| g.key == d.key) {
                None => {
                    structural = true;
                    self.next.push(None);
                }
                Some(g) => {
                    if d.max_layer > g.max_layer || d.priority != g.priority {
                        structural = true;
                    }
                    let limit = g.layer.min(d.max_layer);
                    self.next.push(d.clip(limit));
                }
            }
        }
        let mut next = std::mem::take(&mut self.next);
        let cost: u64 = demands.iter().zip(&next).map(|(d, l)| d.rate(*l)).sum();

        let mut went_down = false;
        if cost > estimate {
            let since = *self.over_since.get_or_insert(now);
            let collapse = estimate.saturating_mul(100) < cost * self.config.down_at_once_pct;
            if collapse || now.saturating_duration_since(since) >= self.config.down_hold {
                // Never up while going down: each track at most keeps its layer.
                let upper = next.clone();
                self.fit(estimate, demands, Some(&upper), &mut next);
                self.over_since = None;
                self.up_since = None;
                went_down = true;
            }
        } else {
            self.over_since = None;
        }

        if !went_down && structural {
            self.fit(margin(estimate), demands, None, &mut next);
            self.up_since = None;
        } else if !went_down {
            let mut cand = std::mem::take(&mut self.cand);
            self.fit(margin(estimate), demands, None, &mut cand);
            if cand.iter().zip(&next).any(|(c, n)| c > n) {
                let (since, floor) = self.up_since.get_or_insert((now, estimate));
                *floor = (*floor).min(estimate);
                let hold = if self.fast_up {
                    Duration::ZERO
                } else {
                    self.config.up_hold
                };
                if now.saturating_duration_since(*since) >= hold {
                    let floor = *floor;
                    self.fit(margin(floor), demands, None, &mut cand);
                    if cand.iter().zip(&next).any(|(c, n)| c > n) {
                        next.clone_from(&cand);
                    }
                    self.up_since = None;
                }
            } else {
                self.up_since = None;
            }
            self.cand = cand;
        }

        // Record the decisions and count the switches.
        let mut changed = self.grants.len() != demands.len();
        for (d, l) in demands.iter().zip(&next) {
            let prev = self.grants.iter().find(|g| g.key == d.key).map(|g| g.layer);
            if let Some(p) = prev {
                if p != *l {
                    changed = true;
                    if *l > p {
                        self.switches.up += 1;
                    } else {
                        self.switches.down += 1;
                    }
                }
            } else {
                changed = true;
            }
        }
        self.grants.clear();
        self.grants
            .extend(demands.iter().zip(&next).map(|(d, l)| Grant {
                key: d.key,
                layer: *l,
                max_layer: d.max_layer,
                priority: d.priority,
            }));
        self.next = next;
        changed
    }

    /// The allocation for `budget`: first every track's lowest layer in priority order
    /// (a track whose lowest layer does not fit is paused), then up one layer at a time,
    /// in turn within each priority, highest priority first. `upper` bounds each track.
    fn fit(
        &mut self,
        budget: u64,
        demands: &[Demand<K>],
        upper: Option<&[Option<u8>]>,
        out: &mut Vec<Option<u8>>,
    ) {
        let limit = |i: usize, d: &Demand<K>| match upper {
            Some(u) => d.max_layer.min(u.get(i).copied().flatten()),
            None => d.max_layer,
        };
        self.order.clear();
        self.order.extend(0..demands.len());
        // Stable: equal priorities keep the caller's order.
        self.order
            .sort_by_key(|i| std::cmp::Reverse(demands[*i].priority));
        out.clear();
        out.resize(demands.len(), None);
        let mut left = budget;
        for &i in &self.order {
            let d = &demands[i];
            let Some(l0) = d.lowest() else { continue };
            if limit(i, d).is_none_or(|m| l0 > m) {
                continue;
            }
            let c = d.rate(Some(l0));
            if c <= left {
                out[i] = Some(l0);
                left -= c;
            }
        }
        let mut start = 0;
        while start < self.order.len() {
            let prio = demands[self.order[start]].priority;
            let end = self.order[start..]
                .iter()
                .position(|i| demands[*i].priority != prio)
                .map_or(self.order.len(), |n| start + n);
            loop {
                let mut raised = false;
                for &i in &self.order[start..end] {
                    let d = &demands[i];
                    let Some(cur) = out[i] else { continue };
                    let Some(up) = d.next_up(cur, limit(i, d)) else {
                        continue;
                    };
                    let extra = d.rate(Some(up)).saturating_sub(d.rate(Some(cur)));
                    if extra <= left {
                        left -= extra;
                        out[i] = Some(up);
                        raised = true;
                    }
                }
                if !raised {
                    break;
                }
            }
            start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1000;

    /// A simulcast camera with the usual layer rates.
    fn cam(key: u32, prio: Priority, max: Option<u8>) -> Demand<u32> {
        Demand {
            key,
            priority: prio,
            max_layer: max,
            bitrates: [Some(150 * K), Some(500 * K), Some(1500 * K)],
        }
    }

    fn screen(key: u32) -> Demand<u32> {
        Demand {
            key,
            priority: Priority::Screen,
            max_layer: Some(2),
            bitrates: [Some(2500 * K), None, None],
        }
    }

    fn layers(a: &Allocator<u32>) -> Vec<Option<u8>> {
        a.grants().iter().map(|g| g.layer).collect()
    }

    /// Feeds `estimate` (kbit/s) every 100 ms from `t` for `ms`; returns the time after.
    fn run(
        a: &mut Allocator<u32>,
        t: Instant,
        ms: u64,
        estimate: u64,
        d: &[Demand<u32>],
    ) -> Instant {
        let mut now = t;
        for _ in 0..ms / 100 {
            now += Duration::from_millis(100);
            a.update(now, estimate * K, d);
        }
        now
    }

    #[test]
    fn estimate_sequences_give_exact_layers() {
        use Priority::Camera;
        let d = [
            cam(1, Camera, Some(2)),
            cam(2, Camera, Some(2)),
            cam(3, Camera, Some(2)),
        ];
        // (estimate kbit/s, how long, expected layers after it)
        let table: &[(u64, u64, [Option<u8>; 3])] = &[
            // Start (structural, with the 15% margin): 1000/1.15 = 869: all low (450),
            // then medium in turn: +350 fits once.
            (1000, 100, [Some(1), Some(0), Some(0)]),
            // Plenty, held: everyone up, in turn: 3 x 1500 = 4500 fits 6000/1.15.
            (6000, 4000, [Some(2), Some(2), Some(2)]),
            // A drop to 3600 (80% of the 4500 granted): within the down hold nothing
            // yet...
            (3600, 200, [Some(2), Some(2), Some(2)]),
            // ...then as much as fits 3600 without going up anywhere: lows (450),
            // mediums (1500), highs in turn until the third does not fit (3500).
            (3600, 200, [Some(2), Some(2), Some(1)]),
            // A collapse to 400 (under 75% of what is granted) drops at once: two low
            // layers fit, the third camera is paused.
            (400, 100, [Some(0), Some(0), None]),
            // 2000 for a while: 1739 after the margin: 3 x low, then medium, medium (1150),
            // medium for the third would be 1500: fits 1739; so all medium.
            (2000, 4000, [Some(1), Some(1), Some(1)]),
            // Collapse to 100: immediately (under 75%), nothing fits: all paused.
            (100, 100, [None, None, None]),
        ];
        let mut a = Allocator::default();
        let mut t = Instant::now();
        for (i, (est, ms, want)) in table.iter().enumerate() {
            t = run(&mut a, t, *ms, *est, &d);
            assert_eq!(
                layers(&a),
                want.to_vec(),
                "step {i}: {est} kbit/s for {ms} ms"
            );
        }
    }

    #[test]
    fn priority_order_screen_then_dominant_then_cameras() {
        use Priority::*;
        let d = [
            cam(1, Camera, Some(2)),
            cam(2, DominantCamera, Some(2)),
            screen(3),
        ];
        let mut a = Allocator::default();
        let t = Instant::now();
        // 3000/1.15 = 2608: the screen (2500) first; nothing else fits.
        run(&mut a, t, 100, 3000, &d);
        assert_eq!(layers(&a), [None, None, Some(0)]);
        // 3400/1.15 = 2956: screen, then the dominant camera's low (150), then the other
        // camera's low (150): 2800; the dominant goes to medium? +350: no.
        let mut a = Allocator::default();
        run(&mut a, t, 100, 3400, &d);
        assert_eq!(layers(&a), [Some(0), Some(0), Some(0)]);
        // 4000/1.15 = 3478: screen 2500 + 2 x 150 = 2800, dominant to medium +350 = 3150,
        // the other camera to medium +350 = 3500 > 3478: stays low.
        let mut a = Allocator::default();
        run(&mut a, t, 100, 4000, &d);
        assert_eq!(layers(&a), [Some(0), Some(1), Some(0)]);
    }

    #[test]
    fn a_new_dominant_speaker_takes_the_better_layer_at_once() {
        use Priority::*;
        let mut d = [cam(1, DominantCamera, Some(2)), cam(2, Camera, Some(2))];
        let mut a = Allocator::default();
        let t = run(&mut a, Instant::now(), 4000, 1500, &d);
        // 1304 after the margin: both low (300), the dominant to medium (650), the other
        // to medium (1000), the dominant to high would be +1000: no.
        assert_eq!(layers(&a), [Some(1), Some(1)]);
        let d2 = [cam(1, DominantCamera, Some(2)), cam(2, Camera, Some(0))];
        let t = run(&mut a, t, 100, 1500, &d2);
        // The other capped at low: 150 + dominant high 1500 = 1650 > 1304: medium.
        assert_eq!(layers(&a), [Some(1), Some(0)]);
        d[0].priority = Camera;
        d[1].priority = DominantCamera;
        d[1].max_layer = Some(2);
        run(&mut a, t, 100, 1500, &d);
        assert_eq!(layers(&a), [Some(1), Some(1)]);
    }

    #[test]
    fn a_paused_track_resumes_only_after_the_estimate_held() {
        use Priority::Camera;
        let d = [cam(1, Camera, Some(2)), cam(2, Camera, Some(2))];
        let mut a = Allocator::default();
        let t = run(&mut a, Instant::now(), 100, 200, &d);
        assert_eq!(
            layers(&a),
            [Some(0), None],
            "200 kbit/s: one low layer fits"
        );
        // Room for both low layers appears: not before the up hold (3 s)...
        let t = run(&mut a, t, 2800, 400, &d);
        assert_eq!(layers(&a), [Some(0), None]);
        // ...then yes.
        run(&mut a, t, 400, 400, &d);
        assert_eq!(layers(&a), [Some(0), Some(0)]);
    }

    #[test]
    fn a_noisy_steady_estimate_does_not_flap() {
        use Priority::Camera;
        let d = [
            cam(1, Camera, Some(2)),
            cam(2, Camera, Some(2)),
            cam(3, Camera, Some(2)),
        ];
        for center in [300u64, 700, 1200, 2000, 3000, 5000] {
            let mut a = Allocator::default();
            let mut t = Instant::now();
            // A deterministic ±15% wobble (a small LCG), every 100 ms for 10 minutes.
            let mut x: u64 = 12345;
            let settle = Duration::from_secs(10);
            let start = t;
            let mut after_settle = None;
            for _ in 0..6000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (x >> 33) % 3001; // 0..=3000
                let est = center * K * (8500 + r) / 10000;
                t += Duration::from_millis(100);
                a.update(t, est, &d);
                if after_settle.is_none() && t - start >= settle {
                    after_settle = Some(a.switches());
                }
            }
            let s0 = after_settle.unwrap();
            let s = a.switches();
            let later = (s.up + s.down) - (s0.up + s0.down);
            assert!(
                later <= 3,
                "{center} kbit/s ±15%: {later} switches after settling ({s:?})"
            );
        }
    }

    #[test]
    fn down_within_one_second_of_a_sustained_drop() {
        use Priority::Camera;
        let d = [
            cam(1, Camera, Some(2)),
            cam(2, Camera, Some(2)),
            cam(3, Camera, Some(2)),
        ];
        let mut a = Allocator::default();
        let t = run(&mut a, Instant::now(), 5000, 6000, &d);
        assert_eq!(layers(&a), [Some(2); 3]);
        // A drop to 80% of the granted rate (not a collapse): sustained.
        let mut down_at = None;
        for i in 1..=20 {
            let now = t + Duration::from_millis(50 * i);
            a.update(now, 3600 * K, &d);
            if down_at.is_none() && a.granted_bps(&d) <= 3600 * K {
                down_at = Some(now - t);
            }
        }
        let took = down_at.expect("went down");
        assert!(took <= Duration::from_secs(1), "took {took:?}");
        // 3600 fits high, high, medium? 1500+1500+500 = 3500: yes, and nothing else.
        assert_eq!(layers(&a), [Some(2), Some(2), Some(1)]);
    }

    #[test]
    fn what_the_user_asks_is_applied_at_once() {
        use Priority::Camera;
        let mut d = [cam(1, Camera, Some(0)), cam(2, Camera, None)];
        let mut a = Allocator::default();
        let t = run(&mut a, Instant::now(), 1000, 3000, &d);
        assert_eq!(layers(&a), [Some(0), None], "capped low and off");
        // The hidden tile is shown and the cap lifted: no up hold.
        d[0].max_layer = Some(2);
        d[1].max_layer = Some(2);
        a.update(t + Duration::from_millis(100), 3000 * K, &d);
        // 2608: low x2 (300), medium x2 (1000), high for the first (2000): fits; second
        // high (3000): no.
        assert_eq!(layers(&a), [Some(2), Some(1)]);
        // Hiding is immediate too.
        d[0].max_layer = None;
        a.update(t + Duration::from_millis(200), 3000 * K, &d);
        assert_eq!(layers(&a)[0], None);
    }

    #[test]
    fn fast_up_skips_the_hold() {
        use Priority::Camera;
        let d = [cam(1, Camera, Some(2))];
        let mut a = Allocator {
            fast_up: true,
            ..Default::default()
        };
        let t = run(&mut a, Instant::now(), 100, 300, &d);
        assert_eq!(layers(&a), [Some(0)]);
        run(&mut a, t, 100, 2000, &d);
        assert_eq!(layers(&a), [Some(2)], "no 3 s hold");
    }

    #[test]
    fn layers_the_publisher_stopped_are_skipped() {
        use Priority::Camera;
        let mut d = [cam(1, Camera, Some(2))];
        // The publisher's uplink shed its top layer: the allocator treats medium as top.
        d[0].bitrates[2] = None;
        let mut a = Allocator::default();
        let t = run(&mut a, Instant::now(), 100, 5000, &d);
        assert_eq!(layers(&a), [Some(1)]);
        // It comes back: taken after the up hold.
        d[0].bitrates[2] = Some(1500 * K);
        run(&mut a, t, 3500, 5000, &d);
        assert_eq!(layers(&a), [Some(2)]);
        assert_eq!(Allocator::<u32>::wanted_bps(&d), 1500 * K);
    }
}
