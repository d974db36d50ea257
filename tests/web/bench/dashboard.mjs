// Measures the floor view in headless Chromium: how long until every room's tile is on the
// page, and when each live update of a tile's CO2 reaches the DOM. Driven by the e2e test
// `dashboard_bench` (crates/atrium-e2e/tests/e2e/dashboard_bench.rs), which starts the server,
// creates the rooms and sends the readings.
//
// Environment: ATRIUM_URL, ATRIUM_USERNAME, ATRIUM_PASSWORD, ATRIUM_BENCH_ROOMS (tiles to wait
// for), ATRIUM_BENCH_LOADS (page loads to time, default 5).
//
// Output on stdout, one JSON object a line:
//   {"kind":"load","load":k,"tiles_ms":..,"painted_ms":..,"fcp_ms":..}  per page load, times
//       from navigation start (performance.now()): all tiles in the DOM, the next frame after
//       that, and the browser's first-contentful-paint
//   {"kind":"ready"}  the live observer is installed and the room stream is connected
//   {"kind":"obs","room":id,"value":ppm,"dom_ms":t,"frame_ms":t}  a tile's CO2 changed; wall
//       clock (Date.now()) when the DOM changed and at the next frame
// After "ready" the script watches until a line "stop" (or end of input) on stdin.
import { createInterface } from 'node:readline';
import { launch, logIn } from '../lib.js';

const base = (process.env.ATRIUM_URL || '').replace(/\/+$/, '');
const username = process.env.ATRIUM_USERNAME;
const password = process.env.ATRIUM_PASSWORD;
const rooms = Number(process.env.ATRIUM_BENCH_ROOMS || '0');
const loads = Number(process.env.ATRIUM_BENCH_LOADS || '5');
if (!base || !username || !password || !(rooms > 0)) {
  throw new Error('set ATRIUM_URL, ATRIUM_USERNAME, ATRIUM_PASSWORD and ATRIUM_BENCH_ROOMS');
}

const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

// Runs in every document before its own scripts: notes when the wanted number of tiles is in
// the DOM, and the frame after that.
function tileClock(want) {
  const bench = { tilesMs: null, paintedMs: null };
  window.__atriumBench = bench;
  const observer = new MutationObserver(() => {
    if (bench.tilesMs !== null || document.querySelectorAll('.tile').length < want) return;
    bench.tilesMs = performance.now();
    observer.disconnect();
    // rAF runs just before the frame that shows the tiles; the task after it, once painted.
    requestAnimationFrame(() => setTimeout(() => { bench.paintedMs = performance.now(); }, 0));
  });
  observer.observe(document, { childList: true, subtree: true });
}

const stdinLines = createInterface({ input: process.stdin });
const stopped = new Promise((resolve) => {
  stdinLines.on('line', (line) => { if (line.trim() === 'stop') resolve(); });
  stdinLines.on('close', resolve);
});

const browser = await launch();
try {
  const page = await browser.context.newPage();
  await page.addInitScript(tileClock, rooms);
  await logIn(page, base, username, password);

  for (let k = 0; k < loads; k += 1) {
    await page.goto(`${base}/ui/`);
    await page.waitForFunction(() => window.__atriumBench && window.__atriumBench.paintedMs !== null,
      null, { timeout: 60000 });
    const m = await page.evaluate(() => {
      const fcp = performance.getEntriesByName('first-contentful-paint')[0];
      return {
        tiles_ms: window.__atriumBench.tilesMs,
        painted_ms: window.__atriumBench.paintedMs,
        fcp_ms: fcp ? fcp.startTime : null,
        tiles: document.querySelectorAll('.tile').length,
      };
    });
    emit({ kind: 'load', load: k, ...m });
  }

  // Live updates: wait for the stream, then record every change of a tile's CO2.
  await page.locator('#live.on').waitFor({ timeout: 30000 });
  await page.evaluate(() => {
    window.__atriumObs = [];
    const seen = window.__atriumObs;
    new MutationObserver((records) => {
      const now = Date.now();
      for (const r of records) {
        const el = r.target;
        if (!el.dataset || !el.dataset.roomId) continue;
        const entry = { room: el.dataset.roomId, value: Number(el.dataset.co2), dom_ms: now, frame_ms: null };
        seen.push(entry);
        requestAnimationFrame(() => setTimeout(() => { entry.frame_ms = Date.now(); }, 0));
      }
    }).observe(document.getElementById('floors'), { subtree: true, attributes: true, attributeFilter: ['data-co2'] });
  });
  emit({ kind: 'ready' });

  let sent = 0;
  const drain = async (all) => {
    const got = await page.evaluate(([from, all]) => {
      const out = [];
      const obs = window.__atriumObs;
      let i = from;
      for (; i < obs.length; i += 1) {
        if (obs[i].frame_ms === null && !all) break;
        out.push(obs[i]);
      }
      return out;
    }, [sent, all]);
    for (const o of got) emit({ kind: 'obs', ...o });
    sent += got.length;
  };
  let done = false;
  stopped.then(() => { done = true; });
  while (!done) {
    await drain(false);
    await new Promise((r) => setTimeout(r, 50));
  }
  await new Promise((r) => setTimeout(r, 100));
  await drain(true);
  const problems = browser.context.problems.splice(0);
  if (problems.length) {
    process.stderr.write(`the page reported errors:\n${problems.join('\n')}\n`);
    process.exitCode = 1;
  }
} finally {
  stdinLines.close();
  await browser.close();
}
