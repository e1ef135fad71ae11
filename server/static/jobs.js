// Running generations: the job queue (`/sd15/v1/jobs`, `/sd15/v1/queue`) with progress pushed over Server-Sent
// Events (`/sd15/v1/events`), and polling `/sd15/v1/queue` while the event stream is down.

import { $, api, el, ApiError, onReconnect } from './api.js';
import { restoreStage } from './gallery.js';

const state = { sse: false, mine: new Map(), running: null, ended: new Set() };
const STORE = 'sd15-jobs';

function remember() { sessionStorage.setItem(STORE, JSON.stringify([...state.mine.keys()])); }

/** Show the queue; reconnect to the jobs this tab submitted before a reload. */
export async function startJobs(onResult) {
  const q = await api('/sd15/v1/queue');
  for (const id of JSON.parse(sessionStorage.getItem(STORE) || '[]')) {
    state.mine.set(id, { resolve: onResult, reject: (e) => onResult(null, e) });
  }
  renderQueue(q);
  connectEvents();
  onReconnect(() => { if (!state.sse) connectEvents(); });
}

/** Submit one txt2img/img2img request; resolves with the A1111 response body (+ `files` when saved). */
export async function submit(kind, request) {
  const job = await api('/sd15/v1/jobs', { method: 'POST', body: { kind, request, save: true } });
  return new Promise((resolve, reject) => {
    state.mine.set(job.id, { resolve, reject });
    remember();
    if (state.ended.has(job.id)) finish(job.id);  // its `done` event came before this answer
    if (state.lastQueue) renderQueue(state.lastQueue);  // its queue event may have come before this answer
    if (!state.sse) pollQueue();
  });
}

export async function interrupt() {
  if (state.running) await api(`/sd15/v1/jobs/${state.running.id}`, { method: 'DELETE', allow404: true });
  else await api('/sdapi/v1/interrupt', { method: 'POST' });  // started before its queue event came
}

export const skip = () => api('/sdapi/v1/skip', { method: 'POST' });

/** A finished job: this tab's gets its result; another client's preview leaves the stage. */
function done(id) {
  state.ended.add(id);
  if (state.ended.size > 100) state.ended.delete(state.ended.values().next().value);
  if (state.mine.has(id)) finish(id);
  else if (state.previewing === id) restoreStage();
  if (state.previewing === id) state.previewing = null;
}

async function finish(id) {
  const waiter = state.mine.get(id);
  if (!waiter) return;
  state.mine.delete(id);
  remember();
  try {
    const job = await api(`/sd15/v1/jobs/${id}`);
    if (job.result) waiter.resolve({ ...job.result, files: job.files || [] });
    else if (job.error) waiter.reject(new ApiError(job.error.status, job.error.detail));
    else waiter.reject(new ApiError(0, `The job was ${job.state}.`));
  } catch (e) { waiter.reject(e); }
}

function connectEvents() {
  if (!window.EventSource) { pollQueue(); return; }
  const es = new EventSource(location.origin + '/sd15/v1/events');
  es.onopen = () => { state.sse = true; };
  es.addEventListener('queue', (e) => renderQueue(JSON.parse(e.data)));
  es.addEventListener('progress', (e) => showProgress(JSON.parse(e.data)));
  es.addEventListener('done', (e) => done(JSON.parse(e.data).id));
  es.onerror = () => {
    state.sse = false;
    if (es.readyState === EventSource.CLOSED) setTimeout(connectEvents, 3000);
    pollQueue();
  };
}

/** Without the event stream: the queue once a second (and progress while something runs). */
async function pollQueue() {
  if (state.pollingQueue) return;
  state.pollingQueue = true;
  while (!state.sse) {
    try {
      const q = await api('/sd15/v1/queue');
      renderQueue(q);
      const active = new Set([q.running?.id, ...q.queued.map((j) => j.id)]);
      for (const id of [...state.mine.keys()]) if (!active.has(id)) await finish(id);
      if (q.running) showProgress(await api('/sdapi/v1/progress'));
    } catch (e) { /* the banner tells */ }
    await new Promise((r) => setTimeout(r, 1000));
  }
  state.pollingQueue = false;
}

/** Progress from an SSE `progress` event or from /sdapi/v1/progress (A1111's shape). */
function showProgress(p) {
  const s = p.state || p;
  const fraction = Math.max(0, Math.min(1, p.progress || 0));
  $('progress').hidden = false;
  $('progress-bar').style.width = `${(fraction * 100).toFixed(1)}%`;
  const step = s.sampling_step ?? s.step;
  const steps = s.sampling_steps ?? s.steps;
  const parts = [`${Math.round(fraction * 100)}%`];
  if (steps) parts.push(`step ${step}/${steps}`);
  const jobCount = s.job_count ?? p.job_count;
  const script = p.id && state.running?.id === p.id && state.running.summary?.script;  // a grid's images
  if (jobCount > 1) parts.push(`${script ? 'image' : 'batch'} ${(s.job_no ?? p.job_no ?? 0) + 1}/${jobCount}`);
  if (p.eta_relative > 0) parts.push(`ETA ${formatSeconds(p.eta_relative)}`);
  $('progress-text').textContent = parts.join(' · ');
  const image = p.preview || p.current_image;
  if (p.id) {  // the running job's row in the queue shows its share done
    const pos = document.querySelector(`#queue-list li[data-id="${p.id}"] .pos`);
    if (pos) pos.textContent = `▶ ${Math.round(fraction * 100)}%`;
  }
  if (image) {
    state.previewing = p.id || null;
    $('preview').src = `data:image/png;base64,${image}`;
    $('preview').hidden = false;
    $('stage-hint').hidden = true;
  }
}

export function formatSeconds(s) {
  return s >= 60 ? `${Math.floor(s / 60)}m ${Math.round(s % 60)}s` : `${s.toFixed(s < 10 ? 1 : 0)}s`;
}

function renderQueue(q) {
  state.lastQueue = q;
  state.running = q.running;
  if (!q.running) $('progress').hidden = true;
  const row = (job, label) => el('li', { class: job.id && state.mine.has(job.id) ? 'mine' : '', 'data-id': job.id },
    el('span', { class: 'pos' }, label),
    el('span', { class: 'what' }, [job.kind, job.summary?.script, job.summary?.prompt || '(empty prompt)']
      .filter(Boolean).join(' · ')),
    el('small', {}, `${job.summary?.width}×${job.summary?.height} · ${job.summary?.steps} steps · ${job.source}`),
    el('button', { type: 'button', onclick: () => api(`/sd15/v1/jobs/${job.id}`, { method: 'DELETE' }),
      'aria-label': `Cancel job ${job.id}` }, job.state === 'running' ? 'Interrupt' : 'Cancel'));
  const items = [];
  if (q.running) items.push(row(q.running, '▶'));
  q.queued.forEach((j) => items.push(row(j, `#${j.position}`)));
  if (!items.length) items.push(el('li', { class: 'hint' }, 'Nothing queued.'));
  $('queue-list').replaceChildren(...items);
}
