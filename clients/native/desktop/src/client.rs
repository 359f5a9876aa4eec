//! The session on a background thread: a single-threaded tokio runtime runs the dev
//! login (if any) and `chorus_native::session::run`; the UI thread sends commands and
//! polls updates without ever blocking on the network.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chorus_native::audio::Gate;
use chorus_native::session::{self, AudioSink, AudioSource, Command, Config, Event};
use eframe::egui;
use tokio::sync::mpsc;

/// How to get a seat.
#[derive(Debug, Clone, PartialEq)]
pub enum Login {
    /// Ask a dev-mode server (`chorus dev`) for a token.
    Dev { name: String, room: String },
    /// A token minted by the operator (`chorus token`, admin API).
    Token(String),
}

#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub url: String,
    pub login: Login,
    pub denoise: bool,
    pub gate: Gate,
    pub muted: bool,
}

/// What the session thread reports to the UI.
#[derive(Debug)]
pub enum Update {
    Event(Event),
    /// The join (or the whole session) failed; the text is for the user.
    Failed(String),
    /// The session is over (after `Event::Ended`).
    Finished,
}

/// The UI's handle on a running session. Dropping it leaves the room.
pub struct SessionHandle {
    commands: mpsc::UnboundedSender<Command>,
    updates: mpsc::UnboundedReceiver<Update>,
    thread: Option<JoinHandle<()>>,
}

impl SessionHandle {
    pub fn start(
        request: JoinRequest,
        source: Box<dyn AudioSource>,
        sink: Box<dyn AudioSink>,
        ctx: egui::Context,
    ) -> std::io::Result<SessionHandle> {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (update_tx, updates) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("chorus-session".into())
            .spawn(move || {
                let tell = |u: Update| {
                    let _ = update_tx.send(u);
                    ctx.request_repaint();
                };
                // One thread is plenty for one participant's sockets and 20 ms clock.
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tell(Update::Failed(format!(
                            "could not start the network runtime: {e}"
                        )));
                        return;
                    }
                };
                rt.block_on(async {
                    match session_main(request, source, sink, command_rx, &tell).await {
                        Ok(()) => tell(Update::Finished),
                        Err(message) => tell(Update::Failed(message)),
                    }
                });
            })?;
        Ok(SessionHandle {
            commands,
            updates,
            thread: Some(thread),
        })
    }

    /// A handle with no session behind it, for testing the UI state.
    #[cfg(test)]
    pub fn detached() -> SessionHandle {
        let (commands, _) = mpsc::unbounded_channel();
        let (_, updates) = mpsc::unbounded_channel();
        SessionHandle {
            commands,
            updates,
            thread: None,
        }
    }

    pub fn send(&self, command: Command) {
        // The session may have ended already; then there is nobody to tell.
        let _ = self.commands.send(command);
    }

    pub fn try_recv(&mut self) -> Option<Update> {
        self.updates.try_recv().ok()
    }

    /// True once the session thread has exited.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.send(Command::Leave);
        // Give the leave a moment to reach the server, but never hang the UI on a dead
        // network: the session itself gives up on the socket after two seconds.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

async fn session_main(
    request: JoinRequest,
    source: Box<dyn AudioSource>,
    sink: Box<dyn AudioSink>,
    commands: mpsc::UnboundedReceiver<Command>,
    tell: &impl Fn(Update),
) -> Result<(), String> {
    let token = match &request.login {
        Login::Token(t) => t.clone(),
        Login::Dev { name, room } => chorus_native::signaling::dev_token(&request.url, name, room)
            .await
            .map_err(|e| explain(&request.url, "Dev login failed", &e))?,
    };
    let mut config = Config::new(request.url.clone(), token);
    config.denoise = request.denoise;
    config.gate = request.gate;
    config.muted = request.muted;

    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<Event>();
    let run = session::run(config, source, sink, commands, events_tx);
    tokio::pin!(run);
    // Forward events as they come; the session ends when `run` returns.
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            Some(ev) = events_rx.recv() => tell(Update::Event(ev)),
        }
    };
    while let Ok(ev) = events_rx.try_recv() {
        tell(Update::Event(ev));
    }
    result
        .map(|_report| ())
        .map_err(|e| explain(&request.url, "Could not join", &e))
}

/// Turns a join error into a sentence a user can act on, keeping the detail.
pub fn explain(url: &str, what: &str, e: &anyhow::Error) -> String {
    let detail = format!("{e:#}");
    let lower = detail.to_lowercase();
    let headline = if lower.contains("connection refused") {
        format!("Cannot reach the server at {url} (connection refused). Is it running, and is the address right?")
    } else if lower.contains("timed out") {
        format!("The server at {url} did not answer in time.")
    } else if lower.contains("failed to lookup")
        || lower.contains("resolving")
        || lower.contains("name or service not known")
    {
        format!("Cannot find the server {url}: the host name does not resolve.")
    } else if lower.contains("invalid_token") {
        "The server rejected the access token. Check that it was minted for this server.".into()
    } else if lower.contains("token_expired") {
        "The access token has expired (or is not valid yet). Get a new one.".into()
    } else if lower.contains("forbidden") {
        "This token does not allow joining that room.".into()
    } else if lower.contains("no_media_node") {
        "The server has no media node connected, so the room cannot be opened. Try again in a moment, or tell the operator.".into()
    } else if lower.contains("not a dev-mode server") || lower.contains("needs a plain http") {
        "This server does not offer dev login. Use an access token instead.".into()
    } else if lower.contains("bad server url") || lower.contains("has no host") {
        format!("{url:?} is not a server address. Use e.g. http://127.0.0.1:7880.")
    } else {
        format!("{what}.")
    };
    format!("{headline}\n{what}: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_become_sentences() {
        let e = anyhow::anyhow!("Connection refused (os error 111)")
            .context("connecting to ws://127.0.0.1:9/ws");
        let m = explain("http://127.0.0.1:9", "Could not join", &e);
        assert!(
            m.starts_with("Cannot reach the server at http://127.0.0.1:9"),
            "{m}"
        );
        assert!(m.contains("os error 111"), "{m}");
        let e = anyhow::anyhow!("join refused: invalid_token (bad signature)");
        assert!(explain("u", "Could not join", &e).contains("rejected the access token"));
        let e = anyhow::anyhow!("join refused: no_media_node (none)");
        assert!(explain("u", "Could not join", &e).contains("no media node"));
        let e = anyhow::anyhow!("something else");
        assert_eq!(
            explain("u", "Could not join", &e),
            "Could not join.\nCould not join: something else"
        );
    }

    #[tokio::test]
    async fn a_dead_server_fails_the_join_with_a_clear_message() {
        // A loopback port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(9);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_cmd, commands) = mpsc::unbounded_channel();
        let request = JoinRequest {
            url: format!("http://127.0.0.1:{port}"),
            login: Login::Dev {
                name: "t".into(),
                room: "r".into(),
            },
            denoise: false,
            gate: Gate::Open,
            muted: false,
        };
        let tell = |u: Update| {
            let _ = tx.send(u);
        };
        let r = session_main(
            request,
            Box::new(session::Silence),
            Box::new(session::Silence),
            commands,
            &tell,
        )
        .await;
        let m = r.err().unwrap_or_default();
        assert!(m.starts_with("Cannot reach the server"), "{m}");
        assert!(rx.try_recv().is_err());
    }
}
