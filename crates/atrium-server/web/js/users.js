// Users page (admins): operator accounts, their roles, passwords and whether they may log in.
import { api, boot, can, currentSession, h, flash, act, confirmDialog, fmtAgo, timeEl } from './app.js';

const ROLES = ['viewer', 'operator', 'admin'];

function row(u) {
  const me = u.username === currentSession().username;
  const select = h('select', { 'aria-label': `Role of ${u.username}` }, ROLES.map((r) => h('option', { value: r, selected: r === u.role }, r)));
  const setRole = h('button', { type: 'button', class: 'small secondary' }, 'Set role');
  setRole.addEventListener('click', () => update(setRole, u.username, { role: select.value }, `${u.username} is now ${select.value}.`));
  const toggle = h('button', { type: 'button', class: `small ${u.disabled ? '' : 'danger'}` }, u.disabled ? 'Enable' : 'Disable');
  toggle.setAttribute('aria-label', `${u.disabled ? 'Enable' : 'Disable'} ${u.username}`);
  toggle.addEventListener('click', async () => {
    if (!u.disabled) {
      const ok = await confirmDialog({
        title: `Disable ${u.username}?`, message: 'The account cannot log in and its sessions end at once.',
        confirmLabel: 'Disable', danger: true,
      });
      if (!ok) return;
    }
    update(toggle, u.username, { disabled: !u.disabled }, `${u.username} ${u.disabled ? 'enabled' : 'disabled'}.`);
  });
  const reset = h('button', { type: 'button', class: 'small secondary', 'aria-label': `New password for ${u.username}` }, 'New password');
  reset.addEventListener('click', () => newPassword(reset, u.username));
  return h('tr', { 'data-user': u.username },
    h('th', { scope: 'row' }, u.username, me ? h('span', { class: 'muted small' }, ' (you)') : null),
    h('td', {}, h('div', { class: 'inline-form' }, select, setRole)),
    h('td', {}, h('span', { class: `badge ${u.disabled ? 'st-rejected' : 'st-accepted'}` }, u.disabled ? 'Disabled' : 'Active')),
    h('td', {}, u.last_login_ms ? timeEl(u.last_login_ms, fmtAgo(u.last_login_ms)) : 'never'),
    h('td', {}, timeEl(u.created_ms, fmtAgo(u.created_ms))),
    h('td', {}, h('div', { class: 'actions' }, toggle, reset)));
}

async function update(button, username, body, message) {
  const ok = await act(button, () => api(`/users/${encodeURIComponent(username)}`, { method: 'PUT', body }), message);
  if (ok) await draw();
}

async function newPassword(button, username) {
  const input = h('input', { type: 'password', id: 'np-input', autocomplete: 'new-password', minlength: 12 });
  const ok = h('button', { type: 'submit' }, 'Set password');
  const cancel = h('button', { type: 'button', class: 'secondary' }, 'Cancel');
  const form = h('form', { method: 'dialog', class: 'stack' },
    h('h2', { id: 'np-title' }, `New password for ${username}`),
    h('p', {}, 'Their sessions end; they log in with the new password.'),
    h('div', {}, h('label', { for: 'np-input' }, 'Password ', h('span', { class: 'hint' }, 'at least 12 characters')), input),
    h('div', { class: 'actions' }, ok, cancel));
  const dialog = h('dialog', { 'aria-labelledby': 'np-title' }, form);
  let password = null;
  form.addEventListener('submit', () => {
    password = input.value;
  });
  cancel.addEventListener('click', () => dialog.close());
  dialog.addEventListener('close', () => {
    dialog.remove();
    if (password) update(button, username, { password }, `Password of ${username} changed.`);
  });
  document.body.append(dialog);
  dialog.showModal();
  input.focus();
}

async function draw() {
  const users = await api('/users');
  users.sort((a, b) => a.username.localeCompare(b.username));
  document.querySelector('#users tbody').replaceChildren(...users.map(row));
}

async function main() {
  await boot({ page: 'users' });
  if (!can('admin')) {
    document.getElementById('not-admin').hidden = false;
    return;
  }
  const form = document.getElementById('new-user');
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = {
      username: document.getElementById('u-name').value.trim(),
      password: document.getElementById('u-password').value,
      role: document.getElementById('u-role').value,
    };
    const ok = await act(form.querySelector('button[type=submit]'), () => api('/users', { method: 'POST', body }),
      (u) => `${u.username} added as ${u.role}.`);
    if (ok) {
      form.reset();
      await draw();
    }
  });
  await draw();
}

main().catch((e) => flash(e.message, 'error'));
