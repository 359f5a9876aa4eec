//! One client WebSocket session: parse, validate, rate-limit, and hand messages to the
//! hub. Every malformed input gets a documented `error` and the session goes on; only
//! authentication failures close it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chorus_protocol::client::{ClientMessage, ErrorCode, ServerMessage, MAX_CLIENT_MESSAGE_BYTES};
use chorus_protocol::control::ToNode;
use chorus_protocol::{PROTOCOL_AUDIO_ONLY, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tracing::debug;

use crate::hub::{Hub, SubscriptionUpdate};
use crate::session::{encode, Outbound, SESSION_QUEUE};
use crate::token::TokenVerifier;

/// Frames above this are refused by the WebSocket layer itself (close 1009); frames
/// between [`MAX_CLIENT_MESSAGE_BYTES`] and this get a `message_too_large` error.
pub const HARD_FRAME_LIMIT: usize = 2 * 1024 * 1024;

/// A client must send `join` this soon after connecting.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Token bucket: sustained messages per second and burst.
const RATE_PER_SEC: f64 = 50.0;
const RATE_BURST: f64 = 100.0;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

struct RateLimit {
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * RATE_PER_SEC).min(RATE_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub async fn session(socket: WebSocket, hub: Arc<Hub>, verifier: Arc<TokenVerifier>) {
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Outbound>(SESSION_QUEUE);

    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Outbound::Text(text) => {
                    if sink.send(Message::Text(text)).await.is_err() {
                        break;
                    }
                }
                Outbound::Close(code, reason) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: Utf8Bytes::from(reason),
                        })))
                        .await;
                    break;
                }
            }
        }
    });

    let send = |m: ServerMessage| {
        let _ = tx.try_send(Outbound::Text(encode(&m)));
    };
    let error = |code: ErrorCode, message: &str| {
        let _ = tx.try_send(Outbound::Text(encode(&ServerMessage::Error {
            code,
            message: message.to_string(),
        })));
    };

    let mut joined: Option<u64> = None;
    let mut left = false;
    let mut rate = RateLimit {
        tokens: RATE_BURST,
        last: Instant::now(),
    };
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;

    loop {
        let next = if joined.is_none() {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(n) => n,
                Err(_) => {
                    error(ErrorCode::NotJoined, "no join message within 10 seconds");
                    let _ = tx.try_send(Outbound::Close(4008, "join timeout".into()));
                    break;
                }
            }
        } else {
            stream.next().await
        };
        let frame = match next {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                debug!(conn, "websocket error: {e}");
                let msg = e.to_string();
                if msg.contains("too long") || msg.contains("Space limit") || msg.contains("size") {
                    let _ = tx.try_send(Outbound::Close(1009, "message too large".into()));
                }
                break;
            }
            None => break,
        };
        let text = match frame {
            Message::Text(t) => t,
            Message::Binary(_) => {
                error(
                    ErrorCode::BadRequest,
                    "binary frames are not part of the protocol; send JSON text",
                );
                continue;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if !rate.allow(Instant::now()) {
            error(
                ErrorCode::RateLimited,
                "too many messages; slow down (limit 50 per second)",
            );
            continue;
        }
        if text.len() > MAX_CLIENT_MESSAGE_BYTES {
            error(
                ErrorCode::MessageTooLarge,
                &format!(
                    "message of {} bytes exceeds the {} byte limit",
                    text.len(),
                    MAX_CLIENT_MESSAGE_BYTES
                ),
            );
            continue;
        }
        let msg: ClientMessage = match serde_json::from_str(text.as_str()) {
            Ok(m) => m,
            Err(e) => {
                error(
                    ErrorCode::BadRequest,
                    &format!("not a valid protocol message: {e}"),
                );
                continue;
            }
        };

        match (msg, joined) {
            (ClientMessage::Ping { ts }, _) => send(ServerMessage::Pong { ts }),
            (ClientMessage::Join { .. }, Some(_)) => {
                error(ErrorCode::AlreadyJoined, "this socket has already joined")
            }
            (
                ClientMessage::Join {
                    token,
                    room,
                    resume,
                    protocol,
                },
                None,
            ) => {
                // No `protocol` is a client from before versions were sent: audio only.
                let version = protocol.unwrap_or(PROTOCOL_AUDIO_ONLY);
                if !(PROTOCOL_AUDIO_ONLY..=PROTOCOL_VERSION).contains(&version) {
                    error(
                        ErrorCode::UnsupportedProtocol,
                        &format!(
                            "protocol version {version} is not supported; this server speaks \
                             {PROTOCOL_AUDIO_ONLY} (audio only) and {PROTOCOL_VERSION} (video)"
                        ),
                    );
                    let _ = tx.try_send(Outbound::Close(4002, "unsupported protocol".into()));
                    break;
                }
                let claims = match verifier.verify(&token) {
                    Ok(c) => c,
                    Err(e) => {
                        error(e.code, &e.message);
                        let _ = tx.try_send(Outbound::Close(4001, e.code.as_str().into()));
                        break;
                    }
                };
                if let Some(r) = room {
                    if r != claims.room {
                        error(
                            ErrorCode::Forbidden,
                            &format!("this token is for room {:?}, not {:?}", claims.room, r),
                        );
                        let _ = tx.try_send(Outbound::Close(4003, "forbidden".into()));
                        break;
                    }
                }
                if claims.room == "*" {
                    error(
                        ErrorCode::Forbidden,
                        "a token for every room (\"*\") is for the admin API, not for joining",
                    );
                    let _ = tx.try_send(Outbound::Close(4003, "forbidden".into()));
                    break;
                }
                if !claims.grants.join {
                    error(ErrorCode::Forbidden, "this token does not grant joining");
                    let _ = tx.try_send(Outbound::Close(4003, "forbidden".into()));
                    break;
                }
                match hub.join(&claims, resume, version, conn, tx.clone()).await {
                    // The hub queued `joined` on this session.
                    Ok(j) => joined = Some(j.participant),
                    Err((code, message)) => {
                        error(code, &message);
                        let _ = tx.try_send(Outbound::Close(4004, code.as_str().into()));
                        break;
                    }
                }
            }
            (_, None) => error(ErrorCode::NotJoined, "send join first"),
            // The hub resolves `tracks` against the SDP and the grants before relaying.
            (ClientMessage::Offer { sdp, tracks }, Some(p)) => relay(
                &hub,
                p,
                conn,
                ToNode::ClientOffer {
                    participant: p,
                    sdp,
                    tracks,
                },
                &error,
            ),
            (ClientMessage::Answer { sdp }, Some(p)) => relay(
                &hub,
                p,
                conn,
                ToNode::ClientAnswer {
                    participant: p,
                    sdp,
                },
                &error,
            ),
            (ClientMessage::Candidate { candidate }, Some(p)) => {
                let c = candidate.candidate.trim();
                if c.is_empty() {
                    continue; // end-of-candidates
                }
                let c = c.strip_prefix("a=").unwrap_or(c);
                if !c.starts_with("candidate:") {
                    error(
                        ErrorCode::InvalidCandidate,
                        "an ICE candidate starts with \"candidate:\"",
                    );
                    continue;
                }
                relay(
                    &hub,
                    p,
                    conn,
                    ToNode::ClientCandidate {
                        participant: p,
                        candidate: c.to_string(),
                    },
                    &error,
                )
            }
            (ClientMessage::Enhance { enabled }, Some(p)) => {
                if let Err((code, m)) = hub.set_enhanced(p, conn, enabled).await {
                    error(code, &m);
                }
            }
            (
                ClientMessage::UpdateSubscription {
                    track_sid,
                    max_quality,
                    visible,
                    width,
                    height,
                },
                Some(p),
            ) => {
                let view = SubscriptionUpdate {
                    max_quality,
                    visible,
                    width,
                    height,
                };
                if let Err((code, m)) = hub.update_subscription(p, conn, track_sid, view).await {
                    error(code, &m);
                }
            }
            (ClientMessage::Mute { muted }, Some(p)) => {
                if let Err((code, m)) = hub.set_muted(p, conn, muted).await {
                    error(code, &m);
                }
            }
            (ClientMessage::Leave, Some(p)) => {
                hub.leave(p, conn).await;
                left = true;
                let _ = tx.try_send(Outbound::Close(1000, "left".into()));
                break;
            }
        }
    }

    if let (Some(p), false) = (joined, left) {
        hub.disconnected(p, conn);
    }
    drop(tx);
    // Let the writer flush the last error/close frame, but never hang on a dead peer.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

fn relay(hub: &Hub, p: u64, conn: u64, msg: ToNode, error: &impl Fn(ErrorCode, &str)) {
    if let Err((code, m)) = hub.to_node(p, conn, msg) {
        error(code, &m);
    }
}
