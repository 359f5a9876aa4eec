//! The Janus peer comparison: a fresh Janus (VideoRoom plugin, WebSocket transport on
//! loopback) and simulated participants that talk the Janus API.
//!
//! Each participant opens one WebSocket and one Janus session. A participant that
//! talks or has a camera attaches a publisher handle, joins its room as `publisher`
//! and publishes a send-only PeerConnection (str0m offers, Janus answers): Opus, and
//! in video scenarios the camera's three-layer VP8 simulcast in the same offer (rids
//! `q`/`h`/`f`, declared to Janus as lowest first with `rid_order: "lmh"`). Every
//! participant that has someone to hear or see also attaches a subscriber handle and,
//! once all the other publishers of its room are up, joins as `subscriber` to all of
//! them at once (Janus 1.x multistream: one PeerConnection, one m-line per feed and
//! kind; Janus offers, str0m answers). A subscriber with a cap then asks for the
//! simulcast substream that matches it on every video m-line with `configure`
//! (`substream` 0/1/2 for low/medium/high), as a Janus client picks a layer.
//! Waiting for the publishers instead of adding feeds with `subscribe` as they appear
//! keeps the peer simple; the measured window starts after everyone is connected
//! either way. For the same reason the camera is always in the first offer here
//! (`camera_after` is Chorus-only: turning it on later would need a renegotiation and
//! a `subscribe` update on every subscriber).
//!
//! The media side (clip frames, stamps, VP8 packetization, receive accounting) is
//! `peer.rs`'s and `video.rs`'s, so the two servers get the same packets and are
//! measured the same way.

mod server;

pub use server::{local_ipv4, start, JanusOptions, JanusServer};

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
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

use chorus_protocol::track::Quality;

use crate::peer::{record_outcome, Clip, Pc, PeerResult, Receiver, Sender, Talk, VideoSpec};
use crate::stats::Shared;
use crate::video::{self, VideoSender};

/// How long one Janus API request may take before the participant gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Janus drops a session after 60 s without a request (its default `session_timeout`).
const KEEPALIVE: Duration = Duration::from_secs(25);

/// Janus room ids are numbers; room `r` of the scenario is `r + 1` (0 is not valid).
pub fn room_id(r: usize) -> u64 {
    r as u64 + 1
}

/// A publishing participant's feed id: its participant index plus one (0 is not
/// valid). By participant, not by speaker, because in video scenarios a participant
/// may publish a camera without talking.
pub fn feed_id(index: usize) -> u64 {
    index as u64 + 1
}

/// The VideoRoom simulcast substream a subscriber with this cap asks for: Janus
/// numbers them from the lowest (0) to the highest (2), like our rids q/h/f.
pub fn substream(cap: Quality) -> Option<u8> {
    match cap {
        Quality::Low => Some(0),
        Quality::Medium => Some(1),
        Quality::High => Some(2),
        // Nothing to ask Janus for (a subscriber would `configure` with `send: false`);
        // no scenario caps a subscriber at off.
        Quality::Off => None,
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

    /// A VideoRoom request on `handle`, with a JSEP (see [`jsep`]) when there is one.
    pub async fn message(
        &mut self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut msg = json!({"janus": "message", "handle_id": handle, "body": body});
        if let Some(j) = jsep {
            msg["jsep"] = j;
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

/// A JSEP for a request: an SDP offer or answer.
pub fn jsep(kind: &str, sdp: String) -> Value {
    json!({"type": kind, "sdp": sdp})
}

/// The publisher's offer. With simulcast it says in which order the `a=rid` lines list
/// the layers: Janus assumes highest first (`hml`) unless told, and str0m lists them
/// as we added them, lowest first (q, h, f). Without it Janus would take `q` for its
/// substream 2 and every subscriber's `substream` would pick the wrong layer.
pub fn publish_jsep(sdp: String, simulcast: bool) -> Value {
    let mut j = jsep("offer", sdp);
    if simulcast {
        j["rid_order"] = json!("lmh");
    }
    j
}

/// The `publish` request: the codecs the room was created with, for what is offered.
pub fn publish_body(audio: bool, video: bool) -> Value {
    let mut b = json!({"request": "publish"});
    if audio {
        b["audiocodec"] = json!("opus");
    }
    if video {
        b["videocodec"] = json!("vp8");
    }
    b
}

/// The `join` of a subscriber to every stream of `feeds` (Janus 1.x multistream).
pub fn subscribe_body(room: u64, feeds: &[u64]) -> Value {
    let streams: Vec<Value> = feeds.iter().map(|f| json!({"feed": f})).collect();
    json!({"request": "join", "ptype": "subscriber", "room": room, "streams": streams})
}

/// The mids of the video m-lines of a subscription, from the `attached` (or
/// `updated`) event's `streams`.
pub fn video_mids(reply: &Value) -> Vec<String> {
    reply["plugindata"]["data"]["streams"]
        .as_array()
        .map(|streams| {
            streams
                .iter()
                .filter(|s| s["type"].as_str() == Some("video"))
                .filter_map(|s| s["mid"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The `configure` that asks for one simulcast substream on each of `mids`: the mid
/// is needed per stream, as one subscription carries several publishers' video.
pub fn configure_substream(mids: &[String], substream: u8) -> Value {
    let streams: Vec<Value> = mids
        .iter()
        .map(|m| json!({"mid": m, "substream": substream}))
        .collect();
    json!({"request": "configure", "streams": streams})
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

/// The `create` request of room `r`: Opus (and VP8 in video scenarios), room for every
/// participant to publish, no recording, the audio-level extension without Janus's
/// talking events.
pub fn create_room_body(r: usize, publishers: usize, video: bool) -> Value {
    let mut b = json!({
        "request": "create",
        "room": room_id(r),
        "description": format!("chorus-loadgen {r}"),
        "publishers": publishers.max(1),
        "audiocodec": "opus",
        "record": false,
        "audiolevel_ext": true,
        "notify_joining": false,
    });
    if video {
        // VP8 is the default too; said so that the room cannot end up on another codec.
        // No `bitrate` cap (0: Janus sends no REMB limit; the cameras ignore it anyway)
        // and no periodic keyframe requests (`fir_freq` 0), like Chorus.
        b["videocodec"] = json!("vp8");
    }
    b
}

/// Creates the scenario's rooms (those that do not exist yet), see [`create_room_body`].
pub async fn create_rooms(
    url: &str,
    rooms: usize,
    publishers: usize,
    video: bool,
) -> anyhow::Result<()> {
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
        ws.message(h, create_room_body(r, publishers, video), None)
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
    /// Publisher index (the audio stamps' send-time table) when this participant talks.
    pub publisher: Option<u32>,
    /// Feed ids of the room's other publishing participants: what to subscribe to.
    pub feeds: Vec<u64>,
    pub talk: Talk,
    /// The address Janus gathers on: the PCs bind there too (see [`local_ipv4`]).
    pub ip: Ipv4Addr,
    /// Set in video scenarios: the camera (when this participant has one) and the cap
    /// to ask for; `camera_after` is not used on Janus (see the module comment).
    pub video: Option<VideoSpec>,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

pub async fn run(mut spec: JanusSpec, clip: Arc<Clip>, shared: Arc<Shared>) -> PeerResult {
    let mut result = PeerResult {
        identity: format!("lg{}", spec.index),
        room: spec.room_name.clone(),
        publisher: spec.publisher,
        camera: spec.video.as_ref().and_then(|v| v.camera),
        video_cap: spec.video.as_ref().and_then(|v| v.cap),
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
    Ok(all_publishing(&r, &spec.feeds))
}

/// Whether a `listparticipants` reply shows every feed of `feeds` as publishing (its
/// PeerConnection is up, so every stream of its offer exists).
fn all_publishing(reply: &Value, feeds: &[u64]) -> bool {
    let list = reply["plugindata"]["data"]["participants"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    feeds.iter().all(|f| {
        list.iter()
            .any(|x| x["id"].as_u64() == Some(*f) && x["publisher"].as_bool() == Some(true))
    })
}

/// The publishing side: one PeerConnection with the microphone, the camera or both.
struct Publisher {
    pc: Pc,
    mic: Option<Sender>,
    camera: Option<VideoSender>,
}

/// Joins as publisher and publishes what this participant sends (see the module
/// comment); returns once Janus has answered.
async fn publish(
    ws: &mut JanusWs,
    spec: &JanusSpec,
    identity: &str,
    shared: &Shared,
) -> anyhow::Result<Publisher> {
    let camera = spec.video.as_ref().and_then(|v| v.camera);
    let h = ws.attach().await?;
    ws.message(
        h,
        json!({"request": "join", "ptype": "publisher", "room": spec.room,
               "id": feed_id(spec.index), "display": identity}),
        None,
    )
    .await?;
    // Video scenarios: RTP mode (the camera packetizes VP8 itself), with the header
    // extensions Janus needs for rid-based simulcast (mid, rid, repaired rid).
    let mut pc = match spec.video {
        Some(_) => Pc::new_video(IpAddr::V4(spec.ip))?,
        None => Pc::new(IpAddr::V4(spec.ip))?,
    };
    let mut api = pc.rtc.sdp_api();
    let mic = spec
        .publisher
        .map(|_| api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
    let cam = camera.map(|_| video::add_camera(&mut api));
    let (offer, pending) = api.apply().context("offer")?;
    let offered = Instant::now();
    if let Some(c) = camera {
        shared.video.published(c, shared.elapsed_ns(offered));
    }
    let reply = ws
        .message(
            h,
            publish_body(mic.is_some(), cam.is_some()),
            Some(publish_jsep(offer.to_sdp_string(), cam.is_some())),
        )
        .await?;
    let answer = jsep_sdp(&reply, "answer")?;
    tracing::debug!(index = spec.index, offer = %offer, answer = %answer, "publisher SDP");
    let answer = SdpAnswer::from_sdp_string(&answer)?;
    pc.rtc.sdp_api().accept_answer(pending, answer)?;
    ws.trickle_done(h).await?;
    if cam.is_some() {
        shared
            .video
            .answered(offered.elapsed().as_secs_f64() * 1000.0);
    }
    let mic = spec.publisher.zip(mic).map(|(p, mid)| match spec.video {
        Some(_) => Sender::new_rtp(spec.index, p, mid, spec.talk),
        None => Sender::new(spec.index, p, mid, spec.talk),
    });
    let camera = camera
        .zip(cam)
        .map(|(c, mid)| VideoSender::new(spec.index, c, mid));
    Ok(Publisher { pc, mic, camera })
}

/// Joins as subscriber to every feed, answers Janus's offer and starts the media; with a
/// cap, asks for its substream on every video m-line.
async fn subscribe(
    ws: &mut JanusWs,
    handle: u64,
    spec: &JanusSpec,
    rx: &mut Receiver,
    shared: &Shared,
) -> anyhow::Result<Pc> {
    rx.video.offered(Instant::now(), shared);
    let reply = ws
        .message(handle, subscribe_body(spec.room, &spec.feeds), None)
        .await?;
    let mut pc = match spec.video {
        Some(_) => Pc::new_video(IpAddr::V4(spec.ip))?,
        None => Pc::new(IpAddr::V4(spec.ip))?,
    };
    let offer = jsep_sdp(&reply, "offer")?;
    let answer = pc
        .rtc
        .sdp_api()
        .accept_offer(SdpOffer::from_sdp_string(&offer)?)?;
    tracing::debug!(index = spec.index, offer = %offer, answer = %answer, "subscriber SDP");
    ws.message(
        handle,
        json!({"request": "start"}),
        Some(jsep("answer", answer.to_sdp_string())),
    )
    .await?;
    rx.video.answered(Instant::now(), shared);
    ws.trickle_done(handle).await?;
    let cap = spec.video.as_ref().and_then(|v| v.cap);
    let mids = video_mids(&reply);
    if let (Some(sub), false) = (cap.and_then(substream), mids.is_empty()) {
        ws.message(handle, configure_substream(&mids, sub), None)
            .await
            .context("configure substream")?;
    }
    Ok(pc)
}

async fn run_inner(
    spec: &mut JanusSpec,
    clip: &Clip,
    shared: &Shared,
    result: &mut PeerResult,
) -> anyhow::Result<()> {
    let mut ws = JanusWs::connect(&spec.url).await?;
    let mut rx = Receiver::default();
    let has_camera = spec.video.as_ref().is_some_and(|v| v.camera.is_some());

    let mut publisher = if spec.publisher.is_some() || has_camera {
        Some(publish(&mut ws, spec, &result.identity, shared).await?)
    } else {
        None
    };
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
    let mut frame_tick = tokio::time::interval(video::FRAME_INTERVAL);
    frame_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let far = Duration::from_secs(3600);

    loop {
        let mut deadline = Instant::now() + far;
        if let Some(p) = publisher.as_mut() {
            deadline = deadline.min(p.pc.drive(&mut rx, shared)?);
            // Janus asks for keyframes (PLI) by substream; the camera answers per rid.
            for rid in p.pc.keyframe_requests.drain(..) {
                if let Some(c) = p.camera.as_mut() {
                    c.request_keyframe(rid, shared);
                }
            }
        }
        if let Some(pc) = subscriber.as_mut() {
            deadline = deadline.min(pc.drive(&mut rx, shared)?);
        }
        let pub_up = publisher.as_ref().is_none_or(|p| p.pc.connected);
        let sub_up = sub_handle.is_none() || subscriber.as_ref().is_some_and(|pc| pc.connected);
        if pub_up && sub_up && !counted {
            counted = true;
            shared.connected.fetch_add(1, Ordering::Relaxed);
            rx.video.ready(Instant::now(), shared);
        }
        if *spec.stop.borrow() {
            break;
        }
        let sending = publisher.as_ref().is_some_and(|p| p.pc.connected);
        let talking = sending && publisher.as_ref().is_some_and(|p| p.mic.is_some());
        let filming = sending && publisher.as_ref().is_some_and(|p| p.camera.is_some());
        let waiting = sub_handle.is_some() && subscriber.is_none();
        tokio::select! {
            r = Pc::receive_opt(publisher.as_mut().map(|p| &mut p.pc)) => r?,
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
                if feeds_ready(&mut ws, h, spec).await? {
                    subscriber = Some(subscribe(&mut ws, h, spec, &mut rx, shared).await?);
                }
            }
            _ = keepalive.tick() => ws.keepalive().await?,
            _ = tick.tick(), if talking => {
                if let Some(Publisher { pc, mic: Some(sender), .. }) = publisher.as_mut() {
                    sender.tick(&mut pc.rtc, clip, shared);
                }
            }
            _ = frame_tick.tick(), if filming => {
                if let (Some(Publisher { pc, camera: Some(cam), .. }), Some(v)) =
                    (publisher.as_mut(), spec.video.as_ref())
                {
                    cam.tick(&mut pc.rtc, &v.clip, shared);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                if let Some(p) = publisher.as_mut() {
                    p.pc.timeout()?;
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
        assert_eq!(feed_id(41), 42);
    }

    #[test]
    fn video_rooms_are_vp8_and_audio_rooms_say_nothing_of_video() {
        let b = create_room_body(2, 10, true);
        assert_eq!(b["room"], 3);
        assert_eq!(b["publishers"], 10);
        assert_eq!(b["audiocodec"], "opus");
        assert_eq!(b["videocodec"], "vp8");
        let b = create_room_body(0, 0, false);
        assert_eq!(b["publishers"], 1, "Janus refuses a room for no publisher");
        assert!(b.get("videocodec").is_none());
    }

    #[test]
    fn publish_names_the_codecs_offered_and_the_rid_order_with_simulcast() {
        assert_eq!(
            publish_body(true, true),
            json!({"request": "publish", "audiocodec": "opus", "videocodec": "vp8"})
        );
        assert_eq!(
            publish_body(false, true),
            json!({"request": "publish", "videocodec": "vp8"})
        );
        assert_eq!(
            publish_body(true, false),
            json!({"request": "publish", "audiocodec": "opus"})
        );
        let j = publish_jsep("v=0\r\n".into(), true);
        assert_eq!(
            j,
            json!({"type": "offer", "sdp": "v=0\r\n", "rid_order": "lmh"})
        );
        assert!(publish_jsep("v=0\r\n".into(), false)
            .get("rid_order")
            .is_none());
    }

    /// `rid_order: "lmh"` is only right while str0m writes the `a=rid` lines in the
    /// order the layers were added (lowest first): Janus numbers its substreams by that
    /// order, and a swap would silently give every capped subscriber the wrong layer.
    #[test]
    fn str0m_offers_the_rids_lowest_first() {
        let mut rtc = str0m::Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_vp8(true)
            .build(Instant::now());
        let mut api = rtc.sdp_api();
        video::add_camera(&mut api);
        let (offer, _) = api.apply().expect("an offer");
        let sdp = offer.to_sdp_string();
        let rids: Vec<&str> = sdp
            .lines()
            .filter_map(|l| l.strip_prefix("a=rid:"))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(rids, video::RIDS);
        assert!(sdp.contains("a=simulcast:send q;h;f"), "{sdp}");
    }

    #[test]
    fn subscribers_join_every_feed_and_configure_a_substream_per_video_mid() {
        assert_eq!(
            subscribe_body(1, &[2, 5]),
            json!({"request": "join", "ptype": "subscriber", "room": 1,
                   "streams": [{"feed": 2}, {"feed": 5}]})
        );
        assert_eq!(
            configure_substream(&["1".into(), "3".into()], 0),
            json!({"request": "configure", "streams": [
                {"mid": "1", "substream": 0}, {"mid": "3", "substream": 0}]})
        );
        assert_eq!(substream(Quality::Low), Some(0));
        assert_eq!(substream(Quality::Medium), Some(1));
        assert_eq!(substream(Quality::High), Some(2));
        assert_eq!(substream(Quality::Off), None);
    }

    #[test]
    fn video_mids_come_from_the_attached_event() {
        // Janus 1.1's `attached` reply to a subscriber join, trimmed.
        let reply = json!({"janus": "event", "plugindata": {"plugin": "janus.plugin.videoroom",
        "data": {"videoroom": "attached", "room": 1, "streams": [
            {"type": "audio", "mindex": 0, "mid": "0", "feed_id": 2},
            {"type": "video", "mindex": 1, "mid": "1", "feed_id": 2, "codec": "vp8"},
            {"type": "audio", "mindex": 2, "mid": "2", "feed_id": 5},
            {"type": "video", "mindex": 3, "mid": "3", "feed_id": 5},
            {"type": "video", "mindex": 4, "feed_id": 7},
        ]}}});
        assert_eq!(video_mids(&reply), vec!["1".to_string(), "3".to_string()]);
        // Anything else (an error, no streams) is no mids, not a panic.
        assert!(video_mids(&json!({"janus": "event"})).is_empty());
        assert!(video_mids(&json!({"plugindata": {"data": {"streams": 3}}})).is_empty());
    }

    #[test]
    fn feeds_are_ready_when_each_one_publishes() {
        let list = |ps: Value| json!({"plugindata": {"data": {"participants": ps}}});
        let r = list(json!([
            {"id": 1, "publisher": true},
            {"id": 2, "publisher": false},
            {"id": 3, "publisher": true},
        ]));
        assert!(all_publishing(&r, &[1, 3]));
        assert!(!all_publishing(&r, &[1, 2]));
        assert!(!all_publishing(&r, &[4]));
        assert!(all_publishing(&r, &[]));
        assert!(!all_publishing(&json!({"janus": "error"}), &[1]));
    }
}
