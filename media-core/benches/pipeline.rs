//! CPU cost per 20 ms frame of the "clean audio" path a server-side enhanced publisher
//! needs: Opus decode → RNNoise → VAD → Opus encode, plus each stage alone.
//!
//! `cargo bench -p chorus-media-core --bench pipeline -- --measurement-time 3`

use chorus_media_core::denoise::Denoiser;
use chorus_media_core::gate::Gate;
use chorus_media_core::opus::{EncoderConfig, OpusDecoder, OpusEncoder, FRAME_SAMPLES, MAX_PACKET};
use chorus_media_core::vad::Vad;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

/// The speech fixture (mixed with a little deterministic noise so RNNoise never takes
/// its all-silence shortcut), as 20 ms frames.
fn frames() -> Vec<Vec<i16>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/speech.wav");
    let samples: Vec<i16> = match hound::WavReader::open(path) {
        Ok(mut r) => r.samples::<i16>().filter_map(Result::ok).collect(),
        Err(_) => (0..48_000)
            .map(|n| (8000.0 * (n as f64 * 0.057).sin()) as i16)
            .collect(),
    };
    let mut seed: u32 = 1;
    samples
        .chunks_exact(FRAME_SAMPLES)
        .map(|f| {
            f.iter()
                .map(|&s| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    s.saturating_add(((seed >> 24) as i16) - 128)
                })
                .collect()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let frames = frames();
    let mut enc = OpusEncoder::new(EncoderConfig::default()).expect("encoder");
    let mut buf = [0u8; MAX_PACKET];
    let packets: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let n = enc.encode(f, &mut buf).expect("encode");
            buf[..n].to_vec()
        })
        .collect();

    let mut g = c.benchmark_group("per_20ms_frame");

    let mut dec = OpusDecoder::new().expect("decoder");
    let mut den = Denoiser::new(1.0);
    let mut vad = Vad::default();
    let mut gate = Gate::default();
    let mut pcm = [0i16; FRAME_SAMPLES];
    let mut raw = [0i16; FRAME_SAMPLES];
    let mut out = [0u8; MAX_PACKET];
    // Complexity 9 is the encoder default; 5 is what a server re-encoding many
    // streams would pick (libopus's cost roughly halves for a small quality loss).
    for complexity in [9u8, 5] {
        let mut enc = OpusEncoder::new(EncoderConfig {
            complexity,
            ..EncoderConfig::default()
        })
        .expect("encoder");
        let mut i = 0;
        g.bench_function(
            format!("decode+denoise+vad+gate+encode/c{complexity}"),
            |b| {
                b.iter(|| {
                    let p = &packets[i % packets.len()];
                    i += 1;
                    dec.decode(p, &mut pcm).expect("decode");
                    raw.copy_from_slice(&pcm);
                    let prob = den.process(&mut pcm);
                    // The VAD takes the frame as captured (before denoising).
                    let v = vad.process(prob, &raw);
                    gate.process(v.speech || v.voice_like, &mut pcm);
                    black_box(v.speech);
                    black_box(enc.encode(&pcm, &mut out).expect("encode"))
                })
            },
        );
    }

    let mut i = 0;
    g.bench_function("opus_decode", |b| {
        b.iter(|| {
            let p = &packets[i % packets.len()];
            i += 1;
            dec.decode(p, &mut pcm).expect("decode");
            black_box(pcm[0])
        })
    });

    let mut i = 0;
    g.bench_function("denoise", |b| {
        b.iter(|| {
            pcm.copy_from_slice(&frames[i % frames.len()]);
            i += 1;
            black_box(den.process(&mut pcm))
        })
    });

    let mut i = 0;
    g.bench_function("vad", |b| {
        b.iter(|| {
            let f = &frames[i % frames.len()];
            i += 1;
            black_box(vad.process(0.5, f).speech)
        })
    });

    let mut enc = OpusEncoder::new(EncoderConfig::default()).expect("encoder");
    let mut i = 0;
    g.bench_function("opus_encode/c9", |b| {
        b.iter(|| {
            let f = &frames[i % frames.len()];
            i += 1;
            black_box(enc.encode(f, &mut out).expect("encode"))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
