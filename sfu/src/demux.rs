//! Just enough STUN parsing to route a datagram to its participant: every participant's
//! `Rtc` has its own ICE ufrag, and ICE binding requests carry `USERNAME = <our ufrag>:
//! <their ufrag>`. Once a request from a source address has been seen, later datagrams
//! from that address (DTLS, SRTP) are routed by address. Both lookups are hash-map hits,
//! never a scan over participants.

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const ATTR_USERNAME: u16 = 0x0006;

/// True if the datagram looks like STUN (RFC 7983 demultiplexing: first byte 0..=3 and
/// the magic cookie in place).
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= 20 && buf[0] < 4 && buf[4..8] == MAGIC_COOKIE
}

/// True if the datagram is (S)RTP media rather than RTCP, STUN or DTLS (RFC 7983: first
/// byte 128..=191; RFC 5761: RTCP packet types 192..=223 in the second byte). The
/// node may shed these under overload: audio is useless once late, while the rest
/// carries connection state and chat.
pub fn is_rtp_media(buf: &[u8]) -> bool {
    buf.len() >= 12 && (128..=191).contains(&buf[0]) && !(192..=223).contains(&buf[1])
}

/// The local (our) ufrag from a STUN message's USERNAME attribute, if present and sane.
/// Returns `None` for anything malformed; never panics on hostile input.
pub fn stun_local_ufrag(buf: &[u8]) -> Option<&str> {
    if !is_stun(buf) {
        return None;
    }
    let declared = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let end = 20usize.checked_add(declared)?;
    let body = buf.get(20..end)?;
    let mut i = 0usize;
    while i + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[i], body[i + 1]]);
        let len = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
        let value = body.get(i + 4..i + 4 + len)?;
        if typ == ATTR_USERNAME {
            let s = std::str::from_utf8(value).ok()?;
            let local = s.split(':').next()?;
            return (!local.is_empty()).then_some(local);
        }
        // Attributes are padded to 4 bytes.
        i += 4 + len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_media_is_told_from_rtcp_stun_and_dtls() {
        let mut rtp = vec![0x80u8, 111, 0, 1];
        rtp.resize(40, 0);
        assert!(is_rtp_media(&rtp));
        let mut marker = rtp.clone();
        marker[1] = 0x80 | 111; // marker bit set, PT 111
        assert!(is_rtp_media(&marker));
        for rtcp_pt in [200u8, 201, 205, 206] {
            let mut rtcp = rtp.clone();
            rtcp[1] = rtcp_pt;
            assert!(!is_rtp_media(&rtcp), "RTCP {rtcp_pt}");
        }
        let mut dtls = rtp.clone();
        dtls[0] = 22; // handshake record
        assert!(!is_rtp_media(&dtls));
        let mut stun = rtp.clone();
        stun[0] = 0;
        assert!(!is_rtp_media(&stun));
        assert!(!is_rtp_media(&rtp[..8]));
        assert!(!is_rtp_media(&[]));
    }

    fn stun_with_username(user: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&0x8022u16.to_be_bytes()); // SOFTWARE first, to skip over
        attrs.extend_from_slice(&3u16.to_be_bytes());
        attrs.extend_from_slice(b"abc\0");
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(user.len() as u16).to_be_bytes());
        attrs.extend_from_slice(user);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn finds_local_ufrag() {
        let m = stun_with_username(b"srvU:cli1");
        assert_eq!(stun_local_ufrag(&m), Some("srvU"));
    }

    #[test]
    fn hostile_input_is_none() {
        assert_eq!(stun_local_ufrag(&[]), None);
        assert_eq!(stun_local_ufrag(&[0u8; 19]), None);
        let mut m = stun_with_username(b"srvU:cli1");
        // Declared length beyond the buffer.
        m[2] = 0xff;
        assert_eq!(stun_local_ufrag(&m), None);
        let mut m = stun_with_username(b"srvU:cli1");
        // Attribute length beyond the body.
        let n = m.len();
        m[n - 12] = 0xff;
        assert_eq!(stun_local_ufrag(&m), None);
        assert_eq!(stun_local_ufrag(&stun_with_username(&[0xff, 0xfe])), None);
        assert_eq!(stun_local_ufrag(&stun_with_username(b":x")), None);
        // RTP is not STUN.
        let mut rtp = vec![0x80u8; 40];
        rtp[4..8].copy_from_slice(&MAGIC_COOKIE);
        assert!(!is_stun(&rtp));
    }

    #[test]
    fn fuzzish_never_panics() {
        let base = stun_with_username(b"abcd:efgh");
        for cut in 0..base.len() {
            let _ = stun_local_ufrag(&base[..cut]);
        }
        let mut x: u32 = 1;
        for _ in 0..2000 {
            let mut m = base.clone();
            for b in m.iter_mut().skip(20) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if x.is_multiple_of(7) {
                    *b = x as u8;
                }
            }
            let _ = stun_local_ufrag(&m);
        }
    }
}
