// Helpers for the video tests: getStats() rows of inbound/outbound video, attributed to
// Chorus track sids through the SDK's remote track map, and the grid's tiles.
import { waitFor } from "./util.mjs";

/**
 * One row per inbound-rtp video stream: the track sid and participant it belongs to
 * (window.chorus.remoteTracks maps receiver tracks to track sids), decode counters and
 * the codec. `quality` is the last `track_quality` the page got for that track.
 */
export function inboundVideo(page) {
  return page.evaluate(async () => {
    const c = window.chorus;
    if (!c || !c.pc) return [];
    const stats = await c.pc.getStats();
    const byTrack = new Map([...c.remoteTracks.values()].map((t) => [t.track.id, t]));
    const rows = [];
    stats.forEach((r) => {
      if (r.type !== "inbound-rtp" || r.kind !== "video") return;
      const codec = r.codecId ? stats.get(r.codecId) : undefined;
      const t = byTrack.get(r.trackIdentifier);
      rows.push({
        trackSid: t ? t.trackSid : null,
        participantSid: t ? t.participantSid : null,
        source: t ? t.source : null,
        mid: r.mid,
        ssrc: r.ssrc,
        packetsReceived: r.packetsReceived ?? 0,
        packetsLost: r.packetsLost ?? 0,
        framesReceived: r.framesReceived ?? 0,
        framesDecoded: r.framesDecoded ?? 0,
        keyFramesDecoded: r.keyFramesDecoded ?? 0,
        framesDropped: r.framesDropped ?? 0,
        frameWidth: r.frameWidth ?? 0,
        frameHeight: r.frameHeight ?? 0,
        freezeCount: r.freezeCount ?? 0,
        totalFreezesDuration: r.totalFreezesDuration ?? 0,
        pliCount: r.pliCount ?? 0,
        firCount: r.firCount ?? 0,
        nackCount: r.nackCount ?? 0,
        mimeType: codec ? codec.mimeType : null,
        quality: t ? c.trackQuality.get(t.trackSid) ?? null : null,
      });
    });
    return rows;
  });
}

/** One row per outbound-rtp video stream (a simulcast layer each): what the page sends. */
export function outboundVideo(page) {
  return page.evaluate(async () => {
    const c = window.chorus;
    if (!c || !c.pc) return [];
    const stats = await c.pc.getStats();
    const rows = [];
    stats.forEach((r) => {
      if (r.type !== "outbound-rtp" || r.kind !== "video") return;
      const codec = r.codecId ? stats.get(r.codecId) : undefined;
      rows.push({
        mid: r.mid,
        rid: r.rid ?? null,
        active: r.active,
        frameWidth: r.frameWidth ?? 0,
        frameHeight: r.frameHeight ?? 0,
        framesEncoded: r.framesEncoded ?? 0,
        keyFramesEncoded: r.keyFramesEncoded ?? 0,
        targetBitrate: r.targetBitrate ?? null,
        qualityLimitationReason: r.qualityLimitationReason ?? null,
        pliCount: r.pliCount ?? 0,
        nackCount: r.nackCount ?? 0,
        mimeType: codec ? codec.mimeType : null,
      });
    });
    stats.forEach((r) => {
      if (r.type === "candidate-pair" && r.nominated) {
        rows.push({ availableOutgoingBitrate: r.availableOutgoingBitrate ?? null });
      }
    });
    return rows;
  });
}

/** The video tiles of the grid and the stage, as plain objects. */
export function tilesOf(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="video-tile"]')].map((el) => {
      const v = el.querySelector("video");
      const badge = el.querySelector('[data-testid="quality-badge"]');
      return {
        sid: el.dataset.sid,
        source: el.dataset.source,
        self: el.dataset.self === "true",
        trackSid: el.dataset.trackSid || null,
        onStage: !!el.closest('[data-testid="video-stage"]'),
        badge: badge ? badge.textContent.trim() : null,
        name: el.querySelector(".tile-name")?.textContent ?? null,
        speaking: el.dataset.speaking,
        muted: el.dataset.muted,
        hasStream: !!(v && v.srcObject),
        videoWidth: v ? v.videoWidth : 0,
        playing: !!(v && !v.paused),
        autoplay: !!(v && v.autoplay),
        videoMuted: !!(v && v.muted),
        playsInline: !!(v && v.playsInline),
      };
    }),
  );
}

/** The track sid `sid` publishes from `source`, per this page's participant info. */
export function trackSidOf(page, sid, source) {
  return page.evaluate(([sid, source]) => {
    const c = window.chorus;
    if (!c) return null;
    const p = c.self && c.self.sid === sid ? c.self : c.participants.get(sid);
    const t = p && Array.isArray(p.tracks) ? p.tracks.find((x) => x.source === source) : null;
    return t ? t.sid : null;
  }, [sid, source]);
}

/** The track info ({sid, kind, source, codec, layers, …}) `sid` publishes from `source`. */
export function trackInfoOf(page, sid, source) {
  return page.evaluate(([sid, source]) => {
    const c = window.chorus;
    const p = c.self && c.self.sid === sid ? c.self : c.participants.get(sid);
    return (p && Array.isArray(p.tracks) ? p.tracks.find((x) => x.source === source) : null) || null;
  }, [sid, source]);
}

/** Wait until `page` shows a tile for (sid, source), optionally matching `pred`. */
export function waitTile(page, label, sid, source, pred = () => true, opts = {}) {
  return waitFor(`${label}: a ${source} tile for sid ${sid}`, async () => {
    const tiles = await tilesOf(page);
    const t = tiles.find((x) => x.sid === sid && x.source === source);
    return { ok: !!t && pred(t), info: t ? { tile: t } : tiles };
  }, opts);
}

/** Wait until `page` shows no tile for (sid, source). */
export function waitNoTile(page, label, sid, source, opts = {}) {
  return waitFor(`${label}: no ${source} tile for sid ${sid}`, async () => {
    const tiles = await tilesOf(page);
    return { ok: !tiles.some((x) => x.sid === sid && x.source === source), info: tiles };
  }, opts);
}

/** Wait until `page` decodes `sid`'s `source` track with a row matching `pred`; returns it. */
export async function waitDecoding(page, label, sid, source, what, pred, opts = {}) {
  return waitFor(`${label}: inbound ${source} video of sid ${sid} ${what}`, async () => {
    const trackSid = await trackSidOf(page, sid, source);
    const rows = await inboundVideo(page);
    const row = trackSid ? rows.find((r) => r.trackSid === trackSid) : null;
    return { ok: !!row && pred(row), info: row ? { row } : { trackSid, rows } };
  }, opts);
}

/** Wait until framesDecoded of `trackSid` grew by at least `n` (the picture moves). */
export async function waitFramesGrow(page, label, trackSid, n = 10, opts = {}) {
  let first = null;
  return waitFor(`${label}: framesDecoded of ${trackSid} grows by ${n}`, async () => {
    const row = (await inboundVideo(page)).find((r) => r.trackSid === trackSid);
    if (!row) return { ok: false, info: "no inbound row" };
    if (first === null) first = row.framesDecoded;
    return { ok: row.framesDecoded - first >= n, info: { first, row } };
  }, opts);
}

/** Everything useful about a page's video state, for failure messages. */
export async function videoDiag(page) {
  const state = await page.evaluate(() => {
    const c = window.chorus;
    if (!c) return { chorus: null };
    return {
      self: c.self ? { sid: c.self.sid, tracks: c.self.tracks } : null,
      participants: [...c.participants.values()].map((p) => ({ sid: p.sid, name: p.name, tracks: p.tracks })),
      signalingState: c.pc ? c.pc.signalingState : null,
      connectionState: c.pc ? c.pc.connectionState : null,
      ownOfferPending: c._ownOfferPending,
      needsOffer: c._needsOffer,
      ignoredOffers: c.timings.ignoredOffers || 0,
      transceivers: c.pc ? c.pc.getTransceivers().map((t) => ({
        mid: t.mid, direction: t.direction, currentDirection: t.currentDirection,
        kind: t.receiver.track.kind, sending: !!t.sender.track,
      })) : [],
      remoteMids: [...c._remoteMids.entries()],
      remoteTracks: [...c.remoteTracks.values()].map((t) => ({ trackSid: t.trackSid, participantSid: t.participantSid, source: t.source, mid: t.mid })),
      trackQuality: [...c.trackQuality.entries()],
      localTracks: [...c.localTracks.values()].map((e) => ({ source: e.source, state: e.state, trackSid: e.trackSid, readyState: e.track.readyState })),
      error: (() => {
        const el = document.querySelector('[data-testid="error-message"]');
        return el && !el.hidden ? el.textContent : null;
      })(),
    };
  }).catch((e) => ({ evaluateFailed: String(e) }));
  const [inbound, outbound, tiles] = await Promise.all([
    inboundVideo(page).catch((e) => String(e)),
    outboundVideo(page).catch((e) => String(e)),
    tilesOf(page).catch((e) => String(e)),
  ]);
  return { ...state, inbound, outbound, tiles };
}
