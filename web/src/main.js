// The lamabus chat page: a NATS client in the browser (WebSocket).
//
// Everything goes over the bus, as for any other frontend (docs/wire.md,
// docs/api.md): topics and settings through the request/reply API
// (<prefix>.api.*), a topic's conversation from JetStream (an ordered consumer
// on <prefix>.topic.<T>.msg and .evt: history first, then live), streamed
// tokens from core NATS (<prefix>.topic.<T>.tok), stop through
// <prefix>.topic.<T>.cancel. The page gets the WebSocket URL, the prefix and
// the stream's name from the server's /config.json.
//
// Model output is untrusted: it reaches the DOM only as text nodes
// (markdown.js builds elements; nothing here assigns innerHTML).
//
// Logging in: when config.json names a user (the embedded broker's `chat`), the page
// logs in as that user with the token from its address (`#token=...`, printed by
// `lamabus serve`), kept for this tab only (sessionStorage) and removed from the
// address bar; without one it asks. The broker enforces what `chat` may do
// (docs/security.md): a refused request shows as a `forbidden` notice.

import { wsconnect, nuid } from "@nats-io/nats-core";
import { jetstream } from "@nats-io/jetstream";
import { renderMarkdown } from "./markdown.js";

const TOPIC_RE = /^[A-Za-z0-9_-]{1,128}$/;
const API_TIMEOUT = 15000;
const TOKEN_KEY = "lamabus.token"; // sessionStorage: this tab only
const STORE = {
  author: "lamabus.authorId",
  temperature: "lamabus.temperature",
  maxTokens: "lamabus.maxTokens",
};

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("connection-status"),
  author: $("author-input"),
  topics: $("topic-list"),
  newTopic: $("new-topic-input"),
  createTopic: $("create-topic-button"),
  topicTitle: $("topic-title"),
  topicModel: $("topic-model"),
  analysis: $("topic-analysis"),
  analysisTitle: $("analysis-title"),
  analysisLanguage: $("analysis-language"),
  analysisKeywords: $("analysis-keywords"),
  analysisSummary: $("analysis-summary"),
  messages: $("messages"),
  empty: $("empty-note"),
  notice: $("notice"),
  input: $("message-input"),
  send: $("send-button"),
  stop: $("stop-button"),
  modelSelect: $("model-select"),
  systemPrompt: $("system-prompt-input"),
  saveSystemPrompt: $("save-system-prompt"),
  temperature: $("temperature-input"),
  maxTokens: $("max-tokens-input"),
  settingsNote: $("settings-note"),
  diagRefresh: $("diagnostics-refresh"),
  diagSummary: $("diagnostics-summary"),
  diagJson: $("diagnostics-json"),
  login: $("login"),
  tokenInput: $("token-input"),
  loginButton: $("login-button"),
  loginNote: $("login-note"),
};

const state = {
  config: null,
  nc: null,
  js: null,
  authorId: "",
  topic: null,
  topicRecord: null,
  models: [],
  activeModelId: null,
  aiPersons: new Set(),
  topicList: [],
  view: null, // the open topic's view (see openTopic)
  openSeq: 0,
};

// ------------------------------------------------------------------ small helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showNotice(text, kind = "error") {
  ui.notice.textContent = text;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = !text;
}

function fmt(n, digits = 1) {
  return typeof n === "number" && Number.isFinite(n) ? n.toFixed(digits) : "?";
}

class ApiError extends Error {
  constructor(code, message, details) {
    super(`${code}: ${message}`);
    this.code = code;
    this.details = details;
  }
}

/** The broker's refusal of a publish or subscription this login may not make (nats.js wraps it in the
 *  request's error as its `cause`), or null. */
function permissionError(err) {
  for (let e = err, depth = 0; e && depth < 5; e = e.cause, depth++) {
    if (e.name === "PermissionViolationError") return e;
  }
  return null;
}

function isForbidden(err) {
  return permissionError(err) !== null;
}

/** A coded `forbidden` for a refusal, never a timeout. */
function forbidden(err) {
  const pe = permissionError(err) ?? {};
  return new ApiError("forbidden", `this login may not ${pe.operation ?? "use"} ${pe.subject ?? ""}`.trim());
}

/** A request to the lamabus micro service; a coded error reply is thrown as ApiError. */
async function api(endpoint, payload = {}) {
  const subject = `${state.config.prefix}.api.${endpoint}`;
  let reply;
  try {
    reply = await state.nc.request(subject, JSON.stringify(payload), { timeout: API_TIMEOUT });
  } catch (err) {
    if (isForbidden(err)) throw forbidden(err);
    throw new ApiError(err?.name === "NoRespondersError" ? "unavailable" : "timeout",
                       err?.name === "NoRespondersError" ? "lamabus is not answering" : String(err?.message ?? err));
  }
  const status = reply.headers?.get("Nats-Service-Error-Code");
  if (status) {
    let body = {};
    try { body = reply.json(); } catch { /* not JSON */ }
    throw new ApiError(body.code ?? status, body.message ?? reply.headers.get("Nats-Service-Error") ?? "error",
                       body.details);
  }
  return reply.json();
}

function subject(topic, kind) {
  return `${state.config.prefix}.topic.${topic}.${kind}`;
}

// ------------------------------------------------------------------ the author id

function initAuthor() {
  let id = localStorage.getItem(STORE.author);
  if (!id) {
    id = `web-${nuid.next().slice(-10).toLowerCase()}`;
    localStorage.setItem(STORE.author, id);
  }
  state.authorId = id;
  ui.author.value = id;
  ui.author.addEventListener("change", () => {
    const v = ui.author.value.trim();
    if (v && v.length <= 256) {
      state.authorId = v;
      localStorage.setItem(STORE.author, v);
    } else {
      ui.author.value = state.authorId;
    }
  });
}

// ------------------------------------------------------------------ connection

function setStatus(s, text) {
  ui.status.dataset.state = s;
  ui.status.textContent = text;
}

/** The token in the address (`#token=...`) goes to this tab's storage and out of the address bar. */
function takeTokenFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", `${location.pathname}${location.search}${rest ? `#${rest}` : ""}`);
}

/** Ask for the login token (the page was opened without one, or the broker refused it). */
function askToken(note) {
  ui.login.hidden = false;
  ui.loginNote.textContent = note;
  ui.tokenInput.value = "";
  ui.tokenInput.focus();
  setStatus("disconnected", "log in to connect");
  return new Promise((resolve) => {
    const done = () => {
      const token = ui.tokenInput.value.trim();
      if (!token) return;
      ui.loginButton.removeEventListener("click", done);
      ui.tokenInput.removeEventListener("keydown", onKey);
      ui.login.hidden = true;
      sessionStorage.setItem(TOKEN_KEY, token);
      resolve(token);
    };
    const onKey = (ev) => { if (ev.key === "Enter") done(); };
    ui.loginButton.addEventListener("click", done);
    ui.tokenInput.addEventListener("keydown", onKey);
  });
}

async function connect() {
  const res = await fetch("config.json", { cache: "no-store" });
  state.config = await res.json();
  if (!state.config.wsUrl) {
    setStatus("disconnected", "no NATS WebSocket URL");
    showNotice("The server does not know the broker's WebSocket URL (lamabus serve --nats-ws-url).");
    return false;
  }
  let token = sessionStorage.getItem(TOKEN_KEY);
  if (state.config.user && !token) token = await askToken("This page needs the login token that lamabus serve printed.");
  setStatus("connecting", `connecting to ${state.config.wsUrl}`);
  for (;;) {
    try {
      const login = state.config.user ? { user: state.config.user, pass: token } : {};
      state.nc = await wsconnect({
        servers: state.config.wsUrl,
        name: `lamabus-web ${state.authorId}`,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 500,
        pingInterval: 5000,
        maxPingOut: 2,
        ...login,
      });
      break;
    } catch (err) {
      if (state.config.user && (err?.name === "AuthorizationError" || /authorization/i.test(String(err?.message)))) {
        sessionStorage.removeItem(TOKEN_KEY);
        token = await askToken("The broker refused that token.");
        setStatus("connecting", `connecting to ${state.config.wsUrl}`);
        continue;
      }
      setStatus("disconnected", `cannot reach ${state.config.wsUrl}; retrying`);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  state.js = jetstream(state.nc);
  setStatus("connected", "connected");
  watchStatus(state.nc);
  return true;
}

async function watchStatus(nc) {
  for await (const s of nc.status()) {
    if (s.type === "disconnect") {
      setStatus("reconnecting", "disconnected; reconnecting…");
    } else if (s.type === "reconnecting") {
      setStatus("reconnecting", "reconnecting…");
    } else if (s.type === "reconnect") {
      setStatus("connected", "connected");
      onReconnected();
    }
  }
}

function onReconnected() {
  // Subscriptions come back by themselves (the ordered consumer resumes after the last
  // stream sequence it delivered); refresh what the API told us while we were away.
  refreshTopics();
  refreshModels();
  if (state.topic) loadTopicRecord(state.topic);
}

// ------------------------------------------------------------------ topics and models

async function refreshTopics() {
  try {
    const reply = await api("topics.list");
    renderTopics(reply.topics);
    return reply.topics;
  } catch (err) {
    showNotice(`topics: ${err.message}`);
    return null;
  }
}

function renderTopics(topics) {
  state.topicList = topics;
  ui.topics.replaceChildren();
  for (const t of topics) {
    const li = el("li");
    const b = el("button", "topic", t.name && t.name !== t.id ? `${t.name} (${t.id})` : t.id);
    b.type = "button";
    b.dataset.topic = t.id;
    if (t.analysis) b.append(el("span", "about", t.analysis.title)); // what it is about, as its model saw it
    if (t.id === state.topic) b.setAttribute("aria-current", "true");
    b.addEventListener("click", () => { location.hash = `#topic=${encodeURIComponent(t.id)}`; });
    li.append(b);
    ui.topics.append(li);
  }
  if (state.topic && !topics.some((t) => t.id === state.topic)) {
    // Topics are created on their first message; show the open one anyway.
    const li = el("li");
    const b = el("button", "topic", state.topic);
    b.type = "button";
    b.dataset.topic = state.topic;
    b.setAttribute("aria-current", "true");
    li.append(b);
    ui.topics.append(li);
  }
}

async function refreshModels() {
  try {
    const reply = await api("models.list", { includeDeleted: true });
    state.models = reply.models;
    state.activeModelId = reply.activeModelId;
    for (const m of reply.models) state.aiPersons.add(m.personId);
    renderModelSelect();
  } catch (err) {
    showNotice(`models: ${err.message}`);
  }
}

function renderModelSelect() {
  const bound = state.topicRecord?.boundModelId ?? "";
  ui.modelSelect.replaceChildren();
  const follow = el("option", "", `follow the active model (${state.activeModelId ?? "none"})`);
  follow.value = "";
  ui.modelSelect.append(follow);
  for (const m of state.models) {
    if (m.deleted) continue;
    const o = el("option", "", m.name && m.name !== m.id ? `${m.name} (${m.id})` : m.id);
    o.value = m.id;
    ui.modelSelect.append(o);
  }
  ui.modelSelect.value = bound;
}

async function loadTopicRecord(topic) {
  try {
    const reply = await api("topics.get", { topicId: topic });
    if (topic !== state.topic) return;
    state.topicRecord = reply.topic;
    if (reply.topic.personId) state.aiPersons.add(reply.topic.personId);
  } catch (err) {
    if (topic !== state.topic) return;
    state.topicRecord = null; // not created yet: its first message creates it
    if (err.code !== "not_found") showNotice(`topic: ${err.message}`);
  }
  const rec = state.topicRecord;
  ui.topicModel.textContent = rec ? `answered by ${rec.modelId ?? "no model"}${rec.boundModelId ? " (bound)" : ""}` : "new topic";
  ui.systemPrompt.value = rec?.systemPrompt ?? "";
  renderAnalysis(rec?.analysis ?? null);
  renderModelSelect();
}

// A topic's analysis (topics.get's `analysis`, or a topic.analysed event): model output, so text only.
function renderAnalysis(a) {
  ui.analysis.hidden = !a;
  if (!a) return;
  ui.analysisTitle.textContent = a.title;
  ui.analysisLanguage.textContent = a.language;
  ui.analysisKeywords.replaceChildren(...(a.keywords ?? []).map((k) => el("li", "", k)));
  ui.analysisSummary.textContent = a.summary;
  ui.analysis.dataset.basedOn = a.basedOnMessageId;
}

async function createTopic() {
  const id = ui.newTopic.value.trim();
  if (!TOPIC_RE.test(id)) {
    showNotice("A topic id is 1-128 of A-Z a-z 0-9 _ -");
    return;
  }
  try {
    await api("topics.create", { topicId: id, createdBy: state.authorId });
  } catch (err) {
    // A chat login may not create topics through the API; its first message creates the topic.
    if (err.code !== "conflict" && err.code !== "forbidden") { showNotice(`create topic: ${err.message}`); return; }
  }
  ui.newTopic.value = "";
  showNotice("");
  location.hash = `#topic=${encodeURIComponent(id)}`;
  refreshTopics();
}

// ------------------------------------------------------------------ the conversation view

function newView(topic) {
  return {
    topic,
    messages: new Map(), // chat message id -> element (user messages and replies)
    replies: new Map(), // request id (the user message id) -> reply
    lastStreamSeq: 0, // the last JetStream sequence shown: a redelivery is dropped
    consumer: null,
    tokSub: null,
    closed: false,
  };
}

function isAssistant(m) {
  return state.aiPersons.has(m.authorId) || (m.replyTo != null && m.authorId !== state.authorId);
}

function messageElement(role, authorId) {
  const node = el("article", `message ${role}`);
  node.dataset.testid = "message";
  node.dataset.role = role;
  const head = el("header", "meta");
  const who = el("span", "author", role === "assistant" ? authorLabel(authorId) : authorId);
  head.append(who);
  const body = el("div", "body");
  node.append(head, body);
  return node;
}

function authorLabel(personId) {
  const model = state.models.find((m) => m.personId === personId);
  return model ? `AI · ${model.id}` : `AI · ${String(personId).slice(0, 12)}`;
}

function scrollToEnd() {
  const m = ui.messages;
  if (m.scrollHeight - m.scrollTop - m.clientHeight < 200) m.scrollTop = m.scrollHeight;
}

function insertMessage(node, before = null) {
  ui.empty.hidden = true;
  if (before) ui.messages.insertBefore(node, before);
  else ui.messages.append(node);
  scrollToEnd();
}

function addUserMessage(view, m) {
  const node = messageElement("user", m.authorId);
  node.dataset.id = m.id;
  node.dataset.state = "done";
  node.querySelector(".body").append(renderMarkdown(m.text));
  if (m.params && Object.keys(m.params).length) {
    node.querySelector(".meta").append(el("span", "params", Object.entries(m.params).map(([k, v]) => `${k}=${v}`).join(" ")));
  }
  view.messages.set(m.id, node);
  // A reply that showed first (its tokens came before the message did) goes after it.
  insertMessage(node, view.replies.get(m.id)?.node ?? null);
  return node;
}

function ensureReply(view, requestId, authorId) {
  let r = view.replies.get(requestId);
  if (r) return r;
  const node = messageElement("assistant", authorId);
  node.dataset.requestId = requestId;
  node.dataset.state = "streaming";
  const thinking = el("details", "thinking");
  thinking.dataset.testid = "thinking";
  thinking.hidden = true;
  const summary = el("summary", "", "thinking");
  const thinkingBody = el("div", "thinking-body");
  thinking.append(summary, thinkingBody);
  const content = el("div", "content");
  const note = el("div", "note");
  note.dataset.testid = "reply-note";
  const stats = el("footer", "stats");
  stats.dataset.testid = "reply-stats";
  node.querySelector(".body").append(thinking, content, note);
  node.append(stats);
  r = { node, requestId, content, thinking, thinkingBody, note, stats, text: "", thinkingText: "",
        lastSeq: -1, pending: false };
  view.replies.set(requestId, r);
  // Right after the message it answers when that one is shown, else at the end.
  const asked = view.messages.get(requestId);
  insertMessage(node, asked ? asked.nextSibling : null);
  updateStop();
  return r;
}

function renderReply(r) {
  r.pending = false;
  r.content.replaceChildren(renderMarkdown(r.text));
  if (r.thinkingText) {
    r.thinking.hidden = false;
    r.thinkingBody.textContent = r.thinkingText;
  }
  scrollToEnd();
}

function scheduleRender(r) {
  if (r.pending) return;
  r.pending = true;
  requestAnimationFrame(() => renderReply(r));
}

function setReplyState(r, s, note = "") {
  r.node.dataset.state = s;
  r.note.textContent = note;
  r.note.dataset.kind = s === "failed" ? "error" : s === "cancelled" ? "warn" : "info";
  updateStop();
}

function onChatMessage(view, m) {
  if (view.messages.has(m.id)) return; // shown already (our own, or redelivered)
  if (!isAssistant(m)) {
    addUserMessage(view, m);
    return;
  }
  if (m.replyTo) {
    const r = ensureReply(view, m.replyTo, m.authorId);
    view.messages.set(m.id, r.node);
    r.node.dataset.id = m.id;
    r.text = m.text;
    renderReply(r);
    if (r.node.dataset.state === "streaming") setReplyState(r, "done");
    return;
  }
  // An AI-authored message that answers nothing: shown as a finished reply.
  const r = ensureReply(view, `msg:${m.id}`, m.authorId);
  view.messages.set(m.id, r.node);
  r.node.dataset.id = m.id;
  r.text = m.text;
  renderReply(r);
  setReplyState(r, "done");
}

function onEvent(view, e) {
  switch (e.type) {
    case "generation.started": {
      state.aiPersons.add(e.authorId);
      const r = ensureReply(view, e.requestId, e.authorId);
      r.modelId = e.modelId;
      r.node.querySelector(".author").textContent = `AI · ${e.modelId}`;
      if (r.node.dataset.state === "streaming" && !r.text) {
        r.note.textContent = e.queuePosition > 0 ? `queued: ${e.queuePosition} ahead` : "generating…";
        r.note.dataset.kind = e.queuePosition > 0 ? "queue" : "info";
        r.waiting = true;
      }
      break;
    }
    case "generation.completed": {
      state.aiPersons.add(e.authorId);
      const r = ensureReply(view, e.requestId, e.authorId);
      r.text = e.text;
      r.thinkingText = e.thinking ?? "";
      r.node.querySelector(".author").textContent = `AI · ${e.modelId}`;
      renderReply(r);
      setReplyState(r, "done");
      renderStats(r, e);
      break;
    }
    case "generation.cancelled": {
      const r = ensureReply(view, e.requestId, e.authorId);
      if ((e.text ?? "").length >= r.text.length) r.text = e.text ?? "";
      renderReply(r);
      setReplyState(r, "cancelled", `stopped after ${e.tokens} tokens`);
      break;
    }
    case "generation.failed": {
      const r = ensureReply(view, e.requestId, null);
      const { code, message } = e.error ?? {};
      const text = code === "busy" ? `busy: ${message} — send it again later` : `failed (${code}): ${message}`;
      renderReply(r);
      setReplyState(r, "failed", text);
      if (!r.modelId) r.node.querySelector(".author").textContent = "lamabus";
      break;
    }
    case "topic.analysed": {
      // History replays older analyses first; the last one read is the latest.
      if (view.topic === state.topic) renderAnalysis(e);
      break;
    }
    case "message.rejected": {
      const node = e.messageId ? view.messages.get(e.messageId) : null;
      const text = `rejected (${e.error?.code}): ${e.error?.message}`;
      if (node) {
        node.dataset.state = "failed";
        const note = el("div", "note", text);
        note.dataset.kind = "error";
        note.dataset.testid = "rejected";
        node.querySelector(".body").append(note);
      } else {
        showNotice(text);
      }
      break;
    }
    default:
      break;
  }
}

function renderStats(r, e) {
  const t = e.timing ?? {};
  const u = e.usage ?? {};
  const parts = [
    ["model", e.modelId],
    ["tok/s", fmt(t.tokensPerSecond)],
    ["TTFT", `${fmt(t.timeToFirstToken, 0)} ms`],
    ["finish", e.finishReason],
    ["tokens", String(e.tokens)],
    ["cached", String(u.cachedTokens ?? 0)],
  ];
  if (t.queueTime) parts.push(["queued", `${fmt(t.queueTime, 0)} ms`]);
  r.stats.replaceChildren();
  for (const [k, v] of parts) {
    const s = el("span", "stat");
    s.dataset.stat = k;
    s.append(el("b", "", `${k} `), document.createTextNode(v));
    r.stats.append(s);
  }
}

function onToken(view, t) {
  if (view.closed) return;
  const r = ensureReply(view, t.requestId, t.authorId);
  if (r.node.dataset.state !== "streaming" || t.seq <= r.lastSeq) return;
  r.lastSeq = t.seq;
  if (t.channel === "thinking") r.thinkingText += t.text;
  else r.text += t.text;
  if (r.waiting) {
    r.waiting = false;
    r.note.textContent = "";
  }
  scheduleRender(r);
}

function runningReply() {
  const view = state.view;
  if (!view) return null;
  let last = null;
  for (const r of view.replies.values()) if (r.node.dataset.state === "streaming") last = r;
  return last;
}

function updateStop() {
  ui.stop.disabled = runningReply() === null;
}

async function closeView(view) {
  if (!view) return;
  view.closed = true;
  try { view.tokSub?.unsubscribe(); } catch { /* closed with the connection */ }
  try { await view.consumer?.close(); } catch { /* gone already */ }
}

async function openTopic(topic) {
  if (!TOPIC_RE.test(topic)) { showNotice(`not a topic id: ${topic}`); return; }
  const seq = ++state.openSeq;
  const old = state.view;
  state.view = null;
  await closeView(old);
  if (seq !== state.openSeq) return;
  const view = newView(topic);
  state.view = view;
  state.topic = topic;
  state.topicRecord = null;
  document.body.dataset.history = "loading";
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.topicTitle.textContent = topic;
  ui.topicModel.textContent = "";
  ui.settingsNote.textContent = "";
  document.title = `${topic} · lamabus`;
  renderTopics(state.topicList);
  updateStop();
  loadTopicRecord(topic);

  view.tokSub = state.nc.subscribe(subject(topic, "tok"), {
    callback: (err, msg) => {
      // A reply of $JS.ACK.: stored bytes a JetStream consumer replays onto the subject, not lamabus's.
      if (err || msg.reply?.startsWith("$JS.ACK.")) return;
      try { onToken(view, msg.json()); } catch { /* not a token */ }
    },
  });
  // History, then live: an ordered consumer delivers the stream from the start and
  // resumes after its last delivered sequence when the broker comes back.
  for (;;) {
    try {
      const consumer = await state.js.consumers.get(state.config.stream, {
        filter_subjects: [subject(topic, "msg"), subject(topic, "evt")],
      });
      const info = await consumer.info(true);
      if (view.closed) return;
      if (info.num_pending === 0) document.body.dataset.history = "loaded";
      view.consumer = await consumer.consume();
      break;
    } catch (err) {
      if (view.closed) return;
      showNotice(`history: ${err.message}; retrying`);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  showNotice("");
  for await (const jm of view.consumer) {
    if (view.closed) break;
    if (jm.seq <= view.lastStreamSeq) continue;
    view.lastStreamSeq = jm.seq;
    let payload;
    try { payload = jm.json(); } catch { continue; }
    try {
      if (payload.type === "chat.message") onChatMessage(view, payload);
      else onEvent(view, payload);
    } catch (err) {
      console.error("could not show", payload, err);
    }
    if (jm.info.pending === 0) document.body.dataset.history = "loaded";
  }
}

// ------------------------------------------------------------------ sending and stopping

function messageParams() {
  const params = {};
  const t = ui.temperature.value.trim();
  const n = ui.maxTokens.value.trim();
  if (t !== "") params.temperature = Number(t);
  if (n !== "") params.maxTokens = Number.parseInt(n, 10);
  return Object.keys(params).length ? params : null;
}

async function publishDurably(subj, data, id) {
  // JetStream drops a re-publish with the same Nats-Msg-Id, so trying again after a
  // lost ack (a broker restart) never shows the message twice.
  const deadline = Date.now() + 60000;
  for (;;) {
    try {
      return await state.js.publish(subj, data, { msgID: id, timeout: 5000 });
    } catch (err) {
      if (isForbidden(err)) throw forbidden(err); // trying again changes nothing
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

async function send() {
  const view = state.view;
  const text = ui.input.value;
  if (!view || !text.trim()) return;
  const m = {
    type: "chat.message",
    id: nuid.next(),
    topic: view.topic,
    authorId: state.authorId,
    text,
    sentAt: new Date().toISOString(),
  };
  const params = messageParams();
  if (params) m.params = params;
  ui.input.value = "";
  const node = addUserMessage(view, m); // shown at once; the stream's copy is dropped by id
  try {
    await publishDurably(subject(view.topic, "msg"), JSON.stringify(m), m.id);
    showNotice("");
  } catch (err) {
    node.dataset.state = "failed";
    const note = el("div", "note", `not sent: ${err.message}`);
    note.dataset.kind = "error";
    node.querySelector(".body").append(note);
  }
}

async function stop() {
  const r = runningReply();
  const view = state.view;
  if (!r || !view) return;
  ui.stop.disabled = true;
  try {
    const reply = await state.nc.request(subject(view.topic, "cancel"), JSON.stringify({
      type: "generation.cancel", topic: view.topic, requestId: r.requestId,
    }), { timeout: API_TIMEOUT });
    const body = reply.json();
    if (reply.headers?.get("Nats-Service-Error-Code")) showNotice(`stop: ${body.code}: ${body.message}`);
    else if (!body.cancelled) showNotice("nothing was running", "info");
  } catch (err) {
    showNotice(`stop: ${isForbidden(err) ? forbidden(err).message : err.message}`);
  }
  updateStop();
}

// ------------------------------------------------------------------ settings and diagnostics

function initSettings() {
  ui.temperature.value = localStorage.getItem(STORE.temperature) ?? "";
  ui.maxTokens.value = localStorage.getItem(STORE.maxTokens) ?? "";
  ui.temperature.addEventListener("change", () => localStorage.setItem(STORE.temperature, ui.temperature.value));
  ui.maxTokens.addEventListener("change", () => localStorage.setItem(STORE.maxTokens, ui.maxTokens.value));
  ui.modelSelect.addEventListener("change", async () => {
    if (!state.topic) return;
    try {
      const reply = await api("topics.bind", { topicId: state.topic, modelId: ui.modelSelect.value || null });
      state.topicRecord = reply.topic;
      ui.settingsNote.textContent = `answered by ${reply.topic.modelId ?? "no model"}`;
      loadTopicRecord(state.topic);
      refreshTopics();
    } catch (err) {
      ui.settingsNote.textContent = `bind: ${err.message}`;
    }
  });
  ui.saveSystemPrompt.addEventListener("click", async () => {
    if (!state.topic) return;
    const text = ui.systemPrompt.value;
    try {
      const reply = await api("topics.update", { topicId: state.topic, systemPrompt: text.trim() ? text : null });
      state.topicRecord = reply.topic;
      ui.settingsNote.textContent = text.trim() ? "system prompt saved" : "system prompt cleared";
      refreshTopics();
    } catch (err) {
      ui.settingsNote.textContent = `system prompt: ${err.message}`;
    }
  });
}

async function refreshDiagnostics() {
  ui.diagSummary.replaceChildren(el("li", "", "loading…"));
  try {
    const d = await api("diagnostics");
    const reg = d.registry ?? {};
    const svc = d.service ?? {};
    const engine = svc.engine ?? {};
    const lines = [
      `broker: ${svc.url}${svc.embedded ? " (embedded)" : ""}, prefix ${svc.prefix}`,
      `active model: ${reg.activeModelId ?? "none"}; loaded: ${(reg.loadedModels ?? []).join(", ") || "none"}`,
      `models: ${reg.liveModels ?? "?"} live of ${reg.models ?? "?"}; topics: ${reg.topics ?? "?"}; registry events: ${reg.events ?? "?"}`,
      `assistant: ${JSON.stringify(svc.assistant ?? {})}`,
      `engine: ${Object.keys(engine).length ? JSON.stringify(engine).slice(0, 400) : "idle"}`,
      `api errors: ${JSON.stringify(d.api?.errors ?? {})}`,
    ];
    ui.diagSummary.replaceChildren(...lines.map((l) => el("li", "", l)));
    ui.diagJson.textContent = JSON.stringify(d, null, 2);
  } catch (err) {
    ui.diagSummary.replaceChildren(el("li", "error", `diagnostics: ${err.message}`));
  }
}

// ------------------------------------------------------------------ start

function topicFromHash() {
  return new URLSearchParams(location.hash.slice(1)).get("topic");
}

async function main() {
  takeTokenFromAddress();
  initAuthor();
  initSettings();
  ui.send.addEventListener("click", send);
  ui.stop.addEventListener("click", stop);
  ui.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  ui.createTopic.addEventListener("click", createTopic);
  ui.newTopic.addEventListener("keydown", (ev) => { if (ev.key === "Enter") createTopic(); });
  ui.diagRefresh.addEventListener("click", refreshDiagnostics);
  $("diagnostics-panel").addEventListener("toggle", (ev) => { if (ev.target.open) refreshDiagnostics(); });
  window.addEventListener("hashchange", () => {
    takeTokenFromAddress(); // a login link pasted into an open tab: out of the address bar
    const t = topicFromHash();
    if (t && t !== state.topic) openTopic(t);
  });

  if (!(await connect())) return;
  await refreshModels();
  const topics = (await refreshTopics()) ?? [];
  const wanted = topicFromHash() ?? topics[0]?.id ?? null;
  if (wanted) openTopic(wanted);
  else ui.empty.textContent = "Create a topic to start.";
  // Topics made by others show up: the registry's events are mirrored on the bus.
  let pending = null;
  state.nc.subscribe(`${state.config.prefix}.registry.evt.>`, {
    callback: () => {
      clearTimeout(pending);
      pending = setTimeout(() => {
        refreshTopics();
        refreshModels();
        if (state.topic) loadTopicRecord(state.topic); // a topic made by its first message, a new binding
      }, 300);
    },
  });
  document.body.dataset.ready = "true";
}

main().catch((err) => {
  console.error(err);
  showNotice(`the page failed to start: ${err.message}`);
});
