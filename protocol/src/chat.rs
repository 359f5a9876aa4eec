//! Chat and signal data-channel frames (JSON text). See `docs/protocol.md`, "Text chat".

use serde::{Deserialize, Serialize};

/// Longest chat text, in Unicode scalar values.
pub const MAX_CHAT_CHARS: usize = 4000;

/// Longest client-chosen `ref`.
pub const MAX_REF_CHARS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub identity: String,
    pub name: String,
}

/// One chat message as stored and as delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub id: u64,
    pub from: Sender,
    pub text: String,
    /// Server time, milliseconds since the Unix epoch.
    pub ts: u64,
}

/// Frames a client sends on `chat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatClientFrame {
    Send {
        text: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Delete {
        id: u64,
    },
}

/// Frames the server sends on `chat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatServerFrame {
    History {
        messages: Vec<ChatMessage>,
    },
    Message {
        #[serde(flatten)]
        message: ChatMessage,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Deleted {
        id: u64,
    },
    Error {
        code: ChatErrorCode,
        message: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatErrorCode {
    ChatTooLong,
    ChatInvalid,
    ChatForbidden,
    ChatRateLimited,
    ChatNotFound,
}

/// Frames on the lossy `signal` channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SignalFrame {
    Typing {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<Sender>,
        typing: bool,
    },
}

impl ChatServerFrame {
    pub fn to_json(&self) -> String {
        // Our own types always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_frame_is_flat_with_ref() {
        let f = ChatServerFrame::Message {
            message: ChatMessage {
                id: 7,
                from: Sender {
                    identity: "ana".into(),
                    name: "Ana".into(),
                },
                text: "hi".into(),
                ts: 1,
            },
            reference: Some("r1".into()),
        };
        let v: serde_json::Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["id"], 7);
        assert_eq!(v["from"]["identity"], "ana");
        assert_eq!(v["ref"], "r1");
        assert_eq!(serde_json::from_value::<ChatServerFrame>(v).unwrap(), f);
    }

    #[test]
    fn client_frames_parse() {
        let s: ChatClientFrame =
            serde_json::from_str(r#"{"type":"send","text":"x","ref":"a"}"#).unwrap();
        assert_eq!(
            s,
            ChatClientFrame::Send {
                text: "x".into(),
                reference: Some("a".into())
            }
        );
        let d: ChatClientFrame = serde_json::from_str(r#"{"type":"delete","id":3}"#).unwrap();
        assert_eq!(d, ChatClientFrame::Delete { id: 3 });
        assert!(serde_json::from_str::<ChatClientFrame>(r#"{"type":"send"}"#).is_err());
        let t: SignalFrame = serde_json::from_str(r#"{"type":"typing","typing":true}"#).unwrap();
        assert_eq!(
            t,
            SignalFrame::Typing {
                from: None,
                typing: true
            }
        );
    }

    #[test]
    fn error_codes_are_snake_case() {
        let e = ChatServerFrame::Error {
            code: ChatErrorCode::ChatRateLimited,
            message: "slow".into(),
            reference: None,
        };
        assert!(e.to_json().contains(r#""code":"chat_rate_limited""#));
    }
}
