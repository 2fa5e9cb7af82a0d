import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Reply, parseReplyMessage } from '../src/replies.js';

const start = { type: 'start', request_id: 'r1', seq: 0, node: 'pi', model: 'm' };
const chunk = (seq, text) => ({ type: 'chunk', request_id: 'r1', seq, text });
const done = (seq, finish_reason = 'stop') => ({ type: 'done', request_id: 'r1', seq, finish_reason, usage: {}, timings: {} });

test('chunks in order build the text and done ends the reply', () => {
  const r = new Reply('r1');
  assert.equal(r.state, 'waiting');
  assert.ok(r.receive(start));
  assert.equal(r.state, 'streaming');
  assert.equal(r.node, 'pi');
  r.receive(chunk(1, 'Hel'));
  r.receive(chunk(2, 'lo'));
  assert.equal(r.text, 'Hello');
  assert.ok(r.receive(done(3, 'length')));
  assert.equal(r.state, 'done');
  assert.equal(r.finishReason, 'length');
  assert.equal(r.chunks, 2);
});

test('a duplicate (request_id, seq) is applied once', () => {
  const r = new Reply('r1');
  r.receive(start);
  assert.ok(r.receive(chunk(1, 'a')));
  assert.equal(r.receive(chunk(1, 'a')), false);
  assert.equal(r.receive(start), false);
  r.receive(chunk(2, 'b'));
  assert.equal(r.text, 'ab');
});

test('messages arriving out of order are held until the gap is filled', () => {
  const r = new Reply('r1');
  assert.equal(r.receive(chunk(2, 'b')), false);
  assert.equal(r.receive(done(3)), false);
  assert.equal(r.receive(chunk(2, 'b')), false, 'a duplicate of a held message');
  assert.equal(r.state, 'waiting');
  r.receive(start);
  assert.equal(r.text, '');
  r.receive(chunk(1, 'a'));
  assert.equal(r.text, 'ab');
  assert.equal(r.state, 'done');
});

test('nothing after the final message counts', () => {
  const r = new Reply('r1');
  r.receive(start);
  r.receive({ type: 'error', request_id: 'r1', seq: 1, code: 'node_lost', message: 'gone' });
  assert.equal(r.state, 'error');
  assert.equal(r.errorCode, 'node_lost');
  assert.equal(r.receive(chunk(2, 'late')), false);
  assert.equal(r.receive(done(3)), false);
  assert.equal(r.text, '');
  assert.equal(r.state, 'error');
});

test('a held message after the final one is dropped', () => {
  const r = new Reply('r1');
  r.receive(chunk(3, 'late')); // held
  r.receive(start);
  r.receive(chunk(1, 'x'));
  r.receive(done(2, 'cancelled'));
  assert.equal(r.text, 'x');
  assert.equal(r.finishReason, 'cancelled');
  assert.equal(r.pending.size, 0);
});

test('a lone error at seq 0 ends the reply', () => {
  const r = new Reply('r1');
  r.receive({ type: 'error', request_id: 'r1', seq: 0, code: 'busy', message: 'all slots busy' });
  assert.equal(r.state, 'error');
  assert.equal(r.errorMessage, 'all slots busy');
});

test('malformed messages change nothing', () => {
  const r = new Reply('r1');
  for (const bad of [null, 'x', {}, { seq: '0', type: 'start' }, { seq: -1, type: 'start' }, { seq: 0.5, type: 'start' }]) {
    assert.equal(r.receive(bad), false);
  }
  assert.equal(r.state, 'waiting');
  r.receive(start);
  assert.equal(r.receive({ type: 'chunk', seq: 1, text: '' }), false, 'an empty chunk shows nothing');
  assert.equal(r.receive({ type: 'chunk', seq: 2, text: 5 }), false);
  r.receive({ type: 'future-type', seq: 3 });
  r.receive(chunk(4, 'ok'));
  assert.equal(r.text, 'ok', 'unknown types keep their place in the order');
});

test('interrupt and fail end the reply once', () => {
  const r = new Reply('r1');
  r.receive(start);
  assert.ok(r.interrupt('timeout'));
  assert.equal(r.interrupt('restarted'), false);
  assert.equal(r.fail('internal', 'x'), false);
  assert.equal(r.errorCode, 'timeout');
  assert.equal(r.receive(chunk(1, 'late')), false);
});

test('parseReplyMessage takes only this kiosk\'s reply topics and JSON objects with a request_id', () => {
  const prefix = 'qwen-edge/pi/reply/k1/';
  assert.deepEqual(parseReplyMessage(`${prefix}c-1`, prefix, JSON.stringify(start)), { conversationId: 'c-1', msg: start });
  assert.equal(parseReplyMessage('qwen-edge/pi/reply/k2/c-1', prefix, JSON.stringify(start)), null);
  assert.equal(parseReplyMessage(`${prefix}c`, prefix, 'not json'), null);
  assert.equal(parseReplyMessage(`${prefix}c`, prefix, '[1]'), null);
  assert.equal(parseReplyMessage(`${prefix}c`, prefix, '{"seq":0}'), null);
});
