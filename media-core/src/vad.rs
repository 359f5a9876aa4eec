//! Per-frame speech decision for one stream.
//!
//! Two cues are combined, because neither is enough alone: RNNoise's voice probability
//! (see [`crate::denoise`]) knows what speech *sounds* like but flickers on short
//! frames and can be fooled by speech-like noise; energy above a tracked noise floor
//! knows when *something* is there but not what. A frame is voice-like when the
//! probability is high, or moderately high with energy clearly above the floor.
//!
//! The decision then gets an attack (a few voice-like frames in a row before speech
//! starts, so a click or a single misfire does not open it) and a hangover (speech
//! continues for a while after the last voice-like frame, so quiet word endings and
//! the gaps between words are not clipped).
//!
//! Feed it the *captured* frame (before noise suppression) with the denoiser's
//! probability for that frame: stationary noise gives a steady floor there, whereas
//! RNNoise's residual fluctuates by 10–20 dB from frame to frame and made the floor
//! useless (measured on the fixtures: 55 false alarms against 8 at white noise 5 dB).
//!
//! "Above the background" needs two numbers, not one. The *floor* (a minimum
//! tracker) is where a steady noise sits. Babble — other people talking behind the
//! participant — is speech to RNNoise (probability near 1 all the time) and its level
//! swings by ~10 dB, so its floor lies far below its typical level and every bump
//! looked like the participant. So the VAD also keeps the last five seconds of frame
//! levels and takes a low quantile of them as the *background* level: in a
//! conversation most frames are the background, so the quantile sits inside it. How
//! far that background lies above the floor measures how much the background itself
//! swings, and the margin a frame needs grows with it (≈1.5 dB for white noise,
//! ≈6 dB for babble). The background is capped a few dB above the floor so that a
//! participant who talks most of the time does not raise it into their own speech.
//!
//! Known limit: this separates the participant from babble by level only. With the
//! crowd as loud as the participant (0 dB SNR) the two level distributions overlap:
//! even a threshold chosen with hindsight, per recording, gets only ~76–82% of frames
//! right on the fixtures (see benches/README.md).

/// VAD tuning. Frame counts are in 20 ms frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadConfig {
    /// Probability at or above which a frame is voice-like if its energy is also at
    /// least `high_margin_db` above the noise floor.
    pub prob_high: f32,
    pub high_margin_db: f32,
    /// Probability at or above which a frame is voice-like if its energy is also at
    /// least `energy_margin_db` above the noise floor.
    pub prob_low: f32,
    pub energy_margin_db: f32,
    /// Frames quieter than this (dBov, e.g. -60) are never voice: avoids deciding on
    /// near digital silence where the probability is meaningless.
    pub min_dbov: f32,
    /// Consecutive voice-like frames needed to start speech.
    pub attack_frames: u32,
    /// Frames of non-voice needed to end speech.
    pub hangover_frames: u32,
    /// How fast the noise floor may rise, dB per frame. It falls immediately to any
    /// quieter frame; rising slowly keeps speech itself from becoming the floor.
    pub floor_rise_db: f32,
    /// Quantile (0..1) of the last [`BACKGROUND_FRAMES`] frame levels taken as the
    /// background level. Below the share of time a participant is silent.
    pub background_quantile: f32,
    /// The background level is kept at most this far above the floor (dB).
    pub background_cap_db: f32,
    /// Margins grow to this many times the background's height above the floor, for
    /// backgrounds whose level swings (babble).
    pub spread_factor: f32,
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            prob_high: 0.6,
            high_margin_db: 1.5,
            prob_low: 0.3,
            energy_margin_db: 6.0,
            min_dbov: -65.0,
            attack_frames: 2,
            hangover_frames: 6,
            floor_rise_db: 0.1,
            background_quantile: 0.4,
            background_cap_db: 4.0,
            spread_factor: 1.5,
        }
    }
}

/// What the VAD concluded for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadFrame {
    /// The smoothed decision (attack + hangover applied): use this one.
    pub speech: bool,
    /// The frame-level cue before smoothing.
    pub voice_like: bool,
    /// Frame energy in dBov.
    pub dbov: f32,
    /// Current noise-floor estimate in dBov.
    pub floor_dbov: f32,
    /// Current background-level estimate in dBov (at or above the floor).
    pub background_dbov: f32,
}

/// Frame levels the background quantile is taken over: five seconds.
pub const BACKGROUND_FRAMES: usize = 250;

#[derive(Debug, Clone)]
pub struct Vad {
    config: VadConfig,
    floor_dbov: Option<f32>,
    /// Ring of recent frame levels, and a scratch copy to select the quantile in
    /// (allocated once: this runs per frame on the SFU for enhanced publishers).
    levels: Box<[f32; BACKGROUND_FRAMES]>,
    scratch: Box<[f32; BACKGROUND_FRAMES]>,
    levels_len: usize,
    levels_next: usize,
    run: u32,
    silent_for: u32,
    speech: bool,
}

impl Default for Vad {
    fn default() -> Self {
        Self::new(VadConfig::default())
    }
}

impl Vad {
    pub fn new(config: VadConfig) -> Self {
        Vad {
            config,
            floor_dbov: None,
            levels: Box::new([0.0; BACKGROUND_FRAMES]),
            scratch: Box::new([0.0; BACKGROUND_FRAMES]),
            levels_len: 0,
            levels_next: 0,
            run: 0,
            silent_for: 0,
            speech: false,
        }
    }

    pub fn is_speech(&self) -> bool {
        self.speech
    }

    /// One 20 ms frame and RNNoise's voice probability for it.
    pub fn process(&mut self, voice_probability: f32, frame: &[i16]) -> VadFrame {
        let cfg = self.config;
        let dbov = frame_dbov(frame);
        let floor = match self.floor_dbov {
            None => dbov,
            // Falls fast (but not in one frame, so a single quiet frame inside noise
            // does not drag it far below the noise's typical level) …
            Some(f) if dbov < f => f + 0.3 * (dbov - f),
            // … rises slowly.
            Some(f) => (f + cfg.floor_rise_db).min(dbov),
        };
        self.floor_dbov = Some(floor);
        let background = self.background(dbov, floor);
        let margin = (cfg.spread_factor * (background - floor)).max(cfg.high_margin_db);

        let p = if voice_probability.is_nan() {
            0.0
        } else {
            voice_probability
        };
        let loud_enough = dbov >= cfg.min_dbov;
        let voice_like = loud_enough
            && ((p >= cfg.prob_high && dbov >= background + margin)
                || (p >= cfg.prob_low && dbov >= background + margin.max(cfg.energy_margin_db)));

        if voice_like {
            self.run = self.run.saturating_add(1);
            self.silent_for = 0;
            if self.run >= cfg.attack_frames {
                self.speech = true;
            }
        } else {
            self.run = 0;
            self.silent_for = self.silent_for.saturating_add(1);
            if self.silent_for >= cfg.hangover_frames {
                self.speech = false;
            }
        }
        VadFrame {
            speech: self.speech,
            voice_like,
            dbov,
            floor_dbov: floor,
            background_dbov: background,
        }
    }

    /// Records this frame's level and returns the background level: the configured
    /// quantile of the recent levels, kept between the floor and floor + cap.
    fn background(&mut self, dbov: f32, floor: f32) -> f32 {
        self.levels[self.levels_next] = dbov;
        self.levels_next = (self.levels_next + 1) % BACKGROUND_FRAMES;
        self.levels_len = (self.levels_len + 1).min(BACKGROUND_FRAMES);
        let n = self.levels_len;
        let recent = &mut self.scratch[..n];
        recent.copy_from_slice(&self.levels[..n]);
        let q = self.config.background_quantile.clamp(0.0, 1.0);
        let k = ((q * n as f32) as usize).min(n - 1);
        let (_, &mut quantile, _) = recent.select_nth_unstable_by(k, f32::total_cmp);
        let cap = floor + self.config.background_cap_db.max(0.0);
        if quantile.is_nan() {
            floor
        } else {
            quantile.clamp(floor, cap.max(floor))
        }
    }
}

/// Frame energy in dBov (0 = full-scale square wave); -120 for digital silence.
pub fn frame_dbov(frame: &[i16]) -> f32 {
    if frame.is_empty() {
        return -120.0;
    }
    let sum: f64 = frame.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    let ms = sum / frame.len() as f64 / (32768.0 * 32768.0);
    if ms <= 1e-12 {
        -120.0
    } else {
        (10.0 * ms.log10()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(amp: f64) -> Vec<i16> {
        (0..960)
            .map(|n| (amp * (n as f64 * 0.05).sin()) as i16)
            .collect()
    }

    #[test]
    fn attack_and_hangover() {
        let cfg = VadConfig::default();
        let mut v = Vad::new(cfg);
        let quiet = tone(30.0);
        let loud = tone(8000.0);
        for _ in 0..20 {
            assert!(!v.process(0.0, &quiet).speech);
        }
        // A single voice-like frame does not open.
        assert!(!v.process(0.95, &loud).speech);
        assert!(!v.process(0.0, &quiet).speech);
        // Two in a row do.
        assert!(!v.process(0.95, &loud).speech);
        assert!(v.process(0.95, &loud).speech);
        // Held for hangover_frames - 1 non-voice frames, closed at the hangover-th.
        for _ in 0..cfg.hangover_frames - 1 {
            assert!(v.process(0.0, &quiet).speech);
        }
        assert!(!v.process(0.0, &quiet).speech);
    }

    #[test]
    fn moderate_probability_needs_energy_above_floor() {
        let mut v = Vad::new(VadConfig::default());
        let floor = tone(200.0);
        for _ in 0..30 {
            v.process(0.0, &floor);
        }
        // p = 0.4 at the floor's level: not voice-like.
        assert!(!v.process(0.4, &floor).voice_like);
        // p = 0.4 and 20 dB louder: voice-like.
        assert!(v.process(0.4, &tone(2000.0)).voice_like);
        // Digital near-silence never is, whatever the probability.
        assert!(!v.process(1.0, &[0; 960]).voice_like);
    }

    #[test]
    fn dbov_of_known_signals() {
        assert_eq!(frame_dbov(&[0; 960]), -120.0);
        let sq: Vec<i16> = (0..960)
            .map(|i| if i % 2 == 0 { 16384 } else { -16384 })
            .collect();
        assert!((frame_dbov(&sq) + 6.02).abs() < 0.01);
    }
}
