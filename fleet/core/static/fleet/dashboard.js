// The fleet dashboard's stacked bar (admin index): one bar per model version, one stack per
// variant; a click on a stack opens the list of those devices. Data: #versions-data, then
// the "charts" of each live refresh (fleet/core/static/fleet/live.js).
"use strict";
(function () {
  const source = document.getElementById("versions-data");
  const canvas = document.getElementById("versions-chart");
  if (!source || !canvas || typeof Chart === "undefined") return;
  const colours = ["#417690", "#e08e0b", "#5b8c5a", "#a35d8c", "#6c757d", "#b03a2e"];
  let chart = null;

  const datasets = (data) =>
    data.series.map((series, i) => ({
      label: series.variant,
      data: series.counts,
      links: series.links,
      backgroundColor: colours[i % colours.length],
      maxBarThickness: 96,
    }));

  function draw(data) {
    // No device reports a model: the part below says so, and there is no bar to draw.
    canvas.parentElement.hidden = data.labels.length === 0;
    if (chart) {
      chart.data.labels = data.labels;
      chart.data.datasets = datasets(data);
      chart.update("none");
      return;
    }
    chart = new Chart(canvas, {
      type: "bar",
      data: { labels: data.labels, datasets: datasets(data) },
      options: {
        maintainAspectRatio: false,
        animation: false,
        scales: {
          x: { stacked: true },
          y: { stacked: true, beginAtZero: true, ticks: { precision: 0 }, title: { display: true, text: "devices" } },
        },
        onClick(event, elements, chart) {
          if (!elements.length) return;
          const { datasetIndex, index } = elements[0];
          window.location.href = chart.data.datasets[datasetIndex].links[index];
        },
        onHover(event, elements) {
          event.native.target.style.cursor = elements.length ? "pointer" : "default";
        },
      },
    });
  }

  draw(JSON.parse(source.textContent));
  document.addEventListener("fleet:live", (event) => {
    if (event.detail.charts) draw(event.detail.charts);
  });
})();
