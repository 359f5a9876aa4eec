//! Interop: coturn's real client tools (`turnutils_uclient`, `turnutils_peer`)
//! against OUR relay, started in-process on loopback. Set CHORUS_SKIP_COTURN=1 to
//! skip when coturn is not installed; otherwise missing tools fail the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_turn::{rest_credentials, run, TurnArgs};
use tokio::process::{Child, Command};

const UCLIENT: &str = "/usr/bin/turnutils_uclient";
const PEER: &str = "/usr/bin/turnutils_peer";
const SECRET: &str = "interop-secret";

fn tools_present() -> bool {
    let have = Path::new(UCLIENT).exists() && Path::new(PEER).exists();
    if !have {
        if std::env::var("CHORUS_SKIP_COTURN").as_deref() == Ok("1") {
            eprintln!("coturn tools missing; skipped because CHORUS_SKIP_COTURN=1");
            return false;
        }
        panic!(
            "coturn client tools not found ({UCLIENT}, {PEER}). Install them with \
             `apt-get install coturn`, or set CHORUS_SKIP_COTURN=1 to skip this test."
        );
    }
    true
}

struct Server {
    addr: SocketAddr,
    tls: Option<SocketAddr>,
    metrics: std::sync::Arc<chorus_turn::core::Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: Option<TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn base_args() -> TurnArgs {
    let mut a = TurnArgs::new();
    a.listen = "127.0.0.1:0".parse().unwrap();
    a.auth_secret = Some(SECRET.into());
    a.users = vec!["static:staticpw".into()];
    a.allow_loopback_peers = true;
    a
}

/// Self-signed certificate via the openssl CLI (coturn's client does not verify it).
fn make_cert(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("chorus-turn-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl CLI needed to make a test certificate");
    assert!(st.success());
    (TempDir(dir), cert, key)
}

async fn start(mut args: TurnArgs, tls: bool) -> Server {
    let mut dir = None;
    if tls {
        let (d, c, k) = make_cert("tls");
        args.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        args.cert = Some(c);
        args.key = Some(k);
        dir = Some(d);
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = run(args, async {
        let _ = rx.await;
    })
    .await
    .expect("start TURN server");
    Server {
        addr: running.udp_addr,
        tls: running.tls_addr,
        metrics: running.metrics(),
        stop: Some(tx),
        _dir: dir,
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `turnutils_peer` (killed on drop) and its UDP port.
struct Peer(#[allow(dead_code)] Child, u16);

async fn start_peer() -> Peer {
    let port = free_udp_port();
    let child = Command::new(PEER)
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn turnutils_peer");
    tokio::time::sleep(Duration::from_millis(300)).await;
    Peer(child, port)
}

/// Runs turnutils_uclient; returns combined stdout+stderr.
async fn uclient(port: u16, extra: &[&str]) -> String {
    uclient_to("127.0.0.1", port, extra).await
}

async fn uclient_to(host: &str, port: u16, extra: &[&str]) -> String {
    let mut cmd = Command::new(UCLIENT);
    cmd.args(extra)
        .args(["-p", &port.to_string(), host])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("uclient timed out")
        .expect("run uclient");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

/// Extracts the percentage from uclient's "Total lost packets N (P%)" line.
fn loss(out: &str) -> Option<(u64, f64)> {
    let line = out.lines().find(|l| l.contains("Total lost packets"))?;
    let after = line.split("Total lost packets").nth(1)?.trim();
    let n: u64 = after.split_whitespace().next()?.parse().ok()?;
    let pct = after
        .split('(')
        .nth(1)?
        .split('%')
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some((n, pct))
}

fn received(out: &str) -> Option<u64> {
    // The last "tot_recv_msgs=" line is the final total.
    let l = out.lines().rfind(|l| l.contains("tot_recv_msgs="))?;
    l.split("tot_recv_msgs=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn assert_no_loss(what: &str, out: &str) {
    let Some((n, pct)) = loss(out) else {
        panic!("{what}: no loss summary in uclient output:\n{out}");
    };
    assert!(
        n == 0 && pct == 0.0,
        "{what}: lost {n} packets ({pct}%):\n{out}"
    );
    if let Some(r) = received(out) {
        assert!(r > 0, "{what}: nothing received:\n{out}");
    }
    eprintln!("{what}: 0% loss");
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn rest_user() -> (String, String) {
    rest_credentials(SECRET, "interop", Duration::from_secs(600), now_unix())
}

const LOAD: [&str; 8] = ["-n", "100", "-m", "4", "-l", "170", "-z", "5"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_rest_credentials_with_peer() {
    if !tools_present() {
        return;
    }
    let srv = start(base_args(), false).await;
    let peer = start_peer().await;
    let (u, p) = rest_user();
    let mut args = vec!["-c", "-u", &u, "-w", &p, "-e", "127.0.0.1"];
    let pp = peer.1.to_string();
    args.extend(["-r", &pp]);
    args.extend(LOAD);
    let out = uclient(srv.addr.port(), &args).await;
    assert_no_loss("UDP/REST/peer", &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_rest_secret_client_to_client_channels_and_send() {
    if !tools_present() {
        return;
    }
    let srv = start(base_args(), false).await;
    // -W: uclient mints the REST username/password itself from the shared secret.
    let mut args = vec!["-c", "-y", "-u", "interop", "-W", SECRET];
    args.extend(LOAD);
    let out = uclient(srv.addr.port(), &args).await;
    assert_no_loss("UDP/-W/client-to-client/channels", &out);
    // -s: Send/Data indications instead of channels.
    let mut args = vec!["-c", "-y", "-s", "-u", "interop", "-W", SECRET];
    args.extend(LOAD);
    let out = uclient(srv.addr.port(), &args).await;
    assert_no_loss("UDP/-W/client-to-client/indications", &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_static_user() {
    if !tools_present() {
        return;
    }
    let srv = start(base_args(), false).await;
    let mut args = vec!["-t", "-c", "-y", "-u", "static", "-w", "staticpw"];
    args.extend(LOAD);
    let out = uclient(srv.addr.port(), &args).await;
    assert_no_loss("TCP/static/client-to-client", &out);
    // Odd message length exercises ChannelData padding on the stream.
    let out = uclient(
        srv.addr.port(),
        &[
            "-t", "-c", "-y", "-u", "static", "-w", "staticpw", "-n", "50", "-l", "101", "-m", "2",
        ],
    )
    .await;
    assert_no_loss("TCP/static/odd-length", &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_rest_and_static() {
    if !tools_present() {
        return;
    }
    let srv = start(base_args(), true).await;
    let tls_port = srv.tls.unwrap().port();
    let (u, p) = rest_user();
    let mut args = vec!["-t", "-S", "-c", "-y", "-u", &u, "-w", &p];
    args.extend(LOAD);
    let out = uclient(tls_port, &args).await;
    assert_no_loss("TLS/REST/client-to-client", &out);
    let mut args = vec!["-t", "-S", "-c", "-y", "-u", "static", "-w", "staticpw"];
    args.extend(LOAD);
    let out = uclient(tls_port, &args).await;
    assert_no_loss("TLS/static/client-to-client", &out);
}

/// uclient reports a failed allocation in several ways; all mean "no relaying".
/// uclient prints the code for some errors (403, 486) but not for 401, which it
/// only reports as "Cannot complete Allocation"; 401s are confirmed through our
/// auth-failure counter instead.
fn assert_refused(what: &str, out: &str, code: Option<&str>) {
    let relayed = loss(out).is_some_and(|(n, _)| n == 0) && received(out).is_some_and(|r| r > 0);
    assert!(
        !relayed,
        "{what}: expected failure but relaying worked:\n{out}"
    );
    match code {
        Some(code) => assert!(
            out.contains(code),
            "{what}: expected error {code} in output:\n{out}"
        ),
        None => assert!(
            out.contains("Cannot complete Allocation"),
            "{what}: expected an allocation failure:\n{out}"
        ),
    }
    eprintln!("{what}: refused as expected");
}

fn auth_failures(srv: &Server) -> u64 {
    srv.metrics
        .auth_failures
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_wrong_password_and_expired_rest() {
    if !tools_present() {
        return;
    }
    let srv = start(base_args(), false).await;
    let out = uclient(
        srv.addr.port(),
        &[
            "-c", "-y", "-u", "static", "-w", "WRONG", "-n", "5", "-m", "1",
        ],
    )
    .await;
    assert_refused("wrong password", &out, None);
    let after_wrong = auth_failures(&srv);
    assert!(after_wrong > 0, "server saw no auth failure");
    assert_eq!(
        srv.metrics
            .allocations_total
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let (u, p) = rest_credentials(SECRET, "late", Duration::from_secs(10), now_unix() - 3600);
    let out = uclient(
        srv.addr.port(),
        &["-c", "-y", "-u", &u, "-w", &p, "-n", "5", "-m", "1"],
    )
    .await;
    assert_refused("expired REST username", &out, None);
    assert!(
        auth_failures(&srv) > after_wrong,
        "expired username was not rejected by auth"
    );
    assert_eq!(
        srv.metrics
            .allocations_total
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_loopback_peer_forbidden_by_default() {
    if !tools_present() {
        return;
    }
    let mut a = base_args();
    a.allow_loopback_peers = false;
    let srv = start(a, false).await;
    let peer = start_peer().await;
    let pp = peer.1.to_string();
    let out = uclient(
        srv.addr.port(),
        &[
            "-c",
            "-u",
            "static",
            "-w",
            "staticpw",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "5",
            "-m",
            "1",
        ],
    )
    .await;
    assert_refused("loopback peer", &out, Some("403"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_user_quota() {
    if !tools_present() {
        return;
    }
    let mut a = base_args();
    a.user_quota = Some(1);
    let srv = start(a, false).await;
    // -y needs two allocations for the same user: the second must get 486.
    let out = uclient(
        srv.addr.port(),
        &[
            "-c", "-y", "-u", "static", "-w", "staticpw", "-n", "5", "-m", "1",
        ],
    )
    .await;
    assert_refused("user quota", &out, Some("486"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_default_rtp_rtcp_pairs() {
    if !tools_present() {
        return;
    }
    let srv = start(base_args(), false).await;
    let mut args = vec!["-y", "-u", "static", "-w", "staticpw"];
    args.extend(LOAD);
    let out = uclient(srv.addr.port(), &args).await;
    assert_no_loss("UDP/static/RTP+RTCP (EVEN-PORT)", &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_udp_and_tcp() {
    if !tools_present() {
        return;
    }
    let mut a = base_args();
    a.listen = "[::1]:0".parse().unwrap();
    a.relay_ip = "::1".parse().unwrap();
    let srv = start(a, false).await;
    for (what, extra) in [("IPv6/UDP", None), ("IPv6/TCP", Some("-t"))] {
        // -x asks for an IPv6 relay (REQUESTED-ADDRESS-FAMILY, RFC 6156).
        let mut args = vec!["-c", "-y", "-x", "-u", "static", "-w", "staticpw"];
        args.extend(extra);
        args.extend(LOAD);
        let out = uclient_to("::1", srv.addr.port(), &args).await;
        assert_no_loss(what, &out);
    }
}
