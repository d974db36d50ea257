// Kiosk view: one room on a wall display, readable from the door.
import { api, boot, flash, param, roomStream, setLive, co2Level, ventilationAdvice, hasReadings, fmtNum, fmtClock } from './app.js';

const id = param('id');
let room = null;

function setCard(el, kind) {
  el.className = `k-card k-${kind}`;
}

function draw() {
  const st = room.state;
  const known = hasReadings(st);
  const occCard = document.getElementById('occ-card');
  const airCard = document.getElementById('air-card');
  document.getElementById('occ').textContent = known ? (st.occupied ? 'Occupied' : 'Free') : 'No data';
  occCard.dataset.state = known ? (st.occupied ? 'occupied' : 'free') : 'unknown';
  setCard(occCard, known ? (st.occupied ? 'occupied' : 'free') : 'unknown');
  document.getElementById('people').textContent = known
    ? `${st.people_count} of ${room.capacity} people` : `${room.capacity} seats`;
  const lvl = co2Level(known ? st : null);
  setCard(airCard, lvl.key === 'none' ? 'unknown' : lvl.key);
  airCard.dataset.level = lvl.key;
  document.getElementById('air').textContent = lvl.key === 'none' ? 'No CO2 data' : lvl.text;
  document.getElementById('co2').textContent = known && typeof st.co2_ppm === 'number' ? `CO2 ${fmtNum(st.co2_ppm)} ppm` : '';
  const advice = known ? ventilationAdvice(st) : null;
  document.getElementById('advice').textContent = advice ? advice.text.replace(/^Ventilate in/, 'Open a window in') : '';
  document.getElementById('clock').textContent = known ? fmtClock(st.updated_ms) : '';
}

async function main() {
  await boot({ page: 'kiosk', nav: false });
  if (!id) {
    flash('No room given: open the kiosk view from a room page.', 'error');
    return;
  }
  room = await api(`/rooms/${encodeURIComponent(id)}`);
  document.title = `${room.name} · Atrium`;
  document.getElementById('room-name').textContent = room.name;
  document.getElementById('room-link').href = `room.html?id=${encodeURIComponent(id)}`;
  draw();
  roomStream({
    onState: (rid, state) => {
      if (rid !== id) return;
      room.state = state;
      draw();
    },
    onStatus: setLive,
  });
}

main().catch((e) => flash(e.message, 'error'));
