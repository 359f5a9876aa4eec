//! A fleet on loopback, every part a separate process: one `redis-server`, two
//! `chorus signaling --redis` instances, one `chorus sfu` registered with both. Clients
//! (the native client library, real Opus over real sockets) split across the two
//! instances share a room: they hear each other, see each other join, speak, mute and
//! leave, and chat; a late joiner on the other instance gets the chat history; a session
//! that drops resumes on the other instance.
//!
//! Needs the `chorus` binary (cargo builds it for integration tests) and `redis-server`
//! (skipped loudly without it, unless `CHORUS_REQUIRE_REDIS=1`, as in CI).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_native::session::{self, Command as Cmd, Config, Event, Silence};
use chorus_native::signaling::SignalingClient;
use chorus_native::wav::Tone;
use chorus_protocol::chat::ChatServerFrame;
use chorus_protocol::client::{ClientMessage, Grants, ServerMessage};
use chorus_signaling::testing::RedisServer;
use chorus_signaling::token::{mint, participant_claims};
use tokio::sync::mpsc;

const KEY: &str = "fleetkey";
const SECRET: &str = "fleet-secret-0123456789";
const NODE_SECRET: &str = "fleet-node-secret";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop, its stderr kept in a log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chorus");
        let stderr = child.stderr.take().unwrap();
        let path = log.clone();
        std::thread::spawn(move || {
            let mut out = std::fs::File::create(path).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = out.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Instance {
    proc: Proc,
    http: u16,
    control: u16,
    cert: PathBuf,
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    Some(r)
}

fn start_instance(dir: &std::path::Path, name: &str, redis: &str) -> Instance {
    let (http, control) = (free_port(), free_port());
    let cert = dir.join(format!("{name}-control.pem"));
    let proc = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_chorus"))
            .arg("signaling")
            .args(["--listen", &format!("127.0.0.1:{http}")])
            .args(["--control-listen", &format!("127.0.0.1:{control}")])
            .args(["--api-key", &format!("{KEY}:{SECRET}")])
            .args(["--node-secret", NODE_SECRET])
            .arg("--control-cert-out")
            .arg(&cert)
            .arg("--data-dir")
            .arg(dir.join(name))
            .args(["--redis", redis]),
        dir.join(format!("{name}.log")),
    );
    Instance {
        proc,
        http,
        control,
        cert,
    }
}

/// A metric from an instance's `/metrics`.
fn metric(port: u16, name: &str) -> Option<f64> {
    let r = http_get(port, "/metrics")?;
    r.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn wait_until(what: &str, logs: &[&Proc], mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        if Instant::now() > deadline {
            for p in logs {
                eprintln!("---- {} ----\n{}", p.log.display(), p.log());
            }
            panic!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn token(room: &str, identity: &str, name: &str) -> String {
    let claims = participant_claims(
        KEY,
        room,
        identity,
        Some(name),
        Duration::from_secs(600),
        Grants::default_participant(),
    );
    mint(&claims, SECRET).unwrap()
}

/// One client session, and every event it had that no wait has taken yet (events may
/// come in any order: the chat opens while audio starts).
struct Client {
    cmd: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<Event>,
    kept: Vec<Event>,
    task: tokio::task::JoinHandle<anyhow::Result<session::Report>>,
}

impl Client {
    fn start(port: u16, room: &str, name: &str, hz: Option<f64>) -> Client {
        let source: Box<dyn session::AudioSource> = match hz {
            Some(hz) => Box::new(Tone::new(hz, -12.0)),
            None => Box::new(Silence),
        };
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, events) = mpsc::unbounded_channel();
        let mut config = Config::new(
            format!("ws://127.0.0.1:{port}/ws"),
            token(room, &name.to_lowercase(), name),
        );
        // A steady tone: Opus DTX would send it as background noise (a packet every
        // 400 ms once its detector settles), and the tests count packets.
        config.encoder.dtx = false;
        let task = tokio::spawn(session::run(
            config,
            source,
            Box::new(Silence),
            cmd_rx,
            ev_tx,
        ));
        Client {
            cmd,
            events,
            kept: Vec::new(),
            task,
        }
    }

    /// Forgets every event so far: the next waits see only what comes after.
    fn forget(&mut self) {
        self.kept.clear();
        while self.events.try_recv().is_ok() {}
    }

    fn send(&self, c: Cmd) {
        self.cmd.send(c).unwrap();
    }

    /// The first event (kept or new) matching `pred`; fails on the session's end or
    /// after 15 s.
    async fn until(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        if let Some(i) = self.kept.iter().position(&pred) {
            return self.kept.remove(i);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) if pred(&e) => return e,
                Ok(Some(Event::Ended { reason })) => panic!("{what}: session ended: {reason}"),
                Ok(Some(e)) => self.kept.push(e),
                Ok(None) => panic!("{what}: session gone"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    async fn leave(self) -> session::Report {
        self.send(Cmd::Leave);
        let report = self.task.await.unwrap().unwrap();
        assert_eq!(report.end_reason, "left");
        report
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("CHORUS_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Redis, two instances and a node registered with both, all running.
struct Fleet {
    a: Instance,
    b: Instance,
    node: Proc,
    _dir: TempDir,
    _redis: RedisServer,
}

impl Fleet {
    fn start() -> Option<Fleet> {
        let redis = RedisServer::start()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = TempDir(std::env::temp_dir().join(format!(
            "chorus-fleet-{}-{}",
            std::process::id(),
            free_port()
        )));
        std::fs::create_dir_all(&dir.0).unwrap();
        let a = start_instance(&dir.0, "a", &redis.url());
        let b = start_instance(&dir.0, "b", &redis.url());
        wait_until("both instances serve", &[&a.proc, &b.proc], || {
            [a.http, b.http]
                .iter()
                .all(|p| http_get(*p, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")))
                && a.cert.exists()
                && b.cert.exists()
        });
        // Each instance made its own control certificate: the node trusts both.
        let ca = dir.0.join("control-ca.pem");
        let both =
            std::fs::read_to_string(&a.cert).unwrap() + &std::fs::read_to_string(&b.cert).unwrap();
        std::fs::write(&ca, both).unwrap();
        let node = Proc::spawn(
            Command::new(env!("CARGO_BIN_EXE_chorus"))
                .arg("sfu")
                .args(["--signaling", &format!("127.0.0.1:{}", a.control)])
                .args(["--signaling", &format!("127.0.0.1:{}", b.control)])
                .arg("--control-ca")
                .arg(&ca)
                .args(["--node-secret", NODE_SECRET])
                .args(["--node-id", "edge-1"])
                .args(["--media-listen", "127.0.0.1:0"]),
            dir.0.join("node.log"),
        );
        let fleet = Fleet {
            a,
            b,
            node,
            _dir: dir,
            _redis: redis,
        };
        wait_until(
            "the node registers with both instances",
            &fleet.procs(),
            || {
                metric(fleet.a.http, "chorus_signaling_nodes") == Some(1.0)
                    && metric(fleet.b.http, "chorus_signaling_nodes") == Some(1.0)
            },
        );
        Some(fleet)
    }

    fn procs(&self) -> [&Proc; 3] {
        [&self.a.proc, &self.b.proc, &self.node]
    }

    /// Runs `test` and, if it fails, prints every process's log.
    fn run<F: std::future::Future<Output = ()>>(&self, test: F) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(test)));
        if let Err(panic) = ok {
            for p in self.procs() {
                eprintln!("---- {} ----\n{}", p.log.display(), p.log());
            }
            std::panic::resume_unwind(panic);
        }
        // Everyone left: the room is gone from both instances' view.
        wait_until("the room empties everywhere", &self.procs(), || {
            metric(self.a.http, "chorus_signaling_participants") == Some(0.0)
                && metric(self.b.http, "chorus_signaling_participants") == Some(0.0)
        });
    }
}

#[test]
fn clients_on_two_instances_share_a_room_over_redis() {
    let Some(f) = Fleet::start() else {
        return;
    };
    f.run(share_a_room(f.a.http, f.b.http));
}

/// A loopback TCP proxy whose target can be switched: the "load balancer" that sends a
/// reconnecting client to another instance.
async fn proxy(target: Arc<AtomicU16>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = target.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// The client library's reconnect lands on the other instance: the seat resumes there
/// (the node hands the participant over with `adopt`), audio never stops either way,
/// and the new instance serves it (a mute through it is seen).
#[test]
fn a_session_resumes_with_its_media_on_the_other_instance() {
    let Some(f) = Fleet::start() else {
        return;
    };
    let (a, b) = (f.a.http, f.b.http);
    f.run(async move {
        const ROOM: &str = "resume-room";
        let target = Arc::new(AtomicU16::new(a));
        let lb = proxy(target.clone()).await;
        let mut ana = Client::start(lb, ROOM, "Ana", Some(440.0));
        let mut bo = Client::start(b, ROOM, "Bo", Some(880.0));
        ana.until("Ana hears Bo", |e| matches!(e, Event::FirstAudio { .. }))
            .await;
        bo.until("Bo hears Ana", |e| matches!(e, Event::FirstAudio { .. }))
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Ana's socket drops; the balancer now sends her to instance B.
        target.store(b, Ordering::SeqCst);
        ana.send(Cmd::ReconnectSignaling);
        let back = ana
            .until("Ana reconnected", |e| {
                matches!(e, Event::Reconnected { .. })
            })
            .await;
        assert_eq!(back, Event::Reconnected { resumed: true });
        // Instance B holds both seats now; A let go of Ana's.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metric(a, "chorus_signaling_participants") != Some(0.0)
            || metric(b, "chorus_signaling_participants") != Some(2.0)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the seat did not move to B"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Audio goes on both ways; then the new instance carries a mute Bo sees.
        tokio::time::sleep(Duration::from_secs(2)).await;
        ana.send(Cmd::SetMuted(true));
        bo.until(
            "Bo sees Ana muted through B",
            |e| matches!(e, Event::ParticipantUpdated(p) if p.name == "Ana" && p.muted),
        )
        .await;
        // The node reports on Ana to B now: unmuted, she is seen speaking again.
        bo.forget();
        ana.send(Cmd::SetMuted(false));
        bo.until("Bo sees Ana speak again", |e| {
            matches!(e, Event::ParticipantUpdated(p) if p.name == "Ana" && !p.muted && p.speaking)
        })
        .await;
        let ana_report = ana.leave().await;
        let bo_report = bo.leave().await;
        assert_eq!(ana_report.reconnects, 1, "{ana_report:?}");
        // Both kept hearing each other across the move: one stream each (no restart),
        // no loss. (Counts are kept low: a loaded CI machine delays ticks.)
        for (who, r) in [("Ana", &ana_report), ("Bo", &bo_report)] {
            assert_eq!(r.streams.len(), 1, "{who}: {r:?}");
            assert!(r.streams[0].packets > 60, "{who}: {r:?}");
            assert_eq!(r.streams[0].lost, 0, "{who}: {r:?}");
        }
    });
}

async fn share_a_room(a: u16, b: u16) {
    const ROOM: &str = "fleet-room";
    // Ana talks (440 Hz) through instance A, Bo (880 Hz) through instance B.
    let mut ana = Client::start(a, ROOM, "Ana", Some(440.0));
    let joined = ana
        .until("Ana joined", |e| matches!(e, Event::Joined { .. }))
        .await;
    let Event::Joined { me: ana_me, .. } = joined else {
        unreachable!()
    };
    let mut bo = Client::start(b, ROOM, "Bo", Some(880.0));
    let joined = bo
        .until("Bo joined", |e| matches!(e, Event::Joined { .. }))
        .await;
    let Event::Joined { participants, .. } = joined else {
        unreachable!()
    };
    assert_eq!(
        participants
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["Ana"],
        "Bo, on the other instance, sees Ana in the room"
    );
    ana.until(
        "Ana sees Bo join",
        |e| matches!(e, Event::ParticipantJoined(p) if p.name == "Bo"),
    )
    .await;

    // Audio both ways through the one node.
    ana.until("Ana hears Bo", |e| matches!(e, Event::FirstAudio { .. }))
        .await;
    bo.until("Bo hears Ana", |e| matches!(e, Event::FirstAudio { .. }))
        .await;
    // Speaking: the node's speaker detection reaches the other instance's client.
    bo.until(
        "Bo sees Ana speaking",
        |e| matches!(e, Event::ParticipantUpdated(p) if p.name == "Ana" && p.speaking),
    )
    .await;
    ana.until(
        "Ana sees Bo speaking",
        |e| matches!(e, Event::ParticipantUpdated(p) if p.name == "Bo" && p.speaking),
    )
    .await;
    // A second of audio both ways (counted in the reports at the end), then a mute
    // through A, seen on B.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ana.send(Cmd::SetMuted(true));
    bo.until(
        "Bo sees Ana muted",
        |e| matches!(e, Event::ParticipantUpdated(p) if p.name == "Ana" && p.muted && !p.speaking),
    )
    .await;

    // Chat across instances, then history for a late joiner on the other instance.
    ana.until("Ana's chat", |e| *e == Event::ChatReady).await;
    bo.until("Bo's chat", |e| *e == Event::ChatReady).await;
    ana.send(Cmd::SendChat("hello from instance A".into()));
    let got = bo
        .until("Bo gets Ana's message", |e| {
            matches!(e, Event::Chat(ChatServerFrame::Message { .. }))
        })
        .await;
    let Event::Chat(ChatServerFrame::Message { message, .. }) = got else {
        unreachable!()
    };
    assert_eq!(message.text, "hello from instance A");
    assert_eq!(message.from.name, "Ana");
    bo.send(Cmd::SendChat("and hello from B".into()));
    ana.until("Ana gets Bo's message", |e| {
        matches!(e, Event::Chat(ChatServerFrame::Message { message, .. }) if message.text == "and hello from B")
    })
    .await;

    let mut cy = Client::start(b, ROOM, "Cy", None);
    let hist = cy
        .until("Cy's history", |e| {
            matches!(e, Event::Chat(ChatServerFrame::History { .. }))
        })
        .await;
    let Event::Chat(ChatServerFrame::History { messages }) = hist else {
        unreachable!()
    };
    assert_eq!(
        messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["hello from instance A", "and hello from B"]
    );
    ana.until(
        "Ana sees Cy join",
        |e| matches!(e, Event::ParticipantJoined(p) if p.name == "Cy"),
    )
    .await;

    // A session that drops resumes on the other instance within the grace period (the
    // signaling side of it: a protocol client without media).
    let dan_token = token(ROOM, "dan", "Dan");
    let (first, _) =
        SignalingClient::join_with(&format!("ws://127.0.0.1:{a}/ws"), &dan_token, false)
            .await
            .unwrap();
    ana.until(
        "Ana sees Dan join",
        |e| matches!(e, Event::ParticipantJoined(p) if p.name == "Dan"),
    )
    .await;
    first.abort();
    let (mut dan, joined) =
        SignalingClient::join_with(&format!("ws://127.0.0.1:{b}/ws"), &dan_token, true)
            .await
            .unwrap();
    assert!(
        matches!(joined, ServerMessage::Joined { resumed: true, .. }),
        "{joined:?}"
    );
    // Instance B serves the seat now: a mute through B reaches Ana on A.
    dan.send(&ClientMessage::Mute { muted: true })
        .await
        .unwrap();
    ana.until(
        "Ana sees Dan muted through B",
        |e| matches!(e, Event::ParticipantUpdated(p) if p.name == "Dan" && p.muted),
    )
    .await;
    dan.send(&ClientMessage::Leave).await.unwrap();
    let left = ana
        .until(
            "Ana sees Dan leave",
            |e| matches!(e, Event::ParticipantLeft { identity, .. } if identity == "dan"),
        )
        .await;
    assert!(
        matches!(&left, Event::ParticipantLeft { reason, .. } if reason == "left"),
        "one leave, not a grace period expiring: {left:?}"
    );

    // Leaving on B is seen on A.
    let bo_report = bo.leave().await;
    let left = ana
        .until(
            "Ana sees Bo leave",
            |e| matches!(e, Event::ParticipantLeft { identity, .. } if identity == "bo"),
        )
        .await;
    assert!(matches!(left, Event::ParticipantLeft { reason, .. } if reason == "left"));
    let from_ana = bo_report
        .streams
        .iter()
        .find(|s| s.sid == ana_me.sid)
        .unwrap_or_else(|| panic!("Bo received nothing from Ana: {bo_report:?}"));
    assert!(from_ana.packets > 25, "{bo_report:?}");
    let ana_report = ana.leave().await;
    assert!(
        ana_report.streams.iter().any(|s| s.packets > 25),
        "Ana heard Bo: {ana_report:?}"
    );
    cy.leave().await;
}
