//! `chorus`: the one binary that composes the Chorus crates. Each subcommand is a thin
//! shell over a library crate; `dev` runs signaling and an SFU node in one process, still
//! talking over the real QUIC control plane, so the fleet case is not a different path.

mod config;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chorus_protocol::client::{Grants, IceServer};
use chorus_protocol::track::{SourceSet, TrackSource};
use chorus_sfu::{Node, NodeConfig};
use chorus_signaling::{token, Signaling, SignalingConfig, TurnRest};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chorus",
    version,
    about = "Self-hosted low-latency voice channels: signaling, SFU and tools in one binary"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "CHORUS_LOG_JSON")]
    log_json: bool,
    /// Read settings from this TOML file. Keys are the subcommand's long flag names
    /// without the leading "--" (listen = "0.0.0.0:3478", allow-loopback-peers = true,
    /// user = ["ana:pw", "bo:pw"]); a [turn], [sfu], ... table holds keys for that
    /// subcommand only. Flags and environment variables override the file.
    #[arg(long, global = true, env = "CHORUS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run signaling + one SFU node on this machine, ready to open in a browser.
    Dev(DevArgs),
    /// Run the signaling service (HTTP/WebSocket front door and control plane).
    Signaling(SignalingArgs),
    /// Run an SFU media node that registers with signaling.
    Sfu(SfuArgs),
    /// Run the TURN relay (UDP/TCP/TLS) with TURN REST API credentials.
    Turn(chorus_turn::TurnArgs),
    /// Mint an access token for a participant.
    Token(TokenArgs),
}

#[derive(Args)]
struct DevArgs {
    /// HTTP address of the web client and API.
    #[arg(long, default_value = "127.0.0.1:7880", env = "CHORUS_DEV_LISTEN")]
    listen: SocketAddr,
    /// UDP address the SFU's media worker binds (port 0 picks a free one).
    #[arg(
        long,
        default_value = "127.0.0.1:7882",
        env = "CHORUS_DEV_MEDIA_LISTEN"
    )]
    media_listen: SocketAddr,
    /// QUIC address of the internal control plane between signaling and the SFU.
    #[arg(
        long,
        default_value = "127.0.0.1:7881",
        env = "CHORUS_DEV_CONTROL_LISTEN"
    )]
    control_listen: SocketAddr,
    /// API key the dev token endpoint signs with.
    #[arg(long, default_value = "devkey", env = "CHORUS_API_KEY")]
    api_key: String,
    /// API secret the dev token endpoint signs with.
    #[arg(long, default_value = "devsecret", env = "CHORUS_API_SECRET")]
    api_secret: String,
    /// Serve on all interfaces over HTTPS with a self-signed certificate, so phones and
    /// other machines on the LAN can join (browsers only allow the microphone on https
    /// or localhost).
    #[arg(long)]
    lan: bool,
    /// Serve HTTPS with a self-signed certificate on --listen (implied by --lan).
    #[arg(long)]
    https: bool,
    /// Seconds a dropped client keeps its seat.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    reconnect_grace: Duration,
    /// UDP+TCP address of the bundled TURN relay (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:3478", env = "CHORUS_DEV_TURN_LISTEN")]
    turn_listen: SocketAddr,
    /// Do not start the TURN relay (clients then need a direct UDP path to the SFU).
    #[arg(long)]
    no_turn: bool,
    /// Serve the SFU's Prometheus metrics (packets, forwarding time, rooms) at
    /// http://ADDR/metrics. Signaling's own metrics stay on --listen.
    #[arg(long, env = "CHORUS_DEV_SFU_METRICS")]
    sfu_metrics: Option<SocketAddr>,
    /// SFU worker threads, each with its own UDP port (consecutive from
    /// --media-listen's port); rooms are spread across them.
    #[arg(long, default_value_t = 1, env = "CHORUS_DEV_WORKERS")]
    workers: usize,
    #[command(flatten)]
    chat: ChatArgs,
    #[command(flatten)]
    selection: SelectionArgs,
}

/// Chat history and other room settings, shared by `dev` and `signaling`.
#[derive(Args)]
struct ChatArgs {
    /// Refuse clients' requests for server-side noise suppression (it costs SFU CPU per
    /// publisher).
    #[arg(long, env = "CHORUS_NO_ENHANCED_AUDIO")]
    no_enhanced_audio: bool,
    /// Directory for persistent state (the chat history database).
    #[arg(long, default_value = "chorus-data", env = "CHORUS_DATA_DIR")]
    data_dir: PathBuf,
    /// Keep chat history in memory only (lost on restart).
    #[arg(long)]
    chat_memory: bool,
    /// Chat messages a joiner receives as history.
    #[arg(long, default_value_t = 200, env = "CHORUS_CHAT_HISTORY")]
    chat_history: usize,
    /// How long an empty room's chat history is kept after its last message.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, env = "CHORUS_CHAT_RETENTION")]
    chat_retention: Duration,
}

impl ChatArgs {
    fn store_path(&self) -> Option<PathBuf> {
        (!self.chat_memory).then(|| self.data_dir.join("chat.sqlite3"))
    }

    fn chat_config(&self) -> chorus_signaling::chat::ChatConfig {
        chorus_signaling::chat::ChatConfig {
            history: self.chat_history,
            retention: self.chat_retention,
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct SignalingArgs {
    /// HTTP/WebSocket listen address.
    #[arg(long, default_value = "127.0.0.1:7880", env = "CHORUS_LISTEN")]
    listen: SocketAddr,
    /// QUIC control-plane listen address SFU nodes dial.
    #[arg(long, default_value = "127.0.0.1:7881", env = "CHORUS_CONTROL_LISTEN")]
    control_listen: SocketAddr,
    /// API key and secret as KEY:SECRET; repeat for several keys (env: comma-separated).
    #[arg(
        long = "api-key",
        env = "CHORUS_API_KEYS",
        value_delimiter = ',',
        required = true
    )]
    api_keys: Vec<String>,
    /// Shared secret SFU nodes must prove they hold (at least 8 characters).
    #[arg(long, env = "CHORUS_NODE_SECRET")]
    node_secret: String,
    /// PEM certificate for the control plane (nodes pin it with --control-ca).
    #[arg(long, env = "CHORUS_CONTROL_CERT", requires = "control_key")]
    control_cert: Option<PathBuf>,
    /// PEM private key for the control plane.
    #[arg(long, env = "CHORUS_CONTROL_KEY", requires = "control_cert")]
    control_key: Option<PathBuf>,
    /// Where to write the self-signed control certificate made when --control-cert is
    /// not given; SFU nodes need it for --control-ca.
    #[arg(
        long,
        default_value = "chorus-control-cert.pem",
        env = "CHORUS_CONTROL_CERT_OUT"
    )]
    control_cert_out: PathBuf,
    /// Serve HTTPS with this PEM certificate (with --tls-key).
    #[arg(long, env = "CHORUS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, env = "CHORUS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How long a dropped client keeps its seat.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, env = "CHORUS_RECONNECT_GRACE")]
    reconnect_grace: Duration,
    /// STUN server URLs handed to clients (e.g. stun:stun.example.org:3478).
    #[arg(long = "stun", env = "CHORUS_STUN", value_delimiter = ',')]
    stun: Vec<String>,
    /// TURN URLs handed to clients with fresh REST credentials (turn:host:3478?transport=udp).
    #[arg(
        long = "turn-url",
        env = "CHORUS_TURN_URLS",
        value_delimiter = ',',
        requires = "turn_secret"
    )]
    turn_urls: Vec<String>,
    /// TURN REST API shared secret (the relay's --auth-secret).
    #[arg(long, env = "CHORUS_TURN_SECRET")]
    turn_secret: Option<String>,
    /// Lifetime of minted TURN credentials.
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration, env = "CHORUS_TURN_TTL")]
    turn_ttl: Duration,
    /// Share rooms, presence, placement, room settings and chat with every signaling
    /// instance using this Redis (redis://[user:password@]HOST:PORT[/DB]), so clients
    /// may connect to any instance. Without it this instance keeps its state in memory
    /// (chat history and room settings in --data-dir).
    #[arg(long, env = "CHORUS_REDIS")]
    redis: Option<String>,
    #[command(flatten)]
    chat: ChatArgs,
}

#[derive(Args)]
struct SfuArgs {
    /// Signaling's control-plane address (its --control-listen). Repeat it (env:
    /// comma-separated) to register with several signaling instances sharing one
    /// --redis: each seats its own clients' participants on this node.
    #[arg(
        long = "signaling",
        env = "CHORUS_SIGNALING",
        value_delimiter = ',',
        required = true
    )]
    signaling: Vec<SocketAddr>,
    /// PEM certificate(s) of signaling's control plane to trust (concatenate the
    /// instances' certificates when each made its own).
    #[arg(long, env = "CHORUS_CONTROL_CA")]
    control_ca: PathBuf,
    /// Shared node secret (signaling's --node-secret).
    #[arg(long, env = "CHORUS_NODE_SECRET")]
    node_secret: String,
    /// Unique id of this node in the fleet (default: a random one).
    #[arg(long, env = "CHORUS_NODE_ID")]
    node_id: Option<String>,
    /// UDP address of the first media worker; worker i uses port+i.
    #[arg(long, default_value = "0.0.0.0:7882", env = "CHORUS_MEDIA_LISTEN")]
    media_listen: SocketAddr,
    /// IP addresses to advertise to clients as ICE candidates (needed when binding a
    /// wildcard address; repeatable).
    #[arg(
        long = "advertise-ip",
        env = "CHORUS_ADVERTISE_IPS",
        value_delimiter = ','
    )]
    advertise_ip: Vec<IpAddr>,
    /// Media worker threads, each with its own UDP port; rooms are spread across them.
    #[arg(long, default_value_t = 1, env = "CHORUS_WORKERS")]
    workers: usize,
    /// Serve Prometheus metrics (packets, forwarding time, rooms) at http://ADDR/metrics.
    #[arg(long, env = "CHORUS_SFU_METRICS")]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    selection: SelectionArgs,
}

/// Speaker selection settings, shared by `dev` and `sfu`.
#[derive(Args)]
struct SelectionArgs {
    /// Rooms with more participants than this forward only the active speakers.
    #[arg(long, default_value_t = 6, env = "CHORUS_SPEAKER_SELECTION_ABOVE")]
    speaker_selection_above: usize,
    /// How many speakers such rooms forward at once (the loudest).
    #[arg(long, default_value_t = 3, env = "CHORUS_MAX_ACTIVE_SPEAKERS")]
    max_active_speakers: usize,
}

impl SelectionArgs {
    fn worker_config(&self) -> chorus_sfu::WorkerConfig {
        chorus_sfu::WorkerConfig {
            selection_above: self.speaker_selection_above,
            max_active_speakers: self.max_active_speakers.max(1),
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct TokenArgs {
    /// Room the token may join.
    #[arg(long)]
    room: String,
    /// Participant identity (unique per person in a room).
    #[arg(long)]
    identity: String,
    /// Display name (defaults to the identity).
    #[arg(long)]
    name: Option<String>,
    /// Lifetime, e.g. 30m, 6h, 2days.
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// API key to sign with (default: the dev key).
    #[arg(long, env = "CHORUS_API_KEY")]
    api_key: Option<String>,
    /// API secret to sign with (default: the dev secret).
    #[arg(long, env = "CHORUS_API_SECRET")]
    api_secret: Option<String>,
    /// Grant admin rights.
    #[arg(long)]
    admin: bool,
    /// Listen-only: no publish grant.
    #[arg(long)]
    no_publish: bool,
    /// No subscribe grant.
    #[arg(long)]
    no_subscribe: bool,
    /// No data (chat) publish grant.
    #[arg(long)]
    no_publish_data: bool,
    /// Only these sources may be published, comma separated, from: microphone, camera,
    /// screen, screen_audio (e.g. `--sources microphone` for a voice-only seat). Sets the
    /// token's `can_publish_sources`; without it every source may be published
    /// (`--no-publish` forbids publishing altogether).
    #[arg(long, value_name = "LIST", value_parser = parse_sources)]
    sources: Option<SourceSet>,
}

/// `--sources microphone,camera` → the set; unknown or missing names are refused with
/// the list of valid ones.
fn parse_sources(list: &str) -> Result<SourceSet, String> {
    let valid = || {
        TrackSource::ALL
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut set = SourceSet::default();
    for name in list.split(',').map(str::trim) {
        match TrackSource::ALL.iter().find(|s| s.as_str() == name) {
            Some(s) => set.insert(*s),
            None if name.is_empty() => {
                return Err(format!(
                    "empty source name in {list:?}; give a comma-separated list of: {} \
                     (use --no-publish for a token that publishes nothing)",
                    valid()
                ))
            }
            None => {
                return Err(format!(
                    "unknown source {name:?}; valid sources are: {}",
                    valid()
                ))
            }
        }
    }
    Ok(set)
}

fn main() -> anyhow::Result<()> {
    // The config file becomes extra flags before clap parses, so precedence and
    // validation stay clap's: flag > environment variable > file > default.
    let cli: Cli = config::parse();
    init_logging(cli.log_json);
    if let Some(path) = &cli.config {
        tracing::info!("settings from {}", path.display());
    }
    // One process-wide TLS provider for HTTPS; QUIC configs pass theirs explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Dev(a) => dev(a).await,
            Command::Signaling(a) => signaling(a).await,
            Command::Sfu(a) => sfu(a).await,
            Command::Turn(a) => turn(a).await,
            Command::Token(a) => token_cmd(a),
        }
    })
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CHORUS_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,str0m=warn,quinn=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn random_secret() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The machine's LAN address: the source address the OS would use to reach a public
/// address. Connecting a UDP socket sends nothing.
fn lan_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
}

async fn dev(a: DevArgs) -> anyhow::Result<()> {
    let node_secret = random_secret();
    let (listen, media_listen, advertise, host) = if a.lan {
        let ip = lan_ip().context("could not find this machine's LAN address for --lan")?;
        (
            SocketAddr::new(IpAddr::from([0, 0, 0, 0]), a.listen.port()),
            SocketAddr::new(IpAddr::from([0, 0, 0, 0]), a.media_listen.port()),
            vec![ip],
            ip.to_string(),
        )
    } else {
        (a.listen, a.media_listen, vec![], a.listen.ip().to_string())
    };
    let https = if a.lan || a.https {
        let mut names = vec!["localhost".to_string(), host.clone()];
        names.dedup();
        let ck = rcgen::generate_simple_self_signed(names)
            .context("making a self-signed certificate")?;
        Some((
            ck.cert.pem().into_bytes(),
            ck.signing_key.serialize_pem().into_bytes(),
        ))
    } else {
        None
    };
    let scheme = if https.is_some() { "https" } else { "http" };
    let relay = if a.no_turn {
        None
    } else {
        Some(dev_turn(&a, &advertise).await?)
    };
    let turn_rest = relay.as_ref().map(|(running, secret)| {
        let host = if a.lan {
            host.clone()
        } else {
            running.udp_addr.ip().to_string()
        };
        let port = running.udp_addr.port();
        TurnRest {
            urls: vec![
                format!("turn:{host}:{port}?transport=udp"),
                format!("turn:{host}:{port}?transport=tcp"),
            ],
            secret: secret.clone(),
            ttl: Duration::from_secs(6 * 3600),
        }
    });
    let sig = Signaling::start(SignalingConfig {
        listen,
        control_listen: a.control_listen,
        api_keys: HashMap::from([(a.api_key.clone(), a.api_secret.clone())]),
        node_secret: node_secret.clone(),
        control_cert: None,
        https,
        dev_key: Some((a.api_key.clone(), a.api_secret.clone())),
        reconnect_grace: a.reconnect_grace,
        ice_servers: vec![],
        turn: turn_rest,
        chat_db: a.chat.store_path(),
        redis: None,
        chat: a.chat.chat_config(),
        allow_enhanced_audio: !a.chat.no_enhanced_audio,
    })
    .await?;
    let node = Node::start(NodeConfig {
        node_id: "dev-node".into(),
        signaling: vec![sig.control_addr],
        control_ca_pem: sig.control_cert_pem.clone(),
        node_secret,
        media_listen,
        advertise,
        workers: a.workers.max(1),
        worker: a.selection.worker_config(),
    })
    .await?;
    let sfu_metrics = match a.sfu_metrics {
        Some(addr) => Some(serve_metrics(addr, node.metrics.clone()).await?),
        None => None,
    };
    // Print the URL only once the node is registered, so the first join cannot race it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sig.hub.stats().nodes == 0 {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the SFU node did not register with signaling within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let host = if host.is_empty() {
        sig.http_addr.ip().to_string()
    } else {
        host
    };
    let url = format!("{scheme}://{host}:{}/", sig.http_addr.port());
    println!("Chorus dev server is up (signaling + SFU on this machine).");
    println!(
        "  API key: {}  secret: {}  (tokens: chorus token --room R --identity I)",
        a.api_key, a.api_secret
    );
    println!(
        "  media (UDP): {}",
        node.media_addrs
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some((running, _)) = &relay {
        println!(
            "  TURN relay (UDP/TCP): {} (credentials come with each join)",
            running.udp_addr
        );
    }
    if let Some(m) = sfu_metrics {
        println!("  SFU metrics: http://{m}/metrics");
    }
    if scheme == "https" {
        println!("  HTTPS uses a self-signed certificate: accept the browser's warning once.");
    }
    println!("Open {url} in two browser tabs to talk.");
    wait_for_shutdown().await;
    println!("Shutting down.");
    drop(node);
    sig.shutdown();
    Ok(())
}

/// Starts the bundled relay for dev mode: REST credentials with a fresh secret, and
/// relaying allowed to this machine's own addresses (the SFU lives there).
async fn dev_turn(
    a: &DevArgs,
    advertise: &[IpAddr],
) -> anyhow::Result<(chorus_turn::RunningTurn, String)> {
    let secret = random_secret();
    let mut args = chorus_turn::TurnArgs::new();
    args.listen = if a.lan {
        SocketAddr::new(IpAddr::from([0, 0, 0, 0]), a.turn_listen.port())
    } else {
        a.turn_listen
    };
    args.auth_secret = Some(secret.clone());
    args.relay_ip = advertise.first().copied().unwrap_or(a.turn_listen.ip());
    args.allow_loopback_peers = true;
    let mut cfg = chorus_turn::config_from_args(&args)?;
    for ip in advertise {
        cfg.policy.allow.push(chorus_turn::policy::Cidr {
            addr: *ip,
            prefix: if ip.is_ipv4() { 32 } else { 128 },
        });
    }
    let running = chorus_turn::run_with_config(args, cfg, wait_for_shutdown())
        .await
        .context("starting the TURN relay (use --no-turn to run without it)")?;
    Ok((running, secret))
}

async fn turn(a: chorus_turn::TurnArgs) -> anyhow::Result<()> {
    let running = chorus_turn::run(a, wait_for_shutdown()).await?;
    eprintln!("TURN relay listening on {} (UDP and TCP)", running.udp_addr);
    if let Some(t) = running.tls_addr {
        eprintln!("TURN over TLS on {t}");
    }
    if let Some(m) = running.metrics_addr {
        eprintln!("metrics on http://{m}/metrics");
    }
    running.wait().await;
    Ok(())
}

async fn signaling(a: SignalingArgs) -> anyhow::Result<()> {
    let mut api_keys = HashMap::new();
    for kv in &a.api_keys {
        let (k, s) = kv
            .split_once(':')
            .with_context(|| format!("--api-key {kv:?} must be KEY:SECRET"))?;
        if k.is_empty() || s.len() < 8 {
            anyhow::bail!(
                "--api-key {k:?}: the key must be non-empty and the secret at least 8 characters"
            );
        }
        api_keys.insert(k.to_string(), s.to_string());
    }
    let https = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some((
            std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
        )),
        _ => None,
    };
    let mut ice_servers = Vec::new();
    if !a.stun.is_empty() {
        ice_servers.push(IceServer {
            urls: a.stun.clone(),
            username: None,
            credential: None,
        });
    }
    let turn = match (&a.turn_secret, a.turn_urls.is_empty()) {
        (Some(secret), false) => Some(TurnRest {
            urls: a.turn_urls.clone(),
            secret: secret.clone(),
            ttl: a.turn_ttl,
        }),
        _ => None,
    };
    let sig = Signaling::start(SignalingConfig {
        listen: a.listen,
        control_listen: a.control_listen,
        api_keys,
        node_secret: a.node_secret,
        control_cert: a.control_cert.clone().zip(a.control_key.clone()),
        https,
        dev_key: None,
        reconnect_grace: a.reconnect_grace,
        ice_servers,
        turn,
        chat_db: a.chat.store_path(),
        redis: a.redis.clone(),
        chat: a.chat.chat_config(),
        allow_enhanced_audio: !a.chat.no_enhanced_audio,
    })
    .await?;
    if a.control_cert.is_none() {
        std::fs::write(&a.control_cert_out, &sig.control_cert_pem)
            .with_context(|| format!("writing {}", a.control_cert_out.display()))?;
        eprintln!(
            "control plane uses a self-signed certificate, written to {}: give it to SFU nodes with --control-ca",
            a.control_cert_out.display()
        );
    }
    eprintln!(
        "signaling listening on {} (control plane {})",
        sig.http_addr, sig.control_addr
    );
    wait_for_shutdown().await;
    sig.shutdown();
    Ok(())
}

async fn sfu(a: SfuArgs) -> anyhow::Result<()> {
    let pem = std::fs::read_to_string(&a.control_ca)
        .with_context(|| format!("reading {}", a.control_ca.display()))?;
    let node_id = a
        .node_id
        .unwrap_or_else(|| format!("sfu-{}", &random_secret()[..8]));
    let node = Node::start(NodeConfig {
        node_id: node_id.clone(),
        signaling: a.signaling.clone(),
        control_ca_pem: pem,
        node_secret: a.node_secret,
        media_listen: a.media_listen,
        advertise: a.advertise_ip,
        workers: a.workers,
        worker: a.selection.worker_config(),
    })
    .await?;
    eprintln!(
        "SFU node {node_id} serving media on {:?}, registering with {:?}",
        node.media_addrs, a.signaling
    );
    if let Some(addr) = a.metrics {
        let bound = serve_metrics(addr, node.metrics.clone()).await?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    wait_for_shutdown().await;
    Ok(())
}

/// Serves the SFU's metrics over plain HTTP on `addr` (port 0 picks one); returns the
/// bound address.
async fn serve_metrics(
    addr: SocketAddr,
    metrics: std::sync::Arc<chorus_sfu::SfuMetrics>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the SFU metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    m.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("SFU metrics server stopped: {e}");
        }
    });
    Ok(bound)
}

fn token_cmd(a: TokenArgs) -> anyhow::Result<()> {
    let (key, secret) = match (a.api_key, a.api_secret) {
        (Some(k), Some(s)) => (k, s),
        (None, None) => {
            eprintln!("note: no --api-key/--api-secret given; signing with the dev key (devkey/devsecret)");
            ("devkey".to_string(), "devsecret".to_string())
        }
        _ => anyhow::bail!("give both --api-key and --api-secret, or neither for the dev key"),
    };
    let grants = Grants {
        join: true,
        publish: !a.no_publish,
        subscribe: !a.no_subscribe,
        publish_data: !a.no_publish_data,
        admin: a.admin,
        can_publish_sources: a.sources,
    };
    let claims =
        token::participant_claims(&key, &a.room, &a.identity, a.name.as_deref(), a.ttl, grants);
    println!("{}", token::mint(&claims, &secret)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_a_comma_separated_list_of_known_names() {
        let s = parse_sources("microphone, screen_audio").unwrap();
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            [TrackSource::Microphone, TrackSource::ScreenAudio]
        );
        let e = parse_sources("microphone,webcam").unwrap_err();
        assert!(e.contains("\"webcam\""), "{e}");
        assert!(
            e.contains("microphone, camera, screen, screen_audio"),
            "{e}"
        );
        assert!(parse_sources("").unwrap_err().contains("--no-publish"));
        assert!(parse_sources("camera,,screen").is_err());
    }
}
