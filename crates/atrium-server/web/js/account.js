// Account page: who is logged in, and changing one's own password.
import { api, boot, h, flash, act, fmtDateTime } from './app.js';

async function main() {
  const s = await boot({ page: 'account' });
  document.getElementById('who').replaceChildren(
    h('dt', {}, 'Username'), h('dd', {}, s.username),
    h('dt', {}, 'Role'), h('dd', {}, s.role),
    h('dt', {}, 'Session ends'), h('dd', {}, fmtDateTime(s.expires_ms)));
  const form = document.getElementById('password');
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const current = document.getElementById('pw-current').value;
    const next = document.getElementById('pw-new').value;
    if (next !== document.getElementById('pw-again').value) {
      flash('The two new passwords differ.', 'error');
      document.getElementById('pw-again').focus();
      return;
    }
    const done = await act(form.querySelector('button[type=submit]'), () => api('/session/password', {
      method: 'POST', body: { current_password: current, new_password: next },
    }), 'Password changed. Log in again with the new password.');
    if (done !== undefined) {
      form.reset();
      setTimeout(() => location.assign('login.html'), 1500);
    }
  });
}

main().catch((e) => flash(e.message, 'error'));
