// Enrollment page: enrollment groups (zero-touch) and the factory-serial deny-list.
import { api, boot, can, h, flash, act, fmtAgo, timeEl } from './app.js';
import { parsePairs, pairsText, fileIntoTextarea } from './fleet.js';

async function drawGroups() {
  const groups = await api('/enrollment-groups');
  const box = document.getElementById('groups');
  if (groups.length === 0) {
    box.replaceChildren(h('p', { class: 'panel muted' }, 'No enrollment groups.'));
    return;
  }
  const head = ['Name', 'State', 'Manufacturer CA', 'Tags', 'Attributes', 'Created'];
  if (can('admin')) head.push('Actions');
  box.replaceChildren(h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, head.map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, groups.map((g) => {
      const cells = [
        h('th', { scope: 'row' }, g.name),
        h('td', {}, h('span', { class: `badge ${g.enabled ? 'st-accepted' : 'st-rejected'}` }, g.enabled ? 'Enabled' : 'Disabled')),
        h('td', { class: 'small' }, g.ca_subject || '–', h('div', { class: 'mono muted' }, `${g.ca_fingerprint.slice(0, 16)}…`)),
        h('td', { class: 'small' }, pairsText(g.tags)),
        h('td', { class: 'small' }, pairsText(g.attributes)),
        h('td', {}, timeEl(g.created_ms, fmtAgo(g.created_ms))),
      ];
      if (can('admin')) {
        const verb = g.enabled ? 'disable' : 'enable';
        const button = h('button', { type: 'button', class: `small ${g.enabled ? 'danger' : ''}`, 'aria-label': `${g.enabled ? 'Disable' : 'Enable'} group ${g.name}` },
          g.enabled ? 'Disable' : 'Enable');
        button.addEventListener('click', async () => {
          const ok = await act(button, () => api(`/enrollment-groups/${encodeURIComponent(g.name)}/${verb}`, { method: 'POST' }),
            `Group ${g.name} ${verb}d.`);
          if (ok) drawGroups().catch((e) => flash(e.message, 'error'));
        });
        cells.push(h('td', {}, button));
      }
      return h('tr', { 'data-group': g.name }, cells);
    })))));
}

async function drawDenied() {
  const list = await api('/denied-serials');
  const box = document.getElementById('denied');
  if (list.length === 0) {
    box.replaceChildren(h('p', { class: 'muted' }, 'No serials are denied.'));
    return;
  }
  box.replaceChildren(h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, ['Serial', 'Reason', 'Since'].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, list.map((d) => h('tr', {}, h('td', {}, d.serial), h('td', {}, d.reason || '–'),
      h('td', {}, timeEl(d.created_ms, fmtAgo(d.created_ms)))))))));
}

function setUpForms() {
  const add = document.getElementById('add-group');
  if (add) {
    fileIntoTextarea(document.getElementById('g-cafile'), document.getElementById('g-ca'));
    add.addEventListener('submit', async (e) => {
      e.preventDefault();
      let tags;
      let attributes;
      try {
        tags = parsePairs(add.tags.value, 'Tags');
        attributes = parsePairs(add.attributes.value, 'Attributes');
      } catch (err) {
        flash(err.message, 'error');
        return;
      }
      const body = { name: document.getElementById('g-name').value.trim(), ca_pem: add.ca_pem.value.trim(), tags, attributes };
      const ok = await act(add.querySelector('button[type=submit]'), () => api('/enrollment-groups', { method: 'POST', body }),
        (g) => `Group ${g.name} added.`);
      if (ok) {
        add.reset();
        drawGroups().catch((err) => flash(err.message, 'error'));
      }
    });
  }
  const deny = document.getElementById('deny');
  if (deny) {
    deny.addEventListener('submit', async (e) => {
      e.preventDefault();
      const body = { serial: deny.serial.value.trim(), reason: deny.reason.value.trim() };
      const ok = await act(deny.querySelector('button[type=submit]'), () => api('/denied-serials', { method: 'POST', body }),
        (d) => `Serial ${d.serial} denied.`);
      if (ok) {
        deny.reset();
        drawDenied().catch((err) => flash(err.message, 'error'));
      }
    });
  }
}

async function main() {
  await boot({ page: 'groups' });
  setUpForms();
  await Promise.all([drawGroups(), drawDenied()]);
}

main().catch((e) => flash(e.message, 'error'));
