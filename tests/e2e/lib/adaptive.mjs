// Helpers for the adaptive-stream / dynacast / bandwidth tests (adaptive.test.mjs):
// a network namespace whose downlink can be throttled with tbf, and the getStats()
// figures those tests measure (bytes per track and per simulcast layer, freezes).
import { execFileSync } from "node:child_process";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { CHROMIUM } from "./browser.mjs";

function run(cmd, args) {
  return execFileSync(cmd, args, { stdio: ["ignore", "pipe", "pipe"] }).toString();
}

/**
 * A network namespace joined to the test's own by a veth pair, and a wrapper script that
 * runs Chromium inside it (Playwright's `executablePath`). `limit(kbit)` puts a token
 * bucket (tbf: this kernel has no netem) on the host end of the veth, i.e. on everything
 * the namespace receives: the downlink of a browser in it. `lift()` takes it away.
 * Needs root (tests/e2e/run.sh runs the suite inside `unshare -n`).
 */
export function shapedNamespace({ tag = "shaped", hostIp = "10.78.0.1", peerIp = "10.78.0.2" } = {}) {
  const n = process.pid % 100000;
  const ns = `chorus-${tag}-${process.pid}`;
  const hostIf = `${tag.slice(0, 2)}${n}a`;
  const peerIf = `${tag.slice(0, 2)}${n}b`;
  let tmp = null;
  let limited = null;
  const self = {
    ns,
    hostIf,
    peerIf,
    hostIp,
    peerIp,
    wrapper: null,
    /** The downlink limit in force (kbit/s), or null. */
    get limitedKbit() {
      return limited;
    },
    setup() {
      self.teardown();
      run("ip", ["netns", "add", ns]);
      run("ip", ["link", "add", hostIf, "type", "veth", "peer", "name", peerIf]);
      run("ip", ["link", "set", peerIf, "netns", ns]);
      run("ip", ["addr", "add", `${hostIp}/24`, "dev", hostIf]);
      run("ip", ["link", "set", hostIf, "up"]);
      run("ip", ["netns", "exec", ns, "ip", "addr", "add", `${peerIp}/24`, "dev", peerIf]);
      run("ip", ["netns", "exec", ns, "ip", "link", "set", peerIf, "up"]);
      run("ip", ["netns", "exec", ns, "ip", "link", "set", "lo", "up"]);
      tmp = mkdtempSync(path.join(os.tmpdir(), `chorus-${tag}-`));
      self.wrapper = path.join(tmp, "chromium-in-netns");
      writeFileSync(self.wrapper, `#!/bin/sh\nexec ip netns exec ${ns} ${CHROMIUM} "$@"\n`);
      chmodSync(self.wrapper, 0o755);
      return self;
    },
    /** Limit what the namespace receives to `kbit` kbit/s (tbf, 16 KB burst, 100 ms queue). */
    limit(kbit, { burst = "16kb", latency = "100ms" } = {}) {
      run("tc", ["qdisc", "replace", "dev", hostIf, "root", "tbf", "rate", `${kbit}kbit`, "burst", burst, "latency", latency]);
      limited = kbit;
    },
    lift() {
      try {
        run("tc", ["qdisc", "del", "dev", hostIf, "root"]);
      } catch {
        /* no qdisc of ours */
      }
      limited = null;
    },
    /** tbf's counters while limited: {sentBytes, sentPackets, dropped, overlimits} (or null). */
    qdiscStats() {
      const out = run("tc", ["-s", "qdisc", "show", "dev", hostIf]);
      const m = out.match(/Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)/);
      return m ? { sentBytes: +m[1], sentPackets: +m[2], dropped: +m[3], overlimits: +m[4], raw: out.trim() } : null;
    },
    teardown() {
      try { run("ip", ["netns", "del", ns]); } catch { /* not there */ }
      try { run("ip", ["link", "del", hostIf]); } catch { /* went with the namespace */ }
      if (tmp) rmSync(tmp, { recursive: true, force: true });
      tmp = null;
      limited = null;
    },
  };
  return self;
}

/**
 * Inbound video by track sid: bytes, frames, size, freezes, and what the page was told
 * (`track_quality` quality and reason). Also the page's audio and transport totals.
 * @returns {Promise<{at: number, tracks: object, audioBytes: number, transportBytes: number}>}
 */
export function receiveStats(page) {
  return page.evaluate(async () => {
    const c = window.chorus;
    const out = { at: performance.now(), tracks: {}, audioBytes: 0, transportBytes: 0 };
    if (!c || !c.pc) return out;
    const stats = await c.pc.getStats();
    const byTrack = new Map([...c.remoteTracks.values()].map((t) => [t.track.id, t]));
    stats.forEach((r) => {
      if (r.type === "transport") out.transportBytes += r.bytesReceived ?? 0;
      if (r.type !== "inbound-rtp") return;
      if (r.kind === "audio") {
        out.audioBytes += (r.bytesReceived ?? 0) + (r.headerBytesReceived ?? 0);
        return;
      }
      const t = byTrack.get(r.trackIdentifier);
      if (!t) return;
      out.tracks[t.trackSid] = {
        participantSid: t.participantSid,
        source: t.source,
        bytesReceived: r.bytesReceived ?? 0,
        headerBytesReceived: r.headerBytesReceived ?? 0,
        packetsReceived: r.packetsReceived ?? 0,
        packetsLost: r.packetsLost ?? 0,
        framesDecoded: r.framesDecoded ?? 0,
        keyFramesDecoded: r.keyFramesDecoded ?? 0,
        frameWidth: r.frameWidth ?? 0,
        frameHeight: r.frameHeight ?? 0,
        freezeCount: r.freezeCount ?? 0,
        totalFreezesDuration: r.totalFreezesDuration ?? 0,
        pliCount: r.pliCount ?? 0,
        nackCount: r.nackCount ?? 0,
        quality: c.trackQuality.get(t.trackSid) ?? null,
        reason: c.trackQualityReason ? c.trackQualityReason.get(t.trackSid) ?? null : null,
      };
    });
    return out;
  });
}

/**
 * What the page sends of its own video, one row per encoding (simulcast layer):
 * {source, trackSid, rid, active, bytesSent, framesEncoded, frameWidth}, plus the SDK's
 * view of dynacast (publishedLayers) and the sender's encodings' `active` flags.
 */
export function sendStats(page) {
  return page.evaluate(async () => {
    const c = window.chorus;
    const out = { at: performance.now(), layers: [], published: {}, encodings: {} };
    if (!c || !c.pc) return out;
    const byMid = new Map();
    for (const e of c.localTracks.values()) {
      if (!e.transceiver || !e.transceiver.mid) continue;
      byMid.set(e.transceiver.mid, e);
      out.published[e.source] = e.trackSid ? c.publishedLayers(e.trackSid) : null;
      out.encodings[e.source] = (e.transceiver.sender.getParameters().encodings || [])
        .map((x) => ({ rid: x.rid ?? null, active: x.active, maxBitrate: x.maxBitrate ?? null, maxFramerate: x.maxFramerate ?? null }));
    }
    const stats = await c.pc.getStats();
    stats.forEach((r) => {
      if (r.type !== "outbound-rtp" || r.kind !== "video") return;
      const e = byMid.get(r.mid);
      out.layers.push({
        source: e ? e.source : null,
        trackSid: e ? e.trackSid : null,
        mid: r.mid,
        rid: r.rid ?? null,
        active: r.active ?? null,
        bytesSent: r.bytesSent ?? 0,
        framesEncoded: r.framesEncoded ?? 0,
        frameWidth: r.frameWidth ?? 0,
        qualityLimitationReason: r.qualityLimitationReason ?? null,
      });
    });
    return out;
  });
}

/** The kbit/s between two byte counts taken `ms` apart. */
export function kbps(bytesBefore, bytesAfter, ms) {
  return ms > 0 ? Math.round(((bytesAfter - bytesBefore) * 8) / ms) : 0;
}

/**
 * Record every `track_quality` (and `publish-layers`) the page gets from now on, in
 * `window.__adaptiveLog` (read it with qualityLog()).
 */
export function recordQualityEvents(page) {
  return page.evaluate(() => {
    const c = window.chorus;
    if (window.__adaptiveLogOf === c) return;
    window.__adaptiveLogOf = c;
    window.__adaptiveLog = [];
    c.addEventListener("track-quality", (e) => {
      window.__adaptiveLog.push({ at: performance.now(), type: "track_quality", ...e.detail });
    });
    c.addEventListener("publish-layers", (e) => {
      window.__adaptiveLog.push({ at: performance.now(), type: "publish_layers", ...e.detail });
    });
  });
}

/** The events recordQualityEvents() saw, with `at` in the page's performance.now(). */
export function qualityLog(page) {
  return page.evaluate(() => window.__adaptiveLog || []);
}

/**
 * Receive no video at all on this page (max_quality off for every remote video track,
 * now and as they come): a publisher page that must not take CPU decoding the others,
 * nor count as a viewer for dynacast.
 */
export function refuseRemoteVideo(page) {
  return page.evaluate(() => {
    const c = window.chorus;
    const off = (t) => {
      if (t.kind === "video" && c.subscriptionQuality.get(t.trackSid) !== "off") c.setTrackQuality(t.trackSid, "off");
    };
    for (const t of c.remoteTracks.values()) off(t);
    if (window.__refusesVideoOf !== c) {
      window.__refusesVideoOf = c;
      c.addEventListener("remote-track", (e) => off(e.detail));
    }
  });
}
