// The native headless client (chorus-cli) and a Chromium page in one channel: the page
// hears the CLI's 1 kHz tone (inbound level and an AnalyserNode peak at 1 kHz), and the
// CLI's recording holds the page's 440 Hz tone (Goertzel). The page also has its camera
// on: the CLI (an audio-only, protocol 1 client) joins a room with video and simply
// does not get it.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { startServer, chorusBin } from "./lib/server.mjs";
import { launchBrowser, newPage, fixture, joinViaUi, inboundAudio, participantsOf } from "./lib/browser.mjs";
import { waitFor } from "./lib/util.mjs";

const ROOM = `native-${Date.now().toString(36)}`;
let server, browser, page, tmp, cli, cliDone;

function cliBin() {
  const p = process.env.CHORUS_CLI_BIN || path.join(path.dirname(chorusBin()), "chorus-cli");
  if (!existsSync(p)) throw new Error(`chorus-cli not found at ${p}: cargo build --release --workspace --bins`);
  return p;
}

before(async () => {
  server = await startServer("native");
  tmp = mkdtempSync(path.join(os.tmpdir(), "chorus-native-"));
  browser = await launchBrowser(fixture("tone-a-440.wav"));
  page = await newPage(browser, "web");
});

after(async () => {
  if (cli && cli.exitCode === null) cli.kill("SIGINT");
  await Promise.allSettled([browser?.close()]);
  await server?.stop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

async function diag(fn) {
  try {
    await fn();
  } catch (e) {
    if (page?.logs?.length) process.stderr.write(page.logs.slice(-30).join("\n") + "\n");
    if (cli) process.stderr.write(`--- chorus-cli stderr ---\n${cli.errText}\n`);
    if (server) process.stderr.write(`--- server log tail ---\n${server.tail(40)}\n`);
    throw e;
  }
}

/** 16-bit mono PCM samples of a WAV file (walks the chunks; no library). */
function readWav(file) {
  const b = readFileSync(file);
  assert.equal(b.toString("ascii", 0, 4), "RIFF");
  let off = 12;
  let rate = 0;
  while (off + 8 <= b.length) {
    const id = b.toString("ascii", off, off + 4);
    const len = b.readUInt32LE(off + 4);
    if (id === "fmt ") rate = b.readUInt32LE(off + 12);
    if (id === "data") {
      const n = Math.floor(Math.min(len, b.length - off - 8) / 2);
      const s = new Float64Array(n);
      for (let i = 0; i < n; i++) s[i] = b.readInt16LE(off + 8 + 2 * i) / 32768;
      return { rate, samples: s };
    }
    off += 8 + len + (len % 2);
  }
  throw new Error(`${file}: no data chunk`);
}

/** Amplitude (dBFS) of `hz` in `x` by the Goertzel algorithm. */
function goertzelDb(x, hz, rate) {
  const w = (2 * Math.PI * hz) / rate;
  const c = 2 * Math.cos(w);
  let s1 = 0, s2 = 0;
  for (const v of x) {
    const s0 = v + c * s1 - s2;
    s2 = s1;
    s1 = s0;
  }
  const p = s1 * s1 + s2 * s2 - c * s1 * s2;
  return 20 * Math.log10(Math.max((2 * Math.sqrt(Math.max(p, 0))) / x.length, 1e-10));
}

test("a browser with its camera on and chorus-cli hear each other", () => diag(async () => {
  const me = await joinViaUi(page, server.origin, "Web", ROOM);
  await page.getByTestId("camera-button").click();
  await waitFor("the page publishes its camera", async () => {
    const tracks = await page.evaluate(() => window.chorus.self.tracks || []);
    return { ok: tracks.some((t) => t.source === "camera"), info: tracks };
  }, { timeout: 15_000 });
  const out = path.join(tmp, "heard.wav");
  cli = spawn(cliBin(), [
    "--url", server.origin, "--name", "Cli", "--room", ROOM,
    "--tone", "1000", "--output", out, "--duration", "10s", "--stats", "json",
  ]);
  cli.errText = "";
  let stdout = "";
  cli.stdout.on("data", (d) => (stdout += d));
  cli.stderr.on("data", (d) => (cli.errText += d));
  cliDone = new Promise((resolve) => cli.on("exit", (code) => resolve(code)));

  // The page lists the CLI, receives Opus from it with a level…
  const cliEntry = await waitFor("the page lists the CLI participant", async () => {
    const list = await participantsOf(page);
    const c = list.find((p) => p.identity !== me.identity);
    return { ok: !!c, info: c || list };
  });
  await waitFor("the page receives audible Opus from the CLI", async () => {
    const rows = await inboundAudio(page);
    const r = rows.find((x) => x.sid === cliEntry.sid);
    return { ok: !!r && r.packetsReceived > 50 && r.audioLevel > 0.01 && /opus/i.test(r.mimeType || ""), info: rows };
  }, { timeout: 20_000 });

  // …and the tone's frequency is what it hears: an AnalyserNode on the remote stream.
  const spectrum = await page.evaluate(async (sid) => {
    const stream = window.chorus.remoteStreams.get(sid);
    const ctx = new AudioContext({ sampleRate: 48000 });
    await ctx.resume();
    const src = ctx.createMediaStreamSource(stream);
    const an = ctx.createAnalyser();
    an.fftSize = 4096;
    src.connect(an);
    const bins = new Float32Array(an.frequencyBinCount);
    const acc = new Float64Array(an.frequencyBinCount);
    for (let i = 0; i < 10; i++) {
      await new Promise((r) => setTimeout(r, 100));
      an.getFloatFrequencyData(bins);
      for (let k = 0; k < bins.length; k++) acc[k] += Math.pow(10, bins[k] / 10);
    }
    const hz = (k) => (k * ctx.sampleRate) / an.fftSize;
    let peak = 1;
    for (let k = 1; k < acc.length; k++) if (acc[k] > acc[peak]) peak = k;
    const at = (f) => 10 * Math.log10(acc[Math.round((f * an.fftSize) / ctx.sampleRate)] / 10 + 1e-30);
    await ctx.close();
    return { peakHz: hz(peak), db1000: at(1000), db440: at(440) };
  }, cliEntry.sid);
  assert.ok(Math.abs(spectrum.peakHz - 1000) < 30, `the page's spectrum peaks at 1 kHz: ${JSON.stringify(spectrum)}`);
  assert.ok(spectrum.db1000 > spectrum.db440 + 20, `1 kHz dominates: ${JSON.stringify(spectrum)}`);

  // The CLI's recording holds the page's 440 Hz tone.
  const code = await cliDone;
  assert.equal(code, 0, `chorus-cli exit code (stderr: ${cli.errText})`);
  const report = JSON.parse(stdout);
  const fromWeb = report.streams.find((s) => s.sid === me.sid);
  assert.ok(fromWeb && fromWeb.packets > 100, `CLI received the page's audio: ${stdout}`);
  assert.equal(report.streams.filter((s) => s.sid === me.sid).length, 1,
    `one (audio) stream from the page, its camera not offered to the CLI: ${stdout}`);
  const { rate, samples } = readWav(out);
  assert.equal(rate, 48000);
  // Use the last 3 s, when the page's stream is certainly flowing.
  const tail = samples.subarray(Math.max(0, samples.length - 3 * rate));
  const at440 = goertzelDb(tail, 440, rate);
  const at1000 = goertzelDb(tail, 1000, rate);
  assert.ok(at440 > -20, `440 Hz present in the CLI's recording: ${at440.toFixed(1)} dB`);
  assert.ok(at440 > at1000 + 20, `and dominant: 440 Hz ${at440.toFixed(1)} dB vs 1 kHz ${at1000.toFixed(1)} dB`);
}));
