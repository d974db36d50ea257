// Devices page: the fleet with lifecycle actions, and pre-authorization.
import { api, boot, can, h, flash, act, fmtAgo, timeEl } from './app.js';
import { statusBadge, linkBadge, actionButtons, parsePairs, pairsText, fileIntoTextarea } from './fleet.js';

const REFRESH_MS = 5000;
const ORDER = { pending: 0, accepted: 1, rejected: 2, decommissioned: 3 };
let devices = [];
let lastDrawn = '';

function matches(d, q) {
  if (!q) return true;
  const hay = [d.id, d.identity.serial, d.identity.mac, d.identity.device_type, d.identity.hardware_model,
    d.inventory.hostname, pairsText(d.tags)].join(' ').toLowerCase();
  return hay.includes(q.toLowerCase());
}

function inventorySummary(inv) {
  const parts = [inv.hostname, inv.os, inv.arch, inv.agent_version ? `agent ${inv.agent_version}` : null].filter(Boolean);
  return parts.length ? parts.join(' · ') : '–';
}

function row(d) {
  const name = d.identity.serial || d.id;
  const cells = [
    h('th', { scope: 'row' },
      h('a', { href: `device.html?id=${encodeURIComponent(d.id)}` }, name),
      h('div', { class: 'small muted mono' }, d.id)),
    h('td', {}, statusBadge(d.status)),
    h('td', {}, linkBadge(d.connected)),
    h('td', {}, d.last_seen_ms ? timeEl(d.last_seen_ms, fmtAgo(d.last_seen_ms)) : 'never'),
    h('td', {}, d.identity.device_type || '–'),
    h('td', { class: 'small' }, inventorySummary(d.inventory)),
    h('td', { class: 'small' }, d.enrollment),
  ];
  if (can('operator')) {
    cells.push(h('td', {}, h('div', { class: 'actions' }, actionButtons(d, () => refresh()))));
  }
  return h('tr', { 'data-device-id': d.id, 'data-serial': d.identity.serial, 'data-status': d.status }, cells);
}

function draw(force = false) {
  const status = document.getElementById('status').value;
  const q = document.getElementById('q').value.trim();
  const shown = devices
    .filter((d) => (!status || d.status === status) && matches(d, q))
    .sort((a, b) => (ORDER[a.status] ?? 9) - (ORDER[b.status] ?? 9) || a.created_ms - b.created_ms);
  // Redraw only on a change, so a periodic refresh does not move the keyboard focus.
  const key = JSON.stringify([status, q, shown.map((d) => [d.id, d.status, d.connected, d.last_seen_ms, d.inventory_updated_ms])]);
  if (!force && key === lastDrawn) return;
  const focused = document.activeElement;
  const focusKey = focused && focused.closest('tr[data-device-id]')
    ? [focused.closest('tr').dataset.deviceId, focused.dataset.action || focused.tagName] : null;
  lastDrawn = key;
  const tbody = document.querySelector('#devices tbody');
  const cols = can('operator') ? 8 : 7;
  tbody.replaceChildren(...(shown.length ? shown.map(row) : [h('tr', {}, h('td', { colspan: cols, class: 'muted' }, 'No devices match.'))]));
  if (focusKey) {
    const tr = tbody.querySelector(`tr[data-device-id="${CSS.escape(focusKey[0])}"]`);
    const target = tr && (tr.querySelector(`[data-action="${focusKey[1]}"]`) || tr.querySelector('a'));
    if (target) target.focus();
  }
  const count = (s) => devices.filter((d) => d.status === s).length;
  document.getElementById('counts').textContent =
    `${devices.length} devices · ${count('pending')} pending · ${devices.filter((d) => d.connected).length} online`;
}

async function refresh() {
  devices = await api('/devices?limit=10000');
  draw();
}

async function drawPreauths() {
  const list = await api('/preauthorizations');
  const box = document.getElementById('preauths');
  if (list.length === 0) {
    box.replaceChildren(h('p', { class: 'muted' }, 'None.'));
    return;
  }
  box.replaceChildren(h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, ['Serial', 'Key fingerprint', 'Tags', 'Created', 'By'].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, list.map((p) => h('tr', {},
      h('td', {}, p.serial), h('td', { class: 'mono small' }, p.key_fingerprint.slice(0, 16) + '…'),
      h('td', { class: 'small' }, pairsText(p.tags)), h('td', {}, timeEl(p.created_ms, fmtAgo(p.created_ms))),
      h('td', {}, p.created_by)))))));
}

function setUpPreauth() {
  const form = document.getElementById('preauth');
  if (!form) return;
  fileIntoTextarea(document.getElementById('pa-keyfile'), document.getElementById('pa-key'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    let tags;
    try {
      tags = parsePairs(form.tags.value, 'Tags');
    } catch (err) {
      flash(err.message, 'error');
      return;
    }
    const body = {
      identity: {
        serial: form.serial.value.trim(), mac: form.mac.value.trim(), device_type: form.device_type.value.trim(),
        hardware_model: form.hardware_model.value.trim(), extra: {},
      },
      public_key_pem: form.public_key_pem.value.trim(),
      tags,
    };
    const done = await act(form.querySelector('button[type=submit]'), () => api('/preauthorizations', { method: 'POST', body }),
      (p) => `${p.serial} is pre-authorized.`);
    if (done) {
      form.reset();
      drawPreauths().catch((err) => flash(err.message, 'error'));
    }
  });
}

async function main() {
  await boot({ page: 'devices' });
  const status = new URLSearchParams(location.search).get('status');
  if (status) document.getElementById('status').value = status;
  document.getElementById('status').addEventListener('change', () => draw());
  document.getElementById('q').addEventListener('input', () => draw());
  document.getElementById('filter').addEventListener('submit', (e) => e.preventDefault());
  setUpPreauth();
  await Promise.all([refresh(), drawPreauths()]);
  setInterval(() => refresh().catch((e) => flash(e.message, 'error')), REFRESH_MS);
}

main().catch((e) => flash(e.message, 'error'));
