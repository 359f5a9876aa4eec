//! `chorus-cli`: a headless Chorus participant. Joins a voice channel, sends a WAV file
//! or a tone as its microphone, records what it hears to a WAV file, and reports join
//! time, loss and jitter. For bots, recordings, load and tests; needs no audio device.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use chorus_native::audio::Gate;
use chorus_native::session::{
    self, AudioSink, AudioSource, Command, Config, Event, Report, Silence,
};
use chorus_native::wav::{Tone, WavSink, WavSource};
use clap::{Parser, ValueEnum};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StatsFormat {
    /// A readable summary on stderr.
    Text,
    /// The full report as one JSON object on stdout.
    Json,
}

/// Join a Chorus voice channel without a screen or sound card.
///
/// Examples:
///   chorus-cli --url http://127.0.0.1:7880 --name bot --room lobby --tone 440 --duration 10s
///   chorus-cli --url ws://host:7880/ws --token "$TOKEN" --input speech.wav --output heard.wav --stats json
#[derive(Debug, Parser)]
#[command(name = "chorus-cli", version, verbatim_doc_comment)]
struct Args {
    /// Server URL: ws://host:port/ws, or http://host:port (dev login uses it too).
    #[arg(long, env = "CHORUS_URL", default_value = "http://127.0.0.1:7880")]
    url: String,
    /// Access token (mint one with `chorus token`). Without it, --name asks a dev-mode
    /// server for one.
    #[arg(long, env = "CHORUS_TOKEN")]
    token: Option<String>,
    /// Dev login: display name to request a token for (dev-mode servers only).
    #[arg(long, conflicts_with = "token")]
    name: Option<String>,
    /// Dev login: room to join.
    #[arg(long, default_value = "lobby")]
    room: String,
    /// WAV file to send as the microphone (any rate; converted to 48 kHz mono).
    #[arg(long, conflicts_with = "tone")]
    input: Option<PathBuf>,
    /// Repeat --input until the session ends.
    #[arg(long = "loop", requires = "input")]
    looping: bool,
    /// Send a sine tone of this frequency (Hz) as the microphone.
    #[arg(long)]
    tone: Option<f64>,
    /// Level of --tone in dBFS.
    #[arg(long, default_value_t = -12.0, allow_hyphen_values = true)]
    tone_level: f64,
    /// Record everything heard (the mix of all participants) to this WAV file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// How long to stay once media is connected (e.g. 10s, 1m). Default: the length of
    /// --input plus one second, or until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Report format at the end.
    #[arg(long, value_enum, default_value_t = StatsFormat::Text)]
    stats: StatsFormat,
    /// When to transmit: open (always), voice (voice activation) or ptt (never, as the
    /// CLI has no key to hold).
    #[arg(long, default_value = "open")]
    gate: Gate,
    /// Client-side noise suppression (RNNoise) on the microphone.
    #[arg(long)]
    denoise: bool,
    /// Join muted.
    #[arg(long)]
    mute: bool,
    /// Opus bitrate in bits per second.
    #[arg(long, default_value_t = 32_000)]
    bitrate: i32,
    /// Testing: drop this percentage of received media packets, as a lossy network
    /// would (after the connection is up, so setup is not affected).
    #[arg(long, default_value_t = 0.0, value_name = "PERCENT")]
    drop_inbound: f64,
    /// Less chatter on stderr (errors and the report only).
    #[arg(long, short)]
    quiet: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    chorus_native::init_logging();
    match run(args).await {
        Ok(()) => {}
        Err(e) => {
            eprintln!("chorus-cli: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !(0.0..=100.0).contains(&args.drop_inbound) {
        bail!("--drop-inbound must be between 0 and 100");
    }
    let token = match (&args.token, &args.name) {
        (Some(t), _) => t.clone(),
        (None, Some(name)) => chorus_native::signaling::dev_token(&args.url, name, &args.room)
            .await
            .context("dev login")?,
        (None, None) => bail!("pass --token TOKEN, or --name NAME for a dev-mode server"),
    };

    let mut input_frames = None;
    let source: Box<dyn AudioSource> = match (&args.input, args.tone) {
        (Some(path), _) => {
            let w = WavSource::open(path, args.looping)?;
            input_frames = Some(w.frames());
            Box::new(w)
        }
        (None, Some(hz)) => {
            if !(20.0..=20_000.0).contains(&hz) {
                bail!("--tone must be between 20 and 20000 Hz");
            }
            Box::new(Tone::new(hz, args.tone_level.min(0.0)))
        }
        (None, None) => Box::new(Silence),
    };
    let recorder = match &args.output {
        Some(path) => Some(SharedSink::new(WavSink::create(path)?)),
        None => None,
    };
    let sink: Box<dyn AudioSink> = match &recorder {
        Some(r) => Box::new(r.clone()),
        None => Box::new(Silence),
    };
    let duration = args.duration.or_else(|| {
        input_frames
            .filter(|_| !args.looping)
            .map(|f| Duration::from_millis(20 * f as u64 + 1000))
    });

    let mut config = Config::new(args.url.clone(), token);
    config.denoise = args.denoise;
    config.gate = args.gate;
    config.muted = args.mute;
    config.encoder.bitrate = args.bitrate.clamp(6_000, 510_000);
    config.drop_inbound_percent = args.drop_inbound;

    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let session = tokio::spawn(session::run(config, source, sink, cmd_rx, ev_tx));

    let quiet = args.quiet;
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let mut names = std::collections::HashMap::<String, String>::new();
    let mut stop_at: Option<tokio::time::Instant> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let sleep = async {
            match stop_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = ev_rx.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    Event::Joined { room, me, participants } => {
                        for p in &participants {
                            names.insert(p.sid.clone(), p.name.clone());
                        }
                        let others: Vec<_> = participants.iter().map(|p| p.name.as_str()).collect();
                        say(format!("joined {room} as {} ({})", me.name,
                            if others.is_empty() { "nobody else here".to_string() } else { format!("with {}", others.join(", ")) }));
                    }
                    Event::MediaConnected { after } => {
                        say(format!("media connected after {} ms", after.as_millis()));
                        if let Some(d) = duration {
                            stop_at.get_or_insert(tokio::time::Instant::now() + d);
                        }
                    }
                    Event::ParticipantJoined(p) => {
                        say(format!("{} joined", p.name));
                        names.insert(p.sid, p.name);
                    }
                    Event::ParticipantLeft { sid, reason, .. } => {
                        let name = names.remove(&sid).unwrap_or(sid);
                        say(format!("{name} left ({reason})"));
                    }
                    Event::FirstAudio { sid, after } => {
                        let name = names.get(&sid).cloned().unwrap_or(sid);
                        say(format!("hearing {name} ({} ms after connecting)", after.as_millis()));
                    }
                    Event::Reconnecting { attempt } => say(format!("signaling lost; reconnecting (attempt {attempt})")),
                    Event::Reconnected { resumed } => say(format!("reconnected ({})", if resumed { "session resumed" } else { "new session" })),
                    Event::ServerError { code, message } => eprintln!("server error {code}: {message}"),
                    Event::Ended { reason } => { say(format!("session ended: {reason}")); }
                    _ => {}
                }
            }
            _ = sleep => {
                let _ = cmd_tx.send(Command::Leave);
                stop_at = None;
            }
            _ = &mut ctrl_c => {
                say("leaving…".into());
                let _ = cmd_tx.send(Command::Leave);
            }
        }
    }
    let report: Report = session.await.context("session task")??;
    if let Some(r) = recorder {
        r.finish()?;
    }
    match args.stats {
        StatsFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        StatsFormat::Text => print_report(&report),
    }
    if report.end_reason != "left" {
        bail!("{}", report.end_reason);
    }
    Ok(())
}

fn print_report(r: &Report) {
    let f = |v: Option<f64>| {
        v.map(|x| format!("{x:.0} ms"))
            .unwrap_or_else(|| "—".into())
    };
    eprintln!(
        "join {} · media {} · first audio {} · sent {} packets",
        f(r.join_ms),
        f(r.media_connected_ms),
        f(r.first_audio_ms),
        r.packets_sent
    );
    for s in &r.streams {
        eprintln!(
            "  from {}: {} packets, loss {:.1}% ({} recovered by FEC, {} concealed), jitter {:.1} ms",
            if s.identity.is_empty() { &s.sid } else { &s.identity },
            s.packets,
            s.loss_percent,
            s.fec_recovered,
            s.concealed,
            s.jitter_ms
        );
    }
}

/// The recorder is handed to the session and finished here afterwards.
#[derive(Clone)]
struct SharedSink(std::sync::Arc<std::sync::Mutex<WavSink>>);

impl SharedSink {
    fn new(s: WavSink) -> Self {
        SharedSink(std::sync::Arc::new(std::sync::Mutex::new(s)))
    }
    fn finish(&self) -> anyhow::Result<()> {
        match self.0.lock() {
            Ok(mut s) => s.finish(),
            Err(_) => bail!("recorder lock poisoned"),
        }
    }
}

impl AudioSink for SharedSink {
    fn write(&mut self, frame: &chorus_native::audio::Frame) {
        if let Ok(mut s) = self.0.lock() {
            s.write(frame);
        }
    }
}
