// The kiosk page in real headless Chromium against a real mosquitto (WebSockets listener) and the
// real daemon. Started by tests/test_kiosk.py, which passes the setup in KIOSK_E2E (JSON) and
// performs what this script asks for on stdout ("@@{"do": ...}"), answering on stdin.
// A scripted "fake node" on the same broker sends a fixed Markdown reply (with duplicated and
// reordered messages) so that rendering is checked exactly; the real daemon is used for
// streaming, cancel, offline and reconnection. Screenshots go to cfg.artifacts.

import { createRequire } from 'node:module';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import readline from 'node:readline';

const require = createRequire(new URL('../../deploy/kiosk/package.json', import.meta.url));
const { chromium } = require('playwright-core');
const mqtt = require('mqtt');

const cfg = JSON.parse(process.env.KIOSK_E2E);
mkdirSync(cfg.artifacts, { recursive: true });
const SIZES = { small: { width: 800, height: 480 }, large: { width: 1920, height: 1080 } };
const T = cfg.timeout_ms; // generous: the model shares 2 cores with everything else

const stdin = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function control(action) {
  process.stdout.write(`@@${JSON.stringify({ do: action })}\n`);
  const { value } = await stdin.next();
  const answer = JSON.parse(value);
  if (!answer.ok) throw new Error(`${action} failed: ${answer.error}`);
}

function log(...args) {
  process.stdout.write(`${args.join(' ')}\n`);
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// A spy on the broker that records what kiosks publish, and a scripted node.

const SCRIPT = [
  '# Kiosk rendering check',
  '',
  'A short list:',
  '',
  '- first item',
  '- second item with `inline code`',
  '- 第三项：中文文本',
  '',
  '| Language | Greeting |',
  '| --- | --- |',
  '| English | Hello |',
  '| 中文 | 你好，世界 |',
  '',
  '```python',
  'def greet(name: str) -> str:',
  '    return f"Hello, {name}!"',
  '```',
  '',
  '```html',
  '<b onclick="window.__xss=4">bold</b>',
  '```',
  '',
  '```',
  'SELECT name FROM users WHERE id = 1;',
  '```',
  '',
  'Raw HTML stays text: <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>',
  '',
  'See [the manual](javascript:window.__xss=3) for more.',
  '',
  '这是一段中文说明，用于检查中文字体的显示效果。',
  '',
  'Emoji: 😀 👍 🎉',
].join('\n');
const CODE = 'def greet(name: str) -> str:\n    return f"Hello, {name}!"';
const LONG_REPLY = (() => {
  const part = (i) => [
    `## Part ${i}\n\nThe quick brown fox jumps over the lazy dog, and **then** it \`runs\` away. 敏捷的棕色狐狸跳过了懒狗。\n\n`,
    '- first point about something\n- second point with *emphasis*\n- third\n\n',
    `\`\`\`python\ndef f${i}(x):\n    return [i * i for i in range(x) if i % 2]\n\`\`\`\n\n`,
    `| a | b |\n|---|---|\n| ${i} | ${i * 2} |\n\n`,
  ].join('');
  let text = '';
  for (let i = 1; text.length < 8500; i++) text += part(i);
  return text;
})();

function connectMqtt(clientId) {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(cfg.mqtt_url, { protocolVersion: 5, clientId, reconnectPeriod: 500 });
    c.once('connect', () => resolve(c));
    c.once('error', reject);
  });
}

const spy = { requests: [], cancels: [] };
const fake = { pid: 4242, requests: 0 };

async function startSpyAndFakeNode() {
  const s = await connectMqtt(`spy-${process.pid}`);
  s.on('message', (topic, payload, packet) => {
    const entry = { topic, qos: packet.qos, body: JSON.parse(payload.toString()) };
    if (topic.includes('/cancel/')) spy.cancels.push(entry);
    else spy.requests.push(entry);
  });
  await s.subscribeAsync([`${cfg.prefix}/+/request/+`, `${cfg.prefix}/+/cancel/+`], { qos: 1 });

  const f = await connectMqtt(`fake-${process.pid}`);
  const base = `${cfg.prefix}/${cfg.fake_node}`;
  const status = { state: 'online', node: cfg.fake_node, model: 'scripted-reply', version: 'test', protocol: 1, slots: 1, pid: fake.pid };
  await f.publishAsync(`${base}/status`, JSON.stringify(status), { qos: 1, retain: true });
  f.on('message', async (topic, payload, packet) => {
    const client = topic.split('/').pop();
    const req = JSON.parse(payload.toString());
    fake.requests += 1;
    // As the node does: the MQTT 5 response topic (the page's inbox) if the request has one.
    const replyTopic = packet.properties?.responseTopic ?? `${base}/reply/${client}/${req.conversation_id}`;
    const rid = req.request_id;
    const send = (m) => f.publishAsync(replyTopic, JSON.stringify({ request_id: rid, ...m }), { qos: 1 });
    const startMsg = { type: 'start', seq: 0, node: cfg.fake_node, model: 'scripted-reply' };
    // Faults, chosen by the question.
    if (req.message === 'busy?') {
      await send({ type: 'error', seq: 0, code: 'busy', message: 'all slots are busy; retry later' });
      return;
    }
    if (req.message === 'too large?') {
      // What the node does with an unreadable request: an error with a null request_id.
      await f.publishAsync(`${base}/error/${client}`, JSON.stringify({ type: 'error', request_id: null, seq: 0, code: 'too_large', message: 'payload too large' }), { qos: 1 });
      return;
    }
    if (req.message === 'restart?') {
      // The node process dies mid-reply and a new one comes online: the reply will never end.
      await send(startMsg);
      await send({ type: 'chunk', seq: 1, text: 'Half a rep' });
      await sleep(300);
      fake.pid += 1;
      await f.publishAsync(`${base}/status`, JSON.stringify({ ...status, pid: fake.pid }), { qos: 1, retain: true });
      await sleep(300);
      await send({ type: 'chunk', seq: 2, text: 'LATE' });
      return;
    }
    if (req.message === 'long?') {
      // A long reply (about 2,000 tokens of Markdown) in 1,500 chunks, fast.
      const chars = [...LONG_REPLY];
      const size = Math.ceil(chars.length / 1500);
      let seq = 0;
      await send({ ...startMsg, seq: seq++ });
      for (let i = 0; i < chars.length; i += size) {
        await send({ type: 'chunk', seq: seq++, text: chars.slice(i, i + size).join('') });
        await sleep(4); // 200 chunks/s or so: faster than a Pi generates
      }
      await send({ type: 'done', seq, finish_reason: 'length', usage: {}, timings: {} });
      return;
    }
    if (req.message === 'silence?') {
      await send(startMsg);
      return;
    }
    const msgs = [{ type: 'start', request_id: rid, seq: 0, node: cfg.fake_node, model: 'scripted-reply' }];
    const chars = [...SCRIPT];
    for (let i = 0; i < chars.length; i += 7) {
      msgs.push({ type: 'chunk', request_id: rid, seq: msgs.length, text: chars.slice(i, i + 7).join('') });
    }
    msgs.push({ type: 'done', request_id: rid, seq: msgs.length, finish_reason: 'stop', usage: {}, timings: {} });
    // What QoS 1 and reconnects may do: every 5th message twice, pairs swapped now and then.
    const wire = [];
    for (let i = 0; i < msgs.length; i++) {
      if (i % 10 === 3 && i + 1 < msgs.length - 1) {
        wire.push(msgs[i + 1], msgs[i]);
        i += 1;
      } else wire.push(msgs[i]);
      if (i % 5 === 2) wire.push(msgs[i]);
    }
    for (const m of wire) {
      await f.publishAsync(replyTopic, JSON.stringify(m), { qos: 1 });
      await sleep(25);
    }
  });
  await f.subscribeAsync(`${base}/request/+`, { qos: 1 });
  return [s, f];
}

// ---------------------------------------------------------------------------------------------
// Page helpers.

let browser;

// `query`: the page's URL (only node and lang count there); `config`: settings written into the
// served config.json (over cfg.config) before the page loads it.
async function openPage(size, query, { touch = false, url = cfg.page_url, config = {} } = {}) {
  writeFileSync(join(cfg.www, 'config.json'), JSON.stringify({ ...cfg.config, ...config }));
  const context = await browser.newContext({ viewport: SIZES[size], hasTouch: touch, deviceScaleFactor: 1 });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/WebSocket connection|ERR_CONNECTION_REFUSED|config\.json/.test(m.text())) errors.push(m.text());
  });
  page.errors = errors;
  // The kiosk has no internet: everything the page loads must come from the kiosk's own server.
  page.external = [];
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (!['data:', 'blob:'].includes(u.protocol) && u.hostname !== '127.0.0.1') page.external.push(r.url());
  });
  await page.goto(`${url}?${new URLSearchParams(query)}`);
  // Record every change of the newest reply and of the body's link/node state, with the time.
  await page.evaluate(() => {
    window.__seen = [];
    window.__states = [];
    const last = () => [...document.querySelectorAll('.msg.assistant')].pop();
    new MutationObserver(() => {
      const el = last();
      if (!el) return;
      window.__seen.push({
        id: el.dataset.requestId,
        state: el.dataset.state,
        chunks: Number(el.dataset.chunks || 0),
        len: el.querySelector('.body').textContent.length,
        caret: !!el.querySelector('.caret'),
      });
    }).observe(document.getElementById('log'), { subtree: true, childList: true, characterData: true, attributes: true });
    new MutationObserver(() => window.__states.push(`${document.body.dataset.link}/${document.body.dataset.node}`)).observe(
      document.body, { attributes: true },
    );
  });
  return page;
}

async function waitState(page, link, node, timeout = T) {
  await page.waitForFunction(([l, n]) => document.body.dataset.link === l && document.body.dataset.node === n, [link, node], { timeout });
}

async function ask(page, text, { touch = false } = {}) {
  await page.fill('#input', text);
  if (touch) await page.tap('#send');
  else await page.press('#input', 'Enter');
  await page.waitForFunction(() => document.querySelector('.msg.assistant:last-of-type') !== null);
  return page.evaluate(() => [...document.querySelectorAll('.msg.assistant')].pop().dataset.requestId);
}

async function waitFinal(page, requestId, timeout = T) {
  const handle = await page.waitForFunction(
    (id) => {
      const el = document.querySelector(`.msg.assistant[data-request-id="${id}"]`);
      return el && ['done', 'error', 'interrupted'].includes(el.dataset.state) ? { state: el.dataset.state, finish: el.dataset.finish || null, chunks: Number(el.dataset.chunks), text: el.querySelector('.body').textContent, note: el.querySelector('.note').textContent } : null;
    },
    requestId,
    { timeout, polling: 50 },
  );
  return handle.jsonValue();
}

/** What the page showed of one reply before it ended: distinct lengths of text while streaming. */
async function streamedBeforeDone(page, requestId) {
  const seen = await page.evaluate((id) => window.__seen.filter((s) => s.id === id), requestId);
  const streaming = seen.filter((s) => s.state === 'streaming' && s.len > 0);
  return { lengths: [...new Set(streaming.map((s) => s.len))], caret: streaming.some((s) => s.caret), total: seen.length };
}

async function shot(page, name) {
  await page.screenshot({ path: join(cfg.artifacts, `${name}.png`) });
  log('screenshot', name);
}

// ---------------------------------------------------------------------------------------------
// The scenario.

const steps = [];
const figures = {};
async function step(name, fn) {
  const t0 = Date.now();
  await fn();
  steps.push(name);
  log(`ok ${name} (${Date.now() - t0} ms)`);
}

async function checkRendering(page, size) {
  const rid = await ask(page, 'Show me what you can render.', { touch: size === 'small' });
  if (size === 'large') {
    // Mid-stream: the finished blocks and the growing one, with the caret.
    await page.waitForFunction((id) => Number(document.querySelector(`.msg.assistant[data-request-id="${id}"]`)?.dataset.chunks) >= 40, rid, { timeout: T, polling: 10 });
    await shot(page, 'markdown-streaming-1920x1080');
  }
  const result = await waitFinal(page, rid);
  check(result.state === 'done' && result.finish === 'stop', `scripted reply ended ${JSON.stringify(result)}`);
  const streamed = await streamedBeforeDone(page, rid);
  check(streamed.lengths.length >= 5, `text grew while streaming (lengths ${streamed.lengths})`);
  check(streamed.caret, 'a caret shows while the reply streams');
  const dom = await page.evaluate((id) => {
    const body = document.querySelector(`.msg.assistant[data-request-id="${id}"] .body`);
    const texts = (sel) => [...body.querySelectorAll(sel)].map((e) => e.textContent);
    return {
      h1: texts('h1'),
      li: texts('ul > li'),
      th: texts('th'),
      td: texts('td'),
      code: texts('pre code'),
      keywords: texts('pre code .hljs-keyword'),
      htmlTags: texts('pre code .hljs-tag'),
      strings: texts('pre code .hljs-string'),
      lang: texts('.code-lang'),
      paragraphs: texts('p'),
      inlineCode: texts('li code'),
      dangerous: body.querySelectorAll('img, script, a, iframe, b, [onerror], [onclick]').length,
      links: body.querySelectorAll('a, .link').length,
      linkColour: (() => {
        const p = [...body.querySelectorAll('p')].find((e) => e.textContent.startsWith('See the manual'));
        return getComputedStyle(p).color === getComputedStyle(body).color && [...p.querySelectorAll('*')].every((e) => getComputedStyle(e).color === getComputedStyle(body).color);
      })(),
      caret: body.querySelectorAll('.caret').length,
      // Emoji drawn with the font of the reply's text: a colour emoji font gives coloured pixels,
      // a missing one an empty box (grey outline) or nothing.
      emojiColour: (() => {
        const p = [...body.querySelectorAll('p')].find((e) => e.textContent.startsWith('Emoji:'));
        return ['😀', '👍', '🎉'].map((emoji) => {
          const canvas = document.createElement('canvas');
          canvas.width = 64;
          canvas.height = 64;
          const g = canvas.getContext('2d');
          g.font = `48px ${getComputedStyle(p).fontFamily}`;
          g.fillStyle = '#ffffff';
          g.fillText(emoji, 0, 52);
          const d = g.getImageData(0, 0, 64, 64).data;
          let coloured = 0;
          for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 128 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) coloured += 1;
          return coloured;
        });
      })(),
      xss: window.__xss ?? null,
      fontSize: parseFloat(getComputedStyle(body).fontSize),
      scrolledToEnd: (() => {
        const log = document.getElementById('log');
        return log.scrollHeight - log.scrollTop - log.clientHeight < 4;
      })(),
    };
  }, rid);
  check(JSON.stringify(dom.h1) === JSON.stringify(['Kiosk rendering check']), `heading ${JSON.stringify(dom.h1)}`);
  check(JSON.stringify(dom.li) === JSON.stringify(['first item', 'second item with inline code', '第三项：中文文本']), `list ${JSON.stringify(dom.li)}`);
  check(JSON.stringify(dom.inlineCode) === JSON.stringify(['inline code']), 'inline code');
  check(JSON.stringify(dom.th) === JSON.stringify(['Language', 'Greeting']), `table head ${JSON.stringify(dom.th)}`);
  check(JSON.stringify(dom.td) === JSON.stringify(['English', 'Hello', '中文', '你好，世界']), `table cells ${JSON.stringify(dom.td)}`);
  check(dom.code.length === 3 && dom.code[0] === CODE, `code block ${JSON.stringify(dom.code)}`);
  check(dom.code[2] === 'SELECT name FROM users WHERE id = 1;' && dom.keywords.includes('SELECT'), `unlabelled code: language guessed once complete ${dom.keywords}`);
  check(dom.code[1] === '<b onclick="window.__xss=4">bold</b>' && dom.htmlTags.length > 0, `HTML code shown as highlighted text ${dom.code[1]}`);
  check(dom.keywords.includes('def') && dom.keywords.includes('return'), `python keywords highlighted ${dom.keywords}`);
  check(dom.strings.length >= 1, 'python string highlighted');
  check(JSON.stringify(dom.lang) === '["python","html"]', `code blocks labelled with their language ${dom.lang}`);
  check(dom.paragraphs.includes('Raw HTML stays text: <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'), `raw HTML shown as text: ${dom.paragraphs}`);
  check(dom.paragraphs.includes('这是一段中文说明，用于检查中文字体的显示效果。'), 'Chinese paragraph');
  check(dom.paragraphs.includes('See the manual for more.') && dom.links === 0 && dom.linkColour, 'a link is shown as text, like the text around it');
  check(dom.dangerous === 0 && dom.xss === null, `no HTML from the reply is live (elements ${dom.dangerous}, xss ${dom.xss})`);
  check(dom.caret === 0, 'no caret once done');
  check(dom.emojiColour.every((n) => n > 200), `every emoji is drawn in colour, not as an empty box or in black and white (coloured pixels: ${dom.emojiColour}; apt-get install fonts-noto-color-emoji)`);
  check(dom.fontSize >= (size === 'small' ? 18 : 24), `large type (${dom.fontSize}px)`);
  check(dom.scrolledToEnd, 'the conversation follows the reply to its end');
  check(page.external.length === 0, `requests outside the kiosk's server: ${page.external}`);
  return rid;
}

async function main() {
  const [spyClient, fakeClient] = await startSpyAndFakeNode();
  browser = await chromium.launch({ executablePath: cfg.chromium, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
  const pages = [];
  try {
    await step('config error is shown and names the setting', async () => {
      const page = await openPage('small', { node: 'a/b' });
      pages.push(page);
      await page.waitForSelector('.config-error li');
      const items = await page.$$eval('.config-error li', (els) => els.map((e) => e.textContent));
      check(items.some((t) => t.startsWith('node: must be one topic level')), `errors ${items}`);
      check(await page.isDisabled('#send'), 'no sending with a bad configuration');
      await shot(page, 'config-error-800x480');
      await page.context().close();
    });

    await step("the page also works served by mosquitto's own http_dir", async () => {
      const page = await openPage('small', { node: cfg.fake_node }, { url: cfg.broker_page_url });
      await waitState(page, 'connected', 'online');
      const style = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
      check(style === 'rgb(15, 20, 25)', `stylesheet applied (${style})`);
      check(page.errors.length === 0, `page errors: ${page.errors}`);
      await page.context().close();
    });

    await step('markdown, code and Chinese render at 1920x1080 (scripted node)', async () => {
      const page = await openPage('large', { node: cfg.fake_node });
      await waitState(page, 'connected', 'online');
      check((await page.title()) === 'Kiosk test', 'title from config.json');
      await checkRendering(page, 'large');
      await shot(page, 'markdown-1920x1080');
      check(page.errors.length === 0, `page errors: ${page.errors}`);
      await page.context().close();
    });

    await step('markdown, code and Chinese render at 800x480 on a touch screen, Chinese UI', async () => {
      const page = await openPage('small', { node: cfg.fake_node, lang: 'zh' }, { touch: true });
      await waitState(page, 'connected', 'online');
      check((await page.textContent('#send')) === '发送', 'Chinese labels');
      await checkRendering(page, 'small');
      await shot(page, 'markdown-zh-800x480');
      const req = spy.requests.filter((r) => r.topic.includes(`/${cfg.fake_node}/request/`));
      check(req.length === 2 && req.every((r) => r.qos === 1), 'requests published with QoS 1');
      await page.context().close();
    });

    await step('faults end a reply visibly: error, unreadable request, node restart, silence', async () => {
      const page = await openPage('small', { node: cfg.fake_node }, { touch: true, config: { reply_timeout: 3 } });
      await waitState(page, 'connected', 'online');
      let rid = await ask(page, 'busy?', { touch: true });
      let r = await waitFinal(page, rid);
      check(r.state === 'error' && r.note.includes('busy') && r.note.includes('retry later'), `busy ${JSON.stringify(r)}`);
      rid = await ask(page, 'too large?', { touch: true });
      r = await waitFinal(page, rid);
      check(r.state === 'error' && r.note.includes('too_large'), `too_large ${JSON.stringify(r)}`);
      rid = await ask(page, 'restart?', { touch: true });
      r = await waitFinal(page, rid);
      check(r.state === 'interrupted' && r.text.trim() === 'Half a rep' && r.note === 'The assistant restarted during this reply.', `restart ${JSON.stringify(r)}`);
      await sleep(700);
      r = await waitFinal(page, rid);
      check(!r.text.includes('LATE'), 'nothing after the end counts');
      rid = await ask(page, 'silence?', { touch: true });
      r = await waitFinal(page, rid, 15000);
      check(r.state === 'interrupted' && r.note === 'No answer from the assistant.', `silence ${JSON.stringify(r)}`);
      check(await page.isEnabled('#send'), 'the kiosk can ask again');
      await shot(page, 'faults-800x480');
      check(page.errors.length === 0, `page errors: ${page.errors}`);
      await page.context().close();
    });

    await step('a long, fast reply is rendered once per frame, not once per chunk', async () => {
      const page = await openPage('large', { node: cfg.fake_node });
      await waitState(page, 'connected', 'online');
      await page.evaluate(() => {
        window.__long = [];
        new PerformanceObserver((list) => window.__long.push(...list.getEntries().map((e) => e.duration))).observe({ type: 'longtask' });
      });
      const t0 = Date.now();
      const rid = await ask(page, 'long?');
      const r = await waitFinal(page, rid);
      const elapsed = Date.now() - t0;
      check(r.state === 'done' && r.chunks >= 1400 && r.chunks <= 1500, `all chunks arrived ${r.chunks}`);
      const parts = await page.evaluate((id) => document.querySelectorAll(`.msg.assistant[data-request-id="${id}"] h2`).length, rid);
      check(parts === (LONG_REPLY.match(/^## /gm) || []).length, `the whole reply rendered (${parts} parts)`);
      const streamed = await streamedBeforeDone(page, rid);
      const longTasks = await page.evaluate(() => window.__long);
      figures.long_reply = { chunks: r.chunks, renders: streamed.lengths.length, ms: elapsed, longest_task_ms: Math.max(0, ...longTasks), long_tasks: longTasks.length };
      log('figures', JSON.stringify(figures.long_reply));
      check(streamed.lengths.length < r.chunks, 'fewer renders than chunks');
      await page.context().close();
    });

    const page = await openPage('small', {}, { touch: true, config: { max_tokens: 48, temperature: 0 } });
    pages.push(page);
    // Without client_id in config.json, a page load's client id is kiosk-<128 random bits>.
    const KIOSK_ID = new RegExp(`^${cfg.prefix}/${cfg.node}/(request|cancel)/kiosk-[0-9a-f]{32}$`);

    await step('the real daemon streams a reply that appears chunk by chunk', async () => {
      await waitState(page, 'connected', 'online');
      await shot(page, 'empty-800x480');
      const rid = await ask(page, 'What is the capital of France?', { touch: true });
      const result = await waitFinal(page, rid);
      check(result.state === 'done' && ['stop', 'length'].includes(result.finish), `reply ended ${JSON.stringify(result)}`);
      check(result.text.trim().length > 0 && result.chunks >= 2, `reply text ${JSON.stringify(result)}`);
      const streamed = await streamedBeforeDone(page, rid);
      check(streamed.lengths.length >= 2, `text appeared before done, in ${streamed.lengths.length} steps`);
      const req = spy.requests.find((r) => r.body.request_id === rid);
      check(req && req.qos === 1 && KIOSK_ID.test(req.topic), `request on the node's topic ${JSON.stringify(req)}`);
      check(req.body.max_tokens === 48 && req.body.temperature === 0, 'request fields from config.json');
      await shot(page, 'reply-800x480');
    });

    await step('stop sends cancel and the reply ends cancelled (1920x1080)', async () => {
      const big = await openPage('large', {}, { config: { max_tokens: 1000, temperature: 0 } });
      pages.push(big);
      await waitState(big, 'connected', 'online');
      const rid = await ask(big, 'Write a very long story about a dragon and a knight.');
      await big.waitForFunction((id) => Number(document.querySelector(`.msg.assistant[data-request-id="${id}"]`)?.dataset.chunks) >= 3, rid, { timeout: T });
      check(await big.isVisible('#stop'), 'stop button visible while streaming');
      await shot(big, 'streaming-1920x1080');
      check(!(await big.isVisible('#send')), 'send hidden while streaming');
      await big.click('#stop');
      const result = await waitFinal(big, rid);
      check(result.state === 'done' && result.finish === 'cancelled', `cancelled reply ${JSON.stringify(result)}`);
      check(result.chunks < 1000 && result.note.length > 0, 'stopped early, and a note says so');
      const kioskId = spy.requests.find((r) => r.body.request_id === rid).topic.split('/').pop();
      const cancel = spy.cancels.find((c) => c.body.request_id === rid);
      check(cancel && cancel.qos === 1 && KIOSK_ID.test(cancel.topic) && cancel.topic === `${cfg.prefix}/${cfg.node}/cancel/${kioskId}`, `cancel on the wire ${JSON.stringify(spy.cancels)}`);
      check(await big.isVisible('#send'), 'send is back');
      await shot(big, 'cancelled-1920x1080');
      check(big.errors.length === 0, `page errors: ${big.errors}`);
      await big.context().close();
    });

    await step('two pages in one browser each keep their connection and get their replies', async () => {
      // Same browser profile, same config.json (no client_id): each page load is its own client;
      // neither knocks the other off the broker (the old page shared one id via localStorage).
      const context = await browser.newContext({ viewport: SIZES.small, deviceScaleFactor: 1 });
      writeFileSync(join(cfg.www, 'config.json'), JSON.stringify({ ...cfg.config, max_tokens: 16, temperature: 0 }));
      const two = [await context.newPage(), await context.newPage()];
      for (const p of two) await p.goto(`${cfg.page_url}?node=${cfg.node}`);
      for (const p of two) await waitState(p, 'connected', 'online');
      for (const p of two) await p.evaluate(() => { window.__links = []; new MutationObserver(() => window.__links.push(document.body.dataset.link)).observe(document.body, { attributes: true }); });
      const rids = [];
      for (const p of two) rids.push(await ask(p, 'Say hello.'));
      for (const [i, p] of two.entries()) {
        const r = await waitFinal(p, rids[i]);
        check(r.state === 'done', `page ${i + 1} got its reply ${JSON.stringify(r)}`);
        const links = await p.evaluate(() => window.__links);
        check(links.every((l) => l === 'connected'), `page ${i + 1} kept its connection: ${links}`);
      }
      const topics = rids.map((rid) => spy.requests.find((r) => r.body.request_id === rid).topic);
      check(topics[0] !== topics[1] && topics.every((t) => KIOSK_ID.test(t)), `a client id per page load: ${topics}`);
      await context.close();
    });

    await step('new conversation clears the screen and uses a new conversation id', async () => {
      const first = await page.evaluate(() => document.body.dataset.conversation);
      await page.tap('#new');
      check((await page.$$('.msg')).length === 0, 'no messages after new conversation');
      check(await page.isVisible('#empty'), 'empty-state hint');
      const second = await page.evaluate(() => document.body.dataset.conversation);
      check(second !== first, 'a new conversation id');
      const rid = await ask(page, 'Say hello.', { touch: true });
      await waitFinal(page, rid);
      const req = spy.requests.find((r) => r.body.request_id === rid);
      check(req.body.conversation_id === second, 'the request carries the new conversation id');
    });

    await step('offline state shows when the daemon stops', async () => {
      await control('stop_daemon');
      await waitState(page, 'connected', 'offline');
      check(await page.isVisible('#banner'), 'offline banner');
      check(await page.isDisabled('#send'), 'send disabled while offline');
      await page.fill('#input', 'anyone there?');
      await shot(page, 'offline-800x480');
      await page.fill('#input', '');
    });

    await step('back online when the daemon returns', async () => {
      await control('start_daemon');
      await waitState(page, 'connected', 'online');
      check(!(await page.isVisible('#banner')), 'banner gone');
    });

    await step('reconnects by itself after a broker restart', async () => {
      await page.evaluate(() => { window.__states = []; });
      await control('restart_broker');
      await waitState(page, 'connected', 'online');
      const states = await page.evaluate(() => window.__states);
      check(states.some((s) => s.startsWith('reconnecting')), `saw the link drop: ${states}`);
      const rid = await ask(page, 'Are you back?', { touch: true });
      const result = await waitFinal(page, rid);
      check(result.state === 'done', `reply after reconnecting ${JSON.stringify(result)}`);
      await shot(page, 'reconnected-800x480');
    });

    check(page.errors.length === 0, `page errors: ${page.errors}`);
  } catch (e) {
    for (const [i, p] of pages.entries()) {
      try {
        if (!p.isClosed()) await p.screenshot({ path: join(cfg.artifacts, `failure-${i}.png`) });
      } catch {}
    }
    throw e;
  } finally {
    await browser.close();
    spyClient.end(true);
    fakeClient.end(true);
  }
  process.stdout.write(`@@${JSON.stringify({ do: 'finished', steps, figures })}\n`);
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`${e.stack || e}\n`);
    process.exit(1);
  },
);
