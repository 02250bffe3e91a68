// The console's only script (no inline script: the CSP forbids it). Progressive: every
// page works without it. It refreshes the overview's live part, fills in a message
// lookup's rows with the pending ones, and ticks the "select every dead letter on this page" box.
"use strict";

(function () {
  const live = document.getElementById("live");
  const pause = document.getElementById("pause-live");
  if (live && live.dataset.live) {
    const refresh = async () => {
      if (document.hidden || (pause && pause.checked)) return;
      try {
        const response = await fetch(live.dataset.live, { credentials: "same-origin" });
        if (response.ok) live.innerHTML = await response.text();
      } catch (e) {
        // The next tick tries again; the page keeps the last numbers meanwhile.
      }
    };
    // Every 5 s; every second while the first reading is still being made.
    const tick = async () => {
      await refresh();
      setTimeout(tick, document.getElementById("reading") ? 1000 : 5000);
    };
    setTimeout(tick, document.getElementById("reading") ? 1000 : 5000);
  }
  // The message lookup's rows, read again with the pending ones (they may read the
  // whole backlog, so the page answered without them).
  const part = document.querySelector("[data-fragment]");
  if (part) {
    fetch(part.dataset.fragment, { credentials: "same-origin" })
      .then((response) => (response.ok ? response.text() : Promise.reject(response.status)))
      .then((html) => { part.innerHTML = html; })
      .catch((status) => {
        // Say so, and keep the link that asks for the whole lookup in one page.
        const searching = document.getElementById("searching");
        if (searching) {
          searching.firstChild.textContent =
            "Could not read the pending rows (" + (typeof status === "number" ? "HTTP " + status : "no answer") + "): ";
        }
      });
  }
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll('input[type=checkbox][name=id]')) box.checked = all.checked;
    });
  }
})();
