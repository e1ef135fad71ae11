// X/Y/Z plot: sent as A1111's `script_name: "x/y/z plot"` with the script's positional `script_args`. An axis
// type is an index into the script's axis list of the tab (txt2img and img2img differ); the page reads those
// lists from `/sdapi/v1/script-info` (the server's script is the authority) and sends values as text ("csv
// mode"), so the dropdown lists stay empty. The job runs in the queue like any other.

import { $, api, el } from './api.js';

// the axes offered, most used first (the server refuses axes it has no setting for)
const LABELS = ['Nothing', 'Seed', 'Steps', 'CFG Scale', 'Sampler', 'Schedule type', 'Prompt S/R', 'Checkpoint name',
  'Var. seed', 'Var. strength', 'Prompt order', 'Clip skip', 'Size', 'VAE', 'RNG source', 'Denoising', 'Eta',
  'Hires steps', 'Hires sampler', 'Hires upscaler', 'Initial noise multiplier'];
const HINTS = {
  Seed: '1, 2, 3 or 1-5', Steps: '10, 20, 30 or 10-40 (+10)', 'CFG Scale': '5, 7, 9 or 5-9 [3]',
  'Prompt S/R': 'cat, dog, fox (the first is searched)', Sampler: 'Euler a, DPM++ 2M', 'Schedule type': 'Automatic, Karras',
  'Checkpoint name': 'model-a, model-b', Size: '512x512, 512x768', 'Clip skip': '1, 2', 'RNG source': 'GPU, CPU',
};
const axes = { txt2img: null, img2img: null };  // label -> index, per tab, from script-info

export async function setupXyz() {
  const rows = ['X', 'Y', 'Z'].map((axis, i) => {
    const type = el('select', { id: `xyz-${axis}-type`, 'aria-label': `${axis} type` },
      ...LABELS.map((label) => el('option', { value: label }, label)));
    type.value = i === 0 ? 'Seed' : 'Nothing';
    const values = el('input', { id: `xyz-${axis}-values`, type: 'text', 'aria-label': `${axis} values` });
    const hint = () => { values.placeholder = HINTS[type.value] || ''; values.disabled = type.value === 'Nothing'; };
    type.addEventListener('change', hint);
    hint();
    return el('div', { class: 'row' }, el('b', {}, axis), type, values);
  });
  $('xyz-axes').replaceChildren(...rows);
  $('xyz-enable').addEventListener('change', () => { if ($('xyz-enable').checked) $('xyz').open = true; });
  try {
    for (const s of await api('/sdapi/v1/script-info')) {
      if (s.name !== 'x/y/z plot') continue;
      const labels = s.args[0]?.choices || [];
      axes[s.is_img2img ? 'img2img' : 'txt2img'] = Object.fromEntries(labels.map((l, k) => [l, k]));
    }
  } catch (e) { /* a server without scripts: the request names the plot and the server's 4xx says so */ }
}

/** {script_name, script_args} for the request, or null when the plot is off. Throws on an axis the tab lacks. */
export function xyzScript(kind) {
  if (!$('xyz-enable').checked) return null;
  const args = [];
  for (const axis of ['X', 'Y', 'Z']) {
    const label = $(`xyz-${axis}-type`).value;
    const index = axes[kind] ? axes[kind][label] : label;  // no script-info: the label (sd15 takes it)
    if (index === undefined) throw new Error(`X/Y/Z plot: "${label}" is not an axis of ${kind}`);
    args.push(index, label === 'Nothing' ? '' : $(`xyz-${axis}-values`).value, []);
  }
  // draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, margin_size, csv_mode
  args.push($('xyz-legend').checked, $('xyz-lone').checked, false, false, false, false, false, 0, true);
  return { script_name: 'x/y/z plot', script_args: args };
}
