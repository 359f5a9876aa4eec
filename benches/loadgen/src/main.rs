//! `chorus-loadgen`: runs a load scenario (rooms × participants, who talks, how long)
//! against a Chorus server with many simulated WebRTC participants in one process, and
//! measures the server: CPU per forwarded packet, forwarded packets/s, the SFU's own
//! forwarding time, end-to-end delay, loss and memory per participant.
//!
//! By default it starts a fresh `chorus dev` for the run (so the server's CPU and RSS
//! can be read from `/proc`); `--url` points it at a running server instead.
//! `--server janus` runs the same load against a fresh Janus (VideoRoom; in video
//! scenarios with simulcast, each subscriber picking its substream), and
//! `--compare-janus` runs both, one after the other, and compares them.
//!
//! Scenarios with `cameras_per_room` add video: those participants also publish a
//! three-layer VP8 simulcast camera (`video.rs`), everyone subscribes to it, and the
//! report gains frames, keyframes, descriptor continuity and first-frame times
//! (`video_rx.rs`). `--audio-baseline` runs the same shape without cameras first, so
//! the server's CPU per video packet can be told from its CPU per audio packet.

mod janus;
mod peer;
mod report;
mod stats;
mod video;
mod video_rx;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chorus_media_core::level::dbov_level;
use chorus_media_core::opus::{EncoderConfig, OpusEncoder, MAX_PACKET};
use chorus_protocol::client::Grants;
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use peer::{Clip, PeerSpec, Talk};
use report::{
    print_summary, video_errors, write_report, Comparison, Report, Split, SplitComparison,
};
use stats::{DelayHistogram, Shared};

/// A scenario file (TOML). Command-line flags override its fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    name: String,
    rooms: usize,
    participants_per_room: usize,
    speakers_per_room: usize,
    #[serde(with = "humantime_serde_compat")]
    duration: Duration,
    /// Joins are spread evenly over this time.
    #[serde(default, with = "humantime_serde_compat")]
    ramp: Duration,
    /// `continuous`, or e.g. `2s/1s` (talk 2 s, silent 1 s).
    #[serde(default)]
    talk: Option<String>,
    /// Extra flags for the `chorus dev` server this scenario runs against.
    #[serde(default)]
    server_args: Vec<String>,
    /// The first this many joiners of each room also publish a camera (video).
    #[serde(default)]
    cameras_per_room: usize,
    /// Cameras are turned on by a second offer this long after the participant's media
    /// connected (like pressing the camera button); absent: in the first offer.
    #[serde(default, with = "humantime_serde_compat::option")]
    camera_after: Option<Duration>,
    /// Video: the `max_quality` each subscriber sets on every camera it receives, taken
    /// in turn by participant (`["high","medium","low"]`: a third each); empty: none.
    #[serde(default)]
    subscriber_caps: Vec<chorus_protocol::track::Quality>,
}

mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// Run a Chorus load scenario and measure the server.
///
/// Example: chorus-loadgen --scenario benches/scenarios/rooms-20x5.toml
#[derive(Debug, Parser)]
#[command(name = "chorus-loadgen", version, verbatim_doc_comment)]
struct Args {
    /// Scenario file (benches/scenarios/*.toml).
    #[arg(long)]
    scenario: PathBuf,
    /// Override: number of rooms.
    #[arg(long)]
    rooms: Option<usize>,
    /// Override: participants per room.
    #[arg(long)]
    participants: Option<usize>,
    /// Override: talking participants per room.
    #[arg(long)]
    speakers: Option<usize>,
    /// Override: measured duration (after everyone joined), e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Override: time over which joins are spread.
    #[arg(long, value_parser = humantime::parse_duration)]
    ramp: Option<Duration>,
    /// Use a running server (its signaling URL) instead of starting `chorus dev`.
    /// Server CPU and RSS are then not measured.
    #[arg(long)]
    url: Option<String>,
    /// API key and secret to mint tokens with (default: the dev server's token endpoint).
    #[arg(long, requires = "api_secret")]
    api_key: Option<String>,
    #[arg(long)]
    api_secret: Option<String>,
    /// SFU metrics URL of a running server (`chorus sfu --metrics`), with --url.
    #[arg(long)]
    sfu_metrics: Option<String>,
    /// The `chorus` binary to start (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Speech to send (any WAV; encoded to Opus once at start).
    #[arg(long)]
    audio: Option<PathBuf>,
    /// Override: participants per room with a camera (0: audio only).
    #[arg(long)]
    cameras: Option<usize>,
    /// Override: publish cameras this long after connecting (0s: in the first offer).
    #[arg(long, value_parser = humantime::parse_duration)]
    camera_after: Option<Duration>,
    /// Directory with the camera clip q.ivf, h.ivf, f.ivf (default: benches/video).
    #[arg(long)]
    video_dir: Option<PathBuf>,
    /// Video scenarios: first run the same rooms and participants without cameras,
    /// then with, and split the server's CPU into audio and video per packet. With
    /// --compare-janus, both runs on each server, and the ratio of the video parts.
    #[arg(long, conflicts_with = "url")]
    audio_baseline: bool,
    /// Write the JSON report here ("-" for stdout).
    #[arg(long)]
    report: Option<String>,
    /// Fail (exit 1) unless every listener got packets from every speaker of its room,
    /// no participant failed and nothing was lost. For smoke runs in CI.
    #[arg(long)]
    check: bool,
    /// Extra flag for the `chorus dev` server, after the scenario's own (repeatable),
    /// e.g. --server-arg=--workers --server-arg=2.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// The server to load: a fresh `chorus dev`, or a fresh Janus (VideoRoom plugin,
    /// WebSocket API on loopback; cameras publish VP8 simulcast and subscribers pick a
    /// substream by their cap). With --url, a running one of that kind.
    #[arg(long, value_enum, default_value_t = ServerKind::Chorus)]
    server: ServerKind,
    /// Run the scenario against a fresh `chorus dev`, then the same load against a
    /// fresh Janus, and compare server CPU per forwarded packet.
    #[arg(long, conflicts_with_all = ["url", "server"])]
    compare_janus: bool,
    /// The Janus binary to start (name on PATH or a path).
    #[arg(long, default_value = "janus")]
    janus_bin: String,
    /// Janus's `event_loops` setting: 0 (Janus's default) runs one thread per
    /// PeerConnection, N shares N threads among all of them.
    #[arg(long, default_value_t = 0)]
    janus_event_loops: usize,
    /// Janus's log level, 0–7 (2: errors only; above 4 logging costs measurable CPU).
    #[arg(long, default_value_t = 2)]
    janus_debug_level: u8,
    /// Keep Janus's output in this file.
    #[arg(long)]
    janus_log: Option<PathBuf>,
    /// The local, non-loopback IPv4 address Janus and its peers use for media
    /// (default: this machine's own address). Janus never gathers on loopback; in a
    /// network namespace with only `lo`, add a dummy interface and pass its address.
    #[arg(long)]
    janus_ip: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum ServerKind {
    Chorus,
    Janus,
}

impl ServerKind {
    /// What the "server:" line says before the URL.
    fn label_prefix(self) -> &'static str {
        match self {
            ServerKind::Chorus => "",
            ServerKind::Janus => "Janus ",
        }
    }
}

fn main() {
    let args = Args::parse();
    chorus_native::init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chorus-loadgen: {e}");
            std::process::exit(1);
        }
    };
    // Ctrl-C drops the run instead of killing the process where it stands, so the
    // servers it started are stopped and Janus's temporary config directory removed
    // by their Drop.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; servers stopped")),
        }
    });
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("chorus-loadgen: {e:#}");
            std::process::exit(1);
        }
    }
}

struct Server {
    child: Child,
    url: String,
    metrics: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &Path, extra: &[String]) -> anyhow::Result<Server> {
    let data = std::env::temp_dir().join(format!("chorus-loadgen-{}", std::process::id()));
    let mut child = Command::new(bin)
        .args(["dev", "--no-turn", "--chat-memory"])
        .args(["--listen", "127.0.0.1:0", "--media-listen", "127.0.0.1:0"])
        .args([
            "--control-listen",
            "127.0.0.1:0",
            "--sfu-metrics",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .args(extra)
        .env("CHORUS_LOG", "warn,str0m=error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut url = None;
        let mut metrics = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(m) = line.trim().strip_prefix("SFU metrics: ") {
                metrics = Some(m.to_string());
            }
            if let Some(rest) = line.strip_prefix("Open ") {
                url = rest.split_whitespace().next().map(str::to_string);
            }
            if let (Some(u), Some(m)) = (&url, &metrics) {
                let _ = tx.send((u.clone(), m.clone()));
                url = None;
            }
        }
    });
    let (url, metrics) = rx
        .recv_timeout(Duration::from_secs(20))
        .context("chorus dev did not print its URL within 20 s")?;
    Ok(Server {
        child,
        url,
        metrics,
    })
}

/// (utime, stime) of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime / 100.0, stime / 100.0)) // USER_HZ is 100 on Linux
}

fn rss_kb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A minimal HTTP GET (the metrics endpoint is plain HTTP on loopback).
async fn http_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs: {url}"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::net::TcpStream::connect(authority).await?;
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default())
}

/// Metric name (with labels) → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A quantile of the SFU's forwarding-time histogram between two scrapes, in ms
/// (linear within the bucket).
fn forward_quantile(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    q: f64,
) -> Option<f64> {
    let prefix = "chorus_sfu_forward_seconds_bucket{le=\"";
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(prefix)?.strip_suffix("\"}")?;
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for (le, c) in buckets {
        if c >= want {
            if le.is_infinite() {
                return Some(prev.0 * 1000.0);
            }
            let frac = if c > prev.1 {
                (want - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return Some((prev.0 + (le - prev.0) * frac) * 1000.0);
        }
        prev = (le, c);
    }
    None
}

/// Encodes the clip once: every publisher sends the same packets.
fn load_clip(path: &Path) -> anyhow::Result<Clip> {
    use chorus_native::session::AudioSource;
    let mut src = chorus_native::wav::WavSource::open(path, false)?;
    let mut enc = OpusEncoder::new(EncoderConfig {
        complexity: 5,
        ..EncoderConfig::default()
    })?;
    let mut frames = Vec::new();
    let mut pcm = [0i16; 960];
    let mut out = [0u8; MAX_PACKET];
    for _ in 0..src.frames() {
        src.read(&mut pcm);
        let n = enc.encode(&pcm, &mut out)?;
        frames.push((out[..n].to_vec(), dbov_level(&pcm)));
    }
    if frames.is_empty() {
        bail!("{} has no audio", path.display());
    }
    Ok(Clip { frames })
}

fn parse_talk(s: Option<&str>) -> anyhow::Result<Talk> {
    match s {
        None | Some("continuous") => Ok(Talk::Continuous),
        Some(p) => {
            let (on, off) = p
                .split_once('/')
                .ok_or_else(|| anyhow!("talk must be `continuous` or `ON/OFF` like 2s/1s"))?;
            Ok(Talk::Pattern {
                on: humantime::parse_duration(on)?,
                off: humantime::parse_duration(off)?,
            })
        }
    }
}

/// Who is in which room and who talks: participant `i` joins room `i % rooms`, and the
/// first `speakers` joiners of each room talk. The same for every server.
struct Plan {
    /// Per participant: room index and publisher index (when talking).
    members: Vec<(usize, Option<u32>)>,
    /// Room name → publisher indices of its speakers.
    room_speakers: HashMap<String, Vec<u32>>,
    /// Per participant: camera index (when it has one): the first
    /// `cameras_per_room` joiners of each room.
    cameras: Vec<Option<u32>>,
    /// Room name → its camera indices.
    room_cameras: HashMap<String, Vec<u32>>,
}

/// The `max_quality` participant `i` sets on every camera it receives: the
/// scenario's `subscriber_caps` in turn (none when the list is empty).
fn subscriber_cap(sc: &Scenario, i: usize) -> Option<chorus_protocol::track::Quality> {
    (!sc.subscriber_caps.is_empty()).then(|| sc.subscriber_caps[i % sc.subscriber_caps.len()])
}

fn room_name(sc: &Scenario, r: usize) -> String {
    format!("{}-{r}", sc.name)
}

fn plan(sc: &Scenario) -> Plan {
    let total = sc.rooms * sc.participants_per_room;
    let mut members = Vec::with_capacity(total);
    let mut room_speakers: HashMap<String, Vec<u32>> = HashMap::new();
    let mut next_pub = 0u32;
    let mut cameras = Vec::with_capacity(total);
    let mut room_cameras: HashMap<String, Vec<u32>> = HashMap::new();
    let mut next_cam = 0u32;
    for i in 0..total {
        let r = i % sc.rooms;
        let k = i / sc.rooms;
        let publisher = if k < sc.speakers_per_room {
            let p = next_pub;
            next_pub += 1;
            room_speakers.entry(room_name(sc, r)).or_default().push(p);
            Some(p)
        } else {
            None
        };
        members.push((r, publisher));
        cameras.push(if k < sc.cameras_per_room {
            let c = next_cam;
            next_cam += 1;
            room_cameras.entry(room_name(sc, r)).or_default().push(c);
            Some(c)
        } else {
            None
        });
    }
    Plan {
        members,
        room_speakers,
        cameras,
        room_cameras,
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    let mut sc: Scenario =
        toml::from_str(&text).with_context(|| format!("parsing {}", args.scenario.display()))?;
    sc.rooms = args.rooms.unwrap_or(sc.rooms).max(1);
    sc.participants_per_room = args.participants.unwrap_or(sc.participants_per_room).max(1);
    sc.speakers_per_room = args
        .speakers
        .unwrap_or(sc.speakers_per_room)
        .min(sc.participants_per_room);
    sc.duration = args.duration.unwrap_or(sc.duration);
    sc.ramp = args.ramp.unwrap_or(sc.ramp);
    sc.server_args.extend(args.server_arg.iter().cloned());
    sc.cameras_per_room = args
        .cameras
        .unwrap_or(sc.cameras_per_room)
        .min(sc.participants_per_room);
    if let Some(a) = args.camera_after {
        sc.camera_after = (!a.is_zero()).then_some(a);
    }
    let talk = parse_talk(sc.talk.as_deref())?;

    let audio = args.audio.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../media-core/fixtures/speech.wav")
    });
    let clip = Arc::new(load_clip(&audio)?);
    let video = if sc.cameras_per_room > 0 {
        let dir = video::clip_dir(args.video_dir.as_deref());
        Some(Arc::new(video::VideoClip::load(&dir)?))
    } else {
        None
    };
    let media = Media { clip, talk, video };

    if args.audio_baseline {
        if media.video.is_none() {
            bail!("--audio-baseline needs a scenario with cameras");
        }
        if !args.compare_janus {
            let (split, errors) = split_runs(&args, &sc, args.server, &media).await?;
            split.print();
            write_report(args.report.as_deref(), &split)?;
            return Ok(check(&args, &errors));
        }
        let (chorus, chorus_errors) = split_runs(&args, &sc, ServerKind::Chorus, &media).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (janus, janus_errors) = split_runs(&args, &sc, ServerKind::Janus, &media).await?;
        let comparison = SplitComparison::new(chorus, janus);
        comparison.print();
        write_report(args.report.as_deref(), &comparison)?;
        let errors: Vec<String> = chorus_errors
            .iter()
            .map(|e| format!("chorus: {e}"))
            .chain(janus_errors.iter().map(|e| format!("janus: {e}")))
            .collect();
        return Ok(check(&args, &errors));
    }

    if !args.compare_janus {
        let (report, errors) = run_one(&args, &sc, args.server, &media).await?;
        print_summary(&report);
        write_report(args.report.as_deref(), &report)?;
        return Ok(check(&args, &errors));
    }

    let (chorus, chorus_errors) = run_one(&args, &sc, ServerKind::Chorus, &media).await?;
    print_summary(&chorus);
    // Let the machine settle (the Chorus server and the peers' sockets are gone).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (janus, janus_errors) = run_one(&args, &sc, ServerKind::Janus, &media).await?;
    print_summary(&janus);
    let comparison = Comparison::new(chorus, janus);
    comparison.print();
    write_report(args.report.as_deref(), &comparison)?;
    let errors: Vec<String> = chorus_errors
        .iter()
        .map(|e| format!("chorus: {e}"))
        .chain(janus_errors.iter().map(|e| format!("janus: {e}")))
        .collect();
    Ok(check(&args, &errors))
}

/// `--audio-baseline` on one server: the scenario without cameras, then with.
async fn split_runs(
    args: &Args,
    sc: &Scenario,
    kind: ServerKind,
    media: &Media,
) -> anyhow::Result<(Split, Vec<String>)> {
    let audio_sc = Scenario {
        cameras_per_room: 0,
        ..sc.clone()
    };
    let (base, base_errors) = run_one(args, &audio_sc, kind, media).await?;
    print_summary(&base);
    // Let the machine settle (the server and the peers' sockets are gone).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (with_video, errors) = run_one(args, sc, kind, media).await?;
    print_summary(&with_video);
    let errors = base_errors
        .iter()
        .map(|e| format!("audio baseline: {e}"))
        .chain(errors)
        .collect();
    Ok((Split::new(base, with_video), errors))
}

/// With --check, false (exit 1) when the run had problems.
fn check(args: &Args, errors: &[String]) -> bool {
    if args.check && !errors.is_empty() {
        eprintln!("check failed: {} problems", errors.len());
        for e in errors.iter().take(20) {
            eprintln!("  {e}");
        }
        return false;
    }
    true
}

/// The server process a run started (killed when dropped).
enum Started {
    Chorus(Server),
    Janus(janus::JanusServer),
}

impl Started {
    fn pid(&self) -> u32 {
        match self {
            Started::Chorus(s) => s.child.id(),
            Started::Janus(s) => s.pid(),
        }
    }
}

/// What the publishers send: the speech clip, when they talk, and the camera clip
/// (video scenarios).
struct Media {
    clip: Arc<Clip>,
    talk: Talk,
    video: Option<Arc<video::VideoClip>>,
}

/// One run of the scenario against one server: start it (unless --url), join
/// everyone, measure, leave. Returns the report and the consistency problems.
async fn run_one(
    args: &Args,
    sc: &Scenario,
    kind: ServerKind,
    media: &Media,
) -> anyhow::Result<(Report, Vec<String>)> {
    let (clip, talk) = (&media.clip, media.talk);
    let video_clip = media.video.as_ref().filter(|_| sc.cameras_per_room > 0);
    let total = sc.rooms * sc.participants_per_room;
    let Plan {
        members,
        room_speakers,
        cameras,
        room_cameras,
    } = plan(sc);
    let janus_ip = match (kind, args.janus_ip) {
        (ServerKind::Janus, Some(ip)) => ip,
        (ServerKind::Janus, None) => janus::local_ipv4()?,
        // Unused: Chorus peers stay on 127.0.0.1.
        (ServerKind::Chorus, _) => std::net::Ipv4Addr::LOCALHOST,
    };
    let server = match (&args.url, kind) {
        (Some(_), _) => None,
        (None, ServerKind::Chorus) => {
            let bin = match &args.server_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()?.with_file_name("chorus"),
            };
            Some(Started::Chorus(start_server(&bin, &sc.server_args)?))
        }
        (None, ServerKind::Janus) => Some(Started::Janus(janus::start(&janus::JanusOptions {
            bin: args.janus_bin.clone(),
            event_loops: args.janus_event_loops,
            debug_level: args.janus_debug_level,
            log: args.janus_log.clone(),
            ip: janus_ip,
        })?)),
    };
    let url = match (&args.url, &server) {
        (Some(u), _) => u.clone(),
        (None, Some(Started::Chorus(s))) => s.url.clone(),
        (None, Some(Started::Janus(s))) => s.url.clone(),
        (None, None) => unreachable!("a server is started when no --url is given"),
    };
    let metrics_url = match (kind, &server) {
        (ServerKind::Janus, _) => None,
        (ServerKind::Chorus, Some(Started::Chorus(s))) => Some(s.metrics.clone()),
        (ServerKind::Chorus, _) => args.sfu_metrics.clone(),
    };
    let pid = server.as_ref().map(Started::pid);
    let rss_idle = pid.and_then(rss_kb);
    if kind == ServerKind::Janus {
        janus::create_rooms(
            &url,
            sc.rooms,
            sc.participants_per_room,
            video_clip.is_some(),
        )
        .await?;
    }
    eprintln!(
        "scenario {}: {} rooms × {} participants ({} talking{} each) = {total} participants, {} measured, joins over {}",
        sc.name,
        sc.rooms,
        sc.participants_per_room,
        sc.speakers_per_room,
        if video_clip.is_some() {
            format!(", {} with a camera", sc.cameras_per_room)
        } else {
            String::new()
        },
        humantime::format_duration(sc.duration),
        humantime::format_duration(sc.ramp),
    );
    eprintln!("server: {}{url}", kind.label_prefix());

    let speakers_total = sc.rooms * sc.speakers_per_room;
    let cameras_total = if video_clip.is_some() {
        sc.rooms * sc.cameras_per_room
    } else {
        0
    };
    let shared = Arc::new(Shared::with_cameras(speakers_total, cameras_total));
    let settle = Duration::from_secs(3);
    let run_start = tokio::time::Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let step = if total > 1 {
        sc.ramp / total as u32
    } else {
        Duration::ZERO
    };
    for (i, &(r, publisher)) in members.iter().enumerate() {
        let room = room_name(sc, r);
        match kind {
            ServerKind::Chorus => {
                let name = format!("lg{i}");
                let token = match (&args.api_key, &args.api_secret) {
                    (Some(key), Some(secret)) => {
                        let claims = chorus_signaling::token::participant_claims(
                            key,
                            &room,
                            &name,
                            None,
                            Duration::from_secs(3600),
                            Grants::default_participant(),
                        );
                        chorus_signaling::token::mint(&claims, secret)?
                    }
                    _ => chorus_native::signaling::dev_token(&url, &name, &room)
                        .await
                        .context("dev token (use --api-key/--api-secret for a non-dev server)")?,
                };
                let spec = PeerSpec {
                    index: i,
                    url: chorus_native::session::normalize_url(&url),
                    token,
                    publisher,
                    talk,
                    video: video_clip.map(|v| peer::VideoSpec {
                        camera: cameras[i],
                        camera_after: sc.camera_after,
                        clip: v.clone(),
                        cap: subscriber_cap(sc, i),
                    }),
                    stop: stop_rx.clone(),
                };
                tasks.push(tokio::spawn(peer::run(spec, clip.clone(), shared.clone())));
            }
            ServerKind::Janus => {
                // Everyone else in the room who talks or films is a feed to subscribe to.
                let feeds = members
                    .iter()
                    .enumerate()
                    .filter(|&(j, &(rj, pj))| {
                        j != i
                            && rj == r
                            && (pj.is_some() || (video_clip.is_some() && cameras[j].is_some()))
                    })
                    .map(|(j, _)| janus::feed_id(j))
                    .collect();
                let spec = janus::JanusSpec {
                    index: i,
                    url: url.clone(),
                    room_name: room,
                    room: janus::room_id(r),
                    publisher,
                    feeds,
                    talk,
                    ip: janus_ip,
                    video: video_clip.map(|v| peer::VideoSpec {
                        camera: cameras[i],
                        camera_after: None,
                        clip: v.clone(),
                        cap: subscriber_cap(sc, i),
                    }),
                    stop: stop_rx.clone(),
                };
                tasks.push(tokio::spawn(janus::run(spec, clip.clone(), shared.clone())));
            }
        }
        if !step.is_zero() {
            tokio::time::sleep_until(run_start + step * (i as u32 + 1)).await;
        }
        progress(&shared, run_start, total, "joining");
    }

    // Wait until everyone is connected (or failed), then settle, then measure.
    let connect_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let c = shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if c as usize >= total || tokio::time::Instant::now() > connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(settle).await;
    let m0 = match &metrics_url {
        Some(u) => Some(parse_metrics(&http_get(u).await?)),
        None => None,
    };
    let cpu0 = pid.and_then(cpu_seconds);
    let t0 = Instant::now();
    let tx0 = shared.tx_packets.load(Ordering::Relaxed);
    let rx0 = shared.rx_packets.load(Ordering::Relaxed);
    let lost0 = shared.lost.load(Ordering::Relaxed);
    let d0 = shared.delay.snapshot();
    let v0 = shared.video.c.snapshot();
    let vd0 = shared.video.delay.snapshot();
    let vf0 = shared.video.frame_delay.snapshot();
    let unmeasured0 = shared.unmeasured.load(Ordering::Relaxed);
    let measure_end = tokio::time::Instant::now() + sc.duration;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        progress(&shared, run_start, total, "measuring");
        if tokio::time::Instant::now() >= measure_end {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = pid.and_then(cpu_seconds);
    let rss_loaded = pid.and_then(rss_kb);
    // Read with the CPU, so that CPU per received packet covers the same interval.
    let rx = shared.rx_packets.load(Ordering::Relaxed) - rx0;
    let tx = shared.tx_packets.load(Ordering::Relaxed) - tx0;
    let v1 = shared.video.c.snapshot();
    let diff =
        |a: Vec<u64>, b: Vec<u64>| -> Vec<u64> { a.iter().zip(&b).map(|(x, y)| x - y).collect() };
    let vd = diff(shared.video.delay.snapshot(), vd0);
    let vf = diff(shared.video.frame_delay.snapshot(), vf0);
    let m1 = match &metrics_url {
        Some(u) => Some(parse_metrics(&http_get(u).await?)),
        None => None,
    };
    let _ = stop_tx.send(true);
    let lost = shared.lost.load(Ordering::Relaxed) - lost0;
    let d1 = shared.delay.snapshot();
    let dd: Vec<u64> = d1.iter().zip(d0.iter()).map(|(a, b)| a - b).collect();
    eprintln!();

    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await?);
    }
    drop(server);

    let forwarded = match (&m0, &m1) {
        (Some(a), Some(b)) => Some(
            b.get("chorus_sfu_rtp_forwarded_total")
                .copied()
                .unwrap_or(0.0)
                - a.get("chorus_sfu_rtp_forwarded_total")
                    .copied()
                    .unwrap_or(0.0),
        ),
        // Janus counts nothing we can read: what the subscribers received is what it
        // forwarded (on loopback with no loss, exactly).
        _ if kind == ServerKind::Janus => Some(rx as f64),
        _ => None,
    };
    let (cpu, sys) = match (cpu0, cpu1) {
        (Some(a), Some(b)) => (Some(b.0 + b.1 - a.0 - a.1), Some(b.1 - a.1)),
        _ => (None, None),
    };
    let per_packet = |c: Option<f64>, n: Option<f64>| match (c, n) {
        (Some(c), Some(n)) if n > 0.0 => Some(c * 1e6 / n),
        _ => None,
    };
    let mut errors = Vec::new();
    for r in &results {
        if let Some(e) = &r.error {
            errors.push(e.clone());
            continue;
        }
        // Every participant must hear every other speaker of its room.
        if let Some(speakers) = room_speakers.get(&r.room) {
            for p in speakers {
                if Some(*p) == r.publisher {
                    continue;
                }
                if r.per_publisher.get(p).copied().unwrap_or(0) == 0 {
                    errors.push(format!(
                        "{} in {} got nothing from speaker {p}",
                        r.identity, r.room
                    ));
                }
            }
        }
        for p in r.per_publisher.keys() {
            if !room_speakers.get(&r.room).is_some_and(|s| s.contains(p)) {
                errors.push(format!(
                    "{} in {} got packets from speaker {p} of another room",
                    r.identity, r.room
                ));
            }
        }
    }
    if lost > 0 {
        errors.push(format!("{lost} packets lost during the measured window"));
    }
    let video_report = video_clip.map(|_| {
        let total_counts = shared.video.c.snapshot();
        video_errors(&results, &room_cameras, &total_counts, &mut errors);
        let window = v1 - v0;
        video_rx::VideoReport {
            cameras: cameras_total,
            sent_pps: window.tx_packets as f64 / secs,
            received_pps: window.rx_packets as f64 / secs,
            audio_received_pps: rx.saturating_sub(window.rx_packets) as f64 / secs,
            frames_per_sec: window.frames as f64 / secs,
            delay_ms_p50: DelayHistogram::quantile_ms(&vd, 0.5),
            delay_ms_p99: DelayHistogram::quantile_ms(&vd, 0.99),
            frame_delay_ms_p50: DelayHistogram::quantile_ms(&vf, 0.5),
            frame_delay_ms_p99: DelayHistogram::quantile_ms(&vf, 0.99),
            total: total_counts,
            window,
            keyframe_requests: shared
                .video
                .keyframe_requests
                .each_ref()
                .map(|k| k.load(Ordering::Relaxed)),
            publish_to_first_frame_ms: video_rx::Spread::of(
                &shared.video.first_frames().after_publish_ms,
            ),
            join_to_first_frame_ms: video_rx::Spread::of(
                &shared.video.first_frames().after_join_ms,
            ),
            publish_to_answer_ms: video_rx::Spread::of(&shared.video.first_frames().answer_ms),
            subscriber_answer_to_first_frame_ms: video_rx::Spread::of(
                &shared.video.first_frames().after_answer_ms,
            ),
            problems: shared.video.samples(),
        }
    });
    let jitters: Vec<f64> = results
        .iter()
        .flat_map(|r| r.jitter_ms.iter().copied())
        .collect();
    let report = Report {
        server: kind,
        scenario: sc.name.clone(),
        rooms: sc.rooms,
        participants: total,
        speakers: speakers_total,
        measured_secs: secs,
        joined: shared.joined.load(Ordering::Relaxed),
        connected: shared.connected.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        sent_pps: tx as f64 / secs,
        received_pps: rx as f64 / secs,
        loss_percent: if rx + lost > 0 {
            100.0 * lost as f64 / (rx + lost) as f64
        } else {
            0.0
        },
        e2e_delay_ms_p50: DelayHistogram::quantile_ms(&dd, 0.5),
        e2e_delay_ms_p99: DelayHistogram::quantile_ms(&dd, 0.99),
        delay_over_10s: shared.unmeasured.load(Ordering::Relaxed) - unmeasured0,
        mean_jitter_ms: if jitters.is_empty() {
            0.0
        } else {
            jitters.iter().sum::<f64>() / jitters.len() as f64
        },
        forwarded_pps: forwarded.map(|f| f / secs),
        forwarded_source: match kind {
            ServerKind::Chorus => "sfu_metrics",
            ServerKind::Janus => "received_by_loadgen",
        },
        sfu_forward_ms_p50: m0
            .as_ref()
            .zip(m1.as_ref())
            .and_then(|(a, b)| forward_quantile(a, b, 0.5)),
        sfu_forward_ms_p99: m0
            .as_ref()
            .zip(m1.as_ref())
            .and_then(|(a, b)| forward_quantile(a, b, 0.99)),
        server_cpu_percent: cpu.map(|c| 100.0 * c / secs),
        server_cpu_us_per_forwarded_packet: per_packet(cpu, forwarded),
        server_sys_us_per_forwarded_packet: per_packet(sys, forwarded),
        server_cpu_us_per_received_packet: per_packet(cpu, Some(rx as f64)),
        server_sys_us_per_received_packet: per_packet(sys, Some(rx as f64)),
        server_rss_idle_mb: rss_idle.map(|k| k / 1024.0),
        server_rss_loaded_mb: rss_loaded.map(|k| k / 1024.0),
        server_rss_kb_per_participant: match (rss_idle, rss_loaded) {
            (Some(a), Some(b)) => Some((b - a) / total as f64),
            _ => None,
        },
        video: video_report,
        consistency_errors: errors.iter().take(20).cloned().collect(),
    };
    Ok((report, errors))
}

fn progress(shared: &Shared, start: tokio::time::Instant, total: usize, phase: &str) {
    use std::io::IsTerminal;
    // On a terminal one line redraws itself; in a log, one line every 5 s.
    let tty = std::io::stderr().is_terminal();
    let t = start.elapsed().as_secs_f64();
    if !tty && (t % 5.0) > 1.0 {
        return;
    }
    eprint!(
        "{}{phase:>9} t={:>5.1}s joined {}/{total} connected {} failed {} · tx {} rx {} lost {}   {}",
        if tty { "\r" } else { "" },
        t,
        shared.joined.load(Ordering::Relaxed),
        shared.connected.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
        shared.tx_packets.load(Ordering::Relaxed),
        shared.rx_packets.load(Ordering::Relaxed),
        shared.lost.load(Ordering::Relaxed),
        if tty { "" } else { "\n" },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(rooms: usize, participants: usize, speakers: usize) -> Scenario {
        Scenario {
            name: "t".into(),
            rooms,
            participants_per_room: participants,
            speakers_per_room: speakers,
            duration: Duration::from_secs(1),
            ramp: Duration::ZERO,
            talk: None,
            server_args: Vec::new(),
            cameras_per_room: 0,
            camera_after: None,
            subscriber_caps: Vec::new(),
        }
    }

    #[test]
    fn plan_spreads_rooms_and_puts_speakers_first() {
        let p = plan(&scenario(2, 3, 2));
        // Joiners alternate rooms; the first two of each room talk.
        assert_eq!(
            p.members,
            vec![
                (0, Some(0)),
                (1, Some(1)),
                (0, Some(2)),
                (1, Some(3)),
                (0, None),
                (1, None)
            ]
        );
        assert_eq!(p.room_speakers["t-0"], vec![0, 2]);
        assert_eq!(p.room_speakers["t-1"], vec![1, 3]);
    }
}
