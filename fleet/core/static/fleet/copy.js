// Copy buttons beside shortened hashes (fleet.core.display.short_hash): a click puts the
// whole value on the clipboard and says so on the button for two seconds.
"use strict";
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const label = button.textContent;
  const done = (text) => {
    button.textContent = text;
    setTimeout(() => { button.textContent = label; }, 2000);
  };
  if (!navigator.clipboard) return done("select it");
  navigator.clipboard.writeText(button.dataset.copy).then(() => done("copied"), () => done("select it"));
});
