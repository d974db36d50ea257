// One deployment: its state with live progress, counts, phases and settings, pause / resume /
// abort, and its devices with their install logs.
import { api, boot, can, h, flash, act, confirmDialog, param, setLive, fmtAgo, fmtBytes, fmtDateTime, timeEl } from './app.js';
import {
  DEVICE_STATUSES, deploymentBadge, deviceStatusBadge, progressBar, targetText, tally, deploymentStream,
} from './deploy.js';

const id = param('id');
/** Reads everything again at most this often while the live stream is down. */
const FALLBACK_MS = 10000;
/** Reads the devices' names again at most this often when an unknown one shows up. */
const NAMES_MS = 30000;
/** Rows of the device table drawn at most (a status filter narrows a large deployment). */
const MAX_ROWS = 500;
/** A deployment with more devices reads its device list at most every DEVICES_BIG_MS. */
const DEVICES_BIG = 1000;
const DEVICES_BIG_MS = 5000;
const ENDED = new Set(['success', 'already-installed', 'failure', 'incompatible', 'aborted']);

let deployment = null;
let devices = [];
let names = new Map();
let namesRead = 0;
let live = false;
/** The device whose install log is shown, and its last change when the log was read. */
const shownLog = { device: null, updated: null };

function facts(el, pairs) {
  el.replaceChildren(...pairs.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v ?? '–')]));
}

function deviceName(deviceId) {
  return names.get(deviceId) || deviceId;
}

function phaseText(d) {
  const count = Math.max(d.phases.length, 1);
  return `${Math.min(d.phase + 1, count)} of ${count}`;
}

/** "1 device", "3 devices". */
function plural(n, word) {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

function sizeText(size) {
  if (size === undefined || size === null) return 'the rest';
  return typeof size === 'number' ? plural(size, 'device') : String(size);
}

function drawState(d) {
  const name = d.name || d.id;
  document.title = `${name} · Atrium`;
  document.getElementById('dep-name').textContent = name;
  document.getElementById('dep-badge').replaceChildren(deploymentBadge(d.status));
  facts(document.getElementById('state'), [
    ['Status', deploymentBadge(d.status)],
    ['Why', d.status_reason || '–'],
    ['Phase', phaseText(d)],
    ['Artifact', d.artifact_name],
    ['Target', targetText(d.target)],
    ['Created', h('span', {}, timeEl(d.created_ms, `${fmtAgo(d.created_ms)} (${fmtDateTime(d.created_ms)})`), ` by ${d.created_by}`)],
    ['Starts', d.start_at ? timeEl(d.start_at, `${fmtAgo(d.start_at)} (${fmtDateTime(d.start_at)})`) : 'at once'],
    ['Finished', d.finished_ms ? timeEl(d.finished_ms, fmtDateTime(d.finished_ms)) : '–'],
    ['Id', h('code', {}, d.id)],
  ]);
  drawProgress(d.counts);
  // Redraw the buttons only when the status changes, so a live update does not steal the focus.
  const actions = document.getElementById('actions');
  if (actions.dataset.status !== d.status) {
    actions.dataset.status = d.status;
    actions.replaceChildren(...actionButtons(d));
  }
}

function drawProgress(counts) {
  document.getElementById('progress').replaceChildren(progressBar(counts));
  // The statuses some device is in (all eleven would mostly be zeros).
  const rows = DEVICE_STATUSES.map((s) => [s, counts && typeof counts[s] === 'number' ? counts[s] : 0]).filter(([, n]) => n > 0);
  document.getElementById('counts').replaceChildren(h('div', { class: 'table-wrap' }, h('table', { id: 'count-table' },
    h('caption', { class: 'visually-hidden' }, 'Devices by status'),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Status'), h('th', { scope: 'col', class: 'num' }, 'Devices'))),
    h('tbody', {}, rows.map(([s, n]) => h('tr', { 'data-count': s },
      h('th', { scope: 'row' }, deviceStatusBadge(s)), h('td', { class: 'num' }, String(n))))),
    h('tfoot', {}, h('tr', {}, h('th', { scope: 'row' }, 'Total'), h('td', { class: 'num' }, String(tally(counts).total)))))));
}

/** What an operator may do in this status (the server answers 409 otherwise). */
function allowedActions(status) {
  switch (status) {
    case 'scheduled':
    case 'running': return ['pause', 'abort'];
    case 'paused':
    case 'halted': return ['resume', 'abort'];
    default: return [];
  }
}

const ACTIONS = {
  pause: { label: 'Pause', done: 'paused', class: 'secondary' },
  resume: { label: 'Resume', done: 'resumed', class: '' },
  abort: {
    label: 'Abort', done: 'aborted', class: 'danger',
    confirm: 'Devices that have not started are not offered it any more; devices installing it are told to cancel. This cannot be undone.',
  },
};

function actionButtons(d) {
  if (!can('operator')) return [];
  return allowedActions(d.status).map((key) => {
    const a = ACTIONS[key];
    const name = d.name || d.id;
    const button = h('button', { type: 'button', class: `small ${a.class}`, 'data-action': key }, a.label);
    button.addEventListener('click', async () => {
      if (a.confirm) {
        const answer = await confirmDialog({ title: `${a.label} ${name}?`, message: a.confirm, confirmLabel: a.label, danger: true });
        if (!answer) return;
      }
      const updated = await act(button, () => api(`/deployments/${encodeURIComponent(d.id)}/${key}`, { method: 'POST' }),
        `Deployment ${name} ${a.done}.`);
      if (updated) {
        deployment = updated;
        drawState(updated);
        scheduleRefresh();
      }
    });
    return button;
  });
}

function drawPhases(d) {
  const perPhase = new Map();
  for (const dev of devices) {
    const p = perPhase.get(dev.phase) || { total: 0, ended: 0, ok: 0, failed: 0 };
    p.total += 1;
    if (ENDED.has(dev.status)) p.ended += 1;
    if (dev.status === 'success' || dev.status === 'already-installed') p.ok += 1;
    if (dev.status === 'failure') p.failed += 1;
    perPhase.set(dev.phase, p);
  }
  const phases = d.phases.length ? d.phases : [{ devices: tally(d.counts).total }];
  const stopped = { aborted: 'Aborted', halted: 'Halted', finished: 'Done' }[d.status];
  const state = (ph) => {
    if (ph.done_ms) return 'Done';
    if (stopped) return ph.started_ms ? stopped : 'Not started';
    if (ph.started_ms) return 'Running';
    return ph.pause && !ph.released ? 'Waits for a resume' : 'Waiting';
  };
  document.getElementById('phases').replaceChildren(h('div', { class: 'table-wrap' }, h('table', { id: 'phase-table' },
    h('caption', { class: 'visually-hidden' }, 'Phases, in order'),
    h('thead', {}, h('tr', {}, ['#', 'Size', 'Devices', 'Starts', 'State', 'Started', 'Progress']
      .map((t) => h('th', { scope: 'col', class: t === '#' || t === 'Devices' ? 'num' : '' }, t)))),
    h('tbody', {}, phases.map((ph, i) => {
      const p = perPhase.get(i) || { total: 0, ended: 0, ok: 0, failed: 0 };
      const when = [ph.pause ? 'when resumed' : null, ph.wait_s ? `${ph.wait_s} s after the previous` : null].filter(Boolean);
      return h('tr', { 'data-phase': i },
        h('td', { class: 'num' }, String(i + 1)),
        h('td', {}, sizeText(ph.size)),
        h('td', { class: 'num' }, String(ph.devices ?? p.total)),
        h('td', { class: 'small' }, i === 0 ? (d.start_at ? 'at the start time' : 'at once') : (when.join(', ') || 'after the previous')),
        h('td', {}, state(ph)),
        h('td', {}, ph.started_ms ? timeEl(ph.started_ms, fmtAgo(ph.started_ms)) : '–'),
        h('td', { class: 'small' }, p.total ? `${p.ok} succeeded, ${p.failed} failed, ${p.ended} of ${p.total} ended` : '–'));
    })))));
}

function drawSettings(d) {
  facts(document.getElementById('settings'), [
    ['Success threshold', `${d.success_threshold} % of a phase before the next starts`],
    ['Failure threshold', d.failure_threshold >= 100 ? 'never halts by itself'
      : `halts at ${d.failure_threshold} % failed, once ${plural(d.failure_min_devices, 'device')} ${d.failure_min_devices === 1 ? 'has' : 'have'} ended`],
    ['Max concurrent', d.max_concurrent ? plural(d.max_concurrent, 'device') : 'unlimited'],
    ['Retries', d.retries ? `${d.retries}, ${d.retry_delay_s} s apart` : 'none'],
  ]);
}

function deviceRow(dev) {
  const logButton = h('button', { type: 'button', class: 'small secondary', 'aria-label': `Install log of ${deviceName(dev.device_id)}` }, 'Log');
  logButton.addEventListener('click', () => showLog(dev.device_id, dev.updated_ms).catch((e) => flash(e.message, 'error')));
  return h('tr', { 'data-device-id': dev.device_id, 'data-status': dev.status },
    h('th', { scope: 'row' },
      h('a', { href: `device.html?id=${encodeURIComponent(dev.device_id)}` }, deviceName(dev.device_id)),
      names.has(dev.device_id) ? h('div', { class: 'small muted mono' }, dev.device_id) : null),
    h('td', { class: 'num' }, String(dev.phase + 1)),
    h('td', {}, deviceStatusBadge(dev.status)),
    h('td', { class: 'num' }, String(dev.attempt)),
    h('td', { class: 'num' }, dev.bytes ? fmtBytes(dev.bytes) : '–'),
    h('td', {}, dev.updated_ms ? timeEl(dev.updated_ms, fmtAgo(dev.updated_ms)) : '–'),
    h('td', { class: 'small details' }, dev.reason || '–'),
    h('td', {}, logButton));
}

function drawDevices() {
  const status = document.getElementById('f-status').value;
  const shown = devices.filter((d) => !status || d.status === status);
  const tbody = document.querySelector('#devices tbody');
  // Keep the keyboard focus on the same row's button across a redraw.
  const focused = document.activeElement && document.activeElement.closest('#devices tr[data-device-id]');
  const rows = shown.slice(0, MAX_ROWS).map(deviceRow);
  if (shown.length > MAX_ROWS) {
    rows.push(h('tr', {}, h('td', { colspan: 8, class: 'muted' },
      `The first ${MAX_ROWS} of ${shown.length} devices are shown; choose a status to narrow the list.`)));
  }
  tbody.replaceChildren(...(shown.length ? rows
    : [h('tr', {}, h('td', { colspan: 8, class: 'muted' }, status ? 'No devices in this status.' : 'No devices.'))]));
  if (focused) tbody.querySelector(`tr[data-device-id="${CSS.escape(focused.dataset.deviceId)}"] button`)?.focus();
}

async function readNames() {
  namesRead = Date.now();
  names = new Map((await api('/devices?limit=10000')).map((d) => [d.id, d.identity.serial || d.id]));
}

async function showLog(deviceId, updated) {
  const text = await api(`/deployments/${encodeURIComponent(id)}/devices/${encodeURIComponent(deviceId)}/log`, { text: true });
  Object.assign(shownLog, { device: deviceId, updated });
  document.getElementById('log-title').textContent = `Install log of ${deviceName(deviceId)}`;
  document.getElementById('log-when').textContent = `Read ${fmtDateTime(Date.now())}; the device's own lines, the last 64 KiB.`;
  const pre = document.getElementById('log-text');
  pre.textContent = text || '(empty)';
  const section = document.getElementById('log');
  if (section.hidden) {
    section.hidden = false;
    section.scrollIntoView({ block: 'nearest' });
  }
  pre.scrollTop = pre.scrollHeight;
}

let devicesRead = 0;
let devicesTimer = null;

async function refresh() {
  // A large deployment's device list is read less often; a read held back comes later.
  const wait = deployment && tally(deployment.counts).total > DEVICES_BIG ? devicesRead + DEVICES_BIG_MS - Date.now() : 0;
  const [d, list] = await Promise.all([
    api(`/deployments/${encodeURIComponent(id)}`),
    wait <= 0 ? api(`/deployments/${encodeURIComponent(id)}/devices`) : null,
  ]);
  deployment = d;
  if (list) {
    devices = list;
    devicesRead = Date.now();
  } else if (!devicesTimer) {
    devicesTimer = setTimeout(() => {
      devicesTimer = null;
      scheduleRefresh();
    }, wait);
  }
  if (devices.some((dev) => !names.has(dev.device_id)) && Date.now() - namesRead > NAMES_MS) await readNames();
  drawState(d);
  drawPhases(d);
  drawSettings(d);
  drawDevices();
  // The shown log follows its device.
  if (shownLog.device) {
    const dev = devices.find((x) => x.device_id === shownLog.device);
    if (dev && dev.updated_ms !== shownLog.updated) await showLog(dev.device_id, dev.updated_ms);
  }
}

let refreshing = null;
let again = false;

/** Reads the deployment and its devices again, at most one read at a time. */
function scheduleRefresh() {
  if (refreshing) {
    again = true;
    return;
  }
  refreshing = refresh()
    .catch((e) => flash(e.message, 'error'))
    .finally(() => {
      refreshing = null;
      if (again) {
        again = false;
        scheduleRefresh();
      }
    });
}

/** A live update: status, reason, phase and counts at once; phases and devices read after. */
function apply(update) {
  if (update.id !== id || !deployment) return;
  Object.assign(deployment, {
    status: update.status, status_reason: update.status_reason ?? null, phase: update.phase ?? deployment.phase,
  });
  if (update.counts) deployment.counts = update.counts;
  drawState(deployment);
  scheduleRefresh();
}

async function main() {
  await boot({ page: 'deployments' });
  if (!id) {
    flash('No deployment given: open one from the deployments page.', 'error');
    return;
  }
  const select = document.getElementById('f-status');
  select.append(...DEVICE_STATUSES.map((s) => h('option', { value: s }, deviceStatusBadge(s).textContent)));
  select.addEventListener('change', drawDevices);
  document.getElementById('filter').addEventListener('submit', (e) => e.preventDefault());
  document.getElementById('log-reload').addEventListener('click', () => {
    if (shownLog.device) showLog(shownLog.device, shownLog.updated).catch((e) => flash(e.message, 'error'));
  });
  document.getElementById('log-close').addEventListener('click', () => {
    shownLog.device = null;
    document.getElementById('log').hidden = true;
  });
  await readNames();
  await refresh();
  deploymentStream({
    id,
    onUpdate: apply,
    onLagged: scheduleRefresh,
    onStatus: (s) => {
      // Once (back) on the stream, read everything: it may have changed while no event came.
      if (s === 'live' && !live) scheduleRefresh();
      live = s === 'live';
      setLive(s);
    },
  });
  // Without the live stream (a proxy that buffers it, a reconnect), read now and then.
  setInterval(() => {
    if (!live) scheduleRefresh();
  }, FALLBACK_MS);
}

main().catch((e) => flash(e.message, 'error'));
