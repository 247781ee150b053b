// memvisor's small line chart on a <canvas>: time on x, bytes (or any number) on y,
// several series, horizontal threshold lines. No dependencies (the dashboard is offline).
"use strict";

const PALETTE = ["#2f7ed8", "#e4572e", "#17a398", "#f3a712", "#8e44ad", "#5c6b73",
                 "#c0392b", "#27ae60", "#d35400", "#34495e"];

function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Math.abs(n), i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  const text = v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1);
  return (n < 0 ? "-" : "") + text + " " + units[i];
}

class LineChart {
  constructor(canvas, opts = {}) {
    this.canvas = canvas;
    this.series = [];       // [{name, color, points: [[x, y], ...]}]
    this.thresholds = [];   // [{name, value, color}]
    this.formatY = opts.formatY || formatBytes;
    this.windowSeconds = opts.windowSeconds || 300;
    this.yMin = opts.yMin;  // fixed minimum (e.g. 0) or undefined for auto
  }

  setSeries(series) {
    this.series = series.map((s, i) => ({ color: PALETTE[i % PALETTE.length], ...s }));
  }

  setThresholds(thresholds) { this.thresholds = thresholds; }

  _bounds() {
    let xMin = Infinity, xMax = -Infinity, yMin = Infinity, yMax = -Infinity;
    for (const s of this.series) for (const [x, y] of s.points) {
      xMin = Math.min(xMin, x); xMax = Math.max(xMax, x);
      yMin = Math.min(yMin, y); yMax = Math.max(yMax, y);
    }
    for (const t of this.thresholds) { yMin = Math.min(yMin, t.value); yMax = Math.max(yMax, t.value); }
    if (!Number.isFinite(xMax)) return null;
    if (this.yMin !== undefined) yMin = this.yMin;
    if (yMax <= yMin) yMax = yMin + 1;
    const pad = (yMax - yMin) * 0.08;
    // the window, or less while there is less history (at least 30 s, so one point is visible)
    const span = Math.min(this.windowSeconds, Math.max(30, xMax - xMin));
    return { xMin: xMax - span, xMax, yMin: this.yMin !== undefined ? yMin : yMin - pad, yMax: yMax + pad };
  }

  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.font = "11px system-ui, sans-serif";
    const b = this._bounds();
    const left = 70, right = 110, top = 10, bottom = 22;
    const pw = w - left - right, ph = h - top - bottom;
    g.strokeStyle = "#ccd"; g.strokeRect(left, top, pw, ph);
    if (!b) { g.fillStyle = "#889"; g.fillText("waiting for data…", left + 10, top + 20); return; }
    const X = x => left + (x - b.xMin) / (b.xMax - b.xMin) * pw;
    const Y = y => top + ph - (y - b.yMin) / (b.yMax - b.yMin) * ph;
    g.fillStyle = "#556";
    for (let i = 0; i <= 4; i++) {  // y grid and labels
      const v = b.yMin + (b.yMax - b.yMin) * i / 4, y = Y(v);
      g.strokeStyle = "#eef"; g.beginPath(); g.moveTo(left, y); g.lineTo(left + pw, y); g.stroke();
      g.fillText(this.formatY(v), 4, y + 4);
    }
    for (let i = 0; i <= 5; i++) {  // x labels: seconds ago
      const x = b.xMin + (b.xMax - b.xMin) * i / 5;
      const ago = Math.round(b.xMax - x);
      g.fillText(ago === 0 ? "now" : `-${ago}s`, X(x) - 12, h - 6);
    }
    let labelY = Infinity;  // threshold labels from the bottom up, never overlapping
    for (const t of [...this.thresholds].sort((a, b) => a.value - b.value)) {
      const y = Y(t.value);
      g.strokeStyle = t.color || "#999"; g.setLineDash([5, 4]);
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + pw, y); g.stroke(); g.setLineDash([]);
      labelY = Math.min(y + 4, labelY - 13);
      g.fillStyle = t.color || "#999"; g.fillText(t.name, left + pw + 4, labelY);
    }
    g.save(); g.beginPath(); g.rect(left, top, pw, ph); g.clip();
    for (const s of this.series) {
      g.strokeStyle = s.color; g.lineWidth = 2; g.beginPath();
      s.points.forEach(([x, y], i) => (i ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y))));
      g.stroke();
    }
    g.restore(); g.lineWidth = 1;
    this.series.slice(0, 10).forEach((s, i) => {  // legend, top right
      g.fillStyle = s.color; g.fillRect(left + pw + 4, top + 14 * i + 4, 10, 3);
      g.fillStyle = "#334"; g.fillText(s.name.slice(0, 14), left + pw + 18, top + 14 * i + 9);
    });
    c.dataset.points = String(this.series.reduce((n, s) => n + s.points.length, 0));
    c.dataset.lastX = String(b.xMax);
  }
}

window.LineChart = LineChart;
window.formatBytes = formatBytes;
