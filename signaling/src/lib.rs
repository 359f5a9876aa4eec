//! Chorus signaling: the HTTP + WebSocket front door of a voice system.
//!
//! It verifies access tokens, owns rooms and presence, places each room on one SFU node
//! (nodes dial in over an authenticated QUIC control connection), relays SDP and ICE
//! between clients and nodes, hands out ICE servers, and serves the web client. The
//! client protocol is `docs/protocol.md`; the node protocol is `docs/control-protocol.md`.
//!
//! Alone it keeps its state in memory; with `--redis` any number of instances share it
//! ([`state`], `docs/fleet.md`), and a client may connect to any of them.

pub mod chat;
pub mod control;
pub mod http;
pub mod hub;
pub mod nodes;
pub mod session;
pub mod state;
#[doc(hidden)]
pub mod testing;
pub mod token;
pub mod tracks;
pub mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chorus_protocol::client::IceServer;
use tracing::info;

pub use hub::{Hub, HubConfig, TurnRest};
use state::history::{MemoryStore, SqliteStore};
use state::memory::MemoryState;
use state::redis::{RedisConfig, RedisState};
use state::SharedState;

/// Everything signaling needs to run. The `chorus` binary builds this from flags.
#[derive(Debug, Clone)]
pub struct SignalingConfig {
    /// HTTP/WebSocket listen address.
    pub listen: SocketAddr,
    /// QUIC control-plane listen address for SFU nodes.
    pub control_listen: SocketAddr,
    /// API key → secret pairs that may sign access tokens.
    pub api_keys: HashMap<String, String>,
    /// Shared secret every SFU node proves it holds.
    pub node_secret: String,
    /// PEM certificate and key for the control listener; a self-signed pair is made
    /// when absent.
    pub control_cert: Option<(PathBuf, PathBuf)>,
    /// Serve HTTPS with this PEM certificate and key.
    pub https: Option<(Vec<u8>, Vec<u8>)>,
    /// `Some((key, secret))` enables `POST /dev/token`; never set outside dev mode.
    pub dev_key: Option<(String, String)>,
    pub reconnect_grace: Duration,
    pub ice_servers: Vec<IceServer>,
    pub turn: Option<TurnRest>,
    /// Where chat history and room settings are kept: a SQLite file, or memory when
    /// `None` (room settings then last as long as the process). Not used with `redis`.
    pub chat_db: Option<PathBuf>,
    /// `redis://HOST:PORT`: share rooms, presence, placement, settings and chat with
    /// every instance using the same Redis. `None`: this process alone.
    pub redis: Option<String>,
    pub chat: chat::ChatConfig,
    /// Whether clients may ask for server-side noise suppression.
    pub allow_enhanced_audio: bool,
}

/// A running signaling service.
pub struct Signaling {
    pub http_addr: SocketAddr,
    pub control_addr: SocketAddr,
    /// PEM of the control-plane certificate nodes must trust.
    pub control_cert_pem: String,
    pub hub: Arc<Hub>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Signaling {
    /// Binds every listener and starts serving in background tasks.
    pub async fn start(config: SignalingConfig) -> anyhow::Result<Signaling> {
        if config.api_keys.is_empty() {
            anyhow::bail!("no API keys configured: tokens could never be verified");
        }
        if config.node_secret.len() < 8 {
            anyhow::bail!("the node secret must be at least 8 characters");
        }
        let hub_config = HubConfig {
            reconnect_grace: config.reconnect_grace,
            ice_servers: config.ice_servers.clone(),
            turn: config.turn.clone(),
            chat: config.chat.clone(),
            allow_enhanced_audio: config.allow_enhanced_audio,
        };
        let state: Arc<dyn SharedState> = match (&config.redis, &config.chat_db) {
            (Some(url), db) => {
                if db.is_some() {
                    info!("chat history and room settings live in Redis; the data dir is not used");
                }
                Arc::new(
                    RedisState::connect(RedisConfig {
                        url: url.clone(),
                        prefix: "chorus".into(),
                        chat_history: config.chat.history.max(1000),
                        chat_retention: config.chat.retention,
                    })
                    .await?,
                )
            }
            // With a data dir, one SQLite file keeps chat history and room settings.
            (None, Some(path)) => {
                let sqlite = Arc::new(SqliteStore::open(path)?);
                Arc::new(
                    MemoryState::with_settings_store(sqlite.clone(), sqlite).with_context(
                        || format!("loading room settings from {}", path.display()),
                    )?,
                )
            }
            (None, None) => Arc::new(MemoryState::new(Arc::new(MemoryStore::new(
                config.chat.history.max(1000),
            )))),
        };
        let hub = Hub::start(hub_config, state).await?;

        let identity = match &config.control_cert {
            Some((c, k)) => control::ControlIdentity::from_pem_files(c, k)?,
            None => control::ControlIdentity::self_signed()?,
        };
        let endpoint = control::endpoint(config.control_listen, &identity)?;
        let control_addr = endpoint.local_addr()?;
        let control_cert_pem = identity.cert_pem();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(control::serve(
            endpoint,
            hub.clone(),
            Arc::new(config.node_secret.clone()),
        )));

        let state = http::AppState {
            hub: hub.clone(),
            verifier: Arc::new(token::TokenVerifier::new(config.api_keys.clone())),
            dev_key: config.dev_key.clone().map(Arc::new),
        };
        let app = http::router(state);
        let http_addr = match &config.https {
            None => {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("binding HTTP listener on {}", config.listen))?;
                let addr = listener.local_addr()?;
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!("HTTP server stopped: {e}");
                    }
                }));
                addr
            }
            Some((cert, key)) => {
                let tls =
                    axum_server::tls_rustls::RustlsConfig::from_pem(cert.clone(), key.clone())
                        .await
                        .context("loading HTTPS certificate")?;
                let handle = axum_server::Handle::new();
                let server = axum_server::bind_rustls(config.listen, tls).handle(handle.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = server.serve(app.into_make_service()).await {
                        tracing::error!("HTTPS server stopped: {e}");
                    }
                }));
                handle
                    .listening()
                    .await
                    .with_context(|| format!("binding HTTPS listener on {}", config.listen))?
            }
        };
        // Forget the chat of rooms that have been empty and quiet for the retention time.
        let purge_hub = hub.clone();
        let retention = config.chat.retention;
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                let cutoff = std::time::SystemTime::now()
                    .checked_sub(retention)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                match purge_hub.purge_idle_chat(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => info!(messages = n, "purged chat history of idle rooms"),
                    Err(e) => tracing::warn!("chat purge failed: {e:#}"),
                }
            }
        }));
        info!(%http_addr, %control_addr, "signaling listening");
        Ok(Signaling {
            http_addr,
            control_addr,
            control_cert_pem,
            hub,
            tasks,
        })
    }

    /// Stops every listener.
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Signaling {
    fn drop(&mut self) {
        self.shutdown();
    }
}
