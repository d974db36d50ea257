// Terminal sessions: live and past ones, terminating live ones (admins), and replaying or
// downloading their asciinema recordings.
import './xterm-csp.js';
import { Terminal } from '../vendor/xterm/xterm.mjs';
import { api, boot, can, currentSession, h, flash, act, confirmDialog, param, timeEl, fmtAgo } from './app.js';
import { parseCast, CastPlayer } from './cast.js';

const deviceFilter = param('device');
let devices = new Map();
let player = null;
let playerTerm = null;

function fmtDuration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function fmtClock(seconds) {
  const s = Math.floor(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

/** Whether this account may read a session's recording (the server checks it too). */
function mayReplay(s) {
  return can('admin') || s.actor === `user:${currentSession().username}`;
}

function recordingUrl(id) {
  return `/api/v1/terminal-sessions/${encodeURIComponent(id)}/recording`;
}

function outcome(s) {
  if (!s.ended_ms) return h('span', { class: 'badge conn-on' }, 'Live');
  if (typeof s.exit_code === 'number') return `exit code ${s.exit_code}`;
  return s.reason || 'ended';
}

function row(s) {
  const device = devices.get(s.device_id);
  const name = device ? (device.identity.serial || device.id) : s.device_id;
  const live = !s.ended_ms;
  const actions = [];
  if (mayReplay(s)) {
    actions.push(h('button', { type: 'button', class: 'small', 'data-action': 'replay', 'aria-label': `Replay session ${s.id}`, onclick: () => replay(s) }, 'Replay'));
    actions.push(h('a', { class: 'button small secondary', href: recordingUrl(s.id), download: `${s.id}.cast`, 'aria-label': `Download the recording of session ${s.id}` }, 'Download'));
  }
  if (live && can('admin')) {
    const button = h('button', { type: 'button', class: 'small danger', 'data-action': 'terminate', 'aria-label': `Terminate session ${s.id}` }, 'Terminate');
    button.addEventListener('click', async () => {
      const answer = await confirmDialog({
        title: `Terminate the session of ${s.actor} on ${name}?`,
        message: 'The shell on the device ends at once; the operator sees that you ended it.',
        confirmLabel: 'Terminate', danger: true,
      });
      if (!answer) return;
      await act(button, () => api(`/terminal-sessions/${encodeURIComponent(s.id)}/terminate`, { method: 'POST' }), 'Session terminated.');
      await draw();
    });
    actions.push(button);
  }
  return h('tr', { 'data-session-id': s.id, 'data-live': live ? 'true' : 'false' },
    h('td', {}, h('a', { href: `device.html?id=${encodeURIComponent(s.device_id)}` }, name)),
    h('td', {}, s.actor),
    h('td', { class: 'nowrap' }, timeEl(s.started_ms, fmtAgo(s.started_ms))),
    h('td', { class: 'num nowrap' }, fmtDuration((s.ended_ms || Date.now()) - s.started_ms)),
    h('td', { class: 'outcome' }, outcome(s)),
    h('td', {}, h('div', { class: 'actions' }, actions)));
}

let shown = null;

async function draw() {
  const query = deviceFilter ? `?device=${encodeURIComponent(deviceFilter)}&limit=200` : '?limit=200';
  const sessions = await api(`/terminal-sessions${query}`);
  // Redraw only on a change, or for the running durations of live sessions (keeps the focus).
  const text = JSON.stringify(sessions);
  if (text === shown && !sessions.some((s) => !s.ended_ms)) return;
  shown = text;
  const box = document.getElementById('sessions');
  if (sessions.length === 0) {
    box.replaceChildren(h('p', { class: 'muted' }, 'No terminal sessions yet.'));
    return;
  }
  box.replaceChildren(h('div', { class: 'table-wrap' }, h('table', { id: 'sessions-table' },
    h('caption', { class: 'visually-hidden' }, 'Terminal sessions, newest first'),
    h('thead', {}, h('tr', {}, ['Device', 'Who', 'Started', 'Duration', 'Outcome', 'Actions'].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, sessions.map(row)))));
}

function drawPlayerState() {
  if (!player) return;
  document.getElementById('player-play').textContent = player.playing ? 'Pause' : 'Play';
  const seek = document.getElementById('player-seek');
  seek.max = String(player.duration);
  if (document.activeElement !== seek) seek.value = String(player.now());
  document.getElementById('player-time').textContent = `${fmtClock(player.now())} / ${fmtClock(player.duration)}`;
  for (const b of document.querySelectorAll('#player [data-speed]')) {
    b.setAttribute('aria-pressed', String(Number(b.dataset.speed) === player.speed));
  }
  document.getElementById('player').dataset.state = player.playing ? 'playing' : (player.next >= player.cast.events.length ? 'ended' : 'paused');
}

async function replay(s) {
  let text;
  try {
    const response = await fetch(recordingUrl(s.id), { credentials: 'same-origin' });
    text = await response.text();
    if (!response.ok) {
      let reason = `${response.status} ${response.statusText}`;
      try {
        reason = JSON.parse(text).error || reason;
      } catch { /* not JSON: keep the status */ }
      throw new Error(reason);
    }
  } catch (e) {
    flash(`The recording cannot be read: ${e.message}`, 'error');
    return;
  }
  let cast;
  try {
    cast = parseCast(text);
  } catch (e) {
    flash(`The recording cannot be replayed: ${e.message}`, 'error');
    return;
  }
  const section = document.getElementById('player');
  section.hidden = false;
  section.dataset.session = s.id;
  const device = devices.get(s.device_id);
  document.getElementById('player-title').textContent = `Replay: ${s.actor} on ${device ? (device.identity.serial || device.id) : s.device_id}`;
  document.getElementById('player-download').href = recordingUrl(s.id);
  document.getElementById('player-download').setAttribute('download', `${s.id}.cast`);
  const note = document.getElementById('player-note');
  const notes = [`Recorded at ${cast.header.width}×${cast.header.height}.`];
  if (!s.ended_ms) notes.push('The session is still live: this is the recording so far.');
  if (cast.skipped) notes.push(`${cast.skipped} unreadable line(s) skipped.`);
  note.textContent = notes.join(' ');
  note.hidden = false;
  if (player) player.dispose();
  if (!playerTerm) {
    playerTerm = new Terminal({
      disableStdin: true,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
      fontSize: 14,
      scrollback: 5000,
      theme: { background: '#11161d', foreground: '#e6e9ee' },
    });
    playerTerm.open(document.getElementById('player-term'));
  }
  const idle = Number(document.getElementById('player-idle').value);
  player = new CastPlayer(playerTerm, cast, { idleLimit: idle, onChange: drawPlayerState });
  section.scrollIntoView({ block: 'nearest' });
  player.play();
}

function wirePlayer() {
  document.getElementById('player-play').addEventListener('click', () => {
    if (!player) return;
    if (player.playing) player.pause(); else player.play();
  });
  for (const b of document.querySelectorAll('#player [data-speed]')) {
    b.addEventListener('click', () => player && player.setSpeed(Number(b.dataset.speed)));
  }
  document.getElementById('player-idle').addEventListener('change', (e) => {
    if (player) player.setIdleLimit(Number(e.target.value));
    drawPlayerState();
  });
  document.getElementById('player-seek').addEventListener('change', (e) => {
    if (player) player.seek(Number(e.target.value));
  });
}

async function main() {
  await boot({ page: 'sessions' });
  if (!can('operator')) {
    document.getElementById('sessions').replaceChildren(h('p', { class: 'msg msg-info' }, 'Terminal sessions are for operators and admins.'));
    return;
  }
  devices = new Map((await api('/devices?limit=10000')).map((d) => [d.id, d]));
  if (deviceFilter) {
    const d = devices.get(deviceFilter);
    document.getElementById('sessions-scope').textContent = `on ${d ? (d.identity.serial || d.id) : deviceFilter}`;
  }
  wirePlayer();
  await draw();
  setInterval(() => draw().catch((e) => flash(e.message, 'error')), 5000);
}

main().catch((e) => flash(e.message, 'error'));
