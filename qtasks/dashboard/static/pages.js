// QTasks dashboard: a task's page (its events from the first, live) and the dead letters.
// Same rule as app.js: values reach the page as text only.
"use strict";

function taskPage(main, id) {
  const state = {id, task: "", status: "new", attempt: 1, worker: null, args: null,
    kwargs: null, created_at: null, started_at: null, finished_at: null, final: null};
  const title = h("h1", {id: "task-title"}, "task ", id);
  const summary = h("dl", {class: "summary", id: "task-summary"});
  const argsBox = h("pre", {id: "task-args", class: "value"}, "not reported yet");
  const attempts = h("div", {id: "attempts"});
  const outcome = h("div", {id: "task-outcome"});
  const cancel = QT.config.actions ? h("button", {id: "task-cancel", type: "button", class: "danger",
    onclick: () => act("/api/tasks/" + encodeURIComponent(id) + "/cancel", {reason: "from the dashboard"},
      () => notice("cancel sent to the workers"))}, "Cancel task") : null;
  const live = h("span", {id: "task-live", class: "muted"}, "connecting…");
  main.append(h("section", {class: "card wide"}, title, live, summary, cancel),
    h("section", {class: "card wide"}, h("h2", {}, "Arguments"), argsBox),
    h("section", {class: "card wide"}, h("h2", {}, "Attempts and partial results"), attempts),
    h("section", {class: "card wide"}, h("h2", {}, "Outcome"), outcome));
  const sections = new Map();

  function attemptSection(n) {
    if (!sections.has(n)) {
      const list = h("ol", {class: "partials", start: 0, id: "partials-" + n});
      const end = h("div", {class: "attempt-end"});
      const status = h("span", {class: "attempt-status"});
      attempts.append(h("div", {class: "attempt", id: "attempt-" + n},
        h("h3", {}, "attempt " + n + " ", status), list, end));
      sections.set(n, {list, end, status});
    }
    return sections.get(n);
  }

  function showError(box, error) {
    box.replaceChildren(h("p", {class: "error-line"}, error.type + ": " + error.message),
      error.traceback ? h("pre", {class: "traceback"}, error.traceback) : null);
  }

  function drawSummary() {
    title.replaceChildren(h("span", {class: "task-name"}, state.task || "task"), " ", h("code", {}, id));
    const rows = [["status", badge(state.status)], ["attempt", state.attempt],
      ["worker", state.worker || "-"], ["submitted", clock(state.created_at)],
      ["started", clock(state.started_at)], ["finished", clock(state.finished_at)],
      ["waited in queue", state.started_at && state.created_at ? seconds(state.started_at - state.created_at) : "-"],
      ["ran for", state.finished_at && state.started_at ? seconds(state.finished_at - state.started_at) : "-"]];
    summary.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {class: "field-" + k.replace(/ /g, "-")}, v)]));
    if (cancel) cancel.disabled = state.final !== null;
    if (state.args !== null) {
      argsBox.textContent = "args " + json(state.args) + "\nkwargs " + json(state.kwargs || {});
    } else if (state.started_at) {
      argsBox.textContent = "not reported (over 4 KiB, or sent by an older worker)";
    }
  }

  function take(event) {
    state.task = event.task;
    if (event.kind === "partial") {
      const section = attemptSection(event.attempt);
      section.list.append(h("li", {value: event.seq, class: "partial"},
        h("code", {class: "value"}, json(event.value))));
      return;
    }
    if (event.attempt >= state.attempt) {
      Object.assign(state, {status: event.status, attempt: event.attempt,
        worker: event.worker || state.worker, created_at: event.created_at || state.created_at,
        started_at: event.started_at || state.started_at});
    }
    if (event.args !== undefined) { state.args = event.args; state.kwargs = event.kwargs; }
    if (event.kind === "status" && event.status === "new" && event.error) {
      const failed = attemptSection(event.attempt - 1);  // the attempt that failed, retried
      failed.status.replaceChildren(badge("error"), " retried as attempt " + event.attempt);
      showError(failed.end, event.error);
    } else if (event.kind === "status") {
      attemptSection(event.attempt).status.replaceChildren(badge(event.status));
    }
    if (event.kind === "final") {
      state.final = event;
      state.finished_at = event.finished_at;
      attemptSection(event.attempt).status.replaceChildren(badge(event.status));
      if (event.error) showError(outcome, event.error);
      else outcome.replaceChildren(h("pre", {class: "value", id: "task-returning"}, pretty(event.returning)));
    }
    drawSummary();
  }

  function reset() {
    attempts.replaceChildren();
    outcome.replaceChildren(h("p", {class: "muted"}, "not finished yet"));
    sections.clear();
    Object.assign(state, {status: "new", attempt: 1, final: null});
  }

  reset();
  drawSummary();
  const source = new EventSource("/api/tasks/" + encodeURIComponent(id) + "/events");
  source.addEventListener("open", () => { live.textContent = "live"; setHealth("live", true); });
  source.addEventListener("reset", reset);
  source.addEventListener("event", (message) => take(JSON.parse(message.data)));
  source.addEventListener("end", () => { live.textContent = "finished"; setHealth(""); source.close(); });
  source.onerror = () => {
    if (!state.final) { live.textContent = "reconnecting…"; setHealth("reconnecting…", false); }
  };
  return () => source.close();
}

function deadPage(main) {
  const rows = h("tbody", {id: "dead-rows"});
  const count = h("span", {id: "dead-total"}, "-");
  const actions = QT.config.actions;
  const requeue = (refs) => act("/api/dead/requeue", {refs}, (r) => {
    notice("requeued " + r.requeued.length + (r.missing.length ? ", not found: " + r.missing.join(", ") : ""));
    load();
  });
  const purge = () => {
    if (confirm("Delete every dead letter for good?")) {
      act("/api/dead/purge", {}, (r) => { notice("purged " + r.purged); load(); });
    }
  };
  main.append(h("section", {class: "card wide"},
    h("h1", {}, "Dead letters (", count, ")"),
    h("div", {class: "controls"},
      h("button", {type: "button", onclick: () => load()}, "Refresh"),
      actions ? h("button", {type: "button", id: "requeue-all", onclick: () => requeue(null)}, "Requeue all") : null,
      actions ? h("button", {type: "button", id: "purge", class: "danger", onclick: purge}, "Purge") : null),
    h("table", {class: "dead"}, h("thead", {}, h("tr", {},
      ...["ref", "queue", "reason", "at", "task", "body", ""].map((c) => h("th", {}, c)))), rows)));

  async function load() {
    let data;
    try { data = await api("/api/dead?limit=200"); } catch (e) { notice(e.message, true); return; }
    count.textContent = data.count;
    rows.replaceChildren(...data.letters.map((d) => h("tr", {},
      h("td", {}, h("code", {}, d.ref)), h("td", {}, d.queue), h("td", {class: "reason"}, d.reason),
      h("td", {}, clock(d.at)),
      h("td", {}, d.id ? [d.task, " ", taskLink(d.id, d.id.slice(0, 8) + "…")] : "-"),
      h("td", {}, h("details", {}, h("summary", {}, d.size + " bytes"), h("pre", {class: "value"}, d.body))),
      h("td", {}, actions ? h("button", {type: "button", onclick: () => requeue([d.ref])}, "Requeue") : null))));
  }

  load();
  return null;
}
