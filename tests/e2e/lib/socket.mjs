// A small protocol-level client over the `ws` package, for error-path tests.
import WebSocket from "ws";

export class Sock {
  static async open(url) {
    const s = new Sock(url);
    await s.opened;
    return s;
  }

  constructor(url) {
    this.ws = new WebSocket(url, { maxPayload: 4 * 1024 * 1024 });
    this.inbox = [];
    this.waiters = [];
    this.closeInfo = null;
    this.opened = new Promise((resolve, reject) => {
      this.ws.once("open", resolve);
      this.ws.once("error", reject);
    });
    this.closed = new Promise((resolve) => {
      this.ws.on("close", (code, reason) => {
        this.closeInfo = { code, reason: reason.toString() };
        resolve(this.closeInfo);
        this._pump();
      });
    });
    this.ws.on("error", () => {});
    this.ws.on("message", (data, isBinary) => {
      let msg;
      try {
        msg = JSON.parse(data.toString());
      } catch {
        msg = { type: "__unparsable__", raw: data.toString().slice(0, 200), isBinary };
      }
      this.inbox.push(msg);
      this._pump();
    });
  }

  send(obj) {
    this.ws.send(typeof obj === "string" || Buffer.isBuffer(obj) ? obj : JSON.stringify(obj));
  }

  /** Next message matching `pred` (a type string or a function); earlier ones stay queued. */
  next(pred, timeout = 5000) {
    const match = typeof pred === "string" ? (m) => m.type === pred : pred;
    const i = this.inbox.findIndex(match);
    if (i >= 0) return Promise.resolve(this.inbox.splice(i, 1)[0]);
    return new Promise((resolve, reject) => {
      const w = { match, resolve, reject };
      w.timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`no message matching ${typeof pred === "string" ? pred : "predicate"} within ${timeout} ms; ` +
          `queued: ${JSON.stringify(this.inbox).slice(0, 500)}; closed: ${JSON.stringify(this.closeInfo)}`));
      }, timeout);
      this.waiters.push(w);
      this._pump();
    });
  }

  _pump() {
    for (const w of [...this.waiters]) {
      const i = this.inbox.findIndex(w.match);
      if (i >= 0) {
        const [m] = this.inbox.splice(i, 1);
        clearTimeout(w.timer);
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(m);
      } else if (this.closeInfo) {
        clearTimeout(w.timer);
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.reject(new Error(`socket closed (${JSON.stringify(this.closeInfo)}) before a matching message; ` +
          `queued: ${JSON.stringify(this.inbox).slice(0, 500)}`));
      }
    }
  }

  /** Expect an `error` with `code`. */
  async expectError(code, timeout = 5000) {
    const m = await this.next((m) => m.type === "error", timeout);
    if (m.code !== code) throw new Error(`expected error ${code}, got ${JSON.stringify(m)}`);
    if (typeof m.message !== "string") throw new Error(`error without a message string: ${JSON.stringify(m)}`);
    return m;
  }

  /** ping → pong with the same ts. */
  async roundTrip(timeout = 5000) {
    const ts = Math.floor(Math.random() * 1e9) + 1;
    this.send({ type: "ping", ts });
    const m = await this.next((m) => m.type === "pong" && m.ts === ts, timeout);
    return m;
  }

  /** Resolves with the close info if the socket closes within `timeout`, else null. */
  async closedWithin(timeout = 5000) {
    return Promise.race([this.closed, new Promise((r) => setTimeout(() => r(null), timeout))]);
  }

  close() {
    try {
      this.ws.close();
    } catch {}
  }
}
