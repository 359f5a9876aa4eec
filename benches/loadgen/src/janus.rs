//! The Janus peer comparison: a fresh Janus (VideoRoom plugin, audio only, WebSocket
//! transport on loopback) and simulated participants that talk the Janus API.
//!
//! Each participant opens one WebSocket and one Janus session. A talking participant
//! attaches a publisher handle, joins its room as `publisher` and publishes a
//! send-only Opus PeerConnection (str0m offers, Janus answers). Every participant
//! that has someone to hear also attaches a subscriber handle and, once all the other
//! speakers of its room are publishing, joins as `subscriber` to all of them at once
//! (Janus 1.x multistream: one PeerConnection, one m-line per feed; Janus offers,
//! str0m answers). Waiting for the speakers instead of adding feeds with `subscribe`
//! as they appear keeps the peer simple; the measured window starts after everyone
//! is connected either way.
//!
//! The media side (clip frames, stamps, receive accounting) is `peer.rs`'s, so the
//! two servers get the same packets and are measured the same way.

use std::collections::VecDeque;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::peer::{record_outcome, Clip, Pc, PeerResult, Receiver, Sender, Talk};
use crate::stats::Shared;

/// How long one Janus API request may take before the participant gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Janus drops a session after 60 s without a request (its default `session_timeout`).
const KEEPALIVE: Duration = Duration::from_secs(25);

/// Janus room ids are numbers; room `r` of the scenario is `r + 1` (0 is not valid).
pub fn room_id(r: usize) -> u64 {
    r as u64 + 1
}

/// A publisher's feed id: its index in the send-time table plus one (0 is not valid).
pub fn feed_id(publisher: u32) -> u64 {
    u64::from(publisher) + 1
}

/// Where Debian/Ubuntu and a source build put Janus's plugins and transports.
const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/janus",
    "/usr/lib/aarch64-linux-gnu/janus",
    "/usr/lib/janus",
    "/usr/local/lib/janus",
    "/opt/janus/lib/janus",
];

/// How to start Janus.
pub struct JanusOptions {
    /// The binary: a name on PATH or a path.
    pub bin: String,
    /// `event_loops`: 0 is a thread per PeerConnection (Janus's default).
    pub event_loops: usize,
    /// Janus's log level (0–7); 2 is errors only, so logging costs no CPU.
    pub debug_level: u8,
    /// Where Janus's output goes (default: its temporary config directory).
    pub log: Option<PathBuf>,
    /// The address Janus gathers ICE candidates on (and the peers bind to).
    pub ip: Ipv4Addr,
}

/// A Janus process started for one run, with its own config directory.
pub struct JanusServer {
    child: Child,
    pub url: String,
    dir: PathBuf,
}

impl JanusServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for JanusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The machine's own (non-loopback) IPv4 address, from the kernel's routing view (a
/// connected UDP socket sends nothing).
///
/// Janus needs one for media: 1.1.2 never gathers ICE candidates on loopback
/// interfaces (`ice.c` skips `IFF_LOOPBACK`), and libnice pins each media socket to
/// its interface (`IP_UNICAST_IF`), so a packet from Janus to 127.0.0.1 would be
/// routed out of that interface to the gateway. So for Janus runs both Janus and the
/// simulated participants use this address: traffic between two local addresses
/// never leaves the machine (Linux delivers it through `lo`).
pub fn local_ipv4() -> anyhow::Result<Ipv4Addr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // Any routable address works; nothing is sent.
    s.connect("192.0.2.1:9").context(
        "no non-loopback IPv4 route: Janus needs an address besides lo for ICE (see --janus-ip)",
    )?;
    match s.local_addr()?.ip() {
        IpAddr::V4(a) if !a.is_loopback() && !a.is_unspecified() => Ok(a),
        other => bail!(
            "no non-loopback IPv4 address (got {other}): Janus never uses lo for ICE (see --janus-ip)"
        ),
    }
}

/// Starts Janus with a minimal configuration: the VideoRoom plugin and the WebSocket
/// transport only (on 127.0.0.1), no event handlers or loggers, errors-only logging,
/// ICE restricted to one local address (`opts.ip`).
pub fn start(opts: &JanusOptions) -> anyhow::Result<JanusServer> {
    let bin = opts.bin.as_str();
    let bin = find_on_path(bin).ok_or_else(|| {
        anyhow!(
            "`{bin}` not found: install Janus with `apt-get install janus` (or pass --janus-bin)"
        )
    })?;
    let lib = LIB_DIRS
        .iter()
        .map(Path::new)
        .find(|d| d.join("plugins/libjanus_videoroom.so").is_file())
        .ok_or_else(|| {
            anyhow!(
                "Janus's VideoRoom plugin not found in {}: install it with `apt-get install janus`",
                LIB_DIRS.join(", ")
            )
        })?;
    let ice_ip = opts.ip;
    let dir = std::env::temp_dir().join(format!("chorus-loadgen-janus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["plugins", "transports", "none"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    // Folders holding only what this run loads: Janus loads every plugin and
    // transport it finds, each with its own threads and ports.
    std::os::unix::fs::symlink(
        lib.join("plugins/libjanus_videoroom.so"),
        dir.join("plugins/libjanus_videoroom.so"),
    )?;
    std::os::unix::fs::symlink(
        lib.join("transports/libjanus_websockets.so"),
        dir.join("transports/libjanus_websockets.so"),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let d = dir.display();
    let (debug_level, event_loops) = (opts.debug_level, opts.event_loops);
    // libnice's own log too at the top level (for ICE trouble).
    let nice_debug = debug_level >= 7;
    std::fs::write(
        dir.join("janus.jcfg"),
        format!(
            r#"general: {{
	configs_folder = "{d}"
	plugins_folder = "{d}/plugins"
	transports_folder = "{d}/transports"
	events_folder = "{d}/none"
	loggers_folder = "{d}/none"
	debug_level = {debug_level}
	session_timeout = 60
	event_loops = {event_loops}
}}
media: {{
}}
nat: {{
	nice_debug = {nice_debug}
	ice_enforce_list = "{ice_ip}"
}}
plugins: {{
}}
transports: {{
}}
loggers: {{
}}
events: {{
	broadcast = false
}}
"#
        ),
    )?;
    std::fs::write(
        dir.join("janus.transport.websockets.jcfg"),
        format!(
            r#"general: {{
	json = "compact"
	ws = true
	ws_port = {port}
	ws_ip = "127.0.0.1"
	wss = false
}}
admin: {{
	admin_ws = false
	admin_wss = false
}}
"#
        ),
    )?;
    // No static rooms: the runner creates the scenario's rooms over the API.
    std::fs::write(dir.join("janus.plugin.videoroom.jcfg"), "general: {\n}\n")?;
    let log = opts.log.clone().unwrap_or_else(|| dir.join("janus.log"));
    let out = File::create(&log)?;
    let child = Command::new(&bin)
        .arg("-C")
        .arg(dir.join("janus.jcfg"))
        .arg("-F")
        .arg(&dir)
        .arg("--disable-colors")
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut server = JanusServer {
        child,
        url: format!("ws://127.0.0.1:{port}"),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(server);
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("janus exited ({status}) before listening; its log:\n{tail}");
        }
        if Instant::now() > deadline {
            bail!("janus did not listen on port {port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One WebSocket to Janus carrying one session.
pub struct JanusWs {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: u64,
    next_transaction: u64,
    /// Messages that arrived while a request waited for its reply.
    unsolicited: VecDeque<Value>,
}

impl JanusWs {
    /// Connects (Janus's WebSocket transport wants the `janus-protocol` subprotocol)
    /// and creates a session.
    pub async fn connect(url: &str) -> anyhow::Result<JanusWs> {
        let mut req = url.into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("janus-protocol"),
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .with_context(|| format!("connecting to Janus at {url}"))?;
        let mut c = JanusWs {
            ws,
            session: 0,
            next_transaction: 0,
            unsolicited: VecDeque::new(),
        };
        let r = c.request(json!({"janus": "create"})).await?;
        c.session = r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("Janus `create` reply without a session id: {r}"))?;
        Ok(c)
    }

    async fn send_json(&mut self, mut msg: Value) -> anyhow::Result<String> {
        self.next_transaction += 1;
        let t = format!("t{}", self.next_transaction);
        msg["transaction"] = json!(t);
        if self.session != 0 {
            msg["session_id"] = json!(self.session);
        }
        self.ws.send(Message::Text(msg.to_string().into())).await?;
        Ok(t)
    }

    /// The next message from Janus (`None` when the socket closed); pings are
    /// answered underneath.
    async fn read(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Err(e)) => bail!("Janus WebSocket: {e}"),
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str())
                        .map(Some)
                        .with_context(|| format!("Janus sent bad JSON: {t}"));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends a request and waits for its reply: `success`, or the plugin's `event`
    /// after an `ack`. Errors (Janus's or the plugin's) become `Err`.
    async fn request(&mut self, msg: Value) -> anyhow::Result<Value> {
        let what = msg["body"]["request"]
            .as_str()
            .or(msg["janus"].as_str())
            .unwrap_or("request")
            .to_string();
        let t = self.send_json(msg).await?;
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.read())
                .await
                .with_context(|| format!("Janus did not answer `{what}` within 15 s"))??
                .ok_or_else(|| anyhow!("Janus closed the WebSocket during `{what}`"))?;
            if m["transaction"].as_str() != Some(t.as_str()) {
                self.unsolicited.push_back(m);
                continue;
            }
            match m["janus"].as_str() {
                Some("ack") => continue,
                Some("error") => bail!("Janus refused `{what}`: {}", m["error"]),
                _ => {}
            }
            let data = &m["plugindata"]["data"];
            if data.get("error_code").is_some() {
                bail!("VideoRoom refused `{what}`: {}", data["error"]);
            }
            return Ok(m);
        }
    }

    /// Attaches a VideoRoom handle to the session.
    pub async fn attach(&mut self) -> anyhow::Result<u64> {
        let r = self
            .request(json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}))
            .await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("Janus `attach` reply without a handle id: {r}"))
    }

    /// A VideoRoom request on `handle`, with an SDP when there is one.
    pub async fn message(
        &mut self,
        handle: u64,
        body: Value,
        jsep: Option<(&str, String)>,
    ) -> anyhow::Result<Value> {
        let mut msg = json!({"janus": "message", "handle_id": handle, "body": body});
        if let Some((kind, sdp)) = jsep {
            msg["jsep"] = json!({"type": kind, "sdp": sdp});
        }
        self.request(msg).await
    }

    /// Tells Janus there are no candidates beyond those in our SDP (str0m puts its
    /// one host candidate there), so it need not wait for trickled ones.
    async fn trickle_done(&mut self, handle: u64) -> anyhow::Result<()> {
        self.send_json(
            json!({"janus": "trickle", "handle_id": handle, "candidate": {"completed": true}}),
        )
        .await?;
        Ok(())
    }

    async fn keepalive(&mut self) -> anyhow::Result<()> {
        self.send_json(json!({"janus": "keepalive"})).await?;
        Ok(())
    }

    /// The next message nobody waited for.
    async fn next_unsolicited(&mut self) -> anyhow::Result<Option<Value>> {
        if let Some(m) = self.unsolicited.pop_front() {
            return Ok(Some(m));
        }
        self.read().await
    }

    /// Destroys the session (waiting briefly for Janus to confirm, so that closing the
    /// socket does not race the destroy) and closes the socket.
    pub async fn close(mut self) {
        let destroy = self.request(json!({"janus": "destroy"}));
        let _ = tokio::time::timeout(Duration::from_secs(2), destroy).await;
        let _ = self.ws.close(None).await;
    }
}

/// The SDP of a reply's `jsep` of the given type.
fn jsep_sdp(reply: &Value, kind: &str) -> anyhow::Result<String> {
    let jsep = &reply["jsep"];
    if jsep["type"].as_str() != Some(kind) {
        bail!("expected an SDP {kind} from Janus, got: {reply}");
    }
    jsep["sdp"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("Janus sent a jsep without sdp"))
}

/// Creates the scenario's rooms (those that do not exist yet): audio only (Opus), room
/// for every participant to publish, no recording.
pub async fn create_rooms(url: &str, rooms: usize, publishers: usize) -> anyhow::Result<()> {
    let mut ws = JanusWs::connect(url).await?;
    let h = ws.attach().await?;
    for r in 0..rooms {
        // A running Janus (--url) may have them from an earlier run.
        let exists = ws
            .message(h, json!({"request": "exists", "room": room_id(r)}), None)
            .await?;
        if exists["plugindata"]["data"]["exists"].as_bool() == Some(true) {
            continue;
        }
        ws.message(
            h,
            json!({
                "request": "create",
                "room": room_id(r),
                "description": format!("chorus-loadgen {r}"),
                "publishers": publishers.max(1),
                "audiocodec": "opus",
                "record": false,
                "audiolevel_ext": true,
                "notify_joining": false,
            }),
            None,
        )
        .await
        .with_context(|| format!("creating Janus room {}", room_id(r)))?;
    }
    ws.close().await;
    Ok(())
}

pub struct JanusSpec {
    pub index: usize,
    pub url: String,
    /// Scenario room name (for the consistency checks) and Janus room number.
    pub room_name: String,
    pub room: u64,
    pub publisher: Option<u32>,
    /// Publisher indices of the other speakers of the room: what to subscribe to.
    pub feeds: Vec<u32>,
    pub talk: Talk,
    /// The address Janus gathers on: the PCs bind there too (see [`local_ipv4`]).
    pub ip: Ipv4Addr,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

pub async fn run(mut spec: JanusSpec, clip: Arc<Clip>, shared: Arc<Shared>) -> PeerResult {
    let mut result = PeerResult {
        identity: format!("lg{}", spec.index),
        room: spec.room_name.clone(),
        publisher: spec.publisher,
        ..Default::default()
    };
    let outcome = run_inner(&mut spec, &clip, &shared, &mut result).await;
    record_outcome(outcome, spec.index, &shared, &mut result);
    result
}

/// Whether every feed in `feeds` is an active publisher of the room.
async fn feeds_ready(ws: &mut JanusWs, handle: u64, spec: &JanusSpec) -> anyhow::Result<bool> {
    let r = ws
        .message(
            handle,
            json!({"request": "listparticipants", "room": spec.room}),
            None,
        )
        .await?;
    let list = r["plugindata"]["data"]["participants"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(spec.feeds.iter().all(|p| {
        list.iter().any(|x| {
            x["id"].as_u64() == Some(feed_id(*p)) && x["publisher"].as_bool() == Some(true)
        })
    }))
}

async fn run_inner(
    spec: &mut JanusSpec,
    clip: &Clip,
    shared: &Shared,
    result: &mut PeerResult,
) -> anyhow::Result<()> {
    let mut ws = JanusWs::connect(&spec.url).await?;
    let mut rx = Receiver::default();

    // Publisher PeerConnection: join as publisher, offer send-only Opus, take the answer.
    let mut publisher: Option<(Pc, Sender)> = None;
    if let Some(p) = spec.publisher {
        let h = ws.attach().await?;
        ws.message(
            h,
            json!({"request": "join", "ptype": "publisher", "room": spec.room,
                   "id": feed_id(p), "display": result.identity}),
            None,
        )
        .await?;
        let mut pc = Pc::new(IpAddr::V4(spec.ip))?;
        let mut api = pc.rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().context("offer")?;
        let reply = ws
            .message(
                h,
                json!({"request": "publish", "audio_codec": "opus"}),
                Some(("offer", offer.to_sdp_string())),
            )
            .await?;
        let answer = jsep_sdp(&reply, "answer")?;
        tracing::debug!(index = spec.index, offer = %offer, answer = %answer, "publisher SDP");
        let answer = SdpAnswer::from_sdp_string(&answer)?;
        pc.rtc.sdp_api().accept_answer(pending, answer)?;
        ws.trickle_done(h).await?;
        publisher = Some((pc, Sender::new(spec.index, p, mid, spec.talk)));
    }
    // Subscriber handle, used first to ask which feeds are up.
    let sub_handle = if spec.feeds.is_empty() {
        None
    } else {
        Some(ws.attach().await?)
    };
    shared.joined.fetch_add(1, Ordering::Relaxed);

    let mut subscriber: Option<Pc> = None;
    let mut counted = false;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let far = Duration::from_secs(3600);

    loop {
        let mut deadline = Instant::now() + far;
        if let Some((pc, _)) = publisher.as_mut() {
            deadline = deadline.min(pc.drive(&mut rx, shared)?);
        }
        if let Some(pc) = subscriber.as_mut() {
            deadline = deadline.min(pc.drive(&mut rx, shared)?);
        }
        let pub_up = publisher.as_ref().is_none_or(|(pc, _)| pc.connected);
        let sub_up = sub_handle.is_none() || subscriber.as_ref().is_some_and(|pc| pc.connected);
        if pub_up && sub_up && !counted {
            counted = true;
            shared.connected.fetch_add(1, Ordering::Relaxed);
        }
        if *spec.stop.borrow() {
            break;
        }
        let talking = publisher.as_ref().is_some_and(|(pc, _)| pc.connected);
        let waiting = sub_handle.is_some() && subscriber.is_none();
        tokio::select! {
            r = Pc::receive_opt(publisher.as_mut().map(|(pc, _)| pc)) => r?,
            r = Pc::receive_opt(subscriber.as_mut()) => r?,
            m = ws.next_unsolicited() => match m? {
                None => bail!("Janus closed the WebSocket"),
                Some(m) if m["janus"].as_str() == Some("hangup") => {
                    bail!("Janus hung up a PeerConnection: {}", m["reason"]);
                }
                Some(_) => {}
            },
            _ = poll.tick(), if waiting => {
                let Some(h) = sub_handle else { continue };
                if !feeds_ready(&mut ws, h, spec).await? {
                    continue;
                }
                let streams: Vec<Value> = spec.feeds.iter().map(|p| json!({"feed": feed_id(*p)})).collect();
                let reply = ws
                    .message(h, json!({"request": "join", "ptype": "subscriber", "room": spec.room, "streams": streams}), None)
                    .await?;
                let mut pc = Pc::new(IpAddr::V4(spec.ip))?;
                let offer = jsep_sdp(&reply, "offer")?;
                let answer = pc.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&offer)?)?;
                tracing::debug!(index = spec.index, offer = %offer, answer = %answer, "subscriber SDP");
                ws.message(h, json!({"request": "start"}), Some(("answer", answer.to_sdp_string())))
                    .await?;
                ws.trickle_done(h).await?;
                subscriber = Some(pc);
            }
            _ = keepalive.tick() => ws.keepalive().await?,
            _ = tick.tick(), if talking => {
                if let Some((pc, sender)) = publisher.as_mut() {
                    sender.tick(&mut pc.rtc, clip, shared);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                if let Some((pc, _)) = publisher.as_mut() {
                    pc.timeout()?;
                }
                if let Some(pc) = subscriber.as_mut() {
                    pc.timeout()?;
                }
            }
            _ = spec.stop.changed() => break,
        }
    }
    rx.finish(result);
    ws.close().await;
    if !counted {
        bail!("media never connected");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsep_must_have_the_expected_type() {
        let reply = json!({"jsep": {"type": "offer", "sdp": "v=0\r\n"}});
        assert_eq!(jsep_sdp(&reply, "offer").ok().as_deref(), Some("v=0\r\n"));
        assert!(jsep_sdp(&reply, "answer").is_err());
        assert!(jsep_sdp(&json!({"janus": "event"}), "offer").is_err());
        assert!(jsep_sdp(&json!({"jsep": {"type": "offer"}}), "offer").is_err());
    }

    #[test]
    fn ids_are_never_zero() {
        assert_eq!(room_id(0), 1);
        assert_eq!(feed_id(0), 1);
        assert_eq!(feed_id(u32::MAX), u64::from(u32::MAX) + 1);
    }
}
