// Shared parts of the deployment pages: status badges, progress from counts, the target in
// words, and the live `deployment.updated` stream.
import { h, eventStream } from './app.js';

const DEPLOYMENT_STATUS = {
  scheduled: 'Scheduled', running: 'Running', paused: 'Paused', halted: 'Halted', aborted: 'Aborted', finished: 'Finished',
};

/** Every deployment status, in the order of the status filters. */
export const DEPLOYMENT_STATUSES = Object.keys(DEPLOYMENT_STATUS);

const DEVICE_STATUS = {
  pending: 'Pending', offered: 'Offered', downloading: 'Downloading', installing: 'Installing', rebooting: 'Rebooting',
  verifying: 'Verifying', success: 'Success', 'already-installed': 'Already installed', failure: 'Failure',
  incompatible: 'Incompatible', aborted: 'Aborted',
};

/** Every device status of a deployment, in the order a device goes through them. */
export const DEVICE_STATUSES = Object.keys(DEVICE_STATUS);

/** Device statuses between the offer and an end. */
const ACTIVE = ['offered', 'downloading', 'installing', 'rebooting', 'verifying'];

/** A deployment's status as a badge (symbol, word, colour). */
export function deploymentBadge(status) {
  return h('span', { class: `badge dep-${status}`, 'data-status': status }, DEPLOYMENT_STATUS[status] || status);
}

/** A device's status in a deployment as a badge. */
export function deviceStatusBadge(status) {
  return h('span', { class: `badge ds-${status}`, 'data-status': status }, DEVICE_STATUS[status] || status);
}

/** Counts by status summed up: total, succeeded, failed, active, pending, other (incompatible, aborted). */
export function tally(counts) {
  const c = (k) => (counts && typeof counts[k] === 'number' ? counts[k] : 0);
  const succeeded = c('success') + c('already-installed');
  const failed = c('failure');
  const active = ACTIVE.reduce((n, k) => n + c(k), 0);
  const other = c('incompatible') + c('aborted');
  return { total: c('total'), succeeded, failed, active, pending: c('pending'), other };
}

/** "28 of 100 succeeded · 1 failed · 10 in progress · 60 pending". */
export function progressText(counts) {
  const t = tally(counts);
  const parts = [`${t.succeeded} of ${t.total} succeeded`];
  if (t.failed) parts.push(`${t.failed} failed`);
  if (t.active) parts.push(`${t.active} in progress`);
  if (t.pending) parts.push(`${t.pending} pending`);
  if (t.other) parts.push(`${t.other} incompatible or aborted`);
  return parts.join(' · ');
}

/** A bar of succeeded, failed, in-progress and otherwise ended devices, with the same in words. */
export function progressBar(counts) {
  const t = tally(counts);
  const bar = h('div', { class: 'progress', 'aria-hidden': 'true' });
  for (const [key, n] of [['success', t.succeeded], ['failure', t.failed], ['active', t.active], ['other', t.other]]) {
    if (!n || !t.total) continue;
    const part = h('span', { class: `p-${key}` });
    part.style.width = `${(100 * n) / t.total}%`;
    bar.append(part);
  }
  return h('div', { class: 'progress-box', 'data-progress': `${t.succeeded}/${t.total}` }, bar,
    h('div', { class: 'small progress-text' }, progressText(counts)));
}

/** The target in words: "group office-a", "device 5f3…", "filter tag:floor=3". */
export function targetText(target) {
  if (!target) return '–';
  if (target.device) return `device ${target.device}`;
  if (target.group) return `group ${target.group}`;
  if (target.filter) return `filter ${target.filter}`;
  return '–';
}

/**
 * Follows `deployment.updated` events (of one deployment with `id`, else of all):
 * onUpdate({ id, status, status_reason, phase, counts }) for each; onLagged() after dropped
 * events; onStatus as for eventStream. Returns a function that stops it.
 */
export function deploymentStream({ id, onUpdate, onLagged, onStatus }) {
  const q = new URLSearchParams({ types: 'deployment.updated' });
  if (id) q.set('target', id);
  return eventStream(`/events?${q}`, {
    events: {
      'deployment.updated': (e) => {
        const d = e.details || {};
        if (d.id && d.status) onUpdate(d);
      },
    },
    onLagged,
    onStatus,
  });
}
