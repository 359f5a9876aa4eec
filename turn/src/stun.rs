//! STUN message codec (RFC 8489) with the TURN attributes of RFC 8656 / RFC 6156.
//!
//! The parser borrows the datagram and records attribute positions in a fixed-size
//! table, so parsing never allocates and never panics on hostile bytes. The writer
//! appends to a caller-owned `Vec<u8>` that the server reuses between packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
pub const HEADER_LEN: usize = 20;
/// XOR'd into the CRC-32 so FINGERPRINT can tell STUN apart from other protocols.
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// More attributes than any legitimate TURN request carries; bounds parsing work.
pub const MAX_ATTRS: usize = 32;

pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
}

pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x000,
            Class::Indication => 0x010,
            Class::Success => 0x100,
            Class::Error => 0x110,
        }
    }
}

/// Packs method and class into the 14-bit STUN message type (RFC 8489 §5).
pub fn message_type(method: u16, class: Class) -> u16 {
    let m = method & 0x0FFF;
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | class.bits()
}

fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = match t & 0x0110 {
        0x000 => Class::Request,
        0x010 => Class::Indication,
        0x100 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("message shorter than a STUN header")]
    TooShort,
    #[error("first two bits are not zero")]
    NotStun,
    #[error("bad magic cookie")]
    BadCookie,
    #[error("length field does not match the datagram")]
    BadLength,
    #[error("attribute runs past the end of the message")]
    TruncatedAttribute,
    #[error("too many attributes")]
    TooManyAttributes,
    #[error("attribute after FINGERPRINT")]
    AttributeAfterFingerprint,
    #[error("malformed attribute value")]
    BadAttribute,
}

#[derive(Clone, Copy, Debug, Default)]
struct AttrPos {
    typ: u16,
    /// Offset of the attribute header in the message.
    offset: u16,
    len: u16,
}

/// A parsed, borrowed STUN message.
pub struct Message<'a> {
    pub method: u16,
    pub class: Class,
    pub tid: [u8; 12],
    raw: &'a [u8],
    attrs: [AttrPos; MAX_ATTRS],
    n_attrs: usize,
    /// Index into `attrs` of MESSAGE-INTEGRITY; later attributes (other than
    /// MESSAGE-INTEGRITY-SHA256 and FINGERPRINT) must be ignored.
    integrity_idx: Option<usize>,
}

impl<'a> Message<'a> {
    /// Cheap check used to demultiplex STUN from ChannelData / other traffic.
    pub fn looks_like_stun(buf: &[u8]) -> bool {
        buf.len() >= HEADER_LEN
            && buf[0] & 0xC0 == 0
            && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == MAGIC_COOKIE
    }

    pub fn parse(raw: &'a [u8]) -> Result<Self, ParseError> {
        if raw.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if raw[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        let len = u16::from_be_bytes([raw[2], raw[3]]) as usize;
        if !len.is_multiple_of(4) || HEADER_LEN + len != raw.len() || raw.len() > u16::MAX as usize
        {
            return Err(ParseError::BadLength);
        }
        if u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]) != MAGIC_COOKIE {
            return Err(ParseError::BadCookie);
        }
        let (method, class) = split_type(u16::from_be_bytes([raw[0], raw[1]]));
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&raw[8..20]);
        let mut msg = Message {
            method,
            class,
            tid,
            raw,
            attrs: [AttrPos::default(); MAX_ATTRS],
            n_attrs: 0,
            integrity_idx: None,
        };
        let mut off = HEADER_LEN;
        let mut seen_fingerprint = false;
        while off < raw.len() {
            if seen_fingerprint {
                return Err(ParseError::AttributeAfterFingerprint);
            }
            if off + 4 > raw.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            let typ = u16::from_be_bytes([raw[off], raw[off + 1]]);
            let alen = u16::from_be_bytes([raw[off + 2], raw[off + 3]]) as usize;
            let padded = (alen + 3) & !3;
            if off + 4 + padded > raw.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            if msg.n_attrs == MAX_ATTRS {
                return Err(ParseError::TooManyAttributes);
            }
            let after_integrity = msg.integrity_idx.is_some();
            // After MESSAGE-INTEGRITY only MI-SHA256 and FINGERPRINT count (RFC 8489 §14.5).
            if !after_integrity || typ == attr::FINGERPRINT || typ == attr::MESSAGE_INTEGRITY_SHA256
            {
                if typ == attr::MESSAGE_INTEGRITY && msg.integrity_idx.is_none() {
                    if alen != 20 {
                        return Err(ParseError::BadAttribute);
                    }
                    msg.integrity_idx = Some(msg.n_attrs);
                }
                if typ == attr::FINGERPRINT {
                    if alen != 4 {
                        return Err(ParseError::BadAttribute);
                    }
                    seen_fingerprint = true;
                }
                if typ == attr::MESSAGE_INTEGRITY_SHA256 && !(16..=32).contains(&alen) {
                    return Err(ParseError::BadAttribute);
                }
                msg.attrs[msg.n_attrs] = AttrPos {
                    typ,
                    offset: off as u16,
                    len: alen as u16,
                };
                msg.n_attrs += 1;
            }
            off += 4 + padded;
        }
        Ok(msg)
    }

    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    fn pos(&self, typ: u16) -> Option<AttrPos> {
        self.attrs[..self.n_attrs]
            .iter()
            .find(|a| a.typ == typ)
            .copied()
    }

    pub fn has(&self, typ: u16) -> bool {
        self.pos(typ).is_some()
    }

    /// Value of the first attribute of this type.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.pos(typ).map(|p| self.value(p))
    }

    fn value(&self, p: AttrPos) -> &'a [u8] {
        let start = p.offset as usize + 4;
        &self.raw[start..start + p.len as usize]
    }

    /// Every attribute of this type, in order (e.g. several XOR-PEER-ADDRESS).
    pub fn get_all(&self, typ: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.attrs[..self.n_attrs]
            .iter()
            .filter(move |a| a.typ == typ)
            .map(|p| self.value(*p))
    }

    pub fn attr_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.attrs[..self.n_attrs].iter().map(|a| a.typ)
    }

    pub fn get_str(&self, typ: u16) -> Result<Option<&'a str>, ParseError> {
        match self.get(typ) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v)
                .map(Some)
                .map_err(|_| ParseError::BadAttribute),
        }
    }

    pub fn get_u32(&self, typ: u16) -> Result<Option<u32>, ParseError> {
        match self.get(typ) {
            None => Ok(None),
            Some(v) if v.len() == 4 => Ok(Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))),
            Some(_) => Err(ParseError::BadAttribute),
        }
    }

    pub fn get_xor_addr(&self, typ: u16) -> Result<Option<SocketAddr>, ParseError> {
        match self.get(typ) {
            None => Ok(None),
            Some(v) => decode_xor_addr(v, &self.tid).map(Some),
        }
    }

    /// Which integrity attribute the client used, if any.
    pub fn integrity_kind(&self) -> Option<Integrity> {
        if self.has(attr::MESSAGE_INTEGRITY_SHA256) {
            Some(Integrity::Sha256)
        } else if self.integrity_idx.is_some() {
            Some(Integrity::Sha1)
        } else {
            None
        }
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY.
    /// Returns false if neither is present.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        if let Some(p) = self.pos(attr::MESSAGE_INTEGRITY_SHA256) {
            let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
                return false;
            };
            self.feed_prefix(&mut mac, p);
            let full = mac.finalize().into_bytes();
            let got = self.value(p);
            return constant_time_eq(&full[..got.len()], got);
        }
        if let Some(idx) = self.integrity_idx {
            let p = self.attrs[idx];
            let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(key) else {
                return false;
            };
            self.feed_prefix(&mut mac, p);
            let full = mac.finalize().into_bytes();
            return constant_time_eq(&full, self.value(p));
        }
        false
    }

    /// HMAC input: the header with its length rewritten to end just after the
    /// integrity attribute, then everything before that attribute.
    fn feed_prefix<M: Mac>(&self, mac: &mut M, p: AttrPos) {
        let end = p.offset as usize + 4 + ((p.len as usize + 3) & !3);
        let len = (end - HEADER_LEN) as u16;
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&self.raw[..HEADER_LEN]);
        hdr[2..4].copy_from_slice(&len.to_be_bytes());
        mac.update(&hdr);
        mac.update(&self.raw[HEADER_LEN..p.offset as usize]);
    }

    /// Checks FINGERPRINT; `None` if the message has none.
    pub fn verify_fingerprint(&self) -> Option<bool> {
        let p = self.pos(attr::FINGERPRINT)?;
        let crc = crc32fast::hash(&self.raw[..p.offset as usize]) ^ FINGERPRINT_XOR;
        let v = self.value(p);
        Some(v == crc.to_be_bytes())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Integrity {
    Sha1,
    Sha256,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn decode_xor_addr(v: &[u8], tid: &[u8; 12]) -> Result<SocketAddr, ParseError> {
    if v.len() < 4 {
        return Err(ParseError::BadAttribute);
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match (v[1], v.len()) {
        (0x01, 8) => {
            let mut a = [0u8; 4];
            for i in 0..4 {
                a[i] = v[4 + i] ^ cookie[i];
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        (0x02, 20) => {
            let mut a = [0u8; 16];
            for i in 0..16 {
                let k = if i < 4 { cookie[i] } else { tid[i - 4] };
                a[i] = v[4 + i] ^ k;
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => Err(ParseError::BadAttribute),
    }
}

/// ERROR-CODE values this server sends, with the reason phrases of RFC 8489 / 8656.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    UnknownAttribute,
    AllocationMismatch,
    StaleNonce,
    AddressFamilyNotSupported,
    WrongCredentials,
    UnsupportedTransport,
    PeerAddressFamilyMismatch,
    AllocationQuotaReached,
    ServerError,
    InsufficientCapacity,
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::UnknownAttribute => 420,
            ErrorCode::AllocationMismatch => 437,
            ErrorCode::StaleNonce => 438,
            ErrorCode::AddressFamilyNotSupported => 440,
            ErrorCode::WrongCredentials => 441,
            ErrorCode::UnsupportedTransport => 442,
            ErrorCode::PeerAddressFamilyMismatch => 443,
            ErrorCode::AllocationQuotaReached => 486,
            ErrorCode::ServerError => 500,
            ErrorCode::InsufficientCapacity => 508,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "Bad Request",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::UnknownAttribute => "Unknown Attribute",
            ErrorCode::AllocationMismatch => "Allocation Mismatch",
            ErrorCode::StaleNonce => "Stale Nonce",
            ErrorCode::AddressFamilyNotSupported => "Address Family not Supported",
            ErrorCode::WrongCredentials => "Wrong Credentials",
            ErrorCode::UnsupportedTransport => "Unsupported Transport Protocol",
            ErrorCode::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            ErrorCode::AllocationQuotaReached => "Allocation Quota Reached",
            ErrorCode::ServerError => "Server Error",
            ErrorCode::InsufficientCapacity => "Insufficient Capacity",
        }
    }
}

/// Reads ERROR-CODE (used by tests and clients).
pub fn decode_error_code(v: &[u8]) -> Option<(u16, &str)> {
    if v.len() < 4 {
        return None;
    }
    let code = (v[2] & 0x07) as u16 * 100 + v[3] as u16;
    Some((code, std::str::from_utf8(&v[4..]).ok()?))
}

/// Appends one STUN message to a buffer. Attributes are added in order;
/// integrity and fingerprint must be last.
pub struct Writer<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
}

impl<'b> Writer<'b> {
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: &[u8; 12]) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(tid);
        Writer { buf, start }
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - self.start - HEADER_LEN) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Adds an attribute; values longer than 65535 bytes are truncated, which
    /// callers avoid by bounding what they put in.
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let len = value.len().min(u16::MAX as usize);
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        self.buf.extend_from_slice(&value[..len]);
        let pad = (4 - len % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self.set_len();
        self
    }

    pub fn u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    pub fn xor_addr(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let tid: [u8; 12] = self.buf[self.start + 8..self.start + 20]
            .try_into()
            .unwrap_or([0; 12]);
        let v = encode_xor_addr(addr, &tid);
        let n = if addr.is_ipv4() { 8 } else { 20 };
        self.attr(typ, &v[..n])
    }

    pub fn error(&mut self, e: ErrorCode) -> &mut Self {
        let code = e.code();
        let reason = e.reason().as_bytes();
        let mut v = [0u8; 64];
        v[2] = (code / 100) as u8;
        v[3] = (code % 100) as u8;
        let n = reason.len().min(60);
        v[4..4 + n].copy_from_slice(&reason[..n]);
        self.attr(attr::ERROR_CODE, &v[..4 + n])
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1 with the long-term key).
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let hdr_len = self.buf.len() - self.start - HEADER_LEN + 24;
        self.mac_attr::<Hmac<sha1::Sha1>>(attr::MESSAGE_INTEGRITY, key, hdr_len, 20)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (full 32 bytes).
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let hdr_len = self.buf.len() - self.start - HEADER_LEN + 36;
        self.mac_attr::<Hmac<sha2::Sha256>>(attr::MESSAGE_INTEGRITY_SHA256, key, hdr_len, 32)
    }

    fn mac_attr<M: Mac + hmac::digest::KeyInit>(
        &mut self,
        typ: u16,
        key: &[u8],
        hdr_len: usize,
        n: usize,
    ) -> &mut Self {
        let Ok(mut mac) = <M as Mac>::new_from_slice(key) else {
            return self;
        };
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        hdr[2..4].copy_from_slice(&(hdr_len as u16).to_be_bytes());
        mac.update(&hdr);
        mac.update(&self.buf[self.start + HEADER_LEN..]);
        let out = mac.finalize().into_bytes();
        let mut v = [0u8; 32];
        v[..n].copy_from_slice(&out[..n]);
        self.attr(typ, &v[..n])
    }

    pub fn fingerprint(&mut self) -> &mut Self {
        // The length field must already count the FINGERPRINT attribute.
        let len = (self.buf.len() - self.start - HEADER_LEN + 8) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&self.buf[self.start..]) ^ FINGERPRINT_XOR;
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes())
    }
}

pub fn encode_xor_addr(addr: SocketAddr, tid: &[u8; 12]) -> [u8; 20] {
    let mut v = [0u8; 20];
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    v[2..4].copy_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            v[1] = 0x01;
            for (i, b) in ip.octets().iter().enumerate() {
                v[4 + i] = b ^ cookie[i];
            }
        }
        IpAddr::V6(ip) => {
            v[1] = 0x02;
            for (i, b) in ip.octets().iter().enumerate() {
                let k = if i < 4 { cookie[i] } else { tid[i - 4] };
                v[4 + i] = b ^ k;
            }
        }
    }
    v
}

/// ChannelData framing (RFC 8656 §12.4). Channel numbers 0x4000..=0x7FFF
/// (the RFC 5766 range, which coturn's clients still use).
pub fn is_channel_data(buf: &[u8]) -> bool {
    !buf.is_empty() && (0x40..=0x7F).contains(&buf[0])
}

/// Length of the next complete STUN or ChannelData frame at the start of a
/// stream buffer, including ChannelData padding to 4 bytes (required on
/// TCP/TLS). `Ok(None)` means more bytes are needed; `Err` means the stream
/// is not TURN and should be closed.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, ParseError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let total = if buf[0] & 0xC0 == 0 {
        if !len.is_multiple_of(4) {
            return Err(ParseError::BadLength);
        }
        HEADER_LEN + len
    } else if is_channel_data(buf) {
        4 + ((len + 3) & !3)
    } else {
        return Err(ParseError::NotStun);
    };
    Ok(if buf.len() >= total {
        Some(total)
    } else {
        None
    })
}
