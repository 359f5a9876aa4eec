//! The socket shell end to end with our own STUN codec as the client (no coturn
//! needed): port-0 binding, UDP Binding, TCP Allocate + ChannelData relaying,
//! metrics endpoint, and shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use chorus_turn::auth::long_term_key;
use chorus_turn::stun::{attr, decode_error_code, method, Class, Message, Writer};
use chorus_turn::{run, TurnArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn args() -> TurnArgs {
    let mut a = TurnArgs::new();
    a.listen = "127.0.0.1:0".parse().unwrap();
    a.metrics = Some("127.0.0.1:0".parse().unwrap());
    a.users = vec!["u:p".into()];
    a.allow_loopback_peers = true;
    a
}

async fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut hdr = [0u8; 4];
    s.read_exact(&mut hdr).await.unwrap();
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let body = if hdr[0] & 0xC0 == 0 {
        16 + len
    } else {
        (len + 3) & !3
    };
    let mut v = hdr.to_vec();
    v.resize(4 + body, 0);
    s.read_exact(&mut v[4..]).await.unwrap();
    v
}

/// Starts the relay; it runs until the returned sender is dropped or fired.
async fn start(a: TurnArgs) -> (chorus_turn::RunningTurn, tokio::sync::oneshot::Sender<()>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = run(a, async {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    (srv, stop_tx)
}

/// A UDP Allocate for the static user u:p; unauthenticated without a nonce (the
/// server then answers 401 with one).
fn allocate_request(nonce: Option<&str>, tid: u8) -> Vec<u8> {
    let mut b = Vec::new();
    let mut w = Writer::new(&mut b, method::ALLOCATE, Class::Request, &[tid; 12]);
    w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    if let Some(n) = nonce {
        w.attr(attr::USERNAME, b"u");
        w.attr(attr::REALM, b"chorus");
        w.attr(attr::NONCE, n.as_bytes());
        w.integrity(&long_term_key("u", "chorus", "p"));
    }
    b
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn udp_binding_tcp_relay_metrics_and_shutdown() {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = run(args(), async {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    assert_ne!(srv.udp_addr.port(), 0);
    assert_eq!(srv.udp_addr, srv.tcp_addr);

    // UDP Binding.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = Vec::new();
    Writer::new(&mut buf, method::BINDING, Class::Request, &[1; 12]).fingerprint();
    udp.send_to(&buf, srv.udp_addr).await.unwrap();
    let mut rb = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut rb))
        .await
        .unwrap()
        .unwrap();
    let m = Message::parse(&rb[..n]).unwrap();
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(udp.local_addr().unwrap())
    );

    // TCP Allocate: 401 with nonce, then authenticated.
    let mut tcp = TcpStream::connect(srv.tcp_addr).await.unwrap();
    tcp.write_all(&allocate_request(None, 2)).await.unwrap();
    let r = read_frame(&mut tcp).await;
    let m = Message::parse(&r).unwrap();
    assert_eq!(
        m.get(attr::ERROR_CODE)
            .and_then(decode_error_code)
            .unwrap()
            .0,
        401
    );
    let nonce = m.get_str(attr::NONCE).unwrap().unwrap().to_string();
    tcp.write_all(&allocate_request(Some(&nonce), 3))
        .await
        .unwrap();
    let r = read_frame(&mut tcp).await;
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.class, Class::Success);
    let relayed = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(relayed.ip(), srv.relay_ip);

    // ChannelBind to a local UDP "peer", then relay both ways.
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut b = Vec::new();
    let mut w = Writer::new(&mut b, method::CHANNEL_BIND, Class::Request, &[4; 12]);
    w.attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0]);
    w.xor_addr(attr::XOR_PEER_ADDRESS, peer.local_addr().unwrap());
    w.attr(attr::USERNAME, b"u");
    w.attr(attr::REALM, b"chorus");
    w.attr(attr::NONCE, nonce.as_bytes());
    w.integrity(&long_term_key("u", "chorus", "p"));
    tcp.write_all(&b).await.unwrap();
    assert_eq!(
        Message::parse(&read_frame(&mut tcp).await).unwrap().class,
        Class::Success
    );
    // Client → peer, split across two writes to exercise stream reassembly.
    tcp.write_all(&[0x40, 0x01, 0x00, 0x05, b'h', b'e'])
        .await
        .unwrap();
    tcp.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    tcp.write_all(&[b'l', b'l', b'o', 0, 0, 0]).await.unwrap();
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut rb))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&rb[..n], b"hello");
    assert_eq!(from, relayed);
    // Peer → client arrives as padded ChannelData.
    peer.send_to(b"world", relayed).await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut tcp))
        .await
        .unwrap();
    assert_eq!(f, [0x40, 0x01, 0, 5, b'w', b'o', b'r', b'l', b'd', 0, 0, 0]);

    let metrics = http_get(srv.metrics_addr.unwrap(), "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("\nchorus_turn_allocations 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nchorus_turn_relayed_packets_total 2\n"),
        "{metrics}"
    );
    assert!(http_get(srv.metrics_addr.unwrap(), "/nope")
        .await
        .starts_with("HTTP/1.1 404"));

    // Closing the TCP connection frees the allocation.
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(http_get(srv.metrics_addr.unwrap(), "/metrics")
        .await
        .contains("\nchorus_turn_allocations 0\n"));

    let udp_addr = srv.udp_addr;
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), srv.wait())
        .await
        .expect("server stops on shutdown");
    // The listen port is free again.
    UdpSocket::bind(udp_addr).await.unwrap();
}

#[tokio::test]
async fn bad_config_is_an_error() {
    let mut a = args();
    a.users = vec!["nocolon".into()];
    assert!(run(a, async {}).await.is_err());
    let mut a = args();
    a.min_port = 2000;
    a.max_port = 1000;
    assert!(run(a, async {}).await.is_err());
    let mut a = args();
    a.relay_ip = "0.0.0.0".parse().unwrap();
    assert!(run(a, async {}).await.is_err());
}

/// A Binding request over a stream; true if the success response comes back.
async fn stream_binding(s: &mut TcpStream, tid: u8) -> bool {
    let mut b = Vec::new();
    Writer::new(&mut b, method::BINDING, Class::Request, &[tid; 12]).fingerprint();
    if s.write_all(&b).await.is_err() {
        return false;
    }
    match tokio::time::timeout(Duration::from_secs(5), read_frame_or_eof(s)).await {
        Ok(Some(r)) => Message::parse(&r).is_ok_and(|m| m.class == Class::Success),
        _ => false,
    }
}

/// Like `read_frame`, but `None` when the server closed the connection.
async fn read_frame_or_eof(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut hdr = [0u8; 4];
    s.read_exact(&mut hdr).await.ok()?;
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let mut v = hdr.to_vec();
    v.resize(4 + 16 + len, 0);
    s.read_exact(&mut v[4..]).await.ok()?;
    Some(v)
}

/// True once the server has closed `s` (EOF or reset), within `within`.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn idle_and_silent_stream_connections_are_closed() {
    let mut a = args();
    a.idle_timeout = Duration::from_millis(600);
    let (srv, _stop) = start(a).await;

    // Says nothing: closed after the first-frame wait (here the idle timeout).
    let mut silent = TcpStream::connect(srv.tcp_addr).await.unwrap();
    // Dribbles half a STUN header and stops: partial frames are not activity.
    let mut dribbler = TcpStream::connect(srv.tcp_addr).await.unwrap();
    dribbler.write_all(&[0, 1, 0]).await.unwrap();
    // Talks every 200 ms: stays open well past the timeout.
    let mut busy = TcpStream::connect(srv.tcp_addr).await.unwrap();
    for i in 0..8 {
        assert!(
            stream_binding(&mut busy, i).await,
            "busy connection answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed_by_server(&mut silent, Duration::from_secs(5)).await);
    assert!(closed_by_server(&mut dribbler, Duration::from_secs(5)).await);
    // Then idle: closed too.
    assert!(closed_by_server(&mut busy, Duration::from_secs(5)).await);
    assert_eq!(
        srv.metrics()
            .stream_idle_closed
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_and_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut a = args();
    a.max_connections = 2;
    let (srv, _stop) = start(a).await;
    let m = srv.metrics();

    let mut first = TcpStream::connect(srv.tcp_addr).await.unwrap();
    let mut second = TcpStream::connect(srv.tcp_addr).await.unwrap();
    assert!(stream_binding(&mut first, 1).await);
    assert!(stream_binding(&mut second, 2).await);
    assert_eq!(m.stream_connections.load(Relaxed), 2);

    let mut third = TcpStream::connect(srv.tcp_addr).await.unwrap();
    assert!(closed_by_server(&mut third, Duration::from_secs(5)).await);
    assert_eq!(m.stream_rejected.load(Relaxed), 1);
    // The rejection did not disturb the open ones.
    assert!(stream_binding(&mut first, 3).await);

    // A freed slot is usable again.
    drop(second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while m.stream_connections.load(Relaxed) > 1 {
        assert!(tokio::time::Instant::now() < deadline, "slot not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fourth = TcpStream::connect(srv.tcp_addr).await.unwrap();
    assert!(stream_binding(&mut fourth, 4).await);
    let text = http_get(srv.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        text.contains("chorus_turn_stream_rejected_total 1"),
        "{text}"
    );
    assert!(text.contains("chorus_turn_stream_connections 2"), "{text}");
}

#[tokio::test]
async fn external_ip_is_advertised_while_relay_sockets_bind_the_private_one() {
    // 1:1 NAT as on a cloud VM: sockets on the private address (127.0.0.1 here),
    // clients told the public one (127.0.0.2 stands in for it).
    let mut a = args();
    let public: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    a.external_ip = Some(public);
    let (srv, _stop) = start(a).await;

    let mut tcp = TcpStream::connect(srv.tcp_addr).await.unwrap();
    tcp.write_all(&allocate_request(None, 1)).await.unwrap();
    let r = read_frame(&mut tcp).await;
    let m = Message::parse(&r).unwrap();
    let nonce = m.get_str(attr::NONCE).unwrap().unwrap().to_string();
    tcp.write_all(&allocate_request(Some(&nonce), 2))
        .await
        .unwrap();
    let r = read_frame(&mut tcp).await;
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.class, Class::Success);
    let relayed = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(
        relayed.ip(),
        public,
        "clients are told the external address"
    );

    // The socket itself is on the private address: a peer reaching it there (as the
    // NAT would deliver) is relayed to the client.
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut b = Vec::new();
    let mut w = Writer::new(&mut b, method::CREATE_PERMISSION, Class::Request, &[3; 12]);
    w.xor_addr(attr::XOR_PEER_ADDRESS, peer.local_addr().unwrap());
    w.attr(attr::USERNAME, b"u");
    w.attr(attr::REALM, b"chorus");
    w.attr(attr::NONCE, nonce.as_bytes());
    w.integrity(&long_term_key("u", "chorus", "p"));
    tcp.write_all(&b).await.unwrap();
    assert_eq!(
        Message::parse(&read_frame(&mut tcp).await).unwrap().class,
        Class::Success
    );
    let private = SocketAddr::new(srv.relay_ip, relayed.port());
    peer.send_to(b"via-nat", private).await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut tcp))
        .await
        .unwrap();
    let m = Message::parse(&f).unwrap();
    assert_eq!(m.get(attr::DATA), Some(&b"via-nat"[..]));

    // A mismatched family is refused at startup.
    let mut bad = args();
    bad.external_ip = Some("::1".parse().unwrap());
    assert!(chorus_turn::config_from_args(&bad).is_err());
}
