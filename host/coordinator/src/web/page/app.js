// The coordinator's page: two event streams (the overview, and the job
// that is open) redraw it; nothing polls, nothing reloads. Everything a
// job or a guest wrote is set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-") || k === "title") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function duration(ms) {
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 120) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 120 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function bar(done, all) {
  const pct = all ? (100 * done) / all : 0;
  const b = el("span", { class: "bar" }, el("span"));
  b.firstChild.style.width = `${pct}%`;
  return el("span", {}, b, `${done}/${all}`);
}

function taskName(t) {
  return "map" in t.task ? `map-${t.task.map}` : `reduce-${t.task.reduce}`;
}

/** At most this many tasks a side are drawn as labelled chips. */
const LIST = 48;
/** Beyond this many tasks, a job's tasks are counted by state, not drawn. */
const MAX_DRAWN = 4000;

let selected = null;
let stream = null;

// One event stream per tab: the overview, with the open job's detail.
function connect() {
  if (stream) stream.close();
  const live = $("live");
  const url = selected ? `/api/events?job=${encodeURIComponent(selected)}` : "/api/events";
  stream = new EventSource(url);
  stream.onopen = () => { live.textContent = "live"; live.className = "live"; };
  stream.onerror = () => { live.textContent = "disconnected; retrying"; live.className = "live off"; };
  stream.addEventListener("overview", (e) => {
    const o = JSON.parse(e.data);
    drawJobs(o.jobs, o.now_ms);
    drawWorkers(o.workers);
    if (selected && "job" in o) {
      if (o.job) drawJob(o.job);
      else { selected = null; $("job").hidden = true; }   // forgotten
    }
    if (selected === null && o.jobs.length > 0) openJob(o.jobs[o.jobs.length - 1].job);
  });
}

// Rows are kept by key and their cells updated in place, so a tooltip, a
// selection or a click survives the next event.
function upsert(body, key, attr, cells, make) {
  let row = body.querySelector(`tr[${attr}="${CSS.escape(key)}"]`);
  if (!row) {
    row = make();
    row.setAttribute(attr, key);
    for (let i = 0; i < cells.length; i++) row.append(el("td"));
  }
  cells.forEach((c, i) => {
    const td = row.children[i];
    if (c instanceof Node) {
      if (td.firstChild === null || !td.firstChild.isEqualNode(c)) td.replaceChildren(c);
    } else if (td.textContent !== String(c)) {
      td.textContent = String(c);
    }
  });
  return row;
}

function drawJobs(jobs, nowMs) {
  const body = $("jobs").tBodies[0];
  $("no-jobs").hidden = jobs.length > 0;
  const keep = new Set(jobs.map((j) => j.job));
  for (const r of [...body.rows]) if (!keep.has(r.dataset.job)) r.remove();
  jobs.slice().reverse().forEach((j, i) => {
    const over = ["succeeded", "failed", "cancelled"].includes(j.state);
    const took = (j.finished_ms || nowMs) - j.submitted_ms;
    // Running, but nothing started yet: it waits for free slots.
    const queued = j.state === "running" && j.running === 0 && j.maps_done === 0;
    const label = queued ? "queued" : j.state;
    const cancel = el("button", { class: "cancel", "data-job": j.job, title: "cancel this job" }, "cancel");
    cancel.hidden = over || j.state === "committing";
    const row = upsert(body, j.job, "data-job", [
      j.job,
      j.app.split("/").pop(),
      el("span", { class: `state ${label}` }, label),
      bar(j.maps_done, j.maps),
      bar(j.reduces_done, j.reduces),
      j.running, j.failed_attempts, j.backups,
      duration(Math.max(0, took)),
      j.output,
      cancel,
    ], () => {
      const r = el("tr", { class: "job" });
      r.onclick = (ev) => {
        if (ev.target.closest("button.cancel")) { ev.stopPropagation(); cancelJob(r.dataset.job); return; }
        openJob(r.dataset.job);
      };
      return r;
    });
    row.dataset.state = j.state;
    row.classList.toggle("selected", j.job === selected);
    row.children[1].title = j.app;
    row.title = j.error || "";
    if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
  });
}

function drawWorkers(workers) {
  const body = $("workers").tBodies[0];
  $("no-workers").hidden = workers.length > 0;
  const keep = new Set(workers.map((w) => w.worker));
  for (const r of [...body.rows]) if (!keep.has(r.dataset.worker)) r.remove();
  workers.forEach((w, i) => {
    let state = "ok";
    if (w.quarantined) state = `quarantined: ${w.quarantined}`;
    else if (w.suspect_in.length) state = `suspect in ${w.suspect_in.join(", ")}`;
    const row = upsert(body, w.worker, "data-worker", [
      w.worker, w.host, w.addr || "—", w.slots, w.running,
      `${duration(w.heartbeat_age_ms)} ago`, bytes(w.served_bytes), state,
    ], () => el("tr"));
    row.children[4].title = w.attempts.join("\n");
    if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
  });
}

async function cancelJob(job) {
  if (!confirm(`Cancel ${job}?`)) return;
  const r = await fetch(`/api/jobs/${encodeURIComponent(job)}/cancel`, {
    method: "POST", headers: { "X-Requested-By": "mr" },
  });
  if (!r.ok) alert(`cannot cancel ${job}: ${await r.text()}`);
}

function openJob(job) {
  if (selected === job) return;
  selected = job;
  for (const r of document.querySelectorAll("tr.job")) r.classList.toggle("selected", r.dataset.job === job);
  $("job").hidden = false;
  $("job-id").textContent = job;
  connect();
}

// What a task is, for its colour: the coordinator says idle, running or
// done; its attempts say more.
function taskState(state, task) {
  const running = task.attempts.filter((a) => a.outcome === "running");
  if (state === "running") {
    if (running.some((a) => a.reason === "verify") || task.attempts.some((a) => a.digest)) return "verifying";
    if (running.some((a) => a.reason === "backup")) return "backup";
    return "running";
  }
  if (state === "done") return "done";
  const last = task.attempts[task.attempts.length - 1];
  if (!last) return "idle";
  if (last.outcome.startsWith("failed")) return "failed";
  return "lost";
}

function drawJob(d) {
  const s = d.summary, report = d.report;
  $("job-state").textContent = s.state;
  $("job-state").className = `state ${s.state}`;
  $("job-error").hidden = !s.error;
  $("job-error").textContent = s.error || "";
  $("job-waiting").hidden = !s.waiting;
  $("job-waiting").textContent = s.waiting || "";

  const maps = $("maps"), reduces = $("reduces");
  maps.replaceChildren();
  reduces.replaceChildren();
  // Up to LIST tasks a side, each is a labelled chip in a column; beyond,
  // a small square in a grid.
  const mapCount = report.tasks.filter((t) => "map" in t.task).length;
  const list = mapCount <= LIST && s.reduces <= LIST;
  if (report.tasks.length > MAX_DRAWN) {
    // Too many to draw one by one: how many are in each state.
    const counts = {};
    report.tasks.forEach((t, i) => {
      const k = `${"map" in t.task ? "map" : "reduce"} ${taskState(d.states[i], t)}`;
      counts[k] = (counts[k] || 0) + 1;
    });
    maps.className = reduces.className = "tasks list";
    for (const [k, n] of Object.entries(counts).sort()) {
      const [kind, state] = k.split(" ");
      (kind === "map" ? maps : reduces).append(
        el("span", { class: `task state-${state}`, "data-count": state }, `${n} ${state}`));
    }
    drawShuffle(false, mapsAllDone(d));
    $("timeline").replaceChildren(el("p", { class: "quiet" }, `${report.tasks.length} tasks: too many to draw each attempt (mr status JOB --json has them)`));
    drawFailures(report);
    drawCounters(report);
    return;
  }
  maps.className = reduces.className = list ? "tasks list" : "tasks grid";
  let mapsDone = 0;
  report.tasks.forEach((t, i) => {
    const state = taskState(d.states[i], t);
    const name = taskName(t);
    const last = t.attempts[t.attempts.length - 1];
    const running = last && last.outcome === "running";
    let title = `${name}: ${state}`;
    if (t.input) title += `\n${t.input} [${t.range[0]}, ${t.range[1]})`;
    if (last) title += `\nattempt ${last.attempt} on ${last.worker}: ${last.outcome}`;
    if (running && last.progress != null) title += ` (${Math.round(last.progress * 100)} %)`;
    const box = el("span", { class: `task state-${state}`, "data-task": name, "data-state": state, title });
    if (list) {
      box.textContent = running && last.progress != null ? `${name} ${Math.round(last.progress * 100)}%` : name;
    }
    if ("map" in t.task) { maps.append(box); if (state === "done") mapsDone++; } else reduces.append(box);
  });
  drawShuffle(list, mapsDone === mapCount);
  drawTimeline(report, d.now_ms);

  drawFailures(report);
  drawCounters(report);
}

function mapsAllDone(d) {
  return d.report.tasks.every((t, i) => !("map" in t.task) || d.states[i] === "done");
}

function drawFailures(report) {
  const failures = $("failures");
  failures.replaceChildren();
  let shown = 0;
  for (const t of report.tasks) {
    for (const a of t.attempts) {
      if ((a.outcome.startsWith("failed") || a.outcome.startsWith("killed")) && shown++ < 200) {
        failures.append(el("li", { "data-attempt": `${taskName(t)}#${a.attempt}` },
          `${taskName(t)} attempt ${a.attempt} on ${a.worker}: ${a.outcome}`));
      }
    }
  }
  if (shown > 200) failures.append(el("li", { class: "quiet" }, `and ${shown - 200} more (mr status JOB --json has them all)`));
  if (!shown) failures.append(el("li", { class: "quiet" }, "none"));
}

function drawCounters(report) {
  const counters = $("counters").tBodies[0];
  counters.replaceChildren();
  for (const [k, v] of Object.entries(report.counters)) {
    if (k === "user") continue;
    if (v) counters.append(el("tr", {}, el("td", {}, k), el("td", {}, v.toLocaleString())));
  }
  // The app's own counters (mr_sdk::counter and the like), marked as such.
  for (const [k, v] of Object.entries(report.counters.user || {})) {
    counters.append(el("tr", { class: "user-counter", "data-counter": k },
      el("td", {}, `${k} (app)`), el("td", {}, v.toLocaleString())));
  }
}

// The shuffle: every map feeds every reduce. With chips, a line joins each
// map to each reduce (green once the map is done); with grids, one band.
function drawShuffle(list, allMapsDone) {
  const svg = $("shuffle");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const box = svg.getBoundingClientRect();
  svg.setAttribute("viewBox", `0 0 ${Math.max(1, box.width)} ${Math.max(1, box.height)}`);
  const mid = (e) => { const r = e.getBoundingClientRect(); return r.top + r.height / 2 - box.top; };
  if (list) {
    const reduces = [...$("reduces").children].map(mid);
    for (const m of $("maps").children) {
      const y = mid(m), done = m.dataset.state === "done";
      for (const r of reduces) {
        const l = document.createElementNS(ns, "line");
        l.setAttribute("x1", 0); l.setAttribute("y1", y);
        l.setAttribute("x2", box.width); l.setAttribute("y2", r);
        if (done) l.setAttribute("class", "flowing");
        svg.append(l);
      }
    }
  } else {
    const p = document.createElementNS(ns, "rect");
    p.setAttribute("x", 0); p.setAttribute("y", 0);
    p.setAttribute("width", box.width); p.setAttribute("height", box.height);
    p.setAttribute("class", allMapsDone ? "band flowing" : "band");
    svg.append(p);
  }
}

// Spark's event timeline: a lane per worker slot, a bar per attempt.
function drawTimeline(report, nowMs) {
  const box = $("timeline");
  box.replaceChildren();
  const start = report.started_ms;
  const end = report.finished_ms || nowMs;
  const span = Math.max(1, end - start);
  const lanes = new Map();
  for (const t of report.tasks) {
    for (const a of t.attempts) {
      const lane = `${a.worker} slot ${a.slot}`;
      if (!lanes.has(lane)) lanes.set(lane, []);
      lanes.get(lane).push([t, a]);
    }
  }
  for (const name of [...lanes.keys()].sort()) {
    const lane = el("div", { class: "lane" }, el("span", { class: "lane-name", title: name }, name));
    for (const [t, a] of lanes.get(name)) {
      const from = a.start_ms, to = a.outcome === "running" ? end : a.end_ms;
      const outcome = a.outcome.split(/[:\s]/)[0];
      const bar = el("span", {
        class: `attempt ${outcome}`,
        "data-attempt": `${taskName(t)}#${a.attempt}`,
        "data-outcome": outcome,
        title: `${taskName(t)} attempt ${a.attempt} (${a.reason}): ${a.outcome}\n${duration(Math.max(0, to - from))}`,
      });
      bar.style.left = `${(100 * Math.max(0, from - start)) / span}%`;
      bar.style.width = `${(100 * Math.max(0, to - from)) / span}%`;
      lane.append(bar);
    }
    box.append(lane);
  }
  if (!lanes.size) box.append(el("p", { class: "quiet" }, "no attempts yet"));
}

connect();
