#!/usr/bin/env node
// Join-to-first-audio measurement (not a test). A page in browser A talks in a channel;
// 5 times, a fresh page in browser B joins through the UI and we measure, in the page,
// the time from WebSocket open (window.chorus.timings.wsOpen) to the first inbound audio
// packet (getStats polled every 10 ms until packetsReceived > 0).
//
//   CHORUS_BIN=target/release/chorus node tests/e2e/measure-join.mjs [runs]
// (run tests/e2e/run.sh once first: it installs playwright-core and makes the fixtures)
import { startServer } from "./lib/server.mjs";
import { launchBrowser, newPage, fixture, joinViaUi } from "./lib/browser.mjs";
import { waitFor, median } from "./lib/util.mjs";

const RUNS = Number(process.argv[2] || 5);
const ROOM = `measure-${Date.now().toString(36)}`;

const server = await startServer("measure-join");
const [browserA, browserB] = await Promise.all([
  launchBrowser(fixture("tone-a-440.wav")),
  launchBrowser(fixture("tone-b-880.wav")),
]);
try {
  const talker = await newPage(browserA, "talker");
  await joinViaUi(talker, server.origin, "Talker", ROOM);
  await waitFor("the talker's media to connect", async () => {
    const s = await talker.evaluate(() => window.chorus.pc && window.chorus.pc.connectionState);
    return { ok: s === "connected", info: s };
  });
  const results = [];
  for (let i = 0; i < RUNS; i++) {
    const page = await newPage(browserB, `listener${i}`);
    await page.goto(server.origin + "/");
    await page.getByTestId("join-name").fill(`Listener ${i}`);
    await page.getByTestId("join-room").fill(ROOM);
    // Start the in-page poller before clicking so that nothing is missed.
    const measured = page.evaluate(async () => {
      const deadline = performance.now() + 20_000;
      while (performance.now() < deadline) {
        const c = window.chorus;
        if (c && c.pc) {
          let got = false;
          (await c.pc.getStats()).forEach((r) => {
            if (r.type === "inbound-rtp" && r.kind === "audio" && r.packetsReceived > 0) got = true;
          });
          if (got) {
            const now = performance.now();
            return { ms: now - c.timings.wsOpen, timings: { ...c.timings, firstPacket: now } };
          }
        }
        await new Promise((r) => setTimeout(r, 10));
      }
      return { ms: null, timings: window.chorus && window.chorus.timings };
    });
    await page.getByTestId("join-button").click();
    const r = await measured;
    if (r.ms == null) throw new Error(`run ${i + 1}: no inbound audio within 20 s; timings ${JSON.stringify(r.timings)}`);
    const t = r.timings;
    const rel = (k) => (t[k] != null ? `${k}=${(t[k] - t.wsOpen).toFixed(0)}` : null);
    console.log(`run ${i + 1}: ${r.ms.toFixed(1)} ms  (${["joined", "micReady", "offerSent", "answer", "mediaConnected", "firstTrack"]
      .map(rel).filter(Boolean).join(" ")} ms after ws open)`);
    results.push(r.ms);
    await page.getByTestId("leave-button").click();
    await page.context().close();
  }
  console.log(`median join-to-first-audio over ${results.length} runs: ${median(results).toFixed(1)} ms`);
} finally {
  await Promise.allSettled([browserA.close(), browserB.close()]);
  await server.stop();
}
