//! Channel text chat: the rules (grants, size, rate) a frame from a participant's chat
//! channel must pass before anything is stored.
//!
//! Clients send chat frames on a data channel to the SFU, which passes them here
//! unparsed; signaling validates them, the shared state ([`crate::state`]) assigns ids,
//! keeps the history and fans the message out to every instance, and each instance tells
//! its nodes whom to deliver it to.

use std::time::{Duration, Instant};

use chorus_protocol::chat::{
    ChatClientFrame, ChatErrorCode, ChatServerFrame, MAX_CHAT_CHARS, MAX_REF_CHARS,
};

/// Chat settings.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Messages a joiner receives as history.
    pub history: usize,
    /// How long an empty room's history is kept after its last message.
    pub retention: Duration,
    /// Sustained messages per second per participant, and burst.
    pub rate_per_sec: f64,
    pub burst: f64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            history: 200,
            retention: Duration::from_secs(24 * 3600),
            rate_per_sec: 5.0,
            burst: 10.0,
        }
    }
}

/// Per-participant token bucket for chat sends.
#[derive(Debug, Clone, Copy)]
pub struct ChatBucket {
    tokens: f64,
    last: Option<Instant>,
}

impl ChatBucket {
    pub fn new() -> Self {
        ChatBucket {
            tokens: f64::NAN,
            last: None,
        }
    }

    /// Takes one token; false when the sender is over the rate.
    pub fn take(&mut self, cfg: &ChatConfig, now: Instant) -> bool {
        let tokens = match self.last {
            None => cfg.burst,
            Some(last) => (self.tokens
                + now.saturating_duration_since(last).as_secs_f64() * cfg.rate_per_sec)
                .min(cfg.burst),
        };
        self.last = Some(now);
        if tokens >= 1.0 {
            self.tokens = tokens - 1.0;
            true
        } else {
            self.tokens = tokens;
            false
        }
    }
}

impl Default for ChatBucket {
    fn default() -> Self {
        Self::new()
    }
}
/// A chat frame that passed the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatRequest {
    Send {
        text: String,
        reference: Option<String>,
    },
    /// Whether the sender may delete it depends on who wrote it: the caller asks the
    /// history.
    Delete { id: u64 },
}

/// An error frame for the sender only.
pub fn error_frame(
    code: ChatErrorCode,
    message: &str,
    reference: Option<String>,
) -> ChatServerFrame {
    ChatServerFrame::Error {
        code,
        message: message.to_string(),
        reference,
    }
}

/// Parses one frame from a participant's chat channel and applies every rule that
/// needs no store: the frame's shape, `ref` length, the `publish_data` grant, size and
/// rate. A refusal is the error frame to send back.
pub fn check(
    data: &str,
    may_send: bool,
    bucket: &mut ChatBucket,
    config: &ChatConfig,
    now: Instant,
) -> Result<ChatRequest, ChatServerFrame> {
    let frame: ChatClientFrame = serde_json::from_str(data).map_err(|e| {
        error_frame(
            ChatErrorCode::ChatInvalid,
            &format!("not a chat frame: {e}"),
            None,
        )
    })?;
    let (text, reference) = match frame {
        ChatClientFrame::Delete { id } => return Ok(ChatRequest::Delete { id }),
        ChatClientFrame::Send { text, reference } => (text, reference),
    };
    if reference
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REF_CHARS)
    {
        return Err(error_frame(
            ChatErrorCode::ChatInvalid,
            "ref is longer than 64 characters",
            None,
        ));
    }
    let chars = text.chars().count();
    if !may_send {
        return Err(error_frame(
            ChatErrorCode::ChatForbidden,
            "your access token does not allow sending chat messages",
            reference,
        ));
    }
    if chars == 0 || text.trim().is_empty() {
        return Err(error_frame(
            ChatErrorCode::ChatTooLong,
            "message is empty",
            reference,
        ));
    }
    if chars > MAX_CHAT_CHARS {
        return Err(error_frame(
            ChatErrorCode::ChatTooLong,
            &format!("message has {chars} characters; the limit is {MAX_CHAT_CHARS}"),
            reference,
        ));
    }
    if !bucket.take(config, now) {
        return Err(error_frame(
            ChatErrorCode::ChatRateLimited,
            "you are sending messages too fast (limit 5 per second)",
            reference,
        ));
    }
    Ok(ChatRequest::Send { text, reference })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let cfg = ChatConfig::default();
        let t = Instant::now();
        let mut b = ChatBucket::new();
        let allowed = (0..30).filter(|_| b.take(&cfg, t)).count();
        assert_eq!(allowed, 10);
        assert!(
            b.take(&cfg, t + Duration::from_millis(200)),
            "one token back after 200 ms"
        );
        assert!(!b.take(&cfg, t + Duration::from_millis(200)));
    }

    #[test]
    fn frames_are_checked_before_anything_is_stored() {
        let cfg = ChatConfig::default();
        let now = Instant::now();
        let mut b = ChatBucket::new();
        let code = |r: Result<ChatRequest, ChatServerFrame>| match r {
            Err(ChatServerFrame::Error { code, .. }) => Some(code),
            _ => None,
        };
        assert_eq!(
            code(check("nope", true, &mut b, &cfg, now)),
            Some(ChatErrorCode::ChatInvalid)
        );
        assert_eq!(
            code(check(
                r#"{"type":"send","text":"hi"}"#,
                false,
                &mut b,
                &cfg,
                now
            )),
            Some(ChatErrorCode::ChatForbidden)
        );
        let long = format!(r#"{{"type":"send","text":"{}"}}"#, "é".repeat(4001));
        assert_eq!(
            code(check(&long, true, &mut b, &cfg, now)),
            Some(ChatErrorCode::ChatTooLong)
        );
        assert_eq!(
            check(r#"{"type":"delete","id":7}"#, false, &mut b, &cfg, now),
            Ok(ChatRequest::Delete { id: 7 })
        );
    }
}
