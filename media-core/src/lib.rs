//! Audio and RTP building blocks shared by the Chorus SFU and clients.
//!
//! Everything here is sans-IO and clock-free: time is always an argument, so the same
//! code runs in the SFU's worker loop, in clients, and in tests driven faster than real
//! time. Today it holds RFC 6464 audio-level math, the active-speaker detector and the
//! RTP sequence/timestamp rewriter used by the SFU's forwarders.

pub mod level;
pub mod rewrite;
pub mod speaker;
