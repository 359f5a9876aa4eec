// Chorus browser SDK: signaling (docs/protocol.md, version 2) + one RTCPeerConnection.
// No UI code. Plain ES module, no dependencies.
//
//   const client = new ChorusClient({ audio: { echoCancellation: false } });
//   client.addEventListener("track", (e) => attach(e.detail.sid, e.detail.stream));
//   await client.connect({ url: "wss://host/ws", token });
//   client.setMuted(true);
//   await client.publishCamera();          // or publishCamera({deviceId, codec: "h264"})
//   await client.publishScreen();
//   client.unpublish("camera");
//   client.setTrackQuality(trackSid, "low"); // off | low | medium | high
//   client.observeTrackElement(trackSid, videoElement); // adaptive stream (see below)
//   client.leave();
//
// Events (CustomEvent, payload in `event.detail`):
//   joined               {room, self, participants, grants, resumed, iceServers}
//   participant-joined   {participant}
//   participant-updated  {participant, isSelf}
//   participant-left     {sid, identity, reason}
//   track                {sid, stream, track}      remote media of participant `sid` (the
//                                                 stream `p<sid>` carries all its tracks)
//   track-removed        {sid, stream, track}
//   connection-state     {state}   connecting | connected | reconnecting | disconnected
//   media-state          {state}   RTCPeerConnection.connectionState
//   left                 {reason}  the server ended the session (e.g. "replaced")
//   error                {code, message, name?}
//
// Video (docs/protocol.md, "Tracks and video"). A remote track exists once the
// participant lists it in `tracks` AND the server's SDP has mapped it to a transceiver
// (the `a=msid` track id of its m-section is the track sid):
//   remote-track         {participantSid, trackSid, source, kind, codec, track, stream, mid}
//   remote-track-removed {participantSid, trackSid, source, kind}
//   track-quality        {trackSid, quality, reason}   the layer we receive (off|low|
//                                                 medium|high) and why it is less than
//                                                 we asked for: reason "bandwidth" (our
//                                                 downlink; off + bandwidth = paused),
//                                                 "view" (adaptive stream: hidden or small
//                                                 tile), "publisher" (not sent), or null
//   publish-layers       {trackSid, source, layers}   dynacast: the simulcast layers of
//                                                 our own track that someone receives;
//                                                 the others are no longer encoded
//   local-track          {source, track, stream, state}  our camera/screen for a preview;
//                                                 state "pending" until the server accepts
//                                                 it, then "published" (fires again)
//   local-track-removed  {source, reason}   "unpublished" | "ended" | "refused"
//   publish-error        {source, code, message}   the server refused to publish it
//
// Adaptive stream (option `adaptiveStream`, on by default): the app hands the SDK the
// element each remote video track renders in (observeTrackElement); the SDK watches its
// size and visibility (ResizeObserver, IntersectionObserver) and tells the server
// (`update_subscription` with `visible`, `width`, `height` in device pixels, debounced),
// so a hidden tile receives nothing and a small one a low layer. A background tab
// (document.visibilityState "hidden") pauses every remote video track: audio only until
// the tab is shown again. Tracks without an observed element are not reported (the
// server then sends them as if visible, with no size limit).
//
// Dynacast: the server's `publish_layers` says which simulcast layers of our own tracks
// anyone receives; the SDK sets the others' encodings `active: false` (no encoding, no
// upload) and turns them on again when listed. publishedLayers(trackSid) reads it.
//
// Text chat (docs/protocol.md, "Text chat"), over two data channels on the same
// RTCPeerConnection (created before the one offer, so they need no renegotiation):
//   chat-ready           {}            the `chat` channel opened (sendChat works)
//   chat-closed          {}            the `chat` channel closed
//   chat-history         {messages}    the full ordered view after a `history` frame
//   chat-message         message       {id, from: {identity, name}, text, ts, ref?, own}
//   chat-deleted         {id}
//   chat-error           {code, message, ref}
//   typing               {from: {identity, name}, typing}
//
//   const ref = client.sendChat("hi"); client.deleteChat(id); client.setTyping(true);
//   client.getChatMessages()  // ordered by id

export const PROTOCOL_VERSION = 2;

/** Video sources a client publishes with publishCamera() / publishScreen(). */
export const VIDEO_SOURCES = ["camera", "screen"];
export const QUALITIES = ["off", "low", "medium", "high"];
/** Why a track arrives below its max_quality (`track_quality.reason`). */
export const QUALITY_REASONS = ["bandwidth", "view", "publisher"];
/** Simulcast rid → layer (docs/protocol.md "Publishing"). */
const RID_LAYERS = { q: "low", h: "medium", f: "high" };
/** Adaptive stream: wait this long after a tile changes before telling the server. */
const ADAPTIVE_DEBOUNCE_MS = 250;
/** ... and only tell it about a size change of more than this fraction. */
const ADAPTIVE_SIZE_STEP = 0.15;

/**
 * Camera simulcast (docs/protocol.md "Publishing"): rids q/h/f, lowest first, at 1/4, 1/2
 * and full resolution. A 1280x720 capture gives 320x180, 640x360 and 1280x720.
 */
// The low layer is what a weak downlink falls back to, several cameras at once: three of
// them must fit a 400 kbit/s link with room to spare, so 60 kbit/s at 15 fps. Chromium's
// encoder sends ~20% over its cap with keyframes: at 80 kbit/s three low layers took 300
// kbit/s and lost packets on every keyframe burst (at 150 kbit/s and 30 fps they alone
// overran the link and every camera paused).
const CAMERA_SIMULCAST = [
  { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 60_000, maxFramerate: 15 },
  { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: "f", scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];
/** A camera smaller than 720p sends one layer: scaling it further gives useless layers. */
const CAMERA_SINGLE = [{ maxBitrate: 600_000 }];
/** Screen share: one layer, text must stay sharp, so few frames and many bits. */
const SCREEN_ENCODING = [{ maxBitrate: 2_500_000, maxFramerate: 15 }];
const SCREEN_CONSTRAINTS = {
  video: { width: { max: 1920 }, height: { max: 1080 }, frameRate: { max: 15 } },
  audio: false,
};

const DEFAULT_AUDIO = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };

/** Errors after which the session cannot continue (the server closes the socket). */
const FATAL_CODES = new Set([
  "invalid_token",
  "token_expired",
  "unsupported_protocol",
  "no_media_node",
]);

/** Typing indicator throttling (ms): at most one `true` per interval, `false` after idle. */
const TYPING_REPEAT_MS = 2000;
const TYPING_IDLE_MS = 3000;

function randomRef() {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return [...bytes].map((b) => b.toString(36).padStart(2, "0")).join("").slice(0, 10);
}

export class ChorusError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "ChorusError";
    this.code = code;
  }
}

export class ChorusClient extends EventTarget {
  /**
   * @param {object} [options]
   * @param {MediaTrackConstraints|boolean} [options.audio] getUserMedia audio constraints
   * @param {boolean} [options.publish=true] publish the microphone (if the token allows)
   * @param {boolean} [options.reconnect=true] reconnect automatically when the socket drops
   * @param {"all"|"relay"} [options.iceTransportPolicy="all"] "relay" forces media through TURN
   * @param {"udp"|"tcp"|null} [options.turnTransport] keep only TURN URLs of this transport
   * @param {number} [options.pingIntervalMs=10000]
   * @param {number} [options.liveTimeoutMs=30000] socket considered dead without any frame
   * @param {boolean} [options.adaptiveStream=true] report observed tiles' size and
   *   visibility (and a background tab) to the server; false: never (every track is
   *   received as if shown full size)
   * @param {boolean} [options.dtx=true] Opus DTX: the microphone sends next to nothing
   *   while it is silent (a packet every 400 ms instead of 50 a second); false: always
   */
  constructor(options = {}) {
    super();
    this.options = {
      audio: DEFAULT_AUDIO,
      publish: true,
      reconnect: true,
      pingIntervalMs: 10_000,
      liveTimeoutMs: 30_000,
      adaptiveStream: true,
      dtx: true,
      ...options,
    };
    /** @type {"connecting"|"connected"|"reconnecting"|"disconnected"} */
    this.state = "disconnected";
    /** performance.now() timestamps, for tests and measurements. */
    this.timings = {};
    this.ws = null;
    /** @type {RTCPeerConnection|null} */
    this.pc = null;
    this.localStream = null;
    this.room = null;
    this.self = null;
    this.grants = null;
    /** Other participants, by sid. */
    this.participants = new Map();
    /** Remote audio streams, by participant sid. */
    this.remoteStreams = new Map();
    this.muted = false;
    this.reconnectGraceSecs = 15;
    this.rttMs = null;

    this._url = null;
    this._token = null;
    this._roomHint = null;
    this._hasSeat = false;
    this._leaving = false;
    this._fatal = false;
    this._pingTimer = null;
    this._liveTimer = null;
    this._reconnectTimer = null;
    this._reconnectAttempt = 0;
    this._lostAt = 0;
    this._queue = Promise.resolve(); // serialises SDP handling
    this._pendingCandidates = []; // local candidates produced before our offer went out
    this._offerSent = false;
    this._micPromise = null;
    this._joinWaiter = null;

    // Video. Negotiation after the first offer (docs/protocol.md "No glare"): we offer
    // only when stable with no offer of ours unanswered; a change made meanwhile sets
    // _needsOffer and goes out after the answer.
    this._ownOfferPending = false;
    this._needsOffer = false;
    /** Sources whose publication rides on the offer now outstanding (rolled back if refused). */
    this._offeredSources = new Set();
    /**
     * Our published (or being published) video: source → {source, track, stream,
     * transceiver, state: "pending"|"published", trackSid}.
     */
    this.localTracks = new Map();
    /** Transceivers we created per source, kept after unpublish for reuse (no SDP growth). */
    this._sourceTransceivers = new Map();
    /** The microphone's transceiver (its m-section is declared as `microphone`). */
    this._micTransceiver = null;
    /** Remote tracks by track sid (see the remote-track event). */
    this.remoteTracks = new Map();
    /** What the server's SDP says each receiving m-section carries: mid → {streamId, trackSid}. */
    this._remoteMids = new Map();
    /** Remote MediaStreams by id (`p<sid>`), as ontrack delivered them. */
    this._streamsById = new Map();
    /** The layer we receive of each remote video track (track_quality), by track sid. */
    this.trackQuality = new Map();
    /** The max_quality we asked for, by track sid. */
    this.subscriptionQuality = new Map();
    /** Why a remote track arrives below what we asked for (track_quality.reason), by sid. */
    this.trackQualityReason = new Map();
    /**
     * Adaptive stream: remote track sid → {element, intersecting, cssWidth, cssHeight,
     * sent: the last {visible, width, height} told to the server, timer}.
     */
    this._observed = new Map();
    this._resizeObserver = null;
    this._intersectionObserver = null;
    /** Remote tracks without an observed element that a background tab paused. */
    this._backgroundPaused = new Set();
    this._onVisibilityChange = () => this._pageVisibilityChanged();
    /** Dynacast: the layers the server says anyone receives, by our own track sid. */
    this.publishLayers = new Map();
    /** Pending setParameters() of each RTCRtpSender (never two at once for one sender). */
    this._senderChains = new WeakMap();

    // Text chat.
    /** @type {RTCDataChannel|null} */
    this.chatChannel = null;
    /** @type {RTCDataChannel|null} */
    this.signalChannel = null;
    this.chatReady = false;
    /** Chat messages by id (see getChatMessages() for the ordered list). */
    this.chatMessages = new Map();
    /** For tests and measurements: ref → performance.now() when sendChat() sent it. */
    this.chatTimings = new Map();
    this._chatGotHistory = false;
    this._chatEarly = []; // live messages that arrived on this channel before its history
    this._typing = false;
    this._typingSentAt = 0;
    this._typingIdleTimer = null;
  }

  // ------------------------------------------------------------------ public API

  /**
   * Open the socket and join. Resolves with the `joined` message; rejects with a
   * ChorusError if the server refuses or the socket closes first.
   * @param {{url: string, token: string, room?: string}} params
   */
  connect({ url, token, room } = {}) {
    if (!url || !token) throw new TypeError("connect({url, token}) needs both");
    if (this.ws) throw new Error("already connected; call leave() first");
    this._url = url;
    this._token = token;
    this._roomHint = room || null;
    this._leaving = false;
    this._fatal = false;
    this._hasSeat = false;
    this._reconnectAttempt = 0;
    this.timings = { connectStart: performance.now() };
    this.chatMessages = new Map();
    if (this.options.adaptiveStream && typeof document !== "undefined") {
      document.addEventListener("visibilitychange", this._onVisibilityChange);
    }
    // Acquire the microphone while the socket connects and the join is processed.
    if (this.options.publish && this.options.audio && !this._micPromise) {
      this._micPromise = this._acquireMic();
    }
    const joined = new Promise((resolve, reject) => {
      this._joinWaiter = { resolve, reject };
    });
    this._setState("connecting");
    this._openSocket(false);
    return joined;
  }

  /** Alias of connect(). */
  join(params) {
    return this.connect(params);
  }

  /** Mute or unmute the microphone: disables the track and tells the server. */
  setMuted(muted) {
    muted = !!muted;
    this.muted = muted;
    if (this.localStream) {
      for (const t of this.localStream.getAudioTracks()) t.enabled = !muted;
    }
    this._send({ type: "mute", muted });
    if (this.self) {
      this.self = { ...this.self, muted };
      this._emit("participant-updated", { participant: this.self, isSelf: true, local: true });
    }
  }

  /**
   * Ask the server to suppress noise on our microphone (server-side RNNoise), or stop.
   * Remembered across reconnects; the server answers `forbidden` if it disallows it.
   */
  setEnhanced(enabled) {
    this.enhanced = !!enabled;
    this._send({ type: "enhance", enabled: this.enhanced });
  }

  /** Leave for good: tells the server, closes the socket and the peer connection. */
  leave() {
    this._leaving = true;
    clearTimeout(this._reconnectTimer);
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      try {
        ws.send(JSON.stringify({ type: "leave" }));
      } catch {}
      // The server closes the socket after `leave`; close our side soon regardless.
      setTimeout(() => {
        try {
          ws.close(1000, "leave");
        } catch {}
      }, 1000);
    } else if (ws) {
      try {
        ws.close(1000, "leave");
      } catch {}
    }
    this._teardown("left");
  }

  // ------------------------------------------------------------------ chat API

  /** Chat messages, oldest first (ordered by the server-assigned id). */
  getChatMessages() {
    return [...this.chatMessages.values()].sort((a, b) => a.id - b.id);
  }

  /**
   * Send a chat message. Returns the `ref` it carries: our own copy comes back as a
   * `chat-message` with that ref, or a `chat-error` names it.
   */
  sendChat(text) {
    const ref = randomRef();
    this.chatTimings.set(ref, performance.now());
    if (this._typing) this._sendTyping(false);
    const ok = this._sendOn(this.chatChannel, { type: "send", text: String(text), ref });
    if (!ok) {
      this.chatTimings.delete(ref);
      // Asynchronously, like a server error, so callers can use the returned ref first.
      queueMicrotask(() =>
        this._emit("chat-error", { code: "chat_not_ready", message: "chat is not connected", ref }),
      );
    }
    return ref;
  }

  /** Delete a chat message (our own, or any with the admin grant). */
  deleteChat(id) {
    const ok = this._sendOn(this.chatChannel, { type: "delete", id: Number(id) });
    if (!ok) {
      queueMicrotask(() =>
        this._emit("chat-error", { code: "chat_not_ready", message: "chat is not connected", ref: null }),
      );
    }
    return ok;
  }

  /**
   * Tell the others whether we are typing (best effort, on the `signal` channel). Call it
   * on every keystroke: at most one `true` goes out per 2 s, and `false` follows after
   * 3 s without a call, on setTyping(false), or when a message is sent.
   */
  setTyping(typing) {
    if (!typing) {
      if (this._typing) this._sendTyping(false);
      return;
    }
    const now = performance.now();
    if (!this._typing || now - this._typingSentAt >= TYPING_REPEAT_MS) {
      if (!this._sendOn(this.signalChannel, { type: "typing", typing: true })) return;
      this._typing = true;
      this._typingSentAt = now;
    }
    clearTimeout(this._typingIdleTimer);
    this._typingIdleTimer = setTimeout(() => {
      if (this._typing) this._sendTyping(false);
    }, TYPING_IDLE_MS);
  }

  // ------------------------------------------------------------------ video API

  /**
   * Turn the camera on, or switch to another camera while it is on (same sender, no
   * renegotiation). Resolves with the local track entry once the capture runs and the
   * offer is on its way; the server's verdict follows as `local-track` with state
   * "published", or as `publish-error` + `local-track-removed` (the offer is rolled back).
   * Rejects with a ChorusError (code camera_denied / camera_unavailable / not_joined)
   * when there is nothing to publish; an `error` event says the same for the UI.
   * @param {object} [opts]
   * @param {string} [opts.deviceId] a videoinput deviceId (enumerateDevices)
   * @param {"vp8"|"h264"|"vp9"|"av1"} [opts.codec] offer only this codec (default: the
   *   browser's order, VP8 first)
   * @param {number} [opts.width=1280] @param {number} [opts.height=720] ideal capture size
   * @param {RTCDegradationPreference} [opts.degradationPreference] e.g. "maintain-resolution"
   */
  async publishCamera({ deviceId, codec, width = 1280, height = 720, degradationPreference } = {}) {
    this._requirePublish("camera");
    const video = { width: { ideal: width }, height: { ideal: height } };
    if (deviceId) video.deviceId = { exact: deviceId };
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video, audio: false });
    } catch (e) {
      throw this._captureFailed("camera", e);
    }
    const track = stream.getVideoTracks()[0];
    const s = track.getSettings ? track.getSettings() : {};
    // Three layers only make sense from 720p up (the lowest is then 320x180).
    const simulcast = Math.min(s.width || 0, s.height || 0) >= 720;
    const encodings = (simulcast ? CAMERA_SIMULCAST : CAMERA_SINGLE).map((e) => ({ ...e }));
    return this._publish("camera", track, stream, { encodings, codec, degradationPreference, deviceId: s.deviceId });
  }

  /**
   * Share a screen, window or tab (the browser asks which): one layer up to 1920x1080 at
   * 15 fps and 2.5 Mbps, tuned for detail. Call it from a user gesture (a click).
   * Stopping the share from the browser's own UI unpublishes it.
   */
  async publishScreen({ degradationPreference } = {}) {
    this._requirePublish("screen");
    if (!navigator.mediaDevices || typeof navigator.mediaDevices.getDisplayMedia !== "function") {
      const err = new ChorusError("screen_unavailable", "this browser cannot share the screen");
      this._emitError(err.code, err.message);
      throw err;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getDisplayMedia(SCREEN_CONSTRAINTS);
    } catch (e) {
      throw this._captureFailed("screen", e);
    }
    const track = stream.getVideoTracks()[0];
    // "detail": the encoder keeps resolution and sharpness and drops frames instead.
    if ("contentHint" in track) track.contentHint = "detail";
    const encodings = SCREEN_ENCODING.map((e) => ({ ...e }));
    return this._publish("screen", track, stream, { encodings, degradationPreference });
  }

  /**
   * Stop publishing `source` ("camera" or "screen"): the track stops, its transceiver goes
   * inactive (kept for the next publish of that source) and we offer again.
   * Resolves with false if nothing was published from it.
   */
  unpublish(source) {
    return this._enqueue(() => this._unpublishStep(source, "unpublished"), { rethrow: true });
  }

  /** Whether we publish (or are publishing) `source`. */
  isPublishing(source) {
    return this.localTracks.has(source);
  }

  /**
   * The most we want of a remote video track: "high" (default, the best layer sent),
   * "medium", "low" or "off". Kept by the server across renegotiations and resumes.
   */
  setTrackQuality(trackSid, quality) {
    if (!QUALITIES.includes(quality)) {
      throw new TypeError(`quality must be one of ${QUALITIES.join(", ")}; got ${JSON.stringify(quality)}`);
    }
    this.subscriptionQuality.set(trackSid, quality);
    return this._send({ type: "update_subscription", track_sid: String(trackSid), max_quality: quality });
  }

  /**
   * Adaptive stream: `element` (a <video>, or the tile around it) shows remote video
   * track `trackSid`. While observed, the server hears (debounced) whether it is visible
   * (laid out, in the viewport, the tab in front) and its size in device pixels, so a
   * hidden tile costs nothing and a small one gets a low layer. Observing another element
   * for the same track replaces the first. Ends with unobserveTrackElement() or when
   * the track goes away. No-op with `adaptiveStream: false`.
   */
  observeTrackElement(trackSid, element) {
    if (!this.options.adaptiveStream || !element || typeof trackSid !== "string" || !trackSid) return;
    const old = this._observed.get(trackSid);
    if (old && old.element === element) return;
    if (old) this._unobserve(trackSid, old);
    if (!this._resizeObserver && typeof ResizeObserver === "function") {
      this._resizeObserver = new ResizeObserver((entries) => {
        for (const e of entries) this._elementResized(e.target, e.contentRect.width, e.contentRect.height);
      });
    }
    if (!this._intersectionObserver && typeof IntersectionObserver === "function") {
      this._intersectionObserver = new IntersectionObserver((entries) => {
        for (const e of entries) this._elementIntersects(e.target, e.isIntersecting);
      });
    }
    const rect = element.getBoundingClientRect ? element.getBoundingClientRect() : { width: 0, height: 0 };
    const entry = {
      element,
      // Both observers report once right after observe(); nothing is sent before.
      intersecting: this._intersectionObserver ? null : true,
      cssWidth: this._resizeObserver ? null : rect.width,
      cssHeight: this._resizeObserver ? null : rect.height,
      sent: null,
      timer: null,
    };
    // A background tab already paused this track: the first report takes over.
    if (this._backgroundPaused.delete(trackSid)) entry.sent = { visible: false, width: 0, height: 0 };
    this._observed.set(trackSid, entry);
    this._resizeObserver?.observe(element);
    this._intersectionObserver?.observe(element);
    this._scheduleView(trackSid, entry);
  }

  /**
   * Stop observing the element of `trackSid` (only if it is `element`, when given). The
   * server keeps what it was last told.
   */
  unobserveTrackElement(trackSid, element) {
    const entry = this._observed.get(trackSid);
    if (!entry || (element && entry.element !== element)) return;
    this._unobserve(trackSid, entry);
  }

  /**
   * Dynacast: the layers of our own track `trackSid` that some subscriber receives, as
   * the server last said (`publish_layers`); null before it said anything (all are sent).
   */
  publishedLayers(trackSid) {
    const layers = this.publishLayers.get(trackSid);
    return layers ? [...layers] : null;
  }

  /** Remote tracks of participant `sid` (all kinds), as the remote-track event gives them. */
  remoteTracksOf(sid) {
    return [...this.remoteTracks.values()].filter((t) => t.participantSid === sid);
  }

  /** For tests: drop the socket as a network failure would (no `leave`). */
  simulateNetworkDrop() {
    const ws = this.ws;
    if (!ws) return;
    this._detachSocket(ws);
    try {
      ws.close(4000, "simulated drop");
    } catch {}
    this._onSocketLost(ws, { code: 1006, reason: "simulated drop" });
  }

  // ------------------------------------------------------------------ socket

  _openSocket(resume) {
    let ws;
    try {
      ws = new WebSocket(this._url);
    } catch (e) {
      this._failJoin(new ChorusError("connect_failed", String(e && e.message ? e.message : e)));
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      const now = performance.now();
      if (!resume) this.timings.wsOpen = now;
      else this.timings.lastWsOpen = now;
      const join = { type: "join", token: this._token, protocol: PROTOCOL_VERSION };
      if (this._roomHint) join.room = this._roomHint;
      if (resume) join.resume = true;
      ws.send(JSON.stringify(join));
      this._startKeepalive();
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      this._touch();
      if (typeof ev.data !== "string") return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      this._onMessage(msg);
    };
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this._onSocketLost(ws, ev);
    };
  }

  _detachSocket(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  _send(msg) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  _startKeepalive() {
    this._stopKeepalive();
    this._touch();
    this._pingTimer = setInterval(() => {
      this._send({ type: "ping", ts: Date.now() });
    }, this.options.pingIntervalMs);
  }

  _stopKeepalive() {
    clearInterval(this._pingTimer);
    clearTimeout(this._liveTimer);
    this._pingTimer = null;
    this._liveTimer = null;
  }

  /** Any frame from the server proves the socket alive. */
  _touch() {
    clearTimeout(this._liveTimer);
    const ws = this.ws;
    this._liveTimer = setTimeout(() => {
      if (ws !== this.ws) return;
      // Half-open socket: stop waiting for a close that may never come.
      this._detachSocket(ws);
      try {
        ws.close(4001, "keepalive timeout");
      } catch {}
      this._onSocketLost(ws, { code: 1006, reason: "keepalive timeout" });
    }, this.options.liveTimeoutMs);
  }

  _onSocketLost(ws, ev) {
    if (ws !== this.ws) return;
    this._stopKeepalive();
    this.ws = null;
    if (this._leaving) return;
    if (this._fatal || !this._hasSeat || !this.options.reconnect) {
      const err = this._fatalError || new ChorusError("connection_closed",
        `connection closed (code ${ev.code}${ev.reason ? ": " + ev.reason : ""})`);
      this._failJoin(err);
      this._teardown("closed");
      return;
    }
    // Unexpected drop while seated: try to take the seat back within the grace period.
    if (this.state !== "reconnecting") {
      this._lostAt = performance.now();
      this._reconnectAttempt = 0;
      this._setState("reconnecting");
    }
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    const elapsed = performance.now() - this._lostAt;
    const graceMs = this.reconnectGraceSecs * 1000;
    // Keep trying a little past the grace period (a fresh join then), then give up.
    if (elapsed > graceMs + 15_000) {
      this._emitError("reconnect_failed", "Lost the connection to the server.");
      this._teardown("closed");
      return;
    }
    const base = Math.min(250 * 2 ** this._reconnectAttempt, 4000);
    const delay = base / 2 + Math.random() * (base / 2);
    this._reconnectAttempt++;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      if (this._leaving || this.state !== "reconnecting") return;
      const stillInGrace = performance.now() - this._lostAt < graceMs;
      this._openSocket(stillInGrace);
    }, delay);
  }

  // ------------------------------------------------------------------ messages

  _onMessage(msg) {
    switch (msg.type) {
      case "joined":
        this.dominantSid = msg.dominant_speaker ?? null;
        this._onJoined(msg);
        // A fresh seat starts without enhancement on the server: ask again.
        if (this.enhanced && !msg.resumed) this._send({ type: "enhance", enabled: true });
        break;
      case "answer":
        this._enqueue(() => this._onAnswer(msg.sdp));
        break;
      case "offer":
        this._enqueue(() => this._onOffer(msg.sdp));
        break;
      case "candidate":
        this._enqueue(() => this._onRemoteCandidate(msg.candidate));
        break;
      case "participant_joined":
        this._upsertParticipant(msg.participant, "participant-joined");
        break;
      case "participant_updated":
        this._upsertParticipant(msg.participant, "participant-updated");
        break;
      case "participant_left":
        this._onParticipantLeft(msg);
        break;
      case "track_quality":
        if (typeof msg.track_sid === "string" && QUALITIES.includes(msg.quality)) {
          // Unknown reasons pass through as they are (forward compatibility).
          const reason = typeof msg.reason === "string" && msg.reason ? msg.reason : null;
          this.trackQuality.set(msg.track_sid, msg.quality);
          if (reason) this.trackQualityReason.set(msg.track_sid, reason);
          else this.trackQualityReason.delete(msg.track_sid);
          this._emit("track-quality", { trackSid: msg.track_sid, quality: msg.quality, reason });
        }
        break;
      case "publish_layers":
        if (typeof msg.track_sid === "string" && Array.isArray(msg.layers)) {
          const layers = msg.layers.filter((q) => q !== "off" && QUALITIES.includes(q));
          this.publishLayers.set(msg.track_sid, layers);
          // Applied now if the track is ours already, else once we learn its sid.
          this._applyPublishLayers(msg.track_sid);
        }
        break;
      case "dominant_speaker":
        this.dominantSid = msg.sid ?? null;
        this._emit("dominant-speaker", { sid: this.dominantSid });
        break;
      case "pong":
        if (typeof msg.ts === "number" && msg.ts > 0) this.rttMs = Date.now() - msg.ts;
        break;
      case "error":
        this._onError(msg);
        break;
      case "left":
        this._leaving = true;
        this._emit("left", { reason: msg.reason });
        if (this.ws) {
          const ws = this.ws;
          this._detachSocket(ws);
          try {
            ws.close(1000);
          } catch {}
        }
        this._teardown(msg.reason || "left");
        break;
      default:
        // Unknown server messages are ignored (forward compatibility).
        break;
    }
  }

  _onJoined(msg) {
    this.timings.joined ??= performance.now();
    this.timings.lastJoined = performance.now();
    const wasSeated = this._hasSeat;
    this._hasSeat = true;
    this._reconnectAttempt = 0;
    this.room = msg.room;
    this.self = msg.self;
    this.grants = msg.grants || {};
    if (typeof msg.reconnect_grace_secs === "number") this.reconnectGraceSecs = msg.reconnect_grace_secs;
    this.participants = new Map((msg.participants || []).map((p) => [p.sid, p]));
    // Drop streams of participants who went away while we were disconnected.
    for (const sid of [...this.remoteStreams.keys()]) {
      if (!this.participants.has(sid)) this.remoteStreams.delete(sid);
    }
    this._setState("connected");
    const detail = {
      room: msg.room,
      self: msg.self,
      participants: [...this.participants.values()],
      grants: this.grants,
      resumed: !!msg.resumed,
      iceServers: msg.ice_servers || [],
    };
    if (this._joinWaiter) {
      this._joinWaiter.resolve(msg);
      this._joinWaiter = null;
    }
    this._emit("joined", detail);
    if (msg.resumed) {
      // The media session continues and the client does not offer again; re-assert our
      // mute state in case the server lost it.
      if (!!msg.self?.muted !== this.muted) this._send({ type: "mute", muted: this.muted });
      this._learnSelfTracks();
      this._syncRemoteTracks();
      // Reports that went to the dead socket: say them again (the server keeps the rest).
      for (const [sid, entry] of this._observed) this._reportView(sid, entry);
      // An offer of ours that was outstanding when the socket dropped may never have
      // reached the server (or its answer went to the dead socket): start it over.
      if (this._ownOfferPending) this._enqueue(() => this._restartOwnOffer());
      return;
    }
    if (wasSeated) {
      // The seat was not kept (grace period over): start media afresh.
      this._closePeer();
      this.remoteStreams.clear();
    }
    this._enqueue(() => this._startMedia(msg.ice_servers || []));
    if (this.muted) this._send({ type: "mute", muted: true });
  }

  _onError(msg) {
    const code = msg.code || "internal";
    const message = msg.message || code;
    // `unavailable` (signaling lost its shared state) refuses a join; later it only fails
    // the one request.
    const joinRefused =
      !this._hasSeat && (FATAL_CODES.has(code) || code === "forbidden" || code === "unavailable");
    if (FATAL_CODES.has(code) || joinRefused) {
      this._fatal = true;
      this._fatalError = new ChorusError(code, message);
      this._failJoin(this._fatalError);
    }
    if (this._hasSeat && this._ownOfferPending && refusesOffer(code, message)) {
      // The server refused our renegotiation offer (docs/protocol.md "Errors": "a refused
      // offer changes nothing: roll it back"). Queued, so it runs after the offer step.
      this._enqueue(() => this._rollbackRefusedOffer(code, message));
    }
    this._emitError(code, message);
  }

  _upsertParticipant(p, event) {
    if (!p || !p.sid) return;
    if (this.self && p.sid === this.self.sid) {
      this.self = p;
      this._learnSelfTracks();
      this._emit("participant-updated", { participant: p, isSelf: true });
      return;
    }
    this.participants.set(p.sid, p);
    this._emit(event, { participant: p, isSelf: false });
    this._syncRemoteTracks();
  }

  _onParticipantLeft(msg) {
    this.participants.delete(msg.sid);
    const stream = this.remoteStreams.get(msg.sid);
    this.remoteStreams.delete(msg.sid);
    this._streamsById.delete(`p${msg.sid}`);
    this._syncRemoteTracks();
    this._emit("participant-left", { sid: msg.sid, identity: msg.identity, reason: msg.reason, stream });
  }

  // ------------------------------------------------------------------ media

  async _acquireMic() {
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: this.options.audio, video: false });
      this.timings.micReady = performance.now();
      return stream;
    } catch (e) {
      this._emitError("media_denied", `microphone unavailable: ${e && e.message ? e.message : e}`);
      return null;
    }
  }

  async _startMedia(iceServers) {
    const t = this.options.turnTransport;
    if (t) {
      iceServers = iceServers
        .map((s) => ({ ...s, urls: [].concat(s.urls).filter((u) => !u.startsWith("turn") || u.includes(`transport=${t}`)) }))
        .filter((s) => s.urls.length > 0);
    }
    const pc = new RTCPeerConnection({
      iceServers,
      iceTransportPolicy: this.options.iceTransportPolicy || "all",
      bundlePolicy: "max-bundle",
      rtcpMuxPolicy: "require",
    });
    this.pc = pc;
    this._offerSent = false;
    this._pendingCandidates = [];
    pc.onicecandidate = (ev) => {
      if (pc !== this.pc || !ev.candidate || !ev.candidate.candidate) return;
      const c = ev.candidate.toJSON();
      if (this._offerSent) this._send({ type: "candidate", candidate: c });
      else this._pendingCandidates.push(c);
    };
    pc.ontrack = (ev) => this._onTrack(pc, ev);
    pc.onconnectionstatechange = () => {
      if (pc !== this.pc) return;
      if (pc.connectionState === "connected") this.timings.mediaConnected ??= performance.now();
      this._emit("media-state", { state: pc.connectionState });
    };

    let stream = null;
    // A token may limit `publish` to some sources; without the microphone among them the
    // one offer would be refused as a whole, so listen instead.
    const sources = this.grants.can_publish_sources;
    const micAllowed = !Array.isArray(sources) || sources.includes("microphone");
    if (this.grants.publish && micAllowed && this.options.publish && this.options.audio) {
      this._micPromise ??= this._acquireMic();
      stream = await this._micPromise;
      if (pc !== this.pc) return;
    }
    if (stream && stream.getAudioTracks().length > 0) {
      this.localStream = stream;
      const track = stream.getAudioTracks()[0];
      track.enabled = !this.muted;
      this._micTransceiver = pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
    } else {
      // Listen-only (no publish grant, or no microphone): release a mic acquired early.
      const early = this._micPromise;
      this._micPromise = null;
      if (early) early.then((s) => s && s.getTracks().forEach((t) => t.stop()));
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    // Chat channels: part of the one offer, so every participant (readers too) has them.
    this._openChatChannels(pc);
    // A fresh seat after a lost one: cameras and screens that were on stay on.
    for (const entry of this.localTracks.values()) await this._attachLocal(pc, entry);
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    if (pc !== this.pc) return;
    this._markOffered();
    this._send({ type: "offer", sdp: pc.localDescription.sdp, tracks: this._trackDecls(pc) });
    this.timings.offerSent = performance.now();
    this._offerSent = true;
    for (const c of this._pendingCandidates.splice(0)) this._send({ type: "candidate", candidate: c });
  }

  /** The server's SDP as we apply it: with `usedtx=1` on Opus when DTX is on. */
  _remoteSdp(sdp) {
    return this.options.dtx ? withOpusDtx(sdp) : sdp;
  }

  async _onAnswer(sdp) {
    const pc = this.pc;
    if (!pc || pc.signalingState !== "have-local-offer") return;
    try {
      await pc.setRemoteDescription({ type: "answer", sdp: this._remoteSdp(sdp) });
    } catch (e) {
      // An answer we cannot apply: treat it like a refusal so we are not stuck waiting.
      if (pc.currentRemoteDescription) {
        await this._rollbackRefusedOffer("client_media", `the server's answer was rejected: ${e && e.message ? e.message : e}`);
        return;
      }
      throw e;
    }
    this.timings.answer ??= performance.now();
    this._ownOfferPending = false;
    for (const source of this._offeredSources) {
      const entry = this.localTracks.get(source);
      if (entry && entry.state === "pending") {
        entry.state = "published";
        this._emitLocal(entry);
      }
    }
    this._offeredSources.clear();
    this._learnRemoteMids(sdp);
    this._syncRemoteTracks();
    // A negotiation may have (re)created encodings: dynacast applies to them as well.
    this._applyAllPublishLayers();
    // Changes made while the offer was out, or a server offer we ignored meanwhile (the
    // server sends that one again by itself).
    await this._offerIfNeeded();
  }

  async _onOffer(sdp) {
    const pc = this.pc;
    if (!pc) return;
    if (this._ownOfferPending || pc.signalingState !== "stable") {
      // Glare (docs/protocol.md "No glare"): the server abandons its offer when ours
      // reaches it, answers ours, and offers again afterwards. So drop this one.
      this.timings.ignoredOffers = (this.timings.ignoredOffers || 0) + 1;
      return;
    }
    await pc.setRemoteDescription({ type: "offer", sdp: this._remoteSdp(sdp) });
    this._learnRemoteMids(sdp);
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    if (pc !== this.pc) return;
    this._send({ type: "answer", sdp: pc.localDescription.sdp });
    this._syncRemoteTracks();
    this._applyAllPublishLayers();
    await this._offerIfNeeded();
  }

  async _onRemoteCandidate(candidate) {
    if (!this.pc || !candidate) return;
    try {
      await this.pc.addIceCandidate(candidate);
    } catch (e) {
      console.warn("chorus: ignoring remote candidate", e);
    }
  }

  _onTrack(pc, ev) {
    if (pc !== this.pc) return;
    const stream = ev.streams && ev.streams[0];
    if (!stream) return;
    const sid = stream.id.startsWith("p") ? stream.id.slice(1) : stream.id;
    this.timings.firstTrack ??= performance.now();
    if (ev.track && ev.track.kind === "video") this.timings.firstVideoTrack ??= performance.now();
    this.remoteStreams.set(sid, stream);
    this._streamsById.set(stream.id, stream);
    const track = ev.track;
    const onEnded = () => {
      if (this.remoteStreams.get(sid) === stream && stream.getTracks().every((t) => t.readyState === "ended")) {
        this.remoteStreams.delete(sid);
      }
      this._emit("track-removed", { sid, stream, track });
    };
    stream.addEventListener("removetrack", (e) => {
      if (e.track === track) onEnded();
    });
    this._emit("track", { sid, stream, track });
  }

  /**
   * Run `fn` after every SDP step queued before it. A failure is reported as an `error`
   * event (client_media); with `rethrow` the returned promise rejects instead (for API
   * calls whose caller handles it), and the queue goes on either way.
   */
  _enqueue(fn, { rethrow = false } = {}) {
    const run = this._queue.then(fn);
    this._queue = run.catch((e) => {
      if (rethrow) return;
      console.error("chorus: signaling step failed", e);
      this._emitError("client_media", `media negotiation failed: ${e && e.message ? e.message : e}`);
    });
    return rethrow ? run : this._queue;
  }

  // ------------------------------------------------------------------ video (private)

  _requirePublish(source) {
    if (!this._hasSeat || !this.pc) {
      const err = new ChorusError("not_joined", `join a channel before publishing the ${source}`);
      this._emitError(err.code, err.message);
      throw err;
    }
    if (this.grants && this.grants.publish === false) {
      // The server would refuse it too; say so before asking for the device.
      const err = new ChorusError("forbidden", `this token may not publish ${source}`);
      this._emitError(err.code, err.message);
      throw err;
    }
  }

  /** A getUserMedia/getDisplayMedia failure as a ChorusError, also reported as an event. */
  _captureFailed(source, e) {
    const name = (e && e.name) || "Error";
    const denied = name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError";
    const code = `${source}_${denied ? "denied" : "unavailable"}`;
    const err = new ChorusError(code, `${source} unavailable: ${name}${e && e.message ? `: ${e.message}` : ""}`);
    err.reason = name;
    err.cause = e;
    this._emit("error", { code, message: err.message, name });
    return err;
  }

  /** Queue the publication of a captured track (see publishCamera). */
  _publish(source, track, stream, opts) {
    return this._enqueue(async () => {
      const pc = this.pc;
      if (!pc || !this._hasSeat) {
        track.stop();
        throw new ChorusError("not_joined", `the session ended before the ${source} was published`);
      }
      const existing = this.localTracks.get(source);
      if (existing && existing.transceiver) {
        // Another device for the same source: swap it in place, no renegotiation.
        await existing.transceiver.sender.replaceTrack(track);
        existing.track.removeEventListener("ended", existing.onEnded);
        existing.track.stop();
        existing.track = track;
        existing.stream = stream;
        existing.deviceId = opts.deviceId || null;
        this._watchEnded(existing);
        this._emitLocal(existing);
        return existing;
      }
      if (existing) existing.track.stop();
      const entry = {
        source,
        track,
        stream,
        transceiver: null,
        state: "pending",
        trackSid: null,
        encodings: opts.encodings,
        codec: opts.codec || null,
        degradationPreference: opts.degradationPreference || null,
        deviceId: opts.deviceId || null,
        onEnded: null,
      };
      try {
        await this._attachLocal(pc, entry);
      } catch (e) {
        track.stop();
        this._emitError(e.code || "client_media", e.message || String(e));
        throw e;
      }
      this.localTracks.set(source, entry);
      this._watchEnded(entry);
      this._emitLocal(entry);
      this._needsOffer = true;
      await this._offerIfNeeded();
      return entry;
    }, { rethrow: true });
  }

  /**
   * Put entry's track on a transceiver of `pc`: the one this source used before (its
   * m-section is reused, docs/protocol.md "Publishing"), or a new sendonly one.
   */
  async _attachLocal(pc, entry) {
    let tr = this._sourceTransceivers.get(entry.source);
    if (tr && (tr.currentDirection === "stopped" || tr.stopped)) tr = null;
    if (tr) {
      if (entry.codec) preferCodec(tr, entry.codec);
      await tr.sender.replaceTrack(entry.track);
      if (typeof tr.sender.setStreams === "function") tr.sender.setStreams(entry.stream);
      tr.direction = "sendonly";
      // Dynacast may have switched layers off for the track this transceiver carried; a
      // new track starts with all of them until the server says otherwise.
      const sender = tr.sender;
      await this._withSender(sender, async () => {
        const params = sender.getParameters();
        const encodings = params.encodings || [];
        if (!encodings.some((e) => e.active === false)) return;
        for (const e of encodings) e.active = true;
        await sender.setParameters(params);
      }).catch((e) => console.warn("chorus: could not reactivate the layers", e));
    } else {
      tr = pc.addTransceiver(entry.track, {
        direction: "sendonly",
        streams: [entry.stream],
        sendEncodings: entry.encodings,
      });
      try {
        if (entry.codec) preferCodec(tr, entry.codec);
      } catch (e) {
        // Not negotiated yet: stopping it keeps it out of every offer.
        tr.stop();
        throw e;
      }
      this._sourceTransceivers.set(entry.source, tr);
    }
    if (entry.degradationPreference) {
      const sender = tr.sender;
      await this._withSender(sender, async () => {
        const params = sender.getParameters();
        params.degradationPreference = entry.degradationPreference;
        await sender.setParameters(params);
      }).catch((e) => console.warn("chorus: degradationPreference not applied", e));
    }
    entry.transceiver = tr;
    entry.state = "pending";
  }

  /** Unpublish when the capture ends by itself (the browser's "Stop sharing", unplugging). */
  _watchEnded(entry) {
    const track = entry.track;
    entry.onEnded = () => {
      const now = this.localTracks.get(entry.source);
      if (now && now.track === track) {
        this._enqueue(() => this._unpublishStep(entry.source, "ended"));
      }
    };
    track.addEventListener("ended", entry.onEnded);
  }

  async _unpublishStep(source, reason) {
    const entry = this.localTracks.get(source);
    if (!entry) return false;
    await this._dropLocal(entry, reason);
    if (this.pc) {
      this._needsOffer = true;
      await this._offerIfNeeded();
    }
    return true;
  }

  /** Stop a local track and idle its transceiver (kept for reuse). */
  async _dropLocal(entry, reason) {
    if (this.localTracks.get(entry.source) === entry) this.localTracks.delete(entry.source);
    if (entry.trackSid) this.publishLayers.delete(entry.trackSid);
    entry.track.removeEventListener("ended", entry.onEnded);
    entry.track.stop();
    const tr = entry.transceiver;
    entry.transceiver = null;
    if (tr && this.pc) {
      try {
        await tr.sender.replaceTrack(null);
        if (tr.currentDirection !== "stopped") tr.direction = "inactive";
      } catch (e) {
        console.warn("chorus: could not idle the transceiver", e);
      }
    }
    this._emit("local-track-removed", { source: entry.source, reason });
  }

  _emitLocal(entry) {
    this._emit("local-track", {
      source: entry.source,
      track: entry.track,
      stream: entry.stream,
      state: entry.state,
      trackSid: entry.trackSid,
    });
  }

  /** Our track sids, from our own participant's `tracks`. */
  _learnSelfTracks() {
    const tracks = (this.self && Array.isArray(this.self.tracks)) ? this.self.tracks : [];
    for (const entry of this.localTracks.values()) {
      const t = tracks.find((x) => x.source === entry.source);
      const sid = t ? t.sid : null;
      // A publish_layers for the old sid no longer applies (one for the new sid may have
      // arrived before this participant update: it is kept and applied now).
      if (entry.trackSid && entry.trackSid !== sid) this.publishLayers.delete(entry.trackSid);
      entry.trackSid = sid;
    }
    this._applyAllPublishLayers();
  }

  /** The sources whose publication the offer about to go out carries. */
  _markOffered() {
    this._ownOfferPending = true;
    this._offeredSources = new Set(
      [...this.localTracks.values()].filter((e) => e.state === "pending").map((e) => e.source),
    );
  }

  /** `tracks` of an offer: the source of each sending m-section (docs/protocol.md `offer`). */
  _trackDecls(pc) {
    const out = [];
    for (const tr of pc.getTransceivers()) {
      if (!tr.mid || !tr.sender.track) continue;
      if (tr.direction !== "sendonly" && tr.direction !== "sendrecv") continue;
      let source = null;
      if (tr === this._micTransceiver) source = "microphone";
      for (const [s, t] of this._sourceTransceivers) if (t === tr) source = s;
      if (source) out.push({ mid: tr.mid, source });
    }
    return out;
  }

  /** Send an offer if something changed and the rules let us (stable, none of ours out). */
  async _offerIfNeeded() {
    const pc = this.pc;
    if (!pc || !this._needsOffer) return;
    if (this._ownOfferPending || pc.signalingState !== "stable") return; // after the answer
    if (!pc.currentRemoteDescription) return; // the first offer has not been answered yet
    this._needsOffer = false;
    const offer = await pc.createOffer();
    if (pc !== this.pc) return;
    await pc.setLocalDescription(offer);
    if (pc !== this.pc) return;
    this._markOffered();
    this.timings.lastOfferSent = performance.now();
    // If the socket is down this goes nowhere; a resume starts the offer over.
    this._send({ type: "offer", sdp: pc.localDescription.sdp, tracks: this._trackDecls(pc) });
  }

  /**
   * The server refused our offer (`forbidden`, `invalid_sdp`, ...): nothing changed on
   * its side, so go back to the last agreed state and take back what the offer published.
   */
  async _rollbackRefusedOffer(code, message) {
    const pc = this.pc;
    if (!pc || !this._ownOfferPending) return;
    this._ownOfferPending = false;
    if (pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" });
    const refused = [...this._offeredSources];
    this._offeredSources.clear();
    for (const source of refused) {
      const entry = this.localTracks.get(source);
      if (!entry || entry.state !== "pending") continue;
      const tr = entry.transceiver;
      await this._dropLocal(entry, "refused");
      this._emit("publish-error", { source, code, message });
      // A transceiver the refused offer created never got a mid: drop it, or every later
      // offer would carry a dead m-section for it.
      if (tr && !tr.mid) {
        try {
          tr.stop();
        } catch {}
        if (this._sourceTransceivers.get(source) === tr) this._sourceTransceivers.delete(source);
      }
    }
    // An unpublish (or anything else) that rode on the refused offer still has to go out.
    const differs = [...this._sourceTransceivers.values()].some(
      (tr) => tr.mid && tr.currentDirection && tr.currentDirection !== "stopped" && tr.currentDirection !== tr.direction,
    );
    if (differs) this._needsOffer = true;
    await this._offerIfNeeded();
  }

  /** After a resume: an offer of ours may have been lost with the old socket; offer anew. */
  async _restartOwnOffer() {
    const pc = this.pc;
    if (!pc || !this._ownOfferPending) return;
    if (!pc.currentRemoteDescription) {
      // The very first offer: send the same one again.
      this._send({ type: "offer", sdp: pc.localDescription.sdp, tracks: this._trackDecls(pc) });
      return;
    }
    this._ownOfferPending = false;
    if (pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" });
    this._needsOffer = true;
    await this._offerIfNeeded();
  }

  /** Remember which track each of the server's sending m-sections carries. */
  _learnRemoteMids(sdp) {
    for (const m of parseMediaSections(sdp)) {
      if (!m.mid) continue;
      const sending = m.direction === "sendonly" || m.direction === "sendrecv";
      if (!sending) this._remoteMids.delete(m.mid);
      else if (m.trackId) this._remoteMids.set(m.mid, { streamId: m.streamId, trackSid: m.trackId });
      // Sending without an msid line: keep what an earlier description said.
    }
  }

  /**
   * Reconcile remoteTracks with the participants' `tracks` and the SDP mapping; emit
   * remote-track / remote-track-removed for the differences.
   */
  _syncRemoteTracks(clearAll = false) {
    const next = new Map();
    const pc = this.pc;
    if (pc && !clearAll) {
      const byTrackSid = new Map();
      for (const tr of pc.getTransceivers()) {
        if (!tr.mid || tr.currentDirection === "stopped") continue;
        const info = this._remoteMids.get(tr.mid);
        if (info) byTrackSid.set(info.trackSid, { tr, streamId: info.streamId });
      }
      for (const p of this.participants.values()) {
        for (const t of Array.isArray(p.tracks) ? p.tracks : []) {
          const hit = byTrackSid.get(t.sid);
          if (!hit) continue;
          next.set(t.sid, {
            participantSid: p.sid,
            trackSid: t.sid,
            source: t.source,
            kind: t.kind || hit.tr.receiver.track.kind,
            codec: t.codec || "",
            layers: Array.isArray(t.layers) ? t.layers : [],
            track: hit.tr.receiver.track,
            stream: this._streamsById.get(hit.streamId) || this._streamsById.get(`p${p.sid}`) || null,
            mid: hit.tr.mid,
          });
        }
      }
    }
    for (const [sid, old] of this.remoteTracks) {
      const now = next.get(sid);
      if (now && now.track === old.track && now.participantSid === old.participantSid) continue;
      this.remoteTracks.delete(sid);
      const observed = this._observed.get(sid);
      if (observed) this._unobserve(sid, observed);
      this._backgroundPaused.delete(sid);
      if (!now) {
        this.trackQuality.delete(sid);
        this.trackQualityReason.delete(sid);
        this.subscriptionQuality.delete(sid);
      }
      this._emit("remote-track-removed", {
        participantSid: old.participantSid, trackSid: sid, source: old.source, kind: old.kind,
      });
    }
    for (const [sid, t] of next) {
      const old = this.remoteTracks.get(sid);
      if (old) {
        // Same track: refresh fields that may change (codec becomes known, stream).
        Object.assign(old, { codec: t.codec, layers: t.layers, stream: t.stream || old.stream });
        continue;
      }
      this.remoteTracks.set(sid, t);
      // Observed before the track was known: report it now.
      const observed = this._observed.get(sid);
      if (observed) this._scheduleView(sid, observed);
      this._emit("remote-track", { ...t });
    }
  }

  // ------------------------------------------------------------------ adaptive stream (private)

  _unobserve(trackSid, entry) {
    clearTimeout(entry.timer);
    entry.timer = null;
    this._observed.delete(trackSid);
    if ([...this._observed.values()].some((e) => e.element === entry.element)) return;
    this._resizeObserver?.unobserve(entry.element);
    this._intersectionObserver?.unobserve(entry.element);
  }

  _elementResized(element, width, height) {
    for (const [sid, entry] of this._observed) {
      if (entry.element !== element) continue;
      entry.cssWidth = width;
      entry.cssHeight = height;
      this._scheduleView(sid, entry);
    }
  }

  _elementIntersects(element, intersecting) {
    for (const [sid, entry] of this._observed) {
      if (entry.element !== element) continue;
      entry.intersecting = intersecting;
      this._scheduleView(sid, entry);
    }
  }

  /** Report `trackSid`'s view once its element has been still for a moment. */
  _scheduleView(trackSid, entry) {
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      entry.timer = null;
      if (this._observed.get(trackSid) === entry) this._reportView(trackSid, entry);
    }, ADAPTIVE_DEBOUNCE_MS);
  }

  /**
   * What the server should know of an observed element: {visible, width, height} (device
   * pixels), or null while the observers have not reported it yet. A background tab, an
   * element out of the viewport or not laid out (display: none gives 0x0) is not visible.
   */
  _viewOf(entry) {
    const tabHidden = typeof document !== "undefined" && document.visibilityState === "hidden";
    if (tabHidden) return { visible: false, width: 0, height: 0 };
    if (entry.intersecting === null || entry.cssWidth === null || entry.cssHeight === null) return null;
    const dpr = (typeof window !== "undefined" && window.devicePixelRatio) || 1;
    const width = Math.round(entry.cssWidth * dpr);
    const height = Math.round(entry.cssHeight * dpr);
    return { visible: !!entry.intersecting && width > 0 && height > 0, width, height };
  }

  /**
   * Send `update_subscription` for an observed track if its view changed meaningfully
   * since the last report: visibility flipped, or the size moved by more than 15%.
   * Only the fields that changed go out (the server keeps the others).
   */
  _reportView(trackSid, entry) {
    const view = this._viewOf(entry);
    if (!view) return;
    const track = this.remoteTracks.get(trackSid);
    if (!track || track.kind !== "video") return; // gone, or not known yet (reported then)
    const prev = entry.sent;
    const msg = { type: "update_subscription", track_sid: trackSid };
    if (!prev || prev.visible !== view.visible) {
      msg.visible = view.visible;
      if (view.visible) Object.assign(msg, { width: view.width, height: view.height });
    } else if (view.visible && (sizeMoved(prev.width, view.width) || sizeMoved(prev.height, view.height))) {
      Object.assign(msg, { width: view.width, height: view.height });
    } else {
      return;
    }
    // Socket down: not remembered as sent, so the next change or a resume says it again.
    if (!this._send(msg)) return;
    entry.sent = view.visible ? view : { visible: false, width: prev ? prev.width : 0, height: prev ? prev.height : 0 };
    this.timings.lastViewReport = performance.now();
  }

  /**
   * A background tab receives audio only: every remote video track is paused (observed
   * ones through their view, the others directly), and shown again when the tab is.
   */
  _pageVisibilityChanged() {
    if (!this.options.adaptiveStream || typeof document === "undefined") return;
    const hidden = document.visibilityState === "hidden";
    if (hidden) {
      for (const [sid, t] of this.remoteTracks) {
        if (t.kind !== "video") continue;
        const entry = this._observed.get(sid);
        if (entry) {
          clearTimeout(entry.timer);
          entry.timer = null;
          this._reportView(sid, entry);
        } else if (!this._backgroundPaused.has(sid)) {
          if (this._send({ type: "update_subscription", track_sid: sid, visible: false })) this._backgroundPaused.add(sid);
        }
      }
      return;
    }
    for (const sid of this._backgroundPaused) {
      if (this.remoteTracks.has(sid)) this._send({ type: "update_subscription", track_sid: sid, visible: true });
    }
    this._backgroundPaused.clear();
    for (const [sid, entry] of this._observed) {
      clearTimeout(entry.timer);
      entry.timer = null;
      this._reportView(sid, entry);
    }
  }

  // ------------------------------------------------------------------ dynacast (private)

  /** Run `fn` after every parameter change queued for `sender` (one at a time). */
  _withSender(sender, fn) {
    const run = (this._senderChains.get(sender) || Promise.resolve()).then(fn);
    this._senderChains.set(sender, run.catch(() => {}));
    return run;
  }

  _applyAllPublishLayers() {
    for (const entry of this.localTracks.values()) {
      if (entry.trackSid && this.publishLayers.has(entry.trackSid)) this._applyPublishLayers(entry.trackSid);
    }
  }

  /**
   * Encode only the layers of our track `trackSid` that someone receives (the server's
   * last `publish_layers`): rid q/h/f are low/medium/high; a one-layer track (a screen)
   * is on while anyone receives it. Waits, keeping the list, while the track's sid or
   * its negotiated encodings are not known yet.
   */
  _applyPublishLayers(trackSid) {
    const entry = [...this.localTracks.values()].find((e) => e.trackSid === trackSid);
    if (!entry || !entry.transceiver) return;
    const tr = entry.transceiver;
    const sender = tr.sender;
    this._withSender(sender, async () => {
      const layers = this.publishLayers.get(trackSid);
      if (!layers || entry.transceiver !== tr || entry.trackSid !== trackSid) return;
      const params = sender.getParameters();
      const encodings = params.encodings || [];
      if (encodings.length === 0) return; // before negotiation: applied after the answer
      let changed = false;
      for (const enc of encodings) {
        const layer = enc.rid ? RID_LAYERS[enc.rid] : undefined;
        const active = layer ? layers.includes(layer) : layers.length > 0;
        if (enc.active !== active) {
          enc.active = active;
          changed = true;
        }
      }
      if (changed) await sender.setParameters(params);
      const key = layers.join(",");
      if (entry.appliedLayers === key) return;
      entry.appliedLayers = key;
      this._emit("publish-layers", { trackSid, source: entry.source, layers: [...layers] });
    }).catch((e) => console.warn("chorus: could not apply publish_layers", e));
  }

  // ------------------------------------------------------------------ chat channels

  _openChatChannels(pc) {
    this._closeChatChannels();
    const chat = pc.createDataChannel("chat");
    const signal = pc.createDataChannel("signal", { ordered: false, maxRetransmits: 0 });
    this.chatChannel = chat;
    this.signalChannel = signal;
    this._chatGotHistory = false;
    this._chatEarly = [];
    chat.onopen = () => {
      if (chat !== this.chatChannel) return;
      this.chatReady = true;
      this.timings.chatOpen ??= performance.now();
      this._emit("chat-ready", {});
    };
    chat.onclose = () => {
      if (chat !== this.chatChannel) return;
      const was = this.chatReady;
      this.chatReady = false;
      if (was) this._emit("chat-closed", {});
    };
    chat.onerror = (ev) => {
      if (chat !== this.chatChannel) return;
      console.warn("chorus: chat channel error", ev && ev.error ? ev.error.message : ev);
    };
    chat.onmessage = (ev) => {
      if (chat !== this.chatChannel) return;
      const msg = parseFrame(ev.data);
      if (msg) this._onChatFrame(msg);
    };
    signal.onmessage = (ev) => {
      if (signal !== this.signalChannel) return;
      const msg = parseFrame(ev.data);
      if (msg && msg.type === "typing" && msg.from) {
        this._emit("typing", { from: msg.from, typing: !!msg.typing });
      }
    };
  }

  _closeChatChannels() {
    clearTimeout(this._typingIdleTimer);
    this._typing = false;
    for (const dc of [this.chatChannel, this.signalChannel]) {
      if (!dc) continue;
      dc.onopen = dc.onclose = dc.onerror = dc.onmessage = null;
      try {
        dc.close();
      } catch {}
    }
    const was = this.chatReady;
    this.chatChannel = null;
    this.signalChannel = null;
    this.chatReady = false;
    if (was) this._emit("chat-closed", {});
  }

  _onChatFrame(msg) {
    switch (msg.type) {
      case "history": {
        // The server's view is authoritative (it omits messages deleted meanwhile); keep
        // only the live messages this channel delivered before its history.
        const next = new Map();
        for (const m of Array.isArray(msg.messages) ? msg.messages : []) {
          const rec = normalizeMessage(m);
          if (rec) next.set(rec.id, this._withOwn(rec, this.chatMessages.get(rec.id)));
        }
        for (const rec of this._chatEarly) if (!next.has(rec.id)) next.set(rec.id, rec);
        this._chatEarly = [];
        this._chatGotHistory = true;
        this.chatMessages = new Map([...next.values()].sort((a, b) => a.id - b.id).map((m) => [m.id, m]));
        this._emit("chat-history", { messages: this.getChatMessages() });
        break;
      }
      case "message": {
        const rec = normalizeMessage(msg);
        if (!rec) return;
        if (typeof msg.ref === "string") rec.ref = msg.ref;
        const known = this.chatMessages.get(rec.id);
        if (known) {
          // Duplicate (history and live overlapped): keep one, learn the ref if new.
          if (rec.ref && !known.ref) known.ref = rec.ref;
          return;
        }
        const full = this._withOwn(rec);
        if (!this._chatGotHistory) this._chatEarly.push(full);
        this.chatMessages.set(full.id, full);
        this._emit("chat-message", full);
        break;
      }
      case "deleted": {
        const id = Number(msg.id);
        this._chatEarly = this._chatEarly.filter((m) => m.id !== id);
        if (this.chatMessages.delete(id)) this._emit("chat-deleted", { id });
        break;
      }
      case "error": {
        const ref = typeof msg.ref === "string" ? msg.ref : null;
        this._emit("chat-error", { code: msg.code || "chat_invalid", message: msg.message || msg.code || "", ref });
        break;
      }
      default:
        break; // forward compatibility
    }
  }

  _withOwn(rec, previous) {
    const own = !!(this.self && rec.from && rec.from.identity === this.self.identity);
    const out = { ...rec, own };
    if (!out.ref && previous && previous.ref) out.ref = previous.ref;
    return out;
  }

  _sendTyping(typing) {
    clearTimeout(this._typingIdleTimer);
    this._typing = typing;
    this._typingSentAt = typing ? performance.now() : 0;
    this._sendOn(this.signalChannel, { type: "typing", typing });
  }

  _sendOn(dc, msg) {
    if (!dc || dc.readyState !== "open") return false;
    try {
      dc.send(JSON.stringify(msg));
      return true;
    } catch (e) {
      console.warn("chorus: data channel send failed", e);
      return false;
    }
  }

  _closePeer() {
    this._closeChatChannels();
    this._ownOfferPending = false;
    this._needsOffer = false;
    this._offeredSources.clear();
    this._sourceTransceivers.clear();
    this._micTransceiver = null;
    this._remoteMids.clear();
    this._streamsById.clear();
    this.trackQuality.clear();
    this.trackQualityReason.clear();
    // The next peer connection publishes with new track sids and fresh encodings.
    this.publishLayers.clear();
    for (const entry of this.localTracks.values()) {
      // Published again on the next peer connection (_startMedia), with new track sids.
      entry.transceiver = null;
      entry.state = "pending";
      entry.trackSid = null;
    }
    this._syncRemoteTracks(true);
    if (this.pc) {
      const pc = this.pc;
      this.pc = null;
      pc.onicecandidate = pc.ontrack = pc.onconnectionstatechange = null;
      try {
        pc.close();
      } catch {}
    }
  }

  // ------------------------------------------------------------------ helpers

  _teardown(_why) {
    clearTimeout(this._reconnectTimer);
    this._stopKeepalive();
    if (this.ws) {
      const ws = this.ws;
      this._detachSocket(ws);
      if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) {
        if (!this._leaving) {
          try {
            ws.close(1000);
          } catch {}
        }
      }
      this.ws = null;
    }
    this._closePeer();
    if (this.localStream) {
      for (const t of this.localStream.getTracks()) t.stop();
      this.localStream = null;
    }
    for (const entry of [...this.localTracks.values()]) {
      this.localTracks.delete(entry.source);
      entry.track.removeEventListener("ended", entry.onEnded);
      entry.track.stop();
      this._emit("local-track-removed", { source: entry.source, reason: "left" });
    }
    this.subscriptionQuality.clear();
    for (const [sid, entry] of [...this._observed]) this._unobserve(sid, entry);
    this._backgroundPaused.clear();
    if (typeof document !== "undefined") document.removeEventListener("visibilitychange", this._onVisibilityChange);
    this._micPromise = null;
    this._hasSeat = false;
    this.participants.clear();
    this.remoteStreams.clear();
    this._setState("disconnected");
  }

  _failJoin(err) {
    if (this._joinWaiter) {
      this._joinWaiter.reject(err);
      this._joinWaiter = null;
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("connection-state", { state });
  }

  _emitError(code, message) {
    this._emit("error", { code, message });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** Whether a tile dimension moved enough (ADAPTIVE_SIZE_STEP) to tell the server. */
function sizeMoved(before, now) {
  if (!before) return now > 0;
  return Math.abs(now - before) / before > ADAPTIVE_SIZE_STEP;
}

function parseFrame(data) {
  if (typeof data !== "string") return null; // the protocol only has JSON text frames
  try {
    const msg = JSON.parse(data);
    return msg && typeof msg === "object" && !Array.isArray(msg) ? msg : null;
  } catch {
    return null;
  }
}

/** A chat message object as the protocol describes it, or null when malformed. */
function normalizeMessage(m) {
  if (!m || typeof m !== "object") return null;
  const id = Number(m.id);
  if (!Number.isFinite(id) || typeof m.text !== "string") return null;
  const from = m.from && typeof m.from === "object" ? m.from : {};
  const identity = typeof from.identity === "string" ? from.identity : "";
  const name = typeof from.name === "string" && from.name ? from.name : identity;
  return { id, from: { identity, name }, text: m.text, ts: Number(m.ts) || 0 };
}

/**
 * Whether an error that arrives while our offer is outstanding is the server refusing
 * that offer. Errors carry no correlation id, so go by code and wording: `forbidden` is
 * also the answer to `enhance`, and `bad_request` to any malformed message.
 */
function refusesOffer(code, message) {
  if (code === "invalid_sdp") return true;
  if (code === "forbidden") return /publish/i.test(message || "");
  if (code === "bad_request") return /offer|track|mid|sdp|m-section/i.test(message || "");
  return false;
}

/**
 * The m-sections of an SDP: [{mid, direction, streamId, trackId, kind}]. Reads `a=mid`,
 * the direction attribute and `a=msid:<stream> <track>` (docs/protocol.md "Subscribing":
 * the track id is the Chorus track sid).
 */
export function parseMediaSections(sdp) {
  const out = [];
  let cur = null;
  for (const line of String(sdp || "").split(/\r?\n/)) {
    if (line.startsWith("m=")) {
      cur = { kind: line.slice(2).split(" ")[0], mid: null, direction: "sendrecv", streamId: null, trackId: null };
      out.push(cur);
      continue;
    }
    if (!cur) continue;
    if (line.startsWith("a=mid:")) cur.mid = line.slice(6).trim();
    else if (/^a=(sendonly|recvonly|sendrecv|inactive)$/.test(line.trim())) cur.direction = line.trim().slice(2);
    else if (line.startsWith("a=msid:")) {
      const [streamId, trackId] = line.slice(7).trim().split(/\s+/);
      cur.streamId = streamId || null;
      if (trackId) cur.trackId = trackId;
    }
  }
  return out;
}

/**
 * Offer only `codec` (plus RTX) on a video transceiver. For H264 that is packetization
 * mode 1, constrained baseline first: what the SFU negotiates (docs/protocol.md "Media").
 */
function preferCodec(tr, codec) {
  if (typeof tr.setCodecPreferences !== "function" || !globalThis.RTCRtpSender?.getCapabilities) {
    throw new ChorusError("unsupported_codec", "this browser cannot choose a video codec");
  }
  const caps = RTCRtpSender.getCapabilities("video")?.codecs || [];
  const mime = `video/${codec}`.toLowerCase();
  let wanted = caps.filter((c) => c.mimeType.toLowerCase() === mime);
  if (mime === "video/h264") {
    const fmtp = (c) => c.sdpFmtpLine || "";
    wanted = wanted
      .filter((c) => /packetization-mode=1/.test(fmtp(c)))
      .sort((a, b) => Number(/profile-level-id=42e0/.test(fmtp(b))) - Number(/profile-level-id=42e0/.test(fmtp(a))));
  }
  if (wanted.length === 0) throw new ChorusError("unsupported_codec", `this browser cannot send ${codec}`);
  const rtx = caps.filter((c) => c.mimeType.toLowerCase() === "video/rtx");
  tr.setCodecPreferences([...wanted, ...rtx]);
}

/** Decode a JWT's claims without verifying it (for display only). */
export function decodeTokenClaims(token) {
  try {
    const part = token.split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

/**
 * Opus DTX for what we send: the browser takes its Opus encoder's settings from the
 * remote description's fmtp (what the receiver asks for), so `usedtx=1` goes onto every
 * Opus payload type of the server's SDP. A silent microphone then sends a packet every
 * 400 ms instead of 50 a second (measured in Chromium: 5 packets/s, 0.7 kbit/s, against
 * 50 packets/s, 14 kbit/s plus headers): on a thin downlink the silent participants of a
 * room no longer crowd out the video.
 */
export function withOpusDtx(sdp) {
  const opus = new Set([...sdp.matchAll(/^a=rtpmap:(\d+) opus\/48000/gim)].map((m) => m[1]));
  return sdp.replace(/^a=fmtp:(\d+) ([^\r\n]*)/gm, (line, pt, params) =>
    opus.has(pt) && !/(^|;)\s*usedtx=/i.test(params) ? `a=fmtp:${pt} ${params};usedtx=1` : line);
}
