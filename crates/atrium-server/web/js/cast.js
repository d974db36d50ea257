// asciinema v2 recordings (https://docs.asciinema.org/manual/asciicast/v2/): parsing and a
// player that feeds the events into an xterm.js terminal with their timing.

/**
 * Parses an asciicast v2 text: { header, events, skipped }. `events` are [time_s, code, data]
 * in time order; lines that are not events are counted in `skipped` (a live session's last
 * line may still be incomplete). Throws when the header is not asciicast v2.
 */
export function parseCast(text) {
  const lines = String(text).split('\n');
  let header;
  try {
    header = JSON.parse(lines[0]);
  } catch {
    throw new Error('not an asciicast recording: the first line is not JSON');
  }
  if (!header || typeof header !== 'object' || header.version !== 2) {
    throw new Error('not an asciicast v2 recording (the header has no "version": 2)');
  }
  const width = positiveInt(header.width, 80);
  const height = positiveInt(header.height, 24);
  const events = [];
  let skipped = 0;
  let last = 0;
  for (const line of lines.slice(1)) {
    if (!line.trim()) continue;
    let e;
    try {
      e = JSON.parse(line);
    } catch {
      skipped++;
      continue;
    }
    if (!Array.isArray(e) || e.length < 3 || typeof e[0] !== 'number' || !Number.isFinite(e[0])
      || typeof e[1] !== 'string' || typeof e[2] !== 'string') {
      skipped++;
      continue;
    }
    // Times never go back: a disordered line plays at the time of the one before it.
    last = Math.max(last, e[0]);
    events.push([last, e[1], e[2]]);
  }
  return { header: { ...header, width, height }, events, skipped };
}

function positiveInt(v, fallback) {
  return Number.isInteger(v) && v > 0 && v <= 1000 ? v : fallback;
}

/** "COLSxROWS" of a resize event, or null. */
export function parseSize(data) {
  const m = /^(\d{1,4})x(\d{1,4})$/.exec(String(data).trim());
  if (!m) return null;
  const cols = Number(m[1]);
  const rows = Number(m[2]);
  return cols >= 1 && cols <= 1000 && rows >= 1 && rows <= 1000 ? { cols, rows } : null;
}

/**
 * The times the events play at: the recorded times with every pause longer than
 * `idleLimit` seconds shortened to it (like asciinema's --idle-time-limit; 0 or less: none).
 */
export function playTimes(events, idleLimit) {
  const out = [];
  let prev = 0;
  let at = 0;
  for (const [t] of events) {
    const gap = t - prev;
    at += idleLimit > 0 ? Math.min(gap, idleLimit) : gap;
    prev = t;
    out.push(at);
  }
  return out;
}

/**
 * Plays a parsed recording into an xterm.js terminal. Output ("o") is written, resizes ("r")
 * resize the terminal, input ("i") and markers are not shown. `onChange()` is called when the
 * position, speed or playing state changes.
 */
export class CastPlayer {
  constructor(term, cast, { idleLimit = 2, speed = 1, onChange = () => {} } = {}) {
    this.term = term;
    this.cast = cast;
    this.speed = speed;
    this.onChange = onChange;
    this.playing = false;
    this.timer = null;
    this.setIdleLimit(idleLimit);
    this.reset();
  }

  /** Sets the idle-time cap (seconds); keeps the current event position. */
  setIdleLimit(limit) {
    this.idleLimit = limit;
    this.times = playTimes(this.cast.events, limit);
    this.duration = this.times.length ? this.times[this.times.length - 1] : 0;
    if (this.next !== undefined) {
      this.position = this.next > 0 ? this.times[this.next - 1] : 0;
      this.wallStart = performance.now();
    }
  }

  /** Back to the start: a cleared terminal at the recording's size. */
  reset() {
    this.next = 0;
    this.position = 0;
    this.term.reset();
    this.term.resize(this.cast.header.width, this.cast.header.height);
  }

  /** The position now, in play seconds. */
  now() {
    if (!this.playing) return this.position;
    return Math.min(this.duration, this.position + ((performance.now() - this.wallStart) / 1000) * this.speed);
  }

  restartClock() {
    this.position = this.now();
    this.wallStart = performance.now();
  }

  play() {
    if (this.playing) return;
    if (this.next >= this.cast.events.length) this.reset();
    this.playing = true;
    this.wallStart = performance.now();
    this.tick();
    this.onChange();
  }

  pause() {
    if (!this.playing) return;
    this.position = this.now();
    this.playing = false;
    clearTimeout(this.timer);
    this.onChange();
  }

  setSpeed(speed) {
    this.restartClock();
    this.speed = speed;
    if (this.playing) {
      clearTimeout(this.timer);
      this.tick();
    }
    this.onChange();
  }

  /** Jumps to `seconds` (play time): restarts and writes everything up to there at once. */
  seek(seconds) {
    const target = Math.max(0, Math.min(this.duration, seconds));
    clearTimeout(this.timer);
    this.reset();
    this.apply(target);
    this.position = target;
    this.wallStart = performance.now();
    if (this.playing) this.tick();
    this.onChange();
  }

  /** Plays every event due at play time `upTo`; output in one write. */
  apply(upTo) {
    let out = '';
    const events = this.cast.events;
    while (this.next < events.length && this.times[this.next] <= upTo) {
      const [, code, data] = events[this.next];
      if (code === 'o') {
        out += data;
      } else if (code === 'r') {
        const size = parseSize(data);
        if (size) {
          if (out) this.term.write(out);
          out = '';
          this.term.resize(size.cols, size.rows);
        }
      }
      this.next++;
    }
    if (out) this.term.write(out);
  }

  tick() {
    const now = this.now();
    this.apply(now);
    if (this.next >= this.cast.events.length) {
      this.position = this.duration;
      this.playing = false;
      this.onChange();
      return;
    }
    const wait = ((this.times[this.next] - now) / this.speed) * 1000;
    this.timer = setTimeout(() => {
      if (this.playing) this.tick();
    }, Math.max(0, Math.min(wait, 250)));
    this.onChange();
  }

  /** Stops playing for good. */
  dispose() {
    this.playing = false;
    clearTimeout(this.timer);
  }
}
