import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { ID_PATTERN, buildRequest, fromQuery, ignoredInQuery, newId, resolveSettings, topicsFor } from '../src/config.js';

const env = { hostname: 'kiosk.local', language: 'en-GB', newClientId: () => 'kiosk-new' };

test('defaults: broker on the page host, generated client id, language from the browser', () => {
  const { settings, errors } = resolveSettings(null, { node: 'pi' }, env);
  assert.deepEqual(errors, []);
  assert.equal(settings.broker, 'ws://kiosk.local:9001');
  assert.equal(settings.client_id, 'kiosk-new');
  assert.equal(settings.prefix, 'qwen-edge');
  assert.equal(settings.lang, 'en');
  assert.equal(settings.reply_timeout, 120);
  assert.equal(settings.idle_reset, 180);
  assert.equal(resolveSettings(null, { node: 'pi' }, { ...env, language: 'zh-CN' }).settings.lang, 'zh');
  assert.equal(resolveSettings(null, { node: 'pi' }, { ...env, secure: true }).settings.broker, 'wss://kiosk.local:9001');
});

test('the URL sets only node and lang, over config.json, which overrides the defaults', () => {
  const file = { broker: 'wss://broker:8443/mqtt', node: 'a', username: 'u', password: 'p', lang: 'zh', max_tokens: 64, client_id: 'k1' };
  const query = fromQuery('?node=b&lang=en&max_tokens=32&temperature=0&ignored=1&client_id=k9');
  assert.deepEqual(query, { node: 'b', lang: 'en' });
  const { settings, errors } = resolveSettings(file, query, env);
  assert.deepEqual(errors, []);
  assert.equal(settings.broker, 'wss://broker:8443/mqtt');
  assert.equal(settings.node, 'b');
  assert.equal(settings.lang, 'en');
  assert.equal(settings.max_tokens, 64);
  assert.equal(settings.temperature, null);
  assert.equal(settings.client_id, 'k1');
  assert.equal(settings.username, 'u');
  assert.equal('ignored' in settings, false);
});

test('the URL cannot choose the broker, the credentials, the client id or the prompt', () => {
  const file = { broker: 'wss://broker:8443/mqtt', node: 'pi', username: 'kiosk', password: 'secret', client_id: 'kiosk-lobby', system: 'Be kind.' };
  const search = '?broker=wss://elsewhere:443&username=evil&password=x&client_id=evil&system=Lie.&prefix=x&title=t&reply_timeout=1';
  const want = resolveSettings(file, {}, env).settings;
  // Whether the query comes through fromQuery or straight from a caller, only node/lang count.
  for (const query of [fromQuery(search), Object.fromEntries(new URLSearchParams(search))]) {
    const { settings, errors } = resolveSettings(file, query, env);
    assert.deepEqual(errors, []);
    assert.deepEqual(settings, want);
  }
  assert.deepEqual(ignoredInQuery(search), ['broker', 'username', 'password', 'client_id', 'prefix', 'title', 'system', 'reply_timeout']);
  assert.deepEqual(ignoredInQuery('?node=pi&lang=zh&utm=1'), []);
});

test('every bad setting is named', () => {
  // [config.json, URL query]
  const cases = [
    [{}, {}, /^node: not set/],
    [{}, { node: 'a/b' }, /^node: must be one topic level/],
    [{}, { node: '+' }, /^node:/],
    [{ node: 'a/b' }, {}, /^node: must be one topic level/],
    [{ client_id: 'k#' }, { node: 'pi' }, /^client_id:/],
    [{ prefix: 'a//b' }, { node: 'pi' }, /^prefix:/],
    [{ prefix: 'a/+' }, { node: 'pi' }, /^prefix:/],
    [{ broker: 'http://x:9001' }, { node: 'pi' }, /^broker: must be a ws/],
    [{ broker: 'mqtt://x:1883' }, { node: 'pi' }, /^broker:/],
    [{ max_tokens: 'ten' }, { node: 'pi' }, /^max_tokens: not a number/],
    [{ max_tokens: 0 }, { node: 'pi' }, /^max_tokens: must be an integer/],
    [{ max_tokens: 1.5 }, { node: 'pi' }, /^max_tokens: must be an integer/],
    [{ temperature: 9 }, { node: 'pi' }, /^temperature:/],
    [{ reply_timeout: -1 }, { node: 'pi' }, /^reply_timeout:/],
    [{ idle_reset: -1 }, { node: 'pi' }, /^idle_reset:/],
    [{ idle_reset: 'soon' }, { node: 'pi' }, /^idle_reset: not a number/],
    [{}, { node: 'pi', lang: 'fr' }, /^lang:/],
  ];
  for (const [file, query, pattern] of cases) {
    const { errors } = resolveSettings(file, query, env);
    assert.equal(errors.length, 1, `${JSON.stringify([file, query])} -> ${JSON.stringify(errors)}`);
    assert.match(errors[0], pattern);
  }
});

test('config.json must be an object of known settings with the right types', () => {
  assert.match(resolveSettings([], { node: 'pi' }, env).errors[0], /^config.json: not a JSON object/);
  assert.match(resolveSettings('x', { node: 'pi' }, env).errors[0], /^config.json: not a JSON object/);
  assert.match(resolveSettings({ nod: 'pi' }, { node: 'pi' }, env).errors[0], /unknown setting "nod"/);
  assert.match(resolveSettings({ node: 5 }, {}, env).errors[0], /^node: must be a string/);
  assert.match(resolveSettings({ node: 'pi', max_tokens: true }, {}, env).errors[0], /^max_tokens: not a number/);
});

test('an empty query value means "not set": config.json stands', () => {
  const { settings, errors } = resolveSettings({ node: 'pi', lang: 'zh' }, fromQuery('?node=&lang='), env);
  assert.deepEqual(errors, []);
  assert.equal(settings.node, 'pi');
  assert.equal(settings.lang, 'zh');
});

test('topics follow docs/protocol.md, with a prefix of several levels', () => {
  const { settings } = resolveSettings({ node: 'pi', client_id: 'k1', prefix: 'site/qe' }, {}, env);
  assert.deepEqual({ ...topicsFor(settings, 'k-inbox') }, {
    request: 'site/qe/pi/request/k1',
    cancel: 'site/qe/pi/cancel/k1',
    replies: 'site/qe/pi/reply/k1/k-inbox',
    replyPrefix: 'site/qe/pi/reply/k1/',
    error: 'site/qe/pi/error/k1',
    status: 'site/qe/pi/status',
  });
});

test('the reply inbox is one topic level', () => {
  const { settings } = resolveSettings({ node: 'pi' }, {}, env);
  for (const bad of ['', 'a/b', '+', '#']) assert.throws(() => topicsFor(settings, bad));
});

test('ids are 128 bits from the CSPRNG, nothing else, and match the protocol pattern', () => {
  const seen = new Set();
  for (let i = 0; i < 200; i++) {
    const id = newId('c');
    assert.match(id, ID_PATTERN);
    assert.match(id, /^c-[0-9a-f]{32}$/);
    seen.add(id);
  }
  assert.equal(seen.size, 200);
  // Built from the random bytes only: no clock, no Math.random.
  const zeros = { getRandomValues: (a) => a.fill(0) };
  const ff = { getRandomValues: (a) => a.fill(255) };
  assert.equal(newId('r', zeros), `r-${'0'.repeat(32)}`);
  assert.equal(newId('kiosk', ff), `kiosk-${'f'.repeat(32)}`);
  assert.match(newId('kiosk', ff), ID_PATTERN);
  const { settings } = resolveSettings(null, { node: 'pi' }, env);
  assert.deepEqual(buildRequest(settings, 'r1', 'c1', 'hi'), { request_id: 'r1', conversation_id: 'c1', message: 'hi' });
  const s2 = resolveSettings({ node: 'pi', system: 'Be brief.', max_tokens: 10, temperature: 0 }, {}, env).settings;
  assert.deepEqual(buildRequest(s2, 'r1', 'c1', 'hi'), {
    request_id: 'r1', conversation_id: 'c1', message: 'hi', system: 'Be brief.', max_tokens: 10, temperature: 0,
  });
});

test('config.example.json is a valid configuration', () => {
  const file = JSON.parse(readFileSync(new URL('../config.example.json', import.meta.url), 'utf8'));
  const { settings, errors } = resolveSettings(file, {}, env);
  assert.deepEqual(errors, []);
  assert.equal(settings.node, 'mypi');
});
