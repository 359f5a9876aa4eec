//! The node's control-plane client: one authenticated QUIC connection to each signaling
//! instance it is given (`--signaling`, repeatable), and the routing between them and
//! the workers.
//!
//! Every participant belongs to the connection that seated it (`add_participant`), or
//! that took it over (`adopt`, when its client resumed on another instance): commands
//! about it are only taken from that connection, and events about it go back only
//! there. Room-wide events (the dominant speaker) go to every connection with a
//! participant in the room. When a connection drops, its participants' media sessions
//! end; the others' go on.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use chorus_protocol::control::{auth_message, FromNode, NodeErrorCode, ToNode};
use chorus_protocol::framing::{encode, FrameDecoder};
use chorus_protocol::{CONTROL_ALPN, CONTROL_VERSION};
use hmac::{Hmac, Mac};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use sha2::Sha256;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::node::{room_worker, NodeConfig, WorkerCmd};

struct Seated {
    worker: usize,
    room: String,
    /// Index of the signaling connection that owns the participant.
    link: usize,
}

struct Routing {
    workers: Vec<mpsc::UnboundedSender<WorkerCmd>>,
    participants: HashMap<u64, Seated>,
    /// Per signaling connection: where its events go while it is up.
    links: Vec<Option<mpsc::UnboundedSender<FromNode>>>,
}

type Shared = Arc<Mutex<Routing>>;

fn lock(r: &Shared) -> MutexGuard<'_, Routing> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

fn refuse(participant: u64, code: NodeErrorCode, message: &str) -> Option<FromNode> {
    Some(FromNode::Error {
        participant,
        code,
        message: message.into(),
    })
}

impl Routing {
    /// A command from connection `link`; returns a reply for that connection.
    fn route(&mut self, cmd: ToNode, link: usize) -> Option<FromNode> {
        let participant = match &cmd {
            ToNode::AddParticipant {
                participant, room, ..
            } => {
                if self
                    .participants
                    .get(participant)
                    .is_some_and(|s| s.link != link)
                {
                    // Two instances with separate state hand out the same ids.
                    return refuse(
                        *participant,
                        NodeErrorCode::Internal,
                        "another signaling instance already seated this participant id \
                         (do your instances share one --redis?)",
                    );
                }
                let worker = room_worker(room, self.workers.len());
                self.participants.insert(
                    *participant,
                    Seated {
                        worker,
                        room: room.clone(),
                        link,
                    },
                );
                *participant
            }
            ToNode::Adopt { participant } => {
                return match self.participants.get_mut(participant) {
                    Some(s) => {
                        s.link = link;
                        None
                    }
                    None => refuse(
                        *participant,
                        NodeErrorCode::UnknownParticipant,
                        "no such participant on this node",
                    ),
                };
            }
            ToNode::ChatTo { participants, data } => {
                // Only to this connection's participants; a room lives on one worker,
                // so all its recipients do too.
                let mine: Vec<u64> = participants
                    .iter()
                    .copied()
                    .filter(|p| self.participants.get(p).is_some_and(|s| s.link == link))
                    .collect();
                let w = mine.first().and_then(|p| self.participants.get(p))?.worker;
                let _ = self.workers[w].send(WorkerCmd::Control(ToNode::ChatTo {
                    participants: mine,
                    data: data.clone(),
                }));
                return None;
            }
            ToNode::ClientOffer { participant, .. }
            | ToNode::ClientAnswer { participant, .. }
            | ToNode::ClientCandidate { participant, .. }
            | ToNode::SetMuted { participant, .. }
            | ToNode::SetEnhanced { participant, .. }
            | ToNode::SetSubscription { participant, .. }
            | ToNode::RemoveParticipant { participant } => *participant,
            ToNode::Challenge { .. } | ToNode::Welcome { .. } | ToNode::Rejected { .. } => {
                return None
            }
        };
        let Some(w) = self
            .participants
            .get(&participant)
            .filter(|s| s.link == link)
            .map(|s| s.worker)
        else {
            return refuse(
                participant,
                NodeErrorCode::UnknownParticipant,
                "no such participant on this node",
            );
        };
        if matches!(cmd, ToNode::RemoveParticipant { .. }) {
            self.participants.remove(&participant);
        }
        let _ = self.workers[w].send(WorkerCmd::Control(cmd));
        None
    }

    /// Sends a worker's event to the connection(s) it concerns.
    fn dispatch(&mut self, ev: FromNode) {
        let participant = match &ev {
            FromNode::Dominant { room, .. } => {
                let links: HashSet<usize> = self
                    .participants
                    .values()
                    .filter(|s| &s.room == room)
                    .map(|s| s.link)
                    .collect();
                for l in links {
                    if let Some(Some(tx)) = self.links.get(l) {
                        let _ = tx.send(ev.clone());
                    }
                }
                return;
            }
            FromNode::Answer { participant, .. }
            | FromNode::Offer { participant, .. }
            | FromNode::Track { participant, .. }
            | FromNode::Tracks { participant, .. }
            | FromNode::TrackQuality { participant, .. }
            | FromNode::PublishLayers { participant, .. }
            | FromNode::ReceiveStats { participant, .. }
            | FromNode::Speaking { participant, .. }
            | FromNode::ParticipantGone { participant, .. }
            | FromNode::ChatReady { participant }
            | FromNode::ChatIn { participant, .. }
            | FromNode::Error { participant, .. } => *participant,
            FromNode::Hello { .. } | FromNode::Auth { .. } | FromNode::Load { .. } => return,
        };
        let link = match self.participants.get(&participant) {
            Some(s) => s.link,
            None => return, // removed meanwhile
        };
        if matches!(ev, FromNode::ParticipantGone { .. }) {
            self.participants.remove(&participant);
        }
        if let Some(Some(tx)) = self.links.get(link) {
            let _ = tx.send(ev);
        }
    }

    fn load(&self) -> FromNode {
        let rooms: HashSet<&String> = self.participants.values().map(|s| &s.room).collect();
        FromNode::Load {
            participants: self.participants.len() as u32,
            rooms: rooms.len() as u32,
        }
    }

    /// Connection `link` went down: the instance behind it forgets its participants,
    /// so their media sessions end too.
    fn drop_link(&mut self, link: usize) {
        if let Some(slot) = self.links.get_mut(link) {
            *slot = None;
        }
        let gone: Vec<u64> = self
            .participants
            .iter()
            .filter(|(_, s)| s.link == link)
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            if let Some(s) = self.participants.remove(&p) {
                let _ =
                    self.workers[s.worker].send(WorkerCmd::Control(ToNode::RemoveParticipant {
                        participant: p,
                    }));
            }
        }
    }
}

/// Runs the control plane: a connection to each signaling address, and the router
/// from the workers' events to them.
pub(crate) async fn run(
    config: NodeConfig,
    workers: Vec<mpsc::UnboundedSender<WorkerCmd>>,
    mut events: mpsc::UnboundedReceiver<FromNode>,
    media_addrs: Vec<std::net::SocketAddr>,
) {
    let routing: Shared = Arc::new(Mutex::new(Routing {
        workers,
        participants: HashMap::new(),
        links: vec![None; config.signaling.len()],
    }));
    let config = Arc::new(config);
    let mut tasks = Vec::new();
    for (i, addr) in config.signaling.iter().enumerate() {
        tasks.push(tokio::spawn(link_loop(
            i,
            *addr,
            config.clone(),
            routing.clone(),
            media_addrs.clone(),
        )));
    }
    // Aborting `run` (the node is dropped) must end the connections too.
    struct AbortAll(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for AbortAll {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }
    let _tasks = AbortAll(tasks);
    while let Some(ev) = events.recv().await {
        lock(&routing).dispatch(ev);
    }
}

/// Keeps one signaling connection up, reconnecting with backoff.
async fn link_loop(
    link: usize,
    addr: SocketAddr,
    config: Arc<NodeConfig>,
    routing: Shared,
    media_addrs: Vec<SocketAddr>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        match session(link, addr, &config, &routing, &media_addrs).await {
            Ok(()) => {
                warn!(signaling = %addr, "control connection to signaling closed; reconnecting")
            }
            Err(e) => warn!(
                signaling = %addr,
                "control connection to signaling failed: {e:#}; retrying in {backoff:?}"
            ),
        }
        // That instance forgets this node's participants when the connection drops.
        lock(&routing).drop_link(link);
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn client_endpoint(config: &NodeConfig, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(config.control_ca_pem.as_bytes()) {
        roots.add(cert.context("parsing the control CA certificate")?)?;
    }
    if roots.is_empty() {
        anyhow::bail!("no certificate found in the control CA PEM");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(3)));
    transport.max_idle_timeout(Some(Duration::from_secs(15).try_into()?));
    client.transport_config(Arc::new(transport));
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

async fn session(
    link: usize,
    addr: SocketAddr,
    config: &NodeConfig,
    routing: &Shared,
    media_addrs: &[SocketAddr],
) -> anyhow::Result<()> {
    let ep = client_endpoint(config, addr)?;
    let conn = ep
        .connect(addr, "chorus-control")?
        .await
        .with_context(|| format!("connecting to signaling at {addr}"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode(&FromNode::Hello {
        node_id: config.node_id.clone(),
        version: CONTROL_VERSION,
        media_addrs: media_addrs.iter().map(|a| a.to_string()).collect(),
    }))
    .await?;
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];

    let welcomed = async {
        loop {
            let msg = loop {
                if let Some(m) = dec.next_frame::<ToNode>()? {
                    break m;
                }
                match recv.read(&mut buf).await? {
                    Some(n) => dec.push(&buf[..n]),
                    None => {
                        anyhow::bail!("signaling closed the control stream during the handshake")
                    }
                }
            };
            match msg {
                ToNode::Challenge { nonce, .. } => {
                    let mut mac = Hmac::<Sha256>::new_from_slice(config.node_secret.as_bytes())?;
                    mac.update(auth_message(&nonce, &config.node_id).as_bytes());
                    let mac = hex::encode(mac.finalize().into_bytes());
                    send.write_all(&encode(&FromNode::Auth { mac })).await?;
                }
                ToNode::Welcome { .. } => return Ok(()),
                ToNode::Rejected { reason } => {
                    anyhow::bail!("signaling refused this node: {reason}")
                }
                other => anyhow::bail!("unexpected message during handshake: {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), welcomed)
        .await
        .context("control handshake timed out")??;
    info!(signaling = %addr, node = %config.node_id, "registered with signaling");

    let (tx, mut events) = mpsc::unbounded_channel();
    lock(routing).links[link] = Some(tx);
    let mut load_timer = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            r = recv.read(&mut buf) => {
                match r? {
                    Some(n) => dec.push(&buf[..n]),
                    None => return Ok(()),
                }
                while let Some(cmd) = dec.next_frame::<ToNode>()? {
                    let reply = lock(routing).route(cmd, link);
                    if let Some(reply) = reply {
                        send.write_all(&encode(&reply)).await?;
                    }
                }
            }
            ev = events.recv() => {
                let Some(ev) = ev else { return Ok(()) };
                send.write_all(&encode(&ev)).await?;
            }
            _ = load_timer.tick() => {
                let load = lock(routing).load();
                send.write_all(&encode(&load)).await?;
            }
        }
    }
}
