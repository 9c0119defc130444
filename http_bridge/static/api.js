// glmserve chat UI: the client for the bridge's OpenAI-compatible /v1 API.
//
// Every URL is resolved relative to this module (static/ lives next to v1/), so the page
// works at "/", at "/static/index.html" and behind a reverse proxy under a path prefix.

const API_ROOT = new URL('../', import.meta.url);

export function apiUrl(path) {
  return new URL(path.replace(/^\/+/, ''), API_ROOT).href;
}

/** An API failure, classified for the UI. `kind` is one of:
 *  auth (401/403), overloaded (429), unavailable (503), network (no response),
 *  interrupted (stream cut off), bad_request (4xx), not_found (404), timeout (504),
 *  server (other 5xx), stream
 *  (an error chunk inside the stream). */
export class ApiError extends Error {
  constructor(kind, message, { status = 0, type = '', code = '', param = '' } = {}) {
    super(message);
    this.name = 'ApiError';
    this.kind = kind;
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param;
  }
}

export function kindForStatus(status) {
  if (status === 401 || status === 403) return 'auth';
  if (status === 429) return 'overloaded';
  if (status === 503) return 'unavailable';
  if (status === 404) return 'not_found';
  if (status === 504) return 'timeout';
  if (status >= 400 && status < 500) return 'bad_request';
  return 'server';
}

function headers(apiKey, extra = {}) {
  const h = { Accept: 'application/json', ...extra };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function errorFromResponse(res) {
  let message = '';
  let detail = {};
  try {
    const text = await res.text();
    try {
      const body = JSON.parse(text);
      const err = body && typeof body === 'object' ? body.error ?? body.detail ?? body : null;
      if (err && typeof err === 'object') {
        detail = err;
        message = typeof err.message === 'string' ? err.message : '';
      } else if (typeof err === 'string') {
        message = err;
      }
    } catch {
      message = text.slice(0, 300);
    }
  } catch {
    /* body unreadable: keep the status only */
  }
  return new ApiError(kindForStatus(res.status), message || `HTTP ${res.status} ${res.statusText}`, {
    status: res.status,
    type: String(detail.type ?? ''),
    code: String(detail.code ?? ''),
    param: String(detail.param ?? ''),
  });
}

function networkError(err) {
  if (err && err.name === 'AbortError') return err;
  return new ApiError('network', (err && err.message) || 'Network error');
}

/** GET /v1/models → [{id, ...}] */
export async function listModels({ apiKey = '', signal } = {}) {
  let res;
  try {
    res = await fetch(apiUrl('v1/models'), { headers: headers(apiKey), signal, cache: 'no-store' });
  } catch (err) {
    throw networkError(err);
  }
  if (!res.ok) throw await errorFromResponse(res);
  const body = await res.json();
  return Array.isArray(body?.data) ? body.data.filter((m) => m && typeof m.id === 'string') : [];
}

/** Incremental Server-Sent Events parser (the subset OpenAI streams use).
 *  push(text) returns the `data` payloads of every event completed by `text`. */
export class SSEParser {
  constructor() {
    this.buffer = '';
    this.data = [];
  }

  push(text) {
    this.buffer += text;
    const events = [];
    let nl;
    while ((nl = this.buffer.search(/\r\n|\r|\n/)) !== -1) {
      const sepLen = this.buffer[nl] === '\r' && this.buffer[nl + 1] === '\n' ? 2 : 1;
      // A lone '\r' at the very end may be the first half of '\r\n': wait for more text.
      if (this.buffer[nl] === '\r' && nl + 1 === this.buffer.length) break;
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + sepLen);
      this.line(line, events);
    }
    return events;
  }

  /** Call at end of stream: dispatches a final event that lacked its blank line. */
  end() {
    const events = [];
    if (this.buffer) this.line(this.buffer, events);
    this.buffer = '';
    this.line('', events);
    return events;
  }

  line(line, events) {
    if (line === '') {
      if (this.data.length) events.push(this.data.join('\n'));
      this.data = [];
      return;
    }
    if (line.startsWith(':')) return; // comment / keep-alive
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') this.data.push(value);
    // `event`, `id` and `retry` are not used by OpenAI-style streams.
  }
}

/** POST /v1/chat/completions with stream: true.
 *  Yields {type: 'delta', content} | {type: 'finish', reason} | {type: 'usage', usage}
 *  | {type: 'model', model}. Throws ApiError, or the AbortError of `signal`. */
export async function* streamChat({ body, apiKey = '', signal }) {
  let res;
  try {
    res = await fetch(apiUrl('v1/chat/completions'), {
      method: 'POST',
      headers: headers(apiKey, { 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
      cache: 'no-store',
    });
  } catch (err) {
    throw networkError(err);
  }
  if (!res.ok) throw await errorFromResponse(res);
  if (!res.body) throw new ApiError('server', 'The server sent no response body.');

  const reader = res.body.getReader();
  const decoder = new TextDecoder('utf-8'); // stream mode keeps split multi-byte characters
  const parser = new SSEParser();
  let done = false;
  let sawModel = false;

  const handle = function* (payload) {
    if (payload.trim() === '[DONE]') {
      done = true;
      return;
    }
    let chunk;
    try {
      chunk = JSON.parse(payload);
    } catch {
      return; // not JSON: ignore, as OpenAI clients do
    }
    if (chunk && chunk.error) {
      const e = chunk.error;
      const status = Number(e.code) >= 400 ? Number(e.code) : 0;
      throw new ApiError(
        status ? kindForStatus(status) : typeMap[e.code] || typeMap[e.type] || 'stream',
        typeof e.message === 'string' && e.message ? e.message : 'The server reported an error.',
        { status, type: String(e.type ?? ''), code: String(e.code ?? ''), param: String(e.param ?? '') },
      );
    }
    if (!sawModel && chunk?.model) {
      sawModel = true;
      yield { type: 'model', model: chunk.model };
    }
    for (const choice of chunk?.choices ?? []) {
      const content = choice?.delta?.content;
      if (typeof content === 'string' && content) yield { type: 'delta', content };
      if (choice?.finish_reason) yield { type: 'finish', reason: choice.finish_reason };
    }
    if (chunk?.usage) yield { type: 'usage', usage: chunk.usage };
  };

  try {
    while (!done) {
      let result;
      try {
        result = await reader.read();
      } catch (err) {
        if (err && err.name === 'AbortError') throw err;
        if (signal?.aborted) throw new DOMException('Aborted', 'AbortError');
        throw new ApiError('interrupted', 'The connection was lost before the reply finished.');
      }
      const events = result.done
        ? parser.push(decoder.decode()).concat(parser.end())
        : parser.push(decoder.decode(result.value, { stream: true }));
      for (const payload of events) {
        yield* handle(payload);
        if (done) break;
      }
      if (result.done) break;
    }
  } finally {
    if (!done) {
      try {
        await reader.cancel();
      } catch {
        /* already closed */
      }
    }
  }
  if (!done) throw new ApiError('interrupted', 'The stream ended before the reply finished.');
}

const typeMap = {
  invalid_request_error: 'bad_request',
  authentication_error: 'auth',
  rate_limit_error: 'overloaded',
  rate_limit_exceeded: 'overloaded',
  overloaded_error: 'overloaded',
  service_unavailable: 'unavailable',
  server_error: 'server',
  timeout_error: 'timeout',
  invalid_api_key: 'auth',
  backend_unavailable: 'unavailable',
  model_not_found: 'not_found',
  timeout: 'timeout',
};

/** A user-facing sentence for an ApiError. */
export function describeError(err) {
  switch (err.kind) {
    case 'auth':
      return 'The server rejected the API key. Open Settings and enter a valid key.';
    case 'overloaded':
      return 'The server is overloaded right now. Wait a moment and try again.';
    case 'unavailable':
      return 'The model backend is unavailable (down, loading or restarting). Try again shortly.';
    case 'network':
      return 'Cannot reach the server: check that glmserve is running and your network connection.';
    case 'interrupted':
      return 'The connection was lost before the reply finished.';
    case 'not_found':
      return 'Not found: the selected model may not be served here.';
    case 'timeout':
      return 'The reply took too long and the server gave up (timeout).';
    case 'bad_request':
      return 'The server rejected the request.';
    case 'stream':
      return 'The server reported an error while generating.';
    default:
      return 'The server had an internal error.';
  }
}
