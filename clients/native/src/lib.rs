//! Chorus native client library: everything the desktop app, the headless CLI, bots,
//! the load generator and tests share to take part in a voice channel.
//!
//! - [`signaling`]: the WebSocket protocol of `docs/protocol.md`.
//! - [`audio`]: the clock-free audio pipeline (noise suppression, voice activation or
//!   push-to-talk, Opus with in-band FEC; per-participant jitter buffer, decode, mix).
//! - [`session`]: one participant's session (signaling + a client-side `str0m` peer on
//!   one UDP socket + the pipeline on a 20 ms clock), steered by commands, reporting
//!   events and, at the end, a measured [`session::Report`].
//! - [`wav`]: WAV files and tones standing in for microphone and speakers.

pub mod audio;
pub mod session;
pub mod signaling;
pub mod wav;

pub use signaling::{Incoming, SignalingClient};
