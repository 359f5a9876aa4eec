//! Floor CPU cost per forwarded packet of a TURN-shaped UDP relay, on loopback.
//!
//! # What it measures
//!
//! `fwd` is a forwarder with the socket layout of a TURN server relaying
//! client-to-client traffic (`turnutils_uclient -y`), but with no TURN logic at all:
//! one listener socket L (the server's listening port) and one relay socket R_k per
//! client (the client's allocation). A message from client k travels
//!
//! ```text
//! client k -> L  ==>  R_k -> R_(k^1)  ==>  L -> client k^1
//! ```
//!
//! so the forwarder receives and sends twice per message: 2 forwarded packets, exactly
//! what a TURN server does for a ChannelData message between two of its own clients.
//! The forwarder strips / adds the 4-byte ChannelData header and nothing else.
//!
//! `load` runs the clients in a second process: every tick each client sends one
//! 174-byte datagram (4-byte header + 170-byte payload, the `benches/turn/run.sh`
//! message length) to L and counts what comes back.
//!
//! When traffic stops the forwarder prints its CPU time (user + kernel, from
//! `getrusage`) divided by the number of forwarded packets. That is the *floor*: the cost
//! a relay pays per packet for the kernel UDP socket work and process wake-ups alone,
//! whatever its own code does. If the floor is already close to what coturn spends per
//! relayed packet, then "at most half of coturn's CPU per relayed packet" cannot be
//! reached with kernel UDP sockets on this machine, however lean the relay code.
//!
//! `self` is the reference with no wake-ups: one process sends datagrams to its own
//! socket and reads them back, one at a time (`sendto` + `recvfrom`) and in batches of
//! 32 (`sendmmsg` + `recvmmsg`). The gap between `self` and the `fwd` variants is what
//! waking another process (and being woken) costs per packet.
//!
//! # Variants of the forwarder
//!
//! - `a`: `recvfrom` / `sendto` on every socket.
//! - `b`: like `a`, but `recvmmsg` on L and `sendmmsg` on L (batches of up to 32).
//! - `c`: like `a`, but each R_k is `connect`ed to its peer R_(k^1) (`recv` / `send`).
//! - `d`: `b` + `c`.
//! - `e`: `d` + one socket per client bound to L's port and `connect`ed to that client
//!   (`SO_REUSEADDR`, the coturn layout); replies go out with `send` on it.
//!
//! # Reading the output
//!
//! `fwd` prints one line of `key=value` pairs: `pkts` forwarded, `pkt_per_s`,
//! `user_us` / `kernel_us` / `total_us` CPU microseconds per forwarded packet, and
//! `recv_calls` / `send_calls` / `epoll_waits` per forwarded packet (how well batching
//! worked). `load` prints `sent`, `got` (messages that made the round trip) and
//! `loss_pct`. `self` prints the same per-packet CPU keys, where one packet is one send
//! plus one receive, like one forwarded packet. Compare `total_us` with the
//! `cpu_per_relayed_pkt` of `benches/turn/run.sh` at the same packet rate.
//! `benches/turn/floor/run.sh` runs everything and prints a table.
//!
//! # Ports
//!
//! Fixed loopback ports, from `FLOOR_BASE_PORT` (default 39000): L = base,
//! R_k = base + 100 + k, client k = base + 300 + k (so at most 100 clients and
//! base .. base + 399 must be free). Run it in a private network namespace:
//! `unshare -n sh -c 'ip link set lo up && ...'`.

use std::mem::{size_of, zeroed};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Datagrams per `recvmmsg` / `sendmmsg` call.
const BATCH: usize = 32;
/// Receive buffer size.
const BUF: usize = 2048;
/// 4-byte ChannelData header + 170-byte payload.
const MSG_LEN: usize = 174;
const CHANNEL_HEADER: usize = 4;
const MAX_CLIENTS: usize = 100;
const DEFAULT_BASE_PORT: u16 = 39000;
/// Socket buffer size asked for (the kernel caps it at net.core.[rw]mem_max).
const SOCK_BUF_BYTES: libc::c_int = 4 << 20;
/// epoll tag of the listener; per-client listener sockets are `PER_CLIENT + k`,
/// relay sockets are `k`.
const LISTENER: u64 = u64::MAX;
const PER_CLIENT: u64 = 1 << 32;
/// The forwarder stops this long after the last packet.
const IDLE_END: Duration = Duration::from_secs(1);
/// ... and gives up if no packet arrives this long after start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

const SOCKADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;

const USAGE: &str = "\
chorus-turn-floor: floor CPU cost per forwarded packet of a TURN-shaped UDP relay
on loopback (kernel UDP sockets, no TURN logic). See the doc comment in src/main.rs.

USAGE:
  chorus-turn-floor fwd <variant> <clients>
      Forwarder: listener + one relay socket per client; client k -> listener ->
      relay k -> relay k^1 -> listener -> client k^1 (2 forwarded packets per
      message). Waits for traffic, stops 1 s after it ends, prints CPU per
      forwarded packet.
  chorus-turn-floor load <clients> <tick_us> <secs>
      Clients (start after fwd): every <tick_us> each client sends one 174-byte
      datagram to the listener, for <secs> seconds; prints sent / got / loss.
  chorus-turn-floor self [packets]
      No-wake-up reference: one process sends to its own socket and reads it back,
      one at a time and in batches of 32 (default 500000 packets each).
  chorus-turn-floor --help

VARIANTS (fwd):
  a  recvfrom/sendto everywhere
  b  a + recvmmsg/sendmmsg on the listener
  c  a + relay sockets connected to their peer (recv/send)
  d  b + c
  e  d + per-client sockets on the listener port connected to each client (coturn style)

<clients> must be even (clients are paired k <-> k^1) and at most 100.

ENVIRONMENT:
  FLOOR_BASE_PORT  first port (default 39000). Uses base (listener), base+100+k
                   (relays), base+300+k (clients) on 127.0.0.1. Run inside a private
                   network namespace:  unshare -n sh -c 'ip link set lo up && ...'

EXAMPLE (what benches/turn/floor/run.sh does per variant):
  chorus-turn-floor fwd d 50 & sleep 0.5; chorus-turn-floor load 50 6600 8; wait
";

type Result<T> = std::result::Result<T, String>;

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

#[derive(Clone, Copy)]
struct Ports {
    base: u16,
    clients: usize,
}

impl Ports {
    fn from_env(clients: usize) -> Result<Self> {
        let base = match std::env::var("FLOOR_BASE_PORT") {
            Ok(s) => s
                .parse::<u16>()
                .ok()
                .filter(|b| (1024..=u16::MAX - 400).contains(b))
                .ok_or_else(|| format!("FLOOR_BASE_PORT={s:?}: want a port in 1024..=65135"))?,
            Err(_) => DEFAULT_BASE_PORT,
        };
        Ok(Ports { base, clients })
    }
    fn listener(&self) -> u16 {
        self.base
    }
    fn relay(&self, k: usize) -> u16 {
        self.base + 100 + k as u16
    }
    fn client(&self, k: usize) -> u16 {
        self.base + 300 + k as u16
    }
    fn client_index(&self, port: u16) -> Option<usize> {
        let k = port.checked_sub(self.client(0))? as usize;
        (k < self.clients).then_some(k)
    }
}

fn sockaddr(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn set_int_opt(fd: i32, level: i32, name: i32, value: libc::c_int) -> Result<()> {
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` is a live c_int and `len` is its size.
    let rc =
        unsafe { libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), len) };
    if rc != 0 {
        return Err(format!("setsockopt({level}, {name}): {}", last_err()));
    }
    Ok(())
}

/// Non-blocking UDP socket bound to 127.0.0.1:`port`.
fn udp_socket(port: u16, reuse_addr: bool, role: &str) -> Result<i32> {
    // SAFETY: plain syscall, no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(format!("socket(): {}", last_err()));
    }
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCK_BUF_BYTES)?;
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCK_BUF_BYTES)?;
    if reuse_addr {
        set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    let addr = sockaddr(port);
    // SAFETY: `addr` is a valid sockaddr_in of length SOCKADDR_LEN.
    let rc = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), SOCKADDR_LEN) };
    if rc != 0 {
        return Err(format!(
            "cannot bind 127.0.0.1:{port} ({role}): {}. This benchmark uses fixed loopback \
             ports FLOOR_BASE_PORT..+399 (default 39000..39399): run it in a private network \
             namespace (unshare -n sh -c 'ip link set lo up && ...'), set FLOOR_BASE_PORT to \
             a free range, or stop the other run still holding the ports.",
            last_err()
        ));
    }
    Ok(fd)
}

fn connect(fd: i32, port: u16) -> Result<()> {
    let addr = sockaddr(port);
    // SAFETY: `addr` is a valid sockaddr_in of length SOCKADDR_LEN.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_in).cast(), SOCKADDR_LEN) };
    if rc != 0 {
        return Err(format!("connect to 127.0.0.1:{port}: {}", last_err()));
    }
    Ok(())
}

fn epoll_create() -> Result<i32> {
    // SAFETY: plain syscall, no pointers.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(format!("epoll_create1: {}", last_err()));
    }
    Ok(ep)
}

fn epoll_add(ep: i32, fd: i32, tag: u64) -> Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: tag,
    };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    if rc != 0 {
        return Err(format!("epoll_ctl(ADD): {}", last_err()));
    }
    Ok(())
}

/// Waits for events; returns how many of `evs` were filled (0 on timeout or EINTR).
fn epoll_wait(ep: i32, evs: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
    // SAFETY: `evs` is writable for `evs.len()` events.
    let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, timeout_ms) };
    n.max(0) as usize
}

fn empty_events() -> [libc::epoll_event; 128] {
    [libc::epoll_event { events: 0, u64: 0 }; 128]
}

/// (user, kernel) CPU seconds of this process so far.
fn cpu_times() -> (f64, f64) {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut r: libc::rusage = unsafe { zeroed() };
    // SAFETY: `r` is a writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    (secs(r.ru_utime), secs(r.ru_stime))
}

fn send_to(fd: i32, data: &[u8], port: u16) -> bool {
    let addr = sockaddr(port);
    // SAFETY: `data` and `addr` are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            SOCKADDR_LEN,
        )
    };
    n >= 0
}

fn send(fd: i32, data: &[u8]) -> bool {
    // SAFETY: `data` is valid for `data.len()` bytes.
    unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), 0) >= 0 }
}

/// One datagram: (length, source port), or None when the socket is drained.
fn recv_from(fd: i32, buf: &mut [u8]) -> Option<(usize, u16)> {
    let mut addr = sockaddr(0);
    let mut len = SOCKADDR_LEN;
    // SAFETY: `buf` and `addr` are writable for the lengths passed.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    (n >= 0).then(|| (n as usize, u16::from_be(addr.sin_port)))
}

fn recv(fd: i32, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `buf` is writable for `buf.len()` bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    (n >= 0).then_some(n as usize)
}

/// Buffers and headers for one `recvmmsg` or `sendmmsg` of up to BATCH datagrams.
/// The header pointers are (re)set right before each call, so the struct may move.
struct MmsgBatch {
    bufs: Vec<[u8; BUF]>,
    lens: [usize; BATCH],
    names: [libc::sockaddr_in; BATCH],
    iov: [libc::iovec; BATCH],
    msgs: [libc::mmsghdr; BATCH],
    /// Datagrams queued for sending.
    queued: usize,
    /// Send side counters.
    sent: u64,
    failed: u64,
    calls: u64,
}

impl MmsgBatch {
    fn new() -> Box<Self> {
        Box::new(MmsgBatch {
            bufs: vec![[0; BUF]; BATCH],
            lens: [0; BATCH],
            names: [sockaddr(0); BATCH],
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH],
            // SAFETY: mmsghdr is plain old data; all-zero (null pointers) is valid.
            msgs: unsafe { zeroed() },
            queued: 0,
            sent: 0,
            failed: 0,
            calls: 0,
        })
    }

    fn prepare(&mut self, n: usize, receiving: bool) {
        for i in 0..n {
            let len = if receiving { BUF } else { self.lens[i] };
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: len,
            };
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = SOCKADDR_LEN;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
        }
    }

    /// Receives up to BATCH datagrams; returns how many.
    fn recv(&mut self, fd: i32) -> usize {
        self.prepare(BATCH, true);
        // SAFETY: the headers point into `self`'s buffers, valid and unmoved during the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                BATCH as _,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        n.max(0) as usize
    }

    /// Datagram `i` of the last `recv`: (payload, source port).
    fn get(&self, i: usize) -> (&[u8], u16) {
        let len = self.msgs[i].msg_len as usize;
        (&self.bufs[i][..len], u16::from_be(self.names[i].sin_port))
    }

    fn push(&mut self, fd: i32, parts: [&[u8]; 2], port: u16) {
        if self.queued == BATCH {
            self.flush(fd);
        }
        let (i, len) = (self.queued, parts[0].len() + parts[1].len());
        self.bufs[i][..parts[0].len()].copy_from_slice(parts[0]);
        self.bufs[i][parts[0].len()..len].copy_from_slice(parts[1]);
        self.lens[i] = len;
        self.names[i] = sockaddr(port);
        self.queued += 1;
    }

    fn flush(&mut self, fd: i32) {
        let n = self.queued;
        if n == 0 {
            return;
        }
        self.prepare(n, false);
        // SAFETY: the first `n` headers point into `self`'s buffers, valid during the call.
        let rc = unsafe { libc::sendmmsg(fd, self.msgs.as_mut_ptr(), n as _, libc::MSG_DONTWAIT) };
        let ok = rc.max(0) as usize;
        self.sent += ok as u64;
        self.failed += (n - ok) as u64;
        self.calls += 1;
        self.queued = 0;
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    A,
    B,
    C,
    D,
    E,
}

impl Variant {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "a" => Variant::A,
            "b" => Variant::B,
            "c" => Variant::C,
            "d" => Variant::D,
            "e" => Variant::E,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        ["a", "b", "c", "d", "e"][self as usize]
    }
    fn batched(self) -> bool {
        matches!(self, Variant::B | Variant::D | Variant::E)
    }
    fn connected(self) -> bool {
        matches!(self, Variant::C | Variant::D | Variant::E)
    }
    fn per_client(self) -> bool {
        self == Variant::E
    }
}

#[derive(Default)]
struct Counters {
    forwarded: u64,
    send_failed: u64,
    recv_calls: u64,
    send_calls: u64,
    epoll_waits: u64,
}

struct Forwarder {
    v: Variant,
    ports: Ports,
    listener: i32,
    relays: Vec<i32>,
    /// Variant e: per-client sockets on the listener port, connected to client k.
    per_client: Vec<i32>,
    buf: [u8; BUF],
    header: [u8; CHANNEL_HEADER],
    rx: Box<MmsgBatch>,
    tx: Box<MmsgBatch>,
    n: Counters,
}

impl Forwarder {
    fn count_send(&mut self, ok: bool) {
        self.n.send_calls += 1;
        if ok {
            self.n.forwarded += 1;
        } else {
            self.n.send_failed += 1;
        }
    }

    /// Client k -> listener: strip the ChannelData header, send from R_k to R_(k^1).
    fn relay_out(&mut self, k: usize, payload_from: usize, len: usize, batch_slot: Option<usize>) {
        let data = match batch_slot {
            Some(i) => &self.rx.bufs[i][payload_from..len],
            None => &self.buf[payload_from..len],
        };
        let ok = if self.v.connected() {
            send(self.relays[k], data)
        } else {
            send_to(self.relays[k], data, self.ports.relay(k ^ 1))
        };
        self.count_send(ok);
    }

    fn on_client_datagrams(&mut self, fd: i32) {
        if self.v.batched() {
            loop {
                let m = self.rx.recv(fd);
                self.n.recv_calls += 1;
                for i in 0..m {
                    let (d, src) = self.rx.get(i);
                    let len = d.len();
                    if let (Some(k), true) = (self.ports.client_index(src), len >= CHANNEL_HEADER) {
                        self.relay_out(k, CHANNEL_HEADER, len, Some(i));
                    }
                }
                if m < BATCH {
                    break;
                }
            }
        } else {
            loop {
                self.n.recv_calls += 1;
                let Some((len, src)) = recv_from(fd, &mut self.buf) else {
                    break;
                };
                if let (Some(k), true) = (self.ports.client_index(src), len >= CHANNEL_HEADER) {
                    self.relay_out(k, CHANNEL_HEADER, len, None);
                }
            }
        }
    }

    /// R_j received from its peer: add a ChannelData header, send from L to client j.
    fn on_relay_datagrams(&mut self, j: usize) {
        loop {
            self.n.recv_calls += 1;
            let got = if self.v.connected() {
                recv(self.relays[j], &mut self.buf)
            } else {
                recv_from(self.relays[j], &mut self.buf).map(|(len, _)| len)
            };
            let Some(len) = got else { break };
            self.header = [0x40, 0x00, (len >> 8) as u8, len as u8];
            if self.v.per_client() {
                let mut out = [0u8; BUF + CHANNEL_HEADER];
                out[..CHANNEL_HEADER].copy_from_slice(&self.header);
                out[CHANNEL_HEADER..CHANNEL_HEADER + len].copy_from_slice(&self.buf[..len]);
                let ok = send(self.per_client[j], &out[..CHANNEL_HEADER + len]);
                self.count_send(ok);
            } else if self.v.batched() {
                // Counted when flushed.
                self.tx.push(
                    self.listener,
                    [&self.header, &self.buf[..len]],
                    self.ports.client(j),
                );
            } else {
                let mut out = [0u8; BUF + CHANNEL_HEADER];
                out[..CHANNEL_HEADER].copy_from_slice(&self.header);
                out[CHANNEL_HEADER..CHANNEL_HEADER + len].copy_from_slice(&self.buf[..len]);
                let ok = send_to(
                    self.listener,
                    &out[..CHANNEL_HEADER + len],
                    self.ports.client(j),
                );
                self.count_send(ok);
            }
        }
    }
}

fn fwd(v: Variant, clients: usize) -> Result<()> {
    let ports = Ports::from_env(clients)?;
    let ep = epoll_create()?;
    let listener = udp_socket(ports.listener(), v.per_client(), "listener")?;
    epoll_add(ep, listener, LISTENER)?;
    let mut relays = Vec::with_capacity(clients);
    for k in 0..clients {
        let fd = udp_socket(ports.relay(k), false, &format!("relay socket {k}"))?;
        if v.connected() {
            connect(fd, ports.relay(k ^ 1))?;
        }
        epoll_add(ep, fd, k as u64)?;
        relays.push(fd);
    }
    let mut per_client = Vec::new();
    if v.per_client() {
        for k in 0..clients {
            let fd = udp_socket(
                ports.listener(),
                true,
                &format!("listener socket for client {k}"),
            )?;
            connect(fd, ports.client(k))?;
            epoll_add(ep, fd, PER_CLIENT + k as u64)?;
            per_client.push(fd);
        }
    }
    let mut f = Forwarder {
        v,
        ports,
        listener,
        relays,
        per_client,
        buf: [0; BUF],
        header: [0; CHANNEL_HEADER],
        rx: MmsgBatch::new(),
        tx: MmsgBatch::new(),
        n: Counters::default(),
    };
    let mut evs = empty_events();
    let mut start: Option<(Instant, (f64, f64))> = None;
    let mut last = Instant::now();
    let created = Instant::now();
    loop {
        let n = epoll_wait(ep, &mut evs, IDLE_END.as_millis() as i32);
        f.n.epoll_waits += 1;
        if n == 0 {
            if start.is_some() {
                break;
            }
            if created.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "no traffic within {START_TIMEOUT:?}: is `load` running?"
                ));
            }
            continue;
        }
        if start.is_none() {
            start = Some((Instant::now(), cpu_times()));
            f.n = Counters::default();
        }
        for ev in &evs[..n] {
            let tag = { ev.u64 }; // copy: epoll_event is packed
            match tag {
                LISTENER => f.on_client_datagrams(f.listener),
                tag if tag >= PER_CLIENT => {
                    f.on_client_datagrams(f.per_client[(tag - PER_CLIENT) as usize])
                }
                tag => f.on_relay_datagrams(tag as usize),
            }
        }
        if v.batched() && !v.per_client() {
            f.tx.flush(f.listener);
        }
        last = Instant::now();
    }
    let (u1, s1) = cpu_times();
    let Some((t0, (u0, s0))) = start else {
        unreachable!("loop only ends after traffic started")
    };
    let c = &mut f.n;
    c.forwarded += f.tx.sent;
    c.send_failed += f.tx.failed;
    c.send_calls += f.tx.calls;
    c.epoll_waits -= 1; // the final idle wait
    let secs = last.duration_since(t0).as_secs_f64();
    let pkts = c.forwarded.max(1) as f64;
    let per = |x: f64| x / pkts * 1e6;
    println!(
        "fwd variant={} clients={clients} pkts={} send_failed={} secs={secs:.2} pkt_per_s={:.0} \
         user_us={:.2} kernel_us={:.2} total_us={:.2} recv_calls={:.2} send_calls={:.2} epoll_waits={:.3}",
        v.name(),
        c.forwarded,
        c.send_failed,
        c.forwarded as f64 / secs,
        per(u1 - u0),
        per(s1 - s0),
        per(u1 - u0 + s1 - s0),
        c.recv_calls as f64 / pkts,
        c.send_calls as f64 / pkts,
        c.epoll_waits as f64 / pkts,
    );
    Ok(())
}

fn periodic_timer(period: Duration) -> Result<i32> {
    // SAFETY: plain syscall, no pointers.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!("timerfd_create: {}", last_err()));
    }
    let ts = libc::timespec {
        tv_sec: period.as_secs() as _,
        tv_nsec: period.subsec_nanos() as _,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: `spec` is a valid itimerspec; the old value is not requested (null).
    let rc = unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!("timerfd_settime: {}", last_err()));
    }
    Ok(fd)
}

/// Number of timer expirations since the last read (0 if none).
fn read_timer(fd: i32) -> u64 {
    let mut expirations = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64.
    let n = unsafe { libc::read(fd, (&mut expirations as *mut u64).cast(), 8) };
    if n == 8 {
        expirations
    } else {
        0
    }
}

fn load(clients: usize, tick: Duration, secs: u64) -> Result<()> {
    let ports = Ports::from_env(clients)?;
    let ep = epoll_create()?;
    let mut socks = Vec::with_capacity(clients);
    for k in 0..clients {
        let fd = udp_socket(ports.client(k), false, &format!("client {k}"))?;
        epoll_add(ep, fd, k as u64)?;
        socks.push(fd);
    }
    let timer = periodic_timer(tick)?;
    epoll_add(ep, timer, LISTENER)?;
    let mut msg = [0u8; MSG_LEN];
    let payload = MSG_LEN - CHANNEL_HEADER;
    msg[..CHANNEL_HEADER].copy_from_slice(&[0x40, 0x00, (payload >> 8) as u8, payload as u8]);
    let mut buf = [0u8; BUF];
    let mut evs = empty_events();
    let (mut sent, mut got, mut send_failed) = (0u64, 0u64, 0u64);
    let mut first_send_error = None;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let n = epoll_wait(ep, &mut evs, 100);
        for ev in &evs[..n] {
            if ev.u64 == LISTENER {
                // One burst per expiration, so a late wake-up keeps the average rate.
                for _ in 0..read_timer(timer) {
                    for &fd in &socks {
                        if send_to(fd, &msg, ports.listener()) {
                            sent += 1;
                        } else {
                            send_failed += 1;
                            first_send_error.get_or_insert_with(last_err);
                        }
                    }
                }
            } else {
                while recv_from(socks[ev.u64 as usize], &mut buf).is_some() {
                    got += 1;
                }
            }
        }
    }
    // Stop the ticks, then collect stragglers until 300 ms of silence.
    // SAFETY: `timer` is our open fd and is not used afterwards.
    unsafe { libc::close(timer) };
    while epoll_wait(ep, &mut evs, 300) > 0 {
        for &fd in &socks {
            while recv_from(fd, &mut buf).is_some() {
                got += 1;
            }
        }
    }
    if sent == 0 {
        let why = first_send_error.map_or("no tick fired".to_string(), |e| e.to_string());
        return Err(format!(
            "no datagram could be sent ({why}); is lo up? (ip link set lo up)"
        ));
    }
    println!(
        "load clients={clients} tick_us={} secs={secs} sent={sent} send_failed={send_failed} got={got} \
         loss_pct={:.2} msg_per_s={:.0}",
        tick.as_micros(),
        100.0 * sent.saturating_sub(got) as f64 / sent as f64,
        sent as f64 / secs as f64,
    );
    Ok(())
}

/// The no-wake-up reference: send to our own socket and read back.
fn self_send(packets: u64) -> Result<()> {
    let ports = Ports::from_env(2)?;
    let a = udp_socket(ports.relay(0), false, "self sender")?;
    let b = udp_socket(ports.relay(1), false, "self receiver")?;
    let msg = [0u8; MSG_LEN - CHANNEL_HEADER];
    let mut buf = [0u8; BUF];
    let report = |mode: &str, got: u64, t: Instant, (u0, s0): (f64, f64)| {
        let (u1, s1) = cpu_times();
        let per = |x: f64| x / got.max(1) as f64 * 1e6;
        println!(
            "self mode={mode} pkts={got} wall_us={:.2} user_us={:.2} kernel_us={:.2} total_us={:.2}",
            per(t.elapsed().as_secs_f64()),
            per(u1 - u0),
            per(s1 - s0),
            per(u1 - u0 + s1 - s0),
        );
        got
    };

    // One at a time: sendto, then recvfrom of that datagram.
    let (t, cpu) = (Instant::now(), cpu_times());
    let mut got = 0u64;
    for _ in 0..packets {
        if send_to(a, &msg, ports.relay(1)) && recv_from(b, &mut buf).is_some() {
            got += 1;
        }
    }
    let single = report("single", got, t, cpu);

    // Batched: sendmmsg of 32, then recvmmsg until drained.
    let (mut rx, mut tx) = (MmsgBatch::new(), MmsgBatch::new());
    let (t, cpu) = (Instant::now(), cpu_times());
    let mut got = 0u64;
    for _ in 0..packets / BATCH as u64 {
        for _ in 0..BATCH {
            tx.push(a, [&msg, &[]], ports.relay(1));
        }
        tx.flush(a);
        loop {
            let m = rx.recv(b);
            got += m as u64;
            if m < BATCH {
                break;
            }
        }
    }
    let batched = report("batch32", got, t, cpu);
    if single < packets * 99 / 100 || batched < packets / BATCH as u64 * BATCH as u64 * 99 / 100 {
        return Err(format!(
            "only {single} (single) / {batched} (batched) of {packets} datagrams came back; is lo up?"
        ));
    }
    Ok(())
}

fn parse<T: std::str::FromStr>(arg: Option<&String>, what: &str) -> Result<T> {
    let s = arg.ok_or_else(|| format!("missing <{what}>"))?;
    s.parse().map_err(|_| format!("bad <{what}>: {s:?}"))
}

fn parse_clients(arg: Option<&String>) -> Result<usize> {
    let clients: usize = parse(arg, "clients")?;
    if clients < 2 || !clients.is_multiple_of(2) || clients > MAX_CLIENTS {
        return Err(format!(
            "<clients> = {clients}: want an even number in 2..={MAX_CLIENTS}"
        ));
    }
    Ok(clients)
}

fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("fwd") => {
            let v = args.get(1).and_then(|s| Variant::parse(s));
            let v = v.ok_or("fwd: <variant> must be one of a, b, c, d, e")?;
            fwd(v, parse_clients(args.get(2))?)
        }
        Some("load") => {
            let clients = parse_clients(args.get(1))?;
            let tick_us: u64 = parse(args.get(2), "tick_us")?;
            let secs: u64 = parse(args.get(3), "secs")?;
            if tick_us == 0 || secs == 0 {
                return Err("load: <tick_us> and <secs> must be > 0".into());
            }
            load(clients, Duration::from_micros(tick_us), secs)
        }
        Some("self") => {
            let packets = match args.get(1) {
                Some(_) => parse(args.get(1), "packets")?,
                None => 500_000,
            };
            self_send(packets)
        }
        Some(other) => Err(format!("unknown command {other:?}")),
        None => Err("missing command".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return if args.is_empty() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus-turn-floor: error: {e}\n(run with --help for usage)");
            ExitCode::FAILURE
        }
    }
}
