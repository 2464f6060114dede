// QTasks dashboard: helpers, the server's API, the router, the overview and the live feed.
// Safety rule of this file and pages.js: a value from the server reaches the page only as
// text (h() appends strings as text nodes; textContent elsewhere), never parsed as markup.
"use strict";

const QT = {config: {actions: false}, cleanup: null, feed: null};
const TOKEN_KEY = "qtasks-dashboard-token";
const STATUSES = ["running", "new", "partial", "success", "error", "cancelled"];

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(3)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));  // a string: a text node
  }
  return el;
}

function json(value, max) {
  let text;
  try { text = JSON.stringify(value); } catch (e) { text = String(value); }
  if (text === undefined) text = "null";
  return max && text.length > max ? text.slice(0, max) + "…" : text;
}

function clock(ts) {
  if (!ts) return "-";
  const d = new Date(ts * 1000);
  return d.toLocaleTimeString([], {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 1) return (value * 1000).toFixed(0) + " ms";
  if (value < 120) return value.toFixed(2) + " s";
  return (value / 60).toFixed(1) + " min";
}

function uptime(value) {
  if (value === null || value === undefined) return "-";
  const s = Math.floor(value), d = Math.floor(s / 86400), hrs = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60);
  if (d) return d + "d" + hrs + "h";
  if (hrs) return hrs + "h" + String(m).padStart(2, "0") + "m";
  return m + "m" + String(s % 60).padStart(2, "0") + "s";
}

function taskLink(id, text) {
  return h("a", {href: "#/task/" + encodeURIComponent(id), class: "task-link", title: id}, text || id);
}

function shortId(id) { return id.length > 16 ? id.slice(0, 8) + "…" + id.slice(-6) : id; }

function pretty(value) {  // one line when short, indented when long
  const line = json(value);
  return line.length <= 100 ? line : JSON.stringify(value, null, 2);
}

function badge(status) {
  return h("span", {class: "badge " + String(status || "unknown")}, status || "?");
}

function notice(text, isError) {
  const el = document.getElementById("notice");
  el.textContent = text || "";
  el.hidden = !text;
  el.className = "notice" + (isError ? " error" : "");
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-QTasks-Token": token()},
  };
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new Error((data && data.error) || response.status + " " + response.statusText);
  return data;
}

async function act(path, body, done) {
  try {
    const result = await api(path, body);
    notice("");
    if (done) done(result);
  } catch (e) {
    notice(e.message, true);
  }
}

function setHealth(text, ok) {
  const el = document.getElementById("health");
  el.textContent = text || "";
  el.hidden = !text;
  el.className = "health " + (ok ? "ok" : "bad");
}

// -- router -------------------------------------------------------------------------

function route() {
  if (QT.cleanup) { QT.cleanup(); QT.cleanup = null; }
  const main = document.getElementById("main");
  main.replaceChildren();
  notice("");
  setHealth("");
  const hash = location.hash || "#/";
  document.getElementById("nav-dead").className = hash.startsWith("#/dead") ? "current" : "";
  document.getElementById("nav-overview").className = hash === "#/" ? "current" : "";
  if (hash.startsWith("#/task/")) QT.cleanup = taskPage(main, decodeURIComponent(hash.slice(7)));
  else if (hash.startsWith("#/dead")) QT.cleanup = deadPage(main);
  else QT.cleanup = overviewPage(main);
}

async function start() {
  if (location.hash.startsWith("#token=")) {  // the link printed at start: kept, then hidden
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(location.hash.slice(7)));
    history.replaceState(null, "", location.pathname + "#/");
  }
  try { QT.config = await api("/api/config"); } catch (e) { notice(e.message, true); }
  document.getElementById("mode").textContent = QT.config.actions ? "actions on" : "read-only";
  document.getElementById("where").textContent = "broker " + (QT.config.broker || "?") +
    " · results " + (QT.config.results || "?");
  const label = document.getElementById("token-label");
  const input = document.getElementById("token");
  label.hidden = !QT.config.actions;
  input.value = token();
  input.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, input.value.trim()));
  label.addEventListener("submit", (e) => e.preventDefault());
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", start);

// -- overview -----------------------------------------------------------------------

function overviewPage(main) {
  const queues = h("tbody"), workers = h("tbody"), chart = h("div", {class: "chart"});
  const dead = h("span", {id: "dead-count"}, "-");
  const feed = new Feed();
  main.append(...[
    h("section", {class: "card"}, h("h2", {}, "Queues"),
      h("table", {id: "queues"}, h("thead", {}, h("tr", {},
        h("th", {}, "queue"), h("th", {}, "ready"), h("th", {}, "in flight"),
        h("th", {}, "consumers"))), queues),
      h("p", {}, "dead letters: ", dead, " ", h("a", {href: "#/dead"}, "show"))),
    h("section", {class: "card"}, h("h2", {}, "Live workers"),
      h("table", {id: "workers"}, h("thead", {}, h("tr", {},
        ...["worker", "host", "pid", "queues", "in flight", "done", "failed", "uptime",
          "state"].map((name) => h("th", {}, name)))), workers)),
    h("section", {class: "card wide"}, h("h2", {}, "Finished and failed tasks per second, last 5 minutes"), chart),
    QT.config.actions ? submitForm() : null,
    feed.element].filter(Boolean));

  function showOverview(data) {
    if (data.error) notice("overview: " + data.error, true);
    if (data.queues) {
      queues.replaceChildren(...data.queues.map((q) => h("tr", {},
        h("td", {}, q.queue), h("td", {class: "num"}, q.ready),
        h("td", {class: "num"}, q.in_flight ?? "-"), h("td", {class: "num"}, q.consumers ?? "-"))));
    }
    if ("dead_letters" in data) dead.textContent = data.dead_letters ?? "-";
    if (data.workers) showWorkers(data.workers);
    if (data.rates) drawChart(chart, data.rates);
    setHealth(data.listening === false ? "not listening: " + data.listen_error : "live", data.listening !== false);
  }

  function showWorkers(list) {
    workers.replaceChildren(...list.map((w) => h("tr", {},
      h("td", {}, w.name), h("td", {}, w.host), h("td", {class: "num"}, w.pid),
      h("td", {}, (w.queues || []).join(", ")),
      h("td", {class: "num"}, w.in_flight + "/" + w.concurrency),
      h("td", {class: "num"}, w.done), h("td", {class: "num"}, w.failed),
      h("td", {class: "num"}, uptime(w.uptime)), h("td", {}, w.state))));
  }

  const source = new EventSource("/api/stream");
  const parse = (handler) => (message) => handler(JSON.parse(message.data));
  source.addEventListener("hello", parse((data) => { feed.reset(data.events || []); showOverview(data); }));
  source.addEventListener("event", parse((event) => feed.add(event)));
  source.addEventListener("overview", parse(showOverview));
  source.addEventListener("workers", parse((data) => showWorkers(data.workers)));
  source.addEventListener("health", parse((data) => setHealth(data.listening ? "live" : "not listening: " + data.error, data.listening)));
  source.addEventListener("gap", parse((data) => feed.gap(data.dropped)));
  source.onerror = () => setHealth("reconnecting…", false);
  return () => source.close();
}

function drawChart(box, rates) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs, text) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  };
  const width = 1200, height = 120, n = rates.finished.length;
  const top = Math.max(1, ...rates.finished, ...rates.failed);
  const bar = width / n;
  const root = svg("svg", {viewBox: `0 0 ${width} ${height + 16}`, role: "img", class: "rates"});
  root.append(svg("title", {}, "finished and failed tasks per second"));
  rates.finished.forEach((done, i) => {
    const failed = rates.failed[i];
    const t = new Date((rates.end - (n - i) * rates.step) * 1000).toLocaleTimeString([], {hour12: false});
    const g = svg("g", {});
    g.append(svg("title", {}, `${t}: ${done.toFixed(2)} finished/s, ${failed.toFixed(2)} failed/s`));
    g.append(svg("rect", {x: i * bar + 0.5, y: height - done / top * height, width: bar - 1,
      height: done / top * height, class: "done"}));
    g.append(svg("rect", {x: i * bar + 0.5, y: height - failed / top * height, width: bar - 1,
      height: failed / top * height, class: "failed"}));
    root.append(g);
  });
  root.append(svg("text", {x: 2, y: 10, class: "axis"}, top.toFixed(top < 10 ? 1 : 0) + "/s"));
  root.append(svg("text", {x: 2, y: height + 14, class: "axis"}, "-5 min"));
  root.append(svg("text", {x: width - 2, y: height + 14, class: "axis end"}, "now"));
  box.replaceChildren(root);
}

function submitForm() {
  const name = h("input", {id: "submit-task", placeholder: "task name", required: true});
  const args = h("input", {id: "submit-args", placeholder: "args, a JSON array", value: "[]"});
  const kwargs = h("input", {id: "submit-kwargs", placeholder: "kwargs, a JSON object", value: "{}"});
  const queue = h("input", {id: "submit-queue", placeholder: "queue (optional)"});
  const send = (e) => {
    e.preventDefault();
    let body;
    try {
      body = {task: name.value, args: JSON.parse(args.value || "[]"),
        kwargs: JSON.parse(kwargs.value || "{}"), queue: queue.value || null};
    } catch (err) { notice("args and kwargs must be JSON: " + err.message, true); return; }
    act("/api/tasks", body, (sent) => { location.hash = "#/task/" + encodeURIComponent(sent.id); });
  };
  return h("section", {class: "card wide"}, h("h2", {}, "Submit a task"),
    h("form", {class: "submit", onsubmit: send}, name, args, kwargs, queue,
      h("button", {type: "submit", id: "submit-button"}, "Submit")));
}

// -- the live feed: every event, pausable, filtered by task name and status ---------

class Feed {
  constructor() {
    this.all = [];        // the latest events, filtered or not (for a change of filter)
    this.held = 0;        // events that came while paused
    this.paused = false;
    this.rows = h("tbody", {id: "feed-rows"});
    this.name = h("input", {id: "feed-task", placeholder: "task name", oninput: () => this.redraw()});
    this.status = h("select", {id: "feed-status", onchange: () => this.redraw()},
      h("option", {value: ""}, "any status"), ...STATUSES.map((s) => h("option", {value: s}, s)));
    this.pause = h("button", {id: "feed-pause", type: "button", onclick: () => this.toggle()}, "Pause");
    this.count = h("span", {class: "muted", id: "feed-held"});
    this.element = h("section", {class: "card wide"},
      h("h2", {}, "Live feed"),
      h("div", {class: "controls"}, this.pause, this.name, this.status, this.count),
      h("div", {class: "scroll"}, h("table", {class: "feed"}, h("thead", {}, h("tr", {},
        ...["time", "task", "id", "attempt", "event", "detail"].map((c) => h("th", {}, c)))), this.rows)));
  }

  static statusOf(event) { return event.kind === "partial" ? "partial" : event.status; }

  matches(event) {
    const name = this.name.value.trim(), status = this.status.value;
    return (!name || event.task.includes(name)) && (!status || Feed.statusOf(event) === status);
  }

  row(event) {
    let detail = "";
    if (event.kind === "partial") detail = "[" + event.seq + "] " + json(event.value, 300);
    else if (event.error) detail = event.error.type + ": " + event.error.message;
    else if (event.kind === "final") detail = "returning " + json(event.returning, 300);
    return h("tr", {class: "kind-" + event.kind},
      h("td", {}, clock(event.ts)), h("td", {}, event.task),
      h("td", {class: "id"}, taskLink(event.id, shortId(event.id))),
      h("td", {class: "num"}, event.attempt), h("td", {}, badge(Feed.statusOf(event))),
      h("td", {class: "detail"}, detail));
  }

  reset(events) { this.all = events.slice(-500); this.redraw(); }

  add(event) {
    this.all.push(event);
    if (this.all.length > 1000) this.all.splice(0, 500);
    if (this.paused) { this.held += 1; this.count.textContent = this.held + " new while paused"; return; }
    if (!this.matches(event)) return;
    this.rows.prepend(this.row(event));
    while (this.rows.childElementCount > 300) this.rows.lastElementChild.remove();
  }

  gap(dropped) {
    this.rows.prepend(h("tr", {class: "gap"}, h("td", {colspan: 6}, dropped + " events not shown (this browser fell behind)")));
  }

  redraw() {
    const shown = this.all.filter((e) => this.matches(e)).slice(-300).reverse();
    this.rows.replaceChildren(...shown.map((e) => this.row(e)));
  }

  toggle() {
    this.paused = !this.paused;
    this.pause.textContent = this.paused ? "Resume" : "Pause";
    if (!this.paused) { this.held = 0; this.count.textContent = ""; this.redraw(); }
  }
}
