// Ctrl+↑ / Ctrl+↓ in a prompt changes the attention weight of the selection (or of the word or the
// `(text:weight)` group under the cursor) by 0.1, as A1111's edit-attention does: `(text:1.1)`, and back to
// plain text at weight 1.

const DELIMITERS = '.,\\/!?%^*;:{}=`~()[]<>\n\t ';
const STEP = 0.1;

function selection(v, a, b) {
  // inside a "(text:weight)" group: take its text
  const open = v.lastIndexOf('(', a - 1);
  const close = v.indexOf(')', b);
  if (open >= 0 && close >= 0) {
    const inner = v.slice(open + 1, close);
    const m = inner.match(/^([^()]*):(-?\d+(?:\.\d+)?)$/);
    if (m && a >= open + 1 && b <= open + 1 + m[1].length + 1) return [open + 1, open + 1 + m[1].length];
  }
  if (a !== b) return [a, b];
  while (a > 0 && !DELIMITERS.includes(v[a - 1])) a -= 1;
  while (b < v.length && !DELIMITERS.includes(v[b])) b += 1;
  return [a, b];
}

export function editAttention(area, up) {
  const v = area.value;
  const [a, b] = selection(v, area.selectionStart, area.selectionEnd);
  if (a === b) return;
  const text = v.slice(a, b);
  const weighted = v[a - 1] === '(' && v.slice(b).match(/^:(-?\d+(?:\.\d+)?)\)/);
  let weight = weighted ? Number(weighted[1]) : 1;
  weight = Math.round((weight + (up ? STEP : -STEP)) * 100) / 100;
  const start = weighted ? a - 1 : a;
  const end = weighted ? b + weighted[0].length : b;
  const replacement = weight === 1 ? text : `(${text}:${weight})`;
  area.value = v.slice(0, start) + replacement + v.slice(end);
  const at = weight === 1 ? start : start + 1;
  area.setSelectionRange(at, at + text.length);
  area.dispatchEvent(new Event('input', { bubbles: true }));
}

export function setupKeyedit(areas) {
  for (const area of areas) {
    area.addEventListener('keydown', (e) => {
      if (!(e.ctrlKey || e.metaKey) || (e.key !== 'ArrowUp' && e.key !== 'ArrowDown')) return;
      e.preventDefault();
      editAttention(area, e.key === 'ArrowUp');
    });
  }
}
