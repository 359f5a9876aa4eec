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
const leaveButton = $("leave-button");
const errorBox = document.querySelector('[data-testid="error-message"]');
const sinks = $("audio-sinks");

const ERROR_TEXT = {
  token_expired: "Your access token has expired — rejoin to get a new one.",
  invalid_token: "Your access token is not valid — ask for a new link.",
  forbidden: "You are not allowed to do that (is this the right channel?).",
  no_media_node: "No media server is available right now — try again in a moment.",
  unsupported_protocol: "This page is out of date — reload it.",
  rate_limited: "Too many requests — slow down a little.",
  not_joined: "Not joined yet — try joining again.",
  already_joined: "You are already in this channel.",
  invalid_sdp: "The audio connection could not be negotiated.",
  invalid_candidate: "A network candidate was rejected.",
  message_too_large: "A message was too large to send.",
  media_denied: "Microphone unavailable — you can listen, but others won't hear you.",
  reconnect_failed: "Lost the connection to the server.",
  connection_closed: "The connection to the server closed.",
  connect_failed: "Could not reach the server.",
  client_media: "The audio connection failed.",
  internal: "The server had a problem — try again.",
};

const params = new URLSearchParams(location.search);
const urlToken = params.get("token");

/** @type {ChorusClient|null} */
let client = null;
let errorTimer = null;

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
leaveButton.addEventListener("click", () => {
  if (!client) return;
  client.leave();
  showJoin();
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
    });
    window.chorus = client;
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
    if (c === client) renderParticipants();
  };
  c.addEventListener("joined", (e) => {
    if (c !== client) return;
    roomName.textContent = e.detail.room;
    renderParticipants();
    syncAudio();
    renderControls();
  });
  c.addEventListener("participant-joined", rerender);
  c.addEventListener("participant-updated", rerender);
  c.addEventListener("participant-left", (e) => {
    if (c !== client) return;
    removeAudio(e.detail.sid);
    renderParticipants();
  });
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
  c.addEventListener("error", (e) => {
    if (c !== client) return;
    const { code, message } = e.detail;
    const text = ERROR_TEXT[code] || `Something went wrong: ${message || code}`;
    // Non-fatal, transient problems disappear by themselves.
    const transient = ["rate_limited", "invalid_candidate", "message_too_large"].includes(code);
    showError(text, transient ? 6000 : 0, code);
  });
}

// ------------------------------------------------------------------ rendering

function showRoom(room) {
  form.hidden = true;
  roomView.hidden = false;
  roomName.textContent = room || "";
  list.replaceChildren();
  renderState("connecting");
  renderControls();
}

function showJoin() {
  roomView.hidden = true;
  form.hidden = false;
  list.replaceChildren();
  for (const el of [...sinks.children]) removeAudio(el.dataset.sid);
}

function renderState(state) {
  stateLine.dataset.state = state;
  stateLine.textContent = state;
}

function renderControls() {
  const muted = !!(client && client.muted);
  muteButton.textContent = muted ? "Unmute" : "Mute";
  muteButton.setAttribute("aria-pressed", String(muted));
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
