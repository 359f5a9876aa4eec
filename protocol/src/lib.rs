//! Wire types shared by Chorus signaling, SFU nodes and clients.
//!
//! Two protocols live here, each documented in `docs/`:
//! - [`client`]: the JSON messages a browser or native client exchanges with signaling over
//!   a WebSocket (`docs/protocol.md`).
//! - [`chat`]: the JSON frames on the `chat` and `signal` data channels between a client
//!   and the SFU (`docs/protocol.md`, "Text chat").
//! - [`track`]: published media (kind, source, codec, simulcast layers), shared by both.
//! - [`control`]: the messages signaling and an SFU node exchange over QUIC
//!   (`docs/control-protocol.md`).
//!
//! This crate holds data types and framing only, so that signaling, the SFU and the
//! native client can share them without depending on each other.

pub mod chat;
pub mod client;
pub mod control;
pub mod framing;
pub mod track;

/// Version of the client↔signaling WebSocket protocol described in `docs/protocol.md`.
/// Version 2 adds video: clients that join with `protocol: 2` are offered other
/// participants' video and may publish cameras and screens.
pub const PROTOCOL_VERSION: u32 = 2;

/// The audio-only protocol, still served: clients joining with it (or with no
/// `protocol`) are never offered video.
pub const PROTOCOL_AUDIO_ONLY: u32 = 1;

/// Version of the signaling↔SFU control protocol described in `docs/control-protocol.md`.
/// Version 2 added tracks (video) to offers, participants and events; version 3 adds
/// adaptive stream, stream-allocation reasons, dynacast and downlink stats.
pub const CONTROL_VERSION: u32 = 4;

/// ALPN token for the control-plane QUIC connection.
pub const CONTROL_ALPN: &[u8] = b"chorus-control/1";
