// Login page: starts a browser session, then goes back to the page that asked for it.
import { api, ApiError, flash, clearFlash } from './app.js';

/** Only pages of the dashboard itself are followed after login (no open redirect). */
function nextPage() {
  const next = new URLSearchParams(location.search).get('next');
  if (next && /^\/ui\/[A-Za-z0-9._\-/]*(\?[A-Za-z0-9._\-=&%]*)?$/.test(next) && !next.includes('//')) {
    return next;
  }
  return './';
}

const form = document.getElementById('login');
form.addEventListener('submit', async (e) => {
  e.preventDefault();
  const username = form.username.value.trim();
  const password = form.password.value;
  if (!username || !password) {
    flash('Enter your username and password.', 'error');
    (username ? form.password : form.username).focus();
    return;
  }
  const button = document.getElementById('login-submit');
  button.disabled = true;
  clearFlash();
  try {
    await api('/session', { method: 'POST', body: { username, password }, redirect: false });
    location.assign(nextPage());
  } catch (err) {
    const text = err instanceof ApiError && err.status === 401 ? 'Wrong username or password.' : err.message;
    flash(text, 'error');
    form.password.value = '';
    form.password.focus();
  } finally {
    button.disabled = false;
  }
});

document.getElementById('username').focus();
