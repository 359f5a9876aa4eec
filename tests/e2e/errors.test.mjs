// Error paths of the client protocol (docs/protocol.md "Errors"), from node over /ws.
// A joined "witness" socket must keep being served throughout.
import { test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { startServer, devToken, cliToken } from "./lib/server.mjs";
import { Sock } from "./lib/socket.mjs";
import { sleep } from "./lib/util.mjs";

let server, witness, expired;
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

before(async () => {
  server = await startServer("errors");
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
  s.send({ type: "join", token, protocol: 2 });
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
