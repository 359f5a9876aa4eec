//! Files and generators as microphones and speakers, for the headless CLI and tests:
//! WAV input (any rate, any channel count, resampled to 48 kHz mono), a sine tone,
//! and a WAV recorder.

use std::path::Path;

use anyhow::{bail, Context};

use crate::audio::Frame;
use crate::session::{AudioSink, AudioSource};

/// Linear-interpolation resampler to 48 kHz. Good enough for test inputs and for
/// the common 44.1 kHz devices; not a mastering-grade filter.
#[derive(Debug, Clone)]
pub struct Resampler {
    step: f64,
    pos: f64,
    prev: f32,
    cur: f32,
    primed: bool,
}

impl Resampler {
    pub fn new(from_hz: u32) -> Self {
        Resampler {
            step: f64::from(from_hz.max(1)) / 48_000.0,
            pos: 0.0,
            prev: 0.0,
            cur: 0.0,
            primed: false,
        }
    }

    /// Feeds input samples from `next` until `out` is full; returns how many output
    /// samples were written (fewer when the input ran out).
    pub fn fill(&mut self, out: &mut [f32], mut next: impl FnMut() -> Option<f32>) -> usize {
        if !self.primed {
            match next() {
                Some(s) => {
                    self.prev = s;
                    self.cur = s;
                }
                None => return 0,
            }
            match next() {
                Some(s) => self.cur = s,
                None => return 0,
            }
            self.primed = true;
        }
        for (i, o) in out.iter_mut().enumerate() {
            while self.pos >= 1.0 {
                self.pos -= 1.0;
                self.prev = self.cur;
                match next() {
                    Some(s) => self.cur = s,
                    None => return i,
                }
            }
            *o = self.prev + (self.cur - self.prev) * self.pos as f32;
            self.pos += self.step;
        }
        out.len()
    }
}

/// A WAV file as the microphone.
pub struct WavSource {
    samples: Vec<i16>,
    pos: usize,
    looping: bool,
}

impl WavSource {
    /// Reads the whole file (16-bit or 32-bit float PCM, any rate and channel count)
    /// and converts it to 48 kHz mono.
    pub fn open(path: &Path, looping: bool) -> anyhow::Result<Self> {
        let mut reader =
            hound::WavReader::open(path).with_context(|| format!("opening {}", path.display()))?;
        let spec = reader.spec();
        let channels = usize::from(spec.channels.max(1));
        let raw: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
            (hound::SampleFormat::Int, 16) => reader
                .samples::<i16>()
                .map(|s| s.map(|v| f32::from(v) / 32768.0))
                .collect::<Result<_, _>>()?,
            (hound::SampleFormat::Int, 24 | 32) => {
                let scale = (1u64 << (spec.bits_per_sample - 1)) as f32;
                reader
                    .samples::<i32>()
                    .map(|s| s.map(|v| v as f32 / scale))
                    .collect::<Result<_, _>>()?
            }
            (hound::SampleFormat::Float, 32) => {
                reader.samples::<f32>().collect::<Result<_, _>>()?
            }
            (f, b) => bail!(
                "{}: {b}-bit {f:?} WAV is not supported (use 16-bit PCM)",
                path.display()
            ),
        };
        let mono: Vec<f32> = raw
            .chunks(channels)
            .map(|c| c.iter().sum::<f32>() / channels as f32)
            .collect();
        let samples: Vec<i16> = if spec.sample_rate == 48_000 {
            mono.iter().map(|&s| to_i16(s)).collect()
        } else {
            let mut rs = Resampler::new(spec.sample_rate);
            let want = (mono.len() as u64 * 48_000 / u64::from(spec.sample_rate)) as usize;
            let mut out = vec![0f32; want];
            let mut it = mono.into_iter();
            let n = rs.fill(&mut out, || it.next());
            out.truncate(n);
            out.iter().map(|&s| to_i16(s)).collect()
        };
        if samples.is_empty() {
            bail!("{} holds no audio", path.display());
        }
        Ok(WavSource {
            samples,
            pos: 0,
            looping,
        })
    }

    /// Length in 20 ms frames (rounded up).
    pub fn frames(&self) -> usize {
        self.samples.len().div_ceil(960)
    }
}

fn to_i16(s: f32) -> i16 {
    (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

impl AudioSource for WavSource {
    fn read(&mut self, frame: &mut Frame) -> bool {
        for o in frame.iter_mut() {
            if self.pos >= self.samples.len() && self.looping {
                self.pos = 0;
            }
            *o = self.samples.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
        }
        self.pos < self.samples.len() || self.looping
    }
}

/// A sine tone as the microphone.
#[derive(Debug, Clone)]
pub struct Tone {
    phase: f64,
    step: f64,
    amplitude: f64,
}

impl Tone {
    /// `hz` at `dbfs` (e.g. -12.0).
    pub fn new(hz: f64, dbfs: f64) -> Self {
        Tone {
            phase: 0.0,
            step: 2.0 * std::f64::consts::PI * hz / 48_000.0,
            amplitude: 32767.0 * 10f64.powf(dbfs / 20.0),
        }
    }
}

impl AudioSource for Tone {
    fn read(&mut self, frame: &mut Frame) -> bool {
        for o in frame.iter_mut() {
            *o = (self.phase.sin() * self.amplitude).round() as i16;
            self.phase = (self.phase + self.step) % (2.0 * std::f64::consts::PI);
        }
        true
    }
}

/// Records playback into a 48 kHz mono 16-bit WAV file.
pub struct WavSink {
    writer: Option<hound::WavWriter<std::io::BufWriter<std::fs::File>>>,
    error: Option<String>,
}

impl WavSink {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 48_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let writer = hound::WavWriter::create(path, spec)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(WavSink {
            writer: Some(writer),
            error: None,
        })
    }

    /// Finishes the file header; call once at the end.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(e) = self.error.take() {
            bail!("writing the recording failed: {e}");
        }
        if let Some(w) = self.writer.take() {
            w.finalize()?;
        }
        Ok(())
    }
}

impl AudioSink for WavSink {
    fn write(&mut self, frame: &Frame) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        for &s in frame.iter() {
            if let Err(e) = w.write_sample(s) {
                self.error.get_or_insert(e.to_string());
                return;
            }
        }
    }
}

impl Drop for WavSink {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.finalize();
        }
    }
}

/// Power of `hz` in `samples` (48 kHz) by the Goertzel algorithm, normalised so a
/// full-scale sine at `hz` gives about 0 dB. Returns dB.
pub fn goertzel_db(samples: &[i16], hz: f64) -> f64 {
    if samples.is_empty() {
        return -200.0;
    }
    let w = 2.0 * std::f64::consts::PI * hz / 48_000.0;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = f64::from(x) / 32768.0 + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    let n = samples.len() as f64;
    let amp = 2.0 * power.max(0.0).sqrt() / n;
    20.0 * amp.max(1e-10).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tone_is_found_at_its_frequency_only() {
        let mut t = Tone::new(440.0, -6.0);
        let mut buf = vec![];
        let mut f = [0i16; 960];
        for _ in 0..10 {
            t.read(&mut f);
            buf.extend_from_slice(&f);
        }
        let at = goertzel_db(&buf, 440.0);
        let off = goertzel_db(&buf, 1000.0);
        assert!((at + 6.0).abs() < 0.5, "{at}");
        assert!(off < -40.0, "{off}");
    }

    #[test]
    fn resampler_keeps_a_tone_and_the_length() {
        let n = 44_100;
        let src: Vec<f32> = (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 44_100.0).sin() * 0.5)
            .collect();
        let mut rs = Resampler::new(44_100);
        let mut out = vec![0f32; 48_000];
        let mut it = src.into_iter();
        let got = rs.fill(&mut out, || it.next());
        assert!((47_990..=48_000).contains(&got), "{got}");
        let pcm: Vec<i16> = out[..got].iter().map(|&s| to_i16(s)).collect();
        assert!((goertzel_db(&pcm, 440.0) + 6.0).abs() < 0.5);
    }
}
