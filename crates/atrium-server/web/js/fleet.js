// Shared parts of the fleet pages: device badges and lifecycle actions.
import { api, can, h, confirmDialog, act } from './app.js';

const STATUS_TEXT = { pending: 'Pending', accepted: 'Accepted', rejected: 'Rejected', decommissioned: 'Decommissioned' };

/** The lifecycle status as a badge (symbol, word, colour). */
export function statusBadge(status) {
  return h('span', { class: `badge st-${status}`, 'data-status': status }, STATUS_TEXT[status] || status);
}

/** Whether the device's link is up, as a badge. */
export function linkBadge(connected) {
  return h('span', { class: `badge ${connected ? 'conn-on' : 'conn-off'}` }, connected ? 'Online' : 'Offline');
}

const ACTIONS = {
  accept: { label: 'Accept', path: 'accept', done: 'accepted' },
  reject: {
    label: 'Reject', path: 'reject', done: 'rejected', danger: true,
    confirm: 'Its link closes at once and its certificates stop working. It can be accepted again later.',
  },
  decommission: {
    label: 'Decommission', path: 'decommission', done: 'decommissioned', danger: true,
    confirm: 'Its link closes at once and its key can never enroll again. This cannot be undone.',
  },
};

/** What an operator may do with a device in this status (the store's lifecycle rules). */
export function allowedActions(status) {
  switch (status) {
    case 'pending': return ['accept', 'reject'];
    case 'accepted': return ['reject', 'decommission'];
    case 'rejected': return ['accept', 'decommission'];
    default: return [];
  }
}

function deviceName(device) {
  return device.identity.serial || device.id;
}

/**
 * Buttons for the lifecycle actions of a device, none for viewers. `after(device)` runs
 * with the updated device.
 */
export function actionButtons(device, after) {
  if (!can('operator')) return [];
  return allowedActions(device.status).map((key) => {
    const a = ACTIONS[key];
    const name = deviceName(device);
    const button = h('button', {
      type: 'button', class: `small ${a.danger ? 'danger' : ''}`, 'data-action': key,
      'aria-label': `${a.label} ${name}`,
    }, a.label);
    button.addEventListener('click', async () => {
      let reason = '';
      if (a.confirm) {
        const answer = await confirmDialog({
          title: `${a.label} ${name}?`, message: a.confirm, confirmLabel: a.label, danger: true, reason: true,
        });
        if (!answer) return;
        reason = answer.reason;
      }
      const updated = await act(button,
        () => api(`/devices/${encodeURIComponent(device.id)}/${a.path}`, { method: 'POST', body: { reason } }),
        `${name} ${a.done}.`);
      if (updated && after) after(updated);
    });
    return button;
  });
}

/** "key=value" lines to an object; throws on a malformed line. */
export function parsePairs(text, what) {
  const out = {};
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line) continue;
    const i = line.indexOf('=');
    if (i <= 0) throw new Error(`${what}: "${line}" is not key=value`);
    out[line.slice(0, i).trim()] = line.slice(i + 1).trim();
  }
  return out;
}

/** An object as "k=v" text pieces, or a dash. */
export function pairsText(obj) {
  const entries = Object.entries(obj || {});
  return entries.length ? entries.map(([k, v]) => `${k}=${v}`).join(', ') : '–';
}

/** Reads a chosen file into a textarea (for PEM files). */
export function fileIntoTextarea(fileInput, textarea) {
  fileInput.addEventListener('change', async () => {
    const file = fileInput.files && fileInput.files[0];
    if (!file) return;
    textarea.value = await file.text();
  });
}
