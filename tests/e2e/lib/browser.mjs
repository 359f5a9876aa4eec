// Chromium (Debian's /usr/bin/chromium) driven by playwright-core, with a WAV file as mic.
import { chromium } from "playwright-core";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { E2E_DIR, REPO_ROOT } from "./server.mjs";

export const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
export const FIXTURES = path.join(E2E_DIR, "fixtures");

export function fixture(name) {
  const f = path.join(FIXTURES, name);
  if (!existsSync(f)) throw new Error(`missing fixture ${f}: run tests/e2e/run.sh (it generates them with sox)`);
  return f;
}

/**
 * One browser process per fake microphone: Chromium reads the capture file per process.
 * Playwright gives every launch a fresh temporary profile (--user-data-dir).
 */
export async function launchBrowser(wavFile, { executablePath = CHROMIUM, args = [] } = {}) {
  if (!existsSync(CHROMIUM)) throw new Error(`Chromium not found at ${CHROMIUM}`);
  return chromium.launch({
    // A wrapper script here runs Chromium inside a network namespace of the test's own
    // (`ip netns exec NS chromium "$@"`); Playwright talks to it over a pipe.
    executablePath,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--allow-loopback-in-peer-connection",
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${wavFile}`,
      "--autoplay-policy=no-user-gesture-required",
      // Pages served by E2E_WEB_FROM_DISK count as non-local: let them reach loopback.
      ...(process.env.E2E_WEB_FROM_DISK ? ["--disable-features=LocalNetworkAccessChecks"] : []),
      ...args,
    ],
  });
}

/** A new page that records console output and page errors (printed on demand). */
export async function newPage(browser, label) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.logs = [];
  page.on("console", (m) => page.logs.push(`[${label} console.${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => {
    page.logs.push(`[${label} pageerror] ${e.message}`);
    process.stderr.write(`[${label} pageerror] ${e.stack || e.message}\n`);
  });
  if (process.env.E2E_WEB_FROM_DISK) {
    // The server embeds clients/web at build time; this serves the files on disk instead,
    // to iterate on the web client without rebuilding the server.
    const types = { html: "text/html", js: "text/javascript", css: "text/css" };
    await context.route(/\/(index\.html|app\.js|chorus-sdk\.js|style\.css)?(\?.*)?$/, (route) => {
      const url = new URL(route.request().url());
      if (url.pathname.startsWith("/dev/") || url.pathname.startsWith("/ws")) return route.fallback();
      const file = url.pathname === "/" ? "index.html" : url.pathname.slice(1);
      const body = readFileSync(path.join(REPO_ROOT, "clients", "web", file));
      return route.fulfill({ status: 200, contentType: types[file.split(".").pop()], body });
    });
  }
  if (process.env.E2E_VERBOSE) {
    page.on("console", (m) => process.stderr.write(`[${label} console.${m.type()}] ${m.text()}\n`));
  }
  return page;
}

/** Join through the UI: type name + channel, click join, wait for our own entry. */
export async function joinViaUi(page, origin, name, room, { timeout = 15_000, query = "" } = {}) {
  await page.goto(origin + "/" + query);
  await page.getByTestId("join-name").fill(name);
  await page.getByTestId("join-room").fill(room);
  await page.getByTestId("join-button").click();
  await page.locator('[data-testid="participant"][data-self="true"]').waitFor({ timeout });
  return page.evaluate(() => ({ ...window.chorus.self }));
}

/**
 * Inbound audio stats, one row per inbound-rtp, attributed to the remote participant
 * sid through the track → remote stream (`p<sid>`) mapping the SDK keeps.
 */
export function inboundAudio(page) {
  return page.evaluate(async () => {
    const c = window.chorus;
    if (!c || !c.pc) return [];
    const stats = await c.pc.getStats();
    const rows = [];
    stats.forEach((r) => {
      if (r.type !== "inbound-rtp" || r.kind !== "audio") return;
      const codec = r.codecId ? stats.get(r.codecId) : undefined;
      let sid = null;
      for (const [s, stream] of c.remoteStreams) {
        if (stream.getTracks().some((t) => t.id === r.trackIdentifier)) sid = s;
      }
      rows.push({
        sid,
        ssrc: r.ssrc,
        mid: r.mid,
        trackIdentifier: r.trackIdentifier,
        packetsReceived: r.packetsReceived ?? 0,
        audioLevel: r.audioLevel ?? 0,
        mimeType: codec ? codec.mimeType : null,
      });
    });
    return rows;
  });
}

/** The participant entries of the list, as plain objects. */
export function participantsOf(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="participant"]')].map((el) => ({
      identity: el.dataset.identity,
      sid: el.dataset.sid,
      speaking: el.dataset.speaking,
      muted: el.dataset.muted,
      self: el.dataset.self,
      text: el.textContent.trim(),
    })),
  );
}

/** The selected ICE candidate pair's local candidate, as getStats() reports it. */
export function selectedLocalCandidate(page) {
  return page.evaluate(async () => {
    const stats = await window.chorus.pc.getStats();
    let pair = null;
    stats.forEach((r) => {
      if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
    });
    if (!pair) {
      stats.forEach((r) => {
        if (r.type === "candidate-pair" && r.state === "succeeded" && r.nominated) pair = r;
      });
    }
    if (!pair) return null;
    const local = stats.get(pair.localCandidateId);
    return local ? { candidateType: local.candidateType, relayProtocol: local.relayProtocol ?? null, protocol: local.protocol } : null;
  });
}
