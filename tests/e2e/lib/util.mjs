export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Poll `check` until it reports success. `check` returns `{ok, info}` (or a boolean);
 * on timeout the error names what we waited for and the last observed `info`.
 */
export async function waitFor(what, check, { timeout = 15_000, interval = 100 } = {}) {
  const start = Date.now();
  let last;
  for (;;) {
    try {
      const r = await check();
      last = typeof r === "object" && r !== null && "ok" in r ? r : { ok: !!r, info: r };
      if (last.ok) return last.info;
    } catch (e) {
      last = { ok: false, info: `threw: ${e && e.message ? e.message : e}` };
    }
    if (Date.now() - start > timeout) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}; last observed: ${fmt(last.info)}`);
    }
    await sleep(interval);
  }
}

export function fmt(v) {
  if (typeof v === "string") return v;
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
