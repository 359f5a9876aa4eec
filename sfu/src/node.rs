//! The SFU node's shells: worker threads around [`Worker`] cores; the control-plane
//! client that dials signaling is [`crate::control`].

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chorus_protocol::control::{FromNode, ToNode};
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::demux::is_rtp_media;
use crate::metrics::SfuMetrics;
use crate::worker::{Worker, WorkerConfig, WorkerStats};
use chorus_netio::{enable_rx_timestamps, recv_batch, send_batch, RecvBatch, BATCH};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unique name of this node in the fleet.
    pub node_id: String,
    /// Control-plane addresses of the signaling instances to register with: the node
    /// serves each one's participants (see [`crate::control`]).
    pub signaling: Vec<SocketAddr>,
    /// PEM certificate(s) of signaling's control listeners (pinned trust): one per
    /// instance when each made its own.
    pub control_ca_pem: String,
    /// Shared node secret.
    pub node_secret: String,
    /// UDP address of the first worker; worker `i` binds port + i (or 0 for any).
    pub media_listen: SocketAddr,
    /// Addresses to advertise as ICE host candidates when `media_listen` is a wildcard.
    pub advertise: Vec<IpAddr>,
    pub workers: usize,
    /// Speaker selection and other per-worker tunables.
    pub worker: WorkerConfig,
}

pub(crate) enum WorkerCmd {
    Control(ToNode),
}

/// A running SFU node.
pub struct Node {
    pub media_addrs: Vec<SocketAddr>,
    /// Counters and histograms for `/metrics` (`SfuMetrics::render`).
    pub metrics: Arc<SfuMetrics>,
    control: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.control.abort();
    }
}

impl Node {
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let workers = config.workers.max(1);
        let metrics = Arc::new(SfuMetrics::new(workers));
        let (ev_tx, ev_rx) = mpsc::unbounded_channel::<FromNode>();
        let mut senders = Vec::new();
        let mut media_addrs = Vec::new();
        for i in 0..workers {
            let mut addr = config.media_listen;
            if addr.port() != 0 {
                addr.set_port(addr.port() + i as u16);
            }
            let socket =
                bind_media(addr).with_context(|| format!("binding media UDP socket {addr}"))?;
            let local = socket.local_addr()?;
            let candidates = candidate_addrs(local, &config.advertise);
            info!(worker = i, %local, ?candidates, "media worker listening");
            media_addrs.push(local);
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            let ev_tx = ev_tx.clone();
            let wcfg = config.worker;
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("chorus-sfu-worker-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => return error!("worker runtime failed: {e}"),
                    };
                    rt.block_on(run_worker(
                        socket,
                        Worker::with_config(local, candidates, wcfg),
                        rx,
                        ev_tx,
                        (i, metrics),
                    ));
                })?;
        }
        let control = tokio::spawn(crate::control::run(
            config,
            senders,
            ev_rx,
            media_addrs.clone(),
        ));
        Ok(Node {
            media_addrs,
            metrics,
            control,
        })
    }
}

/// Kernel buffer for a worker socket. Every participant's 20 ms frames arrive in
/// bursts, and the default ~200 kB receive buffer (about 100 datagrams once the
/// kernel's per-packet overhead is counted) overflowed under load testing as soon as
/// the worker thread was descheduled for a few milliseconds. The kernel caps the
/// request at net.core.rmem_max / wmem_max.
const MEDIA_SOCKET_BUF: usize = 4 << 20;

fn bind_media(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only means more loss under bursts.
    let _ = s.set_recv_buffer_size(MEDIA_SOCKET_BUF);
    let _ = s.set_send_buffer_size(MEDIA_SOCKET_BUF);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Host candidates: the socket's own address, or the advertised IPs for a wildcard bind.
fn candidate_addrs(local: SocketAddr, advertise: &[IpAddr]) -> Vec<SocketAddr> {
    if !advertise.is_empty() {
        return advertise
            .iter()
            .map(|ip| SocketAddr::new(*ip, local.port()))
            .collect();
    }
    if local.ip().is_unspecified() {
        return vec![SocketAddr::new(IpAddr::from([127, 0, 0, 1]), local.port())];
    }
    vec![local]
}

async fn run_worker(
    socket: std::net::UdpSocket,
    mut worker: Worker,
    mut cmds: mpsc::UnboundedReceiver<WorkerCmd>,
    events: mpsc::UnboundedSender<FromNode>,
    (index, metrics): (usize, Arc<SfuMetrics>),
) {
    // The batched calls work on the std socket; tokio's copy of the same descriptor
    // only tells the loop when it is readable or writable.
    let io = match socket.try_clone() {
        Ok(s) => s,
        Err(e) => return error!("worker socket: {e}"),
    };
    if let Err(e) = enable_rx_timestamps(&io) {
        warn!("no receive timestamps; forwarding time excludes socket queueing: {e}");
    }
    let socket = match tokio::net::UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => return error!("worker socket: {e}"),
    };
    let mut batch = RecvBatch::default();
    let mut out: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    // Kernel arrival times of the datagrams in this round that forwarded audio.
    let mut forwarded_at: Vec<Instant> = Vec::new();
    let mut seen = WorkerStats::default();
    let mut membership_seen = u64::MAX;
    loop {
        let deadline = worker.next_deadline(Instant::now());
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                match cmd {
                    Some(WorkerCmd::Control(c)) => worker.handle_command(Instant::now(), c),
                    None => break,
                }
            }
            r = socket.readable() => {
                if let Err(e) = r {
                    tracing::debug!("readable: {e}");
                }
                // Everything queued, but a bounded amount per round so commands and
                // timers still get their turn under overload.
                for _ in 0..MAX_BATCHES_PER_ROUND {
                    match socket.try_io(Interest::READABLE, || recv_batch(&io, &mut batch)) {
                        Ok(n) => {
                            let now = Instant::now();
                            metrics.datagrams_received.fetch_add(n as u64, Ordering::Relaxed);
                            for (src, data, arrived) in batch.iter() {
                                if arrived.is_some_and(|t| now.saturating_duration_since(t) > MAX_AUDIO_QUEUE_AGE)
                                    && is_rtp_media(data)
                                {
                                    metrics.datagrams_shed.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                let before = worker.stats().packets_forwarded;
                                worker.handle_datagram(now, src, data);
                                if worker.stats().packets_forwarded != before {
                                    forwarded_at.push(arrived.unwrap_or(now));
                                }
                            }
                            if n < BATCH {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        // ICMP port unreachable from a departed peer surfaces here; not fatal.
                        Err(e) => {
                            tracing::debug!("recv: {e}");
                            break;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        let now = Instant::now();
        if worker.next_deadline(now) <= now {
            worker.handle_timeout(now);
        }
        out.extend(worker.take_transmits().map(|t| (t.destination, t.contents)));
        send_all(&socket, &io, &mut out, &metrics).await;
        for e in worker.take_events() {
            match &e {
                FromNode::ReceiveStats { stats, .. } => {
                    metrics.downlink_estimate.observe(stats.estimate_bps);
                    metrics.downlink_allocated.observe(stats.allocated_bps);
                    metrics.downlink_actual.observe(stats.actual_bps);
                }
                FromNode::PublishLayers { .. } => {
                    metrics
                        .publish_layer_updates
                        .fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            let _ = events.send(e);
        }
        for t0 in forwarded_at.drain(..) {
            metrics.forward_time.observe(t0.elapsed());
        }
        let st = worker.stats();
        let forwarded = st.packets_forwarded - seen.packets_forwarded;
        if forwarded > 0 {
            metrics
                .rtp_forwarded
                .fetch_add(forwarded, Ordering::Relaxed);
        }
        if st.packets_in != seen.packets_in {
            metrics
                .rtp_received
                .fetch_add(st.packets_in - seen.packets_in, Ordering::Relaxed);
        }
        if st.layer_switches_up != seen.layer_switches_up {
            metrics.layer_switches_up.fetch_add(
                st.layer_switches_up - seen.layer_switches_up,
                Ordering::Relaxed,
            );
        }
        if st.layer_switches_down != seen.layer_switches_down {
            metrics.layer_switches_down.fetch_add(
                st.layer_switches_down - seen.layer_switches_down,
                Ordering::Relaxed,
            );
        }
        if st.video_paused_bandwidth != seen.video_paused_bandwidth {
            metrics.set_paused(index, st.video_paused_bandwidth);
        }
        if st.datagrams_dropped != seen.datagrams_dropped {
            metrics.datagrams_dropped.fetch_add(
                st.datagrams_dropped - seen.datagrams_dropped,
                Ordering::Relaxed,
            );
        }
        seen = st;
        if worker.membership_epoch() != membership_seen {
            membership_seen = worker.membership_epoch();
            metrics.set_rooms(index, worker.room_sizes().map(|(r, n)| (r.to_string(), n)));
        }
    }
}

/// Audio that waited longer than this in the socket queue is dropped unprocessed.
/// When a worker falls behind (more subscribers than its core can serve), the 4 MB
/// receive buffer otherwise turns into a FIFO holding many seconds of speech: in the
/// 300-listener load test every listener heard the room more than 10 s late. Packets
/// this late would be discarded or stretch latency at the listener's jitter buffer
/// anyway; shedding them lets the worker catch up with the present at once, and the
/// listeners conceal the gap. STUN, DTLS and RTCP are never shed.
const MAX_AUDIO_QUEUE_AGE: Duration = Duration::from_millis(100);

/// Receive batches per loop round (each up to [`BATCH`] datagrams) before the worker
/// sends what they produced: bounds the extra latency batching adds to ~100 datagrams'
/// processing.
const MAX_BATCHES_PER_ROUND: usize = 1;

/// Sends every datagram in `out` (batched), waiting for buffer space when the socket
/// is full; a datagram the kernel refuses is counted and skipped.
async fn send_all(
    socket: &tokio::net::UdpSocket,
    io: &std::net::UdpSocket,
    out: &mut Vec<(SocketAddr, Vec<u8>)>,
    metrics: &SfuMetrics,
) {
    let mut i = 0;
    while i < out.len() {
        match socket.try_io(Interest::WRITABLE, || send_batch(io, &out[i..])) {
            Ok(n) => {
                metrics
                    .datagrams_sent
                    .fetch_add(n as u64, Ordering::Relaxed);
                i += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Err(e) = socket.writable().await {
                    tracing::debug!("writable: {e}");
                    break;
                }
            }
            Err(e) => {
                tracing::debug!("send to {}: {e}", out[i].0);
                metrics.send_errors.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }
    }
    out.clear();
}

pub(crate) fn room_worker(room: &str, n: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut h);
    (h.finish() % n as u64) as usize
}
