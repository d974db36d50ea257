// Browser tests of the dashboard's terminal: a shell on a demo gateway (the real agent with a
// real PTY) in xterm.js, resizing, the exit code, replaying the recording, terminating a live
// session, the refusal message, and a viewer who may not open one (see README.md).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import https from 'node:https';
import { randomBytes } from 'node:crypto';
import { settings, launch, logIn, createUser as createAccount, screenshot, eventually } from './lib.js';

const env = settings();
const ui = (path) => `${env.url}/ui/${path}`;
let admin; // { context, close }
let adminPage;
let operator;
let opPage;
let device; // an accepted, connected gateway
const opName = `operator-${Date.now().toString(36)}`;
const opPassword = `operator-password-${randomBytes(8).toString('hex')}`;

/** Fails on console errors or uncaught exceptions (CSP violations show up as these). */
function assertNoProblems(ctx) {
  const problems = ctx.problems.splice(0);
  assert.deepEqual(problems, [], `the pages reported errors:\n${problems.join('\n')}`);
}

function createUser(role, username, password) {
  return createAccount(admin.context, env.url, role, username, password);
}

/** The text xterm.js shows in `selector`'s terminal, one string per row. */
async function screenRows(page, selector) {
  return page.locator(`${selector} .xterm-rows > div`).evaluateAll(
    (rows) => rows.map((r) => r.textContent.replace(/\u00a0/g, ' ').trimEnd()));
}

async function typeLine(page, text) {
  await page.locator('#terminal .xterm').click();
  await page.keyboard.type(text);
  await page.keyboard.press('Enter');
}

/** Waits for a row that is exactly `line` (the output, not the command that printed it). */
async function waitForRow(page, selector, line, what) {
  return eventually(what, async () => (await screenRows(page, selector)).some((r) => r.trim() === line), 20000);
}

async function openTerminal(page) {
  await page.goto(ui(`device.html?id=${encodeURIComponent(device.id)}`));
  await page.getByRole('link', { name: 'Terminal', exact: true }).click();
  await page.waitForURL(/terminal\.html/);
  await page.locator('#term-state[data-state="open"]').waitFor({ timeout: 20000 });
  return page.locator('#term-state').getAttribute('data-session');
}

before(async () => {
  admin = await launch();
  adminPage = await admin.context.newPage();
  await logIn(adminPage, env.url, env.username, env.password);
  const devices = await (await admin.context.request.get(`${env.url}/api/v1/devices?limit=10000`)).json();
  device = devices.find((d) => d.status === 'accepted' && d.connected && d.identity.serial !== env.pendingSerial)
    || devices.find((d) => d.status === 'accepted' && d.connected);
  assert.ok(device, `no accepted, connected gateway among ${devices.length} devices`);
  await createUser('operator', opName, opPassword);
  operator = await launch();
  opPage = await operator.context.newPage();
  await logIn(opPage, env.url, opName, opPassword);
});

after(async () => {
  if (operator) await operator.close();
  if (admin) await admin.close();
});

let sessionId;

test('an operator opens a shell from the device page and xterm.js shows its output', async () => {
  sessionId = await openTerminal(opPage);
  assert.match(sessionId || '', /^[0-9a-f-]{36}$/, 'the page shows the session id');
  await typeLine(opPage, 'echo hello-$((6*7))');
  await waitForRow(opPage, '#terminal', 'hello-42', 'hello-42 on the terminal');
  await screenshot(opPage, env.artifacts, 'terminal');
  assertNoProblems(operator.context);
});

test('the remote terminal follows the page size', async () => {
  const size = async () => {
    const el = opPage.locator('#term-size');
    return { cols: Number(await el.getAttribute('data-cols')), rows: Number(await el.getAttribute('data-rows')) };
  };
  const before = await size();
  await opPage.setViewportSize({ width: 760, height: 560 });
  const after = await eventually('the terminal to shrink with the window', async () => {
    const s = await size();
    return s.cols < before.cols && s.rows < before.rows ? s : null;
  });
  await typeLine(opPage, 'stty size');
  await waitForRow(opPage, '#terminal', `${after.rows} ${after.cols}`, `stty size to say ${after.rows} ${after.cols}`);
  await opPage.setViewportSize({ width: 1280, height: 900 });
  assertNoProblems(operator.context);
});

test('exit 3 ends the session and the page shows exit code 3', async () => {
  await typeLine(opPage, 'exit 3');
  await opPage.locator('#term-state[data-state="ended"]').waitFor({ timeout: 20000 });
  assert.match(await opPage.locator('#term-state').innerText(), /exit code 3\b/);
  assert.equal(await opPage.locator('#term-state').getAttribute('data-exit-code'), '3');
  assert.ok(await opPage.getByRole('button', { name: 'Open a new session' }).isVisible());
  assertNoProblems(operator.context);
});

test('an admin finds the session, replays its recording and downloads it', async () => {
  await adminPage.goto(ui('sessions.html'));
  const nav = adminPage.getByRole('navigation', { name: 'Main' });
  await nav.getByRole('link', { name: 'Terminal sessions' }).waitFor();
  const row = adminPage.locator(`#sessions-table tr[data-session-id="${sessionId}"]`);
  await row.waitFor({ timeout: 15000 });
  const text = await row.innerText();
  assert.ok(text.includes(`user:${opName}`), `the row names the operator: ${text}`);
  assert.match(text, /exit code 3/);
  await row.getByRole('button', { name: /^Replay/ }).click();
  await adminPage.locator('#player:not([hidden]) .xterm').waitFor();
  await waitForRow(adminPage, '#player-term', 'hello-42', 'the replay to show hello-42');
  await eventually('the replay to reach its end', async () =>
    (await adminPage.locator('#player').getAttribute('data-state')) === 'ended', 30000);
  // Faster, from the start.
  await adminPage.getByRole('button', { name: '4×' }).click();
  assert.equal(await adminPage.getByRole('button', { name: '4×' }).getAttribute('aria-pressed'), 'true');
  await adminPage.getByRole('button', { name: 'Play', exact: true }).click();
  await waitForRow(adminPage, '#player-term', 'hello-42', 'the second replay to show hello-42');
  await screenshot(adminPage, env.artifacts, 'terminal-replay');
  const href = await row.getByRole('link', { name: /^Download/ }).getAttribute('href');
  const cast = await admin.context.request.get(`${env.url}${href}`);
  assert.equal(cast.status(), 200);
  const lines = (await cast.text()).trim().split('\n');
  assert.equal(JSON.parse(lines[0]).version, 2);
  assert.ok(lines.slice(1).some((l) => JSON.parse(l)[2].includes('hello-42')), 'the recording holds the output');
  assertNoProblems(admin.context);
});

test('an admin terminates a live session and the operator sees it end', async () => {
  await opPage.getByRole('button', { name: 'Open a new session' }).click();
  await opPage.locator('#term-state[data-state="open"]').waitFor({ timeout: 20000 });
  const live = await opPage.locator('#term-state').getAttribute('data-session');
  assert.notEqual(live, sessionId);
  await adminPage.goto(ui('sessions.html'));
  const row = adminPage.locator(`#sessions-table tr[data-session-id="${live}"]`);
  await row.waitFor({ timeout: 15000 });
  assert.equal(await row.getAttribute('data-live'), 'true');
  await row.getByRole('button', { name: /^Terminate/ }).click();
  await adminPage.getByRole('dialog').getByRole('button', { name: 'Terminate' }).click();
  await opPage.locator('#term-state[data-state="ended"]').waitFor({ timeout: 20000 });
  assert.match(await opPage.locator('#term-state').innerText(), new RegExp(`terminated by user:${env.username}`));
  await eventually('the session to show as ended', async () =>
    (await adminPage.locator(`#sessions-table tr[data-session-id="${live}"]`).getAttribute('data-live')) === 'false');
  const audit = await (await admin.context.request.get(`${env.url}/api/v1/audit?target=${encodeURIComponent(device.id)}&limit=500`)).json();
  assert.ok(audit.some((e) => e.action === 'terminal.terminate' && e.details.session === live), 'the termination is audited');
  assertNoProblems(admin.context);
  assertNoProblems(operator.context);
});

test('a refused terminal says why', async () => {
  // Fill the device's session limit from the admin's browser, then ask for one more.
  const limitPage = await admin.context.newPage();
  await limitPage.goto(ui('devices.html'));
  const opened = await limitPage.evaluate(async (id) => {
    window.heldSockets = [];
    for (let i = 0; i < 10; i++) {
      const ws = new WebSocket(`wss://${location.host}/api/v1/devices/${encodeURIComponent(id)}/terminal`);
      const code = await new Promise((resolve) => {
        ws.addEventListener('message', () => resolve('open'), { once: true });
        ws.addEventListener('close', (e) => resolve(e.code), { once: true });
      });
      if (code !== 'open') return { held: window.heldSockets.length, code };
      window.heldSockets.push(ws);
    }
    return { held: window.heldSockets.length, code: null };
  }, device.id);
  assert.equal(opened.code, 4409, `the session beyond the limit is refused with 4000 + 409 (${JSON.stringify(opened)})`);
  try {
    await opPage.getByRole('button', { name: 'Open a new session' }).click();
    await opPage.locator('#term-state[data-state="refused"]').waitFor({ timeout: 20000 });
    const text = await opPage.locator('#term-state').innerText();
    assert.match(text, /Refused/);
    assert.match(text, /has \d+ terminal sessions open, the most allowed/);
  } finally {
    await limitPage.close();
  }
  assertNoProblems(operator.context);
});

/** A WebSocket handshake by hand: resolves to the HTTP status of the answer. */
function handshakeStatus(url, cookie) {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const req = https.request({
      host: u.hostname, port: u.port, path: u.pathname + u.search, method: 'GET', rejectUnauthorized: false,
      headers: {
        Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': randomBytes(16).toString('base64'), Origin: u.origin, Cookie: cookie,
      },
    });
    req.on('upgrade', (res, socket) => {
      socket.destroy();
      resolve(res.statusCode);
    });
    req.on('response', (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on('error', reject);
    req.end();
  });
}

test('a viewer has no terminal action and the WebSocket refuses them', async () => {
  const username = `viewer-t-${Date.now().toString(36)}`;
  const password = `viewer-password-${randomBytes(8).toString('hex')}`;
  await createUser('viewer', username, password);
  const viewer = await launch();
  try {
    const vp = await viewer.context.newPage();
    await logIn(vp, env.url, username, password);
    await vp.goto(ui(`device.html?id=${encodeURIComponent(device.id)}`));
    await vp.locator('#identity dt').first().waitFor({ timeout: 15000 });
    assert.equal(await vp.locator('#open-terminal').count(), 0, 'no terminal action for a viewer');
    const nav = vp.getByRole('navigation', { name: 'Main' });
    assert.equal(await nav.getByRole('link', { name: 'Terminal sessions' }).count(), 0, 'no sessions page for a viewer');
    const cookies = await viewer.context.cookies(env.url);
    const cookie = cookies.map((c) => `${c.name}=${c.value}`).join('; ');
    const status = await handshakeStatus(`${env.url}/api/v1/devices/${encodeURIComponent(device.id)}/terminal`, cookie);
    assert.equal(status, 403, 'the viewer\'s handshake is refused');
    // In the browser: the page says so instead of connecting.
    await vp.goto(ui(`terminal.html?device=${encodeURIComponent(device.id)}`));
    await vp.locator('#term-state[data-state="refused"]').waitFor({ timeout: 15000 });
    assert.match(await vp.locator('#term-state').innerText(), /role may not open terminals/);
    viewer.context.problems.splice(0);
  } finally {
    await viewer.close();
  }
});

test('the replay parser keeps what it can read of damaged recordings (randomised)', async () => {
  const p = await admin.context.newPage();
  await p.goto(ui('sessions.html'));
  const failures = await p.evaluate(async () => {
    const { parseCast, playTimes, parseSize } = await import('./js/cast.js');
    let seed = 42;
    const rnd = (n) => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed % n;
    };
    const junk = ['', '[', '[1,"o"]', '{"a":1}', '[1e999,"o","x"]', '["1","o","x"]', '[0.5,"o",7]', 'null', '\u0000\u00ff'];
    const out = [];
    for (let round = 0; round < 300; round++) {
      const lines = [JSON.stringify({ version: 2, width: 1 + rnd(300), height: 1 + rnd(100) })];
      let valid = 0;
      let bad = 0;
      for (let i = 0; i < rnd(40); i++) {
        if (rnd(3) === 0) {
          const j = junk[rnd(junk.length)];
          if (j.trim()) bad++;
          lines.push(j);
        } else {
          lines.push(JSON.stringify([rnd(100000) / 1000, ['o', 'i', 'r', 'm'][rnd(4)], String.fromCharCode(rnd(0x3000))]));
          valid++;
        }
      }
      // A live recording's last line may be cut anywhere.
      let text = lines.join('\n');
      const cut = lines.length > 1 && rnd(3) === 0;
      if (cut) text = text.slice(0, text.length - rnd(5));
      let cast;
      try {
        cast = parseCast(text);
      } catch (e) {
        out.push(`round ${round}: threw ${e.message}`);
        continue;
      }
      if (!cut && (cast.events.length !== valid || cast.skipped !== bad)) {
        out.push(`round ${round}: ${cast.events.length}/${cast.skipped} events/skipped, expected ${valid}/${bad}`);
      }
      for (let i = 1; i < cast.events.length; i++) {
        if (cast.events[i][0] < cast.events[i - 1][0]) out.push(`round ${round}: time goes back at ${i}`);
      }
      const cap = rnd(4);
      const times = playTimes(cast.events, cap);
      for (let i = 0; i < times.length; i++) {
        const gap = times[i] - (i ? times[i - 1] : 0);
        const orig = cast.events[i][0] - (i ? cast.events[i - 1][0] : 0);
        if (gap < -1e-9 || gap > orig + 1e-9 || (cap > 0 && gap > cap + 1e-9)) out.push(`round ${round}: gap ${gap} (cap ${cap}, recorded ${orig})`);
      }
      const cols = 1 + rnd(1000);
      const rows = 1 + rnd(1000);
      const size = parseSize(`${cols}x${rows}`);
      if (!size || size.cols !== cols || size.rows !== rows) out.push(`parseSize ${cols}x${rows}`);
    }
    for (const header of ['', 'not json', '{"version":1}', '[2]', 'null']) {
      try {
        parseCast(`${header}\n[1,"o","x"]`);
        out.push(`header ${header} was accepted`);
      } catch (e) {
        if (!/asciicast/.test(e.message)) out.push(`header ${header}: unclear error ${e.message}`);
      }
    }
    for (const s of ['0x5', '5x0', '1001x5', 'x', '80x24x1', '-1x5']) {
      if (parseSize(s) !== null) out.push(`parseSize accepted ${s}`);
    }
    return out;
  });
  await p.close();
  assert.deepEqual(failures, []);
  assertNoProblems(admin.context);
});
