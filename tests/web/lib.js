// Shared fixtures of the dashboard's browser tests: environment, Chromium, login, screenshots.
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

/** Chromium from Debian's package (scripts/web-deps installs it). */
export const CHROMIUM = '/usr/bin/chromium';

const ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

/** Reads the test's settings from the environment; a missing one fails with its name. */
export function settings() {
  const names = ['ATRIUM_URL', 'ATRIUM_USERNAME', 'ATRIUM_PASSWORD', 'ATRIUM_PENDING_SERIAL', 'ATRIUM_WEB_ARTIFACTS'];
  const missing = names.filter((n) => !process.env[n]);
  if (missing.length) {
    throw new Error(`missing environment variables: ${missing.join(', ')} (the e2e test \`web\` in crates/atrium-e2e sets them; see tests/web/README.md)`);
  }
  const artifacts = process.env.ATRIUM_WEB_ARTIFACTS;
  mkdirSync(artifacts, { recursive: true });
  return {
    url: process.env.ATRIUM_URL.replace(/\/+$/, ''),
    username: process.env.ATRIUM_USERNAME,
    password: process.env.ATRIUM_PASSWORD,
    pendingSerial: process.env.ATRIUM_PENDING_SERIAL,
    artifacts,
  };
}

/**
 * Launches headless Chromium with a fresh profile. Returns { context, close }; the context
 * ignores the server's own CA (the test trusts the server it started) and records every
 * console error, page error and request to another origin in `context.problems`.
 */
export async function launch({ viewport = { width: 1280, height: 900 }, isMobile = false } = {}) {
  const profile = mkdtempSync(join(tmpdir(), 'atrium-web-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    ignoreHTTPSErrors: true,
    viewport,
    isMobile,
    hasTouch: isMobile,
    locale: 'en-GB',
    timezoneId: 'UTC',
  });
  context.problems = [];
  const watch = (page) => {
    page.on('console', (msg) => {
      if (msg.type() === 'error') context.problems.push(`${page.url()}: console: ${msg.text()}`);
    });
    page.on('pageerror', (err) => context.problems.push(`${page.url()}: ${err.message}`));
  };
  // Every asset is the server's own: a request anywhere else is a problem.
  const origin = new URL(process.env.ATRIUM_URL).origin;
  context.on('request', (req) => {
    const url = req.url();
    if (!url.startsWith('data:') && new URL(url).origin !== origin) {
      context.problems.push(`request to another origin: ${url}`);
    }
  });
  context.on('page', watch);
  context.pages().forEach(watch);
  return {
    context,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Logs in through the login page and waits for the floor view. */
export async function logIn(page, base, username, password) {
  await page.goto(`${base}/ui/login.html`);
  await page.getByLabel('Username').fill(username);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.waitForURL((u) => !u.pathname.endsWith('/login.html'), { timeout: 15000 });
}

/** The CSRF token of the context's session (for API calls made by the test itself). */
export async function csrf(context, base) {
  const r = await context.request.get(`${base}/api/v1/session`);
  if (!r.ok()) throw new Error(`GET /api/v1/session: ${r.status()} ${await r.text()}`);
  return (await r.json()).csrf_token;
}

/** Creates an account with `role` through the API, as the context's (admin) session. */
export async function createUser(context, base, role, username, password) {
  const token = await csrf(context, base);
  const res = await context.request.post(`${base}/api/v1/users`, {
    headers: { 'X-CSRF-Token': token },
    data: { username, password, role },
  });
  if (res.status() !== 201) throw new Error(`creating the ${role} ${username}: ${res.status()} ${await res.text()}`);
}

/** Saves a full-page screenshot as <artifacts>/<name>.png. */
export async function screenshot(page, dir, name) {
  await page.screenshot({ path: join(dir, `${name}.png`), fullPage: true, animations: 'disabled' });
}

/** Waits until `probe()` returns a truthy value, polling; fails with `what` after `ms`. */
export async function eventually(what, probe, ms = 30000, every = 250) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}
