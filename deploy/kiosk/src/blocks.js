// Where a streaming reply can be cut so that the Markdown before the cut renders the same however
// the reply goes on: the start of a line that follows a blank line, begins at column 0 (not an
// indented continuation or code) and lies outside fenced code. The kiosk renders the text before
// such a cut once and, every frame, only the rest. Pure logic, no DOM.

const FENCE = /^ {0,3}(`{3,}|~{3,})/;

/**
 * The last cut in `text` at or after `from` (which must itself be a cut, or 0); `from` if none.
 * Of the line still being written only the first character counts.
 */
export function stableEnd(text, from = 0) {
  let fence = null; // the opening marker while inside fenced code
  let cut = from;
  let pos = from;
  let prevBlank = false;
  while (pos < text.length) {
    const nl = text.indexOf('\n', pos);
    if (nl === -1) {
      // The line still being written: a cut may fall before it (its first character is known),
      // but what it is (a fence?) is not known yet.
      if (fence === null && prevBlank && !/^\s/.test(text[pos])) cut = pos;
      break;
    }
    const line = text.slice(pos, nl);
    const m = FENCE.exec(line);
    if (fence !== null) {
      if (m && m[1][0] === fence[0] && m[1].length >= fence.length && line.trim() === m[1]) fence = null;
      prevBlank = false;
    } else {
      if (prevBlank && line !== '' && !/^\s/.test(line)) cut = pos;
      if (m) fence = m[1];
      prevBlank = line.trim() === '';
    }
    pos = nl + 1;
  }
  return cut;
}
