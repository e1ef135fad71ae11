// The History view (images saved under the server's output folder, `/sd15/v1/history`) and the PNG Info view.

import { $, api, el, dataUrl } from './api.js';
import { openViewer } from './gallery.js';

const PAGE = 48;
let offset = 0;

export async function loadHistory(more = false) {
  if (!more) offset = 0;
  const list = $('history-list');
  try {
    const r = await api(`/sd15/v1/history?offset=${offset}&limit=${PAGE}`, { allow404: true });
    if (r === undefined) {
      list.replaceChildren(el('p', { class: 'hint' }, 'This server has no history endpoint.'));
      return;
    }
    const cards = r.items.map((item) => el('button', {
      type: 'button', class: 'thumb', title: item.path,
      onclick: () => openViewer({ src: item.url, infotext: item.infotext, name: item.path.split('/').pop() }),
    }, el('img', { src: item.url, alt: item.path, loading: 'lazy' })));
    if (more) list.append(...cards); else list.replaceChildren(...cards);
    offset += r.items.length;
    $('history-count').textContent = r.total ? `${offset} of ${r.total} saved images` : 'No saved images yet.';
    $('history-more').hidden = offset >= r.total;
  } catch (e) {
    list.replaceChildren(el('p', { class: 'error' }, e.message));
  }
}

let pngUrl = null;

/** Show an image's infotext in the PNG Info view. */
export async function showPngInfo(blob) {
  pngUrl = await dataUrl(blob);
  $('png-image').src = pngUrl;
  $('png-image').hidden = false;
  try {
    const r = await api('/sdapi/v1/png-info', { method: 'POST', body: { image: pngUrl } });
    $('png-text').textContent = r.info || '(no parameters in this image)';
    const extra = Object.entries(r.items || {}).map(([k, v]) => `\n${k}: ${v}`).join('');
    $('png-text').textContent += extra;
    $('png-restore').disabled = !r.info;
  } catch (e) {
    $('png-text').textContent = e.message;
  }
}

export function setupHistory(restore) {
  $('history-refresh').addEventListener('click', () => loadHistory());
  $('history-more').addEventListener('click', () => loadHistory(true));
  $('png-file').addEventListener('change', (e) => { if (e.target.files[0]) showPngInfo(e.target.files[0]); });
  $('png-restore').addEventListener('click', () => restore(pngUrl, 'txt2img'));
}
