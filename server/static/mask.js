// img2img input: the init image (drop / paste / file) and the inpainting mask painted on a canvas laid over it
// at the image's own resolution (brush, eraser, size, undo). The mask is sent as white-on-black PNG.

import { $, dataUrl } from './api.js';

let initUrl = null;
let erasing = false;
const undo = [];

const canvas = () => $('mask-canvas');

export function initImage() { return initUrl; }

export function setInit(url) {
  initUrl = url;
  const img = $('init-image');
  $('canvas-wrap').hidden = !url;
  $('init-hint').hidden = !!url;
  if (!url) { img.removeAttribute('src'); return Promise.resolve(); }
  return new Promise((resolve) => {
    img.onload = () => {
      canvas().width = img.naturalWidth;
      canvas().height = img.naturalHeight;
      undo.length = 0;
      resolve();
    };
    img.src = url;
  });
}

export async function setInitFromBlob(blob) { await setInit(await dataUrl(blob)); }

export function inpainting() { return $('inpaint').checked && !!initUrl; }

/** The mask as a data URL (white = repaint), or null when inpainting is off or nothing is painted. */
export function maskImage() {
  if (!inpainting()) return null;
  const c = canvas();
  const alpha = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = false;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i]) { painted = true; break; }
  if (!painted) return null;
  const out = document.createElement('canvas');
  out.width = c.width;
  out.height = c.height;
  const ctx = out.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(c, 0, 0);
  return out.toDataURL('image/png');
}

function point(e) {
  const c = canvas();
  const r = c.getBoundingClientRect();
  return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height];
}

function tool(eraser) {
  erasing = eraser;
  $('brush').setAttribute('aria-pressed', String(!eraser));
  $('eraser').setAttribute('aria-pressed', String(eraser));
}

function snapshot() {
  const c = canvas();
  undo.push(c.getContext('2d').getImageData(0, 0, c.width, c.height));
  if (undo.length > 30) undo.shift();
}

export function undoStroke() {
  const last = undo.pop();
  if (last) canvas().getContext('2d').putImageData(last, 0, 0);
}

export function setupMask() {
  const c = canvas();
  const ctx = c.getContext('2d');
  let last = null;
  const draw = (e) => {
    const [x, y] = point(e);
    ctx.globalCompositeOperation = erasing ? 'destination-out' : 'source-over';
    ctx.strokeStyle = ctx.fillStyle = '#fff';
    ctx.lineWidth = Number($('brush-size').value) * c.width / c.getBoundingClientRect().width;
    ctx.lineCap = ctx.lineJoin = 'round';
    ctx.beginPath();
    ctx.moveTo(...(last || [x, y]));
    ctx.lineTo(x + (last ? 0 : 0.01), y);
    ctx.stroke();
    last = [x, y];
  };
  c.addEventListener('pointerdown', (e) => {
    if (!inpainting()) return;
    snapshot();
    c.setPointerCapture(e.pointerId);
    last = null;
    draw(e);
  });
  c.addEventListener('pointermove', (e) => { if (last) draw(e); });
  const end = () => { last = null; };
  c.addEventListener('pointerup', end);
  c.addEventListener('pointercancel', end);
  $('brush').addEventListener('click', () => tool(false));
  $('eraser').addEventListener('click', () => tool(true));
  $('undo').addEventListener('click', undoStroke);
  $('clear-mask').addEventListener('click', () => { snapshot(); ctx.clearRect(0, 0, c.width, c.height); });
  $('clear-init').addEventListener('click', () => setInit(null));
  $('inpaint').addEventListener('change', () => {
    document.body.classList.toggle('inpainting', $('inpaint').checked);
  });
  $('init-file').addEventListener('change', (e) => { if (e.target.files[0]) setInitFromBlob(e.target.files[0]); });
  $('init-drop').addEventListener('keydown', (e) => {
    if ((e.key === 'Enter' || e.key === ' ') && e.target === $('init-drop')) $('init-file').click();
  });
}
