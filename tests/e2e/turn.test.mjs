// Media through our own TURN relay: two pages that may only use relay candidates
// (iceTransportPolicy "relay") join one channel and hear each other, once with the relay
// reached over UDP and once over TCP. getStats() must show a relay candidate of that
// protocol on the selected pair.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startServer } from "./lib/server.mjs";
import { launchBrowser, newPage, fixture, joinViaUi, inboundAudio, selectedLocalCandidate } from "./lib/browser.mjs";
import { waitFor } from "./lib/util.mjs";

let server, browserA, browserB;

before(async () => {
  server = await startServer("turn");
  [browserA, browserB] = await Promise.all([
    launchBrowser(fixture("tone-a-440.wav")),
    launchBrowser(fixture("tone-b-880.wav")),
  ]);
});

after(async () => {
  await Promise.allSettled([browserA?.close(), browserB?.close()]);
  await server?.stop();
});

for (const transport of ["udp", "tcp"]) {
  test(`relay-only pages hear each other through our TURN relay over ${transport}`, async () => {
    const room = `relay-${transport}-${Date.now().toString(36)}`;
    const pageA = await newPage(browserA, `A-${transport}`);
    const pageB = await newPage(browserB, `B-${transport}`);
    try {
      const a = await joinViaUi(pageA, server.origin, "ana", room, { query: `?relay=${transport}` });
      const b = await joinViaUi(pageB, server.origin, "bo", room, { query: `?relay=${transport}` });
      for (const [page, label, other] of [[pageA, "A", b.sid], [pageB, "B", a.sid]]) {
        await waitFor(`${label} hears ${other} through the relay`, async () => {
          const rows = await inboundAudio(page);
          const row = rows.find((r) => r.sid === other);
          return { ok: !!row && row.packetsReceived > 20 && row.audioLevel > 0.01, info: rows };
        }, { timeout: 25_000 });
        const local = await selectedLocalCandidate(page);
        assert.equal(local?.candidateType, "relay", `${label}: selected pair ${JSON.stringify(local)}`);
        assert.equal(local?.relayProtocol, transport, `${label}: relay reached over ${transport}`);
      }
    } catch (e) {
      for (const p of [pageA, pageB]) process.stderr.write((p.logs || []).slice(-30).join("\n") + "\n");
      process.stderr.write(`--- server log tail ---\n${server.tail(40)}\n`);
      throw e;
    } finally {
      await Promise.allSettled([pageA.context().close(), pageB.context().close()]);
    }
  });
}
