// Study dashboard: live progress (polls status.json every 5 s and updates the reader rows).
(function () {
  "use strict";
  const root = document.getElementById("dashboard");
  if (!root) return;
  const live = document.getElementById("live");
  async function poll() {
    try {
      const resp = await fetch(root.dataset.statusUrl, { credentials: "same-origin", cache: "no-store" });
      if (!resp.ok) { live.textContent = "(live updates stopped: " + resp.status + ")"; return; }
      const status = await resp.json();
      status.readers.forEach((r) => {
        const row = document.querySelector(`tr[data-reader="${CSS.escape(r.reader)}"]`);
        if (!row) return;
        row.querySelector(".answered").textContent = `${r.answered} / ${r.total}`;
        row.querySelector(".joined").textContent = r.joined ? "yes" : "no";
        row.querySelector(".last").textContent = r.last_answer || "";
        const bar = row.querySelector("progress");
        bar.max = Math.max(1, r.total); bar.value = r.answered;
      });
      live.textContent = "(live, updated " + new Date().toLocaleTimeString() + ")";
    } catch (e) {
      live.textContent = "(live updates paused: " + e + ")";
    }
    setTimeout(poll, 5000);
  }
  setTimeout(poll, 5000);
})();
