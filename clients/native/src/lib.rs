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

/// Logging for the client programs (CLI, desktop, load generator): warnings and errors
/// on stderr, or what `CHORUS_LOG` asks for (e.g. `CHORUS_LOG=debug`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHORUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}
