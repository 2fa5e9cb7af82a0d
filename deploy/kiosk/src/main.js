// The kiosk page: settings, the MQTT link (MQTT 5 over WebSockets, persistent session, QoS 1),
// the conversation on screen, and rendering at most once per animation frame.

import './style.css';
import mqtt from 'mqtt';
import { stableEnd } from './blocks.js';
import { buildRequest, fromQuery, ignoredInQuery, newId, resolveSettings, topicsFor } from './config.js';
import { STRINGS } from './i18n.js';
import { Reply, parseReplyMessage } from './replies.js';
import { renderMarkdown } from './render.js';

// The broker keeps the page's subscriptions and the replies queued for it this long while the
// link is down (a broker restart, a Wi-Fi drop): short, as whoever holds the kiosk's credential
// could take the session over and read them; a longer outage is covered by resending.
const SESSION_EXPIRY_S = 120;
// A request without any message of its reply this long is sent again with the same request_id
// (as qwen_edge/client/ does): the node ignores it while serving it, replays a finished reply,
// and generates one that was lost (a request that reached no node, e.g. across a broker restart).
const RESEND_MS = 10000;
const STOP_GRACE_MS = 10000; // after Stop, wait this long for the node's `done` before giving up
// Stop takes the place of Send the moment a request goes out: the second tap of a double tap on
// Send (or a bouncing finger) would land on it. Stop is disabled this long after sending.
const STOP_GUARD_MS = 600;

const $ = (id) => document.getElementById(id);

async function loadConfigFile() {
  let response;
  try {
    response = await fetch('config.json', { cache: 'no-store' });
  } catch {
    return { config: null, error: null }; // opened from file:// or the server is gone: no file
  }
  if (response.status === 404) return { config: null, error: null };
  if (!response.ok) return { config: null, error: `config.json: HTTP ${response.status}` };
  try {
    return { config: JSON.parse(await response.text()), error: null };
  } catch (e) {
    return { config: null, error: `config.json: invalid JSON (${e.message})` };
  }
}

class Kiosk {
  constructor(settings) {
    this.settings = settings;
    this.t = STRINGS[settings.lang];
    // Replies come to an inbox of this page load (MQTT 5 response topic), not to the reply topic
    // of the conversation: the conversation id is never on the wire where another client with
    // the kiosk's credential could read it and ask the node for the conversation's history.
    this.topics = topicsFor(settings, newId('k'));
    this.conversationId = newId('c');
    this.entries = new Map(); // request_id -> entry (see send())
    this.active = null; // the entry whose reply is in flight
    this.node = { state: 'unknown', pid: null, model: null, reason: null };
    this.link = 'connecting';
    this.subscribed = false; // this connection's SUBSCRIBE is acknowledged: replies can reach us
    this.linkError = null;
    this.lastTouched = Date.now(); // the last tap or key: the idle reset counts from it
    this.dirty = new Set();
    this.frame = 0;
    this.client = null;
    this.pinned = true; // the conversation is scrolled to its end and stays there when it resizes
    this.lastEnded = 0; // when the last reply ended: the idle reset counts from it too
  }

  start() {
    const { t, settings } = this;
    document.title = settings.title;
    document.documentElement.lang = settings.lang === 'zh' ? 'zh-CN' : 'en';
    $('title').textContent = settings.title;
    $('new').textContent = t.newConversation;
    $('send').textContent = t.send;
    $('stop').textContent = t.stop;
    $('empty').textContent = t.empty;
    $('input').placeholder = t.placeholder;
    document.body.dataset.conversation = this.conversationId;

    $('ask').addEventListener('submit', (e) => {
      e.preventDefault();
      this.send();
    });
    $('input').addEventListener('keydown', (e) => {
      // Enter sends; Shift+Enter is a new line; Enter that confirms an IME composition (Chinese
      // input) is not a send.
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        this.send();
      }
    });
    $('input').addEventListener('input', () => this.fitInput());
    for (const type of ['pointerdown', 'keydown', 'input']) {
      document.addEventListener(type, () => { this.lastTouched = Date.now(); }, { capture: true, passive: true });
    }
    $('stop').addEventListener('click', () => this.stop());
    // The conversation shrinks when the banner shows or the input grows (and the visitor cannot
    // scroll while reading the end of a reply): if it was at its end, it stays there. A
    // ResizeObserver runs after layout and before paint, so the end never shows hidden.
    const log = $('log');
    log.addEventListener('scroll', () => {
      this.pinned = this.nearEnd();
    }, { passive: true });
    new ResizeObserver(() => {
      if (this.pinned) this.scrollToEnd();
    }).observe(log);
    $('new').addEventListener('click', () => this.newConversation());
    setInterval(() => this.tick(), 1000);
    this.connect();
    this.updateChrome();
  }

  connect() {
    const { settings, topics } = this;
    this.client = mqtt.connect(settings.broker, {
      protocolVersion: 5,
      clientId: settings.client_id,
      // A clean start on page load: nothing the previous page left in the session (its
      // subscriptions, replies queued for it) comes to this one. Reconnects resume the session.
      clean: true,
      properties: { sessionExpiryInterval: SESSION_EXPIRY_S },
      username: settings.username ?? undefined,
      password: settings.password ?? undefined,
      keepalive: 30,
      reconnectPeriod: 2000,
      connectTimeout: 10000,
      resubscribe: false, // subscribed on every connect below, which also brings the retained status
    });
    this.client.on('connect', () => {
      this.client.options.clean = false;
      this.link = 'connected';
      this.linkError = null;
      this.subscribed = false;
      const client = this.client;
      client.subscribe([topics.replies, topics.error, topics.status], { qos: 1 }, (err, granted) => {
        if (client !== this.client || this.link !== 'connected') return;
        const refused = err ? String(err.message || err) : (granted || []).filter((g) => g.qos >= 0x80).map((g) => g.topic).join(', ');
        if (refused) {
          this.linkError = `${this.t.subscribeRefused}: ${refused}`;
        } else {
          this.subscribed = true;
          // Whatever was missed while away: the request in flight is sent again, same id.
          this.resend();
        }
        this.updateChrome();
      });
      this.updateChrome();
    });
    this.client.on('reconnect', () => this.setLink('reconnecting'));
    this.client.on('close', () => {
      this.subscribed = false;
      this.setLink(this.link === 'connecting' ? 'connecting' : 'reconnecting');
    });
    this.client.on('disconnect', (packet) => {
      // 0x8E: another connection with this client id took the session (the same account in
      // another browser or program). The page takes it back on its next reconnect.
      if (packet && packet.reasonCode === 0x8e) this.linkError = this.t.takenOver;
    });
    this.client.on('error', (err) => {
      this.linkError = err && err.message ? err.message : String(err);
      this.updateChrome();
    });
    this.client.on('message', (topic, payload, packet) => this.onMessage(topic, payload.toString(), packet));
  }

  setLink(state) {
    if (this.link === state) return;
    this.link = state;
    this.updateChrome();
  }

  onMessage(topic, payload, packet) {
    const { topics } = this;
    if (topic === topics.status) this.onStatus(payload, Boolean(packet && packet.retain));
    else if (topic === topics.error) this.onError(payload);
    else {
      const parsed = topic === topics.replies ? parseReplyMessage(topic, topics.replyPrefix, payload) : null;
      const entry = parsed && this.entries.get(parsed.msg.request_id);
      if (!entry) return; // not a reply this page asked for (e.g. from before a reload)
      if (entry.reply.receive(parsed.msg)) {
        entry.lastActivity = Date.now();
        if (entry.pid === null && entry.reply.state !== 'waiting') entry.pid = this.node.pid;
        this.markDirty(entry);
      }
    }
  }

  onStatus(payload, retained) {
    let status;
    try {
      status = JSON.parse(payload);
    } catch {
      return;
    }
    if (status === null || typeof status !== 'object') return;
    const state = ['online', 'starting', 'offline'].includes(status.state) ? status.state : 'unknown';
    const pid = Number.isInteger(status.pid) ? status.pid : null;
    this.node = { state, pid, model: typeof status.model === 'string' ? status.model : null, reason: status.reason ?? null };
    // A live `online` (not the retained one, which a restarted broker restores whether or not
    // the node is back) says the node is subscribed now: a request that went out while it was
    // away may have reached no one, so it is sent again.
    if (state === 'online' && !retained) this.resend();
    // A node process that restarted does not resume the replies its predecessor had started.
    if (state !== 'offline' && pid !== null) {
      for (const entry of this.entries.values()) {
        if (entry.pid !== null && entry.pid !== pid && entry.reply.interrupt('restarted')) this.markDirty(entry);
      }
    }
    this.updateChrome();
  }

  onError(payload) {
    let msg;
    try {
      msg = JSON.parse(payload);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    let entry = typeof msg.request_id === 'string' ? this.entries.get(msg.request_id) : null;
    // An error without a readable request_id (e.g. too_large) can only be about the request in
    // flight that has not started.
    if (!entry && msg.request_id === null && this.active && this.active.reply.state === 'waiting') entry = this.active;
    if (entry && entry.reply.fail(String(msg.code ?? 'internal'), String(msg.message ?? ''))) this.markDirty(entry);
  }

  canSend() {
    return this.link === 'connected' && this.subscribed && (this.node.state === 'online' || this.node.state === 'starting') && !this.active;
  }

  send() {
    const input = $('input');
    const text = input.value.trim();
    if (!text || !this.canSend()) return;
    const requestId = newId('r');
    $('empty').hidden = true;
    const user = document.createElement('div');
    user.className = 'msg user';
    user.textContent = text;
    const el = document.createElement('div');
    el.className = 'msg assistant';
    el.dataset.requestId = requestId;
    const body = document.createElement('div');
    body.className = 'body';
    const tail = document.createElement('div');
    tail.className = 'seg';
    body.append(tail);
    const note = document.createElement('span');
    note.className = 'note';
    el.append(body, note);
    $('log').append(user, el);
    const entry = {
      reply: new Reply(requestId),
      el,
      body,
      tail, // while streaming: the text after `cut`, rendered again every frame
      cut: 0, // the text before it is rendered once, in segments before `tail`
      note,
      lastActivity: Date.now(),
      pid: null,
      stopSentAt: null,
      armed: false, // Stop works for this reply (STOP_GUARD_MS after sending)
      rendered: '', // the text rendered so far; null once the final rendering is done
      request: null, // the payload, kept to send again (resend())
      sentAt: 0,
    };
    this.entries.set(requestId, entry);
    this.active = entry;
    entry.request = JSON.stringify(buildRequest(this.settings, requestId, this.conversationId, text));
    this.publishRequest(entry);
    input.value = '';
    this.fitInput();
    this.markDirty(entry);
    this.scrollToEnd();
    setTimeout(() => {
      entry.armed = true;
      this.updateChrome();
    }, STOP_GUARD_MS);
    this.updateChrome(); // Stop replaces Send now, disabled, not a frame later
  }

  publishRequest(entry) {
    entry.sentAt = Date.now();
    this.client.publish(this.topics.request, entry.request, { qos: 1, properties: { responseTopic: this.topics.replies } });
  }

  /** The request in flight again, same request_id, while no message of its reply came. */
  resend() {
    const entry = this.active;
    if (!entry || entry.reply.state !== 'waiting' || entry.stopSentAt !== null || !this.subscribed) return;
    this.publishRequest(entry);
  }

  stop({ force = false } = {}) {
    const entry = this.active;
    if (!entry || entry.reply.final || entry.stopSentAt !== null) return;
    if (!force && !entry.armed) return; // a tap meant for Send
    entry.stopSentAt = Date.now();
    this.client.publish(this.topics.cancel, JSON.stringify({ request_id: entry.reply.requestId }), { qos: 1 });
    this.updateChrome();
  }

  newConversation() {
    if (this.active) this.stop({ force: true });
    $('input').value = '';
    this.fitInput();
    this.active = null;
    this.entries.clear();
    this.dirty.clear();
    const log = $('log');
    const empty = $('empty');
    log.replaceChildren(empty);
    empty.hidden = false;
    this.conversationId = newId('c');
    document.body.dataset.conversation = this.conversationId;
    this.lastTouched = Date.now();
    this.updateChrome();
    $('input').focus();
  }

  tick() {
    const entry = this.active;
    const now = Date.now();
    if (!entry || entry.reply.final) {
      // The visitor has gone: the next one gets a clean screen and a new conversation.
      const idle = this.settings.idle_reset;
      const left = this.entries.size > 0 || $('input').value !== '';
      if (idle > 0 && left && now - Math.max(this.lastTouched, this.lastEnded) > idle * 1000) this.newConversation();
      return;
    }
    if (entry.reply.state === 'waiting' && now - Math.max(entry.sentAt, entry.lastActivity) > RESEND_MS) this.resend();
    if (entry.stopSentAt !== null && now - entry.stopSentAt > STOP_GRACE_MS) {
      if (entry.reply.interrupt('stopped')) this.markDirty(entry);
    } else if (now - entry.lastActivity > this.settings.reply_timeout * 1000) {
      if (entry.reply.interrupt('timeout')) this.markDirty(entry);
    }
  }

  markDirty(entry) {
    this.dirty.add(entry);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  // Runs at most once per frame, however many chunks arrived since the last one.
  flush() {
    this.frame = 0;
    const follow = this.nearEnd();
    for (const entry of this.dirty) this.renderEntry(entry);
    this.dirty.clear();
    if (this.active && this.active.reply.final) {
      this.active = null;
      this.lastEnded = Date.now();
    }
    this.updateChrome();
    if (follow) this.scrollToEnd();
  }

  renderEntry(entry) {
    const { reply, el, body, note } = entry;
    const { t } = this;
    el.dataset.state = reply.state;
    el.dataset.chunks = String(reply.chunks);
    if (reply.finishReason) el.dataset.finish = reply.finishReason;
    if (reply.final) {
      // Once, the whole reply in one piece: exactly what Markdown makes of it.
      if (entry.rendered !== null) body.innerHTML = renderMarkdown(reply.text, true);
      entry.rendered = null;
    } else if (entry.rendered !== reply.text) {
      // While streaming, only the blocks still growing are rendered again: a frame costs about
      // the same at the end of a long reply as at its start.
      const cut = stableEnd(reply.text, entry.cut);
      if (cut > entry.cut) {
        const seg = document.createElement('div');
        seg.className = 'seg';
        seg.innerHTML = renderMarkdown(reply.text.slice(entry.cut, cut), false);
        entry.tail.before(seg);
        entry.cut = cut;
      }
      entry.tail.innerHTML = renderMarkdown(reply.text.slice(entry.cut), false);
      entry.rendered = reply.text;
    }
    if (!reply.final && reply.state === 'streaming') {
      let target = entry.tail;
      while (target.lastElementChild && !['PRE', 'TABLE', 'HR', 'BR'].includes(target.lastElementChild.tagName)) {
        target = target.lastElementChild;
      }
      const caret = document.createElement('span');
      caret.className = 'caret';
      target.append(caret);
    }
    let text = '';
    if (reply.state === 'done' && reply.finishReason === 'cancelled') text = t.cancelled;
    else if (reply.state === 'done' && reply.finishReason === 'length') text = t.length;
    else if (reply.state === 'error') text = `${t.errorPrefix} (${reply.errorCode}): ${reply.errorMessage}`;
    else if (reply.state === 'interrupted') {
      text = { timeout: t.timeout, restarted: t.restarted, stopped: t.cancelled }[reply.errorCode] ?? t.interrupted;
    }
    note.textContent = text;
    note.hidden = !text;
  }

  nearEnd() {
    const log = $('log');
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }

  scrollToEnd() {
    const log = $('log');
    log.scrollTop = log.scrollHeight;
  }

  fitInput() {
    const input = $('input');
    input.style.height = 'auto';
    input.style.height = `${input.scrollHeight + 2}px`;
  }

  updateChrome() {
    const { t, node, link } = this;
    document.body.dataset.link = link;
    document.body.dataset.node = node.state;
    let status;
    if (link !== 'connected') status = link === 'connecting' ? t.connecting : t.reconnecting;
    else if (node.state === 'online') status = node.model ? `${t.online} · ${node.model}` : t.online;
    else if (node.state === 'starting') status = t.starting;
    else if (node.state === 'offline') status = t.offline;
    else status = t.waitingNode;
    $('status').textContent = status;

    const banner = $('banner');
    let bannerText = '';
    if (link === 'reconnecting') bannerText = this.linkError ? `${t.brokerBanner} (${this.linkError})` : t.brokerBanner;
    else if (link === 'connected' && node.state === 'offline') bannerText = t.offlineBanner;
    else if (link === 'connecting' && this.linkError) bannerText = `${t.brokerBanner} (${this.linkError})`;
    else if (link === 'connected' && !this.subscribed && this.linkError) bannerText = this.linkError;
    banner.textContent = bannerText;
    banner.hidden = !bannerText;

    const inFlight = this.active !== null && !this.active.reply.final;
    $('send').hidden = inFlight;
    $('send').disabled = !this.canSend();
    $('stop').hidden = !inFlight;
    $('stop').disabled = inFlight && (this.active.stopSentAt !== null || !this.active.armed);
    $('stop').textContent = inFlight && this.active.stopSentAt !== null ? t.stopping : t.stop;
  }
}

function showConfigErrors(errors, lang) {
  const t = STRINGS[lang] || STRINGS.en;
  const box = document.createElement('div');
  box.className = 'config-error';
  const h = document.createElement('h2');
  h.textContent = t.configError;
  const ul = document.createElement('ul');
  for (const e of errors) {
    const li = document.createElement('li');
    li.textContent = e;
    ul.append(li);
  }
  box.append(h, ul);
  $('log').replaceChildren(box);
  document.body.dataset.link = 'config-error';
  $('status').textContent = t.configError;
  for (const id of ['input', 'send', 'new']) $(id).disabled = true;
}

async function main() {
  const file = await loadConfigFile();
  const { settings, errors } = resolveSettings(file.config, fromQuery(location.search), {
    hostname: location.hostname,
    secure: location.protocol === 'https:',
    language: navigator.language,
    newClientId: () => newId('kiosk'),
  });
  if (file.error) errors.unshift(file.error);
  if (errors.length) {
    showConfigErrors(errors, settings.lang);
    return;
  }
  const ignored = ignoredInQuery(location.search);
  if (ignored.length) console.warn(`kiosk: the URL may set only node and lang; ignored: ${ignored.join(', ')} (set them in config.json)`);
  const kiosk = new Kiosk(settings);
  kiosk.start();
}

main();
