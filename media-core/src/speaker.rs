//! Active-speaker detection from audio levels (RFC 6464 units), with hysteresis so the
//! "speaking" indicator neither flickers on single loud packets nor drops between words.
//!
//! Feed every audio level you see with [`SpeakerDetector::observe`], call
//! [`SpeakerDetector::tick`] when time passes without packets (muted or gone publishers
//! must still stop "speaking"), and drain [`SpeakerDetector::poll_event`].
//!
//! It also tracks the *dominant* speaker (the one a UI enlarges, or a subscriber with
//! limited bandwidth prefers): the loudest of those speaking, sticky on purpose. Whoever
//! speaks first becomes dominant; another speaker only takes over by being
//! `dominant_margin` dB louder (smoothed) for `dominant_hold`, or when the dominant one
//! stops speaking. When nobody speaks the last dominant speaker stays dominant. Changes
//! come out of [`SpeakerDetector::poll_dominant`], separately from the
//! started/stopped events.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct SpeakerConfig {
    /// Levels at or below this (i.e. louder than -threshold dBov) count as voice.
    pub threshold: u8,
    /// Continuous voice needed before "speaking" turns on.
    pub attack: Duration,
    /// Quiet gaps shorter than this do not break a run of voice during attack.
    pub gap: Duration,
    /// Time without voice before "speaking" turns off.
    pub hangover: Duration,
    /// How much louder (dB, smoothed) a speaker must be to take over as dominant from
    /// one who is still speaking.
    pub dominant_margin: u8,
    /// How long that must last before the switch.
    pub dominant_hold: Duration,
}

impl Default for SpeakerConfig {
    fn default() -> Self {
        SpeakerConfig {
            threshold: 50,
            attack: Duration::from_millis(60),
            gap: Duration::from_millis(100),
            hangover: Duration::from_millis(600),
            dominant_margin: 6,
            dominant_hold: Duration::from_millis(400),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeakerEvent<K> {
    Started(K),
    Stopped(K),
}

/// A change of dominant speaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DominantEvent<K> {
    /// `K` is now the dominant speaker.
    Changed(K),
    /// The dominant speaker was removed and nobody is speaking to replace them.
    Cleared,
}

#[derive(Debug, Default)]
struct State {
    speaking: bool,
    run_start: Option<Instant>,
    last_voice: Option<Instant>,
    /// Smoothed loudness in dB above -127 dBov (127 - level); `None` before the first
    /// level.
    loudness: Option<f32>,
}

/// Weight of a new level in the loudness average: about 5 packets (100 ms) of memory,
/// enough to ride over syllables without lagging a real change by much.
const LOUDNESS_ALPHA: f32 = 0.2;

/// Per-room (or per-worker) detector keyed by participant.
#[derive(Debug)]
pub struct SpeakerDetector<K> {
    config: SpeakerConfig,
    states: HashMap<K, State>,
    events: VecDeque<SpeakerEvent<K>>,
    dominant: Option<K>,
    /// A louder speaker and since when it has been louder by the margin.
    challenger: Option<(K, Instant)>,
    dominant_events: VecDeque<DominantEvent<K>>,
}

impl<K: Copy + Eq + Hash> SpeakerDetector<K> {
    pub fn new(config: SpeakerConfig) -> Self {
        SpeakerDetector {
            config,
            states: HashMap::new(),
            events: VecDeque::new(),
            dominant: None,
            challenger: None,
            dominant_events: VecDeque::new(),
        }
    }

    /// One audio level (0 loudest … 127 silent) from `who` at `now`.
    pub fn observe(&mut self, who: K, level: u8, now: Instant) {
        let cfg = self.config;
        let st = self.states.entry(who).or_default();
        let loud = 127.0 - f32::from(level.min(127));
        st.loudness = Some(match st.loudness {
            None => loud,
            Some(l) => l + LOUDNESS_ALPHA * (loud - l),
        });
        if level <= cfg.threshold {
            if st.run_start.is_none() {
                st.run_start = Some(now);
            }
            st.last_voice = Some(now);
            if let Some(start) = st.run_start {
                if !st.speaking && now.saturating_duration_since(start) >= cfg.attack {
                    st.speaking = true;
                    self.events.push_back(SpeakerEvent::Started(who));
                }
            }
        } else if let Some(last) = st.last_voice {
            if !st.speaking && now.saturating_duration_since(last) > cfg.gap {
                st.run_start = None;
            }
        }
        self.expire(who, now);
        self.challenge(who, now);
    }

    /// Turns off anyone whose voice stopped more than the hangover ago.
    pub fn tick(&mut self, now: Instant) {
        let hangover = self.config.hangover;
        for (who, st) in self.states.iter_mut() {
            if st.speaking {
                if let Some(last) = st.last_voice {
                    if now.saturating_duration_since(last) >= hangover {
                        st.speaking = false;
                        st.run_start = None;
                        self.events.push_back(SpeakerEvent::Stopped(*who));
                    }
                }
            }
        }
        self.replace_silent_dominant();
        if let Some((c, _)) = self.challenger {
            self.challenge(c, now);
        }
    }

    /// If the dominant speaker is not speaking (or there is none), the loudest of
    /// those speaking takes over at once.
    fn replace_silent_dominant(&mut self) {
        if self.dominant.is_some_and(|d| self.is_speaking(d)) {
            return;
        }
        let loudest = self
            .states
            .iter()
            .filter(|(_, s)| s.speaking)
            .max_by(|a, b| {
                let la = a.1.loudness.unwrap_or(0.0);
                let lb = b.1.loudness.unwrap_or(0.0);
                la.total_cmp(&lb)
            })
            .map(|(k, _)| *k);
        if let Some(k) = loudest {
            self.set_dominant(k);
        }
    }

    /// `who` is speaking while someone else is dominant: it takes over once it has
    /// been `dominant_margin` dB louder for `dominant_hold`.
    fn challenge(&mut self, who: K, now: Instant) {
        let Some(st) = self.states.get(&who) else {
            return;
        };
        // Only a speaker who has voice right now can challenge: one who went quiet (or
        // whose packets stopped) keeps "speaking" through the hangover but its last
        // loudness is stale.
        let has_voice = st
            .last_voice
            .is_some_and(|t| now.saturating_duration_since(t) <= self.config.gap);
        if !st.speaking || !has_voice {
            if self.challenger.is_some_and(|(c, _)| c == who) {
                self.challenger = None;
            }
            return;
        }
        let dom = match self.dominant {
            Some(d) if d == who => return,
            Some(d) if self.is_speaking(d) => d,
            _ => {
                self.set_dominant(who);
                return;
            }
        };
        let mine = st.loudness.unwrap_or(0.0);
        let theirs = self
            .states
            .get(&dom)
            .and_then(|s| s.loudness)
            .unwrap_or(0.0);
        if mine >= theirs + f32::from(self.config.dominant_margin) {
            match self.challenger {
                Some((c, since)) if c == who => {
                    if now.saturating_duration_since(since) >= self.config.dominant_hold {
                        self.set_dominant(who);
                    }
                }
                _ => self.challenger = Some((who, now)),
            }
        } else if self.challenger.is_some_and(|(c, _)| c == who) {
            self.challenger = None;
        }
    }

    fn set_dominant(&mut self, who: K) {
        self.challenger = None;
        if self.dominant != Some(who) {
            self.dominant = Some(who);
            self.dominant_events.push_back(DominantEvent::Changed(who));
        }
    }

    /// The current dominant speaker (the last one, if nobody speaks now).
    pub fn dominant(&self) -> Option<K> {
        self.dominant
    }

    /// Next change of dominant speaker, separate from [`poll_event`](Self::poll_event).
    pub fn poll_dominant(&mut self) -> Option<DominantEvent<K>> {
        self.dominant_events.pop_front()
    }

    fn expire(&mut self, who: K, now: Instant) {
        if let Some(st) = self.states.get_mut(&who) {
            if st.speaking {
                if let Some(last) = st.last_voice {
                    if now.saturating_duration_since(last) >= self.config.hangover {
                        st.speaking = false;
                        st.run_start = None;
                        self.events.push_back(SpeakerEvent::Stopped(who));
                    }
                }
            }
        }
    }

    /// Forgets a participant; emits `Stopped` if they were speaking.
    pub fn remove(&mut self, who: K) {
        if let Some(st) = self.states.remove(&who) {
            if st.speaking {
                self.events.push_back(SpeakerEvent::Stopped(who));
            }
        }
        if self.challenger.is_some_and(|(c, _)| c == who) {
            self.challenger = None;
        }
        if self.dominant == Some(who) {
            self.dominant = None;
            self.replace_silent_dominant();
            if self.dominant.is_none() {
                self.dominant_events.push_back(DominantEvent::Cleared);
            }
        }
    }

    pub fn is_speaking(&self, who: K) -> bool {
        self.states.get(&who).is_some_and(|s| s.speaking)
    }

    pub fn poll_event(&mut self) -> Option<SpeakerEvent<K>> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the detector with one level every 20 ms and returns (ms, event) pairs.
    fn run(levels: &[(u32, u8)], until_ms: u32) -> Vec<(u32, SpeakerEvent<u8>)> {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        let mut out = Vec::new();
        let mut ms = 0;
        let mut i = 0;
        while ms <= until_ms {
            let now = t0 + Duration::from_millis(ms as u64);
            while i < levels.len() && levels[i].0 == ms {
                d.observe(1, levels[i].1, now);
                i += 1;
            }
            d.tick(now);
            while let Some(e) = d.poll_event() {
                out.push((ms, e));
            }
            ms += 20;
        }
        out
    }

    fn steady(from: u32, to: u32, level: u8) -> Vec<(u32, u8)> {
        (from..to).step_by(20).map(|t| (t, level)).collect()
    }

    #[test]
    fn continuous_voice_starts_after_attack_and_stops_after_hangover() {
        let mut levels = steady(0, 1000, 20);
        levels.extend(steady(1000, 3000, 127));
        let ev = run(&levels, 3000);
        assert_eq!(
            ev,
            vec![
                (60, SpeakerEvent::Started(1)),
                (1580, SpeakerEvent::Stopped(1))
            ]
        );
    }

    #[test]
    fn a_single_loud_packet_does_not_trigger() {
        let mut levels = steady(0, 200, 127);
        levels.push((200, 10));
        levels.extend(steady(220, 2000, 127));
        assert_eq!(run(&levels, 2000), vec![]);
    }

    #[test]
    fn short_pauses_between_words_keep_speaking() {
        // 300 ms voice, 200 ms pause, 300 ms voice, then silence.
        let mut levels = steady(0, 300, 30);
        levels.extend(steady(300, 500, 127));
        levels.extend(steady(500, 800, 30));
        levels.extend(steady(800, 2000, 127));
        let ev = run(&levels, 2000);
        assert_eq!(
            ev,
            vec![
                (60, SpeakerEvent::Started(1)),
                (1380, SpeakerEvent::Stopped(1))
            ]
        );
    }

    #[test]
    fn packets_stopping_still_ends_speaking() {
        // Muted publisher: voice then no packets at all.
        let levels = steady(0, 500, 30);
        let ev = run(&levels, 2000);
        assert_eq!(
            ev,
            vec![
                (60, SpeakerEvent::Started(1)),
                (1080, SpeakerEvent::Stopped(1))
            ]
        );
    }

    #[test]
    fn remove_while_speaking_emits_stopped() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        for i in 0..10u64 {
            d.observe(7u8, 10, t0 + Duration::from_millis(i * 20));
        }
        assert_eq!(d.poll_event(), Some(SpeakerEvent::Started(7)));
        assert!(d.is_speaking(7));
        d.remove(7);
        assert_eq!(d.poll_event(), Some(SpeakerEvent::Stopped(7)));
        assert!(!d.is_speaking(7));
    }

    /// Multi-participant driver: one level per participant every 20 ms from a script
    /// `(who, from_ms, to_ms, level)`; returns dominant changes as (ms, event).
    fn run_dominant(script: &[(u8, u32, u32, u8)], until_ms: u32) -> Vec<(u32, DominantEvent<u8>)> {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        let mut out = Vec::new();
        let mut ms = 0;
        while ms <= until_ms {
            let now = t0 + Duration::from_millis(ms as u64);
            for &(who, from, to, level) in script {
                if (from..to).contains(&ms) {
                    d.observe(who, level, now);
                }
            }
            d.tick(now);
            while let Some(e) = d.poll_dominant() {
                out.push((ms, e));
            }
            ms += 20;
        }
        out
    }

    #[test]
    fn first_speaker_becomes_dominant_and_stays_through_silence() {
        let ev = run_dominant(&[(1, 0, 1000, 30)], 3000);
        assert_eq!(ev, vec![(60, DominantEvent::Changed(1))]);
    }

    #[test]
    fn much_louder_speaker_takes_over_after_hold() {
        // 1 talks at -40 dBov throughout; 2 joins at 1000 ms at -20 dBov (20 dB louder).
        // 2 starts speaking at 1060 (attack), is already louder by the margin, so the
        // challenge starts at 1060 and succeeds 400 ms later.
        let ev = run_dominant(&[(1, 0, 3000, 40), (2, 1000, 3000, 20)], 3000);
        assert_eq!(
            ev,
            vec![
                (60, DominantEvent::Changed(1)),
                (1460, DominantEvent::Changed(2))
            ]
        );
    }

    #[test]
    fn slightly_louder_speaker_does_not_take_over() {
        // 3 dB louder: under the 6 dB margin.
        let ev = run_dominant(&[(1, 0, 3000, 40), (2, 1000, 3000, 37)], 3000);
        assert_eq!(ev, vec![(60, DominantEvent::Changed(1))]);
    }

    #[test]
    fn short_louder_burst_does_not_take_over() {
        // 2 is 20 dB louder but only for 300 ms (< hold).
        let ev = run_dominant(&[(1, 0, 3000, 40), (2, 1000, 1300, 20)], 3000);
        assert_eq!(ev, vec![(60, DominantEvent::Changed(1))]);
    }

    #[test]
    fn quieter_speaker_takes_over_when_dominant_stops() {
        // 1 talks until 1000 ms; 2 (quieter) talks from 500 ms on. 1 stops speaking
        // after the 600 ms hangover (last voice at 980 → stopped at 1580), and 2, still
        // speaking, becomes dominant at that tick.
        let ev = run_dominant(&[(1, 0, 1000, 20), (2, 500, 3000, 40)], 3000);
        assert_eq!(
            ev,
            vec![
                (60, DominantEvent::Changed(1)),
                (1580, DominantEvent::Changed(2))
            ]
        );
    }

    #[test]
    fn removing_the_dominant_speaker_clears_or_hands_over() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        for i in 0..10u64 {
            d.observe(1u8, 20, t0 + Duration::from_millis(i * 20));
        }
        assert_eq!(d.poll_dominant(), Some(DominantEvent::Changed(1)));
        d.remove(1);
        assert_eq!(d.poll_dominant(), Some(DominantEvent::Cleared));
        assert_eq!(d.dominant(), None);
        // With someone else speaking, removal hands over instead.
        for i in 10..20u64 {
            let now = t0 + Duration::from_millis(i * 20);
            d.observe(2, 20, now);
            d.observe(3, 30, now);
        }
        assert_eq!(d.poll_dominant(), Some(DominantEvent::Changed(2)));
        d.remove(2);
        assert_eq!(d.poll_dominant(), Some(DominantEvent::Changed(3)));
        assert_eq!(d.dominant(), Some(3));
        // The started/stopped stream is unaffected by dominant tracking.
        let mut started = Vec::new();
        while let Some(e) = d.poll_event() {
            started.push(e);
        }
        assert!(started.contains(&SpeakerEvent::Started(2)));
        assert!(started.contains(&SpeakerEvent::Started(3)));
    }
}
