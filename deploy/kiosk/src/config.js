// Kiosk settings: defaults, then config.json next to the page, then `node` and `lang` from the
// page's URL query.
// Pure functions (no DOM), so node's test runner checks them.

export const DEFAULTS = Object.freeze({
  broker: null, // WebSocket URL of the broker; null = ws://<page host>:9001 (wss:// on an https page)
  username: null,
  password: null,
  node: null, // required: the daemon's node_id
  client_id: null, // null = "kiosk-" + 128 random bits, new on every page load
  prefix: 'qwen-edge',
  lang: null, // "en" | "zh"; null = from the browser's language
  title: 'qwen-edge',
  system: null,
  max_tokens: null,
  temperature: null,
  reply_timeout: 120, // seconds without any message of an unfinished reply before giving up on it
  idle_reset: 180, // seconds without a tap or key (and no reply running) before a new conversation; 0 = never
});

const STRING_KEYS = ['broker', 'username', 'password', 'node', 'client_id', 'prefix', 'lang', 'title', 'system'];
const LANGS = ['en', 'zh'];
// What the daemon accepts as a request_id / conversation_id (docs/protocol.md).
export const ID_PATTERN = /^[A-Za-z0-9_.:-]{1,64}$/;

/** A topic level that may appear inside a topic: non-empty, no wildcard, no separator, no NUL. */
export function isTopicLevel(s) {
  return typeof s === 'string' && s.length > 0 && !/[/+#\u0000]/.test(s);
}

function isTopicPrefix(s) {
  return typeof s === 'string' && s.split('/').every(isTopicLevel);
}

// What the page's URL may set: which node to talk to and the language of the page's own words.
// Everything else (the broker, its credentials, the client id, the system prompt, ...) comes only
// from config.json: whoever can make the kiosk open a link must not be able to send config.json's
// password to another broker, take another client's topics or change what the model is told.
export const QUERY_KEYS = Object.freeze(['node', 'lang']);

/**
 * The query string's settings: QUERY_KEYS only, the rest of the query is not read. An empty value
 * (`?node=`) is not a setting: config.json's value stands.
 */
export function fromQuery(search) {
  const params = new URLSearchParams(search);
  const out = {};
  for (const key of QUERY_KEYS) {
    if (params.get(key)) out[key] = params.get(key);
  }
  return out;
}

/** The settings the query string names but may not set (for a warning on the console). */
export function ignoredInQuery(search) {
  const keys = new Set(new URLSearchParams(search).keys());
  return Object.keys(DEFAULTS).filter((k) => keys.has(k) && !QUERY_KEYS.includes(k));
}

function toNumber(value, key, errors) {
  if (value === null || value === undefined || value === '') return null;
  const n = typeof value === 'number' ? value : Number(value);
  if (typeof value === 'boolean' || !Number.isFinite(n)) {
    errors.push(`${key}: not a number: ${JSON.stringify(value)}`);
    return null;
  }
  return n;
}

/**
 * Merge the sources (later wins; the query only for QUERY_KEYS) and check them. Returns {settings, errors}; errors is a list of
 * one-line messages naming the setting. `env` supplies what the page knows: {hostname, secure,
 * language, newClientId()}.
 */
export function resolveSettings(fileConfig, queryConfig, env) {
  const errors = [];
  const merged = { ...DEFAULTS };
  if (fileConfig !== null && (typeof fileConfig !== 'object' || Array.isArray(fileConfig))) {
    errors.push('config.json: not a JSON object');
  } else {
    for (const [key, value] of Object.entries(fileConfig || {})) {
      if (key in DEFAULTS) merged[key] = value;
      else errors.push(`config.json: unknown setting "${key}"`);
    }
  }
  // Only QUERY_KEYS, whatever the caller passes: the URL must never choose the broker or the
  // credentials (see QUERY_KEYS).
  for (const key of QUERY_KEYS) {
    if (queryConfig && Object.hasOwn(queryConfig, key)) merged[key] = queryConfig[key];
  }

  for (const key of STRING_KEYS) {
    const v = merged[key];
    if (v === '' || v === undefined) merged[key] = DEFAULTS[key];
    else if (v !== null && typeof v !== 'string') {
      errors.push(`${key}: must be a string`);
      merged[key] = DEFAULTS[key];
    }
  }
  merged.max_tokens = toNumber(merged.max_tokens, 'max_tokens', errors);
  merged.temperature = toNumber(merged.temperature, 'temperature', errors);
  merged.reply_timeout = toNumber(merged.reply_timeout, 'reply_timeout', errors) ?? DEFAULTS.reply_timeout;
  merged.idle_reset = toNumber(merged.idle_reset, 'idle_reset', errors) ?? DEFAULTS.idle_reset;
  if (!(merged.idle_reset >= 0)) {
    errors.push('idle_reset: must be >= 0 (seconds; 0 = never)');
    merged.idle_reset = DEFAULTS.idle_reset;
  }
  if (merged.max_tokens !== null && !(Number.isInteger(merged.max_tokens) && merged.max_tokens >= 1)) {
    errors.push('max_tokens: must be an integer >= 1');
    merged.max_tokens = null;
  }
  if (merged.temperature !== null && !(merged.temperature >= 0 && merged.temperature <= 5)) {
    errors.push('temperature: must be between 0 and 5');
    merged.temperature = null;
  }
  if (!(merged.reply_timeout > 0)) {
    errors.push('reply_timeout: must be > 0 (seconds)');
    merged.reply_timeout = DEFAULTS.reply_timeout;
  }

  if (merged.broker === null) merged.broker = `${env.secure ? 'wss' : 'ws'}://${env.hostname || 'localhost'}:9001`;
  else if (!/^wss?:\/\/[^/]/.test(merged.broker)) errors.push(`broker: must be a ws:// or wss:// URL, got "${merged.broker}"`);

  if (merged.node === null) errors.push('node: not set (the node_id of the qwen-edge daemon, e.g. ?node=mypi)');
  else if (!isTopicLevel(merged.node)) errors.push('node: must be one topic level (no "/", "+", "#")');

  if (!isTopicPrefix(merged.prefix)) errors.push('prefix: topic levels without "+", "#" or empty levels');

  if (merged.client_id === null) merged.client_id = env.newClientId();
  if (!isTopicLevel(merged.client_id)) errors.push('client_id: must be one topic level (no "/", "+", "#")');

  if (merged.lang === null) merged.lang = String(env.language || '').toLowerCase().startsWith('zh') ? 'zh' : 'en';
  else if (!LANGS.includes(merged.lang)) errors.push(`lang: one of ${LANGS.join(', ')}`);
  if (!LANGS.includes(merged.lang)) merged.lang = 'en';

  return { settings: Object.freeze(merged), errors };
}

/**
 * Topics of the protocol for this kiosk (docs/protocol.md, "Topics"). `inbox`: the last level of
 * the reply topic this page load asks its replies to go to (MQTT 5 response topic).
 */
export function topicsFor(settings, inbox) {
  const base = `${settings.prefix}/${settings.node}`;
  const c = settings.client_id;
  if (!isTopicLevel(inbox)) throw new Error(`inbox: not a topic level: ${inbox}`);
  return Object.freeze({
    request: `${base}/request/${c}`,
    cancel: `${base}/cancel/${c}`,
    replies: `${base}/reply/${c}/${inbox}`, // subscribed, and the requests' response topic
    replyPrefix: `${base}/reply/${c}/`,
    error: `${base}/error/${c}`,
    status: `${base}/status`,
  });
}

/**
 * A fresh id matching ID_PATTERN: the tag and 128 random bits from the platform's CSPRNG, in hex.
 * Nothing else (no time, no counter): whoever holds the kiosk's credential must not be able to
 * guess a conversation id and ask the node for its history, nor a request id and get its reply.
 */
export function newId(tag, crypto = globalThis.crypto) {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `${tag}-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}

/** The request payload for one message. */
export function buildRequest(settings, requestId, conversationId, message) {
  const req = { request_id: requestId, conversation_id: conversationId, message };
  if (settings.system !== null) req.system = settings.system;
  if (settings.max_tokens !== null) req.max_tokens = settings.max_tokens;
  if (settings.temperature !== null) req.temperature = settings.temperature;
  return req;
}
