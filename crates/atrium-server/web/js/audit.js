// Audit log: every operator action and lifecycle change, newest first, following new entries.
import { api, boot, h, flash, timeEl } from './app.js';

const PAGE = 1000;
const SHOW_STEP = 200;
const POLL_MS = 5000;
let entries = []; // oldest first: the newest pages read so far
let hasOlder = false;
let generation = 0;

function query(params) {
  const q = new URLSearchParams(params);
  if (document.getElementById('action').value) q.set('action', document.getElementById('action').value);
  if (document.getElementById('target').value.trim()) q.set('target', document.getElementById('target').value.trim());
  return `/audit?${q}`;
}

/** Reads entries after `since`, page by page, oldest first. */
async function readAfter(since) {
  const out = [];
  for (;;) {
    const page = await api(query({ limit: String(PAGE), since: String(since) }));
    out.push(...page);
    if (page.length < PAGE) return out;
    since = page[page.length - 1].seq;
  }
}

function targetCell(e) {
  const aboutDevice = ['device.', 'twin.', 'certificate.'].some((p) => e.action.startsWith(p));
  if (aboutDevice && e.action !== 'device.preauthorize' && e.target) {
    return h('a', { href: `device.html?id=${encodeURIComponent(e.target)}` }, e.target);
  }
  if (e.action.startsWith('deployment.') && e.target) {
    return h('a', { href: `deployment.html?id=${encodeURIComponent(e.target)}` }, e.target);
  }
  return e.target || '–';
}

function draw() {
  const tbody = document.querySelector('#audit tbody');
  const newest = entries.slice().reverse();
  tbody.replaceChildren(...(newest.length ? newest.map((e) => h('tr', { 'data-action': e.action, 'data-target': e.target },
    h('td', { class: 'num' }, String(e.seq)),
    h('td', { class: 'nowrap' }, timeEl(e.time_ms)),
    h('td', {}, e.actor),
    h('td', {}, e.action),
    h('td', { class: 'mono small' }, targetCell(e)),
    h('td', { class: 'mono small details' }, e.details && Object.keys(e.details).length ? JSON.stringify(e.details) : '–')))
    : [h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No entries.'))]));
  document.getElementById('more').hidden = !hasOlder;
  document.getElementById('count').textContent = `${entries.length} entries shown`;
}

/** Reads the `SHOW_STEP` entries before `before` (or the newest), newest first from the API. */
async function readBefore(before) {
  const params = { order: 'desc', limit: String(SHOW_STEP) };
  if (before !== undefined) params.before = String(before);
  const page = await api(query(params));
  return { older: page.reverse(), more: page.length === SHOW_STEP };
}

async function load() {
  const mine = ++generation;
  const { older, more } = await readBefore();
  if (mine !== generation) return;
  entries = older;
  hasOlder = more;
  draw();
}

async function loadOlder() {
  const mine = generation;
  if (!entries.length) return;
  const { older, more } = await readBefore(entries[0].seq);
  if (mine !== generation) return;
  entries.unshift(...older);
  hasOlder = more;
  draw();
}

async function poll() {
  const mine = generation;
  const last = entries.length ? entries[entries.length - 1].seq : 0;
  const fresh = await readAfter(last);
  if (mine !== generation || fresh.length === 0) return;
  entries.push(...fresh);
  draw();
}

async function main() {
  await boot({ page: 'audit' });
  const form = document.getElementById('filter');
  const params = new URLSearchParams(location.search);
  if (params.get('action')) document.getElementById('action').value = params.get('action');
  if (params.get('target')) document.getElementById('target').value = params.get('target');
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    load().catch((err) => flash(err.message, 'error'));
  });
  document.getElementById('action').addEventListener('change', () => load().catch((err) => flash(err.message, 'error')));
  document.getElementById('more').addEventListener('click', () => {
    loadOlder().catch((err) => flash(err.message, 'error'));
  });
  await load();
  setInterval(() => poll().catch((e) => flash(e.message, 'error')), POLL_MS);
}

main().catch((e) => flash(e.message, 'error'));
