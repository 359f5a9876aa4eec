//! Batched UDP datagram I/O, shared by the SFU's workers and the TURN relay.
//!
//! A leaf crate (it depends on `libc` only) so that `sfu` and `turn` can both use it
//! without depending on each other.
//!
//! A busy socket receives and sends thousands of small datagrams per second. One
//! system call per datagram made entering and leaving the kernel a visible share of
//! the CPU, so on Linux a batch of datagrams moves in one call: `recvmmsg` to read
//! everything the socket has queued (up to [`BATCH`]) and `sendmmsg` to write
//! everything a batch produced. Elsewhere the same functions loop over `recv_from` /
//! `send_to`.
//!
//! Both functions are non-blocking and report `WouldBlock` like the std calls, so a
//! tokio shell can use them inside `tokio::net::UdpSocket::try_io` (on a `try_clone`
//! of the socket, or the same descriptor borrowed as a std socket).
//!
//! With [`enable_rx_timestamps`] each received datagram carries the time the kernel
//! queued it, so a caller can measure the wait in the socket queue too, not only its
//! own processing.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

/// Datagrams moved per system call.
pub const BATCH: usize = 32;

/// Default receive buffer per datagram ([`RecvBatch::default`]). Anything larger than a
/// sane WebRTC datagram (they stay under the ~1200-byte MTU they negotiate) is
/// truncated, and then rejected by str0m.
pub const MAX_DATAGRAM: usize = 2048;

/// The largest UDP payload (IPv6 jumbograms aside): a [`RecvBatch`] with this capacity
/// never truncates.
pub const MAX_UDP_PAYLOAD: usize = 65536;

/// Buffers for one batch of received datagrams, allocated once per socket reader.
pub struct RecvBatch {
    /// `BATCH` slots of `cap` bytes each.
    bufs: Box<[u8]>,
    cap: usize,
    meta: [Meta; BATCH],
    count: usize,
}

#[derive(Clone, Copy)]
struct Meta {
    len: usize,
    source: Option<SocketAddr>,
    /// When the kernel received it, if the socket has timestamps on.
    arrived: Option<Instant>,
}

impl Default for RecvBatch {
    /// Room for [`BATCH`] datagrams of up to [`MAX_DATAGRAM`] bytes.
    fn default() -> Self {
        RecvBatch::with_datagram_capacity(MAX_DATAGRAM)
    }
}

impl RecvBatch {
    /// Room for [`BATCH`] datagrams of up to `cap` bytes each; longer ones are
    /// truncated to `cap`. [`MAX_UDP_PAYLOAD`] truncates nothing (the pages of a
    /// large buffer are only touched as far as datagrams fill them).
    pub fn with_datagram_capacity(cap: usize) -> Self {
        let cap = cap.max(1);
        RecvBatch {
            bufs: vec![0; cap * BATCH].into_boxed_slice(),
            cap,
            meta: [Meta {
                len: 0,
                source: None,
                arrived: None,
            }; BATCH],
            count: 0,
        }
    }

    /// The per-datagram capacity.
    pub fn datagram_capacity(&self) -> usize {
        self.cap
    }

    /// The datagrams of the last successful [`recv_batch`]: source, bytes, and when
    /// the kernel received it (`None` without receive timestamps).
    /// Datagrams from an address family we do not speak are skipped.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8], Option<Instant>)> + '_ {
        self.meta[..self.count]
            .iter()
            .zip(self.bufs.chunks_exact(self.cap))
            .filter_map(|(m, buf)| Some((m.source?, &buf[..m.len], m.arrived)))
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Reads up to [`BATCH`] queued datagrams without blocking; `WouldBlock` when none is.
pub fn recv_batch(socket: &std::net::UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    batch.count = 0;
    let n = sys::recv_batch(socket, batch)?;
    batch.count = n;
    Ok(n)
}

/// Sends datagrams from the front of `items` without blocking and returns how many
/// went out (at least one), or the error of the first one. `WouldBlock` means the
/// socket buffer is full: wait for writability and call again with the rest.
pub fn send_batch<T: AsRef<[u8]>>(
    socket: &std::net::UdpSocket,
    items: &[(SocketAddr, T)],
) -> io::Result<usize> {
    if items.is_empty() {
        return Ok(0);
    }
    sys::send_batch(socket, &items[..items.len().min(BATCH)])
}

/// Asks the kernel to stamp each received datagram with its arrival time
/// (`SO_TIMESTAMPNS`). Best effort: without it datagrams count from when they were read.
pub fn enable_rx_timestamps(socket: &std::net::UdpSocket) -> io::Result<()> {
    sys::enable_rx_timestamps(socket)
}

#[cfg(target_os = "linux")]
mod sys {
    use super::{Meta, RecvBatch, BATCH};
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    /// Control-message space per datagram: one `SCM_TIMESTAMPNS` (a timespec) fits in
    /// 32 bytes; u64 elements keep it aligned for `cmsghdr`.
    const CMSG_WORDS: usize = 8;

    pub fn enable_rx_timestamps(socket: &std::net::UdpSocket) -> io::Result<()> {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, option value pointer and its size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn recv_batch(socket: &std::net::UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let mut cmsgs = [[0u64; CMSG_WORDS]; BATCH];
        let cap = batch.cap;
        for (i, buf) in batch.bufs.chunks_exact_mut(cap).enumerate() {
            iov[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: cap,
            };
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_control = cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = CMSG_WORDS * 8;
        }
        // SAFETY: every header points at live, correctly sized buffers above (and into
        // `batch`, borrowed mutably for the call); the kernel writes at most
        // `iov_len` / `msg_namelen` bytes into them.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // Kernel stamps are wall-clock; map them onto the monotonic clock by age.
        let (mono, wall) = (Instant::now(), SystemTime::now());
        let wall = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        for i in 0..n {
            let m = &msgs[i];
            let arrived = rx_timestamp(&m.msg_hdr)
                .map(|t| mono.checked_sub(wall.saturating_sub(t)).unwrap_or(mono));
            batch.meta[i] = Meta {
                len: (m.msg_len as usize).min(cap),
                source: from_sockaddr(&names[i]),
                arrived,
            };
        }
        Ok(n)
    }

    /// The `SCM_TIMESTAMPNS` of a received message, as time since the epoch.
    fn rx_timestamp(h: &libc::msghdr) -> Option<Duration> {
        // SAFETY: `h` is a header the kernel filled in, its control buffer is live and
        // `msg_controllen` says how much of it is valid; the CMSG_* macros stay within it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }

    pub fn send_batch<T: AsRef<[u8]>>(
        socket: &std::net::UdpSocket,
        items: &[(SocketAddr, T)],
    ) -> io::Result<usize> {
        // SAFETY: as above, all-zero is valid for these C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let n = items.len().min(BATCH);
        for (i, (dest, data)) in items[..n].iter().enumerate() {
            let data = data.as_ref();
            iov[i] = libc::iovec {
                // The kernel only reads through this pointer (it is a send).
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            };
            let namelen = to_sockaddr(*dest, &mut names[i]);
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = namelen;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: the first `n` headers point at live buffers (`items` outlives the
        // call) and addresses filled in by `to_sockaddr` with their true lengths.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match i32::from(s.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in, and
                // sockaddr_storage is large and aligned enough for any sockaddr.
                let a =
                    unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let a =
                    unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    fn to_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
        match addr {
            SocketAddr::V4(a) => {
                // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
                let s = unsafe {
                    &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                s.sin_family = libc::AF_INET as libc::sa_family_t;
                s.sin_port = a.port().to_be();
                s.sin_addr = libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                };
                size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(a) => {
                // SAFETY: as above, for sockaddr_in6.
                let s = unsafe {
                    &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                s.sin6_port = a.port().to_be();
                s.sin6_flowinfo = a.flowinfo();
                s.sin6_addr = libc::in6_addr {
                    s6_addr: a.ip().octets(),
                };
                s.sin6_scope_id = a.scope_id();
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use super::{Meta, RecvBatch, BATCH};
    use std::io;
    use std::net::SocketAddr;

    pub fn enable_rx_timestamps(_socket: &std::net::UdpSocket) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "receive timestamps are only used on Linux",
        ))
    }

    pub fn recv_batch(socket: &std::net::UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
        let mut n = 0;
        let cap = batch.cap;
        while n < BATCH {
            match socket.recv_from(&mut batch.bufs[n * cap..(n + 1) * cap]) {
                Ok((len, src)) => {
                    batch.meta[n] = Meta {
                        len,
                        source: Some(src),
                        arrived: None,
                    };
                    n += 1;
                }
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(n)
    }

    pub fn send_batch<T: AsRef<[u8]>>(
        socket: &std::net::UdpSocket,
        items: &[(SocketAddr, T)],
    ) -> io::Result<usize> {
        let mut n = 0;
        for (dest, data) in items {
            match socket.send_to(data.as_ref(), dest) {
                Ok(_) => n += 1,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn a_batch_goes_out_and_comes_back_in_order() {
        let (a, b) = pair();
        if cfg!(target_os = "linux") {
            enable_rx_timestamps(&b).unwrap();
        }
        let sent_at = Instant::now();
        let dest = b.local_addr().unwrap();
        let items: Vec<(SocketAddr, Vec<u8>)> = (0..40u8)
            .map(|i| (dest, vec![i; 10 + i as usize]))
            .collect();
        let mut sent = 0;
        while sent < items.len() {
            sent += send_batch(&a, &items[sent..]).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        loop {
            match recv_batch(&b, &mut batch) {
                Ok(n) => {
                    assert!(n <= BATCH);
                    let read_at = Instant::now();
                    for (src, data, arrived) in batch.iter() {
                        assert_eq!(src, a.local_addr().unwrap());
                        // On Linux every datagram carries the kernel's arrival stamp,
                        // between the send and this read (a few ms of slack for
                        // mapping the wall-clock stamp onto the monotonic clock).
                        if cfg!(target_os = "linux") {
                            let at = arrived.expect("kernel receive timestamp");
                            let slack = std::time::Duration::from_millis(5);
                            assert!(at + slack >= sent_at, "stamped before the send");
                            assert!(at <= read_at + slack, "stamped after the read");
                        }
                        got.push(data.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let want: Vec<Vec<u8>> = items.into_iter().map(|(_, d)| d).collect();
        assert_eq!(got, want);
        assert!(sent_at.elapsed() >= std::time::Duration::from_millis(50));
    }

    #[test]
    fn an_empty_socket_would_block() {
        let (_, b) = pair();
        let mut batch = RecvBatch::default();
        let e = recv_batch(&b, &mut batch).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(batch.is_empty());
    }

    #[test]
    fn capacity_bounds_each_datagram() {
        let (a, b) = pair();
        let dest = b.local_addr().unwrap();
        let big = vec![7u8; 9000];
        assert_eq!(
            send_batch(&a, &[(dest, &big[..]), (dest, &big[..10])]).unwrap(),
            2
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A large batch keeps the whole datagram...
        let mut batch = RecvBatch::with_datagram_capacity(MAX_UDP_PAYLOAD);
        assert_eq!(batch.datagram_capacity(), MAX_UDP_PAYLOAD);
        assert_eq!(recv_batch(&b, &mut batch).unwrap(), 2);
        let lens: Vec<usize> = batch.iter().map(|(_, d, _)| d.len()).collect();
        assert_eq!(lens, [9000, 10]);
        // ...the default one truncates it to MAX_DATAGRAM.
        send_batch(&a, &[(dest, &big[..])]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut batch = RecvBatch::default();
        assert_eq!(recv_batch(&b, &mut batch).unwrap(), 1);
        let (_, data, _) = batch.iter().next().unwrap();
        assert_eq!(data.len(), MAX_DATAGRAM);
    }

    #[test]
    fn ipv6_addresses_round_trip() {
        let (Ok(a), Ok(b)) = (UdpSocket::bind("[::1]:0"), UdpSocket::bind("[::1]:0")) else {
            return; // no IPv6 loopback in this environment
        };
        b.set_nonblocking(true).unwrap();
        let dest = b.local_addr().unwrap();
        assert_eq!(send_batch(&a, &[(dest, b"hi")]).unwrap(), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut batch = RecvBatch::default();
        assert_eq!(recv_batch(&b, &mut batch).unwrap(), 1);
        let (src, data, _) = batch.iter().next().unwrap();
        assert_eq!(src, a.local_addr().unwrap());
        assert_eq!(data, b"hi");
    }
}
