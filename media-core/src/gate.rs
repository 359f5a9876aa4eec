//! Background attenuation keyed by the VAD (a downward expander).
//!
//! RNNoise removes noise that does not sound like speech. Other people talking behind
//! the participant (babble) *is* speech to it and passes nearly untouched (+0.7 dB
//! segmental SNR on the fixtures). What can still be done is what listeners notice
//! most: the crowd heard between the participant's sentences. This gate lowers the
//! frame's gain while the VAD says the participant is not speaking and restores it
//! when they start.
//!
//! It attenuates rather than mutes ([`GateConfig::floor_db`]): a VAD misses some
//! frames, and a miss then makes a word quieter instead of cutting it out; total
//! silence between words also sounds broken to listeners. It opens on the VAD's
//! *frame-level* cue (the first voice-like frame), not on the smoothed decision that
//! waits for the attack, so word onsets are not swallowed; it closes only after the
//! VAD's hangover, and then slowly, so word endings fade instead of clicking. The gain
//! moves sample by sample within a frame: a step would click.
//!
//! Used after the denoiser, whose output lags its input by 10 ms: the VAD decision for
//! a captured frame therefore arrives 10 ms ahead of the audio it describes, which
//! gives the opening a little look-ahead.

/// Gate tuning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateConfig {
    /// Gain while closed, in dB (negative).
    pub floor_db: f32,
    /// Frames over which a closing gate falls from unity to the floor.
    pub release_frames: u32,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            floor_db: -15.0,
            release_frames: 3,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gate {
    floor: f32,
    /// Gain change per frame while closing (linear, towards the floor).
    step: f32,
    gain: f32,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new(GateConfig::default())
    }
}

impl Gate {
    pub fn new(config: GateConfig) -> Self {
        let floor_db = if config.floor_db.is_nan() {
            0.0
        } else {
            config.floor_db.min(0.0)
        };
        let floor = 10f32.powf(floor_db / 20.0);
        Gate {
            floor,
            step: (1.0 - floor) / config.release_frames.max(1) as f32,
            // Starts open: the first frames of a stream are not known to be background.
            gain: 1.0,
        }
    }

    /// Current gain (0..=1) at the end of the last frame.
    pub fn gain(&self) -> f32 {
        self.gain
    }

    /// Applies the gate to one frame in place. `open`: the participant is speaking,
    /// or this frame already sounds like the start of it.
    pub fn process(&mut self, open: bool, frame: &mut [i16]) {
        let from = self.gain;
        let to = if open {
            1.0
        } else {
            (from - self.step).max(self.floor)
        };
        self.gain = to;
        if from == 1.0 && to == 1.0 {
            return;
        }
        let n = frame.len().max(1) as f32;
        for (i, s) in frame.iter_mut().enumerate() {
            let g = from + (to - from) * (i + 1) as f32 / n;
            *s = (f32::from(*s) * g).round().clamp(-32768.0, 32767.0) as i16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(v: i16) -> Vec<i16> {
        vec![v; 960]
    }

    #[test]
    fn closes_slowly_to_the_floor_and_opens_within_one_frame() {
        let cfg = GateConfig::default();
        let mut g = Gate::new(cfg);
        let mut f = frame(10_000);
        g.process(true, &mut f);
        assert!(f.iter().all(|&s| s == 10_000), "open gate is transparent");

        let floor = 10f32.powf(cfg.floor_db / 20.0);
        let mut last_end = 10_000;
        for k in 0..cfg.release_frames {
            let mut f = frame(10_000);
            g.process(false, &mut f);
            // Monotone within the frame and no jump at the frame boundary.
            assert!(f.windows(2).all(|w| w[1] <= w[0]));
            assert!((last_end - f[0]).abs() < 40, "frame {k} starts at {}", f[0]);
            last_end = f[959];
        }
        assert!((g.gain() - floor).abs() < 1e-4);
        let mut f = frame(10_000);
        g.process(false, &mut f);
        let expect = (10_000.0 * floor).round() as i16;
        assert!(
            f.iter().all(|&s| (s - expect).abs() <= 1),
            "held at the floor"
        );

        // Opens within one frame, gradually.
        let mut f = frame(10_000);
        g.process(true, &mut f);
        assert_eq!(f[959], 10_000);
        assert!(f[0] < 2_000);
        assert!(f.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(g.gain(), 1.0);
    }

    #[test]
    fn odd_configs_do_not_panic_or_amplify() {
        for floor_db in [f32::NAN, 6.0, -200.0] {
            let mut g = Gate::new(GateConfig {
                floor_db,
                release_frames: 0,
            });
            let mut f = frame(20_000);
            g.process(false, &mut f);
            assert!(f.iter().all(|&s| (0..=20_000).contains(&s)));
            assert!(g.gain() <= 1.0);
        }
    }
}
