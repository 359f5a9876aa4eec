//! Client ↔ signaling messages (WebSocket, JSON text frames). See `docs/protocol.md`.

use serde::{Deserialize, Serialize};

use crate::track::{Quality, QualityReason, SourceSet, TrackDecl, TrackInfo, TrackSource};

/// What a token allows. Every field defaults to `false` when absent from a token, except
/// where [`Grants::default_participant`] is used to mint one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Grants {
    pub join: bool,
    pub publish: bool,
    pub subscribe: bool,
    pub publish_data: bool,
    pub admin: bool,
    /// Which sources `publish` covers; absent = all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish_sources: Option<SourceSet>,
}

impl Grants {
    /// What an ordinary participant of a voice channel may do.
    pub fn default_participant() -> Self {
        Grants {
            join: true,
            publish: true,
            subscribe: true,
            publish_data: true,
            admin: false,
            can_publish_sources: None,
        }
    }

    /// Whether this token may publish a track from `source`.
    pub fn may_publish(&self, source: TrackSource) -> bool {
        self.publish && self.can_publish_sources.is_none_or(|s| s.contains(source))
    }
}

/// A participant as other clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    /// Server-assigned session id, unique within the room for this seat. The media
    /// stream id (`a=msid`) of this participant's tracks is `p<sid>`.
    pub sid: String,
    /// Identity from the token's `sub`.
    pub identity: String,
    /// Display name from the token's `name` (falls back to the identity).
    pub name: String,
    pub muted: bool,
    pub speaking: bool,
    /// True while the participant publishes audio.
    pub publishing: bool,
    /// Every track the participant publishes (protocol 2; empty for protocol 1 clients).
    #[serde(default)]
    pub tracks: Vec<TrackInfo>,
}

/// An ICE server as `RTCPeerConnection` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// A trickled ICE candidate, in the shape of `RTCIceCandidateInit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default, rename = "sdpMid", skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(
        default,
        rename = "sdpMLineIndex",
        skip_serializing_if = "Option::is_none"
    )]
    pub sdp_mline_index: Option<u16>,
}

/// Messages from a client to signaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message on a socket. `room`, when given, must equal the token's room.
    /// `resume: true` asks to take back a seat kept during the reconnect grace period
    /// without renegotiating media.
    Join {
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        #[serde(default)]
        resume: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<u32>,
    },
    /// SDP offer from the client: its first offer, and (protocol 2) each later one that
    /// publishes or unpublishes a track. `tracks` names the source of sending m-sections;
    /// an undeclared one is a microphone (audio) or a camera (video).
    Offer {
        sdp: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tracks: Vec<TrackDecl>,
    },
    /// SDP answer to an offer the server sent.
    Answer { sdp: String },
    /// Trickle ICE from the client. An empty `candidate` string means end of candidates.
    Candidate { candidate: IceCandidate },
    /// Mute or unmute the client's own microphone.
    Mute { muted: bool },
    /// Ask for (or stop) server-side noise suppression of the client's microphone.
    Enhance { enabled: bool },
    /// The most this client wants of another participant's video track (protocol 2):
    /// `off` stops it, `low`/`medium`/`high` cap its simulcast layer. Adaptive stream:
    /// `visible: false` pauses the track (a hidden tile, a background tab) and
    /// `width`/`height` (device pixels of the tile) cap it at the layer that fits. Each
    /// field left out keeps its previous value.
    UpdateSubscription {
        track_sid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_quality: Option<Quality>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        visible: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        width: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        height: Option<u32>,
    },
    /// Keep-alive; answered by `pong` with the same `ts`.
    Ping {
        #[serde(default)]
        ts: f64,
    },
    /// Leave the room for good (no grace period).
    Leave,
}

/// Messages from signaling to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Joined {
        protocol: u32,
        room: String,
        #[serde(rename = "self")]
        me: ParticipantInfo,
        participants: Vec<ParticipantInfo>,
        ice_servers: Vec<IceServer>,
        grants: Grants,
        /// True when the seat kept during the grace period was taken back and the
        /// existing media session continues; false for a fresh seat (send an offer).
        resumed: bool,
        /// Seconds a dropped socket keeps the seat.
        reconnect_grace_secs: u64,
        /// The room's current dominant speaker, if any.
        #[serde(default)]
        dominant_speaker: Option<String>,
    },
    /// SDP answer to the client's offer.
    Answer {
        sdp: String,
    },
    /// SDP offer from the server (tracks came or went); reply with `answer`.
    Offer {
        sdp: String,
    },
    /// Trickle ICE from the server.
    Candidate {
        candidate: IceCandidate,
    },
    ParticipantJoined {
        participant: ParticipantInfo,
    },
    ParticipantLeft {
        sid: String,
        identity: String,
        reason: String,
    },
    ParticipantUpdated {
        participant: ParticipantInfo,
    },
    /// The room's dominant (main) speaker changed; `sid` is null when nobody dominates.
    DominantSpeaker {
        sid: Option<String>,
    },
    /// The layer this client receives of a video track changed (protocol 2): `off` while
    /// nothing is forwarded (capped off, or waiting for the first keyframe).
    TrackQuality {
        track_sid: String,
        quality: Quality,
        /// Why it is less than `max_quality` allows (absent: it is not).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<QualityReason>,
    },
    /// Dynacast (protocol 2): the simulcast layers of this client's own track that some
    /// subscriber receives. The client stops encoding the others (`active: false`) and
    /// starts them again when a later `publish_layers` lists them.
    PublishLayers {
        track_sid: String,
        layers: Vec<Quality>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Pong {
        ts: f64,
    },
    /// The server ends this session (kicked, replaced by a newer join, room closed).
    Left {
        reason: String,
    },
}

/// Every error code a client can receive. Documented in `docs/protocol.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not valid JSON or not a known message.
    BadRequest,
    /// The frame exceeded the message size limit.
    MessageTooLarge,
    /// The token is missing, malformed, badly signed or from an unknown API key.
    InvalidToken,
    /// The token's `exp` has passed (or `nbf` not reached).
    TokenExpired,
    /// The token does not allow this (wrong room, no `join`/`publish` grant).
    Forbidden,
    /// A message other than `join` or `ping` arrived before `join` succeeded.
    NotJoined,
    /// `join` on a socket that already joined.
    AlreadyJoined,
    /// The SDP could not be parsed or negotiated.
    InvalidSdp,
    /// An ICE candidate could not be parsed.
    InvalidCandidate,
    /// No media node is connected, so no room can be placed.
    NoMediaNode,
    /// The client sends messages faster than allowed.
    RateLimited,
    /// The protocol version is not supported.
    UnsupportedProtocol,
    /// `update_subscription` named a track that is not published in the room.
    UnknownTrack,
    /// Something failed on the server side.
    Internal,
    /// Signaling cannot reach the state it shares with other instances (Redis); the
    /// join did not happen. Try again in a moment (another instance may be fine).
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::InvalidSdp => "invalid_sdp",
            ErrorCode::InvalidCandidate => "invalid_candidate",
            ErrorCode::NoMediaNode => "no_media_node",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::UnknownTrack => "unknown_track",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// Largest text frame signaling accepts from a client, in bytes. Larger frames get
/// `message_too_large` and are discarded; the session continues.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_round_trips_with_defaults() {
        let m: ClientMessage = serde_json::from_str(r#"{"type":"join","token":"t"}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Join {
                token: "t".into(),
                room: None,
                resume: false,
                protocol: None
            }
        );
        let back = serde_json::to_string(&m).unwrap();
        assert_eq!(back, r#"{"type":"join","token":"t","resume":false}"#);
    }

    #[test]
    fn unknown_type_is_an_error() {
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"explode"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"token":"x"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>("not json").is_err());
    }

    #[test]
    fn candidate_uses_browser_field_names() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"candidate","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#,
        )
        .unwrap();
        match m {
            ClientMessage::Candidate { candidate } => {
                assert_eq!(candidate.sdp_mid.as_deref(), Some("0"));
                assert_eq!(candidate.sdp_mline_index, Some(0));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn server_messages_serialize_with_snake_case_tags() {
        let e = ServerMessage::Error {
            code: ErrorCode::TokenExpired,
            message: "token expired".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"type":"error","code":"token_expired","message":"token expired"}"#
        );
        let p = ParticipantInfo {
            sid: "1".into(),
            identity: "a".into(),
            name: "A".into(),
            muted: false,
            speaking: true,
            publishing: true,
            tracks: Vec::new(),
        };
        let u = serde_json::to_value(ServerMessage::ParticipantUpdated { participant: p }).unwrap();
        assert_eq!(u["type"], "participant_updated");
        assert_eq!(u["participant"]["speaking"], true);
    }

    #[test]
    fn error_code_strings_match_serde() {
        for c in [
            ErrorCode::BadRequest,
            ErrorCode::MessageTooLarge,
            ErrorCode::InvalidToken,
            ErrorCode::TokenExpired,
            ErrorCode::Forbidden,
            ErrorCode::NotJoined,
            ErrorCode::AlreadyJoined,
            ErrorCode::InvalidSdp,
            ErrorCode::InvalidCandidate,
            ErrorCode::NoMediaNode,
            ErrorCode::RateLimited,
            ErrorCode::UnsupportedProtocol,
            ErrorCode::UnknownTrack,
            ErrorCode::Internal,
            ErrorCode::Unavailable,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
