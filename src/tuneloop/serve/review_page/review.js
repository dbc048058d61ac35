// The review page: plain DOM, no framework, no build step. Every text from the server goes in through
// textContent (never innerHTML), so an answer can hold any markup safely.
"use strict";

const API = "/review/api";
const $ = (id) => document.getElementById(id);

const state = {
  me: null,        // {reviewer, id, local, rubric, reviews_per_item}
  items: [],       // this session's items in the order seen: {item, review (the server's answer) | null}
  pos: -1,
  draft: null,     // what is marked on the current, unsubmitted item
  busy: false,
};

async function call(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(API + path, init);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const err = new Error((data && data.error && data.error.message) || `${r.status} ${r.statusText}`);
    err.status = r.status;
    err.param = data && data.error ? data.error.param : null;
    throw err;
  }
  return data;
}

// ------------------------------------------------------------------ sign in
async function start() {
  try {
    state.me = await call("GET", "/me");
  } catch (e) {
    if (e.status === 401) return showSignin("");
    return showSignin(e.message);
  }
  $("signin").hidden = true;
  // the key box is gone: keys go to the page again
  if (document.activeElement && document.activeElement.blur) document.activeElement.blur();
  $("who").textContent = `reviewer: ${state.me.reviewer}` + (state.me.local ? " (this machine)" : "");
  $("signout").hidden = state.me.local;
  $("queue-pick").hidden = false;
  buildCriteria();
  await loadQueues();
  show("review");
  await nextItem();
}

function showSignin(message) {
  for (const v of ["review", "progress", "agreement"]) $("view-" + v).hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  $("key").focus();
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await call("POST", "/login", { key: $("key").value.trim() });
    $("key").value = "";
    await start();
  } catch (e) {
    $("signin-error").textContent = e.message;
  }
});

$("signout").addEventListener("click", async () => {
  await releaseUnsubmitted();
  await call("POST", "/logout");
  state.items = []; state.pos = -1; state.me = null;
  $("who").textContent = "";
  $("signout").hidden = true;
  showSignin("signed out");
});

// ------------------------------------------------------------------ views
function show(view) {
  for (const v of ["review", "progress", "agreement"]) {
    $("view-" + v).hidden = v !== view;
    document.querySelector(`.tab[data-view="${v}"]`).setAttribute("aria-pressed", String(v === view));
  }
  if (view === "progress") loadProgress();
  if (view === "agreement") loadAgreement();
}
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => { if (state.me) show(tab.dataset.view); });
}

async function loadQueues() {
  const { queues } = await call("GET", "/queues");
  const sel = $("queue");
  const keep = sel.value;
  while (sel.options.length > 1) sel.remove(1);
  for (const q of queues) {
    const o = document.createElement("option");
    o.value = q.queue;
    o.textContent = `${q.queue} (${q.kind}, ${q.done}/${q.items} done)`;
    sel.appendChild(o);
  }
  sel.value = keep;
  return queues;
}
$("queue").addEventListener("change", async () => {
  await releaseUnsubmitted();
  state.items = []; state.pos = -1;
  await nextItem();
});

function table(el, header, rows) {
  const thead = el.tHead || el.createTHead();
  const tbody = el.tBodies[0] || el.createTBody();
  thead.replaceChildren(); tbody.replaceChildren();
  if (header) {
    const tr = thead.insertRow();
    for (const h of header) { const th = document.createElement("th"); th.textContent = h; tr.appendChild(th); }
  }
  for (const row of rows) {
    const tr = tbody.insertRow();
    for (const c of row) tr.insertCell().textContent = c === null || c === undefined ? "—" : String(c);
  }
}

function fmt(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(3);
  if (v === null || v === undefined) return "—";
  if (typeof v === "object") return Object.entries(v).map(([k, x]) => `${k} ${fmt(x)}`).join(" · ");
  return String(v);
}

async function loadProgress() {
  const [{ progress }, queues] = await Promise.all([call("GET", "/progress"), loadQueues()]);
  const extra = [];
  for (const p of progress) for (const k of Object.keys(p)) if (!["reviewer", "reviewed", "reserved"].includes(k) && !extra.includes(k)) extra.push(k);
  table($("progress-table"), ["reviewer", "reviewed", "reserved", ...extra],
        progress.map((p) => [p.reviewer, p.reviewed, p.reserved, ...extra.map((k) => fmt(p[k]))]));
  table($("queues-table"), ["queue", "kind", "items", "done", "reviews wanted"],
        queues.map((q) => [q.queue, q.kind, q.items, q.done, q.reviews_wanted]));
}

async function loadAgreement() {
  const q = $("queue").value;
  const a = await call("GET", "/agreement" + (q ? `?queue=${encodeURIComponent(q)}` : ""));
  table($("agreement-table"), ["", "value"], Object.entries(a).map(([k, v]) => [k, fmt(v)]));
}

// ------------------------------------------------------------------ items
function current() { return state.items[state.pos] || null; }

// J: on to the next item. The store hands a reviewer the item they already hold, so an unfinished one is
// given back first (it goes last in their line and is free for others); reviewed ones stay for K.
async function nextItem() {
  if (state.busy) return;
  if (state.pos < state.items.length - 1) { state.pos += 1; return render(); }
  const c = current();
  state.busy = true;
  try {
    if (c && !c.review) {
      await call("POST", `/items/${c.item.id}/release`);
      state.items.pop();
    }
    const q = $("queue").value || null;
    const { item } = await call("POST", "/next", { queue: q });
    if (!item) {
      state.pos = state.items.length - 1;
      $("item").hidden = true;
      $("empty").hidden = false;
      return;
    }
    const seen = state.items.findIndex((x) => x.item.id === item.id);
    if (seen >= 0) state.pos = seen;
    else { state.items.push({ item, review: null }); state.pos = state.items.length - 1; }
  } catch (e) {
    return setStatus(e.message, "error");
  } finally {
    state.busy = false;
  }
  render();
}

// K: back to an item reviewed earlier in this session, to see or change what was sent.
function prevItem() {
  if (state.busy) return;
  if (!$("empty").hidden && state.items.length) { state.pos = state.items.length - 1; return render(); }
  if (state.pos > 0) { state.pos -= 1; render(); }
}

async function releaseUnsubmitted() {
  const open = state.items.filter((x) => !x.review);
  await Promise.all(open.map((x) => call("POST", `/items/${x.item.id}/release`).catch(() => null)));
}
// A reserved item left on the page goes back to the queue (keepalive: the request outlives the page).
window.addEventListener("pagehide", () => {
  for (const x of state.items) {
    if (!x.review) fetch(`${API}/items/${x.item.id}/release`, { method: "POST", keepalive: true, credentials: "same-origin" });
  }
});

function renderPrompt(el, prompt) {
  el.replaceChildren();
  if (typeof prompt === "string") { el.textContent = prompt; return; }
  for (const m of prompt || []) {
    const d = document.createElement("div");
    d.className = "turn";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role;
    d.appendChild(role);
    d.appendChild(document.createTextNode(typeof m.content === "string" ? m.content : JSON.stringify(m.content)));
    el.appendChild(d);
  }
}

function buildCriteria() {
  const box = $("criteria");
  box.replaceChildren();
  for (const name of state.me.rubric) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "crit";
    b.dataset.criterion = name;
    b.dataset.mark = "";
    b.textContent = name;
    b.title = "click: met, again: not met, again: unmarked";
    b.addEventListener("click", () => {
      if (!editable()) return;
      const now = state.draft.criteria[name];
      if (now === undefined) state.draft.criteria[name] = true;
      else if (now === true) state.draft.criteria[name] = false;
      else delete state.draft.criteria[name];
      paintMarks();
    });
    box.appendChild(b);
  }
}

function locked(c) { return !!(c && c.review && c.item.kind === "pair"); }  // sources seen: no second choice
function editable() { const c = current(); return c && !locked(c) && !state.busy; }

function render() {
  $("empty").hidden = true;
  const c = current();
  if (!c) { $("item").hidden = true; return; }
  const { item, review } = c;
  $("item").hidden = false;
  $("item-pos").textContent = `${state.pos + 1} of ${state.items.length} this session`;
  $("item-id").textContent = item.id;
  $("item-queue").textContent = item.queue;
  $("item-state").textContent = review ? "· reviewed" : "";
  renderPrompt($("prompt"), item.prompt);
  const pair = item.kind === "pair";
  $("single").hidden = pair; $("single-controls").hidden = pair;
  $("pair").hidden = !pair; $("pair-controls").hidden = !pair;
  const ref = item.reference;
  if (pair) {
    $("answer-a").textContent = item.answer_a;
    $("answer-b").textContent = item.answer_b;
    const rev = review && review.revealed;
    $("source-a").textContent = rev ? `(${rev.A})` : "";
    $("source-b").textContent = rev ? `(${rev.B})` : "";
    $("pair-reference-box").hidden = !ref;
    $("pair-reference").textContent = ref || "";
  } else {
    $("answer").textContent = item.answer;
    $("reference-box").hidden = !ref;
    $("reference").textContent = ref || "";
  }
  // A reviewed item shows what was sent; a fresh one starts blank.
  const sent = review ? review.sent : null;
  state.draft = { rating: null, thumb: null, choice: null, criteria: {}, ...(sent || {}) };
  state.draft.criteria = { ...(sent && sent.criteria) };
  $("correction").value = (sent && sent.correction) || "";
  $("reason").value = (sent && sent.reason) || "";
  for (const el of [$("correction"), $("reason"), $("submit"), $("copy-answer")]) el.disabled = locked(c);
  setStatus(review ? `saved (review ${review.id})` : "", review ? "saved" : "");
  paintMarks();
}

function paintMarks() {
  const d = state.draft || {};
  for (const b of document.querySelectorAll("[data-rating]")) b.setAttribute("aria-pressed", String(Number(b.dataset.rating) === d.rating));
  for (const b of document.querySelectorAll("[data-thumb]")) b.setAttribute("aria-pressed", String(Number(b.dataset.thumb) === d.thumb));
  for (const b of document.querySelectorAll("[data-choice]")) b.setAttribute("aria-pressed", String(b.dataset.choice === d.choice));
  for (const b of document.querySelectorAll("[data-criterion]")) {
    const v = (d.criteria || {})[b.dataset.criterion];
    b.dataset.mark = v === true ? "yes" : v === false ? "no" : "";
  }
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = kind || "";
}

function mark(field, value) {
  if (!editable()) return;
  state.draft[field] = state.draft[field] === value ? null : value;
  paintMarks();
}
for (const b of document.querySelectorAll("[data-rating]")) b.addEventListener("click", () => mark("rating", Number(b.dataset.rating)));
for (const b of document.querySelectorAll("[data-thumb]")) b.addEventListener("click", () => mark("thumb", Number(b.dataset.thumb)));
for (const b of document.querySelectorAll("[data-choice]")) b.addEventListener("click", () => mark("choice", b.dataset.choice));
$("copy-answer").addEventListener("click", () => {
  const c = current();
  if (c && c.item.answer && !$("correction").value) $("correction").value = c.item.answer;
  $("correction").focus();
});
$("reload").addEventListener("click", () => nextItem());

async function submit() {
  const c = current();
  if (!c || locked(c) || state.busy) return;
  const d = state.draft;
  const body = {};
  if (c.item.kind === "pair") {
    if (!d.choice) return setStatus("pick A, B or equal first", "error");
    body.choice = d.choice;
  } else {
    if (d.rating) body.rating = d.rating;
    if (d.thumb) body.thumb = d.thumb;
    if (Object.keys(d.criteria).length) body.criteria = { ...d.criteria };
    const corr = $("correction").value;
    if (corr.trim()) body.correction = corr;
    if (!Object.keys(body).length) return setStatus("rate it, mark it or correct it first", "error");
  }
  const reason = $("reason").value.trim();
  if (reason) body.reason = reason;
  state.busy = true;
  setStatus("saving…", "");
  try {
    // "saved" only once the server answered 2xx: the store has committed the review by then.
    const review = await call("POST", `/items/${c.item.id}/review`, body);
    c.review = { ...review, sent: body };
    state.busy = false;
    if (document.activeElement && document.activeElement.blur) document.activeElement.blur();
    if (c.item.kind === "pair") {
      render();  // the sources are revealed now; J moves on
    } else {
      await nextItem();
      setStatus(`saved (review ${review.id}, item ${c.item.id})`, "saved");
    }
  } catch (e) {
    state.busy = false;
    setStatus(`not saved: ${e.message}`, "error");
  }
}
$("review-form").addEventListener("submit", (ev) => { ev.preventDefault(); submit(); });

// ------------------------------------------------------------------ keyboard
document.addEventListener("keydown", (ev) => {
  if (!state.me || $("view-review").hidden) return;
  const t = ev.target;
  const typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "button") || t.tagName === "SELECT");
  if (typing) {
    if (ev.key === "Escape") { t.blur(); ev.preventDefault(); }
    else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey || t.id === "reason")) { ev.preventDefault(); submit(); }
    return;  // plain Enter in the correction box is a new line
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
  const c = current();
  const pair = c && c.item.kind === "pair";
  let done = true;
  if (!pair && "12345".includes(k) && k.length === 1) mark("rating", Number(k));
  else if (pair && k === "a") mark("choice", "A");
  else if (pair && k === "b") mark("choice", "B");
  else if (pair && k === "e") mark("choice", "equal");
  else if (!pair && k === "u") mark("thumb", 1);
  else if (!pair && k === "d") mark("thumb", -1);
  else if (!pair && k === "c" && editable()) $("correction").focus();
  else if (k === "r" && editable()) $("reason").focus();
  else if (k === "j") nextItem();
  else if (k === "k") prevItem();
  else if (k === "Enter") submit();
  else done = false;
  if (done) ev.preventDefault();
});

start();
