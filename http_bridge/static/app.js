// glmserve chat UI: the page controller. Plain ES module, no build step, no dependencies.
//
// Safety rule for this file: text from the model, the user or localStorage is only ever put
// into the page with textContent / createTextNode, or through renderMarkdown() (which does the
// same). Never innerHTML.

import { ApiError, describeError, listModels, streamChat } from './api.js';
import { renderMarkdown } from './markdown.js';
import {
  KEYS,
  loadActiveId,
  loadConversations,
  loadSettings,
  newId,
  saveActiveId,
  saveConversations,
  saveSettings,
  titleFrom,
} from './store.js';

const $ = (id) => document.getElementById(id);
const el = {
  app: $('app'),
  sidebar: $('sidebar'),
  backdrop: $('backdrop'),
  newChat: $('new-chat'),
  closeSidebar: $('close-sidebar'),
  toggleSidebar: $('toggle-sidebar'),
  list: $('conversation-list'),
  noConversations: $('no-conversations'),
  openSettings: $('open-settings'),
  title: $('conversation-title'),
  modelSelect: $('model-select'),
  banner: $('banner'),
  bannerText: $('banner-text'),
  bannerDetail: $('banner-detail'),
  bannerAction: $('banner-action'),
  bannerClose: $('banner-close'),
  messages: $('messages'),
  emptyState: $('empty-state'),
  emptyModel: $('empty-model'),
  messageList: $('message-list'),
  composer: $('composer'),
  prompt: $('prompt'),
  send: $('send'),
  stop: $('stop'),
  settingsDialog: $('settings-dialog'),
  settingsForm: $('settings-form'),
  setSystem: $('set-system'),
  setTemperature: $('set-temperature'),
  setMaxTokens: $('set-max-tokens'),
  setApiKey: $('set-api-key'),
  toggleKey: $('toggle-key'),
  settingsError: $('settings-error'),
  settingsCancel: $('settings-cancel'),
  clearAll: $('clear-all'),
  confirmDialog: $('confirm-dialog'),
  confirmText: $('confirm-text'),
  toast: $('toast'),
};

const SIDEBAR_KEY = 'glmserve.v1.sidebarCollapsed';
const narrowQuery = window.matchMedia('(max-width: 768px)');

const state = {
  conversations: loadConversations(),
  activeId: loadActiveId(),
  settings: loadSettings(),
  models: [], // ids from /v1/models
  modelsLoaded: false,
  streams: new Map(), // conversation id -> {controller, message}
  renamingId: '',
  bannerRetry: null,
  storageWarned: false,
};

// ------------------------------------------------------------------ helpers

function activeConversation() {
  return state.conversations.find((c) => c.id === state.activeId) || null;
}

function detectLang(text) {
  const sample = text.slice(0, 2000);
  if (/[\u3040-\u30ff]/.test(sample)) return 'ja';
  if (/[\uac00-\ud7af\u1100-\u11ff]/.test(sample)) return 'ko';
  if (/[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]/.test(sample)) return 'zh';
  return '';
}

function setLang(node, text) {
  const lang = detectLang(text);
  if (lang) node.lang = lang;
  else node.removeAttribute('lang');
}

function icon(paths) {
  // Static, hard-coded SVG paths only (never input): built with createElementNS.
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  for (const d of paths) {
    const p = document.createElementNS(NS, 'path');
    p.setAttribute('d', d);
    svg.appendChild(p);
  }
  return svg;
}
const ICONS = {
  copy: ['M9 9h10v10H9z', 'M5 15V5h10'],
  check: ['M5 12l5 5 9-10'],
  regen: ['M20 11a8 8 0 1 0-2.3 5.7', 'M20 4v7h-7'],
  rename: ['M4 20h4L19 9l-4-4L4 16v4z', 'M13.5 6.5l4 4'],
  trash: ['M4 7h16', 'M10 11v6M14 11v6', 'M6 7l1 13h10l1-13', 'M9 7V4h6v3'],
};

function iconButton(name, label, testid, action) {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = 'icon-btn';
  b.title = label;
  b.setAttribute('aria-label', label);
  b.dataset.testid = testid;
  b.dataset.action = action;
  b.appendChild(icon(ICONS[name]));
  return b;
}

let persistTimer = 0;
function persist() {
  clearTimeout(persistTimer);
  persistTimer = 0;
  const ok = saveConversations(state.conversations) && saveActiveId(state.activeId);
  if (!ok && !state.storageWarned) {
    state.storageWarned = true;
    showBanner({
      text: 'Could not save the conversation in this browser (storage is full or disabled).',
      detail: 'Delete old conversations to free space.',
      kind: 'storage',
    });
  }
}
function persistSoon() {
  if (!persistTimer) persistTimer = setTimeout(persist, 600);
}

let toastTimer = 0;
function toast(text) {
  el.toast.textContent = text;
  el.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    el.toast.hidden = true;
  }, 1600);
}

async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch {
    /* fall back below (permission denied, plain-http origin, ...) */
  }
  const previous = document.activeElement;
  const ta = document.createElement('textarea');
  ta.value = text;
  ta.setAttribute('readonly', '');
  ta.style.position = 'fixed';
  ta.style.top = '0';
  ta.style.opacity = '0';
  document.body.appendChild(ta);
  ta.select();
  let ok = false;
  try {
    ok = document.execCommand('copy');
  } catch {
    ok = false;
  }
  ta.remove();
  if (previous && previous.focus) previous.focus();
  return ok;
}

function confirmDialog(text, okLabel = 'Delete') {
  return new Promise((resolve) => {
    el.confirmText.textContent = text;
    el.confirmDialog.querySelector('[value="ok"]').textContent = okLabel;
    el.confirmDialog.returnValue = '';
    el.confirmDialog.addEventListener(
      'close',
      () => resolve(el.confirmDialog.returnValue === 'ok'),
      { once: true },
    );
    el.confirmDialog.showModal();
  });
}

// ------------------------------------------------------------------ banner (errors)

function showBanner({ text, detail = '', kind = 'error', status = 0, action = null }) {
  el.bannerText.textContent = text;
  el.bannerDetail.textContent = detail;
  el.bannerDetail.hidden = !detail;
  el.banner.dataset.kind = kind;
  el.banner.dataset.status = String(status || '');
  state.bannerRetry = action ? action.run : null;
  el.bannerAction.hidden = !action;
  if (action) el.bannerAction.textContent = action.label;
  el.banner.hidden = false;
}

function hideBanner() {
  el.banner.hidden = true;
  state.bannerRetry = null;
  delete el.banner.dataset.kind;
}

function showApiError(err, retry) {
  const parts = [];
  if (err.status) parts.push(`HTTP ${err.status}`);
  if (err.message && err.message !== describeError(err)) parts.push(err.message);
  let action = null;
  if (err.kind === 'auth') action = { label: 'Open settings', run: () => openSettings(true) };
  else if (retry) action = { label: 'Retry', run: retry };
  showBanner({
    text: describeError(err),
    detail: parts.join(' · '),
    kind: err.kind,
    status: err.status,
    action,
  });
}

// ------------------------------------------------------------------ models

function effectiveModel() {
  if (state.settings.model && state.models.includes(state.settings.model)) {
    return state.settings.model;
  }
  return state.models[0] || state.settings.model || '';
}

function renderModels(errorText = '') {
  const select = el.modelSelect;
  select.replaceChildren();
  if (state.models.length === 0) {
    const opt = document.createElement('option');
    opt.value = '';
    opt.textContent = errorText || (state.modelsLoaded ? 'No models' : 'Loading models…');
    select.appendChild(opt);
    select.disabled = true;
  } else {
    for (const id of state.models) {
      const opt = document.createElement('option');
      opt.value = id;
      opt.textContent = id;
      select.appendChild(opt);
    }
    select.disabled = false;
    select.value = effectiveModel();
  }
  el.emptyModel.textContent = effectiveModel() || 'the served model';
}

async function loadModels({ quiet = false } = {}) {
  try {
    const models = await listModels({ apiKey: state.settings.apiKey });
    state.models = models.map((m) => m.id);
    state.modelsLoaded = true;
    renderModels();
    if (!quiet && el.banner.dataset.kind && ['auth', 'unavailable', 'network'].includes(el.banner.dataset.kind)) {
      hideBanner(); // the problem that banner described is gone
    }
    return true;
  } catch (err) {
    state.modelsLoaded = true;
    renderModels('Models unavailable');
    if (!quiet && err instanceof ApiError) {
      showApiError(err, () => {
        hideBanner();
        loadModels();
      });
    }
    return false;
  }
}

// ------------------------------------------------------------------ sidebar

function isNarrow() {
  return narrowQuery.matches;
}

function setSidebar(open) {
  if (isNarrow()) {
    el.app.classList.toggle('sidebar-open', open);
    el.backdrop.hidden = !open;
  } else {
    el.app.classList.toggle('sidebar-collapsed', !open);
    try {
      localStorage.setItem(SIDEBAR_KEY, open ? '0' : '1');
    } catch {
      /* not important */
    }
  }
  el.toggleSidebar.setAttribute('aria-expanded', String(open));
}

function sidebarVisible() {
  return isNarrow()
    ? el.app.classList.contains('sidebar-open')
    : !el.app.classList.contains('sidebar-collapsed');
}

function syncSidebarMode() {
  el.app.classList.remove('sidebar-open');
  el.backdrop.hidden = true;
  let collapsed = false;
  try {
    collapsed = localStorage.getItem(SIDEBAR_KEY) === '1';
  } catch {
    /* default: expanded */
  }
  el.app.classList.toggle('sidebar-collapsed', !isNarrow() && collapsed);
  el.toggleSidebar.setAttribute('aria-expanded', String(sidebarVisible()));
}

function renderSidebar() {
  const sorted = [...state.conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  el.list.replaceChildren();
  el.noConversations.hidden = sorted.length > 0;
  for (const conv of sorted) {
    const li = document.createElement('li');
    li.className = 'conv-item';
    li.dataset.testid = 'conversation-item';
    li.dataset.id = conv.id;
    if (conv.id === state.activeId) li.setAttribute('aria-current', 'true');

    if (state.renamingId === conv.id) {
      const input = document.createElement('input');
      input.className = 'rename-input';
      input.dataset.testid = 'rename-input';
      input.value = conv.title;
      input.maxLength = 200;
      input.dir = 'auto';
      input.setAttribute('aria-label', 'New conversation title');
      let done = false;
      const finish = (commit) => {
        if (done) return;
        done = true;
        const value = input.value.replace(/\s+/g, ' ').trim();
        if (commit && value) {
          conv.title = value;
          persist();
        }
        state.renamingId = '';
        renderSidebar();
        renderHeader();
      };
      input.addEventListener('keydown', (e) => {
        if (e.key === 'Enter' && !e.isComposing && e.keyCode !== 229) {
          e.preventDefault();
          finish(true);
        } else if (e.key === 'Escape') {
          e.preventDefault();
          e.stopPropagation();
          finish(false);
        }
      });
      input.addEventListener('blur', () => finish(true));
      li.appendChild(input);
      el.list.appendChild(li);
      queueMicrotask(() => {
        input.focus();
        input.select();
      });
      continue;
    }

    const open = document.createElement('button');
    open.type = 'button';
    open.className = 'conv-open';
    open.dataset.testid = 'conversation-open';
    open.dataset.action = 'open';
    open.textContent = conv.title;
    open.title = conv.title;
    setLang(open, conv.title);
    if (state.streams.has(conv.id)) open.classList.add('conv-streaming');
    const actions = document.createElement('span');
    actions.className = 'conv-actions';
    actions.append(
      iconButton('rename', 'Rename conversation', 'rename-conversation', 'rename'),
      iconButton('trash', 'Delete conversation', 'delete-conversation', 'delete'),
    );
    li.append(open, actions);
    el.list.appendChild(li);
  }
}

// ------------------------------------------------------------------ messages

function renderHeader() {
  const conv = activeConversation();
  const title = conv ? conv.title : 'New chat';
  el.title.textContent = title;
  setLang(el.title, title);
  document.title = conv ? `${conv.title} · glmserve` : 'glmserve chat';
}

function noteFor(msg) {
  if (msg.error) return { text: `Error: ${msg.error}`, error: true };
  if (msg.stopped) return { text: 'Stopped.', error: false };
  if (msg.finish === 'length') return { text: 'Reply cut off: the max tokens limit was reached.', error: false };
  return null;
}

function fillBody(body, msg, streaming) {
  if (msg.role === 'user') {
    body.textContent = msg.content; // plain text, never Markdown or HTML
  } else if (streaming && !msg.content) {
    const dots = document.createElement('span');
    dots.className = 'typing';
    dots.setAttribute('aria-label', 'Thinking');
    dots.append(document.createElement('i'), document.createElement('i'), document.createElement('i'));
    body.replaceChildren(dots);
  } else {
    body.replaceChildren(renderMarkdown(msg.content));
    if (streaming) {
      const cursor = document.createElement('span');
      cursor.className = 'cursor';
      cursor.setAttribute('aria-hidden', 'true');
      (body.lastElementChild && !['PRE', 'DIV', 'UL', 'OL', 'TABLE', 'BLOCKQUOTE', 'HR'].includes(body.lastElementChild.nodeName)
        ? body.lastElementChild
        : body
      ).appendChild(cursor);
    }
  }
  setLang(body, msg.content);
}

function messageElement(conv, msg, index, isLast) {
  const streaming = isLast && msg.role === 'assistant' && state.streams.get(conv.id)?.message === msg;
  const art = document.createElement('article');
  art.className = `msg msg-${msg.role}`;
  art.dataset.testid = 'message';
  art.dataset.role = msg.role;
  art.dataset.index = String(index);
  art.dataset.streaming = String(Boolean(streaming));

  const role = document.createElement('div');
  role.className = 'msg-role';
  role.textContent = msg.role === 'user' ? 'You' : 'Assistant';

  const body = document.createElement('div');
  body.className = msg.role === 'assistant' ? 'msg-body md' : 'msg-body';
  body.dataset.testid = 'message-content';
  body.dir = 'auto';
  fillBody(body, msg, streaming);

  art.append(role, body);

  const note = noteFor(msg);
  if (note && !streaming) {
    const n = document.createElement('div');
    n.className = note.error ? 'msg-note error' : 'msg-note';
    n.dataset.testid = 'message-note';
    n.textContent = note.text;
    art.appendChild(n);
  }

  const actions = document.createElement('div');
  actions.className = 'msg-actions';
  if (msg.content) actions.appendChild(iconButton('copy', 'Copy message', 'copy-message', 'copy'));
  if (isLast && !state.streams.has(conv.id)) {
    const label = msg.role === 'assistant' ? 'Regenerate the answer' : 'Get an answer';
    actions.appendChild(iconButton('regen', label, 'regenerate', 'regenerate'));
  }
  art.appendChild(actions);
  return art;
}

function renderMessages() {
  const conv = activeConversation();
  const msgs = conv ? conv.messages : [];
  el.emptyState.hidden = msgs.length > 0;
  el.messageList.replaceChildren(
    ...msgs.map((m, i) => messageElement(conv, m, i, i === msgs.length - 1)),
  );
  el.messages.setAttribute('aria-busy', String(Boolean(conv && state.streams.has(conv.id))));
}

function renderComposer() {
  const conv = activeConversation();
  const streaming = Boolean(conv && state.streams.has(conv.id));
  el.send.hidden = streaming;
  el.stop.hidden = !streaming;
  el.send.disabled = !el.prompt.value.trim();
}

function render() {
  renderHeader();
  renderSidebar();
  renderMessages();
  renderComposer();
}

function nearBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
}

function scrollToBottom() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

// Streaming updates touch only the last message, at most once per animation frame.
const pendingUpdates = new Set();
let frame = 0;
function scheduleStreamUpdate(convId) {
  pendingUpdates.add(convId);
  if (!frame) frame = requestAnimationFrame(flushStreamUpdates);
}
function flushStreamUpdates() {
  frame = 0;
  if (!pendingUpdates.has(state.activeId)) {
    pendingUpdates.clear();
    return;
  }
  pendingUpdates.clear();
  const conv = activeConversation();
  const stream = conv && state.streams.get(conv.id);
  if (!stream) return;
  const art = el.messageList.lastElementChild;
  if (!art || art.dataset.index !== String(conv.messages.length - 1)) {
    renderMessages();
    return;
  }
  const stick = nearBottom();
  fillBody(art.querySelector('.msg-body'), stream.message, true);
  if (stick) scrollToBottom();
}

// ------------------------------------------------------------------ conversations

function openConversation(id) {
  if (state.renamingId) state.renamingId = '';
  state.activeId = id;
  saveActiveId(id);
  render();
  scrollToBottom();
  if (isNarrow()) setSidebar(false);
}

function newChat() {
  state.activeId = '';
  saveActiveId('');
  render();
  if (isNarrow()) setSidebar(false);
  el.prompt.focus();
}

async function deleteConversation(id) {
  const conv = state.conversations.find((c) => c.id === id);
  if (!conv) return;
  const ok = await confirmDialog(`Delete “${conv.title}”? This cannot be undone.`);
  if (!ok) return;
  state.streams.get(id)?.controller.abort();
  state.streams.delete(id);
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.activeId === id) state.activeId = '';
  persist();
  render();
}

function buildRequest(conv) {
  const s = state.settings;
  const messages = [];
  if (s.systemPrompt.trim()) messages.push({ role: 'system', content: s.systemPrompt });
  for (const m of conv.messages) {
    if (m.role === 'assistant' && !m.content) continue;
    messages.push({ role: m.role, content: m.content });
  }
  // `model` is required by the API; "" asks for the served model when the list is unknown.
  const body = { model: effectiveModel() || conv.model || '', messages };
  if (s.temperature !== '' && Number.isFinite(Number(s.temperature))) body.temperature = Number(s.temperature);
  if (s.maxTokens !== '' && Number.isInteger(Number(s.maxTokens))) body.max_tokens = Number(s.maxTokens);
  return body;
}

async function generate(conv) {
  if (state.streams.has(conv.id)) return;
  hideBanner();
  if (!state.models.length) await loadModels({ quiet: true });

  const body = buildRequest(conv);
  const assistant = { role: 'assistant', content: '' };
  const controller = new AbortController();
  conv.messages.push(assistant);
  conv.model = body.model || conv.model;
  conv.updatedAt = Date.now();
  state.streams.set(conv.id, { controller, message: assistant });
  persist();
  if (conv.id === state.activeId) {
    render();
    scrollToBottom();
  } else {
    renderSidebar();
  }

  let error = null;
  try {
    for await (const ev of streamChat({ body, apiKey: state.settings.apiKey, signal: controller.signal })) {
      if (ev.type === 'delta') {
        assistant.content += ev.content;
        scheduleStreamUpdate(conv.id);
        persistSoon();
      } else if (ev.type === 'finish') {
        assistant.finish = ev.reason;
      }
    }
  } catch (err) {
    if (err && err.name === 'AbortError') {
      assistant.stopped = true;
    } else {
      error = err instanceof ApiError ? err : new ApiError('network', String(err?.message || err));
    }
  } finally {
    state.streams.delete(conv.id);
  }

  if (error && assistant.content) assistant.error = error.message || describeError(error);
  if (!assistant.content) {
    const i = conv.messages.indexOf(assistant);
    if (i !== -1) conv.messages.splice(i, 1);
  }
  conv.updatedAt = Date.now();
  const stillExists = state.conversations.includes(conv);
  if (stillExists) persist();
  if (conv.id === state.activeId) {
    const stick = nearBottom();
    render();
    if (stick) scrollToBottom();
  } else {
    renderSidebar();
  }
  if (error && stillExists) {
    showApiError(error, () => {
      openConversation(conv.id);
      regenerate(conv.id);
    });
  }
}

function sendMessage() {
  const text = el.prompt.value;
  if (!text.trim()) return;
  let conv = activeConversation();
  if (conv && state.streams.has(conv.id)) return; // one reply at a time per conversation
  if (!conv) {
    conv = {
      id: newId(),
      title: titleFrom(text),
      createdAt: Date.now(),
      updatedAt: Date.now(),
      model: effectiveModel(),
      messages: [],
    };
    state.conversations.push(conv);
    state.activeId = conv.id;
  }
  conv.messages.push({ role: 'user', content: text });
  el.prompt.value = '';
  autosize();
  generate(conv);
}

function regenerate(id) {
  const conv = state.conversations.find((c) => c.id === id);
  if (!conv || state.streams.has(conv.id)) return;
  const last = conv.messages[conv.messages.length - 1];
  if (last && last.role === 'assistant') conv.messages.pop();
  if (!conv.messages.length) return;
  generate(conv);
}

function stopActive() {
  const conv = activeConversation();
  const stream = conv && state.streams.get(conv.id);
  if (stream) stream.controller.abort();
}

// ------------------------------------------------------------------ settings

function openSettings(focusKey = false) {
  const s = state.settings;
  el.setSystem.value = s.systemPrompt;
  el.setTemperature.value = s.temperature;
  el.setMaxTokens.value = s.maxTokens;
  el.setApiKey.value = s.apiKey;
  el.setApiKey.type = 'password';
  el.toggleKey.textContent = 'Show';
  el.toggleKey.setAttribute('aria-pressed', 'false');
  el.settingsError.hidden = true;
  el.settingsDialog.showModal();
  if (focusKey) el.setApiKey.focus();
}

function saveSettingsFromForm() {
  const temperature = el.setTemperature.value.trim();
  const maxTokens = el.setMaxTokens.value.trim();
  const problems = [];
  if (temperature !== '') {
    const t = Number(temperature);
    if (!Number.isFinite(t) || t < 0 || t > 2) problems.push('Temperature must be between 0 and 2.');
  }
  if (maxTokens !== '') {
    const n = Number(maxTokens);
    if (!Number.isInteger(n) || n < 1) problems.push('Max tokens must be a whole number of at least 1.');
  }
  if (el.setTemperature.validity.badInput || el.setMaxTokens.validity.badInput) {
    problems.push('Please enter numbers only.');
  }
  if (problems.length) {
    el.settingsError.textContent = problems.join(' ');
    el.settingsError.hidden = false;
    return false;
  }
  const keyChanged = el.setApiKey.value.trim() !== state.settings.apiKey;
  state.settings = {
    ...state.settings,
    systemPrompt: el.setSystem.value,
    temperature,
    maxTokens,
    apiKey: el.setApiKey.value.trim(),
  };
  if (!saveSettings(state.settings)) toast('Could not save settings in this browser');
  else toast('Settings saved');
  if (keyChanged || !state.models.length) {
    if (el.banner.dataset.kind === 'auth') hideBanner();
    loadModels();
  }
  return true;
}

// ------------------------------------------------------------------ composer

function autosize() {
  el.prompt.style.height = 'auto';
  el.prompt.style.height = `${Math.min(el.prompt.scrollHeight, window.innerHeight * 0.4)}px`;
  renderComposer();
}

let composing = false;
el.prompt.addEventListener('compositionstart', () => {
  composing = true;
});
el.prompt.addEventListener('compositionend', () => {
  composing = false;
});
el.prompt.addEventListener('keydown', (e) => {
  if (e.key !== 'Enter' || e.shiftKey || e.altKey) return;
  // An IME composition in progress (Chinese, Japanese, Korean input): Enter picks a candidate.
  if (e.isComposing || composing || e.keyCode === 229) return;
  e.preventDefault();
  const conv = activeConversation();
  if (conv && state.streams.has(conv.id)) return;
  sendMessage();
});
el.prompt.addEventListener('input', autosize);
el.composer.addEventListener('submit', (e) => {
  e.preventDefault();
  sendMessage();
  el.prompt.focus();
});
el.stop.addEventListener('click', () => {
  stopActive();
  el.prompt.focus();
});

// ------------------------------------------------------------------ events

el.newChat.addEventListener('click', newChat);
el.toggleSidebar.addEventListener('click', () => setSidebar(!sidebarVisible()));
el.closeSidebar.addEventListener('click', () => setSidebar(false));
el.backdrop.addEventListener('click', () => setSidebar(false));
narrowQuery.addEventListener('change', syncSidebarMode);

el.list.addEventListener('click', (e) => {
  const button = e.target.closest('button[data-action]');
  const item = e.target.closest('li[data-id]');
  if (!button || !item) return;
  const id = item.dataset.id;
  if (button.dataset.action === 'open') openConversation(id);
  else if (button.dataset.action === 'rename') {
    state.renamingId = id;
    renderSidebar();
  } else if (button.dataset.action === 'delete') deleteConversation(id);
});

el.messageList.addEventListener('click', async (e) => {
  const button = e.target.closest('button[data-action]');
  if (!button) return;
  const conv = activeConversation();
  if (!conv) return;
  if (button.dataset.action === 'copy-code') {
    const code = button.closest('.code-block')?.querySelector('code')?.textContent ?? '';
    const ok = await copyText(code);
    button.textContent = ok ? 'Copied' : 'Copy failed';
    setTimeout(() => {
      button.textContent = 'Copy';
    }, 1500);
    return;
  }
  const art = button.closest('article[data-index]');
  const msg = art && conv.messages[Number(art.dataset.index)];
  if (!msg) return;
  if (button.dataset.action === 'copy') {
    const ok = await copyText(msg.content);
    toast(ok ? 'Copied to clipboard' : 'Copy failed');
    if (ok) {
      button.replaceChildren(icon(ICONS.check));
      setTimeout(() => button.replaceChildren(icon(ICONS.copy)), 1500);
    }
  } else if (button.dataset.action === 'regenerate') {
    regenerate(conv.id);
  }
});

el.modelSelect.addEventListener('change', () => {
  state.settings.model = el.modelSelect.value;
  saveSettings(state.settings);
  el.emptyModel.textContent = effectiveModel() || 'the served model';
});

el.bannerClose.addEventListener('click', hideBanner);
el.bannerAction.addEventListener('click', () => {
  const run = state.bannerRetry;
  hideBanner();
  if (run) run();
});

el.openSettings.addEventListener('click', () => openSettings());
el.settingsCancel.addEventListener('click', () => el.settingsDialog.close('cancel'));
el.settingsForm.addEventListener('submit', (e) => {
  e.preventDefault();
  if (saveSettingsFromForm()) el.settingsDialog.close('save');
});
el.toggleKey.addEventListener('click', () => {
  const show = el.setApiKey.type === 'password';
  el.setApiKey.type = show ? 'text' : 'password';
  el.toggleKey.textContent = show ? 'Hide' : 'Show';
  el.toggleKey.setAttribute('aria-pressed', String(show));
});
el.clearAll.addEventListener('click', async () => {
  el.settingsDialog.close('cancel');
  if (!state.conversations.length) return;
  const ok = await confirmDialog('Delete all conversations in this browser? This cannot be undone.', 'Delete all');
  if (!ok) return;
  for (const s of state.streams.values()) s.controller.abort();
  state.streams.clear();
  state.conversations = [];
  state.activeId = '';
  persist();
  render();
});

document.addEventListener('keydown', (e) => {
  if (e.key !== 'Escape' || e.defaultPrevented) return;
  if (el.settingsDialog.open || el.confirmDialog.open) return; // the dialog closes itself
  if (isNarrow() && sidebarVisible()) {
    setSidebar(false);
    el.toggleSidebar.focus();
    return;
  }
  stopActive();
});

// Another tab changed the stored conversations: reload them when nothing is streaming here.
window.addEventListener('storage', (e) => {
  if (e.key === KEYS.settings) {
    state.settings = loadSettings();
    renderModels();
    return;
  }
  if (e.key !== KEYS.conversations && e.key !== null) return;
  if (state.streams.size) return;
  state.conversations = loadConversations();
  if (!activeConversation()) state.activeId = '';
  render();
});

window.addEventListener('pagehide', () => {
  if (persistTimer) persist();
});

// ------------------------------------------------------------------ start

if (state.activeId && !activeConversation()) state.activeId = '';
syncSidebarMode();
renderModels();
render();
scrollToBottom();
autosize();
el.app.dataset.ready = 'true';
loadModels();
if (!isNarrow()) el.prompt.focus();
