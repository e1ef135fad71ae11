// X/Y/Z plot: sent as A1111's `script_name: "x/y/z plot"` with the script's positional `script_args`
// (A1111's scripts/xyz_grid.py: axis types are indexes into its axis list, which differs between txt2img and
// img2img; values are sent as text, "csv mode", so dropdown lists stay empty).

import { $, el } from './api.js';

// label -> [index in txt2img, index in img2img]; the axes researchers use most
const AXES = {
  Nothing: [0, 0], Seed: [1, 1], 'Var. seed': [2, 2], 'Var. strength': [3, 3], Steps: [4, 4],
  'Hires steps': [5, null], 'CFG Scale': [6, 5], 'Prompt S/R': [7, 7], Sampler: [9, 9],
  'Checkpoint name': [11, 10], 'Schedule type': [17, 16],
};
const HINTS = {
  Seed: '1, 2, 3 or 1-5', Steps: '10, 20, 30 or 10-40 (+10)', 'CFG Scale': '5, 7, 9', 'Prompt S/R': 'cat, dog, fox',
  Sampler: 'Euler a, DPM++ 2M', 'Checkpoint name': 'model-a, model-b', 'Schedule type': 'Automatic, Karras',
};

export function setupXyz() {
  const rows = ['X', 'Y', 'Z'].map((axis, i) => {
    const type = el('select', { id: `xyz-${axis}-type`, 'aria-label': `${axis} type` },
      ...Object.keys(AXES).map((label) => el('option', { value: label }, label)));
    type.value = i === 0 ? 'Seed' : 'Nothing';
    const values = el('input', { id: `xyz-${axis}-values`, type: 'text', 'aria-label': `${axis} values` });
    const hint = () => { values.placeholder = HINTS[type.value] || ''; values.disabled = type.value === 'Nothing'; };
    type.addEventListener('change', hint);
    hint();
    return el('div', { class: 'row' }, el('b', {}, axis), type, values);
  });
  $('xyz-axes').replaceChildren(...rows);
  $('xyz-enable').addEventListener('change', () => { if ($('xyz-enable').checked) $('xyz').open = true; });
}

/** {script_name, script_args} for the request, or null when the plot is off. Throws on an axis the mode lacks. */
export function xyzScript(kind) {
  if (!$('xyz-enable').checked) return null;
  const col = kind === 'img2img' ? 1 : 0;
  const args = [];
  for (const axis of ['X', 'Y', 'Z']) {
    const label = $(`xyz-${axis}-type`).value;
    const index = AXES[label][col];
    if (index === null) throw new Error(`X/Y/Z plot: "${label}" is a txt2img axis`);
    args.push(index, label === 'Nothing' ? '' : $(`xyz-${axis}-values`).value, []);
  }
  // draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, margin_size, csv_mode
  args.push($('xyz-legend').checked, $('xyz-lone').checked, false, false, false, false, false, 0, true);
  return { script_name: 'x/y/z plot', script_args: args };
}
