// A shell on a device, in the browser: xterm.js on the server's terminal WebSocket
// (binary messages are the terminal's bytes, text messages are control JSON).
import './xterm-csp.js';
import { Terminal } from '../vendor/xterm/xterm.mjs';
import { FitAddon } from '../vendor/xterm/addon-fit.mjs';
import { api, boot, can, flash, param } from './app.js';

const deviceId = param('device');
const stateEl = document.getElementById('term-state');
const sizeEl = document.getElementById('term-size');
const reconnect = document.getElementById('term-reconnect');
const closeButton = document.getElementById('term-close');
const encoder = new TextEncoder();

/** Shows the session's state in words (the status line is announced to screen readers). */
function setState(state, text) {
  stateEl.dataset.state = state;
  stateEl.textContent = text;
  reconnect.hidden = state === 'connecting' || state === 'open';
  closeButton.hidden = state !== 'open';
}

/** Why a socket closed with code 4000 + HTTP status (the server's refusal). */
function refusal(code, reason) {
  const status = code - 4000;
  const what = {
    403: 'not allowed',
    404: 'no such device',
    409: 'not possible now',
    429: 'too many sessions',
    503: 'the device did not answer',
  }[status] || `error ${status}`;
  return `Refused (${what}): ${reason || 'no reason given'}`;
}

function createTerminal() {
  const term = new Terminal({
    cursorBlink: true,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: '#11161d', foreground: '#e6e9ee' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById('terminal'));
  fit.fit();
  const showSize = () => {
    sizeEl.textContent = `${term.cols}×${term.rows}`;
    sizeEl.dataset.cols = term.cols;
    sizeEl.dataset.rows = term.rows;
  };
  showSize();
  term.onResize(showSize);
  // Follow the window and the container (e.g. a phone turned round).
  let pending = null;
  const refit = () => {
    cancelAnimationFrame(pending);
    pending = requestAnimationFrame(() => fit.fit());
  };
  window.addEventListener('resize', refit);
  new ResizeObserver(refit).observe(document.getElementById('terminal'));
  return term;
}

let socket = null;

/** Opens a new session on the device in `term`. */
function connect(term) {
  term.reset();
  setState('connecting', 'Connecting…');
  const url = new URL(`/api/v1/devices/${encodeURIComponent(deviceId)}/terminal`, location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = new URLSearchParams({ cols: term.cols, rows: term.rows, term: 'xterm-256color' }).toString();
  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  socket = ws;
  let ended = false;
  const send = (data) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(data);
  };
  const input = term.onData((d) => send(encoder.encode(d)));
  const binary = term.onBinary((d) => send(Uint8Array.from(d, (c) => c.charCodeAt(0))));
  const resize = term.onResize(({ cols, rows }) => send(JSON.stringify({ type: 'resize', cols, rows })));
  ws.addEventListener('message', (e) => {
    if (typeof e.data !== 'string') {
      term.write(new Uint8Array(e.data));
      return;
    }
    let msg;
    try {
      msg = JSON.parse(e.data);
    } catch {
      return;
    }
    if (msg.type === 'session') {
      setState('open', 'Connected');
      stateEl.dataset.session = msg.id;
      // The page may have changed size while the device accepted.
      send(JSON.stringify({ type: 'resize', cols: term.cols, rows: term.rows }));
      term.focus();
    } else if (msg.type === 'exit') {
      ended = true;
      const how = typeof msg.code === 'number' ? `the shell exited with exit code ${msg.code}` : (msg.reason || 'closed');
      setState('ended', `Session ended: ${how}`);
      if (typeof msg.code === 'number') stateEl.dataset.exitCode = msg.code;
    }
  });
  ws.addEventListener('close', (e) => {
    input.dispose();
    binary.dispose();
    resize.dispose();
    if (socket === ws) socket = null;
    if (ws.closedByOperator) {
      setState('ended', 'Session closed');
    } else if (e.code >= 4000 && e.code < 5000) {
      setState('refused', refusal(e.code, e.reason));
    } else if (!ended) {
      setState('lost', 'Disconnected: the connection to the server was lost (are you still logged in?)');
    }
  });
}

async function main() {
  await boot({ page: 'devices' });
  if (!deviceId) {
    setState('refused', 'No device given: open a terminal from a device page.');
    return;
  }
  document.getElementById('back').href = `device.html?id=${encodeURIComponent(deviceId)}`;
  if (!can('operator')) {
    setState('refused', 'Your role may not open terminals: operators and admins can.');
    return;
  }
  const device = await api(`/devices/${encodeURIComponent(deviceId)}`);
  const name = device.identity.serial || device.id;
  document.title = `Terminal on ${name} · Atrium`;
  document.getElementById('term-title').textContent = `Terminal on ${name}`;
  const term = createTerminal();
  reconnect.addEventListener('click', () => connect(term));
  closeButton.addEventListener('click', () => {
    if (!socket) return;
    socket.closedByOperator = true;
    socket.close(1000, 'closed by the operator');
  });
  connect(term);
}

main().catch((e) => {
  setState('refused', e.message);
  flash(e.message, 'error');
});
