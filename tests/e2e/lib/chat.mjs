// Helpers for the text chat tests (the web client's chat panel, data-testids chat-*).
import { waitFor } from "./util.mjs";

/** Wait until the page's chat channel is open and the input accepts text. */
export async function waitChatReady(page, label, { timeout = 20_000, canSend = true } = {}) {
  return waitFor(`${label}: chat ready`, async () => {
    const s = await page.evaluate(() => ({
      ready: !!(window.chorus && window.chorus.chatReady),
      inputDisabled: document.querySelector('[data-testid="chat-input"]').disabled,
    }));
    return { ok: s.ready && (!canSend || !s.inputDisabled), info: s };
  }, { timeout });
}

/** The rendered chat messages, in DOM order. */
export function chatOf(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="chat-message"]')].map((el) => ({
      id: Number(el.dataset.id),
      from: el.dataset.from,
      own: el.dataset.own === "true",
      name: el.querySelector('[data-testid="chat-from"]')?.textContent ?? null,
      text: el.querySelector('[data-testid="chat-text"]')?.textContent ?? null,
      hasDelete: !!el.querySelector('[data-testid="chat-delete"]'),
      renderedAt: Number(el.dataset.renderedAt),
    })),
  );
}

/**
 * Type `text` into the chat input and send it (Enter, or a click on Send), then wait for
 * the server's copy to show on this page. Returns that message as chatOf() describes it.
 */
export async function sendChatUi(page, label, text, { click = false, timeout = 10_000 } = {}) {
  const self = await page.evaluate(() => window.chorus.self.identity);
  const before = new Set((await chatOf(page)).map((m) => m.id));
  const input = page.getByTestId("chat-input");
  await input.fill(text);
  if (click) await page.getByTestId("chat-send").click();
  else await input.press("Enter");
  try {
    return await waitFor(`${label}: own message ${JSON.stringify(text.slice(0, 40))} shown`, async () => {
      const list = await chatOf(page);
      const m = list.find((x) => !before.has(x.id) && x.from === self && x.text === text);
      return { ok: !!m, info: m || list.slice(-3) };
    }, { timeout });
  } catch (e) {
    e.message += `; chat state: ${JSON.stringify(await chatDiag(page).catch((x) => String(x)))}`;
    throw e;
  }
}

/** The page's chat channel state, data channel stats and shown chat error (diagnostics). */
export function chatDiag(page) {
  return page.evaluate(async () => {
    const c = window.chorus;
    const dc = c && c.chatChannel;
    const err = document.querySelector('[data-testid="chat-error"]');
    const stats = [];
    if (c && c.pc) {
      (await c.pc.getStats()).forEach((r) => {
        if (r.type === "data-channel") {
          stats.push({ label: r.label, state: r.state, sent: r.messagesSent, received: r.messagesReceived });
        }
      });
    }
    return {
      chatReady: !!(c && c.chatReady),
      dc: dc ? { state: dc.readyState, buffered: dc.bufferedAmount } : null,
      pc: c && c.pc ? c.pc.connectionState : null,
      error: err && !err.hidden ? { code: err.dataset.code, text: err.textContent } : null,
      input: document.querySelector('[data-testid="chat-input"]').value.slice(0, 60),
      stats,
    };
  });
}

/** Wait until `page` shows a message with each of `texts`; returns the chat list. */
export function waitChatTexts(page, label, texts, { timeout = 10_000 } = {}) {
  return waitFor(`${label}: messages ${JSON.stringify(texts).slice(0, 120)} shown`, async () => {
    const list = await chatOf(page);
    const have = new Set(list.map((m) => m.text));
    const missing = texts.filter((t) => !have.has(t));
    return { ok: missing.length === 0, info: { missing, last: list.slice(-5) } };
  }, { timeout });
}
