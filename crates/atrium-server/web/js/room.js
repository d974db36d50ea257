// Room page: live state, charts of the last hours (up to the room's own latest reading,
// which runs ahead of the wall clock in a time-compressed demo), events, utilization.
import {
  api, boot, h, flash, param, roomStream, setLive, co2Badge, ventilationAdvice, hasReadings, fmtNum,
  fmtPct, fmtClock, fmtDateTime, timeEl, eventText, co2Limits, floorOrder,
} from './app.js';
import { timeChart } from './chart.js';

const HOUR = 3600000;
const RELOAD_MS = 20000;
const id = param('id');
let room = null;
let hours = 6;
let lastLoad = 0;
let reloadTimer = null;

function stat(label, value, extra) {
  return h('div', { class: 'stat' }, h('span', { class: 'label' }, label), h('span', { class: 'value' }, value), extra || null);
}

function drawNow() {
  const st = room.state;
  const known = hasReadings(st);
  const advice = known ? ventilationAdvice(st) : null;
  const ach = st && typeof st.air_changes_per_hour === 'number'
    ? `${fmtNum(st.air_changes_per_hour, 1)} per hour` : 'not learnt yet';
  document.getElementById('now').replaceChildren(
    stat('Occupancy', known ? (st.occupied ? 'Occupied' : 'Free') : 'No readings yet',
      known ? h('span', { class: 'small muted' }, `${fmtPct(st.occupancy_probability)} likely occupied`) : null),
    stat('People', known ? `${st.people_count} of ${room.capacity}` : `${room.capacity} seats`,
      known ? h('span', { class: 'small muted' }, `estimate ${fmtNum(st.people_estimate, 1)}`) : null),
    stat('CO2', known && typeof st.co2_ppm === 'number' ? `${fmtNum(st.co2_ppm)} ppm` : '–', co2Badge(known ? st : null)),
    stat('Ventilation', advice ? advice.text : known ? 'Nothing to do' : '–'),
    stat('Air change rate', ach, h('span', { class: 'small muted' }, 'learnt from CO2 decay')),
    stat('Room time', known ? fmtClock(st.updated_ms) : '–', known ? h('span', { class: 'small muted' }, fmtDateTime(st.updated_ms)) : null));
}

function rangeEnd() {
  return hasReadings(room.state) ? room.state.updated_ms + 60000 : Date.now();
}

async function loadHistory() {
  lastLoad = Date.now();
  const to = rangeEnd();
  const from = to - hours * HOUR;
  const q = `?from=${Math.floor(from)}&to=${Math.ceil(to)}`;
  const base = `/rooms/${encodeURIComponent(id)}`;
  const [minutes, events, util] = await Promise.all([
    api(`${base}/history${q}`), api(`${base}/events${q}`), api(`${base}/utilization${q}`),
  ]);
  document.getElementById('range-text').textContent = `${fmtDateTime(from)} – ${fmtClock(to)} (room time)`;
  const pts = (f) => minutes.map((m) => [m.minute_ms, f(m)]);
  const [ventilate, unacceptable] = co2Limits(room.profile);
  const evMarks = events.map((e) => ({ t: e.time_ms, cls: `ev-${e.kind}`, label: eventText(e) }));
  const legendEvents = [
    { cls: 'ev-arrival', name: 'arrival' }, { cls: 'ev-departure', name: 'departure' },
    { cls: 'ev-ventilate', name: 'ventilate' }, { cls: 'ev-ventilated', name: 'ventilated' },
  ];
  const charts = [
    timeChart({
      key: 'co2', title: 'CO2', unit: 'ppm', from, to, height: 220,
      series: [{ name: 'CO2', cls: 's-co2', points: pts((m) => m.co2_ppm) }],
      limits: [
        { name: 'ventilate', cls: 'limit-ventilate', value: ventilate },
        { name: 'unacceptable', cls: 'limit-unacceptable', value: unacceptable },
      ],
      events: evMarks, legendEvents,
    }),
    timeChart({
      key: 'occupancy', title: 'Occupancy probability', unit: '%', from, to, yMin: 0, yMax: 100,
      series: [{ name: 'probability', cls: 's-prob', kind: 'area', points: pts((m) => m.occupancy_probability * 100) }],
      events: evMarks.filter((e) => e.cls === 'ev-arrival' || e.cls === 'ev-departure'),
      legendEvents: legendEvents.slice(0, 2),
    }),
    timeChart({
      key: 'people', title: 'People', unit: 'people', decimals: 1, from, to, yMin: 0,
      series: [{ name: 'people', cls: 's-people', kind: 'step', points: pts((m) => m.people) }],
      limits: [{ name: 'capacity', cls: 'limit-capacity', value: room.capacity }],
    }),
    timeChart({
      key: 'temperature', title: 'Temperature', unit: '°C', decimals: 1, from, to,
      series: [{ name: 'temperature', cls: 's-temp', points: pts((m) => m.temperature_c) }],
    }),
    timeChart({
      key: 'humidity', title: 'Relative humidity', unit: '%', decimals: 0, from, to,
      series: [{ name: 'humidity', cls: 's-rh', points: pts((m) => m.humidity_pct) }],
    }),
  ];
  document.getElementById('charts').replaceChildren(...charts);
  const usedHours = util.hours.length;
  const meanLoad = usedHours ? util.hours.reduce((a, x) => a + x.people_per_capacity * x.minutes, 0) / Math.max(1, util.minutes) : 0;
  document.getElementById('utilization').replaceChildren(h('p', { class: 'summary' },
    h('span', {}, h('strong', {}, fmtPct(util.occupied_share)), ' of the time occupied'),
    h('span', {}, h('strong', {}, fmtPct(meanLoad)), ' of the seats used on average'),
    h('span', {}, h('strong', {}, String(util.minutes)), ' minutes with data')));
  const evBox = document.getElementById('events');
  if (events.length === 0) {
    evBox.replaceChildren(h('p', { class: 'muted' }, 'No events in this range.'));
  } else {
    const rows = [...events].reverse().map((e) => h('tr', { 'data-kind': e.kind },
      h('td', {}, timeEl(e.time_ms, fmtClock(e.time_ms))), h('td', {}, e.kind), h('td', {}, eventText({ kind: e.kind, ...e.detail }))));
    evBox.replaceChildren(h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Time'), h('th', { scope: 'col' }, 'Event'), h('th', { scope: 'col' }, 'Details'))),
      h('tbody', {}, rows))));
  }
}

function scheduleReload() {
  if (reloadTimer) return;
  const wait = Math.max(0, RELOAD_MS - (Date.now() - lastLoad));
  reloadTimer = setTimeout(() => {
    reloadTimer = null;
    loadHistory().catch((e) => flash(e.message, 'error'));
  }, wait);
}

async function main() {
  await boot({ page: 'room' });
  if (!id) {
    flash('No room given: open a room from the floor view.', 'error');
    return;
  }
  const [r, buildings, floors] = await Promise.all([api(`/rooms/${encodeURIComponent(id)}`), api('/buildings'), api('/floors')]);
  room = r;
  document.title = `${room.name} · Atrium`;
  document.getElementById('room-name').textContent = room.name;
  const floor = floorOrder(buildings, floors).find((f) => f.id === room.floor_id);
  document.getElementById('room-meta').textContent = [
    floor ? `${floor.building} · ${floor.name}` : null,
    `${room.capacity} seats`, `${fmtNum(room.volume_m3)} m³`, `CO2 profile ${room.profile}`,
  ].filter(Boolean).join(' · ');
  document.getElementById('kiosk-link').href = `kiosk.html?id=${encodeURIComponent(id)}`;
  for (const b of document.querySelectorAll('#ranges button')) {
    b.addEventListener('click', () => {
      hours = Number(b.dataset.hours);
      for (const o of document.querySelectorAll('#ranges button')) o.setAttribute('aria-pressed', String(o === b));
      loadHistory().catch((e) => flash(e.message, 'error'));
    });
  }
  drawNow();
  await loadHistory();
  // New history minutes appear even when the state stays the same.
  setInterval(scheduleReload, RELOAD_MS);
  roomStream({
    onState: (rid, state) => {
      if (rid !== id) return;
      room.state = state;
      drawNow();
      scheduleReload();
    },
    onEvent: (rid) => {
      if (rid === id) scheduleReload();
    },
    onStatus: setLive,
  });
}

main().catch((e) => flash(e.message, 'error'));
