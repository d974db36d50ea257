// Deployments page: every deployment with live progress and a status filter, and the form
// that creates one (artifact, target, phases, limits).
import { api, boot, can, h, flash, act, setLive, fmtAgo, timeEl } from './app.js';
import { DEPLOYMENT_STATUSES, deploymentBadge, progressBar, targetText, deploymentStream } from './deploy.js';

/** Reads the list again at most this often while the live stream is down. */
const FALLBACK_MS = 10000;
let deployments = [];
let live = false;

const TARGET_LABEL = { group: 'Group', filter: 'Filter', device: 'Device id' };

function statusFilter() {
  return document.getElementById('f-status').value;
}

function row(d) {
  return h('tr', { 'data-deployment': d.id, 'data-status': d.status },
    h('th', { scope: 'row' },
      h('a', { href: `deployment.html?id=${encodeURIComponent(d.id)}` }, d.name || d.id),
      h('div', { class: 'small muted mono' }, d.id)),
    h('td', {}, d.artifact_name),
    h('td', { class: 'small' }, targetText(d.target)),
    h('td', {}, deploymentBadge(d.status), d.status_reason ? h('div', { class: 'small muted' }, d.status_reason) : null),
    h('td', {}, progressBar(d.counts)),
    h('td', {}, timeEl(d.created_ms, fmtAgo(d.created_ms)), h('div', { class: 'small muted' }, d.created_by)));
}

function draw() {
  const tbody = document.querySelector('#deployments tbody');
  tbody.replaceChildren(...(deployments.length ? deployments.map(row)
    : [h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No deployments.'))]));
}

async function refresh() {
  const status = statusFilter();
  deployments = await api(`/deployments${status ? `?status=${encodeURIComponent(status)}` : ''}`);
  draw();
}

/** A live update: the row changes in place; a deployment not listed yet reads the list again. */
function apply(update) {
  const d = deployments.find((x) => x.id === update.id);
  if (!d) {
    const status = statusFilter();
    if (!status || update.status === status) refresh().catch((e) => flash(e.message, 'error'));
    return;
  }
  Object.assign(d, { status: update.status, status_reason: update.status_reason ?? null, phase: update.phase ?? d.phase });
  if (update.counts) d.counts = update.counts;
  const status = statusFilter();
  if (status && d.status !== status) {
    deployments = deployments.filter((x) => x !== d);
    draw();
    return;
  }
  const tr = document.querySelector(`#deployments tr[data-deployment="${CSS.escape(d.id)}"]`);
  if (tr) tr.replaceWith(row(d));
}

// ---- the create form ---------------------------------------------------------------------

function phaseRow() {
  const tbody = document.querySelector('#phases tbody');
  const n = tbody.children.length + 1;
  const size = h('input', { type: 'number', min: 1, name: 'size', 'aria-label': `Phase ${n} size`, class: 'narrow' });
  const unit = h('select', { name: 'unit', 'aria-label': `Phase ${n} size unit` },
    h('option', { value: '%' }, '% of devices'), h('option', { value: 'devices' }, 'devices'));
  const wait = h('input', { type: 'number', min: 0, value: 0, name: 'wait_s', 'aria-label': `Phase ${n} wait before (s)`, class: 'narrow' });
  const pause = h('input', { type: 'checkbox', name: 'pause', 'aria-label': `Phase ${n} pause before` });
  const remove = h('button', { type: 'button', class: 'small secondary', 'aria-label': `Remove phase ${n}` }, 'Remove');
  const tr = h('tr', { 'data-phase': n },
    h('td', { class: 'num' }, String(n)),
    h('td', { class: 'nowrap' }, size, ' ', unit),
    h('td', {}, wait),
    h('td', {}, pause),
    h('td', {}, remove));
  remove.addEventListener('click', () => {
    tr.remove();
    renumberPhases();
  });
  tbody.append(tr);
  size.focus();
}

function renumberPhases() {
  [...document.querySelectorAll('#phases tbody tr')].forEach((tr, i) => {
    const n = i + 1;
    tr.dataset.phase = n;
    tr.cells[0].textContent = String(n);
    tr.querySelector('[name=size]').setAttribute('aria-label', `Phase ${n} size`);
    tr.querySelector('[name=unit]').setAttribute('aria-label', `Phase ${n} size unit`);
    tr.querySelector('[name=wait_s]').setAttribute('aria-label', `Phase ${n} wait before (s)`);
    tr.querySelector('[name=pause]').setAttribute('aria-label', `Phase ${n} pause before`);
    tr.querySelector('button').setAttribute('aria-label', `Remove phase ${n}`);
  });
}

/** The phases as the API takes them; an empty size (only on the last phase) means the rest. */
function readPhases() {
  const rows = [...document.querySelectorAll('#phases tbody tr')];
  return rows.map((tr, i) => {
    const phase = {};
    const raw = tr.querySelector('[name=size]').value.trim();
    if (raw) {
      const n = Number(raw);
      if (!Number.isInteger(n) || n < 1) throw new Error(`Phase ${i + 1}: the size must be a whole number of at least 1.`);
      phase.size = tr.querySelector('[name=unit]').value === '%' ? `${n}%` : n;
    } else if (i < rows.length - 1) {
      throw new Error(`Phase ${i + 1}: give a size (only the last phase may take the rest).`);
    }
    phase.wait_s = Number(tr.querySelector('[name=wait_s]').value || 0);
    phase.pause = tr.querySelector('[name=pause]').checked;
    return phase;
  });
}

function readTarget(form) {
  const value = form.target.value.trim();
  return { [form.target_kind.value]: value };
}

async function fillTargetOptions(kind) {
  const list = document.getElementById('d-target-options');
  document.getElementById('d-target-label').textContent = TARGET_LABEL[kind];
  const input = document.getElementById('d-target');
  input.placeholder = kind === 'filter' ? 'tag:floor=3 and device_type=nuc' : '';
  let options = [];
  if (kind === 'group') {
    options = (await api('/groups')).map((g) => h('option', { value: g.name }, `${g.kind}, ${g.member_count} devices`));
  } else if (kind === 'device') {
    options = (await api('/devices?status=accepted&limit=10000'))
      .map((d) => h('option', { value: d.id }, d.identity.serial || d.id));
  }
  list.replaceChildren(...options);
}

async function fillArtifacts() {
  const select = document.getElementById('d-artifact');
  const byName = new Map();
  for (const a of await api('/artifacts')) {
    const types = byName.get(a.name) || new Set();
    a.device_types.forEach((t) => types.add(t));
    byName.set(a.name, types);
  }
  const chosen = select.value;
  select.replaceChildren(h('option', { value: '' }, byName.size ? 'Choose an artifact…' : 'No artifacts uploaded'),
    ...[...byName.keys()].sort().map((name) => h('option', { value: name }, `${name} (${[...byName.get(name)].sort().join(', ')})`)));
  if (byName.has(chosen)) select.value = chosen;
}

/** "2026-12-07T14:30" in local time to unix ms, or null when empty. */
function startAt(value) {
  if (!value) return null;
  const ms = new Date(value).getTime();
  if (!Number.isFinite(ms)) throw new Error('Start at: not a valid date and time.');
  return ms;
}

function setUpCreate() {
  const form = document.getElementById('create');
  if (!form) return;
  const kind = document.getElementById('d-target-kind');
  kind.addEventListener('change', () => fillTargetOptions(kind.value).catch((e) => flash(e.message, 'error')));
  document.getElementById('add-phase').addEventListener('click', phaseRow);
  // The list of artifacts may have changed since the page opened: read it when the form opens.
  document.getElementById('create-box').addEventListener('toggle', (e) => {
    if (e.target.open) fillArtifacts().catch((err) => flash(err.message, 'error'));
  });
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    let body;
    try {
      body = {
        name: form.name.value.trim() || undefined,
        artifact_name: form.artifact_name.value,
        target: readTarget(form),
        phases: readPhases(),
        success_threshold: Number(form.success_threshold.value),
        failure_threshold: Number(form.failure_threshold.value),
        failure_min_devices: Number(form.failure_min_devices.value),
        max_concurrent: Number(form.max_concurrent.value),
        retries: Number(form.retries.value),
        retry_delay_s: Number(form.retry_delay_s.value),
        start_at: startAt(form.start_at.value),
      };
    } catch (err) {
      flash(err.message, 'error');
      return;
    }
    const created = await act(form.querySelector('button[type=submit]'), () => api('/deployments', { method: 'POST', body }),
      (d) => `Deployment ${d.name || d.id} created.`);
    if (created) {
      form.reset();
      document.querySelector('#phases tbody').replaceChildren();
      fillTargetOptions(kind.value).catch((err) => flash(err.message, 'error'));
      refresh().catch((err) => flash(err.message, 'error'));
    }
  });
  return Promise.all([fillArtifacts(), fillTargetOptions(kind.value)]);
}

async function main() {
  await boot({ page: 'deployments' });
  const select = document.getElementById('f-status');
  select.append(...DEPLOYMENT_STATUSES.map((s) => h('option', { value: s }, s[0].toUpperCase() + s.slice(1))));
  const wanted = new URLSearchParams(location.search).get('status');
  if (wanted && DEPLOYMENT_STATUSES.includes(wanted)) select.value = wanted;
  select.addEventListener('change', () => refresh().catch((e) => flash(e.message, 'error')));
  document.getElementById('filter').addEventListener('submit', (e) => e.preventDefault());
  deploymentStream({
    onUpdate: apply,
    onLagged: () => refresh().catch((e) => flash(e.message, 'error')),
    onStatus: (s) => {
      // Once (back) on the stream, read the list: it may have changed while no event came.
      if (s === 'live' && !live) refresh().catch((e) => flash(e.message, 'error'));
      live = s === 'live';
      setLive(s);
    },
  });
  await Promise.all([refresh(), can('operator') ? setUpCreate() : null]);
  // Without the live stream (a proxy that buffers it, a reconnect), read the list now and then.
  setInterval(() => {
    if (!live) refresh().catch((e) => flash(e.message, 'error'));
  }, FALLBACK_MS);
}

main().catch((e) => flash(e.message, 'error'));
