// The dashboard's shared module: API client (session cookie + CSRF token), page start-up
// (session, navigation, role gating), live room stream, DOM helpers and formatting.

const API = '/api/v1';
const ROLE_RANK = { viewer: 1, operator: 2, admin: 3 };

let session = null;

/** An API request that failed: HTTP status and the server's reason. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The login page, remembering where to come back to. */
export function loginUrl() {
  const here = location.pathname + location.search;
  return 'login.html?next=' + encodeURIComponent(here);
}

/**
 * Calls the REST API. `path` is below /api/v1. Non-GET requests carry the session's CSRF
 * token. Answers 401 send the browser to the login page (unless `redirect: false`).
 * Returns the parsed JSON body (null for 204), or with `text: true` the body as text (for
 * text/plain answers); throws ApiError with the server's message.
 */
export async function api(path, { method = 'GET', body, headers = {}, redirect = true, text: asText = false } = {}) {
  const accept = asText ? 'text/plain, application/json' : 'application/json';
  const init = { method, credentials: 'same-origin', headers: { Accept: accept, ...headers } };
  if (method !== 'GET' && method !== 'HEAD' && session) {
    init.headers['X-CSRF-Token'] = session.csrf_token;
  }
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (e) {
    throw new ApiError(0, 'the server cannot be reached (' + e.message + ')');
  }
  if (response.status === 401 && redirect) {
    location.assign(loginUrl());
    throw new ApiError(401, 'not logged in');
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const reason = data && typeof data.error === 'string' ? data.error : `${response.status} ${response.statusText}`.trim();
    throw new ApiError(response.status, reason);
  }
  if (asText) return text;
  if (data === null && text) {
    throw new ApiError(response.status, 'the server answered something that is not JSON');
  }
  const etag = response.headers.get('ETag');
  if (etag && data && typeof data === 'object') {
    Object.defineProperty(data, 'etag', { value: etag, enumerable: false });
  }
  return data;
}

/** The logged-in session: { username, role, csrf_token, expires_ms }. */
export function currentSession() {
  return session;
}

/** Whether the logged-in account has at least this role (viewer < operator < admin). */
export function can(role) {
  return !!session && (ROLE_RANK[session.role] || 0) >= (ROLE_RANK[role] || 99);
}

const NAV = [
  { page: 'floor', href: './', label: 'Floor' },
  { page: 'devices', href: 'devices.html', label: 'Devices' },
  { page: 'groups', href: 'groups.html', label: 'Enrollment' },
  { page: 'artifacts', href: 'artifacts.html', label: 'Artifacts' },
  { page: 'deployments', href: 'deployments.html', label: 'Deployments' },
  { page: 'audit', href: 'audit.html', label: 'Audit log' },
  { page: 'users', href: 'users.html', label: 'Users', role: 'admin' },
  { page: 'sessions', href: 'sessions.html', label: 'Terminal sessions', role: 'operator' },
  { page: 'account', href: 'account.html', label: 'Account' },
];

/**
 * Starts a page: reads the session (or goes to the login page), draws the top bar and
 * navigation, removes elements marked `data-requires="<role>"` the account may not use.
 * `nav: false` draws no navigation (the kiosk).
 */
export async function boot({ page, nav = true } = {}) {
  session = await api('/session');
  for (const el of document.querySelectorAll('[data-requires]')) {
    if (!can(el.dataset.requires)) el.remove();
  }
  const top = document.getElementById('top');
  if (top && nav) drawTop(top, page);
  return session;
}

function drawTop(top, page) {
  top.classList.add('top');
  const list = h('ul', {});
  for (const item of NAV) {
    if (item.role && !can(item.role)) continue;
    const a = h('a', { href: item.href }, item.label);
    if (item.page === page) a.setAttribute('aria-current', 'page');
    list.append(h('li', {}, a));
  }
  const logout = h('button', { type: 'button', class: 'secondary small', onclick: logOut }, 'Log out');
  top.replaceChildren(
    h('a', { class: 'skip-link', href: '#main' }, 'Skip to content'),
    h('div', { class: 'top-inner' },
      h('a', { class: 'brand', href: './' }, 'Atrium'),
      h('nav', { 'aria-label': 'Main' }, list),
      h('div', { class: 'who' },
        h('span', {}, h('span', { class: 'visually-hidden' }, 'Logged in as '), session.username),
        h('span', { class: 'role', title: 'Role' }, session.role),
        logout)));
}

async function logOut() {
  try {
    await api('/session', { method: 'DELETE', redirect: false });
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) {
      flash('Logging out failed: ' + e.message, 'error');
      return;
    }
  }
  session = null;
  location.assign('login.html');
}

/**
 * Creates an element. `props`: attributes, `class`, `text`, and `on<event>` handlers
 * (added with addEventListener, so the page needs no inline script). Children may be
 * nodes, strings or null.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'class') {
      el.className = value;
    } else if (key === 'text') {
      el.textContent = value;
    } else if (value === true) {
      el.setAttribute(key, '');
    } else {
      el.setAttribute(key, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Shows a message in the page's #flash region (errors are announced at once). */
export function flash(message, kind = 'info') {
  const region = document.getElementById('flash');
  if (!region) return;
  const msg = h('p', { class: 'msg msg-' + kind, role: kind === 'error' ? 'alert' : 'status' }, message);
  region.replaceChildren(msg);
  if (kind !== 'error') {
    setTimeout(() => {
      if (msg.isConnected) msg.remove();
    }, 8000);
  }
}

/** Clears the #flash region. */
export function clearFlash() {
  document.getElementById('flash')?.replaceChildren();
}

/** Runs an action from a button: disables it meanwhile and shows success or the error. */
export async function act(button, work, success) {
  if (button) button.disabled = true;
  try {
    const result = await work();
    if (success) flash(typeof success === 'function' ? success(result) : success, 'ok');
    return result;
  } catch (e) {
    flash(e.message, 'error');
    return undefined;
  } finally {
    if (button && button.isConnected) button.disabled = false;
  }
}

/**
 * Asks for confirmation in a modal dialog; with `reason`, also for a reason. Resolves to
 * { reason } or null when cancelled.
 */
export function confirmDialog({ title, message, confirmLabel = 'Confirm', danger = false, reason = false }) {
  return new Promise((resolve) => {
    const reasonInput = reason ? h('input', { type: 'text', name: 'reason', id: 'dialog-reason', maxlength: 500 }) : null;
    const ok = h('button', { type: 'submit', value: 'ok', class: danger ? 'danger' : '' }, confirmLabel);
    const cancel = h('button', { type: 'button', class: 'secondary' }, 'Cancel');
    const form = h('form', { method: 'dialog', class: 'stack' },
      h('h2', { id: 'dialog-title' }, title),
      message ? h('p', {}, message) : null,
      reasonInput ? h('div', {}, h('label', { for: 'dialog-reason' }, 'Reason ', h('span', { class: 'hint' }, '(optional, goes to the audit log)')), reasonInput) : null,
      h('div', { class: 'actions' }, ok, cancel));
    const dialog = h('dialog', { 'aria-labelledby': 'dialog-title' }, form);
    let answer = null;
    form.addEventListener('submit', () => {
      answer = { reason: reasonInput ? reasonInput.value.trim() : '' };
    });
    cancel.addEventListener('click', () => dialog.close());
    dialog.addEventListener('close', () => {
      dialog.remove();
      resolve(answer);
    });
    document.body.append(dialog);
    dialog.showModal();
    (reasonInput || ok).focus();
  });
}

/** Shows the live stream's status in the page's `#live` indicator (word and colour). */
export function setLive(status) {
  const el = document.getElementById('live');
  el.classList.toggle('on', status === 'live');
  el.classList.toggle('off', status !== 'live');
  el.textContent = status === 'live' ? 'Live' : 'Reconnecting…';
}

/**
 * Follows a server-sent event stream below /api/v1. `events` maps message names to handlers
 * that get the message's parsed JSON data (messages whose data is not JSON are skipped);
 * onLagged() runs when the server dropped messages this page fell behind on;
 * onStatus('live' | 'reconnecting'). Reconnects by itself; when the session has ended it goes
 * to the login page. Returns a function that stops it.
 */
export function eventStream(path, { events = {}, onLagged, onStatus }) {
  let source = null;
  let stopped = false;
  let retryMs = 1000;
  let timer = null;
  const status = (s) => onStatus && onStatus(s);
  const open = () => {
    if (stopped) return;
    source = new EventSource(API + path, { withCredentials: true });
    source.addEventListener('open', () => {
      retryMs = 1000;
      status('live');
    });
    for (const [name, handler] of Object.entries(events)) {
      source.addEventListener(name, (e) => {
        let data;
        try {
          data = JSON.parse(e.data);
        } catch {
          return;
        }
        if (data) handler(data);
      });
    }
    source.addEventListener('lagged', () => onLagged && onLagged());
    source.addEventListener('error', async () => {
      status('reconnecting');
      if (source.readyState !== EventSource.CLOSED) return; // the browser retries by itself
      source.close();
      // Closed for good: a refused request (e.g. the session ended). Check, then retry.
      try {
        await api('/session');
      } catch {
        /* api() sends the browser to the login page on 401; else keep retrying */
      }
      if (!stopped) {
        timer = setTimeout(open, retryMs);
        retryMs = Math.min(retryMs * 2, 30000);
      }
    });
  };
  open();
  return () => {
    stopped = true;
    clearTimeout(timer);
    if (source) source.close();
  };
}

/**
 * Follows the live room stream. Calls onState(room_id, state) and onEvent(room_id, event);
 * onStatus('live' | 'reconnecting'). After dropped updates it reads every room's state
 * again. Returns a function that stops it.
 */
export function roomStream({ onState, onEvent, onStatus }) {
  return eventStream('/events/rooms', {
    events: {
      state: (d) => {
        if (d.room_id && d.state) onState && onState(d.room_id, d.state);
      },
      event: (d) => {
        if (d.room_id && d.event) onEvent && onEvent(d.room_id, d.event);
      },
    },
    onLagged: async () => {
      // Updates were dropped while this page fell behind: read every room's state afresh.
      try {
        for (const room of await api('/rooms')) {
          if (room.state && onState) onState(room.id, room.state);
        }
      } catch {
        /* the stream goes on; the next updates bring the rooms up to date */
      }
    },
    onStatus,
  });
}

/** The value of a query parameter of this page. */
export function param(name) {
  return new URLSearchParams(location.search).get(name);
}

// ---- formatting -------------------------------------------------------------------------

const clockFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

/** "14:05" */
export function fmtClock(ms) {
  return ms ? clockFmt.format(new Date(ms)) : '–';
}

/** "25 Nov 2026, 14:05:09" */
export function fmtDateTime(ms) {
  return ms ? dateTimeFmt.format(new Date(ms)) : '–';
}

/** A <time> element with the full date as its machine-readable value and tooltip. */
export function timeEl(ms, text) {
  if (!ms) return h('span', {}, text || 'never');
  const iso = new Date(ms).toISOString();
  return h('time', { datetime: iso, title: fmtDateTime(ms) }, text || fmtDateTime(ms));
}

/** "12 s ago", "5 min ago", "3 h ago", "2 d ago" (or "in 5 min" for the future). */
export function fmtAgo(ms, now = Date.now()) {
  if (!ms) return 'never';
  const d = now - ms;
  const a = Math.abs(d);
  let text;
  if (a < 60000) text = `${Math.max(0, Math.round(a / 1000))} s`;
  else if (a < 3600000) text = `${Math.round(a / 60000)} min`;
  else if (a < 172800000) text = `${Math.round(a / 3600000)} h`;
  else text = `${Math.round(a / 86400000)} d`;
  return d >= 0 ? `${text} ago` : `in ${text}`;
}

/** "1.5 MB", "300.0 kB", "12 B". */
export function fmtBytes(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

/** Formats a number with a fixed count of decimals, or "–". */
export function fmtNum(v, decimals = 0) {
  return typeof v === 'number' && Number.isFinite(v) ? v.toFixed(decimals) : '–';
}

/** "87 %" from 0.87. */
export function fmtPct(v) {
  return typeof v === 'number' && Number.isFinite(v) ? `${Math.round(v * 100)} %` : '–';
}

const LEVELS = {
  good: { key: 'good', text: 'Good' },
  ventilate: { key: 'ventilate', text: 'Ventilate' },
  moderate: { key: 'ventilate', text: 'Ventilate' },
  unacceptable: { key: 'unacceptable', text: 'Unacceptable' },
  poor: { key: 'unacceptable', text: 'Unacceptable' },
};

/** The CO2 traffic light of a state: { key, text }; key "none" without a CO2 reading. */
export function co2Level(state) {
  if (!state || typeof state.co2_ppm !== 'number') return { key: 'none', text: 'No CO2 reading' };
  return LEVELS[state.co2_level] || { key: 'none', text: String(state.co2_level || 'unknown') };
}

/** A CO2 badge: symbol, word and colour. */
export function co2Badge(state) {
  const lvl = co2Level(state);
  return h('span', { class: `badge lvl-${lvl.key}`, 'data-level': lvl.key }, lvl.text);
}

/**
 * The ventilation advice of a state, or null: "Open a window in ~8 min" while still good,
 * "Ventilate now" at the ventilate level, "Ventilate now: CO2 unacceptable" above that.
 */
export function ventilationAdvice(state) {
  if (!state || typeof state.co2_ppm !== 'number') return null;
  const lvl = co2Level(state).key;
  const m = state.minutes_to_next_threshold;
  const mins = typeof m === 'number' && Number.isFinite(m) ? Math.max(1, Math.round(m)) : null;
  if (lvl === 'unacceptable') return { text: 'Ventilate now: CO2 unacceptable', urgent: true };
  if (lvl === 'ventilate') {
    return { text: mins !== null ? `Ventilate now (unacceptable in ~${mins} min)` : 'Ventilate now', urgent: true };
  }
  if (mins !== null) return { text: `Ventilate in ~${mins} min`, urgent: false };
  return null;
}

/** Whether a state carries readings (a room engine that has heard nothing has updated_ms 0). */
export function hasReadings(state) {
  return !!state && state.updated_ms > 0;
}

/** Human text of a room event. */
export function eventText(event) {
  const kind = event.kind;
  switch (kind) {
    case 'arrival': return `Occupied (${fmtPct(event.probability)} likely)`;
    case 'departure': return 'Free again';
    case 'ventilate': {
      const m = event.minutes_to_threshold;
      const ppm = fmtNum(event.co2_ppm);
      return typeof m === 'number' ? `Ventilate: ${ppm} ppm, next limit in ~${Math.max(1, Math.round(m))} min` : `Ventilate: ${ppm} ppm`;
    }
    case 'ventilated': return `Air good again (${fmtNum(event.co2_ppm)} ppm)`;
    default: return String(kind);
  }
}

/** The (ventilate, unacceptable) CO2 limits of a room's threshold profile, in ppm. */
export function co2Limits(profile) {
  switch (profile) {
    case 'strict': return [800, 1000];
    case 'above-outdoor': return [420 + 800, 420 + 1350];
    default: return [1000, 2000];
  }
}

/** Sorts rooms' floors: building name, then floor level. */
export function floorOrder(buildings, floors) {
  const bname = new Map(buildings.map((b) => [b.id, b.name]));
  return [...floors].sort((a, b) => {
    const n = (bname.get(a.building_id) || '').localeCompare(bname.get(b.building_id) || '');
    return n !== 0 ? n : a.level - b.level;
  }).map((f) => ({ ...f, building: bname.get(f.building_id) || '' }));
}
