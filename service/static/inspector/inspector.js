// The inspector page: one request scored by every serving variant, side by side, with the
// behaviors stage 1 retrieved for each candidate and the user's sequence on a timeline.
// Plain browser JS without dependencies; it only calls the service's public JSON API.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name, never fetched
const PALETTE = ["#1f77b4", "#e8710a", "#2ca02c", "#9467bd", "#d62728", "#8c564b"];
const ITEM_ID = /^\d{1,19}$/;
const MAX_DRAWN_EVENTS = 10000; // the timeline draws at most this many of the newest behaviors
const SUGGESTED = 8;

const page = { models: [], exampleItems: [], colors: new Map(), last: null, selected: null };

// -- small DOM helpers --------------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, String(value));
  }
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function row(cellTag, values) {
  const tr = el("tr");
  for (const value of values) {
    tr.append(value instanceof Node ? el(cellTag, {}, value) : el(cellTag, { text: String(value) }));
  }
  return tr;
}

function colorOf(variant) {
  return page.colors.get(variant) || "#666";
}

function swatch(variant) {
  const span = el("span", { class: "variant", text: variant });
  span.style.setProperty("--variant", colorOf(variant));
  return span;
}

function bar(fraction, color) {
  const outer = el("span", { class: "bar" });
  const inner = el("span");
  inner.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  if (color) inner.style.background = color;
  outer.append(inner);
  return outer;
}

function setStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.className = isError ? "error" : "muted";
}

// -- formatting ---------------------------------------------------------------------------------

function utc(ts, withTime = true) {
  const iso = new Date(ts * 1000).toISOString();
  return withTime ? iso.slice(0, 16).replace("T", " ") : iso.slice(0, 10);
}

function age(seconds) {
  const s = Math.max(0, seconds);
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 2 * 86400) return `${(s / 3600).toFixed(1)} h`;
  if (s < 2 * 365 * 86400) return `${(s / 86400).toFixed(1)} d`;
  return `${(s / (365.25 * 86400)).toFixed(1)} y`;
}

function serverTiming(header) {
  const parts = (header || "")
    .split(",")
    .map((part) => part.trim().match(/^([\w-]+);dur=([\d.]+)/))
    .filter(Boolean);
  return parts.map((m) => `${m[1]} ${Number(m[2]).toFixed(2)} ms`).join(" · ");
}

// -- API ------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    // problem+json: title and detail say what went wrong
    const what = body && body.title ? body.title + (body.detail ? `: ${body.detail}` : "") : text.slice(0, 200);
    throw new Error(`${options.method || "GET"} /${path.split("?")[0]}: ${response.status} ${what}`);
  }
  return { body, headers: response.headers };
}

function sequencePath(user, limit) {
  return `v1/users/${encodeURIComponent(user)}/sequence?limit=${limit}`;
}

// -- models and examples ------------------------------------------------------------------------

async function loadModels() {
  const { body } = await api("v1/models");
  page.models = body.variants;
  page.models.forEach((m, i) => page.colors.set(m.variant, PALETTE[i % PALETTE.length]));
  const list = $("model-list");
  list.classList.remove("muted");
  if (!body.variants.length) {
    list.textContent = "No variant is loaded.";
    return;
  }
  const table = el("table", { class: "models" });
  const header = [
    "variant", "version", "model", "attention dim", "top-K", "search depth", "train window", "traffic", "test AUC",
  ];
  table.append(el("thead", {}, row("th", [...header, "execution providers"])));
  const tbody = el("tbody");
  for (const m of body.variants) {
    const auc = typeof m.metrics.auc === "number" ? m.metrics.auc.toFixed(4) : "n/a";
    tbody.append(
      row("td", [
        swatch(m.variant), m.version, m.model, m.dims.attention, m.top_k, m.search_depth, m.max_seq_len,
        `${(m.weight * 100).toFixed(0)} %`, auc, m.execution_providers.join(", "),
      ]),
    );
  }
  table.append(tbody);
  list.replaceChildren(table, el("p", { class: "muted", text: `Stage 1 runs on FAISS ${body.device.faiss_device}.` }));
}

async function loadExamples() {
  const { body } = await api("inspector/examples");
  page.exampleItems = body.items.map(String);
  const note = $("examples-note");
  if (!body.users.length) {
    note.textContent =
      "No example users: the service can list users only when it loaded a dataset at start-up " +
      "(dare-serve serve --data). Type any user id.";
    return;
  }
  note.textContent = `Example users from ${body.users_source}, with their stored behaviors:`;
  const list = $("example-user-list");
  const datalist = $("example-users");
  for (const user of body.users) {
    datalist.append(el("option", { value: user.user_id, text: `${user.sequence_length} behaviors` }));
    const chip = el("button", { type: "button", class: "chip", "data-user": user.user_id });
    chip.append(user.user_id, el("span", { class: "muted", text: ` ${user.sequence_length}` }));
    chip.addEventListener("click", () => pickUser(user.user_id));
    list.append(chip);
  }
}

async function pickUser(user) {
  $("user-id").value = user;
  try {
    await suggest();
  } catch (error) {
    setStatus(error.message, true);
  }
}

// The user's most recent distinct items (which a ranker should like) plus other known items.
async function suggest() {
  const user = $("user-id").value.trim();
  if (!user) {
    setStatus("Enter a user id first.", true);
    return;
  }
  const { body } = await api(sequencePath(user, 200));
  const recent = [];
  for (let i = body.events.length - 1; i >= 0 && recent.length < SUGGESTED / 2; i--) {
    const id = String(body.events[i].item_id);
    if (!recent.includes(id)) recent.push(id);
  }
  const others = page.exampleItems.filter((id) => !recent.includes(id)).slice(0, SUGGESTED - recent.length);
  $("candidates").value = [...recent, ...others].join(", ");
  setStatus(`Suggested: the user's ${recent.length} most recent items and ${others.length} other known items.`);
}

// -- scoring ------------------------------------------------------------------------------------

function parseCandidates(text) {
  const ids = text.split(/[\s,;]+/).filter(Boolean);
  const bad = ids.filter((id) => !ITEM_ID.test(id));
  if (bad.length) throw new Error(`not item ids (non-negative integers): ${bad.slice(0, 5).join(", ")}`);
  if (!ids.length) throw new Error("enter at least one candidate item id");
  return ids;
}

async function scoreAll(event) {
  if (event) event.preventDefault();
  const user = $("user-id").value.trim();
  let candidates;
  try {
    if (!user) throw new Error("enter a user id");
    candidates = parseCandidates($("candidates").value);
    if (!page.models.length) await loadModels();
    if (!page.models.length) throw new Error("no variant is loaded");
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  // One reference time for every variant, so the comparison differs only by the model.
  const asOf = Math.floor(Date.now() / 1000);
  // Ids go into the body verbatim: JSON numbers above 2^53 would lose digits in a JS number.
  const body =
    `{"user_id":${JSON.stringify(user)},"candidates":[${candidates.join(",")}],` +
    `"explain":true,"timestamp":${asOf}}`;
  const limit = Math.min(MAX_DRAWN_EVENTS, Math.max(1, ...page.models.map((m) => m.search_depth)));
  setStatus("Scoring…");
  $("score").disabled = true;
  try {
    const scoring = page.models.map((m) =>
      api("v1/score", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Experiment": m.variant },
        body,
      }).then((r) => ({ variant: m.variant, model: m, body: r.body, timing: r.headers.get("Server-Timing") })),
    );
    const [sequence, ...results] = await Promise.all([api(sequencePath(user, limit)).then((r) => r.body), ...scoring]);
    page.last = { user, candidates, asOf, sequence, results };
    page.selected = null;
    render();
    const query = new URLSearchParams({ user, candidates: candidates.join(",") });
    history.replaceState(null, "", `?${query}`);
    setStatus(`Scored ${candidates.length} candidates for ${user} with ${results.length} variants.`);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("score").disabled = false;
  }
}

function rankOrder(result, n) {
  const scores = result.body.scores;
  return [...Array(n).keys()].sort((a, b) => scores[b] - scores[a] || a - b);
}

function render() {
  const { user, asOf } = page.last;
  const results = $("results");
  results.hidden = false;
  results.dataset.user = user;
  results.dataset.asOf = String(asOf);
  $("as-of").textContent = `${utc(asOf)} UTC (timestamp ${asOf})`;
  renderRankings();
  renderExplain();
  renderTimeline();
  select(0, false);
}

function renderRankings() {
  const { candidates, results } = page.last;
  const top = Math.max(...results.flatMap((r) => r.body.scores));
  const container = $("rankings");
  container.replaceChildren();
  for (const result of results) {
    const b = result.body;
    const card = el("div", { class: "ranking", "data-variant": result.variant, "data-version": b.model_version });
    card.append(el("h3", {}, swatch(result.variant), ` version ${b.model_version}`));
    const user = `${b.user.sequence_length} behaviors read · FM embedding ${b.user.fm_embedding}`;
    const cold = b.user.cold_start ? " · cold start" : "";
    card.append(el("p", { class: "muted", text: `${user}${cold} · ${b.unknown_items} unknown items` }));
    card.append(el("p", { class: "muted small", text: serverTiming(result.timing) }));
    const table = el("table", { class: "rank" });
    table.append(el("thead", {}, row("th", ["#", "item", "score", ""])));
    const tbody = el("tbody");
    rankOrder(result, candidates.length).forEach((i, rank) => {
      const score = b.scores[i];
      const tr = el("tr", {
        class: "rank-row",
        "data-index": i,
        "data-item": candidates[i],
        "data-score": score,
        "data-rank": rank + 1,
      });
      tr.append(
        el("td", { class: "num", text: String(rank + 1) }),
        el("td", { class: "mono", text: candidates[i] }),
        el("td", { class: "num score", text: score.toFixed(4) }),
        el("td", { class: "bar-cell" }, bar(score / top, colorOf(result.variant))),
      );
      tr.addEventListener("click", () => select(i, true));
      tbody.append(tr);
    });
    table.append(tbody);
    card.append(table);
    container.append(card);
  }
}

function renderExplain() {
  const { candidates, results, asOf } = page.last;
  const container = $("explain");
  container.replaceChildren();
  const ranks = results.map((r) => {
    const rankOf = new Map();
    rankOrder(r, candidates.length).forEach((i, rank) => rankOf.set(i, rank + 1));
    return rankOf;
  });
  candidates.forEach((item, i) => {
    const details = el("details", { class: "candidate", "data-index": i, "data-item": item });
    const summary = el("summary", {}, el("span", { class: "mono", text: `item ${item}` }));
    results.forEach((r, v) => {
      const pill = el("span", { class: "pill" }, swatch(r.variant));
      pill.append(` ${r.body.scores[i].toFixed(4)} (#${ranks[v].get(i)})`);
      summary.append(pill);
    });
    details.append(summary);
    const grid = el("div", { class: "side-by-side" });
    for (const r of results) {
      const explained = r.body.explain ? r.body.explain[i] : { behaviors: [], effective_behaviors: 0 };
      const behaviors = explained.behaviors;
      const effective = explained.effective_behaviors;
      const box = el("div", { class: "explain-variant", "data-variant": r.variant, "data-effective": effective });
      // exp(entropy) of the weights: how many behaviors the attention really spreads over
      const spread = behaviors.length ? `, attention spread over ${effective.toFixed(1)}` : "";
      box.append(el("h4", {}, swatch(r.variant), ` ${behaviors.length} behaviors retrieved${spread}`));
      if (!behaviors.length) {
        box.append(el("p", { class: "muted", text: "none: the user has no stored behaviors" }));
      } else {
        box.append(behaviorTable(behaviors, item, asOf, colorOf(r.variant)));
      }
      grid.append(box);
    }
    details.append(grid);
    details.addEventListener("toggle", () => {
      if (details.open && page.selected !== i) select(i, false);
    });
    container.append(details);
  });
}

function behaviorTable(behaviors, candidate, asOf, color) {
  const table = el("table", { class: "behaviors" });
  table.append(el("thead", {}, row("th", ["#", "item", "time (UTC)", "age", "attention", ""])));
  const tbody = el("tbody");
  const top = Math.max(...behaviors.map((b) => b.attention)) || 1;
  behaviors.forEach((b, k) => {
    const tr = el("tr", {
      class: String(b.item_id) === candidate ? "behavior same-item" : "behavior",
      "data-item": b.item_id,
      "data-timestamp": b.timestamp,
      "data-attention": b.attention,
    });
    tr.append(
      el("td", { class: "num", text: String(k + 1) }),
      el("td", { class: "mono", text: String(b.item_id) }),
      el("td", { text: utc(b.timestamp) }),
      el("td", { class: "num", text: age(asOf - b.timestamp) }),
      el("td", { class: "num", text: b.attention.toFixed(4) }),
      el("td", { class: "bar-cell" }, bar(b.attention / top, color)),
    );
    tbody.append(tr);
  });
  table.append(tbody);
  return table;
}

// -- timeline -----------------------------------------------------------------------------------

const TL = { width: 1000, left: 96, right: 16, band: 36, lane: 34, axis: 28 };

function renderTimeline() {
  const { user, sequence, results } = page.last;
  const events = sequence.events;
  const container = $("timeline");
  container.replaceChildren();
  const shown = events.length < sequence.sequence_length ? `, the newest ${events.length} shown` : "";
  $("timeline-note").textContent =
    `${sequence.sequence_length} behaviors stored for ${user}${shown}. Grey ticks: behaviors (red: the ` +
    "selected candidate itself); circles: the behaviors retrieved for the selected candidate, " +
    "sized by attention; shaded: the behaviors each model read and searched (the newest, up to its search depth).";
  if (!events.length) {
    container.append(el("p", { class: "muted", text: "No stored behaviors: a cold-start user." }));
    return;
  }
  let t0 = events[0].timestamp;
  let t1 = events[events.length - 1].timestamp;
  if (t1 - t0 < 3600) {
    t0 -= 1800;
    t1 += 1800;
  }
  const plot = TL.width - TL.left - TL.right;
  const x = (ts) => TL.left + ((ts - t0) / (t1 - t0)) * plot;
  const height = TL.band + results.length * TL.lane + TL.axis;
  const root = svg("svg", { viewBox: `0 0 ${TL.width} ${height}`, role: "img", class: "timeline" });
  root.append(svg("title"));
  root.lastChild.textContent = `Behavior sequence of ${user}`;

  const label = (text, y) => {
    const t = svg("text", { x: 4, y, class: "lane-label" });
    t.textContent = text;
    return t;
  };
  root.append(label("behaviors", TL.band / 2 + 4));
  const ticks = svg("g", { class: "events" });
  for (const e of events) {
    const xi = x(e.timestamp).toFixed(2);
    ticks.append(svg("line", { x1: xi, x2: xi, y1: 6, y2: TL.band - 6, class: "event", "data-item": e.item_id }));
  }
  root.append(ticks);

  results.forEach((r, v) => {
    const y = TL.band + v * TL.lane;
    const lane = svg("g", { class: "lane", "data-variant": r.variant });
    const read = r.body.user.sequence_length;
    const windowStart = events.length > read ? events[events.length - read].timestamp : t0;
    lane.append(
      svg("rect", {
        x: x(windowStart).toFixed(2), y: y + 3, width: (x(t1) - x(windowStart)).toFixed(2), height: TL.lane - 6,
        fill: colorOf(r.variant), "fill-opacity": 0.08, class: "window",
      }),
      svg("line", { x1: TL.left, x2: TL.width - TL.right, y1: y + TL.lane / 2, y2: y + TL.lane / 2, class: "lane-axis" }),
    );
    const name = label(r.variant, y + TL.lane / 2 + 4);
    name.style.fill = colorOf(r.variant);
    lane.append(name, svg("g", { class: "retrieved-group" }));
    root.append(lane);
  });

  const axisY = TL.band + results.length * TL.lane;
  const axis = svg("g", { class: "axis" });
  axis.append(svg("line", { x1: TL.left, x2: TL.width - TL.right, y1: axisY, y2: axisY }));
  const longSpan = t1 - t0 > 2 * 86400;
  for (let k = 0; k <= 4; k++) {
    const ts = t0 + ((t1 - t0) * k) / 4;
    const xk = x(ts);
    axis.append(svg("line", { x1: xk, x2: xk, y1: axisY, y2: axisY + 5 }));
    const text = svg("text", { x: xk, y: axisY + 18, "text-anchor": k === 0 ? "start" : k === 4 ? "end" : "middle" });
    text.textContent = utc(Math.round(ts), !longSpan);
    axis.append(text);
  }
  root.append(axis);
  root.dataset.t0 = String(t0);
  root.dataset.t1 = String(t1);
  container.append(root);
}

function drawRetrieved(index) {
  const { candidates, results, sequence } = page.last;
  const root = $("timeline").querySelector("svg");
  if (!root) return;
  const t0 = Number(root.dataset.t0);
  const t1 = Number(root.dataset.t1);
  const x = (ts) => TL.left + ((ts - t0) / (t1 - t0)) * (TL.width - TL.left - TL.right);
  for (const line of root.querySelectorAll("line.event")) {
    line.classList.toggle("candidate-item", line.dataset.item === candidates[index]);
  }
  results.forEach((r, v) => {
    const group = root.querySelector(`g.lane[data-variant="${CSS.escape(r.variant)}"] g.retrieved-group`);
    group.replaceChildren();
    const behaviors = r.body.explain ? r.body.explain[index].behaviors : [];
    const top = Math.max(...behaviors.map((b) => b.attention)) || 1;
    const y = TL.band + v * TL.lane + TL.lane / 2;
    // Largest first, so small circles stay clickable on top.
    const ordered = [...behaviors].sort((a, b) => b.attention - a.attention);
    for (const b of ordered) {
      if (sequence.events.length && (b.timestamp < t0 || b.timestamp > t1)) continue;
      const circle = svg("circle", {
        cx: x(b.timestamp).toFixed(2), cy: y, r: (3 + 10 * Math.sqrt(b.attention / top)).toFixed(2),
        fill: colorOf(r.variant), class: "retrieved", "data-variant": r.variant, "data-item": b.item_id,
      });
      const title = svg("title");
      title.textContent = `item ${b.item_id} at ${utc(b.timestamp)} UTC, attention ${b.attention.toFixed(4)}`;
      circle.append(title);
      group.append(circle);
    }
  });
}

function select(index, scroll) {
  page.selected = index;
  for (const tr of document.querySelectorAll("#rankings tr.rank-row")) {
    tr.classList.toggle("selected", Number(tr.dataset.index) === index);
  }
  const details = $("explain").querySelector(`details[data-index="${index}"]`);
  if (details) {
    details.open = true;
    if (scroll) details.scrollIntoView({ behavior: "smooth", block: "nearest" });
  }
  drawRetrieved(index);
  const item = page.last.candidates[index];
  $("timeline-note").dataset.selected = item;
}

// -- start --------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("score-form").addEventListener("submit", scoreAll);
  $("suggest").addEventListener("click", () => suggest().catch((error) => setStatus(error.message, true)));
  const models = loadModels().catch((error) => {
    $("model-list").textContent = error.message;
  });
  loadExamples().catch((error) => {
    $("examples-note").textContent = error.message;
  });
  // ?user=...&candidates=... (what a scored page puts in its URL) scores right away.
  const query = new URLSearchParams(location.search);
  if (query.get("user") && query.get("candidates")) {
    $("user-id").value = query.get("user");
    $("candidates").value = query.get("candidates");
    models.then(() => scoreAll());
  }
});
