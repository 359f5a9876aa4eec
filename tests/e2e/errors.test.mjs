// Error paths of the client protocol (docs/protocol.md "Errors"), from node over /ws.
// A joined "witness" socket must keep being served throughout.
import { test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { startServer, devToken, cliToken } from "./lib/server.mjs";
import { Sock } from "./lib/socket.mjs";
import { sleep } from "./lib/util.mjs";

let server, witness, expired;
const GRACE_SECS = 2;
// `chorus dev` defaults (see `chorus dev --help`), used to sign edge-case tokens.
const DEV_KEY = "devkey";
const DEV_SECRET = "devsecret";
const sockets = [];

async function open() {
  const s = await Sock.open(server.wsUrl);
  sockets.push(s);
  return s;
}

async function joined(name, room) {
  const { token, identity } = await devToken(server.origin, name, room);
  const s = await open();
  s.send({ type: "join", token, room, protocol: 1 });
  const m = await s.next((m) => m.type === "joined" || m.type === "error");
  assert.equal(m.type, "joined", `join as ${name} in ${room}: ${JSON.stringify(m)}`);
  return { s, joined: m, token, identity };
}

function b64url(x) {
  return Buffer.from(typeof x === "string" ? x : JSON.stringify(x)).toString("base64url");
}

/** A well-formed HS256 JWT signed with a secret the server does not know. */
function madeUpToken(room) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url({ alg: "HS256", typ: "JWT" });
  const body = b64url({ iss: "made-up-key", sub: "mallory", room, exp: now + 3600, grants: { join: true, publish: true, subscribe: true } });
  const sig = createHmac("sha256", randomBytes(32)).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** An HS256 JWT with arbitrary claims, signed with the dev secret (or `secret`). */
function signedToken(claims, { secret = DEV_SECRET, alg = "HS256" } = {}) {
  const head = b64url({ alg, typ: "JWT" });
  const body = b64url(claims);
  const sig = alg === "none" ? "" : createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

const ALL_GRANTS = { join: true, publish: true, subscribe: true, publish_data: true };
const nowSecs = () => Math.floor(Date.now() / 1000);

/** A Chrome-like offer publishing one Opus track (sendonly). */
function publishingOffer() {
  const fp = Array.from({ length: 32 }, (_, i) => ((i * 37 + 11) & 0xff).toString(16).padStart(2, "0").toUpperCase()).join(":");
  return [
    "v=0",
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0",
    "a=extmap-allow-mixed",
    "a=msid-semantic: WMS stream0",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    "c=IN IP4 0.0.0.0",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:Xq3v",
    "a=ice-pwd:9sWdE2kzR1mYqT8uVbN4cH7p",
    "a=ice-options:trickle",
    `a=fingerprint:sha-256 ${fp}`,
    "a=setup:actpass",
    "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=sendonly",
    "a=msid:stream0 track0",
    "a=rtcp-mux",
    "a=rtpmap:111 opus/48000/2",
    "a=rtcp-fb:111 transport-cc",
    "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=ssrc:1234567 cname:e2ecname",
    "a=ssrc:1234567 msid:stream0 track0",
    "",
  ].join("\r\n");
}

async function joinWith(token, extra = {}) {
  const s = await open();
  s.send({ type: "join", token, ...extra });
  const m = await s.next((m) => m.type === "joined" || m.type === "error");
  return { s, m };
}

before(async () => {
  server = await startServer("errors", { extraArgs: ["--reconnect-grace", `${GRACE_SECS}s`] });
  // Mint the short-lived token first so that its expiry overlaps the other tests.
  try {
    expired = { token: cliToken(["--room", "exp-room", "--identity", "late", "--ttl", "1s"]), at: Date.now() };
  } catch (e) {
    expired = { error: e };
  }
  witness = await joined("Witness", "witness-room");
  assert.equal(witness.joined.protocol, 1);
});

after(async () => {
  for (const s of sockets) s.close();
  await server?.stop();
});

afterEach(async () => {
  // The unrelated, joined witness socket is still served after every misbehaviour.
  if (witness) await witness.s.roundTrip();
});

test("joined has the documented shape", async () => {
  const { s, joined: m, identity } = await joined("Shape", "shape-room");
  assert.equal(m.protocol, 1);
  assert.equal(m.room, "shape-room");
  assert.equal(m.resumed, false);
  assert.equal(typeof m.reconnect_grace_secs, "number");
  assert.ok(Array.isArray(m.participants) && Array.isArray(m.ice_servers));
  for (const k of ["sid", "identity", "name", "muted", "speaking", "publishing"]) {
    assert.ok(k in m.self, `self.${k} present: ${JSON.stringify(m.self)}`);
  }
  assert.equal(m.self.identity, identity);
  assert.equal(m.self.name, "Shape");
  assert.equal(m.grants.join, true);
  s.close();
});

test("garbage JSON → bad_request, and the socket stays usable", async () => {
  const s = await open();
  s.send("{this is not json");
  await s.expectError("bad_request");
  s.send({ type: "explode" });
  await s.expectError("bad_request");
  s.send(Buffer.from([1, 2, 3])); // binary frame
  await s.expectError("bad_request");
  await s.roundTrip();
  assert.equal(s.closeInfo, null, "socket still open");
});

test("1 MiB frame → message_too_large, and the socket still answers ping", async () => {
  const s = await open();
  s.send(JSON.stringify({ type: "ping", ts: 1, pad: "x".repeat(1024 * 1024) }));
  await s.expectError("message_too_large");
  await s.roundTrip();
  assert.equal(s.closeInfo, null, "socket still open");
});

test("messages before join → not_joined; ping is allowed", async () => {
  const s = await open();
  await s.roundTrip();
  s.send({ type: "mute", muted: true });
  await s.expectError("not_joined");
  await s.roundTrip();
});

test("a made-up token → invalid_token, then the socket closes", async () => {
  for (const token of ["not-a-token", madeUpToken("lobby")]) {
    const s = await open();
    s.send({ type: "join", token });
    await s.expectError("invalid_token");
    assert.ok(await s.closedWithin(5000), `socket closed after invalid_token (${token.slice(0, 20)}…)`);
  }
});

test("a token for room a used to join room b → forbidden, then the socket closes", async () => {
  const { token } = await devToken(server.origin, "Eve", "a");
  const s = await open();
  s.send({ type: "join", token, room: "b" });
  await s.expectError("forbidden");
  assert.ok(await s.closedWithin(5000), "socket closed after forbidden join");
});

test("unsupported protocol version → unsupported_protocol", async () => {
  const { token } = await devToken(server.origin, "Future", "proto-room");
  const s = await open();
  // Versions 1 and 2 exist (docs/protocol.md); the next one does not yet.
  s.send({ type: "join", token, protocol: 3 });
  await s.expectError("unsupported_protocol");
  assert.ok(await s.closedWithin(5000), "socket closed after unsupported_protocol");
});

test("after joining: offer with sdp \"hello\" → invalid_sdp; second join → already_joined; socket stays usable", async () => {
  const { s, token } = await joined("Sdp", "sdp-room");
  s.send({ type: "offer", sdp: "hello" });
  await s.expectError("invalid_sdp");
  await s.roundTrip();
  s.send({ type: "join", token });
  await s.expectError("already_joined");
  s.send({ type: "candidate", candidate: { candidate: "", sdpMid: "0", sdpMLineIndex: 0 } });
  await s.roundTrip(); // the empty end-of-candidates is accepted and ignored
  assert.equal(s.inbox.filter((m) => m.type === "error").length, 0,
    `no error for the empty candidate: ${JSON.stringify(s.inbox)}`);
  assert.equal(s.closeInfo, null, "socket still open");
});

test("more than 50 messages per second → rate_limited; the socket stays open", async () => {
  const s = await open();
  for (let i = 0; i < 120; i++) s.send({ type: "ping", ts: 1_000_000 + i });
  await s.expectError("rate_limited");
  await sleep(1500);
  s.inbox.length = 0;
  await s.roundTrip();
  assert.equal(s.closeInfo, null, "socket still open");
});

test("a publishing offer: answered with the publish grant, forbidden without it (socket stays open)", async () => {
  const pub = await joinWith(signedToken({ iss: DEV_KEY, sub: "pub", room: "grant-room", exp: nowSecs() + 600, grants: ALL_GRANTS }));
  assert.equal(pub.m.type, "joined", JSON.stringify(pub.m));
  pub.s.send({ type: "offer", sdp: publishingOffer() });
  const a = await pub.s.next((m) => m.type === "answer" || m.type === "error");
  assert.equal(a.type, "answer", `a valid publishing offer is answered: ${JSON.stringify(a).slice(0, 300)}`);
  assert.match(a.sdp, /^v=0/);

  const listenOnly = await joinWith(signedToken({ iss: DEV_KEY, sub: "lurker", room: "grant-room", exp: nowSecs() + 600,
    grants: { ...ALL_GRANTS, publish: false } }));
  assert.equal(listenOnly.m.type, "joined", JSON.stringify(listenOnly.m));
  assert.equal(listenOnly.m.grants.publish, false);
  listenOnly.s.send({ type: "offer", sdp: publishingOffer() });
  const r = await listenOnly.s.next((m) => m.type === "answer" || m.type === "error");
  assert.equal(r.type === "error" ? r.code : `an ${r.type} (${(r.sdp?.match(/a=(sendonly|recvonly|sendrecv|inactive)/) || [])[0]})`,
    "forbidden", "a sendonly audio offer from a token without the publish grant must get error forbidden");
  await listenOnly.s.roundTrip();
  assert.equal(listenOnly.s.closeInfo, null, "socket stays open after a forbidden offer");
});

test("token edge cases: no join grant → forbidden; nbf ahead → token_expired; alg none, unknown iss, no room → invalid_token", async () => {
  const base = { iss: DEV_KEY, sub: "edge", room: "edge-room", exp: nowSecs() + 600, grants: ALL_GRANTS };
  const cases = [
    ["forbidden", signedToken({ ...base, grants: { ...ALL_GRANTS, join: false } })],
    ["token_expired", signedToken({ ...base, nbf: nowSecs() + 3600 })],
    ["invalid_token", signedToken(base, { alg: "none" })],
    ["invalid_token", signedToken({ ...base, iss: "unknown-key" })],
    ["invalid_token", signedToken({ ...base, room: undefined })],
    ["invalid_token", signedToken(base, { secret: "not-the-dev-secret" })],
  ];
  for (const [code, token] of cases) {
    const s = await open();
    s.send({ type: "join", token });
    const m = await s.next((m) => m.type === "error" || m.type === "joined");
    assert.equal(m.code, code, `expected ${code} for claims ${Buffer.from(token.split(".")[1], "base64url")}: got ${JSON.stringify(m)}`);
    assert.ok(await s.closedWithin(5000), `socket closed after ${code}`);
  }
});

test("an unparsable candidate → invalid_candidate; the socket stays open", async () => {
  const { s } = await joined("Cand", "cand-room");
  s.send({ type: "candidate", candidate: { candidate: "candidate:garbage", sdpMid: "0", sdpMLineIndex: 0 } });
  await s.expectError("invalid_candidate");
  await s.roundTrip();
  assert.equal(s.closeInfo, null);
});

test("mute is broadcast as participant_updated to everyone, including the sender", async () => {
  const a = await joined("Mia", "mute-room");
  const b = await joined("Bob", "mute-room");
  await a.s.next((m) => m.type === "participant_joined" && m.participant.sid === b.joined.self.sid);
  a.s.send({ type: "mute", muted: true });
  const isMutedA = (m) => m.type === "participant_updated" && m.participant.sid === a.joined.self.sid && m.participant.muted === true;
  await a.s.next(isMutedA);
  await b.s.next(isMutedA);
});

test("reconnect: resume within the grace keeps the seat; a drop frees it after the grace", async () => {
  const obs = await joined("Obs", "grace-room");
  const { token } = await devToken(server.origin, "Rae", "grace-room");
  const first = await joinWith(token);
  assert.equal(first.m.type, "joined");
  const sid = first.m.self.sid;
  await obs.s.next((m) => m.type === "participant_joined" && m.participant.sid === sid);

  first.s.ws.terminate(); // network failure: no close frame, no leave
  await sleep(300);
  const again = await joinWith(token, { resume: true });
  assert.equal(again.m.type, "joined", JSON.stringify(again.m));
  assert.equal(again.m.resumed, true, "joined.resumed after a resume within the grace");
  assert.equal(again.m.self.sid, sid, "same sid after resume");
  await again.s.roundTrip();

  again.s.ws.terminate();
  const leftMsg = await obs.s.next((m) => m.type === "participant_left" && m.sid === sid, (GRACE_SECS + 8) * 1000);
  assert.equal(leftMsg.reason, "disconnected");
  assert.ok(!obs.s.inbox.some((m) => m.type === "participant_left" && m.sid === sid), "only one participant_left");
});

test("a second join without resume replaces the seat: the old socket gets left{replaced} and closes", async () => {
  const { token } = await devToken(server.origin, "Dup", "dup-room");
  const first = await joinWith(token);
  assert.equal(first.m.type, "joined");
  const second = await joinWith(token);
  assert.equal(second.m.type, "joined", JSON.stringify(second.m));
  assert.equal(second.m.resumed, false);
  const left = await first.s.next("left");
  assert.equal(left.reason, "replaced");
  assert.ok(await first.s.closedWithin(5000), "replaced socket closes");
  await second.s.roundTrip();
});

test("an expired token → token_expired, then the socket closes", async (t) => {
  if (expired.error) {
    t.skip(`could not mint with \`chorus token --ttl 1s\`: ${expired.error.message}`);
    return;
  }
  // exp = mint + 1 s, plus the documented 5 s leeway.
  const wait = expired.at + 7500 - Date.now();
  if (wait > 0) await sleep(wait);
  const s = await open();
  s.send({ type: "join", token: expired.token });
  await s.expectError("token_expired");
  assert.ok(await s.closedWithin(5000), "socket closed after token_expired");
});

test("the witness socket was never disturbed", async () => {
  await witness.s.roundTrip();
  const errors = witness.s.inbox.filter((m) => m.type === "error" || m.type === "left");
  assert.deepEqual(errors, [], "no error/left reached the unrelated joined socket");
  assert.equal(witness.s.closeInfo, null, "witness still open");
});
