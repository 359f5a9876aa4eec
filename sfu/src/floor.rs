//! The lowest-layer floor: one per video subscriber, between str0m's bandwidth estimate
//! and the stream allocator. It keeps the video a subscriber is receiving moving when
//! its downlink suddenly shrinks, where the estimate alone pauses it.
//!
//! Why it exists (measured on a 400 kbit/s `tbf` link under three simulcast cameras,
//! `tests/e2e/adaptive.test.mjs`): after the loss burst of a sudden limit, str0m's
//! loss-based estimator settles far under the link (50-130 kbit/s on the 400 kbit/s
//! link) and climbs back only from what gets through. Allocating on it paused every
//! camera although the link carried their lowest layers, and the tiles stayed frozen
//! for 6-10 s.
//!
//! So the floor goes straight to the lowest layers on a collapse (instead of stepping
//! down through the middle ones while the loss goes on), and keeps the running tracks'
//! lowest layers whatever the estimate says. Packet loss, not the estimate, then
//! decides: a link that loses more than [`FloorConfig::max_loss`] of what it is sent
//! cannot carry them all, and the lowest-priority track is shed (paused), one at a
//! time. When the estimator agrees again (it climbs from what is acknowledged), the
//! floor lets go and the allocator works from the estimate as before.
//!
//! Sans-IO: time, the estimate, loss reports and the running tracks come in; the budget
//! for the allocator goes out.

use std::time::{Duration, Instant};

/// Tunables; the defaults are what the node uses.
#[derive(Debug, Clone, Copy)]
pub struct FloorConfig {
    /// A collapse: the estimate (for video) falls under this share (percent) of the most
    /// granted within [`FloorConfig::peak_window`] (the allocator may have stepped down
    /// on the way)...
    pub collapse_pct: u64,
    pub peak_window: Duration,
    /// ...or this share of packets is lost while more than the lowest layers is sent.
    pub collapse_loss: f32,
    /// How long after the lowest layers settle (or after the last shed) the loss is
    /// judged: str0m reports the loss of the last second, so this leaves half a second
    /// for what was sent before to be reported.
    pub judge_after: Duration,
    /// The share of packets lost that says the link cannot carry the floor, when every
    /// report says so for this long (one report's second of loss can be one burst: a
    /// shed camera stays paused until the estimate has room again).
    pub max_loss: f32,
    pub sustained: Duration,
}

impl Default for FloorConfig {
    fn default() -> Self {
        FloorConfig {
            collapse_pct: 50,
            peak_window: Duration::from_secs(2),
            collapse_loss: 0.20,
            judge_after: Duration::from_millis(1500),
            max_loss: 0.10,
            sustained: Duration::from_millis(500),
        }
    }
}

/// What the floor needs to know at each allocation.
#[derive(Debug, Clone, Copy)]
pub struct FloorInput<'a> {
    pub now: Instant,
    /// The estimate less the audio: what the estimator says video may use.
    pub video_estimate: u64,
    /// What the last allocation granted the video (what is being forwarded now).
    pub granted: u64,
    /// The lowest layer's rate of each track that runs (is not paused), highest priority
    /// first, in the order the allocator gives lowest layers out.
    pub lowest: &'a [u64],
    /// Every running track is on its granted layer (no switch down under way).
    pub settled: bool,
}

/// The floor's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorOutput {
    /// The budget for video the allocator should use.
    pub budget: u64,
    /// A collapse just happened: start the estimator over from what the floor sends.
    /// Why: a collapse seen in the loss can leave the estimate far above the link (it
    /// had only fallen from 3 Mbit/s to ~1 Mbit/s on the 400 kbit/s link), and the
    /// allocator went up again on it, into the next collapse, every few seconds.
    pub restart: bool,
}

/// The lowest-layer floor of one subscriber.
#[derive(Debug, Clone)]
pub struct Floor {
    config: FloorConfig,
    /// While the floor holds: the first `keep` running tracks keep their lowest layers,
    /// and loss reports from `judge_at` on decide.
    hold: Option<(Instant, usize)>,
    /// The latest loss report (share of packets lost over the last second) and when it
    /// came.
    loss: Option<(Instant, f32)>,
    /// The most granted lately, and when.
    peak: Option<(u64, Instant)>,
    /// The loss that made the floor shed a track last, while it holds.
    shed_at_loss: Option<f32>,
    /// Since when (report time) every judged report has been over the loss limit.
    lossy_since: Option<Instant>,
    /// Tracks shed because their lowest layers were lost (for logs).
    pub sheds: u64,
    /// Collapses seen (for logs).
    pub collapses: u64,
}

impl Default for Floor {
    fn default() -> Self {
        Self::new(FloorConfig::default())
    }
}

impl Floor {
    pub fn new(config: FloorConfig) -> Self {
        Floor {
            config,
            hold: None,
            loss: None,
            peak: None,
            shed_at_loss: None,
            lossy_since: None,
            sheds: 0,
            collapses: 0,
        }
    }

    /// A loss report (str0m's peer stats: the downlink's loss over the last second).
    pub fn on_loss(&mut self, now: Instant, loss: f32) {
        self.loss = Some((now, loss));
    }

    /// The loss last reported (0 before any report).
    pub fn loss(&self) -> f32 {
        self.loss.map_or(0.0, |l| l.1)
    }

    /// Whether the floor holds the allocation now.
    pub fn holds(&self) -> bool {
        self.hold.is_some()
    }

    /// Decides for this allocation.
    pub fn update(&mut self, i: FloorInput) -> FloorOutput {
        let collapses = self.collapses;
        let budget = self.decide(i);
        FloorOutput {
            budget,
            restart: self.collapses > collapses,
        }
    }

    fn decide(&mut self, i: FloorInput) -> u64 {
        let cfg = self.config;
        let Some((judge_at, keep)) = self.hold else {
            return self.off(i);
        };
        let keep = keep.min(i.lowest.len());
        if keep == 0 {
            self.hold = None;
            self.shed_at_loss = None;
            return i.video_estimate;
        }
        let kept: u64 = i.lowest[..keep].iter().sum();
        if !i.settled {
            // The loss of a layer still being switched away from says nothing about the
            // lowest layers.
            self.hold = Some((judge_at.max(i.now + cfg.judge_after), keep));
            return kept;
        }
        let judged = self.loss.filter(|(at, _)| *at >= judge_at);
        self.lossy_since = match judged {
            Some((at, l)) if l >= cfg.max_loss => Some(self.lossy_since.unwrap_or(at)),
            Some(_) => None,
            None => self.lossy_since.filter(|since| *since >= judge_at),
        };
        let sustained = self
            .lossy_since
            .is_some_and(|since| judged.is_some_and(|(at, _)| at >= since + cfg.sustained));
        match judged.map(|l| l.1) {
            Some(l) if l >= cfg.max_loss && !sustained => {
                self.hold = Some((judge_at, keep));
                kept
            }
            Some(l)
                if l >= cfg.max_loss && self.shed_at_loss.is_some_and(|s| l * 5.0 > s * 4.0) =>
            {
                // Shedding did not bring the loss down by a fifth: it is the link's own
                // (a lossy radio, not a full queue), and pausing more video would not
                // help. Keep what runs.
                self.hold = Some((judge_at, keep));
                kept
            }
            Some(l) if l >= cfg.max_loss => {
                // The link loses what the floor sends: shed the lowest-priority track
                // and judge the rest afresh.
                self.sheds += 1;
                self.shed_at_loss = Some(l);
                self.lossy_since = None;
                self.hold = Some((i.now + cfg.judge_after, keep - 1));
                i.lowest[..keep - 1].iter().sum()
            }
            Some(l) if l < cfg.max_loss / 2.0 && i.video_estimate >= kept => {
                // Delivered, and the estimator agrees: the estimate decides again.
                self.hold = None;
                self.peak = None;
                self.shed_at_loss = None;
                i.video_estimate
            }
            _ => {
                self.hold = Some((judge_at, keep));
                kept
            }
        }
    }

    /// Not holding: the estimate decides, unless it collapsed or slid under the lowest
    /// layers.
    fn off(&mut self, i: FloorInput) -> u64 {
        let cfg = self.config;
        let peak = match self.peak {
            Some((p, at))
                if p > i.granted && i.now.saturating_duration_since(at) <= cfg.peak_window =>
            {
                p
            }
            _ => {
                self.peak = Some((i.granted, i.now));
                i.granted
            }
        };
        let lowest: u64 = i.lowest.iter().sum();
        if lowest == 0 {
            return i.video_estimate;
        }
        let lossy = self.loss.is_some_and(|(at, l)| {
            l >= cfg.collapse_loss
                && i.now.saturating_duration_since(at) < Duration::from_millis(500)
        });
        let collapse = i.video_estimate.saturating_mul(100) < peak.saturating_mul(cfg.collapse_pct)
            || (lossy && i.granted > lowest.saturating_mul(3) / 2);
        if !collapse && i.video_estimate >= lowest {
            return i.video_estimate;
        }
        self.collapses += u64::from(collapse);
        self.hold = Some((i.now + cfg.judge_after, i.lowest.len()));
        lowest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1000;

    struct Run {
        floor: Floor,
        t0: Instant,
        seen_collapses: u64,
    }

    impl Run {
        fn new() -> Self {
            Run {
                floor: Floor::default(),
                t0: Instant::now(),
                seen_collapses: 0,
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// One allocation at `ms` with `estimate` and `granted` (kbit/s) over `lowest`;
        /// returns the budget in kbit/s.
        fn step(&mut self, ms: u64, estimate: u64, granted: u64, lowest: &[u64]) -> u64 {
            self.step_settled(ms, estimate, granted, lowest, true)
        }

        fn step_settled(
            &mut self,
            ms: u64,
            estimate: u64,
            granted: u64,
            lowest: &[u64],
            settled: bool,
        ) -> u64 {
            let lowest: Vec<u64> = lowest.iter().map(|l| l * K).collect();
            let out = self.floor.update(FloorInput {
                now: self.at(ms),
                video_estimate: estimate * K,
                granted: granted * K,
                lowest: &lowest,
                settled,
            });
            assert_eq!(
                out.restart,
                self.floor.collapses > self.seen_collapses,
                "a restart exactly at each collapse"
            );
            self.seen_collapses = self.floor.collapses;
            out.budget / K
        }

        fn loss(&mut self, ms: u64, loss: f32) {
            let at = self.at(ms);
            self.floor.on_loss(at, loss);
        }
    }

    #[test]
    fn a_collapse_goes_to_the_lowest_layers_and_holds_them_while_they_arrive() {
        let mut r = Run::new();
        let three = [90, 90, 90];
        // A steady link: the estimate decides.
        assert_eq!(r.step(0, 3000, 2000, &three), 3000);
        // A drop the allocator handles itself (its own hysteresis).
        assert_eq!(r.step(250, 1500, 2000, &three), 1500);
        // It stepped down to 1200, then the estimate fell under half of the 2000 sent a
        // moment ago: a collapse, straight to the lowest layers.
        assert_eq!(r.step(500, 900, 1200, &three), 270);
        assert!(r.floor.holds());
        // The loss of the collapse itself, reported before the judging starts (2 s), is
        // no verdict; nor is an estimate under the floor while nothing is lost.
        r.loss(1000, 0.6);
        assert_eq!(r.step(1000, 120, 270, &three), 270);
        r.loss(2100, 0.01);
        assert_eq!(r.step(2100, 130, 270, &three), 270);
        r.loss(4000, 0.0);
        assert_eq!(r.step(4000, 200, 270, &three), 270);
        // The estimator climbs to what is delivered: the estimate decides again.
        r.loss(4200, 0.0);
        assert_eq!(r.step(4200, 300, 270, &three), 300);
        assert!(!r.floor.holds());
        assert_eq!((r.floor.collapses, r.floor.sheds), (1, 0));
    }

    #[test]
    fn heavy_loss_while_sending_more_than_the_lowest_layers_is_a_collapse() {
        let mut r = Run::new();
        let three = [90, 90, 90];
        assert_eq!(r.step(0, 2500, 2000, &three), 2500);
        // The estimate has not caught up yet, but a quarter of what is sent is lost.
        r.loss(200, 0.3);
        assert_eq!(r.step(250, 2000, 2000, &three), 270);
        assert_eq!(r.floor.collapses, 1);
        // An old report is no longer news; sending only the lowest layers is no
        // collapse either (the judging decides then).
        let mut r = Run::new();
        r.loss(0, 0.3);
        assert_eq!(r.step(600, 2000, 2000, &three), 2000);
        r.loss(700, 0.3);
        assert_eq!(r.step(700, 2000, 270, &three), 2000);
        assert!(!r.floor.holds());
    }

    #[test]
    fn a_link_that_loses_the_floor_sheds_the_lowest_priority_track_one_at_a_time() {
        let mut r = Run::new();
        let three = [90, 90, 90];
        assert_eq!(r.step(0, 400, 2000, &three), 270);
        // Judged from 1.5 s on: 25% lost for half a second sheds the third track; one
        // report alone, or an interrupted run of them, does not.
        r.loss(1600, 0.25);
        assert_eq!(r.step(1600, 100, 270, &three), 270);
        r.loss(1800, 0.05);
        assert_eq!(r.step(1800, 100, 270, &three), 270);
        r.loss(1900, 0.25);
        assert_eq!(r.step(1900, 100, 270, &three), 270);
        r.loss(2300, 0.3);
        assert_eq!(r.step(2300, 100, 270, &three), 270);
        r.loss(2400, 0.25);
        assert_eq!(r.step(2400, 100, 270, &three), 180);
        // The allocator paused it: two run now. Their judging starts afresh, so a report
        // inside the next 1.5 s does not count.
        let two = [90, 90];
        r.loss(3500, 0.3);
        assert_eq!(r.step(3500, 100, 180, &two), 180);
        r.loss(4000, 0.15);
        assert_eq!(r.step(4000, 100, 180, &two), 180);
        r.loss(4500, 0.15);
        assert_eq!(r.step(4500, 100, 180, &two), 90);
        let one = [90];
        r.loss(6100, 0.0);
        assert_eq!(r.step(6100, 100, 90, &one), 100, "fits: off");
        assert_eq!(r.floor.sheds, 2);
    }

    #[test]
    fn loss_that_shedding_does_not_reduce_is_the_links_and_sheds_no_more() {
        let mut r = Run::new();
        let three = [90, 90, 90];
        assert_eq!(r.step(0, 400, 2000, &three), 270);
        r.loss(1600, 0.12);
        assert_eq!(r.step(1600, 100, 270, &three), 270);
        r.loss(2100, 0.12);
        assert_eq!(r.step(2100, 100, 270, &three), 180);
        // Still 11% lost with one camera fewer: a lossy link, not a full one.
        let two = [90, 90];
        for ms in (3700..=6000).step_by(100) {
            r.loss(ms, 0.11);
            assert_eq!(r.step(ms, 100, 180, &two), 180);
        }
        assert_eq!(r.floor.sheds, 1);
        assert!(r.floor.holds());
    }

    #[test]
    fn a_switch_still_under_way_delays_the_verdict() {
        let mut r = Run::new();
        let three = [90, 90, 90];
        assert_eq!(r.step(0, 400, 2000, &three), 270);
        // Not settled (a track still on its old layer) until 2.5 s: judging from 4 s.
        assert_eq!(r.step_settled(2500, 100, 270, &three, false), 270);
        r.loss(3000, 0.5);
        assert_eq!(r.step(3000, 100, 270, &three), 270);
        r.loss(4000, 0.5);
        assert_eq!(r.step(4000, 100, 270, &three), 270);
        r.loss(4500, 0.5);
        assert_eq!(r.step(4500, 100, 270, &three), 180);
    }

    #[test]
    fn an_estimate_sliding_under_the_lowest_layers_holds_them() {
        let mut r = Run::new();
        let two = [100, 100];
        assert_eq!(r.step(0, 250, 200, &two), 250);
        // 180 < 200: no collapse (not under half of what is sent), but under the floor.
        assert_eq!(r.step(250, 180, 200, &two), 200);
        assert_eq!(r.floor.collapses, 0);
        assert!(r.floor.holds());
        // Nothing running (the user paused everything): nothing to hold.
        assert_eq!(r.step(500, 50, 0, &[]), 50);
        assert!(!r.floor.holds());
    }
}
