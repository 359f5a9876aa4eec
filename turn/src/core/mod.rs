//! Sans-IO TURN server state machine.
//!
//! Inputs are bytes plus where they came from plus the current `Instant`;
//! outputs are appended to an [`Outbox`]. The core never reads the clock and
//! never touches a socket: relay sockets are obtained through the
//! [`RelayBinder`] the caller passes in, which keeps the state machine
//! testable with fake ports and lets the shell own all I/O.
//!
//! The relay hot path (ChannelData and peer datagrams) does hash lookups and a
//! copy into the reused outbox buffer only; it does not allocate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};

use crate::auth::{Credentials, KeyError};
use crate::policy::PeerPolicy;
use crate::stun::{self, attr, method, Class, ErrorCode, Integrity, Message};

#[cfg(test)]
mod tests;

/// Client-side transport of a 5-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Udp,
    Tcp,
    Tls,
}

impl Proto {
    fn is_stream(self) -> bool {
        !matches!(self, Proto::Udp)
    }
}

/// The client 5-tuple an allocation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    pub proto: Proto,
    /// Our listening address the client reached.
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Handle for a relay socket owned by the shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayId(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BindError {
    /// The relay cannot serve this address family (→ 440).
    FamilyUnsupported,
    /// No free port (→ 508).
    Exhausted,
}

/// Which relay port(s) an Allocate asks for (EVEN-PORT, RFC 8656 §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortReq {
    Any,
    Even,
    /// An even port plus the next (odd) one, reserved for a later allocation
    /// (RTP/RTCP pairs).
    EvenPair,
}

/// A bound relay port and, for [`PortReq::EvenPair`], the reserved next port.
pub type Bound = ((RelayId, SocketAddr), Option<(RelayId, SocketAddr)>);

/// Supplies relay transport addresses. The shell binds real UDP sockets;
/// tests hand out fake ones.
pub trait RelayBinder {
    fn bind(&mut self, family: Family, req: PortReq) -> Result<Bound, BindError>;
    fn release(&mut self, id: RelayId);
}

/// Where an output datagram or stream frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    Client(ClientAddr),
    Peer { relay: RelayId, peer: SocketAddr },
}

/// Output queue. The byte buffer is reused between calls: the caller drains it
/// and calls [`Outbox::clear`], so steady-state relaying allocates nothing.
#[derive(Default)]
pub struct Outbox {
    buf: Vec<u8>,
    items: Vec<(Dest, Range<usize>)>,
}

impl Outbox {
    pub fn new() -> Self {
        Outbox {
            buf: Vec::with_capacity(64 * 1024),
            items: Vec::with_capacity(64),
        }
    }
    pub fn clear(&mut self) {
        self.buf.clear();
        self.items.clear();
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn iter(&self) -> impl Iterator<Item = (Dest, &[u8])> + '_ {
        self.items
            .iter()
            .map(move |(d, r)| (*d, &self.buf[r.clone()]))
    }
    fn push_with(&mut self, dest: Dest, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        f(&mut self.buf);
        let end = self.buf.len();
        self.items.push((dest, start..end));
    }
}

/// Counters exported on `/metrics`. Atomics rather than a lock so the metrics
/// endpoint can read them while the core runs.
#[derive(Debug, Default)]
pub struct Metrics {
    pub allocations: AtomicU64,
    pub allocations_total: AtomicU64,
    pub relayed_packets: AtomicU64,
    pub relayed_bytes: AtomicU64,
    pub dropped_packets: AtomicU64,
    pub auth_failures: AtomicU64,
    pub requests: AtomicU64,
    pub error_responses: AtomicU64,
    /// Open TCP/TLS client connections (kept by the shell).
    pub stream_connections: AtomicU64,
    /// TCP/TLS connections closed at once because --max-connections were open.
    pub stream_rejected: AtomicU64,
    /// TCP/TLS connections closed for idling (see --idle-timeout).
    pub stream_idle_closed: AtomicU64,
}

fn inc(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

#[derive(Clone, Debug)]
pub struct Config {
    pub credentials: Credentials,
    pub software: String,
    pub policy: PeerPolicy,
    /// Max concurrent allocations per user (REST usernames count by their user part).
    pub user_quota: Option<usize>,
    pub total_quota: Option<usize>,
    /// Per-allocation cap in bits per second, both directions together.
    pub max_bps: Option<u64>,
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    pub nonce_lifetime: Duration,
    pub permission_lifetime: Duration,
    pub channel_lifetime: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            credentials: Credentials {
                realm: "chorus".into(),
                ..Default::default()
            },
            software: concat!("chorus-turn/", env!("CARGO_PKG_VERSION")).into(),
            policy: PeerPolicy::default(),
            user_quota: None,
            total_quota: None,
            max_bps: None,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            nonce_lifetime: Duration::from_secs(600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
        }
    }
}

struct Channel {
    peer: SocketAddr,
    expires: Instant,
}

/// Token bucket in bytes; refilled lazily from the `now` of each packet.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, n: usize, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

struct Allocation {
    relay: RelayId,
    relay_addr: SocketAddr,
    username: String,
    quota_user: String,
    expires: Instant,
    alloc_tid: [u8; 12],
    perms: HashMap<std::net::IpAddr, Instant>,
    channels: HashMap<u16, Channel>,
    peer_channels: HashMap<SocketAddr, u16>,
    bucket: Option<Bucket>,
}

impl Allocation {
    fn permitted(&self, peer: SocketAddr, now: Instant) -> bool {
        self.perms.get(&peer.ip()).is_some_and(|e| *e > now)
    }
}

/// How long a RESERVATION-TOKEN stays redeemable (RFC 8656 suggests ~30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

struct Reservation {
    relay: RelayId,
    addr: SocketAddr,
    expires: Instant,
}

/// How long to wait between housekeeping sweeps.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub struct Server {
    cfg: Config,
    metrics: Arc<Metrics>,
    nonce_key: [u8; 32],
    start: Instant,
    start_unix: u64,
    allocs: HashMap<ClientAddr, Allocation>,
    by_relay: HashMap<RelayId, ClientAddr>,
    user_counts: HashMap<String, usize>,
    reservations: HashMap<[u8; 8], Reservation>,
    reservation_counter: u64,
    next_sweep: Instant,
}

/// Result of authenticating a request: the key and which MAC to answer with.
struct Authed<'m> {
    username: &'m str,
    key: [u8; 16],
    integrity: Integrity,
}

impl Server {
    /// `now`/`now_unix` anchor the monotonic clock to wall time (REST usernames
    /// carry Unix expiry times); `nonce_key` must be random.
    pub fn new(cfg: Config, now: Instant, now_unix: u64, nonce_key: [u8; 32]) -> Self {
        Server {
            cfg,
            metrics: Arc::new(Metrics::default()),
            nonce_key,
            start: now,
            start_unix: now_unix,
            allocs: HashMap::new(),
            by_relay: HashMap::new(),
            user_counts: HashMap::new(),
            reservations: HashMap::new(),
            reservation_counter: 0,
            next_sweep: now + SWEEP_INTERVAL,
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn allocation_count(&self) -> usize {
        self.allocs.len()
    }

    fn unix(&self, now: Instant) -> u64 {
        self.start_unix + now.saturating_duration_since(self.start).as_secs()
    }

    /// When [`Server::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Instant {
        self.next_sweep
    }

    /// Expires allocations, permissions and channels.
    pub fn handle_timeout(&mut self, now: Instant, io: &mut dyn RelayBinder) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        let expired: Vec<ClientAddr> = self
            .allocs
            .iter()
            .filter(|(_, a)| a.expires <= now)
            .map(|(c, _)| *c)
            .collect();
        for c in expired {
            self.delete_allocation(&c, io);
        }
        self.reservations.retain(|_, r| {
            let keep = r.expires > now;
            if !keep {
                io.release(r.relay);
            }
            keep
        });
        for a in self.allocs.values_mut() {
            a.perms.retain(|_, e| *e > now);
            let mut gone = Vec::new();
            a.channels.retain(|n, ch| {
                let keep = ch.expires > now;
                if !keep {
                    gone.push(ch.peer);
                }
                let _ = n;
                keep
            });
            for p in gone {
                a.peer_channels.remove(&p);
            }
        }
    }

    /// A stream client went away: its allocation goes with it (RFC 8656 §3.1).
    pub fn client_closed(&mut self, client: ClientAddr, io: &mut dyn RelayBinder) {
        self.delete_allocation(&client, io);
    }

    fn delete_allocation(&mut self, client: &ClientAddr, io: &mut dyn RelayBinder) {
        if let Some(a) = self.allocs.remove(client) {
            self.by_relay.remove(&a.relay);
            io.release(a.relay);
            if let Some(n) = self.user_counts.get_mut(&a.quota_user) {
                *n -= 1;
                if *n == 0 {
                    self.user_counts.remove(&a.quota_user);
                }
            }
            self.metrics.allocations.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// One datagram (UDP) or one complete frame (TCP/TLS, see
    /// [`stun::stream_frame_len`]) from a client.
    pub fn handle_client(
        &mut self,
        client: ClientAddr,
        data: &[u8],
        now: Instant,
        io: &mut dyn RelayBinder,
        out: &mut Outbox,
    ) {
        if stun::is_channel_data(data) {
            self.client_channel_data(client, data, now, out);
            return;
        }
        let Ok(msg) = Message::parse(data) else {
            // Unparseable input is dropped silently: answering would let
            // spoofed sources use us as a reflector.
            return;
        };
        if msg.verify_fingerprint() == Some(false) {
            return;
        }
        match msg.class {
            Class::Request => {
                inc(&self.metrics.requests, 1);
                self.handle_request(client, &msg, now, io, out)
            }
            Class::Indication if msg.method == method::SEND => {
                self.send_indication(client, &msg, now, out)
            }
            _ => {}
        }
    }

    fn client_channel_data(
        &mut self,
        client: ClientAddr,
        data: &[u8],
        now: Instant,
        out: &mut Outbox,
    ) {
        if data.len() < 4 {
            return;
        }
        let num = u16::from_be_bytes([data[0], data[1]]);
        let len = u16::from_be_bytes([data[2], data[3]]) as usize;
        let Some(payload) = data.get(4..4 + len) else {
            return;
        };
        let Some(a) = self.allocs.get_mut(&client) else {
            return;
        };
        let Some(ch) = a.channels.get(&num) else {
            inc(&self.metrics.dropped_packets, 1);
            return;
        };
        if ch.expires <= now {
            inc(&self.metrics.dropped_packets, 1);
            return;
        }
        let peer = ch.peer;
        if let Some(b) = a.bucket.as_mut() {
            if !b.take(payload.len(), now) {
                inc(&self.metrics.dropped_packets, 1);
                return;
            }
        }
        let relay = a.relay;
        out.push_with(Dest::Peer { relay, peer }, |b| b.extend_from_slice(payload));
        inc(&self.metrics.relayed_packets, 1);
        inc(&self.metrics.relayed_bytes, payload.len() as u64);
    }

    fn send_indication(
        &mut self,
        client: ClientAddr,
        msg: &Message,
        now: Instant,
        out: &mut Outbox,
    ) {
        let Some(a) = self.allocs.get_mut(&client) else {
            return;
        };
        let (Ok(Some(peer)), Some(data)) = (
            msg.get_xor_addr(attr::XOR_PEER_ADDRESS),
            msg.get(attr::DATA),
        ) else {
            return;
        };
        if !a.permitted(peer, now) {
            inc(&self.metrics.dropped_packets, 1);
            return;
        }
        if let Some(b) = a.bucket.as_mut() {
            if !b.take(data.len(), now) {
                inc(&self.metrics.dropped_packets, 1);
                return;
            }
        }
        let relay = a.relay;
        out.push_with(Dest::Peer { relay, peer }, |b| b.extend_from_slice(data));
        inc(&self.metrics.relayed_packets, 1);
        inc(&self.metrics.relayed_bytes, data.len() as u64);
    }

    /// A datagram arrived on a relay socket from `peer`.
    pub fn handle_peer(
        &mut self,
        relay: RelayId,
        peer: SocketAddr,
        data: &[u8],
        now: Instant,
        out: &mut Outbox,
    ) {
        let Some(client) = self.by_relay.get(&relay).copied() else {
            return;
        };
        let Some(a) = self.allocs.get_mut(&client) else {
            return;
        };
        // Only peers the client opened a permission for may reach it (RFC 8656 §9).
        if !a.permitted(peer, now) || data.len() > 65535 - 36 {
            inc(&self.metrics.dropped_packets, 1);
            return;
        }
        if let Some(b) = a.bucket.as_mut() {
            if !b.take(data.len(), now) {
                inc(&self.metrics.dropped_packets, 1);
                return;
            }
        }
        let chan = a
            .peer_channels
            .get(&peer)
            .copied()
            .filter(|n| a.channels.get(n).is_some_and(|c| c.expires > now));
        let stream = client.proto.is_stream();
        match chan {
            Some(num) => out.push_with(Dest::Client(client), |b| {
                b.extend_from_slice(&num.to_be_bytes());
                b.extend_from_slice(&(data.len() as u16).to_be_bytes());
                b.extend_from_slice(data);
                // Streams need ChannelData padded to 4 bytes (RFC 8656 §12.5).
                if stream {
                    let pad = (4 - data.len() % 4) % 4;
                    b.extend_from_slice(&[0u8; 3][..pad]);
                }
            }),
            None => {
                // Transaction IDs of indications only need to be unique-ish;
                // derive one from a counter instead of calling an RNG per packet.
                let n = self.metrics.relayed_packets.load(Ordering::Relaxed);
                let mut tid = [0u8; 12];
                tid[..8].copy_from_slice(&n.to_be_bytes());
                tid[8..].copy_from_slice(&(relay.0 as u32).to_be_bytes());
                out.push_with(Dest::Client(client), |b| {
                    let mut w = stun::Writer::new(b, method::DATA, Class::Indication, &tid);
                    w.xor_addr(attr::XOR_PEER_ADDRESS, peer);
                    w.attr(attr::DATA, data);
                })
            }
        }
        inc(&self.metrics.relayed_packets, 1);
        inc(&self.metrics.relayed_bytes, data.len() as u64);
    }

    // ---- nonces -------------------------------------------------------------

    /// Stateless nonce: hex(expiry seconds since start) + truncated HMAC, so
    /// nothing is stored per client and expiry is checkable (→ 438).
    fn make_nonce(&self, now: Instant) -> String {
        let exp = (now.saturating_duration_since(self.start) + self.cfg.nonce_lifetime).as_secs();
        let tag = self.nonce_tag(exp);
        format!("{exp:016x}{}", hex::encode(tag))
    }

    fn nonce_tag(&self, exp: u64) -> [u8; 8] {
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.nonce_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(&exp.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; 8];
        t.copy_from_slice(&full[..8]);
        t
    }

    /// `Some(true)` valid, `Some(false)` ours but expired, `None` not ours.
    fn check_nonce(&self, nonce: &str, now: Instant) -> Option<bool> {
        if nonce.len() != 32 {
            return None;
        }
        let exp = u64::from_str_radix(nonce.get(..16)?, 16).ok()?;
        let mut tag = [0u8; 8];
        hex::decode_to_slice(nonce.get(16..)?, &mut tag).ok()?;
        if tag != self.nonce_tag(exp) {
            return None;
        }
        Some(now.saturating_duration_since(self.start).as_secs() < exp)
    }

    // ---- requests -----------------------------------------------------------

    fn handle_request(
        &mut self,
        client: ClientAddr,
        msg: &Message,
        now: Instant,
        io: &mut dyn RelayBinder,
        out: &mut Outbox,
    ) {
        if msg.method == method::BINDING {
            out.push_with(Dest::Client(client), |b| {
                let mut w = stun::Writer::new(b, method::BINDING, Class::Success, &msg.tid);
                w.xor_addr(attr::XOR_MAPPED_ADDRESS, client.remote);
                w.attr(attr::SOFTWARE, self.cfg.software.as_bytes());
                w.fingerprint();
            });
            return;
        }
        let known = matches!(
            msg.method,
            method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND
        );
        if !known {
            self.error(client, msg, ErrorCode::BadRequest, None, out);
            return;
        }
        // Comprehension-required attributes we do not understand → 420.
        let mut unknown = [0u8; 16];
        let mut n_unknown = 0;
        for t in msg.attr_types() {
            if t < 0x8000 && !understood(t) && n_unknown < 8 {
                unknown[n_unknown * 2..n_unknown * 2 + 2].copy_from_slice(&t.to_be_bytes());
                n_unknown += 1;
            }
        }
        if n_unknown > 0 {
            out.push_with(Dest::Client(client), |b| {
                let mut w = stun::Writer::new(b, msg.method, Class::Error, &msg.tid);
                w.error(ErrorCode::UnknownAttribute);
                w.attr(attr::UNKNOWN_ATTRIBUTES, &unknown[..n_unknown * 2]);
                w.fingerprint();
            });
            inc(&self.metrics.error_responses, 1);
            return;
        }
        let Some(auth) = self.authenticate(client, msg, now, out) else {
            return;
        };
        if let Some(a) = self.allocs.get(&client) {
            if a.username != auth.username {
                self.error(client, msg, ErrorCode::WrongCredentials, Some(&auth), out);
                return;
            }
        }
        let res = match msg.method {
            method::ALLOCATE => self.allocate(client, msg, &auth, now, io),
            method::REFRESH => self.refresh(client, msg, now, io),
            method::CREATE_PERMISSION => self.create_permission(client, msg, now),
            _ => self.channel_bind(client, msg, now),
        };
        match res {
            Err(code) => self.error(client, msg, code, Some(&auth), out),
            Ok(reply) => out.push_with(Dest::Client(client), |b| {
                let mut w = stun::Writer::new(b, msg.method, Class::Success, &msg.tid);
                if let Some(relayed) = reply.relayed {
                    w.xor_addr(attr::XOR_RELAYED_ADDRESS, relayed);
                    w.xor_addr(attr::XOR_MAPPED_ADDRESS, client.remote);
                }
                if let Some(l) = reply.lifetime {
                    w.u32(attr::LIFETIME, l);
                }
                if let Some(t) = reply.token {
                    w.attr(attr::RESERVATION_TOKEN, &t);
                }
                if msg.method == method::ALLOCATE {
                    w.attr(attr::SOFTWARE, self.cfg.software.as_bytes());
                }
                sign(&mut w, &auth);
            }),
        }
    }

    /// Long-term credential check (RFC 8489 §9.2.4). Sends the error itself
    /// and returns `None` when the request must not proceed.
    fn authenticate<'m>(
        &mut self,
        client: ClientAddr,
        msg: &Message<'m>,
        now: Instant,
        out: &mut Outbox,
    ) -> Option<Authed<'m>> {
        let Some(integrity) = msg.integrity_kind() else {
            self.challenge(client, msg, ErrorCode::Unauthorized, now, out);
            return None;
        };
        let (Ok(Some(username)), Ok(Some(realm)), Ok(Some(nonce))) = (
            msg.get_str(attr::USERNAME),
            msg.get_str(attr::REALM),
            msg.get_str(attr::NONCE),
        ) else {
            self.error(client, msg, ErrorCode::BadRequest, None, out);
            return None;
        };
        match self.check_nonce(nonce, now) {
            Some(true) => {}
            Some(false) => {
                self.challenge(client, msg, ErrorCode::StaleNonce, now, out);
                return None;
            }
            None => {
                // A nonce we never issued (e.g. from before a restart) is
                // treated as stale so the client retries with a fresh one.
                self.challenge(client, msg, ErrorCode::StaleNonce, now, out);
                return None;
            }
        }
        let key = match self.cfg.credentials.key_for(username, self.unix(now)) {
            Ok(k) if realm == self.cfg.credentials.realm && msg.verify_integrity(&k) => k,
            Ok(_) | Err(KeyError::Unknown) | Err(KeyError::Expired) => {
                inc(&self.metrics.auth_failures, 1);
                self.challenge(client, msg, ErrorCode::Unauthorized, now, out);
                return None;
            }
        };
        Some(Authed {
            username,
            key,
            integrity,
        })
    }

    /// 401 / 438 carrying REALM and a fresh NONCE.
    fn challenge(
        &self,
        client: ClientAddr,
        msg: &Message,
        code: ErrorCode,
        now: Instant,
        out: &mut Outbox,
    ) {
        let nonce = self.make_nonce(now);
        inc(&self.metrics.error_responses, 1);
        out.push_with(Dest::Client(client), |b| {
            let mut w = stun::Writer::new(b, msg.method, Class::Error, &msg.tid);
            w.error(code);
            w.attr(attr::REALM, self.cfg.credentials.realm.as_bytes());
            w.attr(attr::NONCE, nonce.as_bytes());
            w.attr(attr::SOFTWARE, self.cfg.software.as_bytes());
            w.fingerprint();
        });
    }

    fn error(
        &self,
        client: ClientAddr,
        msg: &Message,
        code: ErrorCode,
        auth: Option<&Authed>,
        out: &mut Outbox,
    ) {
        inc(&self.metrics.error_responses, 1);
        out.push_with(Dest::Client(client), |b| {
            let mut w = stun::Writer::new(b, msg.method, Class::Error, &msg.tid);
            w.error(code);
            match auth {
                Some(a) => sign(&mut w, a),
                None => {
                    w.fingerprint();
                }
            }
        });
    }

    fn clamp_lifetime(&self, msg: &Message) -> Result<Duration, ErrorCode> {
        let req = msg
            .get_u32(attr::LIFETIME)
            .map_err(|_| ErrorCode::BadRequest)?;
        let d = req.map_or(self.cfg.default_lifetime, |s| Duration::from_secs(s as u64));
        Ok(d.min(self.cfg.max_lifetime))
    }

    fn allocate(
        &mut self,
        client: ClientAddr,
        msg: &Message,
        auth: &Authed,
        now: Instant,
        io: &mut dyn RelayBinder,
    ) -> Result<Reply, ErrorCode> {
        if let Some(a) = self.allocs.get(&client) {
            // A retransmitted Allocate gets the original answer (RFC 8656 §7.2).
            if a.alloc_tid == msg.tid {
                let left = a.expires.saturating_duration_since(now).as_secs() as u32;
                return Ok(Reply {
                    relayed: Some(a.relay_addr),
                    lifetime: Some(left),
                    token: None,
                });
            }
            return Err(ErrorCode::AllocationMismatch);
        }
        match msg.get(attr::REQUESTED_TRANSPORT) {
            None => return Err(ErrorCode::BadRequest),
            Some(v) if v.len() != 4 => return Err(ErrorCode::BadRequest),
            Some(v) if v[0] != 17 => return Err(ErrorCode::UnsupportedTransport),
            Some(_) => {}
        }
        let family = match msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None => Family::V4,
            Some(v) if v.len() == 4 && v[0] == 0x01 => Family::V4,
            Some(v) if v.len() == 4 && v[0] == 0x02 => Family::V6,
            Some(v) if v.len() == 4 => return Err(ErrorCode::AddressFamilyNotSupported),
            Some(_) => return Err(ErrorCode::BadRequest),
        };
        if msg.has(attr::RESERVATION_TOKEN)
            && (msg.has(attr::EVEN_PORT) || msg.has(attr::REQUESTED_ADDRESS_FAMILY))
        {
            return Err(ErrorCode::BadRequest);
        }
        let port_req = match msg.get(attr::EVEN_PORT) {
            None => PortReq::Any,
            Some([b, ..]) if b & 0x80 != 0 => PortReq::EvenPair,
            Some([_, ..]) => PortReq::Even,
            Some([]) => return Err(ErrorCode::BadRequest),
        };
        let token: Option<[u8; 8]> = match msg.get(attr::RESERVATION_TOKEN) {
            None => None,
            Some(v) => Some(v.try_into().map_err(|_| ErrorCode::BadRequest)?),
        };
        let lifetime = self.clamp_lifetime(msg)?;
        let quota_user = quota_user(auth.username).to_string();
        if let Some(q) = self.cfg.total_quota {
            if self.allocs.len() >= q {
                return Err(ErrorCode::AllocationQuotaReached);
            }
        }
        if let Some(q) = self.cfg.user_quota {
            if self.user_counts.get(&quota_user).copied().unwrap_or(0) >= q {
                return Err(ErrorCode::AllocationQuotaReached);
            }
        }
        let mut new_token = None;
        let (relay, relay_addr) = match token {
            Some(t) => {
                // Unknown or expired tokens: the reserved port is gone (→ 508).
                let r = self
                    .reservations
                    .remove(&t)
                    .filter(|r| r.expires > now)
                    .ok_or(ErrorCode::InsufficientCapacity)?;
                (r.relay, r.addr)
            }
            None => {
                let (main, reserved) = io.bind(family, port_req).map_err(|e| match e {
                    BindError::FamilyUnsupported => ErrorCode::AddressFamilyNotSupported,
                    BindError::Exhausted => ErrorCode::InsufficientCapacity,
                })?;
                if let Some((rid, raddr)) = reserved {
                    let t = self.reservation_token();
                    self.reservations.insert(
                        t,
                        Reservation {
                            relay: rid,
                            addr: raddr,
                            expires: now + RESERVATION_LIFETIME,
                        },
                    );
                    new_token = Some(t);
                }
                main
            }
        };
        let bucket = self.cfg.max_bps.map(|bps| {
            let rate = bps as f64 / 8.0;
            Bucket {
                rate,
                // One second of burst, but at least a few full-size datagrams.
                burst: rate.max(3.0 * 1500.0),
                tokens: rate.max(3.0 * 1500.0),
                last: now,
            }
        });
        *self.user_counts.entry(quota_user.clone()).or_insert(0) += 1;
        self.by_relay.insert(relay, client);
        self.allocs.insert(
            client,
            Allocation {
                relay,
                relay_addr,
                username: auth.username.to_string(),
                quota_user,
                expires: now + lifetime,
                alloc_tid: msg.tid,
                perms: HashMap::new(),
                channels: HashMap::new(),
                peer_channels: HashMap::new(),
                bucket,
            },
        );
        inc(&self.metrics.allocations, 1);
        inc(&self.metrics.allocations_total, 1);
        Ok(Reply {
            relayed: Some(relay_addr),
            lifetime: Some(lifetime.as_secs() as u32),
            token: new_token,
        })
    }

    /// Unguessable token: a MAC over a counter, so tokens cannot be forged
    /// to grab someone else's reserved port.
    fn reservation_token(&mut self) -> [u8; 8] {
        self.reservation_counter += 1;
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.nonce_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"reservation");
        mac.update(&self.reservation_counter.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; 8];
        t.copy_from_slice(&full[..8]);
        t
    }

    fn refresh(
        &mut self,
        client: ClientAddr,
        msg: &Message,
        now: Instant,
        io: &mut dyn RelayBinder,
    ) -> Result<Reply, ErrorCode> {
        let lifetime = self.clamp_lifetime(msg)?;
        let Some(a) = self.allocs.get_mut(&client) else {
            return Err(ErrorCode::AllocationMismatch);
        };
        if let Some(v) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let fam_ok = v.len() == 4 && (v[0] == 0x01) == a.relay_addr.is_ipv4();
            if !fam_ok {
                return Err(ErrorCode::PeerAddressFamilyMismatch);
            }
        }
        if lifetime.is_zero() {
            self.delete_allocation(&client, io);
        } else {
            a.expires = now + lifetime;
        }
        Ok(Reply {
            relayed: None,
            lifetime: Some(lifetime.as_secs() as u32),
            token: None,
        })
    }

    /// Validates a peer address against the allocation's family and the policy.
    fn check_peer(
        &self,
        a: &Allocation,
        v: &[u8],
        tid: &[u8; 12],
    ) -> Result<SocketAddr, ErrorCode> {
        let peer = stun::decode_xor_addr(v, tid).map_err(|_| ErrorCode::BadRequest)?;
        if peer.is_ipv4() != a.relay_addr.is_ipv4() {
            return Err(ErrorCode::PeerAddressFamilyMismatch);
        }
        if !self.cfg.policy.permits(peer.ip()) {
            return Err(ErrorCode::Forbidden);
        }
        Ok(peer)
    }

    fn create_permission(
        &mut self,
        client: ClientAddr,
        msg: &Message,
        now: Instant,
    ) -> Result<Reply, ErrorCode> {
        let a = self
            .allocs
            .get(&client)
            .ok_or(ErrorCode::AllocationMismatch)?;
        let mut peers = [None; 8];
        let mut n = 0;
        for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
            if n == peers.len() {
                return Err(ErrorCode::BadRequest);
            }
            peers[n] = Some(self.check_peer(a, v, &msg.tid)?);
            n += 1;
        }
        if n == 0 {
            return Err(ErrorCode::BadRequest);
        }
        let exp = now + self.cfg.permission_lifetime;
        let a = self
            .allocs
            .get_mut(&client)
            .ok_or(ErrorCode::AllocationMismatch)?;
        for p in peers.iter().flatten() {
            a.perms.insert(p.ip(), exp);
        }
        Ok(Reply::default())
    }

    fn channel_bind(
        &mut self,
        client: ClientAddr,
        msg: &Message,
        now: Instant,
    ) -> Result<Reply, ErrorCode> {
        let a = self
            .allocs
            .get(&client)
            .ok_or(ErrorCode::AllocationMismatch)?;
        let num = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return Err(ErrorCode::BadRequest),
        };
        // RFC 8656 narrowed channels to 0x4000-0x4FFF, but RFC 5766 clients
        // (coturn's among them) use up to 0x7FFF, so accept the old range.
        if !(0x4000..=0x7FFF).contains(&num) {
            return Err(ErrorCode::BadRequest);
        }
        let v = msg
            .get(attr::XOR_PEER_ADDRESS)
            .ok_or(ErrorCode::BadRequest)?;
        let peer = self.check_peer(a, v, &msg.tid)?;
        // A channel maps to exactly one peer and vice versa while bound.
        if let Some(ch) = a.channels.get(&num) {
            if ch.peer != peer && ch.expires > now {
                return Err(ErrorCode::BadRequest);
            }
        }
        if let Some(n) = a.peer_channels.get(&peer) {
            if *n != num && a.channels.get(n).is_some_and(|c| c.expires > now) {
                return Err(ErrorCode::BadRequest);
            }
        }
        let a = self
            .allocs
            .get_mut(&client)
            .ok_or(ErrorCode::AllocationMismatch)?;
        if let Some(old) = a.channels.insert(
            num,
            Channel {
                peer,
                expires: now + self.cfg.channel_lifetime,
            },
        ) {
            if old.peer != peer {
                a.peer_channels.remove(&old.peer);
            }
        }
        if let Some(old) = a.peer_channels.insert(peer, num) {
            if old != num {
                a.channels.remove(&old);
            }
        }
        let perm_exp = now + self.cfg.permission_lifetime;
        let e = a.perms.entry(peer.ip()).or_insert(perm_exp);
        *e = (*e).max(perm_exp);
        Ok(Reply::default())
    }

    /// The relayed address of `client`'s allocation, if it has one.
    pub fn allocation_relay(&self, client: &ClientAddr) -> Option<SocketAddr> {
        self.allocs.get(client).map(|a| a.relay_addr)
    }
}

#[derive(Default)]
struct Reply {
    relayed: Option<SocketAddr>,
    lifetime: Option<u32>,
    token: Option<[u8; 8]>,
}

fn sign(w: &mut stun::Writer, auth: &Authed) {
    match auth.integrity {
        Integrity::Sha1 => w.integrity(&auth.key),
        Integrity::Sha256 => w.integrity_sha256(&auth.key),
    };
    w.fingerprint();
}

/// REST usernames are `expiry:user`; quotas apply to the user, not the token.
fn quota_user(username: &str) -> &str {
    match username.split_once(':') {
        Some((ts, user)) if ts.bytes().all(|b| b.is_ascii_digit()) && !ts.is_empty() => user,
        _ => username,
    }
}

fn understood(t: u16) -> bool {
    matches!(
        t,
        attr::USERNAME
            | attr::MESSAGE_INTEGRITY
            | attr::MESSAGE_INTEGRITY_SHA256
            | attr::CHANNEL_NUMBER
            | attr::LIFETIME
            | attr::XOR_PEER_ADDRESS
            | attr::DATA
            | attr::REALM
            | attr::NONCE
            | attr::REQUESTED_ADDRESS_FAMILY
            | attr::EVEN_PORT
            | attr::REQUESTED_TRANSPORT
            // We accept DONT-FRAGMENT but cannot set DF per packet on the
            // relay socket; the kernel default (PMTU discovery) applies.
            | attr::DONT_FRAGMENT
            | attr::RESERVATION_TOKEN
            | attr::PASSWORD_ALGORITHM
            | attr::USERHASH
            | attr::PRIORITY
            | attr::USE_CANDIDATE
    )
}
