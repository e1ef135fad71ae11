// Results: thumbnails, the selected image with its infotext, the full-size viewer, download, and the
// actions that hand an image to the rest of the page (reuse parameters, send to img2img / inpaint).

import { $, el } from './api.js';

let items = [];     // [{src, infotext, name}]
let selected = 0;
let actions = {};   // {reuse(src), toImg2img(src, inpaint)}

export function setupGallery(handlers) {
  actions = handlers;
  $('view').addEventListener('click', () => openViewer(items[selected]));
  $('reuse').addEventListener('click', () => actions.reuse(items[selected].src));
  $('to-img2img').addEventListener('click', () => actions.toImg2img(items[selected].src, false));
  $('to-inpaint').addEventListener('click', () => actions.toImg2img(items[selected].src, true));
  $('stage').addEventListener('click', (e) => { if (e.target.id === 'preview' && items.length) openViewer(items[selected]); });
  $('viewer-close').addEventListener('click', () => $('viewer').close());
  $('viewer').addEventListener('click', (e) => { if (e.target.id === 'viewer') $('viewer').close(); });
  $('viewer-reuse').addEventListener('click', () => { $('viewer').close(); actions.reuse($('viewer-image').src); });
}

// The images come in A1111's `samples_format` option: [type, file extension] by the base64 of the magic bytes
const FORMATS = { iVBOR: ['png', 'png'], '/9j/': ['jpeg', 'jpg'], UklGR: ['webp', 'webp'] };

function imageFormat(b64) {
  const head = Object.keys(FORMATS).find((h) => b64.startsWith(h));
  return FORMATS[head || 'iVBOR'];
}

/** Show an A1111 txt2img/img2img response. Returns {seed, subseed} of the first image. */
export function showResult(resp) {
  let info = {};
  try { info = typeof resp.info === 'string' ? JSON.parse(resp.info) : resp.info || {}; } catch (e) { /* keep {} */ }
  const texts = info.infotexts || [];
  items = (resp.images || []).map((b64, i) => {
    const [type, ext] = imageFormat(b64);
    return {
      src: `data:image/${type};base64,${b64}`,
      infotext: texts[i] ?? texts[0] ?? '',
      name: `${String(info.all_seeds?.[i] ?? info.seed ?? 'image')}.${ext}`,
    };
  });
  $('gallery').replaceChildren(...items.map((item, i) => el('button', {
    type: 'button', role: 'listitem', class: 'thumb', 'aria-label': `Image ${i + 1}`,
    onclick: () => select(i),
  }, el('img', { src: item.src, alt: '' }))));
  $('gallery').hidden = items.length < 2;
  if (items.length) select(0);
  return { seed: info.seed, subseed: info.subseed };
}

/** Back to the selected result (or the empty stage) after a preview of another client's job. */
export function restoreStage() {
  if (items.length) { select(selected); return; }
  $('preview').hidden = true;
  $('stage-hint').hidden = false;
}

function select(i) {
  selected = i;
  const item = items[i];
  $('preview').src = item.src;
  $('preview').hidden = false;
  $('stage-hint').hidden = true;
  $('infotext').textContent = item.infotext;
  $('download').href = item.src;
  $('download').download = item.name;
  $('result-actions').hidden = false;
  [...$('gallery').children].forEach((b, k) => b.classList.toggle('on', k === i));
}

export function openViewer(item) {
  if (!item) return;
  $('viewer-image').src = item.src;
  $('viewer-text').textContent = item.infotext || '';
  $('viewer-download').href = item.src;
  $('viewer-download').download = item.name || 'image.png';
  $('viewer').showModal();
}
