// Floor view: every room as a tile, updated live from the room stream.
import {
  api, boot, h, flash, roomStream, setLive, co2Badge, ventilationAdvice, hasReadings, fmtNum, fmtPct,
  fmtClock, timeEl, eventText, floorOrder,
} from './app.js';

const rooms = new Map(); // id -> { room, tile parts }
const MAX_EVENTS = 12;

function occupancyText(state) {
  if (!hasReadings(state)) return 'No readings yet';
  return state.occupied ? 'Occupied' : 'Free';
}

function tile(room) {
  const link = h('a', { href: `room.html?id=${encodeURIComponent(room.id)}` }, room.name);
  const occ = h('span', { class: 'occ' });
  const prob = h('span', { class: 'muted small' });
  const people = h('span', {});
  const barFill = h('span', {});
  const bar = h('div', { class: 'people-bar', 'aria-hidden': 'true' }, barFill);
  const co2 = h('span', {});
  const level = h('span', {});
  const advice = h('span', { class: 'advice' });
  const asof = h('span', { class: 'asof' });
  const el = h('li', { class: 'tile', 'data-room-id': room.id },
    h('h3', {}, link),
    h('div', { class: 'occ-line' }, occ, prob),
    h('div', { class: 'row' }, people),
    bar,
    h('div', { class: 'row' }, co2, level),
    advice,
    asof);
  const parts = { el, occ, prob, people, barFill, co2, level, advice, asof };
  rooms.set(room.id, { room, parts });
  update(room.id, room.state);
  return el;
}

function update(id, state) {
  const entry = rooms.get(id);
  if (!entry) return;
  const { room, parts } = entry;
  const before = parts.el.dataset.state;
  room.state = state;
  const known = hasReadings(state);
  const now = !known ? 'unknown' : state.occupied ? 'occupied' : 'free';
  parts.el.dataset.state = now;
  parts.el.dataset.co2 = known && typeof state.co2_ppm === 'number' ? String(Math.round(state.co2_ppm)) : '';
  parts.el.classList.toggle('is-occupied', now === 'occupied');
  parts.el.classList.toggle('is-unknown', now === 'unknown');
  parts.occ.textContent = occupancyText(state);
  parts.prob.textContent = known ? `${fmtPct(state.occupancy_probability)} likely occupied` : '';
  const count = known ? state.people_count : 0;
  parts.people.textContent = known ? `${count} of ${room.capacity} people` : `${room.capacity} seats`;
  const share = room.capacity > 0 ? Math.min(1, count / room.capacity) : 0;
  parts.barFill.style.width = `${Math.round(share * 100)}%`;
  parts.co2.textContent = known && typeof state.co2_ppm === 'number' ? `CO2 ${fmtNum(state.co2_ppm)} ppm` : 'CO2 –';
  parts.level.replaceChildren(co2Badge(known ? state : null));
  const advice = known ? ventilationAdvice(state) : null;
  parts.advice.textContent = advice ? advice.text : '';
  parts.advice.hidden = !advice;
  parts.advice.classList.toggle('urgent', !!advice && advice.urgent);
  parts.asof.replaceChildren(known ? h('span', {}, 'Room time ', timeEl(state.updated_ms, fmtClock(state.updated_ms))) : '');
  if (before && before !== now) {
    parts.el.classList.add('changed');
    setTimeout(() => parts.el.classList.remove('changed'), 2500);
  }
  summarize();
}

function summarize() {
  let occupied = 0;
  let people = 0;
  let air = 0;
  let known = 0;
  for (const { room } of rooms.values()) {
    const s = room.state;
    if (!hasReadings(s)) continue;
    known += 1;
    if (s.occupied) occupied += 1;
    people += s.people_count;
    if (ventilationAdvice(s)?.urgent) air += 1;
  }
  const stat = (value, label) => h('span', {}, h('strong', {}, String(value)), ' ', label);
  const parts = [
    stat(`${occupied} of ${rooms.size}`, 'rooms occupied'),
    stat(people, people === 1 ? 'person' : 'people'),
    stat(air, air === 1 ? 'room needs air' : 'rooms need air'),
  ];
  if (known < rooms.size) parts.push(stat(rooms.size - known, 'without readings'));
  document.getElementById('summary').replaceChildren(...parts);
}

function addEvent(roomId, event) {
  const entry = rooms.get(roomId);
  const list = document.getElementById('events');
  document.getElementById('no-events')?.remove();
  const name = entry ? entry.room.name : roomId;
  list.prepend(h('li', { 'data-kind': event.kind },
    timeEl(event.time_ms, fmtClock(event.time_ms)),
    h('a', { href: `room.html?id=${encodeURIComponent(roomId)}` }, name),
    h('span', {}, eventText(event))));
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

async function main() {
  await boot({ page: 'floor' });
  const [buildings, floors, list] = await Promise.all([api('/buildings'), api('/floors'), api('/rooms')]);
  const container = document.getElementById('floors');
  if (list.length === 0) {
    container.replaceChildren(h('p', { class: 'panel' }, 'No rooms yet. Rooms are created through the REST API (/api/v1/rooms).'));
    summarize();
  }
  const byFloor = new Map();
  for (const room of list) {
    if (!byFloor.has(room.floor_id)) byFloor.set(room.floor_id, []);
    byFloor.get(room.floor_id).push(room);
  }
  const ordered = floorOrder(buildings, floors);
  const known = new Set(ordered.map((f) => f.id));
  for (const id of byFloor.keys()) {
    if (!known.has(id)) ordered.push({ id, name: 'Other rooms', building: '' });
  }
  for (const floor of ordered) {
    const floorRooms = byFloor.get(floor.id);
    if (!floorRooms) continue;
    floorRooms.sort((a, b) => a.name.localeCompare(b.name));
    const titleId = `floor-${floor.id}`;
    const title = floor.building ? `${floor.building} · ${floor.name}` : floor.name;
    container.append(h('section', { class: 'floor', 'aria-labelledby': titleId },
      h('h2', { id: titleId }, title),
      h('ul', { class: 'tiles' }, floorRooms.map(tile))));
  }
  roomStream({
    onState: update,
    onEvent: addEvent,
    onStatus: setLive,
  });
}

main().catch((e) => flash(e.message, 'error'));
