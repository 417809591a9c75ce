// A job's page, live: state and progress, the round timeline and task grid (with each site's
// decision and whether its agent is online), one chart per metric (Chart.js) with a table of
// each series' latest value, each site's log tail, and who is holding the open round (its
// clocks tick in lagging.js).
// Points are placed as dashboard/metrics.py places them: a point with a step goes on its key's
// "by step" chart, a point with a round (and no step) on its "by round" chart (rounds from 1),
// any other one after the largest x of its series. The server sends each series downsampled to
// at most MAX_POINTS points; live points are added to it, and once a series holds twice that
// the charts are fetched again (downsampled again), so the page stays bounded.
"use strict";
(function () {
  const socketPath = document.currentScript.dataset.socket;
  const live = window.FedPortalLive;
  const chartsEl = document.getElementById("charts");
  const AGGREGATE = chartsEl.dataset.aggregate;
  const MAX_POINTS = Number(chartsEl.dataset.maxPoints) || 1000;
  const TERMINAL = ["completed", "failed", "aborted"];
  const PALETTE = ["#0b57d0", "#b3261e", "#146c2e", "#8a4b00", "#6f2da8", "#00696f", "#9c1c6b", "#4a5a00"];
  // The charts, and each site's last logged point they hold (dashboard/metrics.py's
  // metric_snapshot): a live point at or below it was on its way while they were read.
  const snapshot = JSON.parse(document.getElementById("chart-data").textContent);
  let data = snapshot.charts;
  let through = snapshot.through || {};
  const charts = {};
  const colours = {};

  function colour(name) {
    if (name === AGGREGATE) return "#1a1a1a";
    if (!(name in colours)) colours[name] = PALETTE[Object.keys(colours).length % PALETTE.length];
    return colours[name];
  }

  // Rounds count from 0 on the wire and from 1 for people (common/rounds.py).
  function roundForPeople(index) {
    return index + 1;
  }

  function slug(text) {
    return text.replace(/[^A-Za-z0-9_-]+/g, "-");
  }

  function figureFor(id, chart) {
    const figure = document.createElement("figure");
    figure.className = "chart";
    figure.dataset.chart = id;
    const headingId = "chart-" + slug(id);
    figure.innerHTML =
      '<figcaption><h3 id="' + headingId + '"></h3></figcaption>' +
      '<div class="canvas-box"><canvas role="img"></canvas></div>' +
      '<p class="help downsampled" hidden></p>' +
      '<table class="latest"><caption></caption><thead><tr><th scope="col">Series</th>' +
      '<th scope="col"></th><th scope="col">Latest value</th></tr></thead><tbody></tbody></table>';
    figure.querySelector("h3").textContent = chart.key + " (by " + chart.axis + ")";
    figure.querySelector("caption").textContent = "Latest " + chart.key + " of each series";
    figure.querySelector("thead th:nth-child(2)").textContent = chart.axis === "round" ? "Round" : "Step";
    figure.querySelector("canvas").setAttribute(
      "aria-label", "Line chart of " + chart.key + " by " + chart.axis + "; the table below gives each series' latest value."
    );
    return figure;
  }

  function datasets(chart) {
    return Object.keys(chart.series).sort((a, b) => (a === AGGREGATE) - (b === AGGREGATE) || a.localeCompare(b)).map((name) => ({
      label: name,
      data: chart.series[name].map(([x, y]) => ({ x, y })),
      borderColor: colour(name),
      backgroundColor: colour(name),
      borderWidth: name === AGGREGATE ? 3 : 2,
      borderDash: name === AGGREGATE ? [6, 3] : [],
      pointRadius: 3,
      tension: 0,
    }));
  }

  function fillTable(figure, chart) {
    const body = figure.querySelector("tbody");
    body.replaceChildren();
    for (const dataset of datasets(chart)) {
      const last = dataset.data[dataset.data.length - 1];
      if (!last) continue;
      const row = body.insertRow();
      row.dataset.series = dataset.label;
      const head = document.createElement("th");
      head.scope = "row";
      head.textContent = dataset.label;
      row.appendChild(head);
      row.insertCell().textContent = String(last.x);
      row.insertCell().textContent = Number(last.y.toPrecision(6)).toString();
    }
  }

  // The series a chart drew from fewer points than it has, and how many it has.
  function noteDownsampled(figure, chart) {
    const counts = chart.counts || {};
    const cut = Object.keys(chart.series).filter((name) => (counts[name] || 0) > chart.series[name].length);
    const note = figure.querySelector(".downsampled");
    note.hidden = cut.length === 0;
    note.textContent = cut.length === 0 ? "" :
      "Downsampled: " + cut.map((name) => name + " drawn from " + chart.series[name].length + " of its " +
      counts[name] + " points").join("; ") + " (the lowest and highest of each stretch). The CSV download has every point.";
  }

  // Draws are folded into one per chart and animation frame: a burst of points redraws once.
  const dirty = new Set();
  let frame = null;
  function schedule(id) {
    dirty.add(id);
    if (frame === null) {
      frame = requestAnimationFrame(() => {
        frame = null;
        const ids = Array.from(dirty);
        dirty.clear();
        ids.forEach(draw);
      });
    }
  }

  function draw(id) {
    const chart = data[id];
    let entry = charts[id];
    if (!entry) {
      const figure = figureFor(id, chart);
      const ids = Object.keys(data).sort();
      const after = ids.slice(ids.indexOf(id) + 1).find((other) => charts[other]);
      chartsEl.insertBefore(figure, after ? charts[after].figure : null);
      let graph = null;
      if (window.Chart) {
        graph = new window.Chart(figure.querySelector("canvas"), {
          type: "line",
          data: { datasets: datasets(chart) },
          options: {
            animation: false,
            responsive: true,
            maintainAspectRatio: false,
            parsing: true,
            scales: {
              x: { type: "linear", title: { display: true, text: chart.axis }, ticks: { precision: 0 } },
              y: { title: { display: true, text: chart.key } },
            },
            plugins: { legend: { position: "bottom" } },
          },
        });
      }
      entry = charts[id] = { figure, graph };
    } else if (entry.graph) {
      entry.graph.data.datasets = datasets(chart);
      entry.graph.update("none");
    }
    fillTable(entry.figure, chart);
    noteDownsampled(entry.figure, chart);
    document.getElementById("no-metrics").hidden = true;
  }

  // The first index whose x is greater than x (series are sorted by x).
  function insertionIndex(series, x) {
    let lo = 0;
    let hi = series.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (series[mid][0] <= x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  function addPoint(key, axis, name, x, value) {
    const id = key + " · by " + axis;
    const chart = (data[id] = data[id] || { key, axis, series: {}, counts: {} });
    chart.counts = chart.counts || {};
    const series = (chart.series[name] = chart.series[name] || []);
    if (x === null) x = (series.length ? series[series.length - 1][0] : 0) + 1;
    const at = insertionIndex(series, x);
    if (name === AGGREGATE && at > 0 && series[at - 1][0] === x) series[at - 1] = [x, value];
    else {
      series.splice(at, 0, [x, value]);
      chart.counts[name] = (chart.counts[name] || series.length - 1) + 1;
    }
    if (series.length > 2 * MAX_POINTS || metricsInflight) reloadMetrics();
    schedule(id);
  }

  // Whether a site's live point (or line) is one the page holds already: its id is not above
  // the last the page's snapshot held or it heard since. A site's ids rise in the order its
  // entries are stored, so this is exact; then `last` moves to the entry's id.
  function heardBefore(last, id) {
    return id !== undefined && id !== null && id <= (last || 0);
  }

  function onMetric(event) {
    if (event.site && event.id !== undefined) {
      if (heardBefore(through[event.site], event.id)) return;
      through[event.site] = event.id;
    }
    const hasStep = event.step !== null && event.step !== undefined;
    const hasRound = event.round !== null && event.round !== undefined;
    const axis = !hasStep && hasRound ? "round" : "step";
    const x = hasStep ? event.step : hasRound ? roundForPeople(event.round) : null;
    addPoint(event.key, axis, event.site || AGGREGATE, x, event.value);
  }

  // The charts' data fetched again (downsampled by the server); a point that arrives while
  // the answer is on its way may be missing from it, so it is fetched once more after.
  let reloading = null;
  let metricsInflight = false;
  let metricsAgain = false;
  function reloadMetrics() {
    if (metricsInflight) {
      metricsAgain = true;
      return;
    }
    if (reloading) return;
    reloading = setTimeout(() => {
      reloading = null;
      metricsInflight = true;
      metricsAgain = false;
      fetch(chartsEl.dataset.source, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.json() : null))
        .then((body) => {
          if (!body) return;
          data = body.charts;
          through = body.through || {};
          Object.keys(data).forEach(schedule);
        })
        .catch(() => {})
        .finally(() => {
          metricsInflight = false;
          if (metricsAgain) reloadMetrics();
        });
    }, 300);
  }

  function onLog(event) {
    const logs = document.getElementById("logs");
    const limit = Number(logs.dataset.limit);
    let box = logs.querySelector('.log[data-site="' + CSS.escape(event.site) + '"]');
    if (!box) {
      box = document.createElement("div");
      box.className = "log";
      box.dataset.site = event.site;
      const headingId = "log-" + slug(event.site);
      box.innerHTML = '<h3 id="' + headingId + '"></h3><pre tabindex="0" role="log" aria-labelledby="' + headingId + '"></pre>';
      box.querySelector("h3").textContent = event.site;
      logs.appendChild(box);
    }
    live.touched(logs);
    const pre = box.querySelector("pre");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    for (const line of event.lines) {
      if (heardBefore(Number(box.dataset.through), line.id)) continue;
      if (line.id !== undefined) box.dataset.through = line.id;
      const span = document.createElement("span");
      span.className = "line " + line.stream;
      span.textContent = (line.round !== null && line.round !== undefined ? "[round " + roundForPeople(line.round) + "] " : "") + line.text;
      pre.appendChild(span);
      pre.appendChild(document.createTextNode("\n"));
    }
    while (pre.querySelectorAll("span.line").length > limit) {
      pre.removeChild(pre.firstChild);
      pre.removeChild(pre.firstChild);
    }
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function onTask(event) {
    const rounds = document.getElementById("rounds");
    const cell = rounds.querySelector(
      'tr[data-site="' + CSS.escape(event.site) + '"] td[data-round="' + event.round + '"]'
    );
    if (!cell) {
      live.refresh(rounds);
    } else {
      live.touched(rounds);
      cell.dataset.state = event.state;
      cell.innerHTML = '<span class="badge task-' + event.state + '"></span>';
      cell.firstChild.textContent = event.state;
      if (event.reason) {
        const small = document.createElement("small");
        small.textContent = event.reason;
        cell.append(document.createElement("br"), small);
      }
    }
    if (event.state === "accepted") reloadMetrics();
    // An accepted upload or a declined task carries the site's privacy report: the grid's
    // privacy columns are the server's to render.
    if ((event.state === "accepted" || event.state === "failed") &&
        rounds.querySelector('[data-field="privacy"]')) {
      live.refresh(rounds);
    }
  }

  function onRound(event) {
    live.refresh(document.getElementById("rounds"));
    if (event.state === "closed") {
      for (const [key, value] of Object.entries(event.metrics || {})) {
        addPoint(key, "round", AGGREGATE, roundForPeople(event.round), value);
      }
      live.refresh(document.getElementById("models"));
      reloadMetrics();
    }
  }

  function onSiteStatus(event) {
    const row = document.querySelector('#task-grid tr[data-site="' + CSS.escape(event.site) + '"]');
    if (!row) return; // not a site of this job
    live.touched(document.getElementById("rounds"));
    const online = event.online && event.state === "enrolled";
    row.querySelector('[data-field="online"]').innerHTML = online
      ? '<span class="badge online">online</span>'
      : '<span class="badge offline">offline</span>';
    live.announce("job-announce", "Site " + event.site + " is " + (online ? "online" : "offline") + ".");
  }

  function onDecision(event) {
    const row = document.querySelector('#task-grid tr[data-site="' + CSS.escape(event.site) + '"]');
    if (!row) {
      live.refresh(document.getElementById("rounds"));
      return;
    }
    live.touched(document.getElementById("rounds"));
    const cell = row.querySelector('[data-field="decision"]');
    cell.textContent = event.decision;
    if (event.decided_by) {
      const small = document.createElement("small");
      small.textContent = "by " + event.decided_by;
      cell.append(" ", small);
    }
    live.announce("job-announce", "Site " + event.site + " " + event.decision + " the job.");
  }

  function showJob(event) {
    const badge = document.getElementById("job-state");
    badge.textContent = event.state;
    badge.dataset.state = event.state;
    badge.className = "badge job-" + event.state;
    document.getElementById("job-failure").textContent = event.failure_reason ? ": " + event.failure_reason : "";
    const progress = document.getElementById("job-progress");
    progress.value = event.completed_rounds;
    document.getElementById("job-progress-text").textContent =
      event.completed_rounds + " of " + progress.max + " rounds";
    const abort = document.getElementById("abort-form");
    if (abort && TERMINAL.includes(event.state)) abort.hidden = true;
  }

  function onJob(event) {
    const before = document.getElementById("job-state").dataset.state;
    showJob(event);
    if (event.state !== before) live.announce("job-announce", "The job is now " + event.state + ".");
  }

  // The job's state fetched again; a job.state event while the answer is on its way may be
  // newer than the answer, so the state is fetched once more after.
  let stateInflight = false;
  let stateAgain = false;
  function reloadState() {
    if (stateInflight) {
      stateAgain = true;
      return;
    }
    stateInflight = true;
    stateAgain = false;
    const badge = document.getElementById("job-state");
    fetch(badge.dataset.source, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : null))
      .then((job) => {
        if (job && !stateAgain) onJob(job);
      })
      .catch(() => {})
      .finally(() => {
        stateInflight = false;
        if (stateAgain) reloadState();
      });
  }

  // The socket has just connected (the first time, or again): fetch everything the page
  // shows, since events sent before it joined were not heard.
  function onSynced() {
    reloadState();
    live.refresh(document.getElementById("rounds"));
    live.refresh(document.getElementById("models"));
    live.refresh(document.getElementById("logs"));
    reloadMetrics();
  }

  // Who is holding the open round: any task, round, job or agent event may change it.
  const HOLDER_EVENTS = ["task.state", "round.state", "job.state", "site.status", "job.decision", "synced"];
  function refreshHolders(event) {
    if (HOLDER_EVENTS.includes(event.kind)) live.refresh(document.getElementById("round-sites"), 100);
  }
  // Heartbeats and lagging by time (half the round gone) have no event of their own.
  setInterval(() => live.refresh(document.getElementById("round-sites"), 0), 15000);

  Object.keys(data).forEach(draw);
  // What the socket hears; FedPortalJob.receive hands the page an event as the socket would.
  function receive(event) {
    refreshHolders(event);
    if (event.kind === "metrics") {
      for (const point of event.points) onMetric({ ...point, site: event.site });
    } else if (event.kind === "log") onLog(event);
    else if (event.kind === "task.state") onTask(event);
    else if (event.kind === "round.state") onRound(event);
    else if (event.kind === "job.state") {
      if (stateInflight) stateAgain = true;
      onJob(event);
      live.refresh(document.getElementById("rounds"));
      live.refresh(document.getElementById("models"));
    } else if (event.kind === "job.decision") onDecision(event);
    else if (event.kind === "site.status") onSiteStatus(event);
    else if (event.kind === "synced") onSynced();
  }
  live.connect(socketPath, receive);
  window.FedPortalJob = { charts: () => data, receive };
})();
