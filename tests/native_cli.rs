//! The headless native client (`chorus-cli`) against a real `chorus dev` server, all as
//! separate processes on loopback: one CLI talks (an impulse train, or speech), another
//! records what it hears, and the recording is analysed.
//!
//! Needs the workspace's binaries built in the same profile first
//! (`cargo build --release --workspace --bins`, which `scripts/test.sh` does).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const RATE: f64 = 48_000.0;

fn bin(name: &str) -> PathBuf {
    let chorus = PathBuf::from(env!("CARGO_BIN_EXE_chorus"));
    let p = chorus.with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --release --workspace --bins)",
        p.display()
    );
    p
}

struct Server {
    child: Child,
    url: String,
    metrics_port: u16,
    _dir: TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "chorus-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `chorus dev` on free loopback ports and waits until it serves.
fn start_server() -> Server {
    let dir = TempDir::new("cli-server");
    let port = free_port();
    let metrics_port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["dev", "--no-turn"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--media-listen", "127.0.0.1:0"])
        .args(["--control-listen", "127.0.0.1:0"])
        .args(["--sfu-metrics", &format!("127.0.0.1:{metrics_port}")])
        .arg("--data-dir")
        .arg(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chorus dev");
    // Keep draining the server's log so it never blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
    let log = dir.path("server.log");
    std::thread::spawn(move || {
        let mut out = std::fs::File::create(log).ok();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = out.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            // The SFU node registers over QUIC shortly after the HTTP side is up; a
            // dev token round trip plus a short wait covers it.
            if r.starts_with("HTTP/1.1 200") {
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
        }
        assert!(Instant::now() < deadline, "chorus dev did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    Server {
        child,
        url,
        metrics_port,
        _dir: dir,
    }
}

/// One sample of the SFU's Prometheus metrics.
fn sfu_metric(server: &Server, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.metrics_port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the SFU metrics:\n{r}"))
}

fn cli(server: &Server, name: &str, extra: &[&str]) -> Child {
    Command::new(bin("chorus-cli"))
        .args(["--url", &server.url, "--name", name, "--room", "cli-test"])
        .args(["--stats", "json", "--quiet"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chorus-cli")
}

fn finish(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chorus-cli failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}): {stderr}"))
}

fn write_wav(path: &Path, samples: &[i16]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

fn read_wav(path: &Path) -> Vec<i16> {
    let mut r = hound::WavReader::open(path).unwrap();
    assert_eq!(r.spec().sample_rate, 48_000);
    r.samples::<i16>().map(|s| s.unwrap()).collect()
}

/// RMS level in dBFS of consecutive windows of `win` samples.
fn envelope(x: &[i16], win: usize) -> Vec<f64> {
    x.chunks(win)
        .map(|c| {
            let p: f64 = c.iter().map(|&s| (s as f64 / 32768.0).powi(2)).sum::<f64>()
                / c.len().max(1) as f64;
            10.0 * p.max(1e-12).log10()
        })
        .collect()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// One CLI sends 12 ms tone bursts every 400 ms; another records. Each burst's onset in
/// the recording, against the time it was captured, is the mouth-to-ear delay
/// (capture → encode → SFU → jitter buffer → decode → playback).
#[test]
fn cli_to_cli_bursts_arrive_with_bounded_delay() {
    let server = start_server();
    let dir = TempDir::new("cli-bursts");
    let period = 19_200; // 400 ms
                         // CHORUS_M2E_BURSTS=150 makes this the benchmark run behind benches/README.md.
    let bursts: usize = std::env::var("CHORUS_M2E_BURSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut input = vec![0i16; period * bursts];
    for b in 0..bursts {
        for i in 0..576 {
            // 12 ms of 1 kHz at -6 dBFS with a 1 ms ramp so the onset is clean.
            let ramp = (i as f64 / 48.0).min(1.0);
            let s = (2.0 * std::f64::consts::PI * 1000.0 * i as f64 / RATE).sin();
            input[b * period + i] = (s * ramp * 16_000.0) as i16;
        }
    }
    write_wav(&dir.path("bursts.wav"), &input);

    let listener = cli(
        &server,
        "ear",
        &[
            "--duration",
            &format!("{}ms", bursts * 400 + 4000),
            "--output",
            dir.path("heard.wav").to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let talker = cli(
        &server,
        "mouth",
        &["--input", dir.path("bursts.wav").to_str().unwrap()],
    );
    let talk = finish(talker);
    let listen = finish(listener);

    let cap0 = talk["capture_start_unix_ms"]
        .as_f64()
        .expect("talker captured");
    let play0 = listen["playback_start_unix_ms"]
        .as_f64()
        .expect("listener played");
    let heard = read_wav(&dir.path("heard.wav"));
    // Onsets: a 1 ms window above -30 dBFS with none in the 100 ms before it.
    let env = envelope(&heard, 48);
    let mut last_loud: Option<usize> = None;
    let mut delays = Vec::new();
    for (i, &db) in env.iter().enumerate() {
        if db <= -30.0 {
            continue;
        }
        if last_loud.is_none_or(|l| i - l > 100) {
            let t = play0 + i as f64; // 1 ms windows
            let since = t - cap0;
            // Which burst: the latest one captured before this onset.
            let k = (since / 400.0).floor();
            if (0.0..bursts as f64).contains(&k) {
                delays.push(since - k * 400.0);
            }
        }
        last_loud = Some(i);
    }
    assert!(
        delays.len() >= bursts - 3,
        "found {} of {bursts} bursts in the recording (delays {delays:?})",
        delays.len()
    );
    let median = percentile(&mut delays.clone(), 0.5);
    let p95 = percentile(&mut delays.clone(), 0.95);
    eprintln!(
        "mouth-to-ear over {} bursts: median {median:.1} ms, p95 {p95:.1} ms",
        delays.len()
    );
    // Generous for a loaded CI machine; the real figure is in benches/README.md.
    assert!(median < 250.0, "median mouth-to-ear {median:.1} ms");
    assert!(p95 < 350.0, "p95 mouth-to-ear {p95:.1} ms");
    let streams = listen["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{listen}");
    assert_eq!(
        streams[0]["lost"], 0,
        "loopback should lose nothing: {listen}"
    );
    // The SFU counted what it forwarded and how long it took.
    let forwarded = sfu_metric(&server, "chorus_sfu_rtp_forwarded_total");
    let received = streams[0]["packets"].as_f64().unwrap();
    assert!(
        forwarded >= received,
        "forwarded {forwarded} < received {received}"
    );
    assert!(sfu_metric(&server, "chorus_sfu_forward_seconds_count") > 0.0);
    assert!(sfu_metric(&server, "chorus_sfu_rtp_received_total") >= forwarded);
}

/// Speech through a link that loses 10% of the packets arriving at the listener:
/// FEC and concealment must leave no audible hole (> 60 ms) where the talker spoke.
#[test]
fn speech_survives_ten_percent_loss_without_gaps() {
    let server = start_server();
    let dir = TempDir::new("cli-loss");
    let speech = Path::new(env!("CARGO_MANIFEST_DIR")).join("media-core/fixtures/speech.wav");
    // The talker loops the 4 s clip for 6 s; this is what it captured.
    let clip = read_wav(&speech);
    let input: Vec<i16> = clip.iter().copied().cycle().take(6 * 48_000).collect();

    let listener = cli(
        &server,
        "lossy",
        &[
            "--duration",
            "9s",
            "--drop-inbound",
            "10",
            "--output",
            dir.path("heard.wav").to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let talker = cli(
        &server,
        "speaker",
        &[
            "--input",
            speech.to_str().unwrap(),
            "--loop",
            "--duration",
            "6s",
        ],
    );
    let talk = finish(talker);
    let listen = finish(listener);

    let dropped = listen["dropped_inbound"].as_u64().unwrap();
    let stream = &listen["streams"][0];
    let lost = stream["lost"].as_u64().unwrap();
    let received = stream["packets"].as_u64().unwrap();
    assert!(received > 200, "{listen}");
    let loss = 100.0 * lost as f64 / (lost + received) as f64;
    assert!(
        (5.0..16.0).contains(&loss),
        "the shim should lose about 10%: lost {lost} of {} ({dropped} datagrams dropped)",
        lost + received
    );

    let heard = read_wav(&dir.path("heard.wav"));
    let cap0 = talk["capture_start_unix_ms"].as_f64().unwrap();
    let play0 = listen["playback_start_unix_ms"].as_f64().unwrap();
    // Align to the millisecond: input sample i plays at recording sample
    // i + base + lag, where base comes from the two clocks and lag (the pipeline
    // delay) from correlating 1 ms envelopes.
    let base = ((cap0 - play0) * 48.0).round() as i64;
    let ein1 = envelope(&input, 48);
    let eout1 = envelope(&heard, 48);
    let score = |lag_ms: i64| -> f64 {
        let mut s = 0.0;
        for (j, &a) in ein1.iter().enumerate() {
            let k = j as i64 + base / 48 + lag_ms;
            if k >= 0 && (k as usize) < eout1.len() {
                let b = eout1[k as usize];
                s += (a.max(-60.0) + 60.0) * (b.max(-60.0) + 60.0);
            }
        }
        s
    };
    let lag = (0..400)
        .max_by(|a, b| score(*a).total_cmp(&score(*b)))
        .unwrap();
    eprintln!("pipeline delay ≈ {lag} ms");
    let shift = base + lag * 48;
    // Only what the talker captured before it left (its last packets race the leave).
    let captured = talk["frames_captured"].as_u64().unwrap() as usize;
    let ein = envelope(
        &input[..(captured.saturating_sub(5) * 960).min(input.len())],
        480,
    );
    let eout: Vec<f64> = (0..ein.len())
        .map(|j| {
            let start = j as i64 * 480 + shift;
            if start < 0 || (start as usize + 480) > heard.len() {
                return f64::NAN;
            }
            envelope(&heard[start as usize..start as usize + 480], 480)[0]
        })
        .collect();
    // A gap: the input has speech (above -40 dBFS) but the output is 30 dB quieter
    // than it, or below -55 dBFS.
    let mut longest = 0;
    let mut run = 0;
    let mut speech_windows = 0;
    for (j, (&a, &b)) in ein.iter().zip(eout.iter()).enumerate() {
        if a < -40.0 || b.is_nan() {
            run = 0;
            continue;
        }
        speech_windows += 1;
        if b < a - 30.0 || b < -55.0 {
            run += 1;
            longest = longest.max(run);
            if std::env::var_os("CHORUS_TEST_DEBUG").is_some() {
                eprintln!("quiet at input window {j}: in {a:.1} out {b:.1}");
            }
        } else {
            run = 0;
        }
    }
    eprintln!(
        "loss {loss:.1}%, FEC {} concealed {}, {speech_windows} speech windows, longest gap {} ms",
        stream["fec_recovered"],
        stream["concealed"],
        longest * 10
    );
    assert!(speech_windows > 250, "too little speech was compared");
    assert!(
        longest * 10 <= 60,
        "a {} ms gap during speech",
        longest * 10
    );
    assert!(stream["fec_recovered"].as_u64().unwrap() > 0, "{listen}");
}

type Session = (
    tokio::sync::mpsc::UnboundedSender<chorus_native::session::Command>,
    tokio::sync::mpsc::UnboundedReceiver<chorus_native::session::Event>,
    tokio::task::JoinHandle<anyhow::Result<chorus_native::session::Report>>,
);

/// Starts an in-process library session with a dev token; playback is discarded.
async fn start_session(
    url: String,
    name: &str,
    room: &str,
    source: Box<dyn chorus_native::session::AudioSource>,
) -> Session {
    use chorus_native::session::{run, Config, Silence};
    let token = chorus_native::signaling::dev_token(&url, name, room)
        .await
        .unwrap();
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(run(
        Config::new(url, token),
        source,
        Box::new(Silence),
        cmd_rx,
        ev_tx,
    ));
    (cmd_tx, ev_rx, task)
}

/// The next event matching `pred`, failing on the session's end or after 15 s.
async fn until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<chorus_native::session::Event>,
    what: &str,
    mut pred: impl FnMut(&chorus_native::session::Event) -> bool,
) -> chorus_native::session::Event {
    use chorus_native::session::Event;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(Event::Ended { reason })) => panic!("{what}: session ended: {reason}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("{what}: session gone"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// The client library's chat: two in-process sessions exchange a message and a typing
/// signal over the data channels, and a late joiner gets it in the history.
#[test]
fn library_sessions_chat_over_data_channels() {
    use chorus_native::session::{Command, Event, Silence};
    use chorus_protocol::chat::ChatServerFrame;

    let server = start_server();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let start = |name: &'static str| {
            start_session(server.url.clone(), name, "chat-native", Box::new(Silence))
        };
        let (a_cmd, mut a_ev, a_task) = start("Ana").await;
        let (b_cmd, mut b_ev, b_task) = start("Bo").await;
        until(&mut a_ev, "Ana's chat", |e| *e == Event::ChatReady).await;
        until(&mut b_ev, "Bo's chat", |e| *e == Event::ChatReady).await;

        a_cmd.send(Command::SetTyping(true)).unwrap();
        let typing = until(&mut b_ev, "Ana typing", |e| {
            matches!(e, Event::Typing { .. })
        })
        .await;
        assert!(matches!(typing, Event::Typing { ref from, typing: true } if from.name == "Ana"));

        a_cmd
            .send(Command::SendChat("hello from the native client".into()))
            .unwrap();
        let got = until(&mut b_ev, "Ana's message", |e| {
            matches!(e, Event::Chat(ChatServerFrame::Message { .. }))
        })
        .await;
        let Event::Chat(ChatServerFrame::Message { message, .. }) = got else {
            unreachable!()
        };
        assert_eq!(message.text, "hello from the native client");
        assert_eq!(message.from.name, "Ana");

        // A third participant gets it as history.
        let (c_cmd, mut c_ev, c_task) = start("Cy").await;
        let hist = until(&mut c_ev, "Cy's history", |e| {
            matches!(e, Event::Chat(ChatServerFrame::History { .. }))
        })
        .await;
        let Event::Chat(ChatServerFrame::History { messages }) = hist else {
            unreachable!()
        };
        assert!(
            messages
                .iter()
                .any(|m| m.text == "hello from the native client"),
            "{messages:?}"
        );
        for (cmd, task) in [(a_cmd, a_task), (b_cmd, b_task), (c_cmd, c_task)] {
            cmd.send(Command::Leave).unwrap();
            let report = task.await.unwrap().unwrap();
            assert_eq!(report.end_reason, "left");
        }
    });
}

/// The library's reconnect: the signaling socket drops (no close handshake), the
/// session rejoins with resume within the grace period, media never stops, and the
/// new socket carries commands (a mute others see).
#[test]
fn library_session_resumes_after_a_signaling_drop() {
    use chorus_native::session::{Command, Event};
    use chorus_native::wav::Tone;

    let server = start_server();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let start = |name: &'static str, hz: f64| {
            let tone = Box::new(Tone::new(hz, -12.0));
            start_session(server.url.clone(), name, "resume-native", tone)
        };
        let (a_cmd, mut a_ev, a_task) = start("Ana", 440.0).await;
        let (b_cmd, mut b_ev, b_task) = start("Bo", 880.0).await;
        until(&mut a_ev, "Ana hears Bo", |e| {
            matches!(e, Event::FirstAudio { .. })
        })
        .await;
        until(&mut b_ev, "Bo hears Ana", |e| {
            matches!(e, Event::FirstAudio { .. })
        })
        .await;

        a_cmd.send(Command::ReconnectSignaling).unwrap();
        until(&mut a_ev, "Ana reconnecting", |e| {
            matches!(e, Event::Reconnecting { .. })
        })
        .await;
        let back = until(&mut a_ev, "Ana reconnected", |e| {
            matches!(e, Event::Reconnected { .. })
        })
        .await;
        assert_eq!(back, Event::Reconnected { resumed: true });

        // Audio goes on both ways; then the new socket carries a mute Bo sees.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        a_cmd.send(Command::SetMuted(true)).unwrap();
        until(
            &mut b_ev,
            "Bo sees Ana muted",
            |e| matches!(e, Event::ParticipantUpdated(p) if p.name == "Ana" && p.muted),
        )
        .await;
        a_cmd.send(Command::Leave).unwrap();
        b_cmd.send(Command::Leave).unwrap();
        let a = a_task.await.unwrap().unwrap();
        let b = b_task.await.unwrap().unwrap();
        assert_eq!(a.reconnects, 1, "{a:?}");
        // Ana kept hearing Bo throughout: no stream restarts, no loss.
        let from_bo = &a.streams[0];
        assert!(from_bo.packets > 60, "{a:?}");
        assert_eq!(from_bo.lost, 0, "{a:?}");
        // (Counts are kept low: a loaded CI machine delays ticks.)
        assert!(b.streams[0].packets > 40, "{b:?}");
        assert_eq!(b.streams[0].lost, 0, "{b:?}");
    });
}
