// HTTP helpers: JSON calls with readable errors, the lost-connection banner, small DOM helpers.

export const $ = (id) => document.getElementById(id);

export class ApiError extends Error {
  constructor(status, message, fields) {
    super(message);
    this.status = status;
    this.fields = fields || {};  // request field -> message (from FastAPI-shaped 422 bodies)
  }
}

/** A readable message from any of the server's error bodies. */
export function describe(status, body) {
  const fields = {};
  if (body && Array.isArray(body.detail)) {  // FastAPI validation: [{loc, msg, type}]
    const lines = body.detail.map((p) => {
      const loc = [...(p.loc || [])];
      while (['body', 'query', 'request'].includes(loc[0])) loc.shift();  // jobs nest the A1111 body in "request"
      if (loc.length) fields[loc[0]] = p.msg;
      return (loc.length ? loc.join('.') + ': ' : '') + p.msg;
    });
    return { message: lines.join('\n'), fields };
  }
  if (body && typeof body === 'object') {
    const text = [body.detail, body.errors, body.error].find((x) => typeof x === 'string' && x);
    if (text) return { message: text, fields };
  }
  return { message: `HTTP ${status}`, fields };
}

let offline = false;
const listeners = [];
export function onReconnect(fn) { listeners.push(fn); }

function connectionLost() {
  if (offline) return;
  offline = true;
  const banner = $('banner');
  banner.textContent = 'Connection to the server lost. Retrying…';
  banner.hidden = false;
  const probe = async () => {
    try {
      const r = await fetch(location.origin + '/sdapi/v1/progress?skip_current_image=true', { cache: 'no-store' });
      if (r.ok || r.status === 401) {
        offline = false;
        banner.hidden = true;
        listeners.forEach((fn) => fn());
        return;
      }
    } catch (e) { /* still down */ }
    setTimeout(probe, 2000);
  };
  setTimeout(probe, 1000);
}

/** Call an endpoint; JSON body in, JSON out. Throws ApiError with a readable message. */
export async function api(path, { method = 'GET', body, signal, allow404 = false } = {}) {
  const init = { method, signal, headers: {}, cache: 'no-store' };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  let r;
  try {
    r = await fetch(location.origin + path, init);  // origin: never a URL with credentials in it
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    connectionLost();
    throw new ApiError(0, 'The server cannot be reached.');
  }
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (r.status === 404 && allow404) return undefined;
  if (!r.ok) {
    const { message, fields } = describe(r.status, data);
    throw new ApiError(r.status, message, fields);
  }
  return data;
}

/** Blob/File -> data URL. */
export function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) node.append(c);
  return node;
}

export function debounce(fn, ms) {
  let t;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}
