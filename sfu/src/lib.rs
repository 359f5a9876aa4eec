//! Chorus SFU: the media plane.
//!
//! Each node runs one or more workers; a worker owns a UDP socket and every participant
//! of the rooms placed on it, with one `str0m::Rtc` (RTP mode, ICE-lite) per
//! participant. It forwards Opus and video RTP (VP8/H264 simulcast, VP9, AV1) between
//! participants of a room with per-subscriber rewriting (layer switches at keyframes,
//! continuous numbering), detects active speakers from RFC 6464 audio levels, and
//! takes orders from signaling over an authenticated QUIC control connection
//! (`docs/control-protocol.md`).

pub mod allocator;
pub mod control;
pub mod demux;
pub mod enhance;
pub mod fasthash;
pub mod floor;
pub mod forwarder;
pub mod metrics;
pub mod node;
pub mod receiver;
pub mod track;
pub mod worker;

pub use metrics::SfuMetrics;
pub use node::{Node, NodeConfig};
pub use worker::WorkerConfig;
