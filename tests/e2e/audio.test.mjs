// Speech then silence as a fake microphone, with server-side noise suppression on: the
// other page's speaking indicator for the talker lights during speech and goes dark in
// the silence, and the (re-encoded) audio still plays.
import { test, before, after } from "node:test";
import { startServer } from "./lib/server.mjs";
import { launchBrowser, newPage, fixture, joinViaUi, inboundAudio } from "./lib/browser.mjs";
import { waitFor } from "./lib/util.mjs";

const ROOM = `audio-${Date.now().toString(36)}`;
let server, talkerBrowser, listenerBrowser, talker, listener, talkerSelf;

before(async () => {
  server = await startServer("audio");
  talkerBrowser = await launchBrowser(fixture("speech-then-silence.wav"));
  // A silent microphone, so the talker is the only one who can be the main speaker.
  listenerBrowser = await launchBrowser(fixture("silence.wav"));
  talker = await newPage(talkerBrowser, "talker");
  listener = await newPage(listenerBrowser, "listener");
});

after(async () => {
  await Promise.allSettled([talkerBrowser?.close(), listenerBrowser?.close()]);
  await server?.stop();
});

const speakingOf = (page, identity) =>
  page.evaluate(
    (id) => document.querySelector(`[data-testid="participant"][data-identity="${id}"]`)?.dataset.speaking ?? null,
    identity,
  );

test("the speaking indicator follows speech and silence with server noise suppression on", async () => {
  talkerSelf = await joinViaUi(talker, server.origin, "talker", ROOM);
  // Turned on live, after joining: the server starts denoising this publisher.
  await talker.getByTestId("enhance-toggle").check();
  await joinViaUi(listener, server.origin, "listener", ROOM);

  // The listener hears the talker (through the server's re-encoder).
  await waitFor("listener hears the talker", async () => {
    const rows = await inboundAudio(listener);
    const row = rows.find((r) => r.sid === talkerSelf.sid);
    return { ok: !!row && row.packetsReceived > 50 && row.mimeType === "audio/opus", info: rows };
  }, { timeout: 20_000 });

  // Over the looping file (about 5 s of speech, 4 s of silence) the indicator must
  // turn on, then off, then on again.
  const seen = [];
  await waitFor("speaking on → off → on", async () => {
    const v = await speakingOf(listener, talkerSelf.identity);
    if (v !== null && seen[seen.length - 1] !== v) seen.push(v);
    const s = seen.join(",");
    return { ok: s.includes("true,false,true"), info: seen };
  }, { timeout: 30_000, interval: 50 });
  // The only talker is the room's dominant speaker.
  await waitFor("the talker is marked as the dominant speaker", async () => {
    const d = await listener.evaluate(
      (id) => document.querySelector(`[data-testid="participant"][data-identity="${id}"]`)?.dataset.dominant,
      talkerSelf.identity,
    );
    return { ok: d === "true", info: d };
  });
});
