// Three people in one channel: each page hears both others (one inbound Opus stream per
// remote participant), and the list shows all three.
import { test, before, after } from "node:test";
import { startServer } from "./lib/server.mjs";
import { launchBrowser, newPage, fixture, joinViaUi, inboundAudio, participantsOf } from "./lib/browser.mjs";
import { waitFor } from "./lib/util.mjs";

const ROOM = `room3-${Date.now().toString(36)}`;
const TONES = ["tone-a-440.wav", "tone-b-880.wav", "tone-c-660.wav"];
let server;
const browsers = [];
const pages = [];
const selves = [];

before(async () => {
  server = await startServer("room");
  for (const t of TONES) browsers.push(await launchBrowser(fixture(t)));
  for (const [i, b] of browsers.entries()) pages.push(await newPage(b, `P${i}`));
});

after(async () => {
  await Promise.allSettled(browsers.map((b) => b.close()));
  await server?.stop();
});

test("three pages join one channel and each hears the other two", async () => {
  for (const [i, p] of pages.entries()) selves.push(await joinViaUi(p, server.origin, `p${i}`, ROOM));
  for (const [i, p] of pages.entries()) {
    await waitFor(`page ${i} lists three participants`, async () => {
      const list = await participantsOf(p);
      return { ok: list.length === 3, info: list };
    });
    const others = selves.filter((_, j) => j !== i).map((s) => s.sid);
    await waitFor(`page ${i} hears ${others.join(" and ")}`, async () => {
      const rows = await inboundAudio(p);
      const ok = others.every((sid) =>
        rows.some((r) => r.sid === sid && r.packetsReceived > 20 && r.mimeType === "audio/opus" && r.audioLevel > 0.01),
      );
      return { ok, info: rows };
    }, { timeout: 20_000 });
  }
});
