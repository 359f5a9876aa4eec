//! `chorus turn --config FILE` as an operator runs it: the real binary, a real file, and
//! the relay answering on the address the file names.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let p = std::env::temp_dir().join(format!("chorus-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write config file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills the relay even when an assertion fails first.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `chorus` with no CHORUS_* variables inherited, so only the file configures it.
fn chorus() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chorus"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHORUS_") {
            c.env_remove(k);
        }
    }
    c
}

/// A loopback port free for both UDP and TCP (the relay listens on both).
fn free_port() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("udp addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

fn binding_request() -> [u8; 20] {
    let mut req = [0u8; 20];
    req[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    // Length 0: no attributes.
    req[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    req[8..20].copy_from_slice(&rand_bytes());
    req
}

fn rand_bytes() -> [u8; 12] {
    // Enough to tell our transaction apart; no need for a crypto RNG in a test.
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        ^ u128::from(std::process::id());
    let mut out = [0u8; 12];
    out.copy_from_slice(&seed.to_le_bytes()[..12]);
    out
}

/// Sends Binding requests until a response with our transaction id comes back.
fn stun_binding(addr: SocketAddr, within: Duration, relay: &mut Running) -> Vec<u8> {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let req = binding_request();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        if let Ok(Some(status)) = relay.0.try_wait() {
            panic!("chorus turn exited early: {status}");
        }
        let _ = sock.send_to(&req, addr);
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == addr && n >= 20 && buf[8..20] == req[8..20] {
                return buf[..n].to_vec();
            }
        }
    }
    panic!("no STUN answer from {addr} within {within:?}");
}

#[test]
fn turn_relay_takes_its_settings_from_the_config_file() {
    let dir = TempDir::new("config-turn");
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = dir.write(
        "turn.toml",
        &format!(
            "# a test relay\n\
             listen = \"{listen}\"\n\
             realm = \"config.test\"\n\
             user = [\"ana:pw-one\", \"bo:pw-two\"]\n\
             allow-loopback-peers = true\n\
             min-port = 40000\n\
             max-port = 40100\n"
        ),
    );
    let child = chorus()
        .arg("turn")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chorus turn");
    let mut relay = Running(child);
    let resp = stun_binding(listen, Duration::from_secs(20), &mut relay);
    assert_eq!(
        &resp[0..2],
        &[0x01, 0x01],
        "expected a Binding success response"
    );
    assert_eq!(&resp[4..8], &0x2112_A442u32.to_be_bytes());
}

#[test]
fn unknown_key_stops_the_relay_with_the_key_named() {
    let dir = TempDir::new("config-bad");
    let config = dir.write(
        "turn.toml",
        "listen = \"127.0.0.1:0\"\nrelay-ipp = \"127.0.0.1\"\n",
    );
    let out = chorus()
        .arg("turn")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("run chorus turn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(stderr.contains("unknown key `relay-ipp`"), "{stderr}");
    assert!(stderr.contains("did you mean `relay-ip`?"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}

#[test]
fn config_file_from_the_environment_and_help_names_the_flag() {
    let dir = TempDir::new("config-env");
    let config = dir.write("turn.toml", "listen = [\"not\", \"one\"]\n");
    let out = chorus()
        .args(["turn"])
        .env("CHORUS_CONFIG", &config)
        .stdin(Stdio::null())
        .output()
        .expect("run chorus turn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(
        stderr.contains("`listen` must be a single string or number, not an array"),
        "{stderr}"
    );

    // --help works even with that broken file, and explains --config.
    let out = chorus()
        .args(["turn", "--help"])
        .env("CHORUS_CONFIG", &config)
        .output()
        .expect("run chorus turn --help");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("--config <FILE>"), "{stdout}");
    assert!(stdout.contains("CHORUS_CONFIG"), "{stdout}");
}
