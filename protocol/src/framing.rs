//! Length-prefixed JSON frames for the control plane: a 4-byte big-endian length, then
//! that many bytes of UTF-8 JSON. The decoder is sans-IO: feed it whatever bytes the
//! stream gave you and pull complete frames out.

use serde::{de::DeserializeOwned, Serialize};

/// Largest control frame either side accepts. SDP is the biggest payload (a few KiB).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The peer announced a frame above [`MAX_FRAME_BYTES`]; the stream is unusable.
    TooLarge(usize),
    /// A complete frame was not valid JSON for the expected message type.
    Json(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(n) => write!(f, "control frame of {n} bytes exceeds limit"),
            FrameError::Json(e) => write!(f, "bad control frame: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing our own enums cannot fail (no maps with non-string keys).
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Accumulates stream bytes and yields complete frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let parsed = serde_json::from_slice(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        parsed
            .map(Some)
            .map_err(|e| FrameError::Json(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{FromNode, ToNode};

    #[test]
    fn frames_split_anywhere_decode() {
        let a = encode(&ToNode::RemoveParticipant { participant: 1 });
        let b = encode(&ToNode::SetMuted {
            participant: 2,
            muted: true,
        });
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        for split in 0..all.len() {
            let mut d = FrameDecoder::new();
            d.push(&all[..split]);
            let mut got = Vec::new();
            while let Some(m) = d.next_frame::<ToNode>().unwrap() {
                got.push(m);
            }
            d.push(&all[split..]);
            while let Some(m) = d.next_frame::<ToNode>().unwrap() {
                got.push(m);
            }
            assert_eq!(got.len(), 2, "split at {split}");
        }
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut d = FrameDecoder::new();
        d.push(&(u32::MAX).to_be_bytes());
        assert!(matches!(
            d.next_frame::<FromNode>(),
            Err(FrameError::TooLarge(_))
        ));

        let mut d = FrameDecoder::new();
        d.push(&3u32.to_be_bytes());
        d.push(b"{x}");
        assert!(matches!(
            d.next_frame::<FromNode>(),
            Err(FrameError::Json(_))
        ));
    }
}
