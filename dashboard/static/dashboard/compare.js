// The compare page: one chart of the chosen metric, a line a job for all sites together
// (and, when asked, a dashed line for each of its sites). The choices live in the URL: the
// controls are a GET form, sent again as soon as one of them changes.
"use strict";
(function () {
  const controls = document.getElementById("compare-controls");
  if (controls) {
    controls.addEventListener("change", () => controls.requestSubmit());
  }

  const canvas = document.getElementById("compare-canvas");
  const source = document.getElementById("compare-data");
  if (!canvas || !source || !window.Chart) return;
  const data = JSON.parse(source.textContent);

  // Colours that stay apart for ten jobs and read on white (Tableau 10).
  const COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

  const datasets = [];
  data.jobs.forEach((job, index) => {
    const colour = COLOURS[index % COLOURS.length];
    const names = Object.keys(job.series).sort((a, b) =>
      a === data.aggregate ? -1 : b === data.aggregate ? 1 : a.localeCompare(b));
    names.forEach((name) => {
      const aggregate = name === data.aggregate;
      datasets.push({
        label: aggregate ? job.name : job.name + " · " + name,
        data: job.series[name].map((point) => ({ x: point[0], y: point[1] })),
        borderColor: colour,
        backgroundColor: colour,
        borderWidth: aggregate ? 2.5 : 1.2,
        borderDash: aggregate ? [] : [5, 4],
        pointRadius: aggregate ? 2 : 0,
        tension: 0,
      });
    });
  });

  new window.Chart(canvas, {
    type: "line",
    data: { datasets },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      parsing: false,
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: data.axis }, ticks: { precision: 0 } },
        y: { title: { display: true, text: data.metric } },
      },
      plugins: { legend: { position: "bottom" } },
    },
  });
})();
