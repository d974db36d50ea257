// A small SVG time-series chart: lines, areas and steps over a time axis, dashed limit
// lines, and event markers. Each chart is a <figure> with a caption, a legend and a text
// summary, so its content does not depend on seeing the drawing.

import { h, fmtClock } from './app.js';

const SVG = 'http://www.w3.org/2000/svg';
const W = 640;
const PAD = { top: 12, right: 14, bottom: 26, left: 48 };
/** A gap longer than this between two points breaks the line (no data in between). */
const GAP_MS = 5 * 60000;

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Round tick values: about `count` steps of 1, 2 or 5 times a power of ten. */
export function niceTicks(min, max, count = 4) {
  if (!(max > min)) {
    const pad = Math.abs(min) > 1 ? Math.abs(min) * 0.1 : 1;
    return niceTicks(min - pad, max + pad, count);
  }
  const raw = (max - min) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw) || raw;
  const lo = Math.floor(min / step) * step;
  const hi = Math.ceil(max / step) * step;
  const ticks = [];
  for (let v = lo; v <= hi + step / 2; v += step) ticks.push(Number(v.toFixed(10)));
  return ticks;
}

const TIME_STEPS = [5, 10, 15, 30, 60, 120, 180, 360, 720, 1440].map((m) => m * 60000);

/** Time ticks on local clock boundaries, at most about seven. */
export function timeTicks(from, to) {
  const span = to - from;
  const step = TIME_STEPS.find((st) => span / st <= 7) || TIME_STEPS[TIME_STEPS.length - 1];
  const offset = new Date(from).getTimezoneOffset() * 60000;
  let t = Math.ceil((from - offset) / step) * step + offset;
  const ticks = [];
  for (; t <= to; t += step) ticks.push(t);
  return ticks;
}

function pathOf(points, x, y, step) {
  let d = '';
  let prev = null;
  let runLength = 0;
  // A lone point still shows: a zero-length segment drawn with round caps.
  const endRun = () => {
    if (runLength === 1) d += 'h0.01';
    runLength = 0;
  };
  for (const [t, v] of points) {
    // A minute without this quantity (sensors report at their own pace) is skipped; only
    // a gap in time breaks the line.
    if (v === null || v === undefined || !Number.isFinite(v)) continue;
    const px = x(t).toFixed(1);
    const py = y(v).toFixed(1);
    if (prev === null || t - prev[0] > GAP_MS) {
      endRun();
      d += `M${px},${py}`;
    } else if (step) {
      d += `H${px}V${py}`;
    } else {
      d += `L${px},${py}`;
    }
    runLength += 1;
    prev = [t, v];
  }
  endRun();
  return d;
}

function areaOf(points, x, y, base) {
  // One closed polygon per unbroken run of points.
  let d = '';
  let run = [];
  const xy = (t, v) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`;
  const flush = () => {
    if (run.length > 1) {
      const last = run[run.length - 1][0];
      d += `M${xy(run[0][0], base)}` + run.map(([t, v]) => `L${xy(t, v)}`).join('') + `L${xy(last, base)}Z`;
    }
    run = [];
  };
  for (const p of points) {
    if (p[1] === null || p[1] === undefined || !Number.isFinite(p[1])) continue;
    if (run.length && p[0] - run[run.length - 1][0] > GAP_MS) flush();
    run.push(p);
  }
  flush();
  return d;
}

function fmtValue(v, decimals) {
  return Number.isFinite(v) ? v.toFixed(decimals) : '–';
}

/**
 * Draws a time chart. Options:
 * - title, unit, decimals: caption, unit of the values, decimals in texts
 * - from, to: the time range (unix ms)
 * - series: [{ name, cls, points: [[t, v]], kind: 'line' | 'area' | 'step' }]
 * - limits: [{ name, cls, value }] dashed horizontal lines
 * - events: [{ t, cls, label }] vertical markers
 * - yMin, yMax: fixed bounds (else from the data)
 * - height: of the drawing in SVG units (width is 640, scaled to the container)
 * Returns a <figure>.
 */
export function timeChart(opts) {
  const { title, unit = '', decimals = 0, from, to, series = [], limits = [], events = [], height = 200 } = opts;
  const id = 'c' + Math.random().toString(36).slice(2, 9);
  const values = series.flatMap((se) => se.points.map((p) => p[1]).filter((v) => Number.isFinite(v)));
  const limitValues = limits.map((l) => l.value).filter((v) => Number.isFinite(v));
  let lo = opts.yMin ?? Math.min(...values, ...limitValues);
  let hi = opts.yMax ?? Math.max(...values, ...limitValues);
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) {
    lo = 0;
    hi = 1;
  }
  const ticks = niceTicks(lo, hi);
  const tickStep = ticks.length > 1 ? ticks[1] - ticks[0] : 1;
  const tickDecimals = Number.isInteger(tickStep) ? 0 : tickStep >= 0.1 ? 1 : 2;
  const y0 = opts.yMin ?? ticks[0];
  const y1 = opts.yMax ?? ticks[ticks.length - 1];
  const plotW = W - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + ((t - from) / (to - from)) * plotW;
  const y = (v) => PAD.top + (1 - (v - y0) / (y1 - y0 || 1)) * plotH;

  const grid = s('g', { class: 'grid' });
  const axis = s('g', { class: 'axis' });
  for (const v of ticks) {
    if (v < y0 || v > y1) continue;
    grid.append(s('line', { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    axis.append(s('text', { x: PAD.left - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmtValue(v, tickDecimals)));
  }
  for (const t of timeTicks(from, to)) {
    grid.append(s('line', { x1: x(t), x2: x(t), y1: PAD.top, y2: PAD.top + plotH }));
    axis.append(s('text', { x: x(t), y: height - 8, 'text-anchor': 'middle' }, fmtClock(t)));
  }
  axis.append(s('line', { x1: PAD.left, x2: W - PAD.right, y1: PAD.top + plotH, y2: PAD.top + plotH }));
  axis.append(s('line', { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: PAD.top + plotH }));

  const titleEl = s('title', { id: `${id}-t` }, title);
  const descEl = s('desc', { id: `${id}-d` });
  const svg = s('svg', {
    class: 'chart', viewBox: `0 0 ${W} ${height}`, role: 'img', 'aria-labelledby': `${id}-t ${id}-d`,
    preserveAspectRatio: 'xMidYMid meet',
  }, titleEl, descEl, grid, axis);

  const clip = `${id}-clip`;
  svg.append(s('defs', {}, s('clipPath', { id: clip }, s('rect', { x: PAD.left, y: PAD.top, width: plotW, height: plotH }))));
  const plot = s('g', { 'clip-path': `url(#${clip})` });
  svg.append(plot);
  for (const l of limits) {
    if (!Number.isFinite(l.value) || l.value < y0 || l.value > y1) continue;
    plot.append(s('line', { class: `limit ${l.cls || ''}`, x1: PAD.left, x2: W - PAD.right, y1: y(l.value), y2: y(l.value) },
      s('title', {}, `${l.name}: ${fmtValue(l.value, decimals)} ${unit}`)));
  }
  for (const se of series) {
    const base = Math.max(y0, Math.min(0, y1));
    if (se.kind === 'area') {
      plot.append(s('path', { class: `area ${se.cls || ''}`, d: areaOf(se.points, x, y, base) }));
      plot.append(s('path', { class: `line ${se.cls || ''}`, d: pathOf(se.points, x, y, false) }));
    } else {
      plot.append(s('path', { class: `line ${se.cls || ''}`, d: pathOf(se.points, x, y, se.kind === 'step') }));
    }
  }
  for (const ev of events) {
    if (ev.t < from || ev.t > to) continue;
    plot.append(s('g', { class: `ev ${ev.cls || ''}` },
      s('line', { x1: x(ev.t), x2: x(ev.t), y1: PAD.top, y2: PAD.top + plotH }),
      s('title', {}, `${fmtClock(ev.t)} ${ev.label}`)));
  }
  if (values.length === 0) {
    svg.append(s('text', { class: 'nodata', x: PAD.left + plotW / 2, y: PAD.top + plotH / 2, 'text-anchor': 'middle' }, 'No data in this range'));
  }

  const summaries = series.map((se) => {
    const vs = se.points.map((p) => p[1]).filter((v) => Number.isFinite(v));
    if (vs.length === 0) return `${se.name}: no data`;
    const last = vs[vs.length - 1];
    return `${se.name}: latest ${fmtValue(last, decimals)} ${unit}, min ${fmtValue(Math.min(...vs), decimals)}, max ${fmtValue(Math.max(...vs), decimals)}`.replace(/ {2,}/g, ' ');
  });
  const eventCount = events.filter((e) => e.t >= from && e.t <= to).length;
  const summary = summaries.join('; ') + (opts.events ? `; ${eventCount} event${eventCount === 1 ? '' : 's'}` : '') +
    ` (${fmtClock(from)}–${fmtClock(to)}, room time)`;
  descEl.textContent = summary;

  const legendItems = [
    ...series.map((se) => h('li', { class: se.cls }, se.name)),
    ...limits.map((l) => h('li', { class: l.cls }, `${l.name} (${fmtValue(l.value, decimals)} ${unit})`.replace(' )', ')'))),
    ...(opts.legendEvents || []).map((e) => h('li', { class: e.cls }, e.name)),
  ];
  return h('figure', { class: 'chart', 'data-chart': opts.key || '' },
    h('figcaption', {}, title),
    svg,
    legendItems.length ? h('ul', { class: 'legend', 'aria-hidden': 'true' }, legendItems) : null,
    h('p', { class: 'chart-summary' }, summary));
}
