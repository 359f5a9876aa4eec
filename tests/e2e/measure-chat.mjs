#!/usr/bin/env node
// Chat send-to-render latency (not a test). Two pages join one channel; page A sends N
// messages one at a time through the SDK (window.chorus.sendChat, which records
// performance.now() in chatTimings), and each is awaited until page B has rendered it
// (data-rendered-at on B's message element). Latency = B's render time - A's send time,
// both converted to wall-clock with performance.timeOrigin (same machine, same clock).
// Sends are paced (default 210 ms apart) to stay under the server's 5 msg/s chat limit.
//
//   CHORUS_BIN=target/release/chorus node tests/e2e/measure-chat.mjs [count] [paceMs]
// (run tests/e2e/run.sh once first: it installs playwright-core and makes the fixtures;
// inside a network namespace as run.sh does: unshare -n sh -c 'ip link set lo up && node …')
import { startServer } from "./lib/server.mjs";
import { launchBrowser, newPage, fixture, joinViaUi } from "./lib/browser.mjs";
import { median } from "./lib/util.mjs";
import { waitChatReady } from "./lib/chat.mjs";

const COUNT = Number(process.argv[2] || 100);
const PACE_MS = Number(process.argv[3] || 210);
const ROOM = `measure-chat-${Date.now().toString(36)}`;

function percentile(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
}

const server = await startServer("measure-chat");
const [browserA, browserB] = await Promise.all([
  launchBrowser(fixture("tone-a-440.wav")),
  launchBrowser(fixture("tone-b-880.wav")),
]);
try {
  const a = await newPage(browserA, "A");
  const b = await newPage(browserB, "B");
  await joinViaUi(a, server.origin, "Sender", ROOM);
  await joinViaUi(b, server.origin, "Receiver", ROOM);
  await waitChatReady(a, "A");
  await waitChatReady(b, "B");
  const originA = await a.evaluate(() => performance.timeOrigin);
  const originB = await b.evaluate(() => performance.timeOrigin);
  const lat = [];
  let errors = 0;
  for (let i = 0; i < COUNT; i++) {
    const text = `measure ${i} ${Math.random().toString(36).slice(2, 8)}`;
    const started = Date.now();
    // Arm the watcher on B first, then send on A.
    const rendered = b.evaluate((text) => new Promise((resolve) => {
      const find = () => [...document.querySelectorAll('[data-testid="chat-message"]')]
        .find((el) => el.querySelector('[data-testid="chat-text"]').textContent === text);
      const done = (el) => resolve(Number(el.dataset.renderedAt));
      const now = find();
      if (now) return done(now);
      const obs = new MutationObserver(() => {
        const el = find();
        if (el) {
          obs.disconnect();
          clearTimeout(t);
          done(el);
        }
      });
      const t = setTimeout(() => {
        obs.disconnect();
        resolve(null);
      }, 10_000);
      obs.observe(document.querySelector('[data-testid="chat-messages"]'), { childList: true });
    }), text);
    const sentAt = await a.evaluate((text) => {
      const ref = window.chorus.sendChat(text);
      return window.chorus.chatTimings.get(ref);
    }, text);
    const renderedAt = await rendered;
    if (renderedAt == null || sentAt == null) {
      errors++;
      console.log(`message ${i}: not rendered on B within 10 s`);
    } else {
      lat.push(originB + renderedAt - (originA + sentAt));
    }
    const wait = PACE_MS - (Date.now() - started);
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
  if (!lat.length) throw new Error("no message was rendered");
  const fmt = (x) => x.toFixed(2);
  console.log(`chat send→render latency over ${lat.length} messages (${errors} lost): ` +
    `median ${fmt(median(lat))} ms, p95 ${fmt(percentile(lat, 95))} ms, ` +
    `min ${fmt(Math.min(...lat))} ms, max ${fmt(Math.max(...lat))} ms`);
} finally {
  await Promise.allSettled([browserA.close(), browserB.close()]);
  await server.stop();
}
