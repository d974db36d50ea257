// Browser test of the Artifacts page: upload with progress, details, a refused upload's
// reason, delete. The e2e test `web` writes a real artifact and passes its path in
// ATRIUM_TEST_ARTIFACT.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { settings, launch, logIn, screenshot } from './lib.js';

const env = settings();
const artifactFile = process.env.ATRIUM_TEST_ARTIFACT;
let admin;
let page;

before(async () => {
  if (!artifactFile) throw new Error('missing ATRIUM_TEST_ARTIFACT (the e2e test `web` sets it)');
  admin = await launch();
  page = await admin.context.newPage();
  await logIn(page, env.url, env.username, env.password);
});

after(async () => {
  if (admin) await admin.close();
});

test('an operator uploads an artifact, sees its details, and deletes it', async () => {
  await page.goto(`${env.url}/ui/artifacts.html`);
  await page.getByRole('link', { name: 'Artifacts' }).waitFor();
  await page.getByLabel(/Artifact file/).setInputFiles(artifactFile);
  await page.getByLabel('Description').fill('browser upload');
  await page.getByRole('button', { name: 'Upload' }).click();
  await page.getByRole('status').filter({ hasText: 'web-release-1 uploaded' }).waitFor({ timeout: 30000 });
  const row = page.locator('#artifacts tbody tr').filter({ hasText: 'web-release-1' });
  await row.waitFor({ timeout: 10000 });
  assert.match(await row.innerText(), /browser upload/);
  assert.match(await row.innerText(), /Unsigned/);
  await row.getByRole('button', { name: 'Details of web-release-1' }).click();
  const sha = createHash('sha256').update(readFileSync(artifactFile)).digest('hex');
  await page.locator('#details').getByText(sha).waitFor({ timeout: 10000 });
  await screenshot(page, env.artifacts, 'artifacts');

  // The same name for the same device type again: the server's reason is shown.
  await page.getByLabel(/Artifact file/).setInputFiles(artifactFile);
  await page.getByRole('button', { name: 'Upload' }).click();
  await page.getByRole('alert').filter({ hasText: /exists already/ }).waitFor({ timeout: 30000 });

  // Not an artifact: refused with the reader's reason.
  const junk = join(env.artifacts, 'not-an-artifact.mender');
  writeFileSync(junk, 'hello, this is not a tar archive');
  await page.getByLabel(/Artifact file/).setInputFiles(junk);
  await page.getByRole('button', { name: 'Upload' }).click();
  await page.getByRole('alert').filter({ hasText: /tar/ }).waitFor({ timeout: 30000 });

  await row.getByRole('button', { name: 'Delete web-release-1' }).click();
  await page.getByRole('dialog').getByRole('button', { name: 'Delete' }).click();
  await page.getByRole('status').filter({ hasText: 'web-release-1 deleted' }).waitFor({ timeout: 15000 });
  // Gone from the list; the update the demo uploaded for its gateways stays.
  await row.waitFor({ state: 'detached', timeout: 10000 });
  await page.locator('#artifacts tbody tr').filter({ hasText: 'office-gateway-1.1' }).waitFor({ timeout: 10000 });
  const problems = admin.context.problems.splice(0).filter((p) => !/status of 4(09|22)/.test(p));
  assert.deepEqual(problems, []);
});
