//! Mixes N participants' 20 ms frames into one, with per-participant volume.
//!
//! Summing in `f32` and converting once means no intermediate overflow however many
//! participants talk at once; what exceeds full scale is soft-clipped (linear up to a
//! knee, then smoothly saturating) instead of wrapping or hard-clipping, which would
//! both sound far worse.

use std::collections::HashMap;
use std::hash::Hash;

/// Below this magnitude (about -1.9 dBFS) samples pass unchanged.
const KNEE: f32 = 0.8 * 32767.0;
const FULL: f32 = 32767.0;

/// Soft clipper on the 16-bit scale: identity up to the knee, then a tanh curve that
/// meets the line with the same slope (no audible corner) and approaches but never
/// reaches full scale.
pub fn soft_clip(x: f32) -> f32 {
    let a = x.abs();
    if a <= KNEE || a.is_nan() {
        return if x.is_nan() { 0.0 } else { x };
    }
    let room = FULL - KNEE;
    let y = KNEE + room * ((a - KNEE) / room).tanh();
    y.copysign(x)
}

#[derive(Debug, Clone)]
pub struct Mixer<K> {
    volumes: HashMap<K, f32>,
    acc: Vec<f32>,
}

impl<K: Copy + Eq + Hash> Default for Mixer<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Copy + Eq + Hash> Mixer<K> {
    pub fn new() -> Self {
        Mixer {
            volumes: HashMap::new(),
            acc: Vec::new(),
        }
    }

    /// Linear gain for `who` (1.0 = unchanged, 0 = muted). Negative or NaN means 0;
    /// capped at 4 (+12 dB) so a bad setting cannot blast everyone.
    pub fn set_volume(&mut self, who: K, volume: f32) {
        let v = if volume.is_nan() {
            0.0
        } else {
            volume.clamp(0.0, 4.0)
        };
        self.volumes.insert(who, v);
    }

    pub fn volume(&self, who: K) -> f32 {
        self.volumes.get(&who).copied().unwrap_or(1.0)
    }

    pub fn remove(&mut self, who: K) {
        self.volumes.remove(&who);
    }

    /// Sums every input frame (scaled by its participant's volume) into `out`.
    /// Inputs shorter than `out` contribute silence for the rest.
    pub fn mix(&mut self, inputs: &[(K, &[i16])], out: &mut [i16]) {
        self.mix_filtered(inputs.iter().copied(), None, out);
    }

    /// [`Mixer::mix`] over any iterator of inputs, so a caller whose frames live in its
    /// own per-stream state need not collect them into a list every 20 ms.
    pub fn mix_iter<'a>(
        &mut self,
        inputs: impl IntoIterator<Item = (K, &'a [i16])>,
        out: &mut [i16],
    ) {
        self.mix_filtered(inputs, None, out);
    }

    /// Mix-minus: everything except `who` (what `who` should hear, without their own
    /// voice).
    pub fn mix_except(&mut self, inputs: &[(K, &[i16])], who: K, out: &mut [i16]) {
        self.mix_filtered(inputs.iter().copied(), Some(who), out);
    }

    fn mix_filtered<'a>(
        &mut self,
        inputs: impl IntoIterator<Item = (K, &'a [i16])>,
        except: Option<K>,
        out: &mut [i16],
    ) {
        self.acc.clear();
        self.acc.resize(out.len(), 0.0);
        for (who, frame) in inputs {
            if except == Some(who) {
                continue;
            }
            let g = self.volume(who);
            if g == 0.0 {
                continue;
            }
            for (a, &s) in self.acc.iter_mut().zip(frame.iter()) {
                *a += g * f32::from(s);
            }
        }
        for (o, &a) in out.iter_mut().zip(self.acc.iter()) {
            *o = soft_clip(a).round().clamp(-32768.0, 32767.0) as i16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_quiet_inputs_exactly() {
        let mut m = Mixer::new();
        let a = [100i16, -200, 300];
        let b = [1000i16, 1000, -1000];
        let mut out = [0i16; 3];
        m.mix(&[(1u8, &a[..]), (2, &b[..])], &mut out);
        assert_eq!(out, [1100, 800, -700]);
    }

    #[test]
    fn per_participant_volume_and_mix_minus() {
        let mut m = Mixer::new();
        m.set_volume(1u8, 0.5);
        m.set_volume(3, 0.0);
        let a = [1000i16; 4];
        let b = [2000i16; 4];
        let c = [3000i16; 4];
        let inputs = [(1u8, &a[..]), (2, &b[..]), (3, &c[..])];
        let mut out = [0i16; 4];
        m.mix(&inputs, &mut out);
        assert_eq!(out, [2500; 4]);
        m.mix_except(&inputs, 2, &mut out);
        assert_eq!(out, [500; 4]);
        m.remove(1);
        assert_eq!(m.volume(1), 1.0);
        m.set_volume(1, f32::NAN);
        assert_eq!(m.volume(1), 0.0);
        m.set_volume(1, 100.0);
        assert_eq!(m.volume(1), 4.0);
    }

    #[test]
    fn loud_sums_saturate_smoothly_without_wrapping() {
        let mut m = Mixer::new();
        let loud = [30_000i16, -30_000, 20_000, -32768];
        let inputs: Vec<(u8, &[i16])> = (0..8).map(|k| (k, &loud[..])).collect();
        let mut out = [0i16; 4];
        m.mix(&inputs, &mut out);
        // Signs are kept (no wrap-around) and magnitudes stay within full scale.
        assert!(out[0] > 30_000 && out[1] < -30_000, "{out:?}");
        assert!(out[2] > 30_000 && out[3] < -30_000, "{out:?}");
        // Two summed samples just over full scale stay below it.
        let x = [20_000i16];
        let mut o = [0i16];
        m.mix(&[(1, &x[..]), (2, &x[..])], &mut o);
        assert!(o[0] > KNEE as i16 && o[0] < 32767, "{o:?}");
    }

    #[test]
    fn soft_clip_is_monotonic_continuous_and_bounded() {
        let mut prev = soft_clip(-1e6);
        let mut x = -1e6f32;
        while x < 1e6 {
            let y = soft_clip(x);
            assert!(y >= prev, "not monotonic at {x}");
            assert!(y.abs() <= FULL);
            prev = y;
            x += 37.0;
        }
        assert_eq!(soft_clip(1000.0), 1000.0);
        assert_eq!(soft_clip(-KNEE), -KNEE);
        // No jump at the knee.
        assert!((soft_clip(KNEE + 1.0) - (KNEE + 1.0)).abs() < 0.01);
        assert_eq!(soft_clip(f32::NAN), 0.0);
    }
}
