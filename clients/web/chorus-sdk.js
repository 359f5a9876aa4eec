// Chorus browser SDK: signaling (docs/protocol.md, version 1) + one RTCPeerConnection.
// No UI code. Plain ES module, no dependencies.
//
//   const client = new ChorusClient({ audio: { echoCancellation: false } });
//   client.addEventListener("track", (e) => attach(e.detail.sid, e.detail.stream));
//   await client.connect({ url: "wss://host/ws", token });
//   client.setMuted(true);
//   client.leave();
//
// Events (CustomEvent, payload in `event.detail`):
//   joined               {room, self, participants, grants, resumed, iceServers}
//   participant-joined   {participant}
//   participant-updated  {participant, isSelf}
//   participant-left     {sid, identity, reason}
//   track                {sid, stream, track}      remote audio of participant `sid`
//   track-removed        {sid, stream, track}
//   connection-state     {state}   connecting | connected | reconnecting | disconnected
//   media-state          {state}   RTCPeerConnection.connectionState
//   left                 {reason}  the server ended the session (e.g. "replaced")
//   error                {code, message}
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

export const PROTOCOL_VERSION = 1;

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
   */
  constructor(options = {}) {
    super();
    this.options = {
      audio: DEFAULT_AUDIO,
      publish: true,
      reconnect: true,
      pingIntervalMs: 10_000,
      liveTimeoutMs: 30_000,
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
    const joinRefused = !this._hasSeat && (FATAL_CODES.has(code) || code === "forbidden");
    if (FATAL_CODES.has(code) || joinRefused) {
      this._fatal = true;
      this._fatalError = new ChorusError(code, message);
      this._failJoin(this._fatalError);
    }
    this._emitError(code, message);
  }

  _upsertParticipant(p, event) {
    if (!p || !p.sid) return;
    if (this.self && p.sid === this.self.sid) {
      this.self = p;
      this._emit("participant-updated", { participant: p, isSelf: true });
      return;
    }
    this.participants.set(p.sid, p);
    this._emit(event, { participant: p, isSelf: false });
  }

  _onParticipantLeft(msg) {
    this.participants.delete(msg.sid);
    const stream = this.remoteStreams.get(msg.sid);
    this.remoteStreams.delete(msg.sid);
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
    if (this.grants.publish && this.options.publish && this.options.audio) {
      this._micPromise ??= this._acquireMic();
      stream = await this._micPromise;
      if (pc !== this.pc) return;
    }
    if (stream && stream.getAudioTracks().length > 0) {
      this.localStream = stream;
      const track = stream.getAudioTracks()[0];
      track.enabled = !this.muted;
      pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
    } else {
      // Listen-only (no publish grant, or no microphone): release a mic acquired early.
      const early = this._micPromise;
      this._micPromise = null;
      if (early) early.then((s) => s && s.getTracks().forEach((t) => t.stop()));
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    // Chat channels: part of the one offer, so every participant (readers too) has them.
    this._openChatChannels(pc);
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    if (pc !== this.pc) return;
    this._send({ type: "offer", sdp: pc.localDescription.sdp });
    this.timings.offerSent = performance.now();
    this._offerSent = true;
    for (const c of this._pendingCandidates.splice(0)) this._send({ type: "candidate", candidate: c });
  }

  async _onAnswer(sdp) {
    const pc = this.pc;
    if (!pc || pc.signalingState !== "have-local-offer") return;
    await pc.setRemoteDescription({ type: "answer", sdp });
    this.timings.answer ??= performance.now();
  }

  async _onOffer(sdp) {
    const pc = this.pc;
    if (!pc) return;
    await pc.setRemoteDescription({ type: "offer", sdp });
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    if (pc !== this.pc) return;
    this._send({ type: "answer", sdp: pc.localDescription.sdp });
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
    this.remoteStreams.set(sid, stream);
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

  _enqueue(fn) {
    this._queue = this._queue.then(fn).catch((e) => {
      console.error("chorus: signaling step failed", e);
      this._emitError("client_media", `media negotiation failed: ${e && e.message ? e.message : e}`);
    });
    return this._queue;
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
