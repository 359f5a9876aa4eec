//! Server-side "enhanced audio" for one publisher: decode its Opus, suppress noise
//! (RNNoise), decide speech (VAD), lower what RNNoise kept of the background while the
//! publisher is not speaking (the gate: babble), measure the level, and re-encode. The cost is paid
//! once per publisher, never per subscriber: the re-encoded payload is shared by every
//! forwarder. One packet in gives one packet out with the same sequence number and
//! timestamp, so RTP numbering stays continuous.

use std::sync::Arc;

use chorus_media_core::denoise::Denoiser;
use chorus_media_core::gate::Gate;
use chorus_media_core::level::dbov_level;
use chorus_media_core::opus::{EncoderConfig, OpusDecoder, OpusEncoder, FRAME_SAMPLES, MAX_PACKET};
use chorus_media_core::vad::{Vad, VadConfig};

/// Most lost frames concealed before a packet; longer gaps restart the decoder state.
const MAX_CONCEAL: u16 = 3;

/// One enhanced packet.
pub struct Enhanced {
    pub payload: Arc<[u8]>,
    /// RFC 6464 level of the processed audio (0 loudest … 127 silent).
    pub level: u8,
    pub speech: bool,
}

pub struct Enhancer {
    decoder: OpusDecoder,
    encoder: OpusEncoder,
    denoiser: Denoiser,
    vad: Vad,
    gate: Gate,
    pcm: Vec<i16>,
    /// The decoded frame before denoising: the VAD judges what arrived (it keys on
    /// the noise floor, which denoising removes).
    raw: Vec<i16>,
    out: Vec<u8>,
    last_seq: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnhanceError {
    #[error("codec: {0}")]
    Codec(#[from] chorus_media_core::opus::CodecError),
}

impl Enhancer {
    pub fn new() -> Result<Self, EnhanceError> {
        Ok(Enhancer {
            decoder: OpusDecoder::new()?,
            // Complexity 5 keeps decode + denoise + VAD + encode under 0.5 ms a frame
            // (benches/README.md); the encoder is most of the cost.
            encoder: OpusEncoder::new(EncoderConfig {
                fec: true,
                complexity: 5,
                ..EncoderConfig::default()
            })?,
            denoiser: Denoiser::new(1.0),
            vad: Vad::new(VadConfig::default()),
            gate: Gate::default(),
            pcm: vec![0; FRAME_SAMPLES],
            raw: vec![0; FRAME_SAMPLES],
            out: vec![0; MAX_PACKET],
            last_seq: None,
        })
    }

    /// Processes the packet with RTP sequence number `seq`. Errors mean the packet is
    /// not a 20 ms mono Opus frame this pipeline can handle; the caller forwards the
    /// original instead.
    pub fn process(&mut self, seq: u16, payload: &[u8]) -> Result<Enhanced, EnhanceError> {
        if let Some(last) = self.last_seq {
            let missing = seq.wrapping_sub(last).wrapping_sub(1);
            if missing > 0 && missing <= MAX_CONCEAL {
                // Keep the decoder's and denoiser's state continuous across loss.
                for _ in 0..missing {
                    self.decoder.conceal(&mut self.pcm)?;
                    self.denoiser.process(&mut self.pcm);
                }
            } else if missing > MAX_CONCEAL && missing < 0x8000 {
                self.decoder.reset()?;
            }
        }
        self.last_seq = Some(seq);
        self.decoder.decode(payload, &mut self.pcm)?;
        self.raw.copy_from_slice(&self.pcm);
        let probability = self.denoiser.process(&mut self.pcm);
        let vad = self.vad.process(probability, &self.raw);
        self.gate
            .process(vad.speech || vad.voice_like, &mut self.pcm);
        let level = dbov_level(&self.pcm);
        let n = self.encoder.encode(&self.pcm, &mut self.out)?;
        Ok(Enhanced {
            payload: Arc::from(&self.out[..n]),
            level,
            speech: vad.speech,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy_tone(n: usize, seed: &mut u32) -> Vec<i16> {
        (0..n)
            .map(|i| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 17;
                *seed ^= *seed << 5;
                let noise = (*seed % 2000) as f32 - 1000.0;
                let tone = 8000.0 * (i as f32 * 2.0 * std::f32::consts::PI * 300.0 / 48000.0).sin();
                (tone + noise) as i16
            })
            .collect()
    }

    #[test]
    fn packets_round_trip_and_loss_is_concealed() {
        let mut enc = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let mut e = Enhancer::new().unwrap();
        let mut seed = 1;
        let mut buf = vec![0u8; MAX_PACKET];
        let mut seq: u16 = 65530;
        for i in 0..20 {
            let frame = noisy_tone(FRAME_SAMPLES, &mut seed);
            let n = enc.encode(&frame, &mut buf).unwrap();
            // Lose two packets in the middle (and wrap the sequence number).
            seq = seq.wrapping_add(if i == 10 { 3 } else { 1 });
            let out = e.process(seq, &buf[..n]).unwrap();
            assert!(!out.payload.is_empty());
            assert!(out.level < 60, "a loud tone is loud: {}", out.level);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut e = Enhancer::new().unwrap();
        assert!(e.process(1, &[]).is_err());
        for len in [1usize, 3, 17, 200] {
            let junk: Vec<u8> = (0..len).map(|i| (i * 91 % 256) as u8).collect();
            let _ = e.process(2 + len as u16, &junk);
        }
    }
}
