// The page's entry point: theme, tabs, model dropdowns, Generate / Interrupt / Skip and the keyboard,
// drop / paste of images, and error display. Each feature lives in its own module.

import { $, api, ApiError, dataUrl, onReconnect } from './api.js';
import { applyRequest, buildRequest, clearMarks, loadLists, markFields, seedTools, setOverrides, sizeTools,
  tokenCounters } from './form.js';
import { setupGallery, showResult } from './gallery.js';
import { loadHistory, setupHistory, showPngInfo } from './history.js';
import { interrupt, skip, startJobs, submit } from './jobs.js';
import { setupKeyedit } from './keyedit.js';
import { initImage, maskImage, setInit, setInitFromBlob, setupMask, undoStroke } from './mask.js';
import { setupNetworks } from './networks.js';
import { setupXyz, xyzScript } from './xyz.js';

const last = { seed: null, subseed: null };
let tab = 'txt2img';
let pending = 0;

// --- messages ---------------------------------------------------------------------------------------

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

function status(text, kind = '') {
  $('model-status').textContent = text;
  $('model-status').className = `status ${kind}`;
}

window.addEventListener('error', (e) => showError(`Page error: ${e.message}`));
window.addEventListener('unhandledrejection', (e) => {
  e.preventDefault();
  showError(e.reason?.message || String(e.reason));
});

// --- theme and tabs ---------------------------------------------------------------------------------

const THEMES = ['auto', 'dark', 'light'];
function applyTheme(name) {
  document.documentElement.dataset.theme = name;
  $('theme').title = `Theme: ${name === 'auto' ? 'following the OS' : name} (click to change)`;
  localStorage.setItem('sd15-theme', name);
}

function showTab(name) {
  tab = name;
  for (const b of document.querySelectorAll('[role=tab]')) b.setAttribute('aria-selected', String(b.dataset.tab === name));
  const gen = name === 'txt2img' || name === 'img2img';
  $('gen').hidden = !gen;
  $('pnginfo').hidden = name !== 'pnginfo';
  $('history').hidden = name !== 'history';
  $('img2img-fields').hidden = name !== 'img2img';
  $('hires').hidden = name !== 'txt2img';
  document.body.dataset.tab = name;
  if (name === 'history') loadHistory();
}

// --- models -----------------------------------------------------------------------------------------

async function loadModels() {
  const [models, vaes, options] = await Promise.all([
    api('/sdapi/v1/sd-models'), api('/sdapi/v1/sd-vae'), api('/sdapi/v1/options')]);
  const ckpt = $('checkpoint');
  ckpt.replaceChildren(...models.map((m) => new Option(m.title, m.title)));
  const current = models.find((m) => m.title === options.sd_model_checkpoint
    || options.sd_model_checkpoint.startsWith(m.title.split(' [')[0]));
  if (current) ckpt.value = current.title;
  ckpt.dataset.loaded = ckpt.value;
  const vae = $('vae');
  vae.replaceChildren(...['Automatic', 'None', ...vaes.map((v) => v.model_name)].map((n) => new Option(n, n)));
  vae.value = options.sd_vae;
  vae.dataset.loaded = vae.value;
  return options;
}

async function switchModel(key, select) {
  const wanted = select.value;
  select.disabled = true;
  status(`Loading ${wanted}…`, 'busy');
  try {
    await api('/sdapi/v1/options', { method: 'POST', body: { [key]: wanted } });
    await loadModels();
    status(`Loaded ${wanted}`, 'ok');
  } catch (e) {
    select.value = select.dataset.loaded;  // the old model stays
    status(`Could not load ${wanted}: ${e.message}`, 'bad');
    await loadModels().catch(() => {});
  } finally {
    select.disabled = false;
  }
}

// --- generation -------------------------------------------------------------------------------------

async function generate() {
  if (tab !== 'txt2img' && tab !== 'img2img') showTab('txt2img');
  const kind = tab;
  clearMarks();
  showError('');
  let request;
  try {
    if (kind === 'img2img' && !initImage()) throw new Error('img2img needs an init image: drop, paste or choose one.');
    request = { ...buildRequest(kind, { init: initImage(), mask: maskImage() }), ...(xyzScript(kind) || {}) };
  } catch (e) { showError(e.message); return; }
  pending += 1;
  updateButtons();
  try {
    const result = await submit(kind, request);
    Object.assign(last, showResult(result));
  } catch (e) {
    const marked = e instanceof ApiError && markFields(e.fields);
    showError((e instanceof ApiError && e.status ? `Error ${e.status}: ` : '') + e.message
      + (marked ? ' (see the marked fields)' : ''));
  } finally {
    pending -= 1;
    updateButtons();
  }
}

function updateButtons() {
  $('generate').textContent = pending > 0 ? `Generate (${pending} waiting)` : 'Generate';
  document.body.classList.toggle('busy', pending > 0);
}

/** Restore every field from an image's parameters (png-info). */
async function restore(src, toTab) {
  try {
    if (!src.startsWith('data:')) src = await dataUrl(await (await fetch(new URL(src, location.origin))).blob());
    const [r, options] = await Promise.all([
      api('/sdapi/v1/png-info', { method: 'POST', body: { image: src } }), api('/sdapi/v1/options')]);
    if (!r.info) { showError('This image carries no generation parameters.'); return; }
    if (toTab || tab === 'history' || tab === 'pnginfo') showTab(toTab || 'txt2img');
    const notes = applyRequest(r.request, r.parameters);
    setOverrides(r.override_settings, r.override_labels, options);
    status(notes.length ? `Parameters restored; ${notes.join('; ')}` : 'Parameters restored', notes.length ? 'bad' : 'ok');
  } catch (e) { showError(e.message); }
}

async function toImg2img(src, inpaint) {
  await setInit(src);
  $('inpaint').checked = inpaint;
  $('inpaint').dispatchEvent(new Event('change'));
  showTab('img2img');
}

// --- images dropped or pasted anywhere --------------------------------------------------------------

async function takeImage(file, target) {
  if (tab === 'pnginfo') return showPngInfo(file);
  if (tab === 'img2img' && (target?.closest?.('#init-drop') || !target)) return setInitFromBlob(file);
  const reader = new FileReader();
  reader.onload = () => restore(reader.result);
  reader.readAsDataURL(file);
}

function imageFrom(items) {
  for (const item of items || []) {
    const file = item.getAsFile ? item.getAsFile() : item;
    if (file && file.type.startsWith('image/')) return file;
  }
  return null;
}

// --- start ------------------------------------------------------------------------------------------

async function start() {
  applyTheme(localStorage.getItem('sd15-theme') || 'auto');
  $('theme').addEventListener('click', () => applyTheme(THEMES[(THEMES.indexOf(document.documentElement.dataset.theme) + 1) % 3]));
  for (const b of document.querySelectorAll('[role=tab]')) b.addEventListener('click', () => showTab(b.dataset.tab));
  showTab('txt2img');
  sizeTools();
  seedTools(last);
  setupMask();
  setupNetworks();
  setupKeyedit([$('prompt'), $('negative_prompt')]);
  setupXyz();
  setupGallery({ reuse: (src) => restore(src), toImg2img });
  setupHistory(restore);
  $('generate').addEventListener('click', generate);
  $('interrupt').addEventListener('click', () => interrupt().catch((e) => showError(e.message)));
  $('skip').addEventListener('click', () => skip().catch((e) => showError(e.message)));
  $('checkpoint').addEventListener('change', () => switchModel('sd_model_checkpoint', $('checkpoint')));
  $('vae').addEventListener('change', () => switchModel('sd_vae', $('vae')));
  $('refresh-models').addEventListener('click', async () => {
    await Promise.all([api('/sdapi/v1/refresh-checkpoints', { method: 'POST' }), api('/sdapi/v1/refresh-vae', { method: 'POST' })]);
    await loadModels();
    status('Lists refreshed', 'ok');
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
    else if (e.key === 'Escape' && !$('viewer').open) interrupt().catch(() => {});
    else if (e.key === 'z' && (e.ctrlKey || e.metaKey) && tab === 'img2img' && !/TEXTAREA|INPUT/.test(e.target.tagName)) undoStroke();
  });
  document.addEventListener('dragover', (e) => { e.preventDefault(); document.body.classList.add('dragging'); });
  document.addEventListener('dragleave', (e) => { if (!e.relatedTarget) document.body.classList.remove('dragging'); });
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    document.body.classList.remove('dragging');
    const file = imageFrom(e.dataTransfer?.files);
    if (file) takeImage(file, e.target);
  });
  document.addEventListener('paste', (e) => {
    const file = imageFrom(e.clipboardData?.items);
    if (file) { e.preventDefault(); takeImage(file, null); }
  });
  try {
    const options = await loadModels();
    await loadLists(options);
  } catch (e) {
    showError(`Could not read the server's lists: ${e.message}`);
  }
  tokenCounters();
  await startJobs((result, error) => {
    if (result) Object.assign(last, showResult(result));
    else if (error) showError(error.message);
  });
  onReconnect(() => loadModels().catch(() => {}));
  document.body.classList.add('ready');
}

start();
