import assert from 'node:assert/strict';
import { test } from 'node:test';
import { stableEnd } from '../src/blocks.js';

test('cuts after a blank line, before a line at column 0', () => {
  const text = 'First paragraph.\n\nSecond paragraph.\n\nThird, still being writ';
  assert.equal(stableEnd(text), text.indexOf('Third'));
  assert.equal(stableEnd('Only one paragraph so far'), 0);
  assert.equal(stableEnd('One.\n\n'), 0, 'the next block has not started');
  assert.equal(stableEnd('One.\n\n '), 0, 'an indented line is not a new block');
  assert.equal(stableEnd('One.\n\n`'), 6, 'whatever the line becomes, it starts after a blank line');
});

test('never cuts inside fenced code, whatever blank lines it holds', () => {
  const open = 'Intro.\n\n```python\ndef f():\n\n    pass\n\nx = 1\n';
  assert.equal(stableEnd(open), open.indexOf('```'));
  const closed = `${open}\`\`\`\n\nAfter.\n`;
  assert.equal(stableEnd(closed), closed.indexOf('After.'));
  const tilde = 'a\n\n~~~~\n\n```\n\nb\n~~~~\n\nc\n';
  assert.equal(stableEnd(tilde), tilde.indexOf('c\n'), 'a fence closes only with its own marker, at least as long');
  const notClosing = 'a\n\n```\ncode ``` here\n\nb\n';
  assert.equal(stableEnd(notClosing), notClosing.indexOf('```'));
});

test('never cuts before indented lines: list continuations and indented code', () => {
  const list = '1. Step one:\n\n   - detail\n\n    code?\n';
  assert.equal(stableEnd(list), 0);
  const next = `${list}\n2. Step two\n`;
  assert.equal(stableEnd(next), next.indexOf('2. Step two'));
});

test('scanning from an earlier cut finds the same later cuts', () => {
  const text = 'a\n\nb\n\n```\n\n```\n\nc\n\nd';
  const whole = stableEnd(text);
  let cut = 0;
  for (let end = 1; end <= text.length; end++) cut = stableEnd(text.slice(0, end), cut);
  assert.equal(cut, whole, 'growing the text chunk by chunk ends at the same cut');
  assert.equal(whole, text.indexOf('d'));
});
