// Copy buttons beside shortened hashes (fleet.core.display.short_hash): a click puts the
// whole value on the clipboard and says so for two seconds in a status beside the button
// (the button keeps its name, which is what screen readers announce).
"use strict";
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  let status = button.nextElementSibling;
  if (!status || !status.classList.contains("copy-status")) {
    status = document.createElement("span");
    status.className = "copy-status";
    status.setAttribute("role", "status");
    button.after(status);
  }
  const say = (text) => {
    status.textContent = " " + text;
    setTimeout(() => { status.textContent = ""; }, 2000);
  };
  if (!navigator.clipboard) return say("select the text in its tooltip to copy it");
  navigator.clipboard.writeText(button.dataset.copy).then(
    () => say("copied"),
    () => say("the browser refused; copy it from the tooltip"),
  );
});
