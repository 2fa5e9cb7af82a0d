// One reply stream as the kiosk sees it: QoS 1 may deliver a message twice or, across reconnects,
// late; messages are de-duplicated by (request_id, seq) and applied in seq order. Nothing after the
// final message (done or error) counts. Pure logic, no DOM.

const FINAL = new Set(['done', 'error', 'interrupted']);

export class Reply {
  constructor(requestId) {
    this.requestId = requestId;
    this.nextSeq = 0;
    this.pending = new Map(); // seq -> message, received ahead of nextSeq
    this.state = 'waiting'; // waiting | streaming | done | error | interrupted
    this.text = '';
    this.chunks = 0;
    this.node = null;
    this.model = null;
    this.finishReason = null;
    this.errorCode = null;
    this.errorMessage = null;
    this.usage = null;
    this.timings = null;
  }

  get final() {
    return FINAL.has(this.state);
  }

  /** Take one message of this reply; returns true if the visible state changed. */
  receive(msg) {
    if (this.final || msg === null || typeof msg !== 'object') return false;
    const seq = msg.seq;
    if (!Number.isInteger(seq) || seq < this.nextSeq || this.pending.has(seq)) return false;
    this.pending.set(seq, msg);
    let changed = false;
    while (!this.final && this.pending.has(this.nextSeq)) {
      const m = this.pending.get(this.nextSeq);
      this.pending.delete(this.nextSeq);
      this.nextSeq += 1;
      changed = this.#apply(m) || changed;
    }
    if (this.final) this.pending.clear();
    return changed;
  }

  #apply(m) {
    switch (m.type) {
      case 'start':
        this.state = 'streaming';
        this.node = typeof m.node === 'string' ? m.node : null;
        this.model = typeof m.model === 'string' ? m.model : null;
        return true;
      case 'chunk':
        if (typeof m.text !== 'string' || m.text === '') return false;
        this.state = 'streaming';
        this.text += m.text;
        this.chunks += 1;
        return true;
      case 'done':
        this.state = 'done';
        this.finishReason = typeof m.finish_reason === 'string' ? m.finish_reason : null;
        this.usage = m.usage ?? null;
        this.timings = m.timings ?? null;
        return true;
      case 'error':
        this.fail(String(m.code ?? 'internal'), String(m.message ?? ''));
        return true;
      default:
        return false; // a newer protocol's message type: skip it, keep the order
    }
  }

  /** End the reply with an error that did not come in seq order (error topic). */
  fail(code, message) {
    if (this.final) return false;
    this.state = 'error';
    this.errorCode = code;
    this.errorMessage = message;
    this.pending.clear();
    return true;
  }

  /** Give up on the reply locally (node restarted, timed out, stop without an answer). */
  interrupt(reason) {
    if (this.final) return false;
    this.state = 'interrupted';
    this.errorCode = reason;
    this.pending.clear();
    return true;
  }
}

/** The request_id and conversation_id a reply topic and payload belong to, or null. */
export function parseReplyMessage(topic, replyPrefix, payload) {
  if (!topic.startsWith(replyPrefix)) return null;
  let msg;
  try {
    msg = JSON.parse(payload);
  } catch {
    return null;
  }
  if (msg === null || typeof msg !== 'object' || typeof msg.request_id !== 'string') return null;
  return { conversationId: topic.slice(replyPrefix.length), msg };
}
