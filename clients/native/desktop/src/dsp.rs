//! Small sample-level helpers between the sound card and the 48 kHz mono pipeline:
//! downmix, sample conversion, levels, and a push-style linear resampler for playback.
//! Pure functions, no allocation, safe to call from an audio callback.

/// The pipeline's rate: every frame the session reads or writes is 48 kHz mono.
pub const PIPELINE_HZ: u32 = 48_000;

/// Lowest level the meter shows; also what silence reports.
pub const FLOOR_DBFS: f32 = -96.0;

/// Averages one interleaved frame of channel samples to a mono sample (converting each
/// with `to_f32`, so it works on the device's own sample type without a copy).
pub fn downmix<T: Copy>(frame: &[T], to_f32: impl Fn(T) -> f32) -> f32 {
    if frame.is_empty() {
        return 0.0;
    }
    frame.iter().map(|&s| to_f32(s)).sum::<f32>() / frame.len() as f32
}

/// `-1.0..=1.0` to 16-bit, saturating (a hot microphone must clip, not wrap).
pub fn to_i16(s: f32) -> i16 {
    (s * 32767.0).round().clamp(-32768.0, 32767.0) as i16
}

pub fn from_i16(s: i16) -> f32 {
    f32::from(s) / 32768.0
}

/// RMS level of a frame in dBFS (a full-scale sine reads about -3), floored at
/// [`FLOOR_DBFS`].
pub fn dbfs(frame: &[i16]) -> f32 {
    if frame.is_empty() {
        return FLOOR_DBFS;
    }
    let sum: f64 = frame
        .iter()
        .map(|&s| {
            let x = f64::from(s) / 32768.0;
            x * x
        })
        .sum();
    let rms = (sum / frame.len() as f64).sqrt();
    if rms <= 0.0 {
        return FLOOR_DBFS;
    }
    ((20.0 * rms.log10()) as f32).max(FLOOR_DBFS)
}

/// Linear-interpolation resampler fed by pushing input; used for playback (48 kHz to
/// the device's rate). Keeps its phase across calls so frame edges don't click.
#[derive(Debug, Clone)]
pub struct LinearResampler {
    /// Input samples per output sample.
    step: f64,
    /// Position of the next output sample between `prev` (0.0) and `cur` (1.0).
    pos: f64,
    prev: f32,
    cur: f32,
    primed: bool,
}

impl LinearResampler {
    pub fn new(from_hz: u32, to_hz: u32) -> Self {
        LinearResampler {
            step: f64::from(from_hz.max(1)) / f64::from(to_hz.max(1)),
            pos: 0.0,
            prev: 0.0,
            cur: 0.0,
            primed: false,
        }
    }

    /// Feeds `input` and hands every output sample it yields to `out`.
    pub fn process(&mut self, input: &[f32], mut out: impl FnMut(f32)) {
        for &s in input {
            if !self.primed {
                self.prev = s;
                self.cur = s;
                self.primed = true;
                continue;
            }
            self.prev = self.cur;
            self.cur = s;
            // Emit every output instant that falls between the two newest inputs.
            while self.pos < 1.0 {
                out(self.prev + (self.cur - self.prev) * self.pos as f32);
                self.pos += self.step;
            }
            self.pos -= 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downmix_averages_channels() {
        let id = |s: f32| s;
        assert_eq!(downmix(&[0.5, -0.5], id), 0.0);
        assert_eq!(downmix(&[0.25, 0.75], id), 0.5);
        assert_eq!(downmix(&[0.3], id), 0.3);
        assert_eq!(downmix(&[], id), 0.0);
        assert_eq!(downmix(&[16_384i16, 0], from_i16), 0.25);
    }

    #[test]
    fn conversion_saturates() {
        assert_eq!(to_i16(2.0), i16::MAX);
        assert_eq!(to_i16(-2.0), i16::MIN);
        assert_eq!(to_i16(0.0), 0);
        assert!((from_i16(to_i16(0.5)) - 0.5).abs() < 1e-4);
    }

    #[test]
    fn levels_of_silence_and_a_sine() {
        assert_eq!(dbfs(&[0; 960]), FLOOR_DBFS);
        let sine: Vec<i16> = (0..960)
            .map(|i| to_i16((i as f32 * 2.0 * std::f32::consts::PI * 440.0 / 48_000.0).sin()))
            .collect();
        let db = dbfs(&sine);
        assert!((-3.2..=-2.8).contains(&db), "{db}");
        let quiet: Vec<i16> = sine.iter().map(|s| s / 10).collect();
        assert!((dbfs(&quiet) - (db - 20.0)).abs() < 0.2);
    }

    fn run(from: u32, to: u32, n: usize) -> Vec<f32> {
        let mut r = LinearResampler::new(from, to);
        let input: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut out = Vec::new();
        // In 20 ms chunks, as the session delivers them.
        for chunk in input.chunks(960) {
            r.process(chunk, |s| out.push(s));
        }
        out
    }

    #[test]
    fn resampler_keeps_the_rate_ratio() {
        for (to, expect) in [(48_000, 48_000), (44_100, 44_100), (96_000, 96_000)] {
            let out = run(48_000, to, 48_000);
            let diff = out.len() as i64 - expect as i64;
            assert!(diff.abs() <= 2, "{to}: {} samples", out.len());
        }
    }

    #[test]
    fn resampler_interpolates_a_ramp_without_jumps() {
        // A ramp stays a ramp: each output step is the input step times the ratio.
        let out = run(48_000, 44_100, 4_800);
        let want = 48_000.0 / 44_100.0;
        for w in out.windows(2) {
            assert!(((w[1] - w[0]) - want).abs() < 1e-3, "{:?}", w);
        }
        let same = run(48_000, 48_000, 2_000);
        for (i, s) in same.iter().enumerate() {
            assert_eq!(*s, i as f32);
        }
    }
}
