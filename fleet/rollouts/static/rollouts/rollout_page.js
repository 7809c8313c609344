// The rollout page (admin): its charts (vendored Chart.js; data in #rollout-chart-data, the
// numbers already rounded by fleet/rollouts/selectors.py), redrawn with the new series at
// each live refresh (fleet/core/static/fleet/live.js replaces the page's parts).
"use strict";
(function () {
  const root = document.getElementById("rollout-live");
  if (!root) return;
  const colours = ["#0969da", "#bc4c00", "#1a7f37", "#8250df", "#6e7781", "#cf222e"];
  const source = document.getElementById("rollout-chart-data");
  let data = source ? JSON.parse(source.textContent) : null;
  const charts = {};

  const time = (seconds, withDate) =>
    new Date(seconds * 1000).toLocaleString("en-GB", {
      timeZone: (data && data.tz) || "UTC",
      hour12: false,
      ...(withDate ? { dateStyle: "short", timeStyle: "long" } : { hour: "2-digit", minute: "2-digit", second: "2-digit" }),
    });
  const points = (series, key) =>
    series.filter((p) => p[key] !== null && p[key] !== undefined).map((p) => ({ x: p.t, y: p[key] }));
  const line = (label, pts, colour, extra) => ({
    label, data: pts, borderColor: colour, backgroundColor: colour, pointRadius: 1.5, borderWidth: 2, ...extra,
  });

  // One function per chart: the data -> its datasets.
  const datasets = {
    accuracy(d) {
      return d.accuracy.flatMap((s, i) => [
        line(`candidate ${d.target} (${s.variant})`, points(s.points, "candidate_pct"), colours[(2 * i) % 6]),
        line(`incumbent (${s.variant})`, points(s.points, "incumbent_pct"), colours[(2 * i + 1) % 6]),
      ]);
    },
    drop(d) {
      return d.accuracy.flatMap((s, i) => {
        const colour = colours[(2 * i) % 6];
        return [
          line(`confidence sequence, lower end (${s.variant})`, points(s.points, "lower_pp"), colour, { borderWidth: 0, pointRadius: 0 }),
          line(`confidence sequence (${s.variant})`, points(s.points, "upper_pp"), colour, {
            borderWidth: 0, pointRadius: 0, fill: "-1", backgroundColor: colour + "33",
          }),
          line(`drop (${s.variant})`, points(s.points, "drop_pp"), colour),
          line(`allowed drop (${s.variant})`, points(s.points, "allowed_pp"), "#cf222e", {
            borderDash: [6, 4], pointRadius: 0,
          }),
        ];
      });
    },
    labels(d) {
      return d.accuracy.flatMap((s, i) => [
        line(`candidate labels (${s.variant})`, points(s.points, "candidate_labels"), colours[(2 * i) % 6]),
        line(`incumbent labels (${s.variant})`, points(s.points, "incumbent_labels"), colours[(2 * i + 1) % 6]),
      ]);
    },
    errors(d) {
      const sets = d.telemetry.map((s, i) => line(`error rate ${s.version}`, points(s.points, "error_pct"), colours[i % 6]));
      const ceiling = d.error_rate.length ? d.error_rate[d.error_rate.length - 1].ceiling_pct : null;
      const xs = sets.flatMap((set) => set.data.map((p) => p.x)).concat(d.error_rate.map((p) => p.t));
      if (ceiling !== null && xs.length) {
        // The policy's ceiling, across the whole chart (hourly rates and 5-s evaluations alike).
        const ends = [Math.min(...xs), Math.max(...xs)].map((x) => ({ x, y: ceiling }));
        sets.push(line("ceiling", ends, "#cf222e", { borderDash: [6, 4], pointRadius: 0 }));
      }
      return sets;
    },
    agreement(d) {
      const s = d.agreement || [];
      const colour = colours[3];
      return [
        line("confidence sequence, lower end", points(s, "lower_pct"), colour, { borderWidth: 0, pointRadius: 0 }),
        line("confidence sequence", points(s, "upper_pct"), colour, {
          borderWidth: 0, pointRadius: 0, fill: "-1", backgroundColor: colour + "33",
        }),
        line(`agreement of ${d.target} with the live model`, points(s, "agreement_pct"), colour),
        line("required agreement", points(s, "required_pct"), "#cf222e", { borderDash: [6, 4], pointRadius: 0 }),
      ];
    },
    latency(d) {
      return d.telemetry.map((s, i) => line(`p95 ${s.version}`, points(s.points, "p95_ms"), colours[i % 6]));
    },
  };
  const units = { accuracy: "%", drop: "pp", labels: "labels", errors: "%", agreement: "%", latency: "ms" };

  // A chart with nothing to draw says so (a policy without that gate, a stage just begun).
  function note(canvas, sets) {
    const empty = sets.every((set) => set.data.length === 0);
    const figure = canvas.closest("figure");
    let text = figure.querySelector(".chart-empty");
    if (empty && !text) {
      text = document.createElement("p");
      text.className = "chart-empty help";
      text.textContent = "Nothing to draw yet.";
      figure.appendChild(text);
    }
    if (text) text.hidden = !empty;
  }

  function draw() {
    if (!data || typeof Chart === "undefined") return;
    for (const name of Object.keys(datasets)) {
      const canvas = document.getElementById(`chart-${name}`);
      if (!canvas) continue;
      note(canvas, datasets[name](data));
      if (charts[name]) {
        charts[name].data.datasets = datasets[name](data);
        charts[name].update("none");
        continue;
      }
      charts[name] = new Chart(canvas, {
        type: "line",
        data: { datasets: datasets[name](data) },
        options: {
          maintainAspectRatio: false,
          animation: false,
          parsing: false,
          scales: {
            x: { type: "linear", ticks: { callback: (value) => time(value, false), maxTicksLimit: 6 } },
            y: { title: { display: true, text: units[name] }, ticks: { precision: name === "labels" ? 0 : undefined } },
          },
          plugins: {
            // The band's lower edge is drawn, not named: the band is "confidence sequence".
            legend: { labels: { boxWidth: 12, filter: (item) => !item.text.includes("lower end") } },
            tooltip: {
              callbacks: {
                title: (items) => (items.length ? time(items[0].parsed.x, true) : ""),
                label: (item) => `${item.dataset.label}: ${item.parsed.y.toLocaleString("en")} ${units[name]}`,
              },
            },
          },
        },
      });
    }
  }

  // The live refresh (fleet/core/static/fleet/live.js) replaced the parts; the charts take
  // the new series.
  document.addEventListener("fleet:live", (event) => {
    if (!event.detail.charts) return;
    data = event.detail.charts;
    draw();
  });

  draw();
})();
