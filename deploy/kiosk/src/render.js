// Reply text (untrusted model output) -> safe HTML: Markdown by marked, code highlighted by
// highlight.js, everything passed through DOMPurify with an allow-list. Raw HTML in the reply is
// shown as text, links and images as their text, which does not look like a link: a kiosk must not
// navigate away or fetch anything.

import DOMPurify from 'dompurify';
import { Marked } from 'marked';
import hljs from 'highlight.js/lib/core';
import bash from 'highlight.js/lib/languages/bash';
import c from 'highlight.js/lib/languages/c';
import cpp from 'highlight.js/lib/languages/cpp';
import css from 'highlight.js/lib/languages/css';
import java from 'highlight.js/lib/languages/java';
import javascript from 'highlight.js/lib/languages/javascript';
import json from 'highlight.js/lib/languages/json';
import markdown from 'highlight.js/lib/languages/markdown';
import python from 'highlight.js/lib/languages/python';
import rust from 'highlight.js/lib/languages/rust';
import sql from 'highlight.js/lib/languages/sql';
import typescript from 'highlight.js/lib/languages/typescript';
import xml from 'highlight.js/lib/languages/xml';
import yaml from 'highlight.js/lib/languages/yaml';

const LANGUAGES = { bash, c, cpp, css, java, javascript, json, markdown, python, rust, sql, typescript, xml, yaml };
for (const [name, def] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, def);

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

// A reply is re-rendered many times while it streams; finished code blocks keep their result.
const highlighted = new Map();
const HIGHLIGHT_CACHE = 64;

function highlight(code, lang, complete) {
  const known = lang && hljs.getLanguage(lang);
  // Guessing the language tries every one: only once the block is complete, not every frame.
  if (!known && (!complete || code.length > 4000)) return escapeHtml(code);
  const key = `${lang}\u0000${code}`;
  let html = highlighted.get(key);
  if (html === undefined) {
    html = known ? hljs.highlight(code, { language: lang, ignoreIllegals: true }).value : hljs.highlightAuto(code).value;
    if (highlighted.size >= HIGHLIGHT_CACHE) highlighted.delete(highlighted.keys().next().value);
    highlighted.set(key, html);
  }
  return html;
}

const marked = new Marked({
  gfm: true,
  breaks: false,
  async: false,
  renderer: {
    code({ text, lang, raw, codeBlockStyle }) {
      const language = (lang || '').trim().split(/\s+/)[0].toLowerCase();
      const label = language ? `<span class="code-lang">${escapeHtml(language)}</span>` : '';
      const complete = final || codeBlockStyle === 'indented' || /\n {0,3}(`{3,}|~{3,})\s*$/.test(raw);
      return `<pre>${label}<code class="hljs">${highlight(text.replace(/\n$/, ''), language, complete)}</code></pre>\n`;
    },
    html({ text }) {
      return escapeHtml(text);
    },
    // A link (also a bare URL or e-mail address, which GFM turns into one) is its text, styled
    // like the text around it: nothing on a kiosk may look tappable that does nothing.
    link({ tokens }) {
      return this.parser.parseInline(tokens);
    },
    image({ text }) {
      return escapeHtml(text);
    },
  },
});

const PURIFY = {
  ALLOWED_TAGS: [
    'p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'strong', 'em', 'del', 'code', 'pre', 'span',
    'blockquote', 'ul', 'ol', 'li', 'table', 'thead', 'tbody', 'tr', 'th', 'td', 'input',
  ],
  ALLOWED_ATTR: ['class', 'align', 'start', 'type', 'checked', 'disabled'],
  ALLOW_DATA_ATTR: false,
};

let final = false; // the text is a whole reply: a code block left open is complete all the same

/** Markdown -> sanitised HTML string; `isFinal`: the reply has ended. */
export function renderMarkdown(text, isFinal) {
  final = isFinal;
  try {
    return DOMPurify.sanitize(marked.parse(text), PURIFY);
  } finally {
    final = false;
  }
}
