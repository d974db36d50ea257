// Artifacts page: the server's update artifacts — list with filters, details, upload with
// progress, delete.
import { api, boot, can, h, flash, act, confirmDialog, currentSession, fmtAgo, fmtBytes, timeEl } from './app.js';

function signature(a) {
  if (a.verified_key) return h('span', { class: 'badge st-accepted', title: `verified with ${a.verified_key}` }, 'Verified');
  if (a.signed) return h('span', { class: 'badge' }, 'Signed');
  return h('span', { class: 'badge st-pending' }, 'Unsigned');
}

function filterQuery() {
  const f = document.getElementById('filter');
  const q = new URLSearchParams();
  if (f.name.value.trim()) q.set('name', f.name.value.trim());
  if (f.device_type.value.trim()) q.set('device_type', f.device_type.value.trim());
  const s = q.toString();
  return s ? `?${s}` : '';
}

async function drawList() {
  const list = await api(`/artifacts${filterQuery()}`);
  const box = document.getElementById('artifacts');
  if (list.length === 0) {
    box.replaceChildren(h('p', { class: 'panel muted' }, 'No artifacts.'));
    return;
  }
  const head = ['Name', 'Device types', 'Payload', 'Size', 'Signature', 'Uploaded', 'Actions'];
  box.replaceChildren(h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, head.map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, list.map((a) => {
      const show = h('button', { type: 'button', class: 'small secondary', 'aria-label': `Details of ${a.name}` }, 'Details');
      show.addEventListener('click', () => drawDetails(a.id).catch((e) => flash(e.message, 'error')));
      const actions = [show];
      if (can('operator')) {
        const del = h('button', { type: 'button', class: 'small danger', 'aria-label': `Delete ${a.name}` }, 'Delete');
        del.addEventListener('click', async () => {
          const answer = await confirmDialog({ title: `Delete ${a.name}?`, message: 'The artifact file is removed from the server.', confirmLabel: 'Delete', danger: true });
          if (!answer) return;
          const ok = await act(del, () => api(`/artifacts/${encodeURIComponent(a.id)}`, { method: 'DELETE' }), `Artifact ${a.name} deleted.`);
          if (ok !== undefined) {
            document.getElementById('details').hidden = true;
            drawList().catch((e) => flash(e.message, 'error'));
          }
        });
        actions.push(' ', del);
      }
      return h('tr', { 'data-artifact': a.id },
        h('th', { scope: 'row' }, a.name, a.description ? h('div', { class: 'small muted' }, a.description) : null),
        h('td', {}, a.device_types.join(', ')),
        h('td', {}, a.payload_types.join(', ') || '–'),
        h('td', {}, fmtBytes(a.size)),
        h('td', {}, signature(a)),
        h('td', {}, timeEl(a.uploaded_ms, fmtAgo(a.uploaded_ms)), h('div', { class: 'small muted' }, a.uploaded_by)),
        h('td', {}, actions));
    })))));
}

function pairs(obj) {
  const keys = Object.keys(obj);
  if (keys.length === 0) return h('span', { class: 'muted' }, '–');
  return h('ul', { class: 'small mono' }, keys.map((k) => h('li', {}, `${k}: ${Array.isArray(obj[k]) ? obj[k].join(' | ') : obj[k]}`)));
}

async function drawDetails(id) {
  const a = await api(`/artifacts/${encodeURIComponent(id)}`);
  const rows = [
    ['Id', h('span', { class: 'mono' }, a.id)],
    ['Name', a.name],
    ['Device types', a.device_types.join(', ')],
    ['Provides', pairs(a.provides)],
    ['Depends', pairs(a.depends)],
    ['Clears', a.clears_provides.join(', ') || '–'],
    ['Size', `${fmtBytes(a.size)} (${a.size} bytes)`],
    ['SHA-256', h('span', { class: 'mono small' }, a.sha256)],
    ['Signature', signature(a)],
    ['Uploaded', `${new Date(a.uploaded_ms).toLocaleString()} by ${a.uploaded_by}`],
  ];
  document.getElementById('details-title').textContent = `Artifact ${a.name}`;
  document.getElementById('details-body').replaceChildren(h('table', {},
    h('tbody', {}, rows.map(([k, v]) => h('tr', {}, h('th', { scope: 'row' }, k), h('td', {}, v))))));
  const section = document.getElementById('details');
  section.hidden = false;
  section.scrollIntoView({ block: 'nearest' });
}

/** Sends the file as the raw body with upload progress (fetch reports none). */
function upload(file, description, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const q = description ? `?description=${encodeURIComponent(description)}` : '';
    xhr.open('POST', `/api/v1/artifacts${q}`);
    xhr.setRequestHeader('Content-Type', 'application/vnd.mender-artifact');
    xhr.setRequestHeader('Accept', 'application/json');
    xhr.setRequestHeader('X-CSRF-Token', currentSession().csrf_token);
    xhr.upload.addEventListener('progress', (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener('load', () => {
      let data = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch {
        data = null;
      }
      if (xhr.status >= 200 && xhr.status < 300 && data) resolve(data);
      else reject(new Error(data && data.error ? data.error : `upload failed (${xhr.status})`));
    });
    xhr.addEventListener('error', () => reject(new Error('the server cannot be reached')));
    xhr.send(file);
  });
}

function setUpForms() {
  document.getElementById('filter').addEventListener('submit', (e) => {
    e.preventDefault();
    drawList().catch((err) => flash(err.message, 'error'));
  });
  const form = document.getElementById('upload');
  if (!form) return;
  const box = document.getElementById('upload-progress');
  const bar = document.getElementById('upload-bar');
  const pct = document.getElementById('upload-pct');
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const file = form.file.files[0];
    if (!file) return;
    box.hidden = false;
    const progress = (f) => {
      bar.value = Math.round(f * 100);
      pct.textContent = `${Math.round(f * 100)} %`;
    };
    progress(0);
    const ok = await act(form.querySelector('button[type=submit]'), () => upload(file, form.description.value.trim(), progress),
      (a) => `Artifact ${a.name} uploaded.`);
    if (ok) {
      form.reset();
      box.hidden = true;
      drawList().catch((err) => flash(err.message, 'error'));
    }
  });
}

async function main() {
  await boot({ page: 'artifacts' });
  setUpForms();
  await drawList();
}

main().catch((e) => flash(e.message, 'error'));
