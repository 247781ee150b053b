// memvisor dashboard: polls the daemon's API once a second and redraws.
"use strict";

const state = { token: null, lastEvent: 0, vmSeries: new Map(), info: null, tick: 0 };
const WINDOW_S = 300;
const $ = sel => document.querySelector(sel);

function readToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("memvisor-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // keep it out of history
  }
  return sessionStorage.getItem("memvisor-token");
}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + state.token } });
  if (r.status === 401) { $("#login").hidden = false; throw new Error("the API refused the token"); }
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return e;
}

const size = n => (n === null || n === undefined ? "–" : formatBytes(n));
const clock = wall => new Date(wall * 1000).toLocaleTimeString();
const num = (v, cls = "num") => el("td", { class: cls }, v);

const hostChart = new LineChart($("#host-chart"), { windowSeconds: WINDOW_S, yMin: 0 });
const vmChart = new LineChart($("#vm-chart"), { windowSeconds: WINDOW_S, yMin: 0 });

function renderHost(history) {
  if (!history.length) return;
  const now = history[history.length - 1];
  const xs = r => r.wall;
  // free memory against the state thresholds (the y axis fits them, not the whole host)
  hostChart.setSeries([
    { name: "free", color: "#2f7ed8", points: history.map(r => [xs(r), r.free]) },
  ]);
  const th = (state.info && state.info.thresholds) || {};
  const colors = { high: "#2e8b57", soft: "#d4a017", hard: "#e06c00", low: "#c0392b" };
  hostChart.setThresholds(Object.entries(th).map(([k, v]) => ({ name: `${k} ≥ ${formatBytes(v)}`, value: v, color: colors[k] })));
  hostChart.draw();
  const st = $("#host-state");
  st.textContent = now.state || "state ?";
  st.className = "state " + (now.state || "");
  $("#host-summary").textContent =
    `free ${formatBytes(now.free)} of ${formatBytes(now.total)} (${(100 * now.free / now.total).toFixed(1)} %) · KSM sharing ${now.ksm_pages_sharing} pages · tick ${now.id}` +
    (now.duration ? ` (${(now.duration * 1000).toFixed(1)} ms)` : "");
}

function vmBar(v) {
  const scale = 260 / Math.max(v.memory, 1);
  const w = b => Math.max(0, b * scale);
  const parts = [["shared", v.shared], ["private", v.consumed - v.shared], ["ballooned", v.ballooned], ["swapped", v.swapped]];
  const bar = el("div", { class: "bar", title: `consumed ${size(v.consumed)} of ${size(v.memory)}` });
  let x = 0;
  for (const [cls, bytes] of parts) {
    bar.append(el("span", { class: cls, style: `left:${x}px;width:${w(bytes)}px` }));
    x += w(bytes);
  }
  if (v.entitlement !== null) bar.append(el("span", { class: "mark ent", style: `left:${w(v.entitlement)}px` }));
  if (v.reservation) bar.append(el("span", { class: "mark res", style: `left:${w(v.reservation)}px` }));
  return bar;
}

function renderVMs(vms) {
  $("#vm-count").textContent = `(${vms.length})`;
  const body = $("#vm-table tbody");
  body.replaceChildren(...vms.map(v => el("tr", { "data-vm": v.vm },
    el("td", {}, v.vm), el("td", {}, v.power), el("td", {}, v.pool ?? "–"), num(size(v.memory)),
    el("td", {}, vmBar(v)), num(size(v.consumed)), num(size(v.shared)), num(size(v.ballooned)),
    num(size(v.swapped)), num(size(v.entitlement)), num(size(v.reservation)),
    num(v.active_fraction === null ? "–" : (100 * v.active_fraction).toFixed(0) + " %"))));
  for (const v of vms) {  // client-side history of consumed per VM for the second chart
    const pts = state.vmSeries.get(v.vm) || [];
    if (!pts.length || pts[pts.length - 1][0] !== v.wall) pts.push([v.wall, v.consumed]);
    while (pts.length && pts[0][0] < v.wall - WINDOW_S) pts.shift();
    state.vmSeries.set(v.vm, pts);
  }
  const top = [...vms].sort((a, b) => b.consumed - a.consumed).slice(0, 8);
  vmChart.setSeries(top.map(v => ({ name: v.vm, points: state.vmSeries.get(v.vm) })));
  vmChart.draw();
}

function poolNode(p) {
  const facts = [];
  for (const k of ["memory", "reservation", "limit", "reserved", "unreserved", "borrowed"]) {
    if (p[k] !== undefined) facts.push(`${k} ${p[k] === null ? "unlimited" : formatBytes(p[k])}`);
  }
  if (p.shares !== undefined) facts.push(`shares ${p.shares}`);
  if (p.expandable !== undefined) facts.push(p.expandable ? "expandable" : "fixed");
  if (p.power !== undefined) facts.push(p.power);
  const li = el("li", { "data-pool": p.name },
    el("span", { class: p.kind === "vm" ? "" : "pool-name" }, (p.kind === "vm" ? "▪ " : "▾ ") + p.name),
    " ", el("span", { class: "muted" }, facts.join(" · ")));
  if (p.children && p.children.length) li.append(el("ul", { class: "pools" }, ...p.children.map(poolNode)));
  return li;
}

function renderPools(tree) {
  $("#pool-tree").replaceChildren(el("ul", { class: "pools" }, poolNode(tree)));
}

function renderDecisions(rows) {
  $("#decision-table tbody").replaceChildren(...rows.map(d => {
    const outcome = d.ok === null ? el("span", { class: "pending" }, "pending")
      : el("span", { class: d.ok ? "ok" : "failed" }, d.ok ? `ok, ${formatBytes(d.achieved)}` : `failed: ${d.message}`);
    const a = { ...d.action }; delete a.kind; delete a.vm;
    const args = Object.entries(a).map(([k, v]) => `${k}=${typeof v === "number" && v > 4096 ? formatBytes(v) : v}`).join(" ");
    return el("tr", {}, el("td", {}, clock(d.wall)), el("td", {}, d.vm ?? "host"),
      el("td", {}, `${d.kind} ${args}`), el("td", { class: "reason" }, d.reason), el("td", {}, outcome));
  }));
}

function renderHits(rows) {
  const body = $("#hit-table tbody");
  if (!rows.length) { body.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no hits recorded"))); return; }
  body.replaceChildren(...rows.map(h => el("tr", {}, el("td", {}, clock(h.wall)), el("td", {}, h.vm),
    el("td", {}, h.symbol), el("td", {}, h.address), el("td", { class: "reason" }, JSON.stringify(h.detail)))));
}

function addEvents(rows) {
  const body = $("#event-table tbody");
  for (const e of rows) {
    body.prepend(el("tr", {}, el("td", {}, clock(e.wall)), el("td", {}, e.kind), el("td", { class: "reason" }, e.message)));
    state.lastEvent = Math.max(state.lastEvent, e.id);
  }
  while (body.children.length > 100) body.lastChild.remove();
}

async function refresh() {
  if (!state.info || state.tick % 10 === 0) {
    state.info = await api("/api/v1/info");
    $("#daemon-info").textContent = `${state.info.backend} backend · ${state.info.policy} policy · loop ${state.info.interval}s`;
  }
  const [history, vms, decisions, hits, events] = await Promise.all([
    api(`/api/v1/host/history?seconds=${WINDOW_S}&points=300`), api("/api/v1/vms"),
    api("/api/v1/decisions?limit=30"), api("/api/v1/hits?limit=20"),
    api(`/api/v1/events?after=${state.lastEvent}&limit=200`),
  ]);
  renderHost(history); renderVMs(vms); renderDecisions(decisions); renderHits(hits); addEvents(events);
  if (state.tick % 5 === 0) renderPools(await api("/api/v1/pools"));
  state.tick++;
  document.body.dataset.refreshes = String(state.tick);
}

async function loop() {
  try { await refresh(); $("#error").hidden = true; }
  catch (e) { $("#error").hidden = false; $("#error").textContent = String(e.message || e); }
  setTimeout(loop, 1000);
}

$("#login-form").addEventListener("submit", ev => {
  ev.preventDefault();
  sessionStorage.setItem("memvisor-token", $("#token-input").value.trim());
  location.reload();
});
state.token = readToken();
if (!state.token) $("#login").hidden = false; else loop();
