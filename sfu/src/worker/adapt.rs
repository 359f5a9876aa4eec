//! Video that follows the network, per subscriber: the bandwidth estimate (str0m's
//! estimator on transport-wide congestion feedback, REMB as a fallback), the stream
//! allocator's decisions applied to the subscriber's down tracks, adaptive stream (the
//! size and visibility of the client's tiles), probing towards what the subscriber
//! wants, and dynacast (telling each publisher which of its layers anybody takes).
//!
//! All of it runs on the room tick, a few times a second per subscriber; the packet path
//! only reads the per-track limit this leaves in each down track.

use chorus_protocol::track::{QualityReason, ReceiveStats, TrackReceive};
use str0m::bwe::{Bitrate, BweKind};

use super::*;
use crate::allocator::{Allocator, Demand, Priority};
use crate::floor::{Floor, FloorInput};
use crate::forwarder::{cap_layer, layer_quality, MAX_LAYERS};

/// Where a subscriber's estimate starts (the default of
/// [`super::WorkerConfig::initial_estimate_bps`]), so the first seconds are not stuck on
/// the lowest layers while the estimator finds its feet.
pub(super) const INITIAL_ESTIMATE: u64 = 3_000_000;

/// How often each subscriber's allocation is revisited (also at once when the user
/// changes a subscription or tracks come and go).
const ALLOCATE_EVERY: Duration = Duration::from_millis(250);

/// How often a video subscriber's `receive_stats` go to signaling.
const STATS_EVERY: Duration = Duration::from_secs(2);

/// A publisher's layer nobody has taken for this long is switched off at the publisher.
pub(super) const DYNACAST_HOLD: Duration = Duration::from_secs(5);

const DYNACAST_EVERY: Duration = Duration::from_millis(500);

/// The desired bitrate given to the estimator is changed only when what the subscriber
/// wants moved by more than this share (percent), so probing is not restarted for noise.
const DESIRED_CHANGE_PCT: u64 = 10;

/// Probing aims this much (percent) above what the subscriber's video would take: the
/// allocator's margin for going up (15%) and a little more.
const PROBE_MARGIN_PCT: u64 = 25;

/// For this long after a subscriber's session starts, every track gets at least its
/// lowest layer (nobody joins a room to find cameras paused by a starting guess).
const STARTUP: Duration = Duration::from_secs(4);

/// For this long after a subscriber's session starts, the allocator goes up as soon as
/// a better allocation fits (no 3 s hold), while the estimate climbs from its start.
const FAST_UP: Duration = Duration::from_secs(10);

/// How long a layer dynacast asked for again stays on offer before it arrives (the
/// publisher's signaling round trip and encoder restart take well under this).
const RESUME_GRACE: Duration = Duration::from_secs(2);

/// What the lowest layer of a track costs before it is measured.
const UNMEASURED_LOWEST: u64 = 100_000;

/// Probing aims at most this far (percent) above the current estimate.
const PROBE_STEP_PCT: u64 = 150;

/// How often str0m reports its peer stats for a video subscriber: its raw estimate
/// (what its pacer paces at; the `EgressBitrateEstimate` event is a 3 s average that lags
/// a collapse by seconds) and the downlink's loss, which the floor decides on.
pub(super) const PEER_STATS_EVERY: Duration = Duration::from_millis(100);

/// An estimate that has not grown (by more than a tenth) for this long while the
/// subscriber wants more and nothing is lost is a stalled estimator, which is started
/// over from it (see [`Downlink::stalled`]); the wait doubles after each restart that
/// found nothing, up to [`STALL_MAX`], and is back to this once the estimate grows.
const STALL: Duration = Duration::from_secs(4);
const STALL_MAX: Duration = Duration::from_secs(32);

/// Bitrates assumed for layers not measured yet (what the web SDK asks the encoder for).
fn nominal_rate(layer: u8, source: TrackSource, simulcast: bool) -> u64 {
    match (source, simulcast, layer) {
        (TrackSource::Screen, false, _) => 2_500_000,
        (_, false, _) => 1_500_000,
        (_, true, 0) => 60_000,
        (_, true, 1) => 500_000,
        _ => 1_500_000,
    }
}

/// The picture size of a layer: measured from a VP8 keyframe, else scaled from a layer
/// that was measured (simulcast layers halve each step down), else 720p at the top.
fn layer_dims(t: &PubTrack, layer: u8) -> (u32, u32) {
    if let Some((w, h)) = t.receiver.dims(layer) {
        return (w as u32, h as u32);
    }
    let top = if t.simulcast() { 2 } else { 0 };
    let (known, (w, h)) = (0..MAX_LAYERS as u8)
        .find_map(|l| t.receiver.dims(l).map(|d| (l, (d.0 as u32, d.1 as u32))))
        .unwrap_or((top, (1280, 720)));
    if layer >= known {
        (w << (layer - known), h << (layer - known))
    } else {
        (w >> (known - layer), h >> (known - layer))
    }
}

/// Adaptive stream: the lowest layer whose picture covers a tile of `size` device
/// pixels (within 15%, as a layer a little smaller than the tile looks the same), or the
/// top layer when none does.
fn view_layer(t: &PubTrack, size: Option<(u32, u32)>) -> Option<u8> {
    let declared = t.declared_layers();
    let top = (0..MAX_LAYERS as u8)
        .rev()
        .find(|l| declared & (1 << l) != 0);
    let Some((w, h)) = size else {
        return top;
    };
    (0..MAX_LAYERS as u8)
        .filter(|l| declared & (1 << l) != 0)
        .find(|l| {
            let (lw, lh) = layer_dims(t, *l);
            lw * 100 >= w * 85 && lh * 100 >= h * 85
        })
        .or(top)
}

/// The highest layer in `mask` at or under `limit`.
fn clip(mask: u8, limit: Option<u8>) -> Option<u8> {
    let limit = limit?;
    (0..=limit.min(MAX_LAYERS as u8 - 1))
        .rev()
        .find(|l| mask & (1 << l) != 0)
}

/// Per demand: its track, the layers the track has (mask), the client's own cap, the
/// adaptive-stream limit and whether the tile is visible.
type DemandInfo = (TrackKey, u8, Option<u8>, Option<u8>, bool);

/// One subscriber's downlink: estimate, allocator, what it receives.
pub(super) struct Downlink {
    /// Bits per second, from str0m's estimator (or REMB).
    pub estimate: u64,
    /// An estimate from transport-wide feedback arrived: REMB is ignored from then on.
    twcc: bool,
    probing: bool,
    alloc: Allocator<TrackKey>,
    /// Reused buffers: the demands of the last run, and per demand the layers the track
    /// has and the client's own cap and view limit.
    demands: Vec<Demand<TrackKey>>,
    info: Vec<DemandInfo>,
    /// The desired bitrate last given to the estimator.
    desired: u64,
    next_run: Instant,
    /// Subscriptions or tracks changed: allocate at the next tick.
    pub dirty: bool,
    /// Bytes (payload and overhead) forwarded since `window_start`, by kind.
    pub audio_bytes: u64,
    pub video_bytes: u64,
    window_start: Instant,
    audio_bps: u64,
    actual_bps: u64,
    next_stats: Instant,
    /// When the session started (see [`STARTUP`]).
    started: Instant,
    /// Tracks paused for bandwidth now; switches counted so far.
    paused: u64,
    switches: (u64, u64),
    /// The lowest-layer floor between the estimate and the allocator.
    floor: Floor,
    /// The estimate when it last moved by more than a tenth, since when, and how long
    /// it may stay there before the estimator is started over (see [`STALL`]).
    stall: (u64, Instant, Duration),
    /// Reused: the lowest-layer rates of the running tracks, in priority order, and
    /// that order (priority, index into the demands).
    running: Vec<u64>,
    order: Vec<(Priority, usize)>,
    /// When str0m last reported its raw estimate in peer stats.
    raw_at: Option<Instant>,
}

impl Downlink {
    pub fn new(now: Instant, initial_estimate: u64) -> Self {
        Downlink {
            estimate: initial_estimate,
            twcc: false,
            probing: false,
            alloc: Allocator::default(),
            demands: Vec::new(),
            info: Vec::new(),
            desired: 0,
            next_run: now,
            dirty: true,
            audio_bytes: 0,
            video_bytes: 0,
            window_start: now,
            started: now,
            audio_bps: 0,
            actual_bps: 0,
            next_stats: now + STATS_EVERY,
            paused: 0,
            switches: (0, 0),
            floor: Floor::default(),
            stall: (initial_estimate, now, STALL),
            running: Vec::new(),
            order: Vec::new(),
            raw_at: None,
        }
    }

    /// str0m's peer stats: its raw estimate and the loss on the subscriber's downlink
    /// over the last second. A collapse of the estimate allocates at once.
    pub fn on_peer_stats(&mut self, now: Instant, raw: Option<u64>, loss: Option<f32>) {
        if let Some(l) = loss {
            self.floor.on_loss(now, l);
        }
        if let Some(r) = raw {
            self.raw_at = Some(now);
            self.twcc = true;
            if r.saturating_mul(4) < self.estimate.saturating_mul(3) {
                self.dirty = true;
            }
            self.estimate = r;
        }
    }

    /// Whether str0m's estimator has stalled and should start over from its estimate.
    /// Why: it can only grow to 1.5x what it sees acknowledged, and its probes fire only
    /// while the sender is application-limited (under 65% of the estimate). The
    /// allocator fills 85% of it, so after a limit is lifted the estimate stayed at
    /// ~320 kbit/s on a free link for over 20 s, the cameras on their lowest layers. A
    /// new start probes at once (at up to three times the estimate: twice the desired
    /// rate, which is at most 1.5x the estimate) and finds the room if there is any.
    fn stalled(&mut self, now: Instant, wanted: u64) -> bool {
        let (base, since, wait) = self.stall;
        if self.estimate.saturating_mul(10) > base.saturating_mul(11) {
            // It grew: a probe found room, or the link did.
            self.stall = (self.estimate, now, STALL);
            return false;
        }
        if self.estimate.saturating_mul(10) < base.saturating_mul(9) {
            self.stall = (self.estimate, now, wait);
            return false;
        }
        let lossless = self.floor.loss() < 0.02;
        let want_more = wanted > self.estimate.saturating_mul(115) / 100;
        if !want_more || !lossless {
            self.stall.1 = now;
            return false;
        }
        if now.saturating_duration_since(since) < wait {
            return false;
        }
        self.stall = (self.estimate, now, (wait * 2).min(STALL_MAX));
        true
    }

    /// A new estimate from str0m.
    pub fn on_estimate(&mut self, kind: &BweKind) {
        match kind {
            BweKind::Twcc { estimate, .. } => {
                self.twcc = true;
                // The smoothed estimate only until peer stats bring the raw one.
                if self.raw_at.is_none() {
                    self.estimate = estimate.as_u64();
                }
            }
            BweKind::Remb { estimate, .. } if !self.twcc => self.estimate = estimate.as_u64(),
            _ => {}
        }
    }

    pub fn paused(&self) -> u64 {
        self.paused
    }
}

impl Worker {
    /// The allocation and dynacast passes of the room tick.
    pub(super) fn adapt(&mut self, now: Instant) {
        let mut ids = std::mem::take(&mut self.adapt_ids);
        ids.clear();
        ids.extend(
            self.participants
                .values()
                .filter(|p| {
                    p.downlink
                        .as_ref()
                        .is_some_and(|d| d.dirty || now >= d.next_run)
                })
                .map(|p| p.id),
        );
        for &id in &ids {
            self.allocate(id, now);
        }
        self.adapt_ids = ids;
        if self.next_dynacast.is_none_or(|t| now >= t) {
            self.next_dynacast = Some(now + DYNACAST_EVERY);
            self.dynacast(now);
        }
    }

    /// Runs one subscriber's allocator and leaves each down track's layer limit.
    fn allocate(&mut self, id: u64, now: Instant) {
        let Some(s) = self.participants.get_mut(&id) else {
            return;
        };
        let Some(dl) = s.downlink.as_mut() else {
            return;
        };
        dl.dirty = false;
        dl.next_run = now + ALLOCATE_EVERY;
        let mut demands = std::mem::take(&mut dl.demands);
        let mut info = std::mem::take(&mut dl.info);
        demands.clear();
        info.clear();
        let Some(s) = self.participants.get(&id) else {
            return;
        };
        let dominant = self
            .detectors
            .get(s.room.as_str())
            .and_then(|d| d.dominant());
        for (key, dt) in &s.downtracks {
            if dt.kind != TrackKind::Video || !dt.ready {
                continue;
            }
            let Some(t) = self
                .participants
                .get(&key.0)
                .and_then(|p| p.tracks.iter().find(|t| t.index == key.1))
            else {
                continue;
            };
            if !t.active {
                continue;
            }
            let declared = t.declared_layers();
            let live = t.receiver.live(now);
            let simulcast = t.simulcast();
            let mut bitrates = [None; MAX_LAYERS];
            for (l, b) in bitrates.iter_mut().enumerate() {
                let bit = 1u8 << l;
                if declared & bit == 0 {
                    continue;
                }
                // A layer is on offer if it arrives, has not started yet, or is off only
                // because dynacast stopped it (asking for it starts it again). One the
                // publisher stopped by itself (its uplink shed it) is not.
                let stopped_by_us = t.sending & bit == 0;
                // Asked for again and on its way: without this the allocation made when
                // the user asked for it (a cap raised, a tile shown) lost the layer until
                // its first packets and took it back only after the 3 s up hold.
                let resuming = t.resumed_at[l]
                    .is_some_and(|at| now.saturating_duration_since(at) < RESUME_GRACE);
                if live & bit != 0 || !t.receiver.seen(l as u8) || stopped_by_us || resuming {
                    let lowest = declared & (bit - 1) == 0;
                    let nominal = nominal_rate(l as u8, t.source, simulcast);
                    let measured = t.receiver.rate(l as u8);
                    *b = Some(if live & bit == 0 && t.receiver.seen(l as u8) {
                        // Stopped (dynacast): its rate from before it stopped, and a
                        // quarter more for the keyframe a restarted encoder opens with.
                        // (Twice it, tried first, kept three cameras that had stopped
                        // their top layers on the middle one for 20 s after a limit
                        // lifted.) Half a second after it is back, the real rate decides.
                        measured.unwrap_or(nominal).saturating_mul(5) / 4
                    } else {
                        measured.unwrap_or(if lowest {
                            // Not measured yet: the lowest layer is never paused on a
                            // guess (a single-layer screen share's nominal 2.5 Mbit/s
                            // would not fit the start); its real rate decides half a
                            // second later.
                            UNMEASURED_LOWEST
                        } else {
                            nominal
                        })
                    });
                }
            }
            let client = clip(declared, cap_layer(dt.cap));
            let view = if dt.visible {
                view_layer(t, dt.size)
            } else {
                None
            };
            let priority = if t.source == TrackSource::Screen {
                Priority::Screen
            } else if dominant == Some(key.0) {
                Priority::DominantCamera
            } else {
                Priority::Camera
            };
            demands.push(Demand {
                key: *key,
                priority,
                max_layer: client.min(view),
                bitrates,
            });
            info.push((*key, declared, client, view, dt.visible));
        }
        // Deterministic order among equal priorities (the map's order is not).
        demands.sort_by_key(|d| d.key);
        info.sort_by_key(|i| i.0);

        let Some(s) = self.participants.get_mut(&id) else {
            return;
        };
        let Some(dl) = s.downlink.as_mut() else {
            return;
        };
        // The forwarded-bytes window: audio is taken off the estimate before video is
        // allocated (it is never paused).
        let el = now.saturating_duration_since(dl.window_start);
        if el >= Duration::from_secs(1) {
            let ms = el.as_millis().max(1) as u64;
            dl.audio_bps = dl.audio_bytes * 8 * 1000 / ms;
            dl.actual_bps = (dl.audio_bytes + dl.video_bytes) * 8 * 1000 / ms;
            dl.audio_bytes = 0;
            dl.video_bytes = 0;
            dl.window_start = now;
        }
        let mut budget = dl.estimate.saturating_sub(dl.audio_bps);
        dl.alloc.fast_up = now.saturating_duration_since(dl.started) < FAST_UP;
        let starting = now.saturating_duration_since(dl.started) < STARTUP;
        if starting {
            // Joining a room of many cameras: everyone's lowest layer at first, whatever
            // the starting estimate says; a link that cannot carry it shows within
            // seconds and the allocator pauses then.
            let lowest: u64 = demands
                .iter()
                .filter(|d| d.max_layer.is_some())
                .filter_map(|d| d.bitrates.iter().flatten().next())
                .sum();
            budget = budget.max(lowest * (100 + 15) / 100);
        }
        // The lowest-layer floor (floor.rs): the tracks that run now, in the order the
        // allocator hands out lowest layers (priority, then key).
        let mut running = std::mem::take(&mut dl.running);
        let mut order = std::mem::take(&mut dl.order);
        running.clear();
        order.clear();
        let mut settled = true;
        for (i, d) in demands.iter().enumerate() {
            let Some(grant) = dl.alloc.layer(d.key) else {
                continue;
            };
            if d.max_layer.is_none() {
                continue;
            }
            order.push((d.priority, i));
            if s.downtracks
                .get(&d.key)
                .is_some_and(|dt| dt.video.current_layer() > Some(grant))
            {
                settled = false;
            }
        }
        order.sort_by_key(|(p, i)| (std::cmp::Reverse(*p), *i));
        running.extend(
            order
                .iter()
                .filter_map(|(_, i)| demands[*i].bitrates.iter().flatten().next()),
        );
        // Only where loss is measured (transport-wide feedback): the floor decides on it.
        let mut restart = None;
        if !starting && dl.twcc {
            let out = dl.floor.update(FloorInput {
                now,
                video_estimate: budget,
                granted: dl.alloc.granted_bps(&demands),
                lowest: &running,
                settled,
            });
            budget = out.budget;
            if out.restart {
                // From what the floor sends, with the audio and a tenth for headers.
                let r = (budget + dl.audio_bps).saturating_mul(110) / 100;
                dl.estimate = r;
                restart = Some(r);
            }
        }
        dl.running = running;
        dl.order = order;

        if dl.alloc.update(now, budget, &demands) {
            // Each change of what this subscriber gets, for reading a shaped-link run.
            debug!(
                participant = id,
                estimate = dl.estimate,
                budget,
                loss = dl.floor.loss(),
                floor = dl.floor.holds(),
                layers = ?dl.alloc.grants().iter().map(|g| g.layer).collect::<Vec<_>>(),
                "allocation"
            );
        }
        let sw = dl.alloc.switches();
        let (up, down) = (sw.up - dl.switches.0, sw.down - dl.switches.1);
        dl.switches = (sw.up, sw.down);
        self.stats.layer_switches_up += up;
        self.stats.layer_switches_down += down;

        let mut paused = 0;
        for (d, (_, declared, client, view, visible)) in demands.iter().zip(&info) {
            let grant = dl.alloc.layer(d.key);
            let Some(dt) = s.downtracks.get_mut(&d.key) else {
                continue;
            };
            let wanted = clip(*declared, d.max_layer);
            dt.limit = if wanted.is_none() { None } else { grant };

            dt.wanted = wanted;
            dt.limit_reason = if client.is_none() {
                None
            } else if !visible {
                Some(QualityReason::View)
            } else if grant < wanted {
                if grant.is_none() {
                    paused += 1;
                }
                Some(QualityReason::Bandwidth)
            } else if view < client {
                Some(QualityReason::View)
            } else {
                None
            };
        }
        self.stats.video_paused_bandwidth =
            (self.stats.video_paused_bandwidth + paused).saturating_sub(dl.paused);
        dl.paused = paused;

        // Probing: let the estimator look for room up to what the subscriber would take,
        // plus the allocator's margin for going up (probing only to the bare sum left
        // the estimate just under what the top layers need with the margin).
        let video_wanted = Allocator::wanted_bps(&demands);
        // Step by step: probing straight for a far-off target pushed a 400 kbit/s link
        // into heavy loss and the loss-based estimate down to 100 kbit/s, where
        // nothing fitted.
        let wanted = (video_wanted * (100 + PROBE_MARGIN_PCT) / 100 + dl.audio_bps)
            .min(dl.estimate.saturating_mul(PROBE_STEP_PCT) / 100);
        let wanted = if dl.floor.holds() {
            // The floor sends more than the estimate: no probes on top, which would only
            // add loss on a link that is full (the loss decides whether the floor stays).
            wanted.min(dl.estimate / 2)
        } else {
            wanted
        };
        dl.probing = video_wanted + dl.audio_bps > dl.estimate;
        let restart = restart.or_else(|| {
            (!dl.floor.holds() && dl.twcc && dl.stalled(now, video_wanted + dl.audio_bps))
                .then_some(dl.estimate)
        });
        let desired_changed = wanted.abs_diff(dl.desired) * 100 > dl.desired * DESIRED_CHANGE_PCT;
        if desired_changed {
            dl.desired = wanted;
        }
        let stats = (now >= dl.next_stats && !demands.is_empty()).then(|| {
            dl.next_stats = now + STATS_EVERY;
            ReceiveStats {
                estimate_bps: dl.estimate,
                allocated_bps: dl.alloc.granted_bps(&demands),
                actual_bps: dl.actual_bps,
                probing: dl.probing,
                tracks: Vec::new(),
            }
        });
        dl.demands = demands;
        dl.info = info;
        let (floor, loss, sheds) = (dl.floor.holds(), dl.floor.loss(), dl.floor.sheds);
        if let Some(r) = restart {
            debug!(
                participant = id,
                restart = r,
                floor,
                "estimator starts over"
            );
        }
        if desired_changed || restart.is_some() {
            let r = catch_unwind(AssertUnwindSafe(|| {
                if let Some(r) = restart {
                    s.rtc.bwe().reset(Bitrate::bps(r));
                }
                s.rtc.bwe().set_desired_bitrate(Bitrate::bps(wanted));
            }));
            if r.is_err() {
                return self.fail(id, "internal error in bandwidth estimation");
            }
        }
        if let Some(mut stats) = stats {
            debug!(
                participant = id,
                estimate = stats.estimate_bps,
                granted = stats.allocated_bps,
                actual = stats.actual_bps,
                wanted,
                floor,
                loss,
                sheds,
                "downlink"
            );
            stats.tracks = self.receive_tracks(id);
            self.events.push(FromNode::ReceiveStats {
                participant: id,
                stats,
            });
        }
    }

    /// What a subscriber receives of each video track, for `receive_stats`.
    fn receive_tracks(&self, id: u64) -> Vec<TrackReceive> {
        let Some(s) = self.participants.get(&id) else {
            return Vec::new();
        };
        let mut out: Vec<TrackReceive> = s
            .downtracks
            .iter()
            .filter(|(_, dt)| dt.kind == TrackKind::Video && dt.ready)
            .filter_map(|(key, dt)| {
                let t = self
                    .participants
                    .get(&key.0)?
                    .tracks
                    .iter()
                    .find(|t| t.index == key.1 && t.active)?;
                let simulcast = t.simulcast();
                let q = |l: Option<u8>| l.map_or(Quality::Off, |l| layer_quality(l, simulcast));
                Some(TrackReceive {
                    track: t.sid.clone(),
                    quality: q(dt.video.current_layer()),
                    allocated: q(dt.limit),
                    reason: dt.reported.and_then(|r| r.1),
                })
            })
            .collect();
        out.sort_by(|a, b| a.track.cmp(&b.track));
        out
    }

    /// Dynacast: for each published video track, the layers some subscriber takes, is
    /// moving to, is granted or would take (its cap and tile allow it); a layer nobody
    /// needed for [`DYNACAST_HOLD`] is switched off at the publisher, and one needed
    /// again is switched on at once.
    fn dynacast(&mut self, now: Instant) {
        let mut changes: Vec<(u64, String, Vec<Quality>)> = Vec::new();
        for members in self.rooms.values() {
            for &pid in members {
                let Some(p) = self.participants.get(&pid) else {
                    continue;
                };
                let mut needs = [0u8; MAX_TRACKS];
                for (i, t) in p.tracks.iter().enumerate() {
                    if t.kind != TrackKind::Video || !t.active {
                        continue;
                    }
                    for m in members.iter().filter(|m| **m != pid) {
                        let Some(dt) = self
                            .participants
                            .get(m)
                            .and_then(|s| s.downtracks.get(&(pid, t.index)))
                        else {
                            continue;
                        };
                        if !dt.ready {
                            continue;
                        }
                        for l in [dt.video.current_layer(), dt.video.target(), dt.limit]
                            .into_iter()
                            .flatten()
                        {
                            needs[i] |= 1 << l;
                        }
                        // Dynacast follows what subscribers would take (cap and tile),
                        // not what their estimates grant now: every layer up to it stays
                        // encoded. Following the grants, a dip in one estimate stopped
                        // the layers above it, the way down led to layers the publisher
                        // had to restart (1-2 s of frozen tiles on a 400 kbit/s link), and
                        // the way back up waited on restarts priced above the estimate
                        // (a camera left on medium for good in the video e2e test).
                        if let Some(w) = dt.wanted {
                            needs[i] |= t.declared_layers() & ((2u16 << w) - 1) as u8;
                        }
                    }
                }
                let Some(p) = self.participants.get_mut(&pid) else {
                    continue;
                };
                for (i, t) in p.tracks.iter_mut().enumerate() {
                    if t.kind != TrackKind::Video || !t.active {
                        continue;
                    }
                    let declared = t.declared_layers();
                    let mut sending = 0;
                    for l in 0..MAX_LAYERS {
                        let bit = 1u8 << l;
                        if declared & bit == 0 {
                            continue;
                        }
                        if needs[i] & bit != 0 {
                            t.needed_at[l] = Some(now);
                        }
                        // A layer first seen here gets the hold as grace.
                        let at = *t.needed_at[l].get_or_insert(now);
                        if now.saturating_duration_since(at) < DYNACAST_HOLD {
                            sending |= bit;
                        }
                    }
                    if sending != t.sending {
                        for (l, at) in t.resumed_at.iter_mut().enumerate() {
                            if sending & !t.sending & (1 << l) != 0 {
                                *at = Some(now);
                            }
                        }
                        t.sending = sending;
                        let simulcast = t.simulcast();
                        let layers = (0..MAX_LAYERS as u8)
                            .filter(|l| sending & (1 << l) != 0)
                            .map(|l| layer_quality(l, simulcast))
                            .collect();
                        debug!(participant = pid, track = %t.sid, sending, "dynacast");
                        changes.push((pid, t.sid.clone(), layers));
                    }
                }
            }
        }
        for (participant, track, layers) in changes {
            self.events.push(FromNode::PublishLayers {
                participant,
                track,
                layers,
            });
        }
    }

    /// A publisher's track started again: its new encoder sends every layer, so the
    /// dynacast state starts over (and a client that kept layers off is told).
    pub(super) fn dynacast_restart(&mut self, id: u64, pos: usize) {
        let Some(t) = self
            .participants
            .get_mut(&id)
            .and_then(|p| p.tracks.get_mut(pos))
        else {
            return;
        };
        let declared = t.declared_layers();
        t.needed_at = [None; MAX_LAYERS];
        if t.sending != declared {
            t.sending = declared;
            let simulcast = t.simulcast();
            let layers = (0..MAX_LAYERS as u8)
                .filter(|l| declared & (1 << l) != 0)
                .map(|l| layer_quality(l, simulcast))
                .collect();
            let track = t.sid.clone();
            self.events.push(FromNode::PublishLayers {
                participant: id,
                track,
                layers,
            });
        }
    }
}

/// The picture size in a VP8 keyframe's first packet (RFC 6386 §9.1: after the 3-byte
/// frame tag, the start code 9d 01 2a, then 14-bit width and height).
pub(super) fn vp8_keyframe_dims(payload: &[u8]) -> Option<(u16, u16)> {
    // Payload descriptor length (RFC 7741 §4.2).
    let b0 = *payload.first()?;
    let mut off = 1;
    if b0 & 0x80 != 0 {
        let x = *payload.get(1)?;
        off += 1;
        if x & 0x80 != 0 {
            off += if payload.get(off)? & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            off += 1;
        }
        if x & 0x30 != 0 {
            off += 1;
        }
    }
    let h = payload.get(off..off + 10)?;
    if h[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([h[6], h[7]]) & 0x3fff;
    let ht = u16::from_le_bytes([h[8], h[9]]) & 0x3fff;
    (w > 0 && ht > 0).then_some((w, ht))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframe_sizes_are_read_and_junk_is_not() {
        // Descriptor with X, I (15-bit picture id), L, T/K; then a keyframe header of a
        // 640x360 picture.
        let mut p = vec![0x90, 0xf0, 0x80 | 0x12, 0x34, 0x05, 0x20];
        p.extend_from_slice(&[0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a]);
        p.extend_from_slice(&640u16.to_le_bytes());
        p.extend_from_slice(&360u16.to_le_bytes());
        assert_eq!(vp8_keyframe_dims(&p), Some((640, 360)));
        // Minimal descriptor.
        let mut q = vec![0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a];
        q.extend_from_slice(&(320u16 | 0x4000).to_le_bytes()); // scale bits ignored
        q.extend_from_slice(&180u16.to_le_bytes());
        assert_eq!(vp8_keyframe_dims(&q), Some((320, 180)));
        for junk in [
            &[][..],
            &[0x90][..],
            &[0x10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10][..],
        ] {
            assert_eq!(vp8_keyframe_dims(junk), None);
        }
        assert_eq!(vp8_keyframe_dims(&p[..p.len() - 1]), None, "truncated");
    }

    #[test]
    fn a_stalled_estimate_starts_the_estimator_over() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut dl = Downlink::new(t0, 320_000);
        let want = 1_500_000;
        assert!(!dl.stalled(s(3), want));
        assert!(dl.stalled(s(4), want), "4 s without growth, more wanted");
        // Nothing found: 8 s until the next one, then 16 s.
        assert!(!dl.stalled(s(11), want));
        dl.estimate = 340_000; // a wobble under a tenth is no growth
        assert!(dl.stalled(s(12), want));
        assert!(!dl.stalled(s(27), want));
        assert!(dl.stalled(s(28), want));
        // Nothing more wanted, or packets lost (it is the link): the clock starts over.
        assert!(!dl.stalled(s(40), 350_000));
        dl.on_peer_stats(s(55), None, Some(0.05));
        assert!(!dl.stalled(s(60), want), "losing packets");
        dl.on_peer_stats(s(61), None, Some(0.0));
        assert!(!dl.stalled(s(62), want), "the clock started over at 60 s");
        assert!(dl.stalled(s(92), want), "32 s at most");
        // Growth brings the wait back to 4 s.
        dl.estimate = 900_000;
        assert!(!dl.stalled(s(93), want));
        assert!(!dl.stalled(s(96), want));
        assert!(dl.stalled(s(97), want));
        // A fall restarts the clock but keeps the wait.
        dl.estimate = 400_000;
        assert!(!dl.stalled(s(98), want));
        assert!(!dl.stalled(s(105), want));
        assert!(dl.stalled(s(106), want));
    }

    #[test]
    fn tile_sizes_pick_the_layer_that_covers_them() {
        let mut t = PubTrack::new(
            1,
            0,
            Mid::from("1"),
            TrackKind::Video,
            TrackSource::Camera,
            vec!["q".into(), "h".into(), "f".into()],
        );
        // Nothing measured: 720p at the top, halving down.
        assert_eq!(view_layer(&t, Some((300, 170))), Some(0));
        assert_eq!(view_layer(&t, Some((400, 225))), Some(1));
        assert_eq!(view_layer(&t, Some((1280, 720))), Some(2));
        assert_eq!(
            view_layer(&t, Some((3840, 2160))),
            Some(2),
            "none covers: top"
        );
        assert_eq!(view_layer(&t, None), Some(2));
        // A 1080p camera measured on its top layer: 960x540 in the middle.
        t.receiver.set_dims(2, (1920, 1080));
        assert_eq!(view_layer(&t, Some((900, 500))), Some(1));
        // Single-layer tracks have only layer 0.
        let s = PubTrack::new(
            1,
            1,
            Mid::from("2"),
            TrackKind::Video,
            TrackSource::Screen,
            vec![],
        );
        assert_eq!(view_layer(&s, Some((100, 100))), Some(0));
        assert_eq!(clip(0b101, Some(1)), Some(0));
        assert_eq!(clip(0b101, None), None);
    }
}
