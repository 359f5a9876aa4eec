// Start and stop a `chorus dev` server for one test file.
import { spawn, execFileSync } from "node:child_process";
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const E2E_DIR = path.resolve(here, "..");
export const REPO_ROOT = path.resolve(E2E_DIR, "..", "..");
export const LOG_DIR = path.join(E2E_DIR, "logs");

export function chorusBin() {
  const bin = process.env.CHORUS_BIN || path.join(REPO_ROOT, "target", "release", "chorus");
  if (!existsSync(bin)) {
    throw new Error(`chorus binary not found at ${bin}: build it (cargo build --release) or set CHORUS_BIN`);
  }
  return bin;
}

/**
 * Spawn `chorus dev` on loopback with ephemeral ports and wait for the URL it prints.
 * @returns {Promise<{url: string, origin: string, wsUrl: string, proc, logFile: string, stop: () => Promise<void>, tail: (n?: number) => string}>}
 */
export async function startServer(name = "server", { timeoutMs = 30_000, extraArgs = [], host = "127.0.0.1" } = {}) {
  const bin = chorusBin();
  mkdirSync(LOG_DIR, { recursive: true });
  const logFile = path.join(LOG_DIR, `${name}.log`);
  const log = createWriteStream(logFile);
  const args = [
    "dev",
    // `host`: another address than loopback when a browser in another network
    // namespace must reach the page and the SFU (the lossy-link test).
    "--listen", `${host}:0`,
    "--media-listen", `${host}:0`,
    "--control-listen", "127.0.0.1:0",
    "--turn-listen", "127.0.0.1:0",
    ...extraArgs,
  ];
  log.write(`$ ${bin} ${args.join(" ")}\n`);
  // Persistent state (chat history) goes to a throwaway directory unless the caller picks
  // one (`chorus dev` would otherwise create ./chorus-data in the working directory).
  const env = { ...process.env };
  let tmpData = null;
  if (!extraArgs.includes("--data-dir") && !env.CHORUS_DATA_DIR) {
    tmpData = mkdtempSync(path.join(os.tmpdir(), `chorus-e2e-${name}-`));
    env.CHORUS_DATA_DIR = tmpData;
  }
  const proc = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"], env });
  const lines = [];
  let exited = null;
  const exitPromise = new Promise((resolve) => {
    proc.on("exit", (code, signal) => {
      exited = { code, signal };
      if (tmpData) rmSync(tmpData, { recursive: true, force: true });
      log.write(`\n[process exited: code=${code} signal=${signal}]\n`);
      resolve(exited);
    });
  });

  const url = await new Promise((resolve, reject) => {
    let fallback = null;
    let fallbackTimer = null;
    const timer = setTimeout(() => {
      reject(new Error(`chorus dev printed no URL within ${timeoutMs} ms; output:\n${lines.slice(-40).join("\n")}`));
    }, timeoutMs);
    const done = (u) => {
      clearTimeout(timer);
      clearTimeout(fallbackTimer);
      resolve(u);
    };
    const onLine = (line) => {
      lines.push(line);
      const m = line.match(/(https?:\/\/[^\s]+)/);
      if (!m) return;
      const u = m[1].replace(/[),.;'"`]+$/, "");
      // Prefer the "Open http://… in two browser tabs" line; accept any other URL line
      // if no such line follows shortly.
      if (/\bopen\b/i.test(line)) done(u);
      else if (!fallback) {
        fallback = u;
        fallbackTimer = setTimeout(() => done(fallback), 1500);
      }
    };
    for (const stream of [proc.stdout, proc.stderr]) {
      let buf = "";
      stream.on("data", (chunk) => {
        log.write(chunk);
        buf += chunk.toString();
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          onLine(buf.slice(0, i));
          buf = buf.slice(i + 1);
        }
      });
    }
    proc.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    exitPromise.then((ex) => {
      clearTimeout(timer);
      reject(new Error(`chorus dev exited early (${JSON.stringify(ex)}); output:\n${lines.slice(-40).join("\n")}`));
    });
  });

  const origin = new URL(url).origin;
  const wsUrl = origin.replace(/^http/, "ws") + "/ws";
  return {
    url,
    origin,
    wsUrl,
    proc,
    logFile,
    tail(n = 60) {
      try {
        return readFileSync(logFile, "utf8").split("\n").slice(-n).join("\n");
      } catch {
        return "";
      }
    },
    async stop() {
      if (exited) return;
      proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await exitPromise;
      clearTimeout(t);
      log.end();
    },
  };
}

/** POST /dev/token. */
export async function devToken(origin, name, room) {
  const res = await fetch(`${origin}/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name, room }),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`POST /dev/token -> ${res.status}: ${text}`);
  return JSON.parse(text);
}

/** `chorus token ...`; the token is the last non-empty line of stdout. */
export function cliToken(args) {
  const out = execFileSync(chorusBin(), ["token", ...args], { encoding: "utf8", timeout: 15_000 });
  const lines = out.split("\n").map((l) => l.trim()).filter(Boolean);
  return lines[lines.length - 1];
}
