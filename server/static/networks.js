// LoRA and textual-inversion browser: a click inserts `<lora:name:1>` or the embedding's trigger word into the
// prompt that last had the focus, at the cursor.

import { $, api, el } from './api.js';

let target = null;

function insert(text) {
  const area = target || $('prompt');
  const { selectionStart: a, selectionEnd: b, value } = area;
  const before = value.slice(0, a);
  const sep = before && !/[\s,(]$/.test(before) ? ', ' : '';
  area.value = before + sep + text + value.slice(b);
  const pos = (before + sep + text).length;
  area.focus();
  area.setSelectionRange(pos, pos);
  area.dispatchEvent(new Event('input', { bubbles: true }));
}

async function load() {
  const list = $('network-list');
  list.replaceChildren(el('p', { class: 'hint' }, 'Loading…'));
  try {
    const [loras, emb] = await Promise.all([api('/sdapi/v1/loras'), api('/sdapi/v1/embeddings')]);
    const cards = [
      ...loras.map((l) => card('LoRA', l.alias && l.alias !== l.name ? `${l.name} (${l.alias})` : l.name,
        `<lora:${l.name}:1>`)),
      ...Object.entries(emb.loaded || {}).map(([name, e]) => card('TI', `${name} · ${e.vectors} vec`, name)),
    ];
    list.replaceChildren(...(cards.length ? cards : [el('p', { class: 'hint' },
      'No LoRA or embedding files (put them in the Lora/ and embeddings/ folders, then ↻).')]));
    filter();
  } catch (e) {
    list.replaceChildren(el('p', { class: 'error' }, e.message));
  }
}

function card(kind, label, text) {
  return el('button', { type: 'button', class: 'card', title: `Insert ${text}`, 'data-insert': text,
    onclick: () => insert(text) }, el('small', {}, kind), ` ${label}`);
}

function filter() {
  const q = $('network-filter').value.toLowerCase();
  for (const c of $('network-list').querySelectorAll('.card')) c.hidden = q && !c.textContent.toLowerCase().includes(q);
}

export function setupNetworks() {
  for (const id of ['prompt', 'negative_prompt']) $(id).addEventListener('focus', (e) => { target = e.target; });
  let loaded = false;
  $('networks-toggle').addEventListener('click', () => {
    const box = $('networks');
    box.hidden = !box.hidden;
    $('networks-toggle').setAttribute('aria-expanded', String(!box.hidden));
    if (!box.hidden && !loaded) { loaded = true; load(); }
  });
  $('network-refresh').addEventListener('click', async () => {
    await Promise.all([api('/sdapi/v1/refresh-loras', { method: 'POST' }),
      api('/sdapi/v1/refresh-embeddings', { method: 'POST' })]).catch(() => {});
    load();
  });
  $('network-filter').addEventListener('input', filter);
}
