//! What a client's WebSocket writer is asked to send, and the one place server messages
//! become text: a broadcast is encoded once and its bytes shared by every recipient.

use axum::extract::ws::Utf8Bytes;
use chorus_protocol::client::ServerMessage;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// What the WebSocket writer task of one session is asked to do.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// One JSON text frame. The bytes are shared: cloning is a reference count.
    Text(Utf8Bytes),
    /// Send a close frame with this code and reason, then stop.
    Close(u16, String),
}

pub type SessionTx = mpsc::Sender<Outbound>;

/// Queue length per client socket; a client this far behind is not reading and is cut.
pub const SESSION_QUEUE: usize = 1024;

/// A message as the text frame clients receive.
pub fn encode(msg: &ServerMessage) -> Utf8Bytes {
    // Serializing these types cannot fail (string keys, no maps with other keys).
    Utf8Bytes::from(serde_json::to_string(msg).unwrap_or_default())
}

/// The socket of a seat's client.
#[derive(Debug)]
pub struct Session {
    /// Which WebSocket connection this is (a resumed seat gets a new one).
    pub conn: u64,
    pub tx: SessionTx,
}

impl Session {
    pub fn send(&self, participant: u64, text: Utf8Bytes) {
        match self.tx.try_send(Outbound::Text(text)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => warn!(
                participant,
                "client is not reading its socket (queue full); message dropped"
            ),
            // The socket just went away (a leave or a drop racing this broadcast); the
            // seat is being removed or waits for a resume. Nothing to report.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!(participant, "message to a closed session dropped")
            }
        }
    }

    pub fn close(&self, code: u16, reason: &str) {
        let _ = self.tx.try_send(Outbound::Close(code, reason.to_string()));
    }
}
