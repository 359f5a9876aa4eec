//! Signaling ↔ SFU node control messages (QUIC, one bidirectional stream per node,
//! length-prefixed JSON frames; see [`crate::framing`]). See `docs/control-protocol.md`.
//!
//! Participants are addressed by a signaling-assigned `u64` id that is unique across the
//! whole signaling instance, so a node never has to know room membership to route.

use serde::{Deserialize, Serialize};

use crate::track::{Quality, QualityReason, ReceiveStats, TrackDecl, TrackInfo};

/// Messages from signaling to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToNode {
    /// First frame from signaling: a random nonce the node must MAC with its secret.
    Challenge { nonce: String, version: u32 },
    /// The node is registered and may receive participants.
    Welcome { node_id: String },
    /// Registration refused; signaling closes the connection after this.
    Rejected { reason: String },
    /// Seat a participant of `room` on this node.
    AddParticipant {
        participant: u64,
        room: String,
        identity: String,
        /// Display name, stamped on relayed `signal` messages.
        #[serde(default)]
        name: String,
        publish: bool,
        subscribe: bool,
        /// Offer this participant other participants' video (a protocol 2 client).
        #[serde(default)]
        video: bool,
    },
    /// The client's SDP offer for `participant`. `tracks` gives the source of every
    /// sending m-section (signaling resolved defaults and checked the grants).
    ClientOffer {
        participant: u64,
        sdp: String,
        #[serde(default)]
        tracks: Vec<TrackDecl>,
    },
    /// The client's SDP answer to an offer the node sent.
    ClientAnswer { participant: u64, sdp: String },
    /// A trickled ICE candidate from the client (`a=candidate` value, no prefix).
    ClientCandidate { participant: u64, candidate: String },
    /// Stop (or resume) forwarding this participant's audio.
    SetMuted { participant: u64, muted: bool },
    /// Turn server-side noise suppression ("enhanced audio") on or off for this
    /// participant's microphone.
    SetEnhanced { participant: u64, enabled: bool },
    /// The most `participant` wants of track `track` (a track sid from `tracks`).
    /// Fields left out keep their previous value (see the client's `update_subscription`).
    SetSubscription {
        participant: u64,
        track: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_quality: Option<Quality>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        visible: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        width: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        height: Option<u32>,
    },
    /// Remove a participant and free its media session.
    RemoveParticipant { participant: u64 },
    /// The participant's client resumed its session on the signaling instance that
    /// sends this (it was seated through another one): from now on every event about
    /// the participant goes to this connection. Its media session is untouched.
    Adopt { participant: u64 },
    /// Write one text frame (a JSON chat message) on each listed participant's `chat`
    /// data channel.
    ChatTo {
        participants: Vec<u64>,
        data: String,
    },
}

/// Messages from a node to signaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromNode {
    /// First frame from the node.
    Hello {
        node_id: String,
        version: u32,
        /// Media address(es) the node serves on, for operators' eyes.
        media_addrs: Vec<String>,
    },
    /// Reply to `challenge`: hex HMAC-SHA256(node secret, "chorus-node-auth|" + nonce + "|" + node_id).
    Auth { mac: String },
    /// Periodic load report (every 2 s and when it changes).
    Load { participants: u32, rooms: u32 },
    /// SDP answer to a client offer.
    Answer { participant: u64, sdp: String },
    /// SDP offer to a client (renegotiation: tracks came or went).
    Offer { participant: u64, sdp: String },
    /// A participant's audio track started or stopped being published.
    Track { participant: u64, publishing: bool },
    /// The full list of a participant's published tracks, sent whenever it changes.
    Tracks {
        participant: u64,
        tracks: Vec<TrackInfo>,
    },
    /// The layer `participant` receives of track `track` changed.
    TrackQuality {
        participant: u64,
        track: String,
        quality: Quality,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<QualityReason>,
    },
    /// Dynacast: the layers of `participant`'s own track `track` that some subscriber
    /// receives (sent when the set changes).
    PublishLayers {
        participant: u64,
        track: String,
        layers: Vec<Quality>,
    },
    /// A subscriber's downlink: estimate, allocation and layers (every few seconds
    /// while it receives video).
    ReceiveStats {
        participant: u64,
        stats: ReceiveStats,
    },
    /// The room's dominant speaker changed (`None`: nobody dominates any more).
    Dominant {
        room: String,
        participant: Option<u64>,
    },
    /// Speaker detection result for a participant.
    Speaking { participant: u64, speaking: bool },
    /// The node's media session ended for this participant (ICE failed, peer misbehaved,
    /// internal fault). Signaling removes the participant.
    ParticipantGone { participant: u64, reason: String },
    /// The participant's `chat` data channel opened: signaling sends it the history.
    ChatReady { participant: u64 },
    /// A text frame the participant sent on its `chat` data channel, unparsed: signaling
    /// owns every chat rule (grants, size, rate, ids, history).
    ChatIn { participant: u64, data: String },
    /// A command about `participant` failed (e.g. unparsable SDP).
    Error {
        participant: u64,
        code: NodeErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeErrorCode {
    InvalidSdp,
    InvalidCandidate,
    UnknownParticipant,
    /// `set_subscription` named a track that is not published in the room.
    UnknownTrack,
    Internal,
}

/// The string a node MACs to authenticate; see [`FromNode::Auth`].
pub fn auth_message(nonce: &str, node_id: &str) -> String {
    format!("chorus-node-auth|{nonce}|{node_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_node_round_trips() {
        let m = ToNode::AddParticipant {
            participant: 7,
            room: "lobby".into(),
            identity: "ana".into(),
            name: "Ana".into(),
            publish: true,
            subscribe: true,
            video: true,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert!(s.starts_with(r#"{"type":"add_participant""#));
        assert_eq!(serde_json::from_str::<ToNode>(&s).unwrap(), m);
    }

    #[test]
    fn from_node_round_trips() {
        let m = FromNode::Error {
            participant: 3,
            code: NodeErrorCode::InvalidSdp,
            message: "no".into(),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<FromNode>(&s).unwrap(), m);
    }
}
