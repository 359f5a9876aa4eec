// Text chat over data channels (docs/protocol.md, "Text chat"): pages in one channel
// exchange messages through the web client's chat panel; order, history for late joiners,
// plain-text rendering (no HTML injection), links, rate limiting, deletion, typing
// indicators, chat through the TURN relay (TCP), across a socket resume, read-only and
// admin tokens, and history surviving a server restart (--data-dir).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { startServer, cliToken } from "./lib/server.mjs";
import { launchBrowser, newPage, fixture, joinViaUi, selectedLocalCandidate } from "./lib/browser.mjs";
import { waitFor, sleep } from "./lib/util.mjs";
import { waitChatReady, chatOf, sendChatUi, waitChatTexts } from "./lib/chat.mjs";

const ROOM = `chat-${Date.now().toString(36)}`;
const NAMES = ["Ana", "Bo", "Cy"];
const RATE_TEXT = "You're sending messages too fast — slow down.";

let server, browser;
/** The three pages of the first test, then the late joiner: {page, label, self}. */
const peers = [];
let late = null;

before(async () => {
  server = await startServer("chat");
  browser = await launchBrowser(fixture("tone-a-440.wav"));
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
});

/** Every page that takes part (for checks on "all pages"). */
const everyone = () => [...peers, ...(late ? [late] : [])];

/** Run a test body; on failure print what the pages and the server said. */
async function diag(fn, srv = server, extraPages = []) {
  try {
    await fn();
  } catch (e) {
    for (const p of [...everyone().map((x) => x.page), ...extraPages]) {
      if (p?.logs?.length) process.stderr.write(p.logs.slice(-20).join("\n") + "\n");
    }
    if (srv) process.stderr.write(`--- server log tail (${srv.logFile}) ---\n${srv.tail(50)}\n`);
    throw e;
  }
}

async function joinPeer(label, name, { query = "", origin = server.origin, room = ROOM } = {}) {
  const page = await newPage(browser, label);
  const self = await joinViaUi(page, origin, name, room, { query });
  await waitChatReady(page, label, { timeout: 25_000 });
  return { page, label, self };
}

/** Wait until every page in `who` shows exactly the same messages in the same order. */
async function waitSameChat(who, what, pred = () => true) {
  let ref = null;
  await waitFor(`all pages agree on the chat (${what})`, async () => {
    const lists = await Promise.all(who.map((p) => chatOf(p.page)));
    const keys = lists.map((l) => JSON.stringify(l.map((m) => [m.id, m.from, m.text])));
    const ok = keys.every((k) => k === keys[0]) && pred(lists[0]);
    ref = lists[0];
    return { ok, info: who.map((p, i) => `${p.label}: ${keys[i].slice(-300)}`) };
  });
  return ref;
}

test("three pages exchange messages; every page shows all of them in the same id order", () => diag(async () => {
  for (const [i, name] of NAMES.entries()) peers.push(await joinPeer(`P${i}`, name));
  // All three send at the same moment (Enter on two, the Send button on one).
  const texts = NAMES.map((n) => `hello from ${n}`);
  const own = await Promise.all(peers.map((p, i) => sendChatUi(p.page, p.label, texts[i], { click: i === 1 })));
  for (const [i, m] of own.entries()) {
    assert.equal(m.from, peers[i].self.identity, `${peers[i].label}: data-from is the sender's identity`);
    assert.equal(m.name, NAMES[i], `${peers[i].label}: the sender's name is shown`);
    assert.ok(m.own && m.hasDelete, `${peers[i].label}: own message has a delete button`);
  }
  for (const p of peers) await waitChatTexts(p.page, p.label, texts);
  const list = await waitSameChat(peers, "three greetings", (l) => l.length === 3);
  const ids = list.map((m) => m.id);
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b), "messages are shown in id order");
  assert.equal(new Set(ids).size, 3, "distinct ids");
  for (const p of peers) {
    const times = await p.page.evaluate(() =>
      [...document.querySelectorAll('[data-testid="chat-message"] [data-testid="chat-time"]')].map((t) => t.textContent.trim()));
    assert.ok(times.every((t) => /\d/.test(t)), `${p.label}: every message shows a time: ${times}`);
    // Others' messages carry no delete button for a non-admin.
    const isAdmin = await p.page.evaluate(() => !!window.chorus.grants.admin);
    if (!isAdmin) {
      const foreign = (await chatOf(p.page)).filter((m) => m.from !== p.self.identity);
      assert.ok(foreign.every((m) => !m.hasDelete), `${p.label}: no delete button on others' messages`);
    }
  }
}));

test("a page joining later sees the history", () => diag(async () => {
  const expected = await chatOf(peers[0].page);
  late = await joinPeer("P3", "Di");
  await waitFor("P3 shows the history", async () => {
    const list = await chatOf(late.page);
    const same = JSON.stringify(list.map((m) => [m.id, m.from, m.text])) ===
      JSON.stringify(expected.map((m) => [m.id, m.from, m.text]));
    return { ok: same, info: list };
  });
  const names = (await chatOf(late.page)).map((m) => m.name);
  assert.deepEqual([...names].sort(), [...NAMES].sort(), "history shows the senders' names");
}));

test("message text is rendered as text, never as HTML; http(s) links become safe <a> elements", () => diag(async () => {
  const payloads = [
    `<img src=x onerror="window.__xss=1">`,
    `<script>window.__xss=2</script>`,
    `<b>bold?</b> & "quotes" 'single' <a href="javascript:window.__xss=3">click</a>`,
    "link: https://example.org/x and javascript:window.__xss=4 and http://example.com/a?b=1&c=2.",
  ];
  for (const t of payloads) await sendChatUi(peers[0].page, "P0", t);
  await sleep(300); // give any injected handler (img onerror) a chance to run
  for (const p of everyone()) {
    await waitChatTexts(p.page, p.label, payloads);
    const r = await p.page.evaluate((payloads) => {
      const els = [...document.querySelectorAll('[data-testid="chat-message"]')];
      const byText = (t) => els.find((el) => el.querySelector('[data-testid="chat-text"]').textContent === t);
      const linkEl = byText(payloads[3]);
      return {
        xss: window.__xss,
        injected: document.querySelectorAll('[data-testid="chat-messages"] img, [data-testid="chat-messages"] script, [data-testid="chat-messages"] b').length,
        texts: payloads.map((t) => byText(t)?.querySelector('[data-testid="chat-text"]').textContent ?? null),
        nonLinkAnchors: payloads.slice(0, 3).map((t) => byText(t)?.querySelectorAll("a").length ?? -1),
        links: linkEl ? [...linkEl.querySelectorAll("a")].map((a) => ({
          href: a.getAttribute("href"), text: a.textContent, target: a.target, rel: a.rel,
        })) : null,
      };
    }, payloads);
    assert.equal(r.xss, undefined, `${p.label}: window.__xss stays undefined`);
    assert.equal(r.injected, 0, `${p.label}: no <img>/<script>/<b> elements in the chat`);
    assert.deepEqual(r.texts, payloads, `${p.label}: text content equals what was sent`);
    assert.deepEqual(r.nonLinkAnchors, [0, 0, 0], `${p.label}: no links made from markup`);
    assert.deepEqual(r.links, [
      { href: "https://example.org/x", text: "https://example.org/x", target: "_blank", rel: "noopener noreferrer" },
      { href: "http://example.com/a?b=1&c=2", text: "http://example.com/a?b=1&c=2", target: "_blank", rel: "noopener noreferrer" },
    ], `${p.label}: http(s) URLs (and only those) are links`);
  }
}));

test("typing indicator shows on the other pages while someone types, and clears on send", () => diag(async () => {
  const [a, b] = peers;
  const indicator = (p) => p.page.getByTestId("typing-indicator").textContent().then((t) => t.trim());
  await a.page.getByTestId("chat-input").click();
  await a.page.getByTestId("chat-input").pressSequentially("typing something", { delay: 30 });
  for (const p of [b, late]) {
    await waitFor(`${p.label}: "Ana is typing…"`, async () => {
      const t = await indicator(p);
      return { ok: t === "Ana is typing…", info: t };
    }, { timeout: 5000 });
  }
  assert.equal(await indicator(a), "", "the typist does not see itself typing");
  await a.page.getByTestId("chat-input").press("Enter");
  for (const p of [b, late]) {
    await waitFor(`${p.label}: indicator clears after the send`, async () => {
      const t = await indicator(p);
      return { ok: t === "", info: t };
    }, { timeout: 5000 });
  }
  await waitChatTexts(b.page, b.label, ["typing something"]);
}));

test("a participant deletes its own message: it disappears on all pages; others' messages cannot be deleted", () => diag(async () => {
  const [a, b, c] = peers;
  const m = await sendChatUi(b.page, b.label, "this will be deleted");
  for (const p of everyone()) await waitChatTexts(p.page, p.label, ["this will be deleted"]);
  const el = b.page.locator(`[data-testid="chat-message"][data-id="${m.id}"]`);
  await el.hover();
  await el.getByTestId("chat-delete").click();
  for (const p of everyone()) {
    await waitFor(`${p.label}: message ${m.id} disappears`, async () => {
      const list = await chatOf(p.page);
      return { ok: !list.some((x) => x.id === m.id), info: list.slice(-3) };
    });
  }
  // Deleting someone else's message without admin: chat_forbidden, nothing changes.
  const victim = (await chatOf(a.page)).find((x) => x.from === c.self.identity);
  assert.ok(victim, "C has a message");
  await a.page.evaluate((id) => window.chorus.deleteChat(id), victim.id);
  await waitFor("P0: chat_forbidden shown in chat-error", async () => {
    const s = await a.page.evaluate(() => {
      const e = document.querySelector('[data-testid="chat-error"]');
      return { hidden: e.hidden, code: e.dataset.code, text: e.textContent };
    });
    return { ok: !s.hidden && s.code === "chat_forbidden", info: s };
  });
  await sleep(500);
  for (const p of everyone()) {
    assert.ok((await chatOf(p.page)).some((x) => x.id === victim.id), `${p.label}: C's message is still there`);
  }
}));

test("30 messages at once: the rate-limit error shows, the first ones arrive everywhere", () => diag(async () => {
  const c = peers[2];
  await sleep(2500); // let C's token bucket refill (5/s, burst 10)
  await c.page.evaluate(() => {
    const input = document.querySelector('[data-testid="chat-input"]');
    const send = document.querySelector('[data-testid="chat-send"]');
    for (let i = 0; i < 30; i++) {
      input.value = `burst ${i}`;
      send.click();
    }
  });
  await waitFor("P2: rate-limit error shown in chat-error", async () => {
    const s = await c.page.evaluate(() => {
      const e = document.querySelector('[data-testid="chat-error"]');
      return { hidden: e.hidden, code: e.dataset.code, text: e.textContent.trim() };
    });
    return { ok: !s.hidden && s.text === RATE_TEXT, info: s };
  }, { timeout: 5000 });
  const first = Array.from({ length: 10 }, (_, i) => `burst ${i}`);
  for (const p of everyone()) await waitChatTexts(p.page, p.label, first);
  await sleep(1000);
  const list = await waitSameChat(everyone(), "after the burst");
  const burst = list.filter((m) => /^burst \d+$/.test(m.text)).map((m) => Number(m.text.slice(6)));
  assert.ok(burst.length >= 10 && burst.length < 30, `between 10 and 29 of the burst arrived: ${burst}`);
  assert.deepEqual(burst, [...burst].sort((x, y) => x - y), "burst messages arrive in send order");
  assert.ok(list.filter((m) => /^burst /.test(m.text)).every((m) => m.from === c.self.identity));
  await c.page.getByTestId("chat-input").fill("");
}));

test("chat keeps working across a socket resume (no renegotiation)", () => diag(async () => {
  const [a, b] = peers;
  await b.page.evaluate(() => {
    window.__dc = window.chorus.chatChannel;
    window.__pc = window.chorus.pc;
    window.__joins = [];
    window.chorus.addEventListener("joined", (e) => window.__joins.push(e.detail.resumed));
    window.chorus.simulateNetworkDrop();
  });
  await waitFor("P1 joined again with resumed: true", async () => {
    const j = await b.page.evaluate(() => window.__joins);
    return { ok: j.length >= 1, info: j };
  });
  const s = await b.page.evaluate(() => ({
    joins: window.__joins,
    samePc: window.__pc === window.chorus.pc,
    sameDc: window.__dc === window.chorus.chatChannel,
    dcState: window.chorus.chatChannel && window.chorus.chatChannel.readyState,
  }));
  assert.deepEqual(s, { joins: [true], samePc: true, sameDc: true, dcState: "open" });
  await sleep(2500); // rate limit headroom for A after the earlier tests
  await sendChatUi(b.page, b.label, "after resume from Bo");
  await sendChatUi(a.page, a.label, "after resume to Bo");
  for (const p of everyone()) await waitChatTexts(p.page, p.label, ["after resume from Bo", "after resume to Bo"]);
}));

test("chat through the TURN relay over TCP (?relay=tcp) sends and receives", () => diag(async () => {
  const t = await joinPeer("T", "Tess", { query: "?relay=tcp" });
  try {
    await waitFor("T: selected pair is a relay candidate over TCP", async () => {
      const local = await selectedLocalCandidate(t.page);
      return { ok: local?.candidateType === "relay" && local?.relayProtocol === "tcp", info: local };
    }, { timeout: 20_000 });
    const history = await chatOf(peers[0].page);
    await waitFor("T shows the history", async () => {
      const list = await chatOf(t.page);
      return { ok: history.every((h) => list.some((m) => m.id === h.id && m.text === h.text)), info: list.length };
    });
    await sendChatUi(t.page, t.label, "hello through the relay", { timeout: 20_000 });
    for (const p of everyone()) await waitChatTexts(p.page, p.label, ["hello through the relay"]);
    await sendChatUi(peers[0].page, "P0", "hello relay user");
    await waitChatTexts(t.page, t.label, ["hello relay user"]);
  } finally {
    await t.page.context().close();
  }
}));

test("a token without publish_data reads the chat but cannot send", () => diag(async () => {
  let token;
  try {
    token = cliToken(["--room", ROOM, "--identity", "reader", "--name", "Rae", "--no-publish-data"]);
  } catch (e) {
    process.stderr.write(`# skipping: could not mint a --no-publish-data token: ${e.message}\n`);
    return;
  }
  const page = await newPage(browser, "R");
  try {
    await page.goto(`${server.origin}/?token=${encodeURIComponent(token)}`);
    await page.getByTestId("join-button").click();
    await page.locator('[data-testid="participant"][data-self="true"]').waitFor({ timeout: 15_000 });
    await waitChatReady(page, "R", { canSend: false });
    assert.equal(await page.getByTestId("chat-input").isDisabled(), true, "input disabled");
    assert.equal(await page.getByTestId("chat-send").isDisabled(), true, "send disabled");
    assert.equal(await page.getByTestId("chat-hint").isVisible(), true, "a hint explains why");
    const expected = (await chatOf(peers[0].page)).map((m) => m.text);
    await waitChatTexts(page, "R", expected);
    await sendChatUi(peers[0].page, "P0", "for the reader too");
    await waitChatTexts(page, "R", ["for the reader too"]);
    // The server refuses a send that bypasses the UI.
    await page.evaluate(() => window.chorus.sendChat("sneaky"));
    await waitFor("R: chat_forbidden shown", async () => {
      const code = await page.getByTestId("chat-error").getAttribute("data-code");
      return { ok: code === "chat_forbidden", info: code };
    });
    await sleep(500);
    assert.ok(!(await chatOf(peers[0].page)).some((m) => m.text === "sneaky"), "nothing was delivered");
  } catch (e) {
    process.stderr.write(page.logs.slice(-20).join("\n") + "\n");
    throw e;
  } finally {
    await page.context().close();
  }
}));

test("an admin token can delete anyone's message", () => diag(async () => {
  let token;
  try {
    token = cliToken(["--room", ROOM, "--identity", "mod", "--name", "Mo", "--admin"]);
  } catch (e) {
    process.stderr.write(`# skipping: could not mint an --admin token: ${e.message}\n`);
    return;
  }
  const page = await newPage(browser, "M");
  try {
    await page.goto(`${server.origin}/?token=${encodeURIComponent(token)}`);
    await page.getByTestId("join-button").click();
    await page.locator('[data-testid="participant"][data-self="true"]').waitFor({ timeout: 15_000 });
    await waitChatReady(page, "M");
    const target = await sendChatUi(peers[2].page, "P2", "moderate me");
    await waitChatTexts(page, "M", ["moderate me"]);
    const list = await chatOf(page);
    assert.ok(list.every((m) => m.hasDelete), "an admin sees delete buttons on every message");
    const el = page.locator(`[data-testid="chat-message"][data-id="${target.id}"]`);
    await el.hover();
    await el.getByTestId("chat-delete").click();
    for (const p of everyone()) {
      await waitFor(`${p.label}: moderated message disappears`, async () => {
        const l = await chatOf(p.page);
        return { ok: !l.some((m) => m.id === target.id), info: l.slice(-3) };
      });
    }
  } catch (e) {
    process.stderr.write(page.logs.slice(-20).join("\n") + "\n");
    throw e;
  } finally {
    await page.context().close();
  }
}));

test("history survives a server restart with the same --data-dir", async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "chorus-chat-"));
  const room = `persist-${Date.now().toString(36)}`;
  let srv = null;
  const pages = [];
  try {
    srv = await startServer("chat-restart-1", { extraArgs: ["--data-dir", dir] });
    const texts = ["persist one", "persist two <b>x</b>", "persist three https://example.org/p"];
    let sent;
    await diag(async () => {
      const a = await newPage(browser, "S1");
      pages.push(a);
      await joinViaUi(a, srv.origin, "Sam", room);
      await waitChatReady(a, "S1");
      for (const t of texts) await sendChatUi(a, "S1", t);
      sent = (await chatOf(a)).map((m) => [m.id, m.from, m.text]);
      await a.context().close();
    }, srv, pages);
    await srv.stop();

    srv = await startServer("chat-restart-2", { extraArgs: ["--data-dir", dir] });
    await diag(async () => {
      const b = await newPage(browser, "S2");
      pages.push(b);
      await joinViaUi(b, srv.origin, "Tom", room);
      await waitChatReady(b, "S2");
      await waitFor("S2 shows the history from before the restart", async () => {
        const list = (await chatOf(b)).map((m) => [m.id, m.from, m.text]);
        return { ok: JSON.stringify(list) === JSON.stringify(sent), info: { list, sent } };
      });
      // New ids keep increasing after the restart.
      const m = await sendChatUi(b, "S2", "after restart");
      assert.ok(m.id > sent[sent.length - 1][0], `id ${m.id} follows ${sent[sent.length - 1][0]}`);
    }, srv, pages);
  } finally {
    await Promise.allSettled(pages.map((p) => p.context().close()));
    await srv?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
