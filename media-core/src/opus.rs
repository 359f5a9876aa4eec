//! Opus encode/decode for Chorus's one audio format: 48 kHz, mono, 20 ms frames
//! ([`FRAME_SAMPLES`] = 960 samples).
//!
//! A thin wrapper over libopus (the `opus` crate, which builds libopus from source with
//! cmake). It exists so that callers deal in whole 20 ms frames and in three decode
//! operations that map onto what a jitter buffer hands out: a packet that arrived
//! ([`OpusDecoder::decode`]), a packet that was lost and nothing better is known
//! ([`OpusDecoder::conceal`], libopus packet-loss concealment), and a packet that was
//! lost but the *next* one is here and may carry an in-band FEC copy of it
//! ([`OpusDecoder::decode_fec`]).
//!
//! Packets are untrusted input: every decode returns a `Result`, never panics, and a
//! packet that decodes to anything other than one 20 ms frame is an error (Chorus
//! negotiates 20 ms packetisation; longer packets would overflow the frame).

use opus::{Application, Bitrate, Channels};

/// Sample rate of every frame in this crate.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one 20 ms mono frame at 48 kHz.
pub const FRAME_SAMPLES: usize = 960;
/// Largest Opus packet for one frame (RFC 6716 §3.2.1: 1275 bytes); output buffers of
/// this size never make the encoder fail for lack of room.
pub const MAX_PACKET: usize = 1275;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("libopus: {0}")]
    Opus(#[from] opus::Error),
    #[error("frame must be {FRAME_SAMPLES} samples, got {0}")]
    FrameSize(usize),
    #[error("packet decoded to {0} samples, expected one {FRAME_SAMPLES}-sample frame")]
    PacketDuration(usize),
    #[error("empty packet")]
    EmptyPacket,
}

/// Encoder settings. The defaults suit speech on the open internet: VoIP mode, 32 kb/s,
/// in-band FEC on with a 10% expected loss (libopus only spends bits on FEC when told
/// to expect loss), DTX off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderConfig {
    /// Target bitrate in bits per second.
    pub bitrate: i32,
    /// In-band forward error correction: each packet carries a low-rate copy of the
    /// previous frame (SILK/hybrid modes only, which VoIP mode picks at speech
    /// bitrates).
    pub fec: bool,
    /// Expected packet loss in percent (0–100); drives how much FEC the encoder adds.
    pub expected_loss_percent: u8,
    /// Discontinuous transmission: during silence the encoder emits tiny packets
    /// (1–2 bytes) that the caller may choose not to send.
    pub dtx: bool,
    /// 0 (cheapest) … 10 (best).
    pub complexity: u8,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            bitrate: 32_000,
            fec: true,
            expected_loss_percent: 10,
            dtx: false,
            complexity: 9,
        }
    }
}

/// 48 kHz mono Opus encoder taking 20 ms frames.
pub struct OpusEncoder {
    inner: opus::Encoder,
}

impl std::fmt::Debug for OpusEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusEncoder").finish_non_exhaustive()
    }
}

impl OpusEncoder {
    pub fn new(config: EncoderConfig) -> Result<Self, CodecError> {
        let mut inner = opus::Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip)?;
        inner.set_bitrate(Bitrate::Bits(config.bitrate))?;
        inner.set_inband_fec(config.fec)?;
        inner.set_packet_loss_perc(i32::from(config.expected_loss_percent.min(100)))?;
        inner.set_dtx(config.dtx)?;
        inner.set_complexity(i32::from(config.complexity.min(10)))?;
        Ok(OpusEncoder { inner })
    }

    /// Encodes one 960-sample frame into `out` and returns the packet length. `out`
    /// should hold [`MAX_PACKET`] bytes.
    pub fn encode(&mut self, frame: &[i16], out: &mut [u8]) -> Result<usize, CodecError> {
        if frame.len() != FRAME_SAMPLES {
            return Err(CodecError::FrameSize(frame.len()));
        }
        Ok(self.inner.encode(frame, out)?)
    }

    /// Updates the expected loss (e.g. from RTCP receiver reports) so FEC tracks the
    /// network.
    pub fn set_expected_loss(&mut self, percent: u8) -> Result<(), CodecError> {
        Ok(self
            .inner
            .set_packet_loss_perc(i32::from(percent.min(100)))?)
    }

    pub fn set_bitrate(&mut self, bitrate: i32) -> Result<(), CodecError> {
        Ok(self.inner.set_bitrate(Bitrate::Bits(bitrate))?)
    }

    /// True while DTX is on and the encoder is in a silent stretch (its packets carry
    /// no speech and need not be sent).
    pub fn in_dtx(&mut self) -> Result<bool, CodecError> {
        Ok(self.inner.get_in_dtx()?)
    }
}

/// 48 kHz mono Opus decoder producing 20 ms frames.
pub struct OpusDecoder {
    inner: opus::Decoder,
}

impl std::fmt::Debug for OpusDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusDecoder").finish_non_exhaustive()
    }
}

impl OpusDecoder {
    pub fn new() -> Result<Self, CodecError> {
        Ok(OpusDecoder {
            inner: opus::Decoder::new(SAMPLE_RATE, Channels::Mono)?,
        })
    }

    /// Decodes a received packet into `out` (exactly [`FRAME_SAMPLES`] long).
    pub fn decode(&mut self, packet: &[u8], out: &mut [i16]) -> Result<(), CodecError> {
        check_out(out)?;
        if packet.is_empty() {
            // libopus reads an empty packet as "lost"; a caller passing one by mistake
            // would silently get concealment, so say so instead.
            return Err(CodecError::EmptyPacket);
        }
        // A packet longer than 20 ms (up to 120 ms is legal Opus) would not fit: libopus
        // reports "buffer too small", which surfaces as an error here.
        let n = self.inner.decode(packet, out, false)?;
        check_len(n)
    }

    /// Packet-loss concealment: synthesises the next 20 ms from the decoder's history
    /// when a packet is missing and no FEC is available.
    pub fn conceal(&mut self, out: &mut [i16]) -> Result<(), CodecError> {
        check_out(out)?;
        let n = self.inner.decode(&[], out, false)?;
        check_len(n)
    }

    /// Recovers a lost frame from the in-band FEC carried by the packet that *follows*
    /// it. Call this for the lost frame, then [`decode`](Self::decode) the same `next`
    /// packet for its own frame. If `next` carries no FEC, libopus falls back to
    /// concealment, so this is never worse than [`conceal`](Self::conceal).
    pub fn decode_fec(&mut self, next: &[u8], out: &mut [i16]) -> Result<(), CodecError> {
        check_out(out)?;
        if next.is_empty() {
            return Err(CodecError::EmptyPacket);
        }
        let n = self.inner.decode(next, out, true)?;
        check_len(n)
    }

    /// Forgets history (e.g. when the publisher's stream restarts).
    pub fn reset(&mut self) -> Result<(), CodecError> {
        Ok(self.inner.reset_state()?)
    }
}

fn check_out(out: &[i16]) -> Result<(), CodecError> {
    if out.len() != FRAME_SAMPLES {
        return Err(CodecError::FrameSize(out.len()));
    }
    Ok(())
}

fn check_len(n: usize) -> Result<(), CodecError> {
    if n != FRAME_SAMPLES {
        return Err(CodecError::PacketDuration(n));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn sine(freq: f64, amp: f64, start: usize, len: usize) -> Vec<i16> {
        (start..start + len)
            .map(|n| (amp * (2.0 * PI * freq * n as f64 / SAMPLE_RATE as f64).sin()) as i16)
            .collect()
    }

    /// Power of `freq` in `x` relative to the total power (Goertzel), 0..1.
    fn goertzel_fraction(x: &[i16], freq: f64) -> f64 {
        let w = 2.0 * PI * freq / SAMPLE_RATE as f64;
        let coeff = 2.0 * w.cos();
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for &v in x {
            let s0 = v as f64 + coeff * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
        // For a pure sine of amplitude A over N samples, power ≈ (A N / 2)^2, and the
        // total energy is A^2 N / 2; normalise so a pure tone gives ≈ 1.
        let energy: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        if energy == 0.0 {
            return 0.0;
        }
        power / (energy * x.len() as f64 / 2.0)
    }

    fn rms(x: &[i16]) -> f64 {
        (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    }

    #[test]
    fn sine_round_trip_keeps_frequency_and_level() {
        let mut enc = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let mut pkt = [0u8; MAX_PACKET];
        let mut out = vec![0i16; FRAME_SAMPLES];
        let mut decoded = Vec::new();
        for f in 0..50 {
            let frame = sine(440.0, 10_000.0, f * FRAME_SAMPLES, FRAME_SAMPLES);
            let n = enc.encode(&frame, &mut pkt).unwrap();
            assert!(n > 0 && n <= MAX_PACKET);
            dec.decode(&pkt[..n], &mut out).unwrap();
            decoded.extend_from_slice(&out);
        }
        // Skip the first 200 ms (encoder start-up and codec delay).
        let tail = &decoded[10 * FRAME_SAMPLES..];
        let at_440 = goertzel_fraction(tail, 440.0);
        let at_1000 = goertzel_fraction(tail, 1000.0);
        assert!(at_440 > 0.9, "440 Hz holds {at_440:.3} of the power");
        assert!(at_1000 < 0.01, "1 kHz holds {at_1000:.3} of the power");
        // Level within 1 dB of the input's (10000 / sqrt 2).
        let db = 20.0 * (rms(tail) / (10_000.0 / 2f64.sqrt())).log10();
        assert!(db.abs() < 1.0, "level changed by {db:.2} dB");
    }

    #[test]
    fn plc_fills_a_lost_frame_with_sound() {
        let mut enc = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let mut pkt = [0u8; MAX_PACKET];
        let mut out = vec![0i16; FRAME_SAMPLES];
        for f in 0..20 {
            let frame = sine(300.0, 8_000.0, f * FRAME_SAMPLES, FRAME_SAMPLES);
            let n = enc.encode(&frame, &mut pkt).unwrap();
            dec.decode(&pkt[..n], &mut out).unwrap();
        }
        dec.conceal(&mut out).unwrap();
        // Concealment continues the tone rather than dropping to silence: well above
        // -40 dB of the input level and still mostly at 300 Hz.
        let level = rms(&out);
        assert!(level > 8_000.0 / 2f64.sqrt() * 0.01, "PLC rms {level:.0}");
        assert!(goertzel_fraction(&out, 300.0) > 0.5);
    }

    #[test]
    fn bad_packets_are_errors_not_panics() {
        let mut dec = OpusDecoder::new().unwrap();
        let mut out = vec![0i16; FRAME_SAMPLES];
        assert!(matches!(
            dec.decode(&[], &mut out),
            Err(CodecError::EmptyPacket)
        ));
        // TOC byte announcing code 3 (arbitrary frame count) with a missing count byte.
        assert!(dec.decode(&[0xfb], &mut out).is_err());
        // Code 3 with 48 frames of 20 ms = 960 ms: over Opus's 120 ms limit.
        assert!(dec.decode(&[0xfb, 0x30, 0, 0], &mut out).is_err());
        // A valid 60 ms packet (code 3, 3 frames) does not fit a 20 ms frame.
        let mut enc = opus::Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip).unwrap();
        let long = enc.encode_vec(&vec![0i16; 2880], 400).unwrap();
        assert!(dec.decode(&long, &mut out).is_err());
        // Wrong output size.
        let mut short = vec![0i16; 100];
        assert!(matches!(
            dec.conceal(&mut short),
            Err(CodecError::FrameSize(100))
        ));
        // Random junk never panics, and the decoder still works afterwards.
        let mut x: u32 = 12345;
        for len in 1..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = dec.decode(&junk, &mut out);
        }
        dec.conceal(&mut out).unwrap();
    }

    #[test]
    fn encoder_rejects_wrong_frame_size() {
        let mut enc = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let mut pkt = [0u8; MAX_PACKET];
        assert!(matches!(
            enc.encode(&[0; 480], &mut pkt),
            Err(CodecError::FrameSize(480))
        ));
    }

    #[test]
    fn dtx_shrinks_packets_in_silence() {
        let cfg = EncoderConfig {
            dtx: true,
            ..EncoderConfig::default()
        };
        let mut enc = OpusEncoder::new(cfg).unwrap();
        let mut pkt = [0u8; MAX_PACKET];
        let silence = [0i16; FRAME_SAMPLES];
        let mut sizes = Vec::new();
        for _ in 0..50 {
            sizes.push(enc.encode(&silence, &mut pkt).unwrap());
        }
        // After DTX kicks in, packets are 1 byte (TOC only), except the periodic
        // comfort-noise update (every 400 ms).
        let big = sizes[20..].iter().filter(|&&n| n > 2).count();
        assert!(big <= 2, "{sizes:?}");
        assert!(enc.in_dtx().unwrap());
    }
}
