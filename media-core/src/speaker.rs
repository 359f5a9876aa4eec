//! Active-speaker detection from audio levels (RFC 6464 units), with hysteresis so the
//! "speaking" indicator neither flickers on single loud packets nor drops between words.
//!
//! Feed every audio level you see with [`SpeakerDetector::observe`], call
//! [`SpeakerDetector::tick`] when time passes without packets (muted or gone publishers
//! must still stop "speaking"), and drain [`SpeakerDetector::poll_event`].

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
}

impl Default for SpeakerConfig {
    fn default() -> Self {
        SpeakerConfig {
            threshold: 50,
            attack: Duration::from_millis(60),
            gap: Duration::from_millis(100),
            hangover: Duration::from_millis(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeakerEvent<K> {
    Started(K),
    Stopped(K),
}

#[derive(Debug, Default)]
struct State {
    speaking: bool,
    run_start: Option<Instant>,
    last_voice: Option<Instant>,
}

/// Per-room (or per-worker) detector keyed by participant.
#[derive(Debug)]
pub struct SpeakerDetector<K> {
    config: SpeakerConfig,
    states: HashMap<K, State>,
    events: VecDeque<SpeakerEvent<K>>,
}

impl<K: Copy + Eq + Hash> SpeakerDetector<K> {
    pub fn new(config: SpeakerConfig) -> Self {
        SpeakerDetector {
            config,
            states: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    /// One audio level (0 loudest … 127 silent) from `who` at `now`.
    pub fn observe(&mut self, who: K, level: u8, now: Instant) {
        let cfg = self.config;
        let st = self.states.entry(who).or_default();
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
}
