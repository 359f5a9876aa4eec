use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::*;
use crate::auth::{long_term_key, rest_credentials};
use crate::stun::{decode_error_code, Writer};

// ---- RFC 5769 test vectors --------------------------------------------------

const REQ: &[u8] = &[
    0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73,
    0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff,
    0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09,
    0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14,
    0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e, 0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49,
    0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
];

const RESP_V4: &[u8] = &[
    0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
    0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
    0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9,
    0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
];

const RESP_V6: &[u8] = &[
    0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
    0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa,
    0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9, 0x00, 0x08, 0x00, 0x14,
    0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9, 0x7c, 0x82, 0x92, 0xc2, 0x75,
    0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb, 0x0b, 0x4c,
];

const REQ_LONG_TERM: &[u8] = &[
    0x00, 0x01, 0x00, 0x60, 0x21, 0x12, 0xa4, 0x42, 0x78, 0xad, 0x34, 0x33, 0xc6, 0xad, 0x72, 0xc0,
    0x29, 0xda, 0x41, 0x2e, 0x00, 0x06, 0x00, 0x12, 0xe3, 0x83, 0x9e, 0xe3, 0x83, 0x88, 0xe3, 0x83,
    0xaa, 0xe3, 0x83, 0x83, 0xe3, 0x82, 0xaf, 0xe3, 0x82, 0xb9, 0x00, 0x00, 0x00, 0x15, 0x00, 0x1c,
    0x66, 0x2f, 0x2f, 0x34, 0x39, 0x39, 0x6b, 0x39, 0x35, 0x34, 0x64, 0x36, 0x4f, 0x4c, 0x33, 0x34,
    0x6f, 0x4c, 0x39, 0x46, 0x53, 0x54, 0x76, 0x79, 0x36, 0x34, 0x73, 0x41, 0x00, 0x14, 0x00, 0x0b,
    0x65, 0x78, 0x61, 0x6d, 0x70, 0x6c, 0x65, 0x2e, 0x6f, 0x72, 0x67, 0x00, 0x00, 0x08, 0x00, 0x14,
    0xf6, 0x70, 0x24, 0x65, 0x6d, 0xd6, 0x4a, 0x3e, 0x02, 0xb8, 0xe0, 0x71, 0x2e, 0x85, 0xc9, 0xa2,
    0x8c, 0xa8, 0x96, 0x66,
];

const SHORT_TERM_PW: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

#[test]
fn rfc5769_request() {
    let m = Message::parse(REQ).unwrap();
    assert_eq!(m.method, method::BINDING);
    assert_eq!(m.class, Class::Request);
    assert_eq!(m.get_str(attr::SOFTWARE).unwrap(), Some("STUN test client"));
    assert_eq!(m.get_str(attr::USERNAME).unwrap(), Some("evtj:h6vY"));
    assert_eq!(m.verify_fingerprint(), Some(true));
    assert!(m.verify_integrity(SHORT_TERM_PW));
    assert!(!m.verify_integrity(b"wrong"));
}

#[test]
fn rfc5769_responses_parse_and_reencode() {
    for (vec, addr) in [
        (RESP_V4, "192.0.2.1:32853"),
        (RESP_V6, "[2001:db8:1234:5678:11:2233:4455:6677]:32853"),
    ] {
        let m = Message::parse(vec).unwrap();
        assert_eq!(m.class, Class::Success);
        let a: SocketAddr = addr.parse().unwrap();
        assert_eq!(m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap(), Some(a));
        assert_eq!(m.verify_fingerprint(), Some(true));
        assert!(m.verify_integrity(SHORT_TERM_PW));
        // Our writer must produce the identical bytes.
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf, method::BINDING, Class::Success, &m.tid);
        w.attr(attr::SOFTWARE, b"test vector");
        w.xor_addr(attr::XOR_MAPPED_ADDRESS, a);
        w.integrity(SHORT_TERM_PW);
        w.fingerprint();
        // RFC 5769 pads SOFTWARE with a space, we pad with zero (RFC 8489 allows either).
        let mut expect = vec.to_vec();
        expect[35] = 0;
        let m2 = Message::parse(&buf).unwrap();
        assert!(m2.verify_integrity(SHORT_TERM_PW));
        assert_eq!(m2.verify_fingerprint(), Some(true));
        assert_eq!(buf[..35], expect[..35]);
        assert_eq!(buf[36..48], expect[36..48]);
    }
}

#[test]
fn rfc5769_long_term() {
    let m = Message::parse(REQ_LONG_TERM).unwrap();
    let user = m.get_str(attr::USERNAME).unwrap().unwrap();
    assert_eq!(user, "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}");
    assert_eq!(m.get_str(attr::REALM).unwrap(), Some("example.org"));
    assert_eq!(
        m.get_str(attr::NONCE).unwrap(),
        Some("f//499k954d6OL34oL9FSTvy64sA")
    );
    let key = long_term_key(user, "example.org", "TheMatrIX");
    assert!(m.verify_integrity(&key));
    assert!(!m.verify_integrity(&long_term_key(user, "example.org", "thematrix")));
}

#[test]
fn integrity_sha256_and_fingerprint_roundtrip() {
    let mut buf = Vec::new();
    let tid = [7u8; 12];
    let mut w = Writer::new(&mut buf, method::ALLOCATE, Class::Request, &tid);
    w.attr(attr::USERNAME, b"u");
    w.integrity_sha256(b"key");
    w.fingerprint();
    let m = Message::parse(&buf).unwrap();
    assert_eq!(m.integrity_kind(), Some(Integrity::Sha256));
    assert!(m.verify_integrity(b"key"));
    assert!(!m.verify_integrity(b"kez"));
    assert_eq!(m.verify_fingerprint(), Some(true));
    // Flip a byte in the body: both checks must fail.
    let mut bad = buf.clone();
    bad[25] ^= 1;
    let m = Message::parse(&bad).unwrap();
    assert!(!m.verify_integrity(b"key"));
    assert_eq!(m.verify_fingerprint(), Some(false));
}

#[test]
fn hostile_input_never_panics() {
    // Every truncation and a sweep of byte flips of valid messages.
    for v in [REQ, RESP_V4, RESP_V6, REQ_LONG_TERM] {
        for n in 0..v.len() {
            let _ = Message::parse(&v[..n]);
            let _ = stun::stream_frame_len(&v[..n]);
        }
        for i in 0..v.len() {
            for bit in 0..8 {
                let mut b = v.to_vec();
                b[i] ^= 1 << bit;
                if let Ok(m) = Message::parse(&b) {
                    let _ = m.verify_fingerprint();
                    let _ = m.verify_integrity(b"k");
                    let _ = m.get_xor_addr(attr::XOR_MAPPED_ADDRESS);
                }
            }
        }
    }
    // Pseudo-random garbage through the whole server.
    let mut h = Harness::new(Config::default());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in 0..600usize {
        let mut b = vec![0u8; len % 300];
        for byte in b.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
        if len % 3 == 0 && b.len() >= 8 {
            b[0] &= 0x3F;
            b[4..8].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        }
        h.raw(&b);
    }
}

#[test]
fn stream_framing() {
    assert_eq!(stun::stream_frame_len(&[0x40, 0x00, 0x00]), Ok(None));
    // ChannelData with 5-byte payload occupies 4 + 8 bytes on a stream.
    let cd = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0, 0xff];
    assert_eq!(stun::stream_frame_len(&cd), Ok(Some(12)));
    assert_eq!(stun::stream_frame_len(&cd[..11]), Ok(None));
    assert_eq!(stun::stream_frame_len(REQ), Ok(Some(REQ.len())));
    assert!(stun::stream_frame_len(&[0x80, 0, 0, 0]).is_err());
}

// ---- server harness ---------------------------------------------------------

#[derive(Default)]
struct FakeBinder {
    next: u64,
    live: HashMap<RelayId, SocketAddr>,
    v6: bool,
    limit: Option<usize>,
}

impl RelayBinder for FakeBinder {
    fn bind(&mut self, family: Family, req: PortReq) -> Result<Bound, BindError> {
        if family == Family::V6 && !self.v6 {
            return Err(BindError::FamilyUnsupported);
        }
        if self.limit.is_some_and(|l| self.live.len() >= l) {
            return Err(BindError::Exhausted);
        }
        let ip: IpAddr = match family {
            Family::V4 => "198.51.100.1".parse().unwrap(),
            Family::V6 => "2001:db8::1".parse().unwrap(),
        };
        let one = |this: &mut Self| {
            this.next += 1;
            let addr = SocketAddr::new(ip, 50000 + this.next as u16);
            this.live.insert(RelayId(this.next), addr);
            (RelayId(this.next), addr)
        };
        if req != PortReq::Any && self.next.is_multiple_of(2) {
            self.next += 1; // make the next port even
        }
        let main = one(self);
        let reserved = (req == PortReq::EvenPair).then(|| one(self));
        Ok((main, reserved))
    }
    fn release(&mut self, id: RelayId) {
        self.live.remove(&id);
    }
}

const SECRET: &str = "topsecret";
const REALM: &str = "chorus";
const T0_UNIX: u64 = 1_700_000_000;

struct Harness {
    srv: Server,
    io: FakeBinder,
    out: Outbox,
    now: Instant,
    client: ClientAddr,
    user: String,
    pass: String,
    nonce: String,
    tid: u8,
    sha256: bool,
}

#[derive(Debug)]
struct Resp {
    class: Class,
    code: Option<u16>,
    raw: Vec<u8>,
}

impl Resp {
    fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).unwrap()
    }
}

fn client(proto: Proto, port: u16) -> ClientAddr {
    ClientAddr {
        proto,
        local: "192.0.2.10:3478".parse().unwrap(),
        remote: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)), port),
    }
}

impl Harness {
    fn new(mut cfg: Config) -> Self {
        cfg.credentials.realm = REALM.into();
        cfg.credentials.auth_secret = Some(SECRET.into());
        cfg.credentials
            .static_users
            .insert("static".into(), "staticpw".into());
        let now = Instant::now();
        let (user, pass) = rest_credentials(SECRET, "alice", Duration::from_secs(3600), T0_UNIX);
        Harness {
            srv: Server::new(cfg, now, T0_UNIX, [42; 32]),
            io: FakeBinder::default(),
            out: Outbox::new(),
            now,
            client: client(Proto::Udp, 40000),
            user,
            pass,
            nonce: String::new(),
            tid: 0,
            sha256: false,
        }
    }

    fn raw(&mut self, b: &[u8]) -> Vec<(Dest, Vec<u8>)> {
        self.out.clear();
        self.srv
            .handle_client(self.client, b, self.now, &mut self.io, &mut self.out);
        self.out.iter().map(|(d, b)| (d, b.to_vec())).collect()
    }

    fn build(&mut self, m: u16, class: Class, auth: bool, f: impl FnOnce(&mut Writer)) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let tid = [self.tid; 12];
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf, m, class, &tid);
        f(&mut w);
        if auth {
            w.attr(attr::USERNAME, self.user.as_bytes());
            w.attr(attr::REALM, REALM.as_bytes());
            w.attr(attr::NONCE, self.nonce.as_bytes());
            let key = long_term_key(&self.user, REALM, &self.pass);
            if self.sha256 {
                w.integrity_sha256(&key);
            } else {
                w.integrity(&key);
            }
        }
        w.fingerprint();
        buf
    }

    fn request(&mut self, m: u16, f: impl FnOnce(&mut Writer)) -> Resp {
        let b = self.build(m, Class::Request, true, f);
        let outs = self.raw(&b);
        assert_eq!(outs.len(), 1, "expected exactly one response");
        let (d, raw) = outs.into_iter().next().unwrap();
        assert_eq!(d, Dest::Client(self.client));
        let msg = Message::parse(&raw).unwrap();
        assert_eq!(msg.tid, [self.tid; 12]);
        assert_eq!(msg.verify_fingerprint(), Some(true));
        let code = msg
            .get(attr::ERROR_CODE)
            .and_then(decode_error_code)
            .map(|(c, _)| c);
        let class = msg.class;
        if let Some(n) = msg.get_str(attr::NONCE).unwrap() {
            self.nonce = n.to_string();
        }
        Resp { class, code, raw }
    }

    /// Request with nonce discovery: the first try gets 401 with a nonce.
    fn authed(&mut self, m: u16, f: impl Fn(&mut Writer)) -> Resp {
        if self.nonce.is_empty() {
            let b = self.build(m, Class::Request, false, &f);
            let r = self.raw(&b);
            let msg = Message::parse(&r[0].1).unwrap();
            assert_eq!(
                msg.get(attr::ERROR_CODE)
                    .and_then(decode_error_code)
                    .unwrap()
                    .0,
                401
            );
            self.nonce = msg.get_str(attr::NONCE).unwrap().unwrap().to_string();
        }
        let r = self.request(m, f);
        if r.class == Class::Success {
            // Successful responses to authenticated requests are signed with our key.
            let key = long_term_key(&self.user, REALM, &self.pass);
            assert!(r.msg().verify_integrity(&key));
        }
        r
    }

    fn allocate(&mut self) -> Resp {
        self.authed(method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    }

    fn relay_addr(&self) -> SocketAddr {
        self.srv.allocation_relay(&self.client).unwrap()
    }

    fn relay_id(&self) -> RelayId {
        *self
            .io
            .live
            .iter()
            .find(|(_, a)| **a == self.relay_addr())
            .unwrap()
            .0
    }

    fn perm(&mut self, peer: &str) -> Resp {
        let p: SocketAddr = peer.parse().unwrap();
        self.authed(method::CREATE_PERMISSION, |w| {
            w.xor_addr(attr::XOR_PEER_ADDRESS, p);
        })
    }

    fn bind_channel(&mut self, num: u16, peer: &str) -> Resp {
        let p: SocketAddr = peer.parse().unwrap();
        self.authed(method::CHANNEL_BIND, |w| {
            w.attr(attr::CHANNEL_NUMBER, &[(num >> 8) as u8, num as u8, 0, 0]);
            w.xor_addr(attr::XOR_PEER_ADDRESS, p);
        })
    }

    fn peer_sends(&mut self, peer: &str, data: &[u8]) -> Vec<(Dest, Vec<u8>)> {
        self.out.clear();
        let relay = self.relay_id();
        self.srv
            .handle_peer(relay, peer.parse().unwrap(), data, self.now, &mut self.out);
        self.out.iter().map(|(d, b)| (d, b.to_vec())).collect()
    }

    fn tick(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.srv.handle_timeout(self.now, &mut self.io);
    }
}

const PEER: &str = "8.8.8.8:5000";

#[test]
fn binding_request() {
    let mut h = Harness::new(Config::default());
    let b = h.build(method::BINDING, Class::Request, false, |_| {});
    let r = h.raw(&b);
    let m = Message::parse(&r[0].1).unwrap();
    assert_eq!(m.class, Class::Success);
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(h.client.remote)
    );
}

#[test]
fn full_udp_flow_channel_and_indications() {
    let mut h = Harness::new(Config::default());
    let r = h.allocate();
    assert_eq!(r.class, Class::Success, "{r:?}");
    let m = r.msg();
    assert_eq!(m.get_u32(attr::LIFETIME).unwrap(), Some(600));
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(h.client.remote)
    );
    let relayed = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(relayed, h.relay_addr());

    // No permission yet: peer traffic is dropped.
    assert!(h.peer_sends(PEER, b"hi").is_empty());
    assert_eq!(h.perm(PEER).class, Class::Success);

    // Peer → client as Data indication.
    let out = h.peer_sends(PEER, b"hello");
    let m = Message::parse(&out[0].1).unwrap();
    assert_eq!(m.method, method::DATA);
    assert_eq!(m.class, Class::Indication);
    assert_eq!(m.get(attr::DATA), Some(&b"hello"[..]));
    assert_eq!(
        m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap(),
        Some(PEER.parse().unwrap())
    );

    // Client → peer via Send indication.
    let peer: SocketAddr = PEER.parse().unwrap();
    let b = h.build(method::SEND, Class::Indication, false, |w| {
        w.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        w.attr(attr::DATA, b"out");
    });
    let out = h.raw(&b);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1, b"out");
    assert!(matches!(out[0].0, Dest::Peer { peer: p, .. } if p == peer));

    // Channel binding, then ChannelData both ways.
    assert_eq!(h.bind_channel(0x4001, PEER).class, Class::Success);
    let out = h.raw(&[0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0]);
    assert_eq!(out[0].1, b"abc");
    let out = h.peer_sends(PEER, b"xyz12");
    // UDP: no padding.
    assert_eq!(
        out[0].1,
        [0x40, 0x01, 0x00, 0x05, b'x', b'y', b'z', b'1', b'2']
    );
    // Unknown channel is dropped.
    assert!(h.raw(&[0x40, 0x02, 0x00, 0x01, 1, 0, 0, 0]).is_empty());
    // Length field longer than the datagram is dropped, not a panic.
    assert!(h.raw(&[0x40, 0x01, 0x00, 0x09, 1]).is_empty());

    // Refresh, then delete with lifetime 0.
    let r = h.authed(method::REFRESH, |w| {
        w.u32(attr::LIFETIME, 100_000);
    });
    assert_eq!(r.msg().get_u32(attr::LIFETIME).unwrap(), Some(3600));
    let r = h.authed(method::REFRESH, |w| {
        w.u32(attr::LIFETIME, 0);
    });
    assert_eq!(r.class, Class::Success);
    assert_eq!(h.srv.allocation_count(), 0);
    assert!(h.io.live.is_empty());
    assert_eq!(h.srv.metrics().allocations.load(Ordering::Relaxed), 0);
}

#[test]
fn stream_channel_data_is_padded() {
    let mut h = Harness::new(Config::default());
    h.client = client(Proto::Tcp, 40001);
    assert_eq!(h.allocate().class, Class::Success);
    assert_eq!(h.bind_channel(0x4000, PEER).class, Class::Success);
    let out = h.peer_sends(PEER, b"xyz12");
    assert_eq!(
        out[0].1,
        [0x40, 0x00, 0x00, 0x05, b'x', b'y', b'z', b'1', b'2', 0, 0, 0]
    );
    h.srv.client_closed(h.client, &mut h.io);
    assert_eq!(h.srv.allocation_count(), 0);
}

#[test]
fn ipv6_allocation_and_family_errors() {
    let mut h = Harness::new(Config::default());
    // 440 when the relay has no IPv6.
    let r = h.authed(method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(r.code, Some(440));
    h.io.v6 = true;
    let r = h.authed(method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(r.class, Class::Success);
    let relayed = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert!(relayed.is_ipv6());
    // IPv4 peer on an IPv6 allocation → 443.
    assert_eq!(h.perm(PEER).code, Some(443));
    let v6peer = "[2001:4860:4860::8888]:3478";
    assert_eq!(h.perm(v6peer).class, Class::Success);
    let out = h.peer_sends(v6peer, b"six");
    let m = Message::parse(&out[0].1).unwrap();
    assert_eq!(
        m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap(),
        Some(v6peer.parse().unwrap())
    );
    // Bad family value.
    let mut h = Harness::new(Config::default());
    let r = h.authed(method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0]);
    });
    assert_eq!(r.code, Some(440));
}

#[test]
fn error_400_bad_requests() {
    let mut h = Harness::new(Config::default());
    // Allocate without REQUESTED-TRANSPORT.
    assert_eq!(h.authed(method::ALLOCATE, |_| {}).code, Some(400));
    assert_eq!(h.allocate().class, Class::Success);
    // CreatePermission without a peer.
    assert_eq!(h.authed(method::CREATE_PERMISSION, |_| {}).code, Some(400));
    // Channel number out of range.
    assert_eq!(h.bind_channel(0x3FFF, PEER).code, Some(400));
    assert_eq!(h.bind_channel(0x8000, PEER).code, Some(400));
    // Rebinding a channel to another peer / a peer to another channel.
    assert_eq!(h.bind_channel(0x4000, PEER).class, Class::Success);
    assert_eq!(h.bind_channel(0x4000, "8.8.4.4:1").code, Some(400));
    assert_eq!(h.bind_channel(0x4001, PEER).code, Some(400));
    // Refreshing the same binding is fine.
    assert_eq!(h.bind_channel(0x4000, PEER).class, Class::Success);
    // Missing REALM with MESSAGE-INTEGRITY present → 400.
    let b = h.build(method::REFRESH, Class::Request, false, |w| {
        w.attr(attr::USERNAME, b"x");
        w.integrity(b"k");
    });
    let out = h.raw(&b);
    let m = Message::parse(&out[0].1).unwrap();
    assert_eq!(
        m.get(attr::ERROR_CODE).and_then(decode_error_code),
        Some((400, "Bad Request"))
    );
    // Unknown comprehension-required attribute → 420 listing it.
    let r = h.authed(method::REFRESH, |w| {
        w.attr(0x0042, b"????");
    });
    assert_eq!(r.code, Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES),
        Some(&[0x00, 0x42][..])
    );
}

#[test]
fn error_401_wrong_password_and_expired_rest_user() {
    let mut h = Harness::new(Config::default());
    h.pass = "wrong".into();
    let r = h.allocate();
    assert_eq!(r.code, Some(401));
    // 401 carries REALM and NONCE, and no MESSAGE-INTEGRITY.
    let m = r.msg();
    assert_eq!(m.get_str(attr::REALM).unwrap(), Some(REALM));
    assert!(m.has(attr::NONCE));
    assert!(m.integrity_kind().is_none());
    assert!(h.srv.metrics().auth_failures.load(Ordering::Relaxed) >= 1);

    let mut h = Harness::new(Config::default());
    let (u, p) = rest_credentials(SECRET, "bob", Duration::from_secs(10), T0_UNIX - 60);
    h.user = u;
    h.pass = p;
    assert_eq!(h.allocate().code, Some(401));

    // Unknown static user.
    let mut h = Harness::new(Config::default());
    h.user = "nobody".into();
    assert_eq!(h.allocate().code, Some(401));
    // Known static user.
    let mut h = Harness::new(Config::default());
    h.user = "static".into();
    h.pass = "staticpw".into();
    assert_eq!(h.allocate().class, Class::Success);
}

#[test]
fn error_403_forbidden_peers() {
    let mut h = Harness::new(Config::default());
    assert_eq!(h.allocate().class, Class::Success);
    for p in [
        "127.0.0.1:9",
        "10.0.0.1:9",
        "192.168.0.1:9",
        "169.254.169.254:80",
        "100.64.1.1:9",
        "0.0.0.0:9",
    ] {
        assert_eq!(h.perm(p).code, Some(403), "{p}");
        assert_eq!(h.bind_channel(0x4000, p).code, Some(403), "{p}");
    }
    let mut cfg = Config::default();
    cfg.policy.allow_loopback = true;
    let mut h = Harness::new(cfg);
    assert_eq!(h.allocate().class, Class::Success);
    assert_eq!(h.perm("127.0.0.1:9").class, Class::Success);
    assert_eq!(h.perm("10.0.0.1:9").code, Some(403));
}

#[test]
fn error_437_mismatch_and_retransmit() {
    let mut h = Harness::new(Config::default());
    // Refresh / permission without an allocation.
    assert_eq!(h.authed(method::REFRESH, |_| {}).code, Some(437));
    assert_eq!(h.perm(PEER).code, Some(437));
    assert_eq!(h.bind_channel(0x4000, PEER).code, Some(437));
    let first = h.allocate();
    assert_eq!(first.class, Class::Success);
    // Exact retransmission (same transaction id) gets the same success.
    let b = {
        h.tid -= 1;
        h.build(method::ALLOCATE, Class::Request, true, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    };
    let out = h.raw(&b);
    let m = Message::parse(&out[0].1).unwrap();
    assert_eq!(m.class, Class::Success);
    assert_eq!(
        m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap(),
        Some(h.relay_addr())
    );
    // A new Allocate on the same 5-tuple → 437.
    assert_eq!(h.allocate().code, Some(437));
}

#[test]
fn error_438_stale_nonce() {
    let cfg = Config {
        nonce_lifetime: Duration::from_secs(60),
        ..Config::default()
    };
    let mut h = Harness::new(cfg);
    assert_eq!(h.allocate().class, Class::Success);
    let old = h.nonce.clone();
    h.tick(61);
    let r = h.authed(method::REFRESH, |_| {});
    assert_eq!(r.code, Some(438));
    assert_ne!(h.nonce, old, "438 must carry a fresh nonce");
    // Retrying with the new nonce works.
    assert_eq!(h.authed(method::REFRESH, |_| {}).class, Class::Success);
    // A forged nonce is also rejected as stale.
    h.nonce = "0".repeat(32);
    assert_eq!(h.authed(method::REFRESH, |_| {}).code, Some(438));
}

#[test]
fn error_441_wrong_credentials() {
    let mut h = Harness::new(Config::default());
    assert_eq!(h.allocate().class, Class::Success);
    let (u, p) = rest_credentials(SECRET, "mallory", Duration::from_secs(600), T0_UNIX);
    h.user = u;
    h.pass = p;
    assert_eq!(h.authed(method::REFRESH, |_| {}).code, Some(441));
}

#[test]
fn error_442_unsupported_transport() {
    let mut h = Harness::new(Config::default());
    let r = h.authed(method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    });
    assert_eq!(r.code, Some(442));
    let m = r.msg();
    assert_eq!(
        m.get(attr::ERROR_CODE).and_then(decode_error_code),
        Some((442, "Unsupported Transport Protocol"))
    );
    // Error responses after successful auth are signed too.
    assert!(m.verify_integrity(&long_term_key(&h.user, REALM, &h.pass)));
}

#[test]
fn error_486_quotas_and_508_capacity() {
    let cfg = Config {
        user_quota: Some(1),
        total_quota: Some(2),
        ..Config::default()
    };
    let mut h = Harness::new(cfg);
    assert_eq!(h.allocate().class, Class::Success);
    // Same user (REST token with a different expiry), another 5-tuple.
    h.client = client(Proto::Udp, 40002);
    let (u, p) = rest_credentials(SECRET, "alice", Duration::from_secs(7200), T0_UNIX);
    h.user = u;
    h.pass = p;
    assert_eq!(h.allocate().code, Some(486));
    // Another user fits the total quota...
    h.user = "static".into();
    h.pass = "staticpw".into();
    assert_eq!(h.allocate().class, Class::Success);
    // ...until it is full.
    h.client = client(Proto::Udp, 40003);
    let (u, p) = rest_credentials(SECRET, "carol", Duration::from_secs(7200), T0_UNIX);
    h.user = u;
    h.pass = p;
    assert_eq!(h.allocate().code, Some(486));

    let mut h = Harness::new(Config::default());
    h.io.limit = Some(0);
    assert_eq!(h.allocate().code, Some(508));
}

#[test]
fn sha256_integrity_is_answered_in_kind() {
    let mut h = Harness::new(Config::default());
    h.sha256 = true;
    let r = h.allocate();
    assert_eq!(r.class, Class::Success);
    assert_eq!(r.msg().integrity_kind(), Some(Integrity::Sha256));
    assert!(r
        .msg()
        .verify_integrity(&long_term_key(&h.user, REALM, &h.pass)));
}

#[test]
fn expiry_of_allocations_permissions_channels() {
    let mut h = Harness::new(Config::default());
    assert_eq!(h.allocate().class, Class::Success);
    assert_eq!(h.bind_channel(0x4000, PEER).class, Class::Success);
    h.tick(301);
    // Permission (300 s) expired even though the channel (600 s) has not.
    assert!(h.peer_sends(PEER, b"x").is_empty());
    h.tick(300);
    assert!(h.raw(&[0x40, 0x00, 0x00, 0x01, 1, 0, 0, 0]).is_empty());
    h.tick(10);
    assert_eq!(h.srv.allocation_count(), 0);
    assert!(h.io.live.is_empty());
    assert_eq!(
        h.srv.allocation_relay(&h.client),
        None,
        "allocation must be gone after its lifetime"
    );
}

#[test]
fn bandwidth_cap_drops_excess() {
    let cfg = Config {
        max_bps: Some(80_000), // 10 kB/s
        ..Config::default()
    };
    let mut h = Harness::new(cfg);
    assert_eq!(h.allocate().class, Class::Success);
    assert_eq!(h.bind_channel(0x4000, PEER).class, Class::Success);
    let payload = [0u8; 1000];
    let mut delivered = 0;
    for _ in 0..50 {
        delivered += h.peer_sends(PEER, &payload).len();
    }
    assert!(
        (9..=11).contains(&delivered),
        "burst of ~10 kB, got {delivered}"
    );
    h.now += Duration::from_secs(1);
    assert_eq!(h.peer_sends(PEER, &payload).len(), 1);
}

#[test]
fn relay_path_does_not_grow_buffers() {
    // The outbox is reused: after warm-up, capacity stays put.
    let mut h = Harness::new(Config::default());
    assert_eq!(h.allocate().class, Class::Success);
    assert_eq!(h.bind_channel(0x4000, PEER).class, Class::Success);
    let relay = h.relay_id();
    let peer: SocketAddr = PEER.parse().unwrap();
    let mut out = Outbox::new();
    let cap = out.buf.capacity();
    for _ in 0..1000 {
        out.clear();
        h.srv
            .handle_peer(relay, peer, &[1u8; 1200], h.now, &mut out);
        h.srv.handle_client(
            h.client,
            &[0x40, 0, 0, 4, 1, 2, 3, 4],
            h.now,
            &mut h.io,
            &mut out,
        );
    }
    assert_eq!(out.buf.capacity(), cap);
    assert_eq!(out.len(), 2);
}

#[test]
fn even_port_reservation_pairs() {
    let mut h = Harness::new(Config::default());
    let r = h.authed(method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.class, Class::Success);
    let m = r.msg();
    let rtp = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(rtp.port() % 2, 0);
    let token = m.get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    assert_eq!(token.len(), 8);
    // Second allocation (RTCP) from another 5-tuple redeems the token.
    h.client = client(Proto::Udp, 40010);
    let t = token.clone();
    let r = h.authed(method::ALLOCATE, move |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::RESERVATION_TOKEN, &t);
    });
    assert_eq!(r.class, Class::Success);
    let rtcp = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(rtcp.port(), rtp.port() + 1);
    // Tokens are single use.
    h.client = client(Proto::Udp, 40011);
    let r = h.authed(method::ALLOCATE, move |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.code, Some(508));
    // Unredeemed reservations are released after 30 s.
    let r = h.authed(method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        w.attr(attr::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.class, Class::Success);
    let live = h.io.live.len();
    h.tick(31);
    assert_eq!(h.io.live.len(), live - 1);
}
