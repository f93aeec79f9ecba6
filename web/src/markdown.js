// A small Markdown renderer that builds DOM nodes and never parses HTML.
//
// Model output is untrusted: every piece of text reaches the page through
// document.createTextNode / textContent, so "<script>" or an "onerror="
// attribute in a reply is shown as the characters it is, never run. Links are
// made only for http(s) URLs, opened in a new tab without an opener.
//
// Supported: fenced code blocks (```lang ... ```; an unclosed fence while a
// reply is streaming renders as code so far), ATX headings, bullet and
// numbered lists, block quotes, paragraphs, and inline `code`, **bold**,
// *italic* / _italic_, [text](https://...).

const FENCE = /^\s{0,3}(```+|~~~+)\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const INLINE =
  /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\w])__(?=\S)([\s\S]*?\S)__(?![\w])|\*(?=[^\s*])([^*]*?[^\s*])\*|(?<![\w])_(?=[^\s_])([^_]*?[^\s_])_(?![\w])|\[([^\]\n]+)\]\((https?:\/\/[^\s()<>]+)\)/g;

function closesFence(line, fence) {
  const m = /^\s{0,3}(`{3,}|~{3,})\s*$/.exec(line);
  return m !== null && m[1][0] === fence[0] && m[1].length >= fence.length;
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** Append the inline Markdown of `text` to `parent` as text, code, strong, em and link nodes. */
export function renderInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[2] !== undefined) {
      const code = el("code");
      code.textContent = m[2].replace(/^ (.*) $/s, "$1");
      parent.append(code);
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const strong = el("strong");
      renderInline(strong, m[3] ?? m[4]);
      parent.append(strong);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      const em = el("em");
      renderInline(em, m[5] ?? m[6]);
      parent.append(em);
    } else {
      const a = el("a");
      a.textContent = m[7];
      a.href = m[8]; // matched ^https?:// above: no javascript: or data: URLs
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      parent.append(a);
    }
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function codeBlock(lang, lines) {
  const wrap = el("div", "code-block");
  const bar = el("div", "code-bar");
  const label = el("span", "code-lang");
  label.textContent = lang || "code";
  const copy = el("button", "code-copy");
  copy.type = "button";
  copy.textContent = "copy";
  const pre = el("pre");
  const code = el("code");
  if (lang) code.dataset.lang = lang;
  code.textContent = lines.join("\n");
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code.textContent).then(
      () => { copy.textContent = "copied"; },
      () => { copy.textContent = "copy failed"; },
    );
  });
  bar.append(label, copy);
  pre.append(code);
  wrap.append(bar, pre);
  return wrap;
}

/** Render `text` as Markdown into a new DocumentFragment (text nodes only; no HTML is parsed). */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let para = [];
  const flush = () => {
    if (para.length) {
      const p = el("p");
      renderInline(p, para.join("\n"));
      out.append(p);
      para = [];
    }
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      flush();
      const fence = m[1];
      const body = [];
      i += 1;
      while (i < lines.length && !closesFence(lines[i], fence)) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end of an unfinished block)
      out.append(codeBlock(m[2], body));
      continue;
    }
    if (!line.trim()) { flush(); i += 1; continue; }
    if (RULE.test(line)) { flush(); out.append(el("hr")); i += 1; continue; }
    if ((m = HEADING.exec(line))) {
      flush();
      const h = el(`h${Math.min(6, m[1].length + 2)}`); // keep headings smaller than the page's own
      renderInline(h, m[2]);
      out.append(h);
      i += 1;
      continue;
    }
    if (BULLET.test(line) || NUMBERED.test(line)) {
      flush();
      const ordered = !BULLET.test(line);
      const list = el(ordered ? "ol" : "ul");
      if (ordered) {
        const start = Number(NUMBERED.exec(line)[1]);
        if (start !== 1) list.start = start;
      }
      const re = ordered ? NUMBERED : BULLET;
      while (i < lines.length && (m = re.exec(lines[i]))) {
        const li = el("li");
        renderInline(li, ordered ? m[2] : m[1]);
        list.append(li);
        i += 1;
      }
      out.append(list);
      continue;
    }
    if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { quoted.push(m[1]); i += 1; }
      const bq = el("blockquote");
      bq.append(renderMarkdown(quoted.join("\n")));
      out.append(bq);
      continue;
    }
    para.push(line);
    i += 1;
  }
  flush();
  return out;
}
