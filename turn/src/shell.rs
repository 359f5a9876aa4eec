//! Tokio I/O shell around [`crate::core::Server`].
//!
//! One task owns the server state; socket reader tasks feed it through a
//! channel and it writes UDP output directly with non-blocking sends.
//! Single ownership is what lets the relay path run without locks.
//!
//! The UDP listener, which carries every UDP client's traffic, moves datagrams
//! in batches ([`chorus_netio`]: `recvmmsg` / `sendmmsg` on Linux); relay
//! sockets each serve one allocation and are read and written per datagram.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use chorus_netio::{recv_batch, send_batch, RecvBatch, BATCH, MAX_UDP_PAYLOAD};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::args::TurnArgs;
use crate::auth::Credentials;
use crate::core::{
    self, BindError, Bound, ClientAddr, Dest, Family, Metrics, Outbox, PortReq, Proto, RelayBinder,
    RelayId, Server,
};
use crate::policy::PeerPolicy;
use crate::stun;

/// A running relay. Dropping it does not stop the server; the `shutdown`
/// future passed to [`run`] does.
pub struct RunningTurn {
    /// UDP listener address (TCP is on the same address).
    pub udp_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub relay_ip: IpAddr,
    metrics: Arc<Metrics>,
    done: JoinHandle<()>,
}

impl RunningTurn {
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Resolves once the server has shut down after the shutdown future fired.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

enum Event {
    Client {
        client: ClientAddr,
        data: Bytes,
    },
    Peer {
        relay: RelayId,
        peer: SocketAddr,
        data: Bytes,
    },
    StreamOpen {
        client: ClientAddr,
        tx: mpsc::Sender<Bytes>,
    },
    StreamClosed {
        client: ClientAddr,
    },
}

/// Aborts the task when dropped, so releasing a relay stops its reader.
struct AbortOnDrop(JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Converts the CLI arguments into the core's configuration.
pub fn config_from_args(args: &TurnArgs) -> anyhow::Result<core::Config> {
    let mut static_users = HashMap::new();
    for u in &args.users {
        let (name, pw) = u
            .split_once(':')
            .with_context(|| format!("--user {u:?}: expected name:password"))?;
        if name.is_empty() {
            bail!("--user {u:?}: empty name");
        }
        static_users.insert(name.to_string(), pw.to_string());
    }
    if args.relay_ip.is_unspecified() {
        // XOR-RELAYED-ADDRESS would tell clients to send to 0.0.0.0.
        bail!(
            "--relay-ip must be a concrete address peers can reach, not {}",
            args.relay_ip
        );
    }
    if let Some(ext) = args.external_ip {
        if ext.is_unspecified() || ext.is_ipv4() != args.relay_ip.is_ipv4() {
            bail!(
                "--external-ip {ext} must be a concrete address of the same family as --relay-ip {}",
                args.relay_ip
            );
        }
    }
    if args.min_port > args.max_port {
        bail!(
            "--min-port {} is above --max-port {}",
            args.min_port,
            args.max_port
        );
    }
    Ok(core::Config {
        credentials: Credentials {
            realm: args.realm.clone(),
            auth_secret: args.auth_secret.clone(),
            static_users,
        },
        policy: PeerPolicy {
            allow_loopback: args.allow_loopback_peers,
            ..Default::default()
        },
        user_quota: args.user_quota,
        total_quota: args.total_quota,
        max_bps: args.max_bps,
        ..core::Config::default()
    })
}

/// Binds all listeners and serves until `shutdown` resolves.
pub async fn run(
    args: TurnArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningTurn> {
    let cfg = config_from_args(&args)?;
    run_with_config(args, cfg, shutdown).await
}

/// Like [`run`] but with a fully specified core configuration (allow-lists,
/// lifetimes) for embedders that need more than the CLI exposes.
///
/// The relay runs on its own thread with a single-threaded tokio runtime, like
/// coturn's relay threads: all relay tasks share one core, so handing packets
/// between them never crosses threads, and the SFU's runtime load does not
/// delay relayed media (nor the other way round).
pub async fn run_with_config(
    args: TurnArgs,
    cfg: core::Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningTurn> {
    if cfg.credentials.auth_secret.is_none() && cfg.credentials.static_users.is_empty() {
        tracing::warn!(
            "TURN has neither --auth-secret nor --user: every allocation will be refused"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let relay_ip = args.relay_ip;
    let thread = std::thread::Builder::new()
        .name("chorus-turn".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            rt.block_on(async move {
                match setup(args, cfg, stop_rx).await {
                    Ok((info, serve)) => {
                        let _ = ready_tx.send(Ok(info));
                        serve.await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })
        .context("spawning TURN thread")?;
    let info = ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("TURN thread died during startup"))??;
    let done = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    });
    tracing::info!(
        udp_addr = %info.udp_addr,
        tls_addr = ?info.tls_addr,
        metrics_addr = ?info.metrics_addr,
        %relay_ip,
        "TURN relay listening"
    );
    Ok(RunningTurn {
        udp_addr: info.udp_addr,
        tcp_addr: info.tcp_addr,
        tls_addr: info.tls_addr,
        metrics_addr: info.metrics_addr,
        relay_ip,
        metrics: info.metrics,
        done,
    })
}

struct Listening {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
}

/// Binds everything (inside the relay thread) and returns the serving future.
async fn setup(
    args: TurnArgs,
    cfg: core::Config,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<(Listening, impl Future<Output = ()>)> {
    let tls = match (&args.tls_listen, &args.cert, &args.key) {
        (Some(_), Some(c), Some(k)) => Some(load_tls(c, k)?),
        (Some(_), _, _) => bail!("--tls-listen needs --cert and --key"),
        _ => None,
    };
    let (udp, tcp) = bind_udp_tcp(args.listen).await?;
    let udp_addr = udp.local_addr()?;
    // The batched calls work on a std handle of the listener; the tokio socket
    // (same socket, duplicated descriptor) tells the core loop about readiness.
    let udp_io = udp.try_clone().context("duplicating the UDP listener")?;
    let udp = UdpSocket::from_std(udp)?;
    let tcp_addr = tcp.local_addr()?;
    let tls_listener = match args.tls_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding TLS {a}"))?,
        ),
        None => None,
    };
    let tls_addr = tls_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let metrics_listener = match args.metrics {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding metrics {a}"))?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;

    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let server = Server::new(cfg, Instant::now(), now_unix, rand::random());
    let metrics = server.metrics();
    let (ev_tx, ev_rx) = mpsc::channel::<Event>(8192);

    let limits = StreamLimits {
        max_connections: args.max_connections,
        idle: args.idle_timeout.max(Duration::from_millis(100)),
        first_frame: args
            .idle_timeout
            .clamp(Duration::from_millis(100), FIRST_FRAME_TIMEOUT),
    };
    let mut tasks = vec![tokio::spawn(stream_acceptor(
        tcp,
        None,
        limits,
        metrics.clone(),
        ev_tx.clone(),
        stop_rx.clone(),
    ))];
    if let (Some(l), Some(acc)) = (tls_listener, tls) {
        tasks.push(tokio::spawn(stream_acceptor(
            l,
            Some(acc),
            limits,
            metrics.clone(),
            ev_tx.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(l) = metrics_listener {
        tasks.push(tokio::spawn(metrics_server(
            l,
            metrics.clone(),
            stop_rx.clone(),
        )));
    }
    let relays = Relays {
        ip: args.relay_ip,
        advertised: args.external_ip.unwrap_or(args.relay_ip),
        min: args.min_port,
        max: args.max_port,
        cursor: rand::random::<u16>(),
        next_id: 0,
        live: HashMap::new(),
        events: ev_tx,
    };
    let serve = async move {
        let listener = Listener {
            sock: udp,
            io: udp_io,
            local: udp_addr,
        };
        core_loop(server, relays, listener, ev_rx, stop_rx).await;
        for t in tasks {
            let _ = t.await;
        }
    };
    Ok((
        Listening {
            udp_addr,
            tcp_addr,
            tls_addr,
            metrics_addr,
            metrics,
        },
        serve,
    ))
}

/// UDP and TCP share one address; with port 0 the TCP port follows UDP's.
async fn bind_udp_tcp(addr: SocketAddr) -> anyhow::Result<(std::net::UdpSocket, TcpListener)> {
    let mut last_err = None;
    for _ in 0..20 {
        let udp = bind_std_udp(addr, LISTENER_SOCKET_BUF)
            .with_context(|| format!("binding UDP {addr}"))?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last_err = Some(e),
            Err(e) => return Err(e).with_context(|| format!("binding TCP {bound}")),
        }
    }
    Err(last_err
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("no port")))
    .context("binding TCP next to UDP")
}

fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificates", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate/key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Longest wait for a new TCP/TLS client's first complete frame (and for its TLS
/// handshake): a real client sends its Allocate or Binding at once.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the "connection limit reached" warning may repeat.
const LIMIT_WARN_EVERY: Duration = Duration::from_secs(60);

/// Limits on TCP/TLS client connections: each holds a task, buffers and a file
/// descriptor, so neither their number nor their idle time may grow without bound.
#[derive(Clone, Copy, Debug)]
struct StreamLimits {
    max_connections: usize,
    idle: Duration,
    first_frame: Duration,
}

/// Counts an open TCP/TLS connection in the metrics until dropped.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    /// Counts a new connection, or returns `None` when `max` are already open.
    fn try_open(metrics: &Arc<Metrics>, max: usize) -> Option<Self> {
        let open = &metrics.stream_connections;
        let mut n = open.load(Ordering::Relaxed);
        loop {
            if n >= max as u64 {
                return None;
            }
            match open.compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(OpenConnection(metrics.clone())),
                Err(now) => n = now,
            }
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.stream_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn stream_acceptor(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: StreamLimits,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    let mut last_limit_warning: Option<Instant> = None;
    loop {
        let (sock, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(open) = OpenConnection::try_open(&metrics, limits.max_connections) else {
            // Closing is the only answer TCP allows before the client has said
            // anything; the log and the metric tell the operator why.
            metrics.stream_rejected.fetch_add(1, Ordering::Relaxed);
            drop(sock);
            if last_limit_warning.is_none_or(|t| t.elapsed() >= LIMIT_WARN_EVERY) {
                last_limit_warning = Some(Instant::now());
                tracing::warn!(
                    %remote,
                    max = limits.max_connections,
                    "TURN TCP/TLS connection limit reached (--max-connections); closing new connections"
                );
            }
            continue;
        };
        let _ = sock.set_nodelay(true);
        let tx = tx.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _open = open;
            match tls {
                None => {
                    let client = ClientAddr {
                        proto: Proto::Tcp,
                        local,
                        remote,
                    };
                    serve_stream(sock, client, limits, &metrics, tx, stop).await
                }
                Some(acc) => {
                    let hs = tokio::time::timeout(limits.first_frame, acc.accept(sock)).await;
                    let Ok(Ok(s)) = hs else {
                        tracing::debug!(%remote, "TLS handshake failed");
                        return;
                    };
                    let client = ClientAddr {
                        proto: Proto::Tls,
                        local,
                        remote,
                    };
                    serve_stream(s, client, limits, &metrics, tx, stop).await
                }
            }
        });
    }
}

/// Splits a TCP/TLS byte stream into STUN / ChannelData frames for the core,
/// and writes the core's frames back.
async fn serve_stream<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    client: ClientAddr,
    limits: StreamLimits,
    metrics: &Metrics,
    tx: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(1024);
    if tx
        .send(Event::StreamOpen { client, tx: out_tx })
        .await
        .is_err()
    {
        return;
    }
    let writer = AbortOnDrop(tokio::spawn(async move {
        while let Some(b) = out_rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    }));
    // Frames are split off the read buffer without copying (see relay_reader).
    let mut buf = BytesMut::with_capacity(256 << 10);
    // Bytes that never complete a frame do not count as activity: a client dribbling
    // a byte at a time is as idle as one that sends nothing.
    let mut idle_deadline = tokio::time::Instant::now() + limits.first_frame;
    'outer: loop {
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(idle_deadline) => {
                metrics.stream_idle_closed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(remote = %client.remote, "closing idle TURN TCP/TLS connection");
                break;
            }
            _ = stop.changed() => break,
        };
        loop {
            match stun::stream_frame_len(&buf) {
                Ok(Some(len)) => {
                    idle_deadline = tokio::time::Instant::now() + limits.idle;
                    let data = buf.split_to(len).freeze();
                    if tx.send(Event::Client { client, data }).await.is_err() {
                        break 'outer;
                    }
                }
                Ok(None) => break,
                // Not STUN/TURN framing: the stream is unrecoverable.
                Err(_) => break 'outer,
            }
        }
    }
    let _ = tx.send(Event::StreamClosed { client }).await;
    drop(writer);
}

struct RelaySock {
    sock: Arc<UdpSocket>,
    _reader: AbortOnDrop,
}

/// Binds relay sockets in the configured port range.
struct Relays {
    /// Where relay sockets bind.
    ip: IpAddr,
    /// What clients are told (XOR-RELAYED-ADDRESS): `ip`, or --external-ip behind 1:1
    /// NAT.
    advertised: IpAddr,
    min: u16,
    max: u16,
    cursor: u16,
    next_id: u64,
    live: HashMap<RelayId, RelaySock>,
    events: mpsc::Sender<Event>,
}

impl RelayBinder for Relays {
    fn bind(&mut self, family: Family, req: PortReq) -> Result<Bound, BindError> {
        if (family == Family::V4) != self.ip.is_ipv4() {
            return Err(BindError::FamilyUnsupported);
        }
        let span = (self.max - self.min) as u32 + 1;
        // Start from a moving cursor so recently freed ports are not reused at
        // once; give up after a bounded number of probes.
        for i in 0..span.min(4096) {
            let port = self.min + ((self.cursor as u32 + i) % span) as u16;
            if req != PortReq::Any && port % 2 == 1 {
                continue;
            }
            let Some(first) = bind_port(self.ip, port) else {
                continue;
            };
            let second = match req {
                PortReq::EvenPair if port < self.max => match bind_port(self.ip, port + 1) {
                    Some(s) => Some(s),
                    None => continue,
                },
                PortReq::EvenPair => continue,
                _ => None,
            };
            self.cursor = self.cursor.wrapping_add(i as u16 + 2);
            let main = self.register(first, port);
            let reserved = second.map(|s| self.register(s, port + 1));
            return Ok((main, reserved));
        }
        Err(BindError::Exhausted)
    }

    fn release(&mut self, id: RelayId) {
        self.live.remove(&id);
    }
}

/// Kernel buffer sizes. Media arrives in bursts (many clients' 20 ms frames
/// land together); the default ~200 kB receive buffer overflows under load
/// on the shared listener, so ask for more (the kernel caps it at rmem_max).
const LISTENER_SOCKET_BUF: usize = 4 << 20;
const RELAY_SOCKET_BUF: usize = 2 << 20;

/// Binds a non-blocking UDP socket with enlarged buffers.
fn bind_std_udp(addr: SocketAddr, buf: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Keep the IPv6 listener IPv6-only so an IPv4 listener can share the port.
        let _ = s.set_only_v6(true);
    }
    // Best effort: a smaller buffer only means more loss under bursts.
    let _ = s.set_recv_buffer_size(buf);
    let _ = s.set_send_buffer_size(buf);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_port(ip: IpAddr, port: u16) -> Option<UdpSocket> {
    bind_std_udp(SocketAddr::new(ip, port), RELAY_SOCKET_BUF)
        .and_then(UdpSocket::from_std)
        .ok()
}

impl Relays {
    fn register(&mut self, sock: UdpSocket, port: u16) -> (RelayId, SocketAddr) {
        self.next_id += 1;
        let id = RelayId(self.next_id);
        let sock = Arc::new(sock);
        let reader = tokio::spawn(relay_reader(sock.clone(), id, self.events.clone()));
        self.live.insert(
            id,
            RelaySock {
                sock,
                _reader: AbortOnDrop(reader),
            },
        );
        (id, SocketAddr::new(self.advertised, port))
    }
}

/// Datagrams are received into a shared `BytesMut` and handed over as frozen
/// slices of it; once the core has dropped them, `reserve` reclaims the same
/// allocation, so steady-state relaying does not allocate per packet.
async fn relay_reader(sock: Arc<UdpSocket>, relay: RelayId, tx: mpsc::Sender<Event>) {
    const CHUNK: usize = 256 << 10;
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(65536);
        let Ok((_, peer)) = sock.recv_buf_from(&mut buf).await else {
            // Transient errors (ICMP feedback, ENOMEM): back off briefly.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            continue;
        };
        let data = buf.split().freeze();
        if tx.send(Event::Peer { relay, peer, data }).await.is_err() {
            return;
        }
    }
}

/// The UDP listener: the tokio socket for readiness, a std handle of the same
/// socket for the batched calls.
struct Listener {
    sock: UdpSocket,
    io: std::net::UdpSocket,
    local: SocketAddr,
}

/// Listener receive batches per loop round: bounds the work done before the
/// output is flushed and the other inputs get their turn.
const LISTENER_BATCHES_PER_ROUND: usize = 2;

/// The one task that owns the server state. It reads the main UDP listener
/// itself (the hottest input) and everything else from the event channel.
async fn core_loop(
    mut server: Server,
    mut relays: Relays,
    udp: Listener,
    mut rx: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut out = Outbox::new();
    // Frames for TCP/TLS clients are copied out of this and handed to their
    // writer tasks; it is reclaimed once they have written them, as in
    // relay_reader, so stream output does not allocate per frame either.
    let mut stream_buf = BytesMut::with_capacity(STREAM_OUT_CHUNK);
    let mut streams: HashMap<ClientAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let metrics = server.metrics();
    // Room for any UDP datagram, so nothing is truncated (pages are touched
    // only as far as datagrams fill them).
    let mut batch = RecvBatch::with_datagram_capacity(MAX_UDP_PAYLOAD);
    let client_of = |remote| ClientAddr {
        proto: Proto::Udp,
        local: udp.local,
        remote,
    };
    let mut deadline = server.poll_timeout();
    let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            // Read below, with the rest of what is queued.
            _ = udp.sock.readable() => {}
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                handle_event(&mut server, &mut relays, &mut streams, ev, Instant::now(), &mut out);
            }
            _ = &mut sleep => {
                server.handle_timeout(Instant::now(), &mut relays);
            }
        }
        // Drain whatever is already queued before flushing, to batch work
        // (bounded so one busy source cannot starve the others).
        let now = Instant::now();
        for _ in 0..LISTENER_BATCHES_PER_ROUND {
            match udp
                .sock
                .try_io(Interest::READABLE, || recv_batch(&udp.io, &mut batch))
            {
                Ok(n) => {
                    for (from, data, _) in batch.iter() {
                        server.handle_client(client_of(from), data, now, &mut relays, &mut out);
                    }
                    if n < BATCH {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ICMP feedback for some earlier send: consumed, try again.
                Err(_) => {}
            }
        }
        for _ in 0..64 {
            match rx.try_recv() {
                Ok(ev) => handle_event(&mut server, &mut relays, &mut streams, ev, now, &mut out),
                Err(_) => break,
            }
        }
        flush(&out, &udp, &relays, &streams, &mut stream_buf, &metrics);
        out.clear();
        let next = server.poll_timeout();
        if next != deadline {
            deadline = next;
            sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
        }
    }
}

/// Size of the buffer stream output is copied into (see `core_loop`).
const STREAM_OUT_CHUNK: usize = 256 << 10;

/// Writes the core's output without waiting: datagrams to UDP clients in
/// batches on the listener, datagrams to peers on their relay sockets, frames
/// for TCP/TLS clients to their writer tasks. Whatever cannot go out at once
/// (full socket buffer or queue, closed stream) is dropped and counted.
fn flush(
    out: &Outbox,
    udp: &Listener,
    relays: &Relays,
    streams: &HashMap<ClientAddr, mpsc::Sender<Bytes>>,
    stream_buf: &mut BytesMut,
    metrics: &Metrics,
) {
    const NONE: (SocketAddr, &[u8]) = (
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
        &[],
    );
    let mut pending = [NONE; BATCH];
    let mut n = 0;
    let mut dropped = 0;
    for (dest, data) in out.iter() {
        let ok = match dest {
            Dest::Client(c) if c.proto == Proto::Udp => {
                if n == BATCH {
                    dropped += send_listener_batch(udp, &pending[..n]);
                    n = 0;
                }
                pending[n] = (c.remote, data);
                n += 1;
                true
            }
            Dest::Client(c) => streams.get(&c).is_some_and(|t| {
                if stream_buf.capacity() < data.len() {
                    stream_buf.reserve(STREAM_OUT_CHUNK.max(data.len()));
                }
                stream_buf.extend_from_slice(data);
                t.try_send(stream_buf.split().freeze()).is_ok()
            }),
            Dest::Peer { relay, peer } => relays
                .live
                .get(&relay)
                .is_some_and(|r| r.sock.try_send_to(data, peer).is_ok()),
        };
        if !ok {
            dropped += 1;
        }
    }
    dropped += send_listener_batch(udp, &pending[..n]);
    if dropped > 0 {
        metrics
            .dropped_packets
            .fetch_add(dropped, Ordering::Relaxed);
    }
}

/// Sends `items` on the listener, each datagram tried once; returns how many
/// could not be sent.
fn send_listener_batch(udp: &Listener, items: &[(SocketAddr, &[u8])]) -> u64 {
    let mut dropped = 0;
    let mut i = 0;
    while i < items.len() {
        match udp
            .sock
            .try_io(Interest::WRITABLE, || send_batch(&udp.io, &items[i..]))
        {
            Ok(sent) => i += sent,
            // The first datagram failed (full buffer, unreachable address...):
            // drop it and carry on with the rest.
            Err(_) => {
                dropped += 1;
                i += 1;
            }
        }
    }
    dropped
}

fn handle_event(
    server: &mut Server,
    relays: &mut Relays,
    streams: &mut HashMap<ClientAddr, mpsc::Sender<Bytes>>,
    ev: Event,
    now: Instant,
    out: &mut Outbox,
) {
    match ev {
        Event::Client { client, data } => server.handle_client(client, &data, now, relays, out),
        Event::Peer { relay, peer, data } => server.handle_peer(relay, peer, &data, now, out),
        Event::StreamOpen { client, tx } => {
            streams.insert(client, tx);
        }
        Event::StreamClosed { client } => {
            streams.remove(&client);
            server.client_closed(client, relays);
        }
    }
}

async fn metrics_server(listener: TcpListener, m: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    loop {
        let (sock, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.changed() => return,
        };
        let m = m.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), serve_metrics(sock, &m))
                    .await;
        });
    }
}

async fn serve_metrics(mut sock: TcpStream, m: &Metrics) -> std::io::Result<()> {
    let mut req = [0u8; 2048];
    let mut n = 0;
    // Read until the end of the request head; the body (if any) is ignored.
    while n < req.len() {
        let k = sock.read(&mut req[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
        if req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = std::str::from_utf8(&req[..n]).unwrap_or("");
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/metrics" {
        ("200 OK", render_metrics(m))
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
}

/// Prometheus text exposition of the relay counters.
pub fn render_metrics(m: &Metrics) -> String {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let rows: [(&str, &str, &str, u64); 11] = [
        (
            "chorus_turn_allocations",
            "gauge",
            "Current allocations.",
            g(&m.allocations),
        ),
        (
            "chorus_turn_allocations_total",
            "counter",
            "Allocations created.",
            g(&m.allocations_total),
        ),
        (
            "chorus_turn_relayed_packets_total",
            "counter",
            "Packets relayed in either direction.",
            g(&m.relayed_packets),
        ),
        (
            "chorus_turn_relayed_bytes_total",
            "counter",
            "Payload bytes relayed in either direction.",
            g(&m.relayed_bytes),
        ),
        (
            "chorus_turn_dropped_packets_total",
            "counter",
            "Packets dropped (no permission, bandwidth cap, full socket).",
            g(&m.dropped_packets),
        ),
        (
            "chorus_turn_auth_failures_total",
            "counter",
            "Requests with bad or expired credentials.",
            g(&m.auth_failures),
        ),
        (
            "chorus_turn_requests_total",
            "counter",
            "STUN/TURN requests received.",
            g(&m.requests),
        ),
        (
            "chorus_turn_error_responses_total",
            "counter",
            "Error responses sent.",
            g(&m.error_responses),
        ),
        (
            "chorus_turn_stream_connections",
            "gauge",
            "Open TCP and TLS client connections.",
            g(&m.stream_connections),
        ),
        (
            "chorus_turn_stream_rejected_total",
            "counter",
            "TCP/TLS connections closed at once because --max-connections were open.",
            g(&m.stream_rejected),
        ),
        (
            "chorus_turn_stream_idle_closed_total",
            "counter",
            "TCP/TLS connections closed after --idle-timeout without a complete frame.",
            g(&m.stream_idle_closed),
        ),
    ];
    let mut s = String::new();
    for (name, kind, help, v) in rows {
        s.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    s
}
