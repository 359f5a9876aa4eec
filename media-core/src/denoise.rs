//! Noise suppression with RNNoise (the pure-Rust `nnnoiseless` port).
//!
//! RNNoise works on 10 ms (480-sample) frames at 48 kHz; Chorus frames are 20 ms, so
//! each frame is two RNNoise calls. RNNoise's overlap-add synthesis delays its output
//! by one RNNoise frame: output sample `n` corresponds to input sample
//! `n - LATENCY_SAMPLES`. The dry signal goes through the same delay so that the
//! strength control mixes time-aligned signals (mixing unaligned ones would comb-filter)
//! and so that changing the strength never shifts the stream in time.
//!
//! RNNoise also estimates, per 10 ms, the probability that the frame holds voice; the
//! larger of the two halves is reported per 20 ms frame (a word onset in either half
//! counts), which is what [`crate::vad`] consumes.

use crate::opus::FRAME_SAMPLES;
use nnnoiseless::DenoiseState;

const RNN_FRAME: usize = DenoiseState::FRAME_SIZE;

/// Output lags input by this many samples (10 ms), at every strength.
pub const LATENCY_SAMPLES: usize = RNN_FRAME;

/// Stateful RNNoise suppressor for one 48 kHz mono stream.
pub struct Denoiser {
    state: Box<DenoiseState<'static>>,
    /// Strength the previous frame ended with; a new strength is ramped in across one
    /// frame so that moving the slider does not click.
    current: f32,
    target: f32,
    /// Dry signal delayed by LATENCY_SAMPLES, to match RNNoise's output.
    dry_delay: [f32; RNN_FRAME],
    input: [f32; RNN_FRAME],
    wet: [f32; RNN_FRAME],
    voice_probability: f32,
}

impl std::fmt::Debug for Denoiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Denoiser")
            .field("strength", &self.target)
            .field("voice_probability", &self.voice_probability)
            .finish_non_exhaustive()
    }
}

impl Default for Denoiser {
    fn default() -> Self {
        Self::new(1.0)
    }
}

impl Denoiser {
    /// `strength`: 0 = bypass (dry signal, only delayed), 1 = fully denoised.
    pub fn new(strength: f32) -> Self {
        let s = sanitize(strength);
        Denoiser {
            state: DenoiseState::new(),
            current: s,
            target: s,
            dry_delay: [0.0; RNN_FRAME],
            input: [0.0; RNN_FRAME],
            wet: [0.0; RNN_FRAME],
            voice_probability: 0.0,
        }
    }

    pub fn set_strength(&mut self, strength: f32) {
        self.target = sanitize(strength);
    }

    pub fn strength(&self) -> f32 {
        self.target
    }

    /// Voice probability (0..1) of the last processed frame.
    pub fn voice_probability(&self) -> f32 {
        self.voice_probability
    }

    /// Denoises one 20 ms frame in place and returns RNNoise's voice probability for
    /// it. Frames of another length are processed in whole 10 ms halves where possible;
    /// callers should pass [`FRAME_SAMPLES`].
    pub fn process(&mut self, frame: &mut [i16]) -> f32 {
        debug_assert_eq!(frame.len(), FRAME_SAMPLES);
        let from = self.current;
        let to = self.target;
        let total = frame.len().max(1) as f32;
        let mut prob: f32 = 0.0;
        for (half, chunk) in frame.chunks_exact_mut(RNN_FRAME).enumerate() {
            for (dst, &s) in self.input.iter_mut().zip(chunk.iter()) {
                *dst = f32::from(s);
            }
            // RNNoise is still worth running at strength 0: it keeps its state warm for
            // when the strength goes up and it gives the VAD its voice probability.
            prob = prob.max(self.state.process_frame(&mut self.wet, &self.input));
            for (i, out) in chunk.iter_mut().enumerate() {
                let k = (half * RNN_FRAME + i) as f32 / total;
                let s = from + (to - from) * k;
                let dry = self.dry_delay[i];
                let y = dry + s * (self.wet[i] - dry);
                *out = y.round().clamp(-32768.0, 32767.0) as i16;
            }
            self.dry_delay.copy_from_slice(&self.input);
        }
        self.current = to;
        self.voice_probability = prob;
        prob
    }
}

fn sanitize(strength: f32) -> f32 {
    if strength.is_nan() {
        1.0
    } else {
        strength.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: &mut u32, amp: f32) -> i16 {
        // xorshift32: an LCG's correlated successive values look structured enough
        // to RNNoise that it suppresses them erratically.
        *seed ^= *seed << 13;
        *seed ^= *seed >> 17;
        *seed ^= *seed << 5;
        (((*seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 2.0 * amp) as i16
    }

    #[test]
    fn strength_zero_is_a_pure_delay() {
        let mut d = Denoiser::new(0.0);
        let mut seed = 1;
        let input: Vec<i16> = (0..FRAME_SAMPLES * 5)
            .map(|_| noise(&mut seed, 5000.0))
            .collect();
        let mut output = input.clone();
        for f in output.chunks_exact_mut(FRAME_SAMPLES) {
            d.process(f);
        }
        assert!(output[..LATENCY_SAMPLES].iter().all(|&s| s == 0));
        assert_eq!(
            &output[LATENCY_SAMPLES..],
            &input[..input.len() - LATENCY_SAMPLES]
        );
    }

    #[test]
    fn full_strength_removes_most_stationary_noise() {
        // About -35 dBFS of white noise. RNNoise's suppression depends on level (it
        // leaves some very quiet noise, below about -45 dBFS, largely alone); the
        // fixture tests measure it on speech at 0–10 dB SNR.
        let mut d = Denoiser::new(1.0);
        let mut seed = 7;
        let mut in_energy = 0.0f64;
        let mut out_energy = 0.0f64;
        for f in 0..100 {
            let mut frame: Vec<i16> = (0..FRAME_SAMPLES)
                .map(|_| noise(&mut seed, 1000.0))
                .collect();
            let e_in: f64 = frame.iter().map(|&s| (s as f64).powi(2)).sum();
            let p = d.process(&mut frame);
            assert!((0.0..=1.0).contains(&p));
            // Ignore the first second while RNNoise's noise estimate settles.
            if f >= 50 {
                in_energy += e_in;
                out_energy += frame.iter().map(|&s| (s as f64).powi(2)).sum::<f64>();
            }
        }
        let reduction_db = 10.0 * (in_energy / out_energy.max(1.0)).log10();
        assert!(reduction_db > 20.0, "noise reduced by {reduction_db:.1} dB");
    }

    #[test]
    fn strength_change_is_ramped_over_one_frame() {
        // A steady tone through a denoiser switched from bypass to full strength: the
        // output level moves gradually within the switching frame, no step.
        let mut d = Denoiser::new(0.0);
        let tone = |k: usize| -> Vec<i16> {
            (k * FRAME_SAMPLES..(k + 1) * FRAME_SAMPLES)
                .map(|n| (6000.0 * (n as f32 * 0.031).sin()) as i16)
                .collect()
        };
        for k in 0..50 {
            d.process(&mut tone(k));
        }
        d.set_strength(1.0);
        let mut f = tone(50);
        let mut expected = tone(50);
        // What bypass would have produced for this frame: the input delayed.
        expected.rotate_right(LATENCY_SAMPLES);
        expected[..LATENCY_SAMPLES].copy_from_slice(&tone(49)[FRAME_SAMPLES - LATENCY_SAMPLES..]);
        d.process(&mut f);
        // At the first sample the ramp is at 0: exactly the dry signal.
        assert_eq!(f[0], expected[0]);
        // Sample-to-sample steps stay within what the tone itself does (max slope of
        // 6000 sin(0.031 n) is about 186 per sample) plus a small allowance.
        let max_step = f
            .windows(2)
            .map(|w| (w[1] as i32 - w[0] as i32).abs())
            .max();
        assert!(max_step.unwrap_or(0) < 260, "step {max_step:?}");
    }

    #[test]
    fn strength_is_clamped() {
        assert_eq!(Denoiser::new(3.0).strength(), 1.0);
        assert_eq!(Denoiser::new(-1.0).strength(), 0.0);
        assert_eq!(Denoiser::new(f32::NAN).strength(), 1.0);
    }
}
