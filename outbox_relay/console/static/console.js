// The console's only script (no inline script: the CSP forbids it). Progressive: every
// page works without it. It refreshes the overview's live part and ticks the
// "select every dead letter on this page" box.
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
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll('input[type=checkbox][name=id]')) box.checked = all.checked;
    });
  }
})();
