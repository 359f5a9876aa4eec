// Chorus voice-channel UI on top of chorus-sdk.js.
import { ChorusClient, decodeTokenClaims } from "./chorus-sdk.js";

const $ = (id) => document.getElementById(id);
const form = $("join-form");
const nameInput = $("join-name");
const roomInput = $("join-room");
const joinButton = $("join-button");
const roomView = $("room");
const roomName = $("room-name");
const stateLine = $("connection-state");
const list = $("participants");
const muteButton = $("mute-button");
const enhanceToggle = $("enhance-toggle");
enhanceToggle.checked = localStorage.getItem("chorus.enhance") === "1";
const leaveButton = $("leave-button");
const errorBox = document.querySelector('[data-testid="error-message"]');
const sinks = $("audio-sinks");
const card = document.querySelector("main.card");
const chatList = $("chat-messages");
const chatEmpty = $("chat-empty");
const chatForm = $("chat-form");
const chatInput = $("chat-input");
const chatSend = $("chat-send");
const chatHint = $("chat-hint");
const chatErrorBox = $("chat-error");
const typingLine = $("typing-indicator");
const cameraButton = $("camera-button");
const screenButton = $("screen-button");
const cameraSelect = $("camera-select");
const cameraPick = cameraSelect.closest("label");
const roomBody = $("room-body");
const videoArea = $("video");
const stage = $("stage");
const tilesBox = $("tiles");

/** Server limit on a message's length, in Unicode scalar values (docs/protocol.md). */
const CHAT_MAX_CHARS = 4000;
/** A typing indicator without a refresh (senders repeat every 2 s) disappears after this. */
const TYPING_TTL_MS = 5000;

const CHAT_ERROR_TEXT = {
  chat_rate_limited: "You're sending messages too fast — slow down.",
  chat_too_long: `Messages must be 1 to ${CHAT_MAX_CHARS} characters long.`,
  chat_forbidden: "You are not allowed to do that in this chat.",
  chat_not_found: "That message no longer exists.",
  chat_invalid: "The server did not understand that chat message.",
  chat_not_ready: "The chat is not connected yet — try again in a moment.",
};

const ERROR_TEXT = {
  token_expired: "Your access token has expired — rejoin to get a new one.",
  invalid_token: "Your access token is not valid — ask for a new link.",
  forbidden: "You are not allowed to do that (is this the right channel?).",
  no_media_node: "No media server is available right now — try again in a moment.",
  unavailable: "The server cannot reach its shared state right now — try again in a moment.",
  unsupported_protocol: "This page is out of date — reload it.",
  rate_limited: "Too many requests — slow down a little.",
  not_joined: "Not joined yet — try joining again.",
  already_joined: "You are already in this channel.",
  invalid_sdp: "The audio connection could not be negotiated.",
  invalid_candidate: "A network candidate was rejected.",
  message_too_large: "A message was too large to send.",
  media_denied: "Microphone unavailable — you can listen, but others won't hear you.",
  camera_denied: "The browser did not allow the camera — allow it for this site (the camera icon in the address bar), then press Camera again.",
  camera_unavailable: "No camera could be opened — is one connected, and not in use by another application?",
  screen_denied: "Screen sharing was cancelled or not allowed.",
  screen_unavailable: "This browser cannot share the screen.",
  unsupported_codec: "This browser cannot send video with the requested codec.",
  reconnect_failed: "Lost the connection to the server.",
  connection_closed: "The connection to the server closed.",
  connect_failed: "Could not reach the server.",
  client_media: "The audio connection failed.",
  internal: "The server had a problem — try again.",
};

const params = new URLSearchParams(location.search);
const urlToken = params.get("token");
/** ?codec=h264 (or vp8, vp9, av1): the camera offers only that codec (for testing). */
const cameraCodec = params.get("codec") || undefined;
/**
 * ?adaptive=0 turns adaptive stream off: every video arrives as if its tile were shown
 * full size, whatever its size or visibility (for testing and comparisons).
 */
const adaptiveStream = params.get("adaptive") !== "0";
const canShareScreen = !!(navigator.mediaDevices && navigator.mediaDevices.getDisplayMedia);
/** A Camera / Share screen press is being carried out (device prompt, negotiation). */
const busy = { camera: false, screen: false };

/** @type {ChorusClient|null} */
let client = null;
let errorTimer = null;
let chatErrorTimer = null;
/** Message text of our sends still waiting for the server, by ref (restored on error). */
const pendingSends = new Map();
/** Who is typing: identity → {name, until}. */
const typingPeople = new Map();
let typingTimer = null;
/** For tests and measurements: message id → performance.now() when first rendered. */
window.chatRenderedAt = new Map();

// ------------------------------------------------------------------ setup

if (urlToken) {
  const claims = decodeTokenClaims(urlToken) || {};
  nameInput.value = claims.name || claims.sub || "";
  roomInput.value = claims.room || "";
  nameInput.disabled = true;
  roomInput.disabled = true;
  $("token-hint").hidden = false;
} else {
  if (params.get("room")) roomInput.value = params.get("room");
  if (params.get("name")) nameInput.value = params.get("name");
  else nameInput.value = localStorage.getItem("chorus.name") || "";
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  join();
});
muteButton.addEventListener("click", () => {
  if (!client) return;
  client.setMuted(!client.muted);
  renderControls();
});
enhanceToggle.addEventListener("change", () => {
  localStorage.setItem("chorus.enhance", enhanceToggle.checked ? "1" : "0");
  if (client) client.setEnhanced(enhanceToggle.checked);
});
cameraButton.addEventListener("click", () => toggleVideo("camera"));
screenButton.addEventListener("click", () => toggleVideo("screen"));
screenButton.hidden = !canShareScreen;
cameraSelect.addEventListener("change", () => {
  // Switching cameras while on swaps the track in place (no renegotiation).
  if (client && client.isPublishing("camera")) startCamera().catch(() => {});
});
if (navigator.mediaDevices && navigator.mediaDevices.addEventListener) {
  navigator.mediaDevices.addEventListener("devicechange", () => refreshCameras());
}
leaveButton.addEventListener("click", () => {
  if (!client) return;
  client.leave();
  showJoin();
});
chatForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  sendChatFromInput();
});
chatInput.addEventListener("keydown", (ev) => {
  // Enter sends; Shift+Enter starts a new line.
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    sendChatFromInput();
  }
});
chatInput.addEventListener("input", () => {
  if (!client) return;
  client.setTyping(chatInput.value.length > 0);
});
window.addEventListener("pagehide", () => {
  if (client && client.state !== "disconnected") client.leave();
});

// ------------------------------------------------------------------ join

async function join() {
  clearError();
  const name = nameInput.value.trim();
  const room = roomInput.value.trim();
  if (!urlToken && (!name || !room)) {
    showError("Enter your name and a channel.");
    return;
  }
  joinButton.disabled = true;
  try {
    let token = urlToken;
    if (!token) {
      localStorage.setItem("chorus.name", name);
      token = await devToken(name, room);
    }
    if (client) client.leave();
    client = new ChorusClient({
      // Raw microphone for now: processing would mangle the test tones.
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      // ?relay=1 sends media only through the TURN relay; ?relay=udp or ?relay=tcp also
      // picks the transport to the relay (for testing restrictive networks).
      iceTransportPolicy: params.get("relay") ? "relay" : "all",
      turnTransport: ["udp", "tcp"].includes(params.get("relay")) ? params.get("relay") : null,
      // Hidden and small tiles ask the server for less (see updateTile).
      adaptiveStream,
    });
    window.chorus = client;
    // Sent again by the SDK once joined; the server ignores it before that.
    client.enhanced = enhanceToggle.checked;
    wire(client);
    const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    showRoom(room);
    await client.connect({ url: wsUrl, token });
  } catch (e) {
    // Server errors already reached the "error" event; show anything else here.
    if (errorBox.hidden) showError((e && ERROR_TEXT[e.code]) || (e && e.message) || String(e), 0, (e && e.code) || "");
    showJoin();
  } finally {
    joinButton.disabled = false;
  }
}

async function devToken(name, room) {
  let res;
  try {
    res = await fetch("/dev/token", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name, room }),
    });
  } catch {
    throw new Error("Could not reach the server.");
  }
  let body = null;
  try {
    body = await res.json();
  } catch {}
  if (res.status === 404) {
    throw new Error("This server is not in dev mode: open the link with an access token (?token=…).");
  }
  if (!res.ok || !body || !body.token) {
    throw new Error(body && body.message ? `Could not join: ${body.message}` : `Could not get a token (HTTP ${res.status}).`);
  }
  return body.token;
}

function wire(c) {
  const rerender = () => {
    if (c !== client) return;
    renderParticipants();
    renderVideo();
  };
  c.addEventListener("joined", (e) => {
    if (c !== client) return;
    roomName.textContent = e.detail.room;
    chatInput.placeholder = `Message #${e.detail.room}`;
    renderChatControls();
    renderParticipants();
    renderVideo();
    syncAudio();
    renderControls();
    refreshCameras();
  });
  c.addEventListener("participant-joined", rerender);
  c.addEventListener("participant-updated", rerender);
  c.addEventListener("dominant-speaker", rerender);
  c.addEventListener("participant-left", (e) => {
    if (c !== client) return;
    removeAudio(e.detail.sid);
    renderParticipants();
    renderVideo();
  });
  for (const type of ["remote-track", "remote-track-removed", "track-quality"]) c.addEventListener(type, rerender);
  for (const type of ["local-track", "local-track-removed"]) {
    c.addEventListener(type, () => {
      if (c !== client) return;
      renderVideo();
      renderControls();
    });
  }
  c.addEventListener("track", (e) => {
    if (c !== client) return;
    attachAudio(e.detail.sid, e.detail.stream);
  });
  c.addEventListener("track-removed", () => {
    if (c === client) syncAudio();
  });
  c.addEventListener("connection-state", (e) => {
    if (c !== client) return;
    renderState(e.detail.state);
    renderControls();
    if (e.detail.state === "disconnected") {
      syncAudio();
      showJoin();
    }
  });
  c.addEventListener("left", (e) => {
    if (c !== client) return;
    if (e.detail.reason === "replaced") showError("You joined this channel from somewhere else.");
    else if (e.detail.reason && e.detail.reason !== "left") showError(`You left the channel (${e.detail.reason}).`);
  });
  c.addEventListener("chat-ready", () => {
    if (c === client) renderChatControls();
  });
  c.addEventListener("chat-closed", () => {
    if (c === client) renderChatControls();
  });
  c.addEventListener("chat-history", (e) => {
    if (c === client) renderChatHistory(e.detail.messages);
  });
  c.addEventListener("chat-message", (e) => {
    if (c !== client) return;
    const m = e.detail;
    if (m.ref) pendingSends.delete(m.ref);
    if (m.from && typingPeople.delete(m.from.identity)) renderTyping();
    insertChatMessage(m);
  });
  c.addEventListener("chat-deleted", (e) => {
    if (c !== client) return;
    const el = chatList.querySelector(`[data-testid="chat-message"][data-id="${CSS.escape(String(e.detail.id))}"]`);
    if (el) el.remove();
    renderChatEmpty();
  });
  c.addEventListener("chat-error", (e) => {
    if (c !== client) return;
    const { code, message, ref } = e.detail;
    const text = ref ? pendingSends.get(ref) : undefined;
    if (ref) pendingSends.delete(ref);
    // Give the text back if the input is free, so nothing typed is lost.
    if (text !== undefined && chatInput.value === "" && !chatInput.disabled) chatInput.value = text;
    showChatError(CHAT_ERROR_TEXT[code] || `The message was not sent: ${message || code}`, code);
  });
  c.addEventListener("typing", (e) => {
    if (c !== client) return;
    const { from, typing } = e.detail;
    if (!from || !from.identity || (client.self && from.identity === client.self.identity)) return;
    if (typing) typingPeople.set(from.identity, { name: from.name || from.identity, until: performance.now() + TYPING_TTL_MS });
    else typingPeople.delete(from.identity);
    renderTyping();
  });
  c.addEventListener("participant-left", (e) => {
    if (c !== client) return;
    if (typingPeople.delete(e.detail.identity)) renderTyping();
  });
  c.addEventListener("error", (e) => {
    if (c !== client) return;
    const { code, message, name } = e.detail;
    let text = ERROR_TEXT[code] || `Something went wrong: ${message || code}`;
    if (code === "forbidden" && /may not publish/i.test(message || "")) {
      // A token limited to some sources (can_publish_sources): say which, in the server's words.
      text = `Your access token does not allow that (${message}).`;
    } else if (code === "camera_unavailable" && name === "NotFoundError") {
      text = "No camera was found — connect one and press Camera again.";
    } else if (code === "camera_unavailable" && name === "NotReadableError") {
      text = "The camera is in use by another application (or the system blocked it).";
    }
    // Non-fatal, transient problems disappear by themselves.
    const transient = ["rate_limited", "invalid_candidate", "message_too_large"].includes(code);
    showError(text, transient ? 6000 : 0, code);
  });
}

// ------------------------------------------------------------------ rendering

function showRoom(room) {
  form.hidden = true;
  clearTiles();
  roomView.hidden = false;
  card.classList.add("in-room");
  roomName.textContent = room || "";
  list.replaceChildren();
  resetChat();
  renderState("connecting");
  renderControls();
}

function showJoin() {
  roomView.hidden = true;
  form.hidden = false;
  card.classList.remove("in-room");
  list.replaceChildren();
  resetChat();
  clearTiles();
  for (const el of [...sinks.children]) removeAudio(el.dataset.sid);
  renderControls();
}

function renderState(state) {
  stateLine.dataset.state = state;
  stateLine.textContent = state;
}

function renderControls() {
  const muted = !!(client && client.muted);
  muteButton.textContent = muted ? "Unmute" : "Mute";
  muteButton.setAttribute("aria-pressed", String(muted));
  const seated = !!(client && client.grants && client.state !== "disconnected");
  const mayPublish = seated && client.grants.publish !== false;
  for (const [source, button, on, off] of [
    ["camera", cameraButton, "Stop camera", "Camera"],
    ["screen", screenButton, "Stop sharing", "Share screen"],
  ]) {
    const active = !!(client && client.isPublishing(source));
    button.textContent = active ? on : off;
    button.setAttribute("aria-pressed", String(active));
    button.disabled = !mayPublish || busy[source];
    button.title = seated && !mayPublish ? "Your access token does not allow publishing" : "";
  }
}

// ------------------------------------------------------------------ video

async function toggleVideo(source) {
  if (!client || busy[source]) return;
  busy[source] = true;
  renderControls();
  try {
    if (client.isPublishing(source)) await client.unpublish(source);
    else if (source === "camera") await startCamera();
    else await client.publishScreen();
  } catch (e) {
    // The SDK reported ChorusErrors through its "error" event already.
    if (!(e && e.code)) showError(`Could not start the ${source}: ${e && e.message ? e.message : e}`);
  } finally {
    busy[source] = false;
    renderControls();
  }
}

async function startCamera() {
  const opts = { codec: cameraCodec };
  if (cameraSelect.value) opts.deviceId = cameraSelect.value;
  await client.publishCamera(opts);
  // Device labels are only readable once a camera permission exists.
  refreshCameras();
}

/** Fill the camera picker from the browser's video inputs, keeping the current choice. */
async function refreshCameras() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  let devices = [];
  try {
    devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
  } catch {
    return;
  }
  const local = client && client.localTracks.get("camera");
  const current = (local && local.deviceId) || cameraSelect.value;
  const options = devices.map((d, i) => {
    const o = document.createElement("option");
    o.value = d.deviceId;
    o.textContent = d.label || `Camera ${i + 1}`;
    return o;
  });
  cameraSelect.replaceChildren(...options);
  if (current && devices.some((d) => d.deviceId === current)) cameraSelect.value = current;
  // Before any permission the ids are empty: a picker of blank choices helps nobody.
  cameraPick.hidden = devices.length === 0 || devices.every((d) => !d.deviceId);
}

/**
 * What the grid should show: our own camera/screen (a local preview, as soon as it
 * captures) and every video track other participants list in `tracks`. Tiles follow
 * `tracks`, not ontrack: a stopped track's m-section stays around for reuse.
 */
function videoEntries() {
  if (!client || !client.self) return [];
  const out = [];
  const self = client.self;
  for (const source of ["screen", "camera"]) {
    const local = client.localTracks.get(source);
    if (!local) continue;
    out.push({ sid: self.sid, source, p: self, isSelf: true, track: local.track, trackSid: local.trackSid || "", pending: local.state === "pending" });
  }
  const others = [...client.participants.values()].sort((a, b) =>
    (a.name || a.identity).localeCompare(b.name || b.identity));
  for (const p of others) {
    for (const t of Array.isArray(p.tracks) ? p.tracks : []) {
      if (t.kind !== "video" || (t.source !== "camera" && t.source !== "screen")) continue;
      const remote = client.remoteTracks.get(t.sid);
      out.push({ sid: p.sid, source: t.source, p, isSelf: false, track: remote ? remote.track : null, trackSid: t.sid, pending: false });
    }
  }
  return out;
}

function renderVideo() {
  const entries = videoEntries();
  const existing = new Map([...videoArea.querySelectorAll('[data-testid="video-tile"]')].map((el) => [el.dataset.key, el]));
  const cams = [];
  const screens = [];
  for (const e of entries) {
    const key = `${e.sid}:${e.source}`;
    const el = existing.get(key) || makeTile(key);
    existing.delete(key);
    updateTile(el, e);
    (e.source === "screen" ? screens : cams).push(el);
  }
  for (const el of existing.values()) dropTile(el);
  placeChildren(stage, screens);
  placeChildren(tilesBox, cams);
  const any = entries.length > 0;
  videoArea.hidden = !any;
  videoArea.classList.toggle("has-stage", screens.length > 0);
  videoArea.dataset.cameras = String(cams.length);
  stage.hidden = screens.length === 0;
  roomBody.classList.toggle("has-video", any);
  card.classList.toggle("has-video", any);
  // Moving a <video> in the DOM pauses it; start any that stopped.
  for (const v of videoArea.querySelectorAll("video")) {
    if (v.srcObject && v.paused) v.play().catch(() => {});
  }
}

/**
 * Make `box`'s children exactly `els`, in order, moving only what is out of place:
 * re-inserting a playing <video> pauses it and flashes the tile.
 */
function placeChildren(box, els) {
  els.forEach((el, i) => {
    if (box.children[i] !== el) box.insertBefore(el, box.children[i] || null);
  });
  while (box.children.length > els.length) dropTile(box.lastElementChild);
}

function makeTile(key) {
  const el = document.createElement("div");
  el.className = "tile";
  el.dataset.testid = "video-tile";
  el.dataset.key = key;
  const video = document.createElement("video");
  video.autoplay = true;
  video.playsInline = true;
  video.muted = true; // the <audio> sinks play the sound; a muted video may autoplay
  video.setAttribute("playsinline", "");
  video.setAttribute("muted", "");
  video.addEventListener("resize", () => markFrames(el, video));
  video.addEventListener("loadeddata", () => markFrames(el, video));
  const avatar = document.createElement("div");
  avatar.className = "tile-avatar";
  avatar.setAttribute("aria-hidden", "true");
  const bar = document.createElement("div");
  bar.className = "tile-bar";
  bar.innerHTML =
    '<span class="tile-name"></span>' +
    '<svg class="muted-icon" viewBox="0 0 24 24" role="img" aria-label="muted" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round">' +
    '<path d="M9 9v3a3 3 0 0 0 5.1 2.1M15 9.3V5a3 3 0 0 0-5.9-.8"/><path d="M19 11a7 7 0 0 1-1.1 3.8M5 11a7 7 0 0 0 11.3 5.5"/>' +
    '<path d="M12 18v3"/><path d="M3 3l18 18"/></svg>' +
    '<span class="quality-badge" data-testid="quality-badge" title="The layer you receive"></span>';
  el.append(video, avatar, bar);
  return el;
}

function markFrames(el, video) {
  el.dataset.frames = String(video.videoWidth > 0);
  el.dataset.videoWidth = String(video.videoWidth);
}

function updateTile(el, e) {
  const name = e.p.name || e.p.identity;
  el.dataset.sid = e.sid;
  el.dataset.source = e.source;
  el.dataset.identity = e.p.identity;
  el.dataset.trackSid = e.trackSid;
  el.dataset.self = String(e.isSelf);
  el.dataset.pending = String(e.pending);
  el.dataset.live = String(!!e.track);
  // The ring means "this person talks", which a screen does not.
  el.dataset.speaking = String(e.source === "camera" && !!e.p.speaking);
  el.dataset.muted = String(e.source === "camera" && !!e.p.muted);
  el.dataset.dominant = String(e.source === "camera" && client.dominantSid === e.sid);
  el.title = e.source === "screen" ? `${name}'s screen` : name;
  el.querySelector(".tile-avatar").textContent = name.slice(0, 1).toUpperCase();
  el.querySelector(".tile-name").textContent =
    e.source === "screen" ? `${name}${e.isSelf ? " (you)" : ""} — screen` : `${name}${e.isSelf ? " (you)" : ""}`;
  const video = el.querySelector("video");
  if (video._track !== e.track) {
    video._track = e.track;
    video.srcObject = e.track ? new MediaStream([e.track]) : null;
    el.dataset.frames = "false";
    if (e.track) video.play().catch(() => {});
  }
  // Adaptive stream: the SDK watches the size and visibility of each remote video
  // (observing again is a no-op; the SDK drops the observation when a track goes away).
  const observe = !e.isSelf && e.track ? e.trackSid : null;
  if (video._observedSid && video._observedSid !== observe) client.unobserveTrackElement(video._observedSid, video);
  if (observe) client.observeTrackElement(observe, video);
  video._observedSid = observe;
  const badge = el.querySelector('[data-testid="quality-badge"]');
  if (e.isSelf) {
    // What we receive is meaningless for our own preview.
    badge.textContent = "you";
    badge.dataset.quality = "local";
    badge.title = "Your own video";
    delete el.dataset.qualityReason;
  } else {
    const q = client.trackQuality.get(e.trackSid);
    const reason = (q && client.trackQualityReason.get(e.trackSid)) || null;
    badge.textContent = qualityText(q, reason);
    badge.dataset.quality = q || "unknown";
    badge.title = qualityTitle(q, reason);
    // Why a tile froze or blurs, for styling and tests: bandwidth | view | publisher.
    if (reason) el.dataset.qualityReason = reason;
    else delete el.dataset.qualityReason;
  }
}

/** The badge: the layer received, and why it is less than asked for. */
function qualityText(q, reason) {
  if (!q) return "…";
  if (!reason) return q;
  return q === "off" ? `paused: ${reason}` : `${q} (${reason})`;
}

const REASON_TEXT = {
  bandwidth: "your connection cannot carry more right now",
  view: "the tile is hidden or small, so less is sent",
  publisher: "the sender is not sending more",
};

function qualityTitle(q, reason) {
  if (!q) return "Waiting for video";
  const what = q === "off" ? "Video paused" : `Receiving the ${q} layer`;
  return reason ? `${what}: ${REASON_TEXT[reason] || reason}` : what;
}

function dropTile(el) {
  const video = el.querySelector("video");
  if (video) {
    if (video._observedSid && client) client.unobserveTrackElement(video._observedSid, video);
    video._observedSid = null;
    video._track = null;
    video.srcObject = null;
  }
  el.remove();
}

function clearTiles() {
  for (const el of [...videoArea.querySelectorAll('[data-testid="video-tile"]')]) dropTile(el);
  videoArea.hidden = true;
  videoArea.classList.remove("has-stage");
  roomBody.classList.remove("has-video");
  card.classList.remove("has-video");
}

function renderParticipants() {
  if (!client || !client.self) {
    list.replaceChildren();
    return;
  }
  const people = [client.self, ...[...client.participants.values()].sort((a, b) =>
    (a.name || a.identity).localeCompare(b.name || b.identity))];
  const existing = new Map([...list.children].map((li) => [li.dataset.sid, li]));
  const items = people.map((p) => {
    const isSelf = p.sid === client.self.sid;
    const li = existing.get(p.sid) || makeEntry();
    existing.delete(p.sid);
    li.dataset.sid = p.sid;
    li.dataset.identity = p.identity;
    li.dataset.self = String(isSelf);
    li.dataset.speaking = String(!!p.speaking);
    li.dataset.muted = String(!!p.muted);
    li.dataset.dominant = String(client.dominantSid === p.sid);
    li.title = `${p.name || p.identity} (${p.identity})`;
    const label = p.name || p.identity;
    li.querySelector(".avatar").textContent = label.slice(0, 1).toUpperCase();
    li.querySelector(".label").textContent = label;
    li.querySelector(".you").textContent = isSelf ? "(you)" : "";
    return li;
  });
  list.replaceChildren(...items);
}

function makeEntry() {
  const li = document.createElement("li");
  li.className = "participant";
  li.dataset.testid = "participant";
  li.innerHTML =
    '<span class="avatar" aria-hidden="true"></span>' +
    '<span class="name"><span class="label"></span><span class="you"></span></span>' +
    '<svg class="muted-icon" viewBox="0 0 24 24" role="img" aria-label="muted" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round">' +
    '<path d="M9 9v3a3 3 0 0 0 5.1 2.1M15 9.3V5a3 3 0 0 0-5.9-.8"/><path d="M19 11a7 7 0 0 1-1.1 3.8M5 11a7 7 0 0 0 11.3 5.5"/>' +
    '<path d="M12 18v3"/><path d="M3 3l18 18"/></svg>';
  return li;
}

// ------------------------------------------------------------------ chat

function canSendChat() {
  return !!(client && client.grants && client.grants.publish_data);
}

function renderChatControls() {
  const joined = !!(client && client.grants);
  const allowed = canSendChat();
  const ready = !!(client && client.chatReady);
  chatHint.hidden = !joined || allowed;
  chatInput.disabled = !allowed || !ready;
  chatSend.disabled = !allowed || !ready;
  if (joined && !allowed) chatInput.placeholder = "Read only";
  else if (!ready) chatInput.placeholder = "Connecting chat…";
  else chatInput.placeholder = `Message #${client.room || ""}`;
}

function sendChatFromInput() {
  if (!client || chatSend.disabled) return;
  const text = chatInput.value;
  if (text.trim() === "") return;
  if ([...text].length > CHAT_MAX_CHARS) {
    showChatError(CHAT_ERROR_TEXT.chat_too_long, "chat_too_long");
    return;
  }
  const ref = client.sendChat(text);
  pendingSends.set(ref, text);
  if (pendingSends.size > 200) pendingSends.delete(pendingSends.keys().next().value);
  chatInput.value = "";
  chatInput.focus();
}

function resetChat() {
  chatList.replaceChildren();
  typingPeople.clear();
  pendingSends.clear();
  renderTyping();
  clearChatError();
  renderChatEmpty();
  renderChatControls();
}

function renderChatEmpty() {
  chatEmpty.hidden = chatList.children.length > 0;
}

function renderChatHistory(messages) {
  const keep = new Set(messages.map((m) => String(m.id)));
  for (const el of [...chatList.children]) if (!keep.has(el.dataset.id)) el.remove();
  const stick = nearBottom();
  for (const m of messages) insertChatMessage(m, false);
  renderChatEmpty();
  if (stick) scrollToBottom();
}

/** Put message `m` in id order; a message already shown is left alone. */
function insertChatMessage(m, autoscroll = true) {
  const id = String(m.id);
  if (chatList.querySelector(`[data-testid="chat-message"][data-id="${CSS.escape(id)}"]`)) return;
  const stick = autoscroll && (nearBottom() || m.own);
  const el = makeChatMessage(m);
  // Usually the newest: walk back from the end to the first smaller id.
  let after = chatList.lastElementChild;
  while (after && Number(after.dataset.id) > m.id) after = after.previousElementSibling;
  if (after) after.after(el);
  else chatList.prepend(el);
  const at = performance.now();
  el.dataset.renderedAt = String(at);
  window.chatRenderedAt.set(m.id, at);
  renderChatEmpty();
  if (stick) scrollToBottom();
}

function makeChatMessage(m) {
  const from = m.from || {};
  const li = document.createElement("li");
  li.className = "chat-msg";
  li.dataset.testid = "chat-message";
  li.dataset.id = String(m.id);
  li.dataset.from = from.identity || "";
  li.dataset.own = String(!!m.own);

  const meta = document.createElement("div");
  meta.className = "chat-meta";
  const who = document.createElement("span");
  who.className = "chat-from";
  who.dataset.testid = "chat-from";
  who.textContent = from.name || from.identity || "?";
  who.title = from.identity || "";
  const when = document.createElement("time");
  when.className = "chat-time";
  when.dataset.testid = "chat-time";
  if (m.ts) {
    const d = new Date(m.ts);
    when.dateTime = d.toISOString();
    when.title = d.toLocaleString();
    when.textContent = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  meta.append(who, when);
  const isAdmin = !!(client && client.grants && client.grants.admin);
  if (m.own || isAdmin) {
    const del = document.createElement("button");
    del.type = "button";
    del.className = "chat-delete";
    del.dataset.testid = "chat-delete";
    del.title = "Delete message";
    del.setAttribute("aria-label", "Delete message");
    del.textContent = "×";
    del.addEventListener("click", () => {
      if (client) client.deleteChat(m.id);
    });
    meta.append(del);
  }

  const body = document.createElement("div");
  body.className = "chat-text";
  body.dataset.testid = "chat-text";
  body.append(...linkify(m.text));
  li.append(meta, body);
  return li;
}

/**
 * Message text as DOM nodes: text nodes, plus <a> for http(s) URLs. Never HTML: the text
 * only ever reaches the page through text nodes and validated href attributes.
 */
function linkify(text) {
  const nodes = [];
  const re = /\bhttps?:\/\/[^\s<>"'`]+/gi;
  let last = 0;
  let m;
  while ((m = re.exec(text))) {
    let url = m[0];
    // Trailing punctuation usually ends the sentence, not the URL; keep balanced ")".
    for (;;) {
      const ch = url.slice(-1);
      if (/[.,;:!?'"\]}]/.test(ch)) url = url.slice(0, -1);
      else if (ch === ")" && count(url, "(") < count(url, ")")) url = url.slice(0, -1);
      else break;
    }
    const start = m.index;
    re.lastIndex = start + url.length;
    if (!isWebUrl(url)) continue;
    if (start > last) nodes.push(document.createTextNode(text.slice(last, start)));
    const a = document.createElement("a");
    a.href = url;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.textContent = url;
    nodes.push(a);
    last = start + url.length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function count(s, ch) {
  return s.split(ch).length - 1;
}

function isWebUrl(s) {
  if (!/^https?:\/\/./i.test(s)) return false;
  try {
    const u = new URL(s);
    return (u.protocol === "http:" || u.protocol === "https:") && !!u.hostname;
  } catch {
    return false;
  }
}

function nearBottom() {
  return chatList.scrollHeight - chatList.scrollTop - chatList.clientHeight < 40;
}

function scrollToBottom() {
  chatList.scrollTop = chatList.scrollHeight;
}

function renderTyping() {
  clearTimeout(typingTimer);
  const now = performance.now();
  for (const [id, t] of typingPeople) if (t.until <= now) typingPeople.delete(id);
  const names = [...typingPeople.values()].map((t) => t.name);
  let text = "";
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length === 3) text = `${names[0]}, ${names[1]} and ${names[2]} are typing…`;
  else if (names.length > 3) text = `${names[0]}, ${names[1]} and ${names.length - 2} others are typing…`;
  typingLine.textContent = text;
  typingLine.dataset.count = String(names.length);
  if (names.length) {
    const next = Math.min(...[...typingPeople.values()].map((t) => t.until)) - now;
    typingTimer = setTimeout(renderTyping, Math.max(50, next));
  }
}

function showChatError(text, code = "") {
  clearTimeout(chatErrorTimer);
  chatErrorBox.textContent = text;
  chatErrorBox.dataset.code = code;
  chatErrorBox.hidden = false;
  chatErrorTimer = setTimeout(clearChatError, 8000);
}

function clearChatError() {
  clearTimeout(chatErrorTimer);
  chatErrorBox.hidden = true;
  chatErrorBox.textContent = "";
  chatErrorBox.dataset.code = "";
}

// ------------------------------------------------------------------ audio

function attachAudio(sid, stream) {
  let el = sinks.querySelector(`audio[data-sid="${CSS.escape(sid)}"]`);
  if (!el) {
    el = document.createElement("audio");
    el.autoplay = true;
    el.dataset.sid = sid;
    sinks.append(el);
  }
  if (el.srcObject !== stream) el.srcObject = stream;
  el.play().catch(() => {
    // Autoplay refused (no user gesture yet): retry on the next click anywhere.
    document.addEventListener("click", () => el.play().catch(() => {}), { once: true });
  });
}

function removeAudio(sid) {
  const el = sid && sinks.querySelector(`audio[data-sid="${CSS.escape(sid)}"]`);
  if (el) {
    el.srcObject = null;
    el.remove();
  }
}

/** Make the <audio> elements match the client's remote streams. */
function syncAudio() {
  const streams = client ? client.remoteStreams : new Map();
  for (const el of [...sinks.children]) {
    if (!streams.has(el.dataset.sid)) removeAudio(el.dataset.sid);
  }
  for (const [sid, stream] of streams) attachAudio(sid, stream);
}

// ------------------------------------------------------------------ errors

function showError(text, autoHideMs = 0, code = "") {
  clearTimeout(errorTimer);
  errorBox.textContent = text;
  errorBox.dataset.code = code;
  errorBox.hidden = false;
  if (autoHideMs) errorTimer = setTimeout(clearError, autoHideMs);
}

function clearError() {
  clearTimeout(errorTimer);
  errorBox.hidden = true;
  errorBox.textContent = "";
  errorBox.dataset.code = "";
}
