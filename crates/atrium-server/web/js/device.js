// One device: state, identity, inventory, twin, its deployments, and its audit trail.
import { api, ApiError, boot, can, h, flash, act, param, fmtAgo, fmtBytes, fmtDateTime, timeEl } from './app.js';
import { statusBadge, linkBadge, actionButtons, pairsText, parsePairs } from './fleet.js';
import { deviceStatusBadge } from './deploy.js';

const id = param('id');
/** Top-level desired keys the server maintains (rooms come from the rooms API). */
const SERVER_KEYS = ['rooms'];

function facts(el, pairs) {
  el.replaceChildren(...pairs.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v ?? '–')]));
}

const KB_KEYS = new Set(['memory_total_kb', 'memory_available_kb', 'disk_root_total_kb', 'disk_root_available_kb']);

function inventoryValue(key, value) {
  const n = Number(value);
  if (KB_KEYS.has(key) && Number.isFinite(n)) return `${(n / 1048576).toFixed(2)} GiB`;
  if (key === 'uptime_s' && Number.isFinite(n)) {
    const d = Math.floor(n / 86400);
    const hh = Math.floor((n % 86400) / 3600);
    const mm = Math.floor((n % 3600) / 60);
    return `${d ? `${d} d ` : ''}${hh} h ${mm} min`;
  }
  return value;
}

function draw(d) {
  const name = d.identity.serial || d.id;
  document.title = `${name} · Atrium`;
  document.getElementById('device-name').textContent = name;
  document.getElementById('device-badges').replaceChildren(statusBadge(d.status), ' ', linkBadge(d.connected));
  facts(document.getElementById('state'), [
    ['Status', statusBadge(d.status)],
    ['Why', d.status_reason || '–'],
    ['Link', linkBadge(d.connected)],
    ['Last seen', d.last_seen_ms ? timeEl(d.last_seen_ms, `${fmtAgo(d.last_seen_ms)} (${fmtDateTime(d.last_seen_ms)})`) : 'never'],
    ['Enrolled', timeEl(d.created_ms)],
    ['Last change', timeEl(d.updated_ms)],
    ['Admitted by', d.enrollment],
    ['Tags', pairsText(d.tags)],
  ]);
  // Redraw the buttons only when the status changes, so a refresh does not steal the focus.
  const actions = document.getElementById('actions');
  if (actions.dataset.status !== d.status) {
    actions.dataset.status = d.status;
    actions.replaceChildren(...actionButtons(d, (updated) => {
      draw(updated);
      drawAudit().catch((e) => flash(e.message, 'error'));
    }));
  }
  drawTerminalAction(d);
  facts(document.getElementById('identity'), [
    ['Device id', h('code', {}, d.id)],
    ['Serial', d.identity.serial],
    ['MAC', h('code', {}, d.identity.mac)],
    ['Device type', d.identity.device_type],
    ['Hardware model', d.identity.hardware_model || '–'],
    ['Key fingerprint', h('code', {}, d.key_fingerprint)],
    ...Object.entries(d.identity.extra || {}).map(([k, v]) => [k, v]),
  ]);
  const inv = Object.entries(d.inventory || {});
  document.getElementById('inventory-when').textContent = d.inventory_updated_ms
    ? `Reported ${fmtAgo(d.inventory_updated_ms)} (${fmtDateTime(d.inventory_updated_ms)}).` : 'Not reported yet.';
  document.getElementById('inventory').replaceChildren(inv.length
    ? h('div', { class: 'table-wrap' }, h('table', {},
      h('caption', { class: 'visually-hidden' }, 'Inventory attributes'),
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Attribute'), h('th', { scope: 'col' }, 'Value'))),
      h('tbody', {}, inv.map(([k, v]) => h('tr', {}, h('th', { scope: 'row' }, k), h('td', { class: 'mono' }, inventoryValue(k, v)))))))
    : h('p', { class: 'muted' }, 'No inventory yet.'));
}

/** Operators and admins open a shell on an accepted, connected device. */
function drawTerminalAction(d) {
  const box = document.getElementById('terminal-action');
  const possible = can('operator') && d.status === 'accepted' && d.connected;
  if (possible === (box.childElementCount > 0)) return;
  box.replaceChildren(...(possible ? [
    h('a', { class: 'button small', id: 'open-terminal', href: `terminal.html?device=${encodeURIComponent(d.id)}` }, 'Terminal'),
    h('a', { class: 'button small secondary', href: `sessions.html?device=${encodeURIComponent(d.id)}` }, 'Terminal sessions'),
  ] : []));
}

async function drawAudit() {
  const entries = await api(`/audit?target=${encodeURIComponent(id)}&limit=200`);
  const box = document.getElementById('audit');
  if (entries.length === 0) {
    box.replaceChildren(h('p', { class: 'muted' }, 'No entries.'));
    return;
  }
  box.replaceChildren(h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, ['Time', 'Who', 'What', 'Details'].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, [...entries].reverse().map((e) => h('tr', { 'data-action': e.action },
      h('td', { class: 'nowrap' }, timeEl(e.time_ms)), h('td', {}, e.actor), h('td', {}, e.action),
      h('td', { class: 'mono small details' }, JSON.stringify(e.details))))))));
}

/** The deployments this device is or was part of, newest first. */
async function drawDeployments() {
  const box = document.getElementById('deployments');
  let list;
  try {
    list = await api(`/devices/${encodeURIComponent(id)}/deployments`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      box.replaceChildren(h('p', { class: 'muted' }, `No deployments: ${e.message}`));
      return;
    }
    throw e;
  }
  if (list.length === 0) {
    box.replaceChildren(h('p', { class: 'muted' }, 'No deployments.'));
    return;
  }
  box.replaceChildren(h('div', { class: 'table-wrap' }, h('table', { id: 'device-deployments' },
    h('caption', { class: 'visually-hidden' }, 'Deployments of this device'),
    h('thead', {}, h('tr', {}, ['Deployment', 'Status', 'Attempt', 'Received', 'Updated', 'Reason']
      .map((t) => h('th', { scope: 'col', class: t === 'Attempt' || t === 'Received' ? 'num' : '' }, t)))),
    h('tbody', {}, list.map((e) => h('tr', { 'data-deployment': e.deployment_id, 'data-status': e.status },
      h('th', { scope: 'row' }, h('a', { href: `deployment.html?id=${encodeURIComponent(e.deployment_id)}` }, e.deployment_name || e.deployment_id)),
      h('td', {}, deviceStatusBadge(e.status)),
      h('td', { class: 'num' }, String(e.attempt)),
      h('td', { class: 'num' }, e.bytes ? fmtBytes(e.bytes) : '–'),
      h('td', {}, e.updated_ms ? timeEl(e.updated_ms, fmtAgo(e.updated_ms)) : '–'),
      h('td', { class: 'small details' }, e.reason || '–')))))));
}

/** Whether this server has device twins (older servers do not). */
async function twinsAvailable() {
  const doc = await api('/openapi.json');
  return !!(doc && doc.paths && doc.paths['/api/v1/devices/{id}/twin']);
}

function metaTable(meta) {
  const rows = Object.entries(meta || {}).filter(([, m]) => m && typeof m === 'object');
  if (rows.length === 0) return null;
  return h('details', {}, h('summary', {}, 'When each key changed'),
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Key'), h('th', { scope: 'col' }, 'Version'), h('th', { scope: 'col' }, 'Changed'))),
      h('tbody', {}, rows.map(([k, m]) => h('tr', {}, h('td', { class: 'mono' }, k), h('td', { class: 'num' }, String(m.version ?? '–')),
        h('td', {}, m.updated_ms ? timeEl(m.updated_ms) : '–')))))));
}

function section(title, s, extra) {
  return h('div', { 'data-twin-section': title.toLowerCase() },
    h('h3', {}, `${title} `, h('span', { class: 'muted small' }, `version ${s.version}`)),
    h('pre', { class: 'json' }, JSON.stringify(s.doc, null, 2)),
    metaTable(s.meta), extra || null);
}

/** The twin editor's state: the desired version its text was based on, and that text. */
const twinEdit = { version: null, text: null, area: null, note: null };

function editableText(desired) {
  const doc = Object.fromEntries(Object.entries(desired.doc || {}).filter(([k]) => !SERVER_KEYS.includes(k)));
  return JSON.stringify(doc, null, 2);
}

/** Reads the twin and shows it; the editor keeps what the operator typed. */
async function drawTwin() {
  const box = document.getElementById('twin');
  let twin;
  try {
    twin = await api(`/devices/${encodeURIComponent(id)}/twin`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      box.replaceChildren(h('p', { class: 'muted' }, `No twin: ${e.message}`));
      return null;
    }
    throw e;
  }
  const sections = h('div', { class: 'twin-grid', id: 'twin-sections' }, section('Desired', twin.desired), section('Reported', twin.reported));
  const current = document.getElementById('twin-sections');
  if (current) {
    current.replaceWith(sections);
  } else {
    box.replaceChildren(sections, can('operator') ? editor() : null);
  }
  if (twinEdit.area) {
    const untouched = twinEdit.text === null || twinEdit.area.value === twinEdit.text;
    if (untouched) {
      twinEdit.text = editableText(twin.desired);
      twinEdit.area.value = twinEdit.text;
      twinEdit.version = twin.desired.version;
      setNote('');
    } else if (twin.desired.version !== twinEdit.version) {
      setNote(`The desired state changed to version ${twin.desired.version} since you started editing (shown above); saving replaces it with your text.`);
    }
  }
  return twin;
}

function setNote(text) {
  twinEdit.note.textContent = text;
  twinEdit.note.hidden = !text;
}

function editor() {
  const area = h('textarea', { id: 'twin-desired', name: 'desired', rows: 10, spellcheck: 'false' });
  const note = h('p', { class: 'msg msg-info', role: 'status' });
  const save = h('button', { type: 'submit' }, 'Save desired state');
  const form = h('form', { class: 'stack', id: 'twin-form' },
    h('div', {},
      h('label', { for: 'twin-desired' }, 'Desired configuration ',
        h('span', { class: 'hint' }, `JSON object; replaces the desired section except ${SERVER_KEYS.join(', ')} (maintained by the server)`)),
      area),
    note,
    h('div', { class: 'actions' }, save));
  Object.assign(twinEdit, { area, note, text: null, version: null });
  note.hidden = true;
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    let doc;
    try {
      doc = JSON.parse(area.value);
    } catch (err) {
      flash(`The desired configuration is not valid JSON: ${err.message}`, 'error');
      area.focus();
      return;
    }
    if (!doc || typeof doc !== 'object' || Array.isArray(doc)) {
      flash('The desired configuration must be a JSON object.', 'error');
      return;
    }
    save.disabled = true;
    try {
      // If-Match: the write applies only to the version this text was based on.
      const updated = await api(`/devices/${encodeURIComponent(id)}/twin/desired`, {
        method: 'PUT', body: doc, headers: { 'If-Match': `"${twinEdit.version}"` },
      });
      twinEdit.text = null;
      flash(`Desired state saved (version ${updated.desired.version}).`, 'ok');
      await drawTwin();
      drawAudit().catch((err) => flash(err.message, 'error'));
    } catch (err) {
      if (err instanceof ApiError && err.status === 409) {
        flash(`Not saved: the desired state changed meanwhile (${err.message}). The latest is shown; your text is kept. Check it and save again.`, 'error');
        const latest = await drawTwin().catch(() => null);
        if (latest) twinEdit.version = latest.desired.version;
      } else {
        flash(err.message, 'error');
      }
    } finally {
      save.disabled = false;
    }
  });
  return h('div', {}, h('h3', {}, 'Edit'), form);
}

/** Operators set tags (name=value lines) and remove them (names); other tags stay. */
function tagEditor() {
  const set = h('textarea', { id: 'tags-set', name: 'set', rows: 2, spellcheck: 'false' });
  const remove = h('input', { id: 'tags-remove', name: 'remove', type: 'text', spellcheck: 'false' });
  const save = h('button', { type: 'submit' }, 'Save tags');
  const form = h('form', { class: 'stack', id: 'tags-form' },
    h('div', {}, h('label', { for: 'tags-set' }, 'Set tags ', h('span', { class: 'hint' }, 'name=value, one per line')), set),
    h('div', {}, h('label', { for: 'tags-remove' }, 'Remove tags ', h('span', { class: 'hint' }, 'names, separated by spaces')), remove),
    h('div', { class: 'actions' }, save));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    let tags;
    try {
      tags = parsePairs(set.value, 'Tags');
    } catch (err) {
      flash(err.message, 'error');
      set.focus();
      return;
    }
    for (const name of remove.value.split(/\s+/).filter(Boolean)) tags[name] = null;
    if (Object.keys(tags).length === 0) {
      flash('Name tags to set or to remove.', 'error');
      set.focus();
      return;
    }
    const updated = await act(save, () => api(`/devices/${encodeURIComponent(id)}/tags`, { method: 'PATCH', body: { tags } }), 'Tags saved.');
    if (updated) {
      set.value = '';
      remove.value = '';
      draw(updated);
      drawAudit().catch((err) => flash(err.message, 'error'));
    }
  });
  return h('details', {}, h('summary', {}, 'Edit tags'), form);
}

async function main() {
  await boot({ page: 'devices' });
  if (!id) {
    flash('No device given: open a device from the devices page.', 'error');
    return;
  }
  const device = await api(`/devices/${encodeURIComponent(id)}`);
  draw(device);
  if (can('operator')) document.getElementById('tag-edit').replaceChildren(tagEditor());
  const twins = await twinsAvailable();
  if (!twins) {
    document.getElementById('twin').replaceChildren(h('p', { id: 'twin-unavailable' }, 'Twin: not available in this version of the server.'));
  }
  await Promise.all([drawAudit(), drawDeployments(), twins ? drawTwin() : null]);
  setInterval(async () => {
    try {
      draw(await api(`/devices/${encodeURIComponent(id)}`));
      await drawDeployments();
      if (twins) await drawTwin();
    } catch (e) {
      flash(e.message, 'error');
    }
  }, 10000);
}

main().catch((e) => flash(e.message, 'error'));
