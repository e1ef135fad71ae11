// The generation form: option lists, reading it into an A1111 request, restoring it from an infotext,
// token counters, size and seed helpers. Fields carry `data-key` = the A1111 request field (or option)
// and, where it has one, `id` = the sd15 schema field name (the keys of png-info's `request`).

import { $, api, el, debounce } from './api.js';

const OPTION_KEYS = ['CLIP_stop_at_last_layers', 'randn_source'];  // sent as override_settings
const INT_KEYS = new Set(['resize_mode', 'inpainting_fill', 'inpainting_mask_invert']);

export function fields() { return [...document.querySelectorAll('#form [data-key]')]; }

function byKey(key) { return document.querySelector(`#form [data-key="${key}"]`); }

function value(input) {
  if (input.type === 'checkbox') return input.checked;
  if (input.type === 'number') return input.value === '' ? null : Number(input.value);
  if (input.value === 'true' || input.value === 'false') return input.value === 'true';
  if (INT_KEYS.has(input.dataset.key)) return Number(input.value);
  return input.value;
}

export function setValue(input, v) {
  if (input.type === 'checkbox') input.checked = v === true || v === 'True' || v === 'true';
  else if (input.tagName === 'SELECT' && ![...input.options].some((o) => o.value === String(v))) {
    input.append(el('option', { value: String(v) }, String(v)));  // keep values the lists do not know
    input.value = String(v);
  } else input.value = String(v);
  input.dispatchEvent(new Event('input', { bubbles: true }));
}

/** All form values by key. */
export function values() {
  const out = {};
  for (const input of fields()) out[input.dataset.key] = value(input);
  return out;
}

/** The A1111 request body for txt2img or img2img from the form. `images` = {init, mask} data URLs. */
export function buildRequest(kind, images = {}) {
  const v = values();
  const req = {
    prompt: v.prompt, negative_prompt: v.negative_prompt, sampler_name: v.sampler_name, scheduler: v.scheduler,
    steps: v.steps, cfg_scale: v.cfg_scale, width: v.width, height: v.height, n_iter: v.n_iter,
    batch_size: v.batch_size, seed: v.seed, subseed: v.subseed, subseed_strength: v.subseed_strength,
    override_settings: { ...overrides, ...Object.fromEntries(OPTION_KEYS.map((k) => [k, v[k]])) },
    override_settings_restore_afterwards: true,
  };
  if (kind === 'txt2img') {
    Object.assign(req, { enable_hr: v.enable_hr, hr_upscaler: v.hr_upscaler, hr_scale: v.hr_scale,
      hr_second_pass_steps: v.hr_second_pass_steps });
    if (v.enable_hr) req.denoising_strength = v.hr_denoising_strength;
  } else {
    Object.assign(req, { init_images: images.init ? [images.init] : [], denoising_strength: v.denoising_strength,
      resize_mode: v.resize_mode });
    if (images.mask) {
      Object.assign(req, { mask: images.mask, mask_blur: v.mask_blur, inpainting_fill: v.inpainting_fill,
        inpaint_full_res: v.inpaint_full_res, inpaint_full_res_padding: v.inpaint_full_res_padding,
        inpainting_mask_invert: v.inpainting_mask_invert });
    }
  }
  return req;
}

// --- infotext -> fields ----------------------------------------------------------------------------

/** Fill the form from png-info's `request` (the request fields an infotext restores, by A1111's paste rules);
 *  inputs are found by their id, the schema field name. Returns notes (e.g. another checkpoint). */
export function applyRequest(request, parameters) {
  const r = { ...request };
  // the form serves both tabs: a hires pass's strength goes to its own field
  if (r.enable_hr) [r.hr_denoising_strength, r.denoising_strength] = [r.denoising_strength, null];
  for (const input of fields()) if (r[input.id] != null) setValue(input, r[input.id]);
  if (r.enable_hr) $('hires').open = true;
  if (r.subseed_strength > 0) $('variation').open = true;
  const current = $('checkpoint').value;
  const model = parameters.Model;
  return model && !current.startsWith(model) ? [`made with checkpoint "${model}" (loaded: ${current})`] : [];
}

// --- override settings -----------------------------------------------------------------------------

// A1111's "Override settings" after a paste (`infotext_utils.get_override_settings`): the infotext's settings
// that differ from the server's options, sent with each generation until removed. As in A1111, a setting the
// form has a control for (OPTION_KEYS) gets no chip: the paste sets the control.
let overrides = {};  // option -> value
let labels = {};  // option -> infotext key

/** Show png-info's `override_settings` that differ from `options` (GET /options) as removable chips. */
export function setOverrides(settings, infotextKeys, options) {
  labels = infotextKeys || {};
  overrides = Object.fromEntries(Object.entries(settings || {})
    .filter(([key, v]) => !OPTION_KEYS.includes(key) && v !== options[key]));
  showOverrides();
}

function showOverrides() {
  const chips = Object.entries(overrides).map(([key, v]) => el('button', {
    type: 'button', class: 'chip', 'data-option': key, onclick: removeOverride,
    title: "Remove: generate with the server's setting", 'aria-label': `Remove override ${labels[key]}: ${v}`,
  }, `${labels[key]}: ${v} `, el('span', { 'aria-hidden': 'true' }, '×')));
  $('overrides').replaceChildren(el('span', { class: 'hint' }, 'Override settings'), ...chips);
  $('overrides').hidden = !chips.length;
}

function removeOverride(e) {
  const chip = e.currentTarget;
  const next = (chip.nextElementSibling || chip.previousElementSibling)?.dataset.option;
  delete overrides[chip.dataset.option];
  showOverrides();
  (document.querySelector(`#overrides [data-option="${next}"]`) || $('generate')).focus();
}

// --- lists ------------------------------------------------------------------------------------------

function fill(select, items, selected) {
  select.replaceChildren(...items.map(([v, label]) => el('option', { value: v }, label)));
  if (selected !== undefined) select.value = selected;
}

export async function loadLists(options) {
  const [smp, sch, ups, latent] = await Promise.all([
    api('/sdapi/v1/samplers'), api('/sdapi/v1/schedulers'), api('/sdapi/v1/upscalers'),
    api('/sdapi/v1/latent-upscale-modes')]);
  fill($('sampler_name'), smp.map((s) => [s.name, s.name]), smp.some((s) => s.name === 'DPM++ 2M') ? 'DPM++ 2M' : smp[0]?.name);
  fill($('scheduler'), sch.map((s) => [s.name, s.label]), 'automatic');
  const up = [...latent.map((u) => u.name), ...ups.map((u) => u.name).filter((n) => n !== 'None')];
  fill($('hr_upscaler'), up.map((n) => [n, n]), 'Latent');
  setValue($('clip_skip'), Number(options.CLIP_stop_at_last_layers || 1));
  setValue($('randn_source'), options.randn_source || 'GPU');
  return { samplers: smp, schedulers: sch, upscalers: up };
}

// --- token counters -------------------------------------------------------------------------------

export function tokenCounters() {
  let available = true;
  const count = async (area, badge, negative) => {
    if (!available) return;
    try {
      const r = await api('/sd15/v1/tokens', { method: 'POST', allow404: true,
        body: { prompt: area.value, steps: Number($('steps').value) || 20, negative } });
      if (r === undefined) { available = false; badge.hidden = true; return; }
      badge.textContent = `${r.tokens}/${r.limit}`;
      badge.classList.toggle('over', r.chunks > 1);
    } catch (e) { badge.textContent = '?'; }
  };
  const pairs = [[$('prompt'), $('prompt-tokens'), false], [$('negative_prompt'), $('negative-tokens'), true]];
  for (const [area, badge, neg] of pairs) {
    const run = debounce(() => count(area, badge, neg), 250);
    area.addEventListener('input', run);
    run();
  }
}

// --- size and seed helpers --------------------------------------------------------------------------

export function sizeTools() {
  $('swap-size').addEventListener('click', () => {
    const w = $('width').value;
    setValue($('width'), $('height').value);
    setValue($('height'), w);
  });
  $('size-preset').addEventListener('change', (e) => {
    const [w, h] = e.target.value.split('x');
    if (w) { setValue($('width'), w); setValue($('height'), h); }
    e.target.value = '';
  });
}

export function seedTools(last) {
  $('seed-random').addEventListener('click', () => setValue($('seed'), -1));
  $('subseed-random').addEventListener('click', () => setValue($('subseed'), -1));
  $('seed-reuse').addEventListener('click', () => { if (last.seed != null) setValue($('seed'), last.seed); });
  $('subseed-reuse').addEventListener('click', () => { if (last.subseed != null) setValue($('subseed'), last.subseed); });
}

/** Show a 4xx's per-field messages next to the fields; returns true when at least one field was marked. */
export function markFields(fieldErrors) {
  clearMarks();
  let marked = false;
  for (const [key, msg] of Object.entries(fieldErrors || {})) {
    const input = byKey(key);
    if (!input) continue;
    input.setAttribute('aria-invalid', 'true');
    input.closest('label')?.append(el('small', { class: 'field-error' }, msg));
    marked = true;
  }
  return marked;
}

export function clearMarks() {
  document.querySelectorAll('.field-error').forEach((n) => n.remove());
  document.querySelectorAll('[aria-invalid]').forEach((n) => n.removeAttribute('aria-invalid'));
}
