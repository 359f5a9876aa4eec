//! Fixture loading, mixing at a given SNR and objective measures for the audio
//! quality tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Once;

pub const FRAME: usize = 960;
pub const RATE: f64 = 48_000.0;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

static MAKE: Once = Once::new();

/// Path of a fixture, regenerating the set with scripts/make-fixtures.sh (espeak-ng +
/// sox) if it is missing.
pub fn fixture(name: &str) -> PathBuf {
    let path = fixtures_dir().join(name);
    if !path.exists() {
        MAKE.call_once(|| {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/make-fixtures.sh");
            let status = std::process::Command::new("bash")
                .arg(script)
                .status()
                .expect("run make-fixtures.sh (needs espeak-ng and sox)");
            assert!(status.success(), "make-fixtures.sh failed");
        });
    }
    path
}

/// Directory of the held-out fixture set (other voices and sentences, made by
/// `SET=heldout scripts/make-fixtures.sh` into the build's temp dir on first use, not
/// committed). Figures on it show how much of the main set's accuracy came from
/// tuning on the main set.
pub fn heldout_dir() -> PathBuf {
    static HELDOUT: Once = Once::new();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("media-core-heldout");
    HELDOUT.call_once(|| {
        if dir.join("speech.labels").exists() {
            return;
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/make-fixtures.sh");
        let status = std::process::Command::new("bash")
            .arg(script)
            .arg(&dir)
            .env("SET", "heldout")
            .status()
            .expect("run make-fixtures.sh (needs espeak-ng and sox)");
        assert!(status.success(), "make-fixtures.sh SET=heldout failed");
    });
    dir
}

/// A fixture set: the committed main set or the generated held-out one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Set {
    Main,
    Heldout,
}

impl Set {
    fn path(self, name: &str) -> PathBuf {
        match self {
            Set::Main => fixture(name),
            Set::Heldout => heldout_dir().join(name),
        }
    }
}

pub fn read_wav(name: &str) -> Vec<i16> {
    read_wav_in(Set::Main, name)
}

pub fn read_wav_in(set: Set, name: &str) -> Vec<i16> {
    let mut r = hound::WavReader::open(set.path(name)).expect("open fixture");
    let spec = r.spec();
    assert_eq!(spec.sample_rate, 48_000, "{name}: 48 kHz expected");
    assert_eq!(spec.channels, 1, "{name}: mono expected");
    assert_eq!(spec.bits_per_sample, 16, "{name}: 16-bit expected");
    r.samples::<i16>()
        .collect::<Result<_, _>>()
        .expect("read fixture samples")
}

/// Speech segments (start, end) in samples.
pub fn read_labels() -> Vec<(usize, usize)> {
    read_labels_in(Set::Main)
}

pub fn read_labels_in(set: Set) -> Vec<(usize, usize)> {
    let text = std::fs::read_to_string(set.path("speech.labels")).expect("read labels");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l
                .split_whitespace()
                .map(|v| v.parse::<f64>().expect("label"));
            let a = it.next().expect("start");
            let b = it.next().expect("end");
            ((a * RATE) as usize, (b * RATE) as usize)
        })
        .collect()
}

/// Per 20 ms frame: does most of it lie inside a labelled speech segment?
pub fn frame_labels(n_samples: usize, segs: &[(usize, usize)]) -> Vec<bool> {
    (0..n_samples / FRAME)
        .map(|k| {
            let (a, b) = (k * FRAME, (k + 1) * FRAME);
            let inside: usize = segs
                .iter()
                .map(|&(s, e)| b.min(e).saturating_sub(a.max(s)))
                .sum();
            inside * 2 > FRAME
        })
        .collect()
}

fn power(x: impl Iterator<Item = f64>) -> f64 {
    let mut n = 0usize;
    let mut s = 0.0;
    for v in x {
        s += v * v;
        n += 1;
    }
    s / n.max(1) as f64
}

/// Clean speech plus `noise` (looped) scaled so that active speech power (inside the
/// labelled segments) over noise power is `snr_db`. Returns (noisy, scaled noise).
pub fn mix(clean: &[i16], noise: &[i16], segs: &[(usize, usize)], snr_db: f64) -> Vec<i16> {
    let speech_p = power(
        segs.iter()
            .flat_map(|&(s, e)| clean[s..e.min(clean.len())].iter().map(|&v| v as f64)),
    );
    let looped: Vec<f64> = (0..clean.len())
        .map(|i| noise[i % noise.len()] as f64)
        .collect();
    let noise_p = power(looped.iter().copied());
    let g = (speech_p / noise_p / 10f64.powf(snr_db / 10.0)).sqrt();
    clean
        .iter()
        .zip(looped.iter())
        .map(|(&c, &n)| (c as f64 + g * n).round().clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// Segmental SNR (dB) of `x` against `clean` over the given frames, with the usual
/// per-frame clamp to [-10, 35] dB so silent or perfect frames do not dominate.
/// `x` is compared sample-for-sample, so align it first.
pub fn seg_snr(clean: &[i16], x: &[i16], frames: &[usize]) -> f64 {
    let mut total = 0.0;
    for &k in frames {
        let a = k * FRAME;
        let b = (a + FRAME).min(clean.len()).min(x.len());
        let mut sig = 0.0;
        let mut err = 0.0;
        for i in a..b {
            let c = clean[i] as f64;
            sig += c * c;
            err += (c - x[i] as f64).powi(2);
        }
        let snr = 10.0 * ((sig + 1e-9) / (err + 1e-9)).log10();
        total += snr.clamp(-10.0, 35.0);
    }
    total / frames.len().max(1) as f64
}

/// Mean energy (dBFS) of the given frames.
pub fn frames_dbfs(x: &[i16], frames: &[usize]) -> f64 {
    let p = power(
        frames
            .iter()
            .flat_map(|&k| x[k * FRAME..((k + 1) * FRAME).min(x.len())].iter())
            .map(|&v| v as f64 / 32768.0),
    );
    10.0 * (p + 1e-12).log10()
}
