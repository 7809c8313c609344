// Live refresh for every control-room page (fleet/core/live.py): every few seconds, ask the
// page's live URL (#live-status data-live-url) for its parts, rendered by the same templates
// as the page, and replace each [data-live-part] (and each read-only admin field named in
// "fields") in place; then tell the page's own script (charts) through a "fleet:live" event.
// No full reload. Polling pauses while the tab is hidden and backs off after errors.
"use strict";
(function () {
  const status = document.getElementById("live-status");
  if (!status || !status.dataset.liveUrl) return;
  const clock = status.querySelector("[data-live-clock]");
  const alert = status.querySelector("[data-live-alert]");
  const every = (Number(status.dataset.liveSeconds) || 5) * 1000;
  const longest = 60 * 1000;
  let delay = every;
  let timer = null;
  let busy = false;
  let failing = false;

  // Parsed like the page was, so an unchanged part compares equal and is left alone (no
  // flicker, and an element a reader holds stays in the page).
  function replace(element, html) {
    if (!element || element.contains(document.activeElement)) return; // someone is using it
    const fresh = document.createElement("template");
    fresh.innerHTML = html;
    if (fresh.innerHTML !== element.innerHTML) element.replaceChildren(fresh.content);
  }

  function apply(answer) {
    for (const [name, html] of Object.entries(answer.parts || {})) {
      for (const part of document.querySelectorAll(`[data-live-part="${CSS.escape(name)}"]`)) replace(part, html);
    }
    for (const [name, html] of Object.entries(answer.fields || {})) {
      replace(document.querySelector(`.field-${CSS.escape(name)} .readonly`), html);
    }
    document.dispatchEvent(new CustomEvent("fleet:live", { detail: answer }));
  }

  function trouble(text) {
    failing = true;
    delay = Math.min(delay * 2, longest);
    alert.textContent = `${text} Retrying in ${Math.round(delay / 1000)} s.`;
  }

  async function refresh() {
    timer = null;
    if (document.hidden || busy) return;
    busy = true;
    try {
      const response = await fetch(status.dataset.liveUrl + window.location.search, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (!response.ok || !(response.headers.get("content-type") || "").includes("json")) {
        // A login page instead of the parts: the session ended.
        trouble(response.ok ? "Connection lost (logged out? reload the page)." : `Connection lost (${response.status}).`);
      } else {
        const answer = await response.json();
        apply(answer);
        if (!document.hidden) clock.textContent = `Updated ${answer.updated}; refreshes every ${every / 1000} s.`;
        delay = every;
        if (failing) alert.textContent = "Connection back.";
        failing = false;
      }
    } catch (error) {
      trouble("Connection lost.");
    } finally {
      busy = false;
      schedule();
    }
  }

  function schedule() {
    if (timer === null && !document.hidden) timer = window.setTimeout(refresh, delay);
  }

  // Hidden: no polling at all; visible again: refresh at once, then every few seconds.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      window.clearTimeout(timer);
      timer = null;
      clock.textContent = "Paused while the tab is hidden.";
    } else if (timer === null && !busy) {
      delay = every;
      refresh();
    }
  });
  schedule();
})();
