//! Audio and RTP building blocks shared by the Chorus SFU and clients.
//!
//! Everything here is sans-IO and clock-free: time is always an argument, so the same
//! code runs in the SFU's worker loop, in clients, and in tests driven faster than real
//! time. The audio format throughout is 48 kHz mono in 20 ms frames of 960 samples.
//!
//! - [`opus`]: Opus encode/decode, with in-band FEC, DTX and loss concealment.
//! - [`denoise`]: RNNoise noise suppression with a strength control and its voice
//!   probability; [`vad`]: per-frame speech decision built on it; [`gate`]: lowers the
//!   background (babble RNNoise keeps) while the VAD says nobody is speaking.
//! - [`level`]: RFC 6464 audio levels; [`speaker`]: active- and dominant-speaker
//!   detection from those levels.
//! - [`jitter`]: receive-side jitter buffer telling the decoder to decode, recover with
//!   FEC, or conceal; [`mixer`]: sums participants' frames with volume and soft clipping.
//! - [`rewrite`]: RTP sequence/timestamp rewriting for the SFU's forwarders.

pub mod denoise;
pub mod gate;
pub mod jitter;
pub mod level;
pub mod mixer;
pub mod opus;
pub mod rewrite;
pub mod speaker;
pub mod vad;
