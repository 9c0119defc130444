// glmserve chat UI: conversations and settings kept in localStorage.
//
// Keys (all JSON):
//   glmserve.v1.conversations  [{id, title, createdAt, updatedAt, model, messages: [
//                                  {role: 'user'|'assistant', content, stopped?, finish?, error?}]}]
//   glmserve.v1.active         id of the open conversation ('' = a new, unsaved chat)
//   glmserve.v1.settings       {systemPrompt, temperature, maxTokens, apiKey, model}

export const KEYS = {
  conversations: 'glmserve.v1.conversations',
  active: 'glmserve.v1.active',
  settings: 'glmserve.v1.settings',
};

export const DEFAULT_SETTINGS = {
  systemPrompt: '',
  temperature: '', // '' = the model's default
  maxTokens: '', // '' = the server's default
  apiKey: '',
  model: '',
};

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

/** Writes a value; returns false when storage is full or unavailable. */
function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

export function newId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID(); // secure contexts only
  const rnd = new Uint32Array(3);
  globalThis.crypto.getRandomValues(rnd);
  return `c${Date.now().toString(36)}${[...rnd].map((n) => n.toString(36)).join('')}`;
}

function cleanMessage(m) {
  if (!m || (m.role !== 'user' && m.role !== 'assistant') || typeof m.content !== 'string') {
    return null;
  }
  const out = { role: m.role, content: m.content };
  if (m.stopped) out.stopped = true;
  if (typeof m.finish === 'string') out.finish = m.finish;
  if (typeof m.error === 'string' && m.error) out.error = m.error;
  return out;
}

export function loadConversations() {
  const list = read(KEYS.conversations, []);
  if (!Array.isArray(list)) return [];
  return list
    .filter((c) => c && typeof c.id === 'string' && Array.isArray(c.messages))
    .map((c) => ({
      id: c.id,
      title: typeof c.title === 'string' && c.title ? c.title : 'Untitled',
      createdAt: Number(c.createdAt) || Date.now(),
      updatedAt: Number(c.updatedAt) || Date.now(),
      model: typeof c.model === 'string' ? c.model : '',
      messages: c.messages.map(cleanMessage).filter(Boolean),
    }));
}

export function saveConversations(list) {
  return write(
    KEYS.conversations,
    list.map((c) => ({ ...c, messages: c.messages.map(cleanMessage).filter(Boolean) })),
  );
}

export function loadActiveId() {
  const id = read(KEYS.active, '');
  return typeof id === 'string' ? id : '';
}

export function saveActiveId(id) {
  return write(KEYS.active, id || '');
}

export function loadSettings() {
  const s = read(KEYS.settings, {});
  const out = { ...DEFAULT_SETTINGS };
  if (s && typeof s === 'object') {
    for (const k of Object.keys(DEFAULT_SETTINGS)) {
      if (typeof s[k] === 'string' || typeof s[k] === 'number') out[k] = String(s[k]);
    }
  }
  return out;
}

export function saveSettings(settings) {
  return write(KEYS.settings, settings);
}

/** A short title from the first user message. */
export function titleFrom(text) {
  const oneLine = text.replace(/\s+/g, ' ').trim();
  const chars = [...oneLine]; // count code points, not UTF-16 units (CJK, emoji)
  return chars.length > 48 ? `${chars.slice(0, 47).join('')}…` : oneLine || 'New chat';
}
