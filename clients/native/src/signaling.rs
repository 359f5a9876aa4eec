//! The signaling client: protocol v1 over one WebSocket (`docs/protocol.md`).

use std::time::Duration;

use anyhow::{bail, Context};
use chorus_protocol::client::{ClientMessage, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// What `recv` can yield besides a protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Message(ServerMessage),
    /// The server closed the socket with this code and reason.
    Closed(Option<(u16, String)>),
}

/// A WebSocket connection to signaling speaking protocol v1.
pub struct SignalingClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl SignalingClient {
    /// Connects to `ws://host:port/ws` (or `wss://`).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(SignalingClient { ws })
    }

    /// Connects and joins with `token`; returns the client and the `joined` message, or
    /// the server's error as an `Err`.
    pub async fn join(url: &str, token: &str) -> anyhow::Result<(Self, ServerMessage)> {
        Self::join_with(url, token, false).await
    }

    /// [`SignalingClient::join`], asking to take back a seat kept during the reconnect
    /// grace period when `resume` is true.
    pub async fn join_with(
        url: &str,
        token: &str,
        resume: bool,
    ) -> anyhow::Result<(Self, ServerMessage)> {
        let mut c = Self::connect(url).await?;
        c.send(&ClientMessage::Join {
            token: token.to_string(),
            room: None,
            resume,
            // Audio only: the server then never offers this client video, which it
            // could not play (docs/protocol.md, protocol 1).
            protocol: Some(chorus_protocol::PROTOCOL_AUDIO_ONLY),
        })
        .await?;
        match c.recv_timeout(Duration::from_secs(10)).await? {
            Incoming::Message(m @ ServerMessage::Joined { .. }) => Ok((c, m)),
            Incoming::Message(ServerMessage::Error { code, message }) => {
                bail!("join refused: {} ({message})", code.as_str())
            }
            other => bail!("unexpected reply to join: {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: &ClientMessage) -> anyhow::Result<()> {
        let text = serde_json::to_string(msg)?;
        self.send_text(text).await
    }

    /// Sends an arbitrary text frame (tests use this for malformed input).
    pub async fn send_text(&mut self, text: String) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// Sends an arbitrary binary frame.
    pub async fn send_binary(&mut self, data: Vec<u8>) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(data.into())).await?;
        Ok(())
    }

    /// The next protocol message or the close; WebSocket pings are handled underneath.
    pub async fn recv(&mut self) -> anyhow::Result<Incoming> {
        loop {
            match self.ws.next().await {
                None => return Ok(Incoming::Closed(None)),
                Some(Err(e)) => bail!("websocket error: {e}"),
                Some(Ok(Message::Text(t))) => {
                    let m: ServerMessage = serde_json::from_str(t.as_str()).with_context(|| {
                        format!("server sent a message this client does not understand: {t}")
                    })?;
                    return Ok(Incoming::Message(m));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Incoming::Closed(frame.map(
                        |CloseFrame { code, reason }| (code.into(), reason.to_string()),
                    )))
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn recv_timeout(&mut self, t: Duration) -> anyhow::Result<Incoming> {
        tokio::time::timeout(t, self.recv())
            .await
            .context("timed out waiting for the server")?
    }

    /// Waits for the first message matching `pred`, skipping others.
    pub async fn wait_for(
        &mut self,
        t: Duration,
        mut pred: impl FnMut(&ServerMessage) -> bool,
    ) -> anyhow::Result<ServerMessage> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_timeout(left).await? {
                Incoming::Message(m) if pred(&m) => return Ok(m),
                Incoming::Message(_) => continue,
                Incoming::Closed(c) => bail!("socket closed while waiting: {c:?}"),
            }
        }
    }

    /// Drops the TCP connection without a close handshake (a network failure).
    pub fn abort(self) {
        drop(self.ws);
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Asks a dev-mode server (`chorus dev`) for a participant token: `POST /dev/token`.
/// Plain HTTP only (dev mode on loopback or a LAN); `url` is the signaling URL in any
/// of the forms [`crate::session::normalize_url`] accepts.
pub async fn dev_token(url: &str, name: &str, room: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ws = crate::session::normalize_url(url);
    let Some(rest) = ws.strip_prefix("ws://") else {
        bail!("dev login needs a plain http:// dev server; pass --token for {url}");
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let body = serde_json::json!({ "name": name, "room": room }).to_string();
    let request = format!(
        "POST /dev/token HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(authority))
        .await
        .context("timed out connecting for a dev token")?
        .with_context(|| format!("connecting to {authority} for a dev token"))?;
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        (&mut stream).take(1 << 20).read_to_end(&mut response),
    )
    .await
    .context("timed out waiting for a dev token")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {authority}"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status == "404" {
        bail!("{authority} is not a dev-mode server (no /dev/token); pass --token");
    }
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .with_context(|| format!("unexpected dev token response ({status}): {body}"))?;
    if status != "200" {
        bail!(
            "dev token refused ({status}): {}",
            v["message"].as_str().unwrap_or(body)
        );
    }
    v["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("dev token response has no token: {body}"))
}
