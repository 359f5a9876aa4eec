//! The client's audio pipeline, clock-free and socket-free: the session shell feeds it
//! one 20 ms frame at a time.
//!
//! Send side ([`Capture`]): frame → noise suppression (optional) → gate (always open,
//! voice activation or push-to-talk) → Opus encode (in-band FEC) → a packet with its
//! RFC 6464 level, or nothing while the gate is closed (the SFU and the other clients
//! then see a paused stream, which costs nothing to forward).
//!
//! Receive side ([`Playback`]): per remote participant a jitter buffer and an Opus
//! decoder (FEC for a single loss, PLC otherwise), then a mix with per-participant
//! volume.

use std::collections::HashMap;
use std::time::Instant;

use chorus_media_core::denoise::Denoiser;
use chorus_media_core::gate::Gate as BackgroundGate;
use chorus_media_core::jitter::{JitterBuffer, JitterConfig, JitterStats, Playout, PushOutcome};
use chorus_media_core::level::dbov_level;
use chorus_media_core::mixer::Mixer;
use chorus_media_core::opus::{
    CodecError, EncoderConfig, OpusDecoder, OpusEncoder, FRAME_SAMPLES, MAX_PACKET,
};
use chorus_media_core::vad::{frame_dbov, Vad};

pub use chorus_media_core::opus::FRAME_SAMPLES as SAMPLES_PER_FRAME;

/// One 20 ms mono frame at 48 kHz.
pub type Frame = [i16; FRAME_SAMPLES];

/// When the microphone is transmitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gate {
    /// Always (while not muted).
    #[default]
    Open,
    /// While the voice activity detector hears speech.
    Voice,
    /// While the push-to-talk key is held.
    PushToTalk,
}

impl std::str::FromStr for Gate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(Gate::Open),
            "voice" | "vad" => Ok(Gate::Voice),
            "ptt" | "push-to-talk" => Ok(Gate::PushToTalk),
            _ => Err(format!("unknown gate {s:?}: use open, voice or ptt")),
        }
    }
}

/// One encoded frame ready for RTP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoded<'a> {
    pub payload: &'a [u8],
    /// RFC 6464 level (0 loudest … 127 silent) of what was encoded.
    pub level: u8,
    /// Whether the VAD (or the open gate) considers this frame speech.
    pub voice: bool,
}

/// What happened to the last captured frame (for meters and stats).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CaptureState {
    /// Level of the raw captured frame in dBov (before noise suppression).
    pub input_dbov: f32,
    /// The VAD's smoothed decision (computed in every gate mode, for the UI).
    pub speech: bool,
    /// Whether the frame was sent.
    pub transmitting: bool,
}

/// The send side: noise suppression, gate, Opus.
pub struct Capture {
    encoder: OpusEncoder,
    denoiser: Denoiser,
    vad: Vad,
    denoise: bool,
    /// With noise suppression on, lowers what RNNoise keeps of the background (other
    /// people talking) while the VAD says the user is silent; matters with the open
    /// gate, where those frames are sent.
    background: BackgroundGate,
    gate: Gate,
    ptt_down: bool,
    muted: bool,
    packet: [u8; MAX_PACKET],
    state: CaptureState,
    dtx: bool,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("gate", &self.gate)
            .field("denoise", &self.denoise)
            .field("muted", &self.muted)
            .finish_non_exhaustive()
    }
}

impl Capture {
    pub fn new(encoder: EncoderConfig, denoise: bool, gate: Gate) -> Result<Self, CodecError> {
        Ok(Capture {
            encoder: OpusEncoder::new(encoder)?,
            // Strength 0 still runs RNNoise: the VAD needs its voice probability.
            denoiser: Denoiser::new(if denoise { 1.0 } else { 0.0 }),
            vad: Vad::default(),
            denoise,
            background: BackgroundGate::default(),
            gate,
            ptt_down: false,
            muted: false,
            packet: [0; MAX_PACKET],
            state: CaptureState::default(),
            dtx: encoder.dtx,
        })
    }

    pub fn set_denoise(&mut self, on: bool) {
        self.denoise = on;
        self.denoiser.set_strength(if on { 1.0 } else { 0.0 });
    }

    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = gate;
    }

    pub fn set_push_to_talk(&mut self, down: bool) {
        self.ptt_down = down;
    }

    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    pub fn muted(&self) -> bool {
        self.muted
    }

    pub fn state(&self) -> CaptureState {
        self.state
    }

    /// Processes one captured frame (modified in place by noise suppression) and
    /// returns the packet to send, if the gate is open.
    pub fn process(&mut self, frame: &mut Frame) -> Result<Option<Encoded<'_>>, CodecError> {
        let input_dbov = frame_dbov(frame);
        // The VAD wants the raw frame with RNNoise's probability for it; RNNoise
        // itself runs in place, so keep the probability of the frame before.
        let raw_level = dbov_level(frame);
        if self.denoise || self.gate == Gate::Voice {
            let vad_input = *frame;
            let p = self.denoiser.process(frame);
            let v = self.vad.process(p, &vad_input);
            if self.denoise {
                self.background.process(v.speech || v.voice_like, frame);
            }
        }
        let speech = self.vad.is_speech();
        let open = !self.muted
            && match self.gate {
                Gate::Open => true,
                Gate::Voice => speech,
                Gate::PushToTalk => self.ptt_down,
            };
        self.state = CaptureState {
            input_dbov,
            speech,
            transmitting: open,
        };
        if !open {
            return Ok(None);
        }
        let level = if self.denoise {
            dbov_level(frame)
        } else {
            raw_level
        };
        let n = self.encoder.encode(frame, &mut self.packet)?;
        // With DTX, libopus marks silence with 1–2 byte packets that are not meant to
        // be sent (receivers conceal the gap); its periodic comfort-noise updates are
        // larger and go out.
        if self.dtx && n <= 2 {
            return Ok(None);
        }
        Ok(Some(Encoded {
            payload: &self.packet[..n],
            level,
            voice: self.gate != Gate::Open || speech || level < 50,
        }))
    }
}

/// Receive statistics of one remote stream.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamStats {
    pub packets: u64,
    /// Sequence numbers never received (counted on gaps, not reduced by late arrivals).
    pub lost: u64,
    pub jitter_ms: f64,
    pub buffer: JitterStats,
}

struct Stream {
    jitter: JitterBuffer,
    decoder: OpusDecoder,
    packets: u64,
    lost: u64,
    highest: Option<u16>,
    pcm: Frame,
    /// Whether `pcm` holds this tick's audio.
    active: bool,
}

/// The receive side: one jitter buffer and decoder per remote stream, then the mix.
pub struct Playback<K> {
    config: JitterConfig,
    streams: HashMap<K, Stream>,
    mixer: Mixer<K>,
    deafened: bool,
    /// Scratch list for the mixer, reused every tick.
    order: Vec<K>,
}

impl<K> std::fmt::Debug for Playback<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Playback")
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl<K: Copy + Eq + std::hash::Hash> Playback<K> {
    pub fn new(config: JitterConfig) -> Self {
        Playback {
            config,
            streams: HashMap::new(),
            mixer: Mixer::new(),
            deafened: false,
            order: Vec::new(),
        }
    }

    /// A packet arrived for stream `key`.
    pub fn push(
        &mut self,
        key: K,
        seq: u16,
        ts: u32,
        payload: &[u8],
        now: Instant,
    ) -> Result<PushOutcome, CodecError> {
        let stream = match self.streams.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Stream {
                jitter: JitterBuffer::new(self.config),
                decoder: OpusDecoder::new()?,
                packets: 0,
                lost: 0,
                highest: None,
                pcm: [0; FRAME_SAMPLES],
                active: false,
            }),
        };
        stream.packets += 1;
        match stream.highest {
            None => stream.highest = Some(seq),
            Some(h) => {
                let ahead = seq.wrapping_sub(h);
                if ahead != 0 && ahead < 0x8000 {
                    // Gaps up to a second count as loss; longer ones are a pause or a
                    // restarted stream.
                    if ahead <= 50 {
                        stream.lost += u64::from(ahead - 1);
                    }
                    stream.highest = Some(seq);
                }
            }
        }
        Ok(stream.jitter.push(seq, ts, payload, now))
    }

    /// Forgets a stream (its participant left).
    pub fn remove(&mut self, key: K) {
        self.streams.remove(&key);
        self.mixer.remove(key);
    }

    pub fn set_volume(&mut self, key: K, volume: f32) {
        self.mixer.set_volume(key, volume);
    }

    pub fn volume(&self, key: K) -> f32 {
        self.mixer.volume(key)
    }

    pub fn set_deafened(&mut self, deafened: bool) {
        self.deafened = deafened;
    }

    pub fn stats(&self, key: K) -> Option<StreamStats> {
        self.streams.get(&key).map(|s| StreamStats {
            packets: s.packets,
            lost: s.lost,
            jitter_ms: s.jitter.jitter_ms(),
            buffer: s.jitter.stats(),
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = K> + '_ {
        self.streams.keys().copied()
    }

    /// Produces the next 20 ms of mixed audio into `out`. Decoding continues while
    /// deafened (so the buffers stay current); only the output is silenced.
    pub fn pull(&mut self, now: Instant, out: &mut Frame) {
        self.order.clear();
        for (key, s) in self.streams.iter_mut() {
            s.active = false;
            let r = match s.jitter.pop(now) {
                None => continue,
                Some(Playout::Packet(p)) => s.decoder.decode(p, &mut s.pcm),
                Some(Playout::Fec(p)) => s.decoder.decode_fec(p, &mut s.pcm),
                Some(Playout::Conceal) => s.decoder.conceal(&mut s.pcm),
            };
            if r.is_err() {
                // A packet the decoder rejects (garbage from a broken sender): play
                // concealment for this slot rather than stopping everyone's audio.
                if s.decoder.conceal(&mut s.pcm).is_err() {
                    continue;
                }
            }
            s.active = true;
            self.order.push(*key);
        }
        if self.deafened || self.order.is_empty() {
            out.fill(0);
            return;
        }
        let streams = &self.streams;
        self.mixer.mix_iter(
            self.order
                .iter()
                .filter_map(|k| streams.get(k).map(|s| (*k, &s.pcm[..]))),
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(frame: &mut Frame, n: u64) {
        for (i, s) in frame.iter_mut().enumerate() {
            let t = (n * 960 + i as u64) as f64 / 48_000.0;
            *s = ((2.0 * std::f64::consts::PI * 440.0 * t).sin() * 8000.0) as i16;
        }
    }

    #[test]
    fn dtx_sends_nothing_in_silence_and_everything_in_speech() {
        let cfg = EncoderConfig {
            dtx: true,
            ..EncoderConfig::default()
        };
        let mut c = Capture::new(cfg, false, Gate::Open).unwrap();
        let mut f: Frame = [0; 960];
        let mut sent_silence = 0;
        for _ in 0..100 {
            f.fill(0);
            if c.process(&mut f).unwrap().is_some() {
                sent_silence += 1;
            }
        }
        // A few frames before DTX kicks in and the sparse comfort-noise updates.
        assert!(
            sent_silence < 25,
            "{sent_silence} of 100 silent frames sent"
        );
        let mut sent_tone = 0;
        for n in 0..50 {
            tone(&mut f, n);
            if c.process(&mut f).unwrap().is_some() {
                sent_tone += 1;
            }
        }
        assert!(sent_tone >= 49, "{sent_tone} of 50 tone frames sent");
    }

    #[test]
    fn the_gate_and_mute_decide_what_is_sent() {
        let mut c = Capture::new(EncoderConfig::default(), false, Gate::PushToTalk).unwrap();
        let mut f: Frame = [0; 960];
        tone(&mut f, 0);
        assert!(c.process(&mut f).unwrap().is_none(), "ptt not held");
        c.set_push_to_talk(true);
        tone(&mut f, 1);
        assert!(c.process(&mut f).unwrap().is_some(), "ptt held");
        c.set_muted(true);
        tone(&mut f, 2);
        assert!(c.process(&mut f).unwrap().is_none(), "muted");
        assert!(!c.state().transmitting);
    }

    #[test]
    fn playback_mixes_two_streams_and_deafen_silences() {
        let mut enc = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let mut p: Playback<u8> = Playback::new(JitterConfig::default());
        let t0 = Instant::now();
        let mut f: Frame = [0; 960];
        let mut out: Frame = [0; 960];
        let mut pkt = [0u8; MAX_PACKET];
        let mut loud = 0;
        for n in 0..30u16 {
            tone(&mut f, u64::from(n));
            let len = enc.encode(&f, &mut pkt).unwrap();
            let now = t0 + std::time::Duration::from_millis(20 * u64::from(n));
            for key in [1u8, 2] {
                p.push(key, n, u32::from(n) * 960, &pkt[..len], now)
                    .unwrap();
            }
            p.pull(now, &mut out);
            if chorus_media_core::vad::frame_dbov(&out) > -20.0 {
                loud += 1;
            }
        }
        assert!(loud > 20, "{loud}");
        assert_eq!(p.stats(1).unwrap().packets, 30);
        p.set_deafened(true);
        p.pull(t0 + std::time::Duration::from_millis(600), &mut out);
        assert!(out.iter().all(|&s| s == 0));
    }
}
