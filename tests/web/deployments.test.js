// Browser test of the deployment pages against the real server and the demo's gateways: an
// operator creates a deployment from the form (a refused one shows the server's reason),
// finds it in the list, opens it and sees its devices; pausing, resuming and aborting change
// the status live on pages that stay open (the `deployment.updated` events, not a reload). A
// deployment the gateways really act on: the demo's gateways have no A/B partitions, so the
// root filesystem artifact fails on them, the deployment halts at its failure threshold, the
// page shows why and the device's install log, and a resume goes on to the next phase. A
// viewer sees no form and no buttons. The e2e test `web` writes an artifact for the demo's
// device type and passes its path in ATRIUM_DEPLOY_ARTIFACT.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { settings, launch, logIn, csrf, createUser, screenshot, eventually } from './lib.js';

const env = settings();
const artifactFile = process.env.ATRIUM_DEPLOY_ARTIFACT;
const ARTIFACT_NAME = 'web-deploy-1';
const DEPLOYMENT_NAME = 'web rollout';
let admin;
let page;
let gateways; // the accepted demo gateways: the deployment's target

const ui = (path) => `${env.url}/ui/${path}`;

/** Fails on console errors or uncaught exceptions (CSP violations show up as these). */
function assertNoProblems(ctx) {
  const problems = ctx.problems.splice(0);
  assert.deepEqual(problems, [], `the pages reported errors:\n${problems.join('\n')}`);
}

async function apiGet(path) {
  const r = await admin.context.request.get(`${env.url}/api/v1${path}`);
  assert.ok(r.ok(), `GET ${path}: ${r.status()} ${await r.text()}`);
  return r.json();
}

/** Waits until the page's status badge in `selector` shows `status`. */
async function waitForStatus(p, selector, status, what) {
  await p.locator(`${selector} .badge[data-status="${status}"]`).first().waitFor({ timeout: 15000 })
    .catch(async (e) => {
      const shown = await p.locator(selector).innerText().catch(() => '?');
      throw new Error(`${what}: the status did not become ${status} (shown: ${shown}): ${e.message}`);
    });
}

before(async () => {
  if (!artifactFile) throw new Error('missing ATRIUM_DEPLOY_ARTIFACT (the e2e test `web` sets it)');
  admin = await launch();
  page = await admin.context.newPage();
  await logIn(page, env.url, env.username, env.password);
  const token = await csrf(admin.context, env.url);
  const up = await admin.context.request.post(`${env.url}/api/v1/artifacts`, {
    headers: { 'X-CSRF-Token': token, 'Content-Type': 'application/vnd.mender-artifact' },
    data: readFileSync(artifactFile),
  });
  assert.equal(up.status(), 201, `uploading the artifact: ${await up.text()}`);
  gateways = (await apiGet('/devices?limit=10000')).filter((d) => d.status === 'accepted' && d.tags.demo === 'true');
  assert.ok(gateways.length >= 2, `the demo has accepted gateways to deploy to (found ${gateways.length})`);
});

after(async () => {
  if (admin) await admin.close();
});

test('an operator creates a deployment, follows it live, pauses, resumes and aborts it', async () => {
  // A second page stays on the list the whole time: it must follow every change live.
  const listPage = await admin.context.newPage();
  await listPage.goto(ui('deployments.html'));
  await listPage.locator('#live.on').waitFor({ timeout: 15000 });

  await page.goto(ui('deployments.html'));
  await page.getByRole('link', { name: 'Deployments' }).waitFor();
  await page.locator('#create-title').click();
  await page.getByLabel(/^Name/).fill(DEPLOYMENT_NAME);
  await page.getByLabel('Artifact').selectOption(ARTIFACT_NAME);
  // A group that does not exist: refused, with the server's reason on the page.
  await page.getByLabel('Devices', { exact: true }).selectOption('group');
  await page.getByLabel('Group', { exact: true }).fill('no-such-group');
  await page.getByRole('button', { name: 'Create deployment' }).click();
  await page.getByRole('alert').filter({ hasText: /no group "no-such-group"/ }).waitFor({ timeout: 15000 });
  const refused = admin.context.problems.splice(0);
  assert.ok(refused.every((p) => /status of 400/.test(p)), `only the refused request was logged: ${refused.join('\n')}`);
  await page.getByLabel('Devices', { exact: true }).selectOption('filter');
  await page.getByLabel('Filter', { exact: true }).fill('tag:demo=true');
  // Phase 1: one gateway; phase 2: the rest, after an operator resumes.
  await page.getByRole('button', { name: 'Add phase' }).click();
  await page.getByLabel('Phase 1 size', { exact: true }).fill('1');
  await page.getByLabel('Phase 1 size unit').selectOption('devices');
  await page.getByRole('button', { name: 'Add phase' }).click();
  await page.getByLabel('Phase 2 pause before').check();
  await page.getByLabel(/^Failure threshold/).fill('50');
  // An hour ahead: the gateways are not offered it while the buttons are tried.
  const later = new Date(Date.now() + 3600 * 1000);
  const pad = (n) => String(n).padStart(2, '0');
  await page.getByLabel(/^Start at/).fill(`${later.getFullYear()}-${pad(later.getMonth() + 1)}-${pad(later.getDate())}T${pad(later.getHours())}:${pad(later.getMinutes())}`);
  await page.getByRole('button', { name: 'Create deployment' }).click();
  await page.getByRole('status').filter({ hasText: `Deployment ${DEPLOYMENT_NAME} created` }).waitFor({ timeout: 15000 });

  const deployments = await apiGet('/deployments');
  const created = deployments.find((d) => d.name === DEPLOYMENT_NAME);
  assert.ok(created, 'the server has the deployment');
  assert.equal(created.artifact_name, ARTIFACT_NAME);
  assert.deepEqual(created.target, { filter: 'tag:demo=true' });
  assert.equal(created.phases.length, 2);
  assert.equal(created.phases[1].pause, true);
  assert.equal(created.failure_threshold, 50);
  assert.ok(Math.abs(created.start_at - later.getTime()) < 60 * 1000, `start_at ${created.start_at} is the time entered`);
  assert.equal(created.counts.total, gateways.length);
  const row = `#deployments tr[data-deployment="${created.id}"]`;
  await page.locator(row).waitFor({ timeout: 10000 });
  // The list page that stayed open learns of it from the event stream.
  await listPage.locator(row).waitFor({ timeout: 15000 });
  await waitForStatus(page, row, 'scheduled', 'the new deployment in the list');
  assert.match(await page.locator(row).innerText(), new RegExp(`${ARTIFACT_NAME}[\\s\\S]*filter tag:demo=true[\\s\\S]*of ${gateways.length} succeeded`));
  await screenshot(page, env.artifacts, 'deployments');

  // Open it: the devices of the target are listed with their status.
  await page.locator(row).getByRole('link', { name: DEPLOYMENT_NAME }).click();
  await page.waitForURL(/deployment\.html\?id=/);
  await page.locator('#live.on').waitFor({ timeout: 15000 });
  await waitForStatus(page, '#dep-badge', 'scheduled', 'the deployment page');
  const deviceRows = page.locator('#devices tbody tr[data-device-id]');
  await eventually('every gateway in the device table', async () => (await deviceRows.count()) === gateways.length, 15000);
  for (const g of gateways) {
    const tr = page.locator(`#devices tr[data-device-id="${g.id}"]`);
    assert.match(await tr.innerText(), new RegExp(g.identity.serial), `the row of ${g.identity.serial} names it`);
  }
  const phases = await apiGet(`/deployments/${created.id}/devices`);
  assert.equal(phases.filter((d) => d.phase === 0).length, 1, 'one gateway in the first phase');
  assert.match(await page.locator('#phase-table').innerText(), /1 device\b/);
  // The install log viewer opens for a device (empty: nothing was offered yet).
  await page.locator(`#devices tr[data-device-id="${gateways[0].id}"]`).getByRole('button', { name: /Install log of/ }).click();
  await page.locator('#log:not([hidden]) #log-text').waitFor({ timeout: 10000 });

  // A second page on the deployment, as another operator would have: it never reloads.
  const watcher = await admin.context.newPage();
  await watcher.goto(ui(`deployment.html?id=${encodeURIComponent(created.id)}`));
  await watcher.locator('#live.on').waitFor({ timeout: 15000 });
  await waitForStatus(watcher, '#dep-badge', 'scheduled', 'the watching page');
  const loads = { watcher: 0, list: 0 };
  watcher.on('load', () => { loads.watcher += 1; });
  listPage.on('load', () => { loads.list += 1; });

  await page.getByRole('button', { name: 'Pause' }).click();
  await page.getByRole('status').filter({ hasText: `Deployment ${DEPLOYMENT_NAME} paused` }).waitFor({ timeout: 15000 });
  await waitForStatus(page, '#dep-badge', 'paused', 'after pausing');
  await waitForStatus(watcher, '#dep-badge', 'paused', 'the watching page after the pause');
  await waitForStatus(listPage, row, 'paused', 'the list after the pause');

  // Resumed elsewhere (the API, as the CLI does): the open pages follow.
  const token = await csrf(admin.context, env.url);
  const resumed = await admin.context.request.post(`${env.url}/api/v1/deployments/${created.id}/resume`, { headers: { 'X-CSRF-Token': token } });
  assert.equal(resumed.status(), 200, await resumed.text());
  await waitForStatus(page, '#dep-badge', 'scheduled', 'after the resume (it waits for its start again)');
  await waitForStatus(watcher, '#dep-badge', 'scheduled', 'the watching page after the resume');
  await waitForStatus(listPage, row, 'scheduled', 'the list after the resume');
  await page.getByRole('button', { name: 'Pause' }).waitFor({ timeout: 10000 });

  // Abort asks first; cancelling changes nothing.
  await page.getByRole('button', { name: 'Abort' }).click();
  await page.getByRole('dialog').getByRole('button', { name: 'Cancel' }).click();
  assert.equal((await apiGet(`/deployments/${created.id}`)).status, 'scheduled');
  await page.getByRole('button', { name: 'Abort' }).click();
  await page.getByRole('dialog').getByRole('button', { name: 'Abort' }).click();
  await page.getByRole('status').filter({ hasText: `Deployment ${DEPLOYMENT_NAME} aborted` }).waitFor({ timeout: 15000 });
  await waitForStatus(page, '#dep-badge', 'aborted', 'after the abort');
  await waitForStatus(watcher, '#dep-badge', 'aborted', 'the watching page after the abort');
  await waitForStatus(listPage, row, 'aborted', 'the list after the abort');
  assert.equal(await page.locator('#actions button').count(), 0, 'nothing to do with an aborted deployment');
  // Devices that had not ended are aborted, on the watching page too.
  await eventually('the devices shown as aborted', async () => {
    const statuses = await watcher.locator('#devices tbody tr[data-device-id]').evaluateAll((rows) => rows.map((r) => r.dataset.status));
    return statuses.length === gateways.length && statuses.some((s) => s === 'aborted');
  }, 15000);
  await screenshot(watcher, env.artifacts, 'deployment');
  assert.deepEqual(loads, { watcher: 0, list: 0 }, 'the open pages followed without reloading');

  const audit = await apiGet(`/audit?target=${encodeURIComponent(created.id)}`);
  assert.deepEqual(audit.map((e) => e.action).sort(),
    ['deployment.abort', 'deployment.create', 'deployment.pause', 'deployment.resume']);

  // The device page lists the deployment.
  await page.goto(ui(`device.html?id=${encodeURIComponent(gateways[0].id)}`));
  await page.locator(`#device-deployments tr[data-deployment="${created.id}"]`).waitFor({ timeout: 15000 });
  await watcher.close();
  await listPage.close();
  assertNoProblems(admin.context);
});

test('a deployment the gateways fail halts live, shows why, and a resume goes on', async () => {
  const token = await csrf(admin.context, env.url);
  const r = await admin.context.request.post(`${env.url}/api/v1/deployments`, {
    headers: { 'X-CSRF-Token': token },
    data: {
      name: 'web halting rollout',
      artifact_name: ARTIFACT_NAME,
      target: { filter: 'tag:demo=true' },
      phases: [{ size: 1 }, { pause: true }],
      failure_threshold: 50,
    },
  });
  assert.equal(r.status(), 201, await r.text());
  const created = await r.json();
  const p = await admin.context.newPage();
  await p.goto(ui(`deployment.html?id=${encodeURIComponent(created.id)}`));
  await p.locator('#live.on').waitFor({ timeout: 15000 });
  // The first phase's gateway downloads it and fails (no A/B partitions): the failure
  // threshold halts the deployment, and the page says so without a reload.
  await waitForStatus(p, '#dep-badge', 'halted', 'after the first gateway failed');
  assert.match(await p.locator('body').innerText(), /failure threshold of 50%/);
  const first = (await apiGet(`/deployments/${created.id}/devices`)).find((d) => d.phase === 0);
  const tr = p.locator(`#devices tr[data-device-id="${first.device_id}"]`);
  await eventually('the failed gateway shown as failed', async () => (await tr.getAttribute('data-status')) === 'failure', 15000);
  await tr.getByRole('button', { name: /Install log of/ }).click();
  await eventually('the gateway\'s install log shown', async () => (await p.locator('#log:not([hidden]) #log-text').innerText()).trim().length > 0, 10000);
  // The other gateways were never offered it.
  const rest = (await apiGet(`/deployments/${created.id}/devices`)).filter((d) => d.phase === 1);
  assert.ok(rest.length >= 1 && rest.every((d) => d.status === 'pending'), JSON.stringify(rest));
  // The operator looked and goes on: the next phase waits for its own resume, as configured.
  await p.getByRole('button', { name: 'Resume' }).click();
  await waitForStatus(p, '#dep-badge', 'paused', 'after resuming the halted deployment');
  assert.match(await p.locator('body').innerText(), /phase 2 starts when an operator resumes/);
  await p.getByRole('button', { name: 'Abort' }).click();
  await p.getByRole('dialog').getByRole('button', { name: 'Abort' }).click();
  await waitForStatus(p, '#dep-badge', 'aborted', 'after the abort');
  await p.close();
  assertNoProblems(admin.context);
});

test('a viewer sees deployments but no form and no buttons', async () => {
  const username = `deploy-viewer-${Date.now().toString(36)}`;
  const password = `viewer-password-${Math.random().toString(36).slice(2)}`;
  await createUser(admin.context, env.url, 'viewer', username, password);
  const viewer = await launch();
  try {
    const vp = await viewer.context.newPage();
    await logIn(vp, env.url, username, password);
    await vp.goto(ui('deployments.html'));
    const first = vp.locator('#deployments tbody tr[data-deployment]').first();
    await first.waitFor({ timeout: 15000 });
    assert.equal(await vp.locator('#create').count(), 0, 'no create form');
    const id = await first.getAttribute('data-deployment');
    await vp.goto(ui(`deployment.html?id=${encodeURIComponent(id)}`));
    await vp.locator('#devices tbody tr[data-device-id]').first().waitFor({ timeout: 15000 });
    assert.equal(await vp.locator('#actions button').count(), 0, 'no pause, resume or abort');
    assertNoProblems(viewer.context);
  } finally {
    await viewer.close();
  }
});
