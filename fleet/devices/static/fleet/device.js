// The device page's sparklines (admin): one small line per health series, hour by hour over
// the last 24 hours; an hour without telemetry is a gap. Data: #health-data
// (fleet.devices.selectors.device_health_series), then the "charts" of each live refresh
// (fleet/core/static/fleet/live.js). The figures are also in words beside each.
"use strict";
(function () {
  const source = document.getElementById("health-data");
  if (!source || typeof Chart === "undefined") return;
  const hour = (seconds) => new Date(seconds * 1000).toISOString().slice(11, 16) + " UTC";
  const charts = {};

  function draw(data) {
    for (const line of data.series) {
      const chart = charts[line.key];
      if (chart) {
        chart.data.labels = data.hours.map(hour);
        chart.data.datasets[0].data = line.points;
        chart.update("none");
        continue;
      }
      const canvas = document.getElementById("spark-" + line.key);
      if (canvas) charts[line.key] = sparkline(canvas, data, line);
    }
  }

  function sparkline(canvas, data, line) {
    return new Chart(canvas, {
      type: "line",
      data: {
        labels: data.hours.map(hour),
        datasets: [{ label: line.label, data: line.points, borderColor: "#417690", borderWidth: 1.5, pointRadius: 1.5, spanGaps: false, fill: false }],
      },
      options: {
        maintainAspectRatio: false,
        animation: false,
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              label: (item) => `${item.parsed.y.toLocaleString(undefined, { maximumFractionDigits: line.decimals })} ${line.unit}`,
            },
          },
        },
        scales: { x: { display: false }, y: { display: false, beginAtZero: line.key !== "temp_c" && line.key !== "rss_mb" } },
      },
    });
  }

  draw(JSON.parse(source.textContent));
  document.addEventListener("fleet:live", (event) => {
    if (event.detail.charts) draw(event.detail.charts);
  });
})();
