// glmserve chat UI: a small, safe Markdown renderer.
//
// Safety by construction: the renderer builds DOM nodes with document.createElement() and
// document.createTextNode() only. It never uses innerHTML/outerHTML/insertAdjacentHTML,
// never sets an attribute from model text except a link's href (after safeHref() has parsed
// it and allowed only http:, https: and mailto:) and a sanitised `language-xxx` class on code
// blocks. Raw HTML in the input ("<script>", "<img onerror=...>") is therefore shown as text.
// Images are never loaded: `![alt](url)` becomes an ordinary link.
//
// Supported: paragraphs (single newlines are line breaks), ATX and setext headings, fenced code
// blocks (an unclosed fence, as happens mid-stream, runs to the end), block quotes, ordered
// and unordered lists (nested, task-list boxes), GFM tables, horizontal rules, **strong**,
// *emphasis*, ~~strike~~, `code`, [links](https://...), <https://autolinks> and bare URLs.

const SAFE_PROTOCOLS = new Set(['http:', 'https:', 'mailto:']);
const MAX_DEPTH = 12; // nesting limit for quotes/lists/inline spans (hostile input)
const SEARCH_WINDOW = 2000; // how far to look for a closing delimiter

/** Returns a normalised absolute URL if it is safe to link to, else null. */
export function safeHref(raw) {
  if (typeof raw !== 'string') return null;
  const s = raw.trim();
  // eslint-disable-next-line no-control-regex
  if (!s || /[\u0000-\u001f\u007f\s]/.test(s)) return null;
  let url;
  try {
    url = new URL(s); // no base: relative URLs are rejected
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

/** Renders Markdown source to a DocumentFragment. */
export function renderMarkdown(src, doc = globalThis.document) {
  const frag = doc.createDocumentFragment();
  const lines = String(src ?? '')
    .replace(/\r\n?/g, '\n')
    .replace(/\u0000/g, '\ufffd')
    .split('\n');
  renderBlocks(lines, frag, doc, 0);
  return frag;
}

/** Renders Markdown to a detached <div> (convenient for tests). */
export function renderToElement(src, doc = globalThis.document) {
  const div = doc.createElement('div');
  div.appendChild(renderMarkdown(src, doc));
  return div;
}

// ---------------------------------------------------------------- block level

const FENCE_OPEN = /^( {0,3})(`{3,}|~{3,})(.*)$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const HR = /^ {0,3}(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})$/;
const QUOTE = /^ {0,3}>[ ]?(.*)$/;
const LIST_ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*))?$/;
const TABLE_DELIM = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const SETEXT = /^ {0,3}(=+|-+)[ \t]*$/;

const isBlank = (line) => /^[ \t]*$/.test(line);
const indentOf = (line) => {
  let n = 0;
  for (const ch of line) {
    if (ch === ' ') n += 1;
    else if (ch === '\t') n += 4 - (n % 4);
    else break;
  }
  return n;
};
const stripIndent = (line, n) => {
  let i = 0;
  let col = 0;
  while (i < line.length && col < n && (line[i] === ' ' || line[i] === '\t')) {
    col += line[i] === '\t' ? 4 - (col % 4) : 1;
    i += 1;
  }
  return line.slice(i);
};

function fenceInfo(line) {
  const m = FENCE_OPEN.exec(line);
  if (!m) return null;
  if (m[2][0] === '`' && m[3].includes('`')) return null;
  return { indent: m[1].length, char: m[2][0], len: m[2].length, info: m[3].trim() };
}

function isTableStart(lines, i) {
  return (
    i + 1 < lines.length &&
    lines[i].includes('|') &&
    lines[i + 1].includes('|') &&
    TABLE_DELIM.test(lines[i + 1]) &&
    splitRow(lines[i]).length === splitRow(lines[i + 1]).length
  );
}

function startsBlock(lines, i, inParagraph) {
  const line = lines[i];
  if (fenceInfo(line) || HEADING.test(line) || HR.test(line) || QUOTE.test(line)) return true;
  if (isTableStart(lines, i)) return true;
  const li = LIST_ITEM.exec(line);
  if (li && li[1].length <= 3 && li[4] !== undefined && li[4].trim() !== '') {
    // An ordered list interrupts a paragraph only when it starts at 1 (CommonMark).
    return !inParagraph || !/\d/.test(li[2]) || /^0*1[.)]$/.test(li[2]);
  }
  return false;
}

function renderBlocks(lines, parent, doc, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i += 1;
      continue;
    }

    const fence = fenceInfo(line);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length) {
        const close = /^ {0,3}(`{3,}|~{3,})[ \t]*$/.exec(lines[i]);
        if (close && close[1][0] === fence.char && close[1].length >= fence.len) {
          i += 1;
          break;
        }
        body.push(stripIndent(lines[i], fence.indent));
        i += 1;
      }
      parent.appendChild(codeBlock(body.join('\n'), fence.info.split(/\s+/)[0] || '', doc));
      continue;
    }

    const heading = HEADING.exec(line);
    if (heading) {
      const h = doc.createElement(`h${heading[1].length}`);
      renderInline(heading[2] || '', h, doc, depth);
      parent.appendChild(h);
      i += 1;
      continue;
    }

    if (HR.test(line)) {
      parent.appendChild(doc.createElement('hr'));
      i += 1;
      continue;
    }

    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && !isBlank(lines[i])) {
        const q = QUOTE.exec(lines[i]);
        if (q) inner.push(q[1]);
        else if (startsBlock(lines, i, true)) break;
        else inner.push(lines[i]); // lazy continuation
        i += 1;
      }
      const bq = doc.createElement('blockquote');
      if (depth >= MAX_DEPTH) appendText(bq, inner.join('\n'), doc);
      else renderBlocks(inner, bq, doc, depth + 1);
      parent.appendChild(bq);
      continue;
    }

    if (isTableStart(lines, i)) {
      i = renderTable(lines, i, parent, doc, depth);
      continue;
    }

    const li = LIST_ITEM.exec(line);
    if (li && li[1].length <= 3) {
      i = renderList(lines, i, parent, doc, depth);
      continue;
    }

    // Paragraph (possibly a setext heading).
    const para = [line.trim()];
    i += 1;
    let setext = 0;
    while (i < lines.length && !isBlank(lines[i])) {
      const st = SETEXT.exec(lines[i]);
      if (st) {
        setext = st[1][0] === '=' ? 1 : 2;
        i += 1;
        break;
      }
      if (startsBlock(lines, i, true)) break;
      para.push(lines[i].trim());
      i += 1;
    }
    const p = doc.createElement(setext ? `h${setext}` : 'p');
    renderInline(para.join('\n'), p, doc, depth);
    parent.appendChild(p);
  }
}

function codeBlock(text, lang, doc) {
  const wrap = doc.createElement('div');
  wrap.className = 'code-block';
  const head = doc.createElement('div');
  head.className = 'code-head';
  const label = doc.createElement('span');
  label.className = 'code-lang';
  const cleanLang = lang.replace(/[^\w+#.-]/g, '').slice(0, 32);
  label.textContent = cleanLang || 'text';
  const copy = doc.createElement('button');
  copy.type = 'button';
  copy.className = 'copy-code';
  copy.dataset.action = 'copy-code';
  copy.dataset.testid = 'copy-code';
  copy.textContent = 'Copy';
  head.append(label, copy);
  const pre = doc.createElement('pre');
  const code = doc.createElement('code');
  if (cleanLang) code.className = `language-${cleanLang}`;
  code.textContent = text;
  pre.appendChild(code);
  wrap.append(head, pre);
  return wrap;
}

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith('|')) s = s.slice(1);
  if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
  const cells = [];
  let cur = '';
  for (let k = 0; k < s.length; k += 1) {
    if (s[k] === '\\' && s[k + 1] === '|') {
      cur += '|';
      k += 1;
    } else if (s[k] === '|') {
      cells.push(cur.trim());
      cur = '';
    } else {
      cur += s[k];
    }
  }
  cells.push(cur.trim());
  return cells;
}

function renderTable(lines, i, parent, doc, depth) {
  const header = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((c) => {
    const left = c.startsWith(':');
    const right = c.endsWith(':');
    if (left && right) return 'center';
    if (right) return 'right';
    if (left) return 'left';
    return '';
  });
  const wrap = doc.createElement('div');
  wrap.className = 'table-wrap';
  const table = doc.createElement('table');
  const thead = doc.createElement('thead');
  const tbody = doc.createElement('tbody');
  const row = (cells, tag) => {
    const tr = doc.createElement('tr');
    for (let c = 0; c < header.length; c += 1) {
      const cell = doc.createElement(tag);
      if (aligns[c]) cell.style.textAlign = aligns[c]; // CSSOM: a fixed keyword, not input
      renderInline(cells[c] ?? '', cell, doc, depth);
      tr.appendChild(cell);
    }
    return tr;
  };
  thead.appendChild(row(header, 'th'));
  i += 2;
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes('|')) {
    if (fenceInfo(lines[i]) || HEADING.test(lines[i]) || QUOTE.test(lines[i])) break;
    tbody.appendChild(row(splitRow(lines[i]), 'td'));
    i += 1;
  }
  table.append(thead, tbody);
  wrap.appendChild(table);
  parent.appendChild(wrap);
  return i;
}

function markerKind(marker) {
  return /\d/.test(marker) ? `ol${marker.slice(-1)}` : `ul${marker}`;
}

function renderList(lines, i, parent, doc, depth) {
  const first = LIST_ITEM.exec(lines[i]);
  const kind = markerKind(first[2]);
  const ordered = kind.startsWith('ol');
  const list = doc.createElement(ordered ? 'ol' : 'ul');
  if (ordered) {
    const start = parseInt(first[2], 10);
    if (Number.isFinite(start) && start !== 1) list.start = start;
  }
  const baseIndent = first[1].length;
  const items = [];
  let loose = false;

  while (i < lines.length) {
    const m = LIST_ITEM.exec(lines[i]);
    if (!m || HR.test(lines[i]) || markerKind(m[2]) !== kind) break;
    if (m[1].length > baseIndent + 1 || m[1].length > 3 + baseIndent) break;
    let spaces = m[3] ? indentOf(m[3]) : 1;
    if (spaces > 4) spaces = 1;
    const contentIndent = m[1].length + m[2].length + spaces;
    const itemLines = [m[4] === undefined ? '' : stripIndent(m[3] + m[4], spaces)];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      if (isBlank(line)) {
        let j = i + 1;
        while (j < lines.length && isBlank(lines[j])) j += 1;
        if (j < lines.length && indentOf(lines[j]) >= contentIndent) {
          for (let k = i; k < j; k += 1) itemLines.push('');
          loose = true;
          i = j;
          continue;
        }
        if (j < lines.length) {
          const next = LIST_ITEM.exec(lines[j]);
          if (next && markerKind(next[2]) === kind && next[1].length <= baseIndent + 1) loose = true;
        }
        i = j;
        break;
      }
      const ind = indentOf(line);
      if (ind >= contentIndent) {
        itemLines.push(stripIndent(line, contentIndent));
      } else {
        const sub = LIST_ITEM.exec(line);
        if (sub) {
          if (sub[1].length > baseIndent) itemLines.push(stripIndent(line, sub[1].length));
          else break; // a sibling (or the end of this list)
        } else if (startsBlock(lines, i, true) || itemLines[itemLines.length - 1] === '') {
          break;
        } else {
          itemLines.push(line.trim()); // lazy paragraph continuation
        }
      }
      i += 1;
    }
    items.push(itemLines);
    if (i < lines.length && isBlank(lines[i])) break;
  }

  for (const itemLines of items) {
    const li = doc.createElement('li');
    const task = /^\[([ xX])\][ \t]+/.exec(itemLines[0]);
    if (task) {
      const box = doc.createElement('input');
      box.type = 'checkbox';
      box.disabled = true;
      box.checked = task[1] !== ' ';
      li.className = 'task';
      li.appendChild(box);
      itemLines[0] = itemLines[0].slice(task[0].length);
    }
    if (depth >= MAX_DEPTH) appendText(li, itemLines.join('\n'), doc);
    else renderBlocks(itemLines, li, doc, depth + 1);
    if (!loose) {
      for (const child of [...li.childNodes]) {
        if (child.nodeName === 'P') {
          while (child.firstChild) li.insertBefore(child.firstChild, child);
          li.removeChild(child);
        }
      }
    }
    list.appendChild(li);
  }
  parent.appendChild(list);
  return i;
}

// ---------------------------------------------------------------- inline level

const PUNCT = /[!-/:-@[-`{-~]/;
const isSpace = (ch) => ch === undefined || /\s/.test(ch);
const isWordChar = (ch) => ch !== undefined && /[\p{L}\p{N}_]/u.test(ch);
const BARE_URL = /^(?:https?:\/\/|mailto:)[^\s<>"'`]+/i;

function appendText(parent, text, doc) {
  if (!text) return;
  const last = parent.lastChild;
  if (last && last.nodeType === 3) last.appendData(text);
  else parent.appendChild(doc.createTextNode(text));
}

function findClosing(text, delim, from, check) {
  const limit = Math.min(text.length, from + SEARCH_WINDOW);
  let j = text.indexOf(delim, from);
  while (j !== -1 && j < limit) {
    if (check(j)) return j;
    j = text.indexOf(delim, j + 1);
  }
  return -1;
}

function matchBracket(text, from, open, close) {
  // `from` is the index just after the opening bracket; returns the index of its match.
  let level = 1;
  const limit = Math.min(text.length, from + SEARCH_WINDOW);
  for (let k = from; k < limit; k += 1) {
    const ch = text[k];
    if (ch === '\\') k += 1;
    else if (ch === open) level += 1;
    else if (ch === close && --level === 0) return k;
    else if (ch === '\n' && text[k + 1] === '\n') return -1;
  }
  return -1;
}

function trimUrlTail(url) {
  let out = url.replace(/[.,;:!?*_~'"]+$/, '');
  // Drop unbalanced trailing parentheses: "(see https://x.org/a)".
  while (out.endsWith(')') && (out.match(/\(/g) || []).length < (out.match(/\)/g) || []).length) {
    out = out.slice(0, -1);
  }
  return out;
}

function link(href, parent, doc) {
  const a = doc.createElement('a');
  a.href = href;
  a.target = '_blank';
  a.rel = 'noopener noreferrer nofollow';
  parent.appendChild(a);
  return a;
}

function renderInline(text, parent, doc, depth, inLink = false) {
  if (depth > MAX_DEPTH * 2) {
    appendText(parent, text, doc);
    return;
  }
  let buf = '';
  const flush = () => {
    appendText(parent, buf, doc);
    buf = '';
  };
  let i = 0;
  while (i < text.length) {
    const ch = text[i];

    if (ch === '\\' && i + 1 < text.length && PUNCT.test(text[i + 1])) {
      buf += text[i + 1];
      i += 2;
      continue;
    }

    if (ch === '\n') {
      flush();
      parent.appendChild(doc.createElement('br'));
      i += 1;
      continue;
    }

    if (ch === '`') {
      let n = 1;
      while (text[i + n] === '`') n += 1;
      const run = '`'.repeat(n);
      const j = findClosing(text, run, i + n, (k) => text[k + n] !== '`' && text[k - 1] !== '`');
      if (j !== -1) {
        flush();
        let body = text.slice(i + n, j).replace(/\n/g, ' ');
        if (body.length > 2 && body.startsWith(' ') && body.endsWith(' ') && body.trim()) {
          body = body.slice(1, -1);
        }
        const code = doc.createElement('code');
        code.textContent = body;
        parent.appendChild(code);
        i = j + n;
      } else {
        buf += run;
        i += n;
      }
      continue;
    }

    if ((ch === '*' || ch === '_' || ch === '~') && text[i + 1] === ch && text[i + 2] !== ch) {
      const d = ch + ch;
      const opensOk = !isSpace(text[i + 2]) && (ch !== '_' || !isWordChar(text[i - 1]));
      const j = opensOk
        ? findClosing(
            text,
            d,
            i + 3,
            (k) => !isSpace(text[k - 1]) && text[k + 2] !== ch && (ch !== '_' || !isWordChar(text[k + 2])),
          )
        : -1;
      if (j !== -1) {
        flush();
        const el = doc.createElement(ch === '~' ? 'del' : 'strong');
        renderInline(text.slice(i + 2, j), el, doc, depth + 1, inLink);
        parent.appendChild(el);
        i = j + 2;
        continue;
      }
      buf += d;
      i += 2;
      continue;
    }

    if ((ch === '*' || ch === '_') && text[i + 1] !== ch) {
      const opensOk = !isSpace(text[i + 1]) && (ch !== '_' || !isWordChar(text[i - 1]));
      const j = opensOk
        ? findClosing(
            text,
            ch,
            i + 2,
            (k) =>
              !isSpace(text[k - 1]) &&
              text[k - 1] !== ch &&
              text[k + 1] !== ch &&
              (ch !== '_' || !isWordChar(text[k + 1])),
          )
        : -1;
      if (j !== -1) {
        flush();
        const em = doc.createElement('em');
        renderInline(text.slice(i + 1, j), em, doc, depth + 1, inLink);
        parent.appendChild(em);
        i = j + 1;
        continue;
      }
    }

    if (!inLink && (ch === '[' || (ch === '!' && text[i + 1] === '['))) {
      const isImage = ch === '!';
      const open = i + (isImage ? 2 : 1);
      const close = matchBracket(text, open, '[', ']');
      if (close !== -1 && text[close + 1] === '(') {
        const end = matchBracket(text, close + 2, '(', ')');
        if (end !== -1) {
          const label = text.slice(open, close);
          const target = text.slice(close + 2, end).trim().replace(/^<(.*)>$/, '$1');
          const url = target.split(/\s+/)[0];
          const href = safeHref(url);
          flush();
          if (href) {
            const a = link(href, parent, doc);
            if (isImage) {
              a.className = 'image-link';
              appendText(a, label ? `Image: ${label}` : 'Image', doc);
            } else {
              renderInline(label || url, a, doc, depth + 1, true);
            }
          } else {
            // Unsafe or relative target (javascript:, data:, ...): keep only the label, as text.
            renderInline(label, parent, doc, depth + 1, true);
          }
          i = end + 1;
          continue;
        }
      }
    }

    if (!inLink && ch === '<') {
      const m = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(text.slice(i, i + SEARCH_WINDOW));
      const href = m && safeHref(m[1]);
      if (href) {
        flush();
        appendText(link(href, parent, doc), m[1], doc);
        i += m[0].length;
        continue;
      }
    }

    if (!inLink && (ch === 'h' || ch === 'H' || ch === 'm' || ch === 'M') && !isWordChar(text[i - 1])) {
      const m = BARE_URL.exec(text.slice(i, i + SEARCH_WINDOW));
      if (m) {
        const url = trimUrlTail(m[0]);
        const href = url.length > 8 && safeHref(url);
        if (href) {
          flush();
          appendText(link(href, parent, doc), url, doc);
          i += url.length;
          continue;
        }
      }
    }

    buf += ch;
    i += 1;
  }
  flush();
}
