// Reader viewer: zoom/pan, window/level (CSS filter), keyboard answers, visible-time measurement.
(function () {
  "use strict";
  const img = document.getElementById("xray");
  const stage = document.getElementById("stage");
  const form = document.getElementById("answer-form");
  if (!img || !form) return;

  // progress bar width (no inline styles: the CSP forbids them)
  const fill = document.querySelector(".fill");
  if (fill) fill.style.width = (100 * Number(fill.dataset.done) / Math.max(1, Number(fill.dataset.total))) + "%";

  // --- view state ---------------------------------------------------------------------------
  const view = { scale: 1, x: 0, y: 0, level: 1, window: 1 };
  const levelInput = document.getElementById("level");
  const windowInput = document.getElementById("window");
  function apply() {
    img.style.transform = `translate(-50%, -50%) translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
    img.style.filter = `brightness(${view.level}) contrast(${view.window})`;
    levelInput.value = view.level;
    windowInput.value = view.window;
  }
  function reset() { Object.assign(view, { scale: 1, x: 0, y: 0, level: 1, window: 1 }); apply(); }
  function zoom(factor) { view.scale = Math.min(12, Math.max(0.5, view.scale * factor)); apply(); }
  levelInput.addEventListener("input", () => { view.level = Number(levelInput.value); apply(); });
  windowInput.addEventListener("input", () => { view.window = Number(windowInput.value); apply(); });
  document.getElementById("reset").addEventListener("click", reset);
  stage.addEventListener("wheel", (e) => { e.preventDefault(); zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15); }, { passive: false });
  stage.addEventListener("contextmenu", (e) => e.preventDefault());
  let drag = null;
  stage.addEventListener("pointerdown", (e) => {
    drag = { button: e.button, x: e.clientX, y: e.clientY, view: { ...view } };
    stage.setPointerCapture(e.pointerId);
    stage.classList.add("dragging");
  });
  stage.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (drag.button === 2) {  // right-drag: window (x) and level (y), as on a PACS workstation
      view.window = Math.min(3, Math.max(0.3, drag.view.window * Math.exp(dx / 200)));
      view.level = Math.min(1.7, Math.max(0.3, drag.view.level * Math.exp(-dy / 200)));
    } else {
      view.x = drag.view.x + dx; view.y = drag.view.y + dy;
    }
    apply();
  });
  const endDrag = () => { drag = null; stage.classList.remove("dragging"); };
  stage.addEventListener("pointerup", endDrag);
  stage.addEventListener("pointercancel", endDrag);
  apply();

  // --- time on this image, counting only while the tab is visible -------------------------------
  let visibleMs = 0, since = performance.now();
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) { visibleMs += performance.now() - since; } else { since = performance.now(); }
  });

  // --- answering -----------------------------------------------------------------------------
  const keyed = {};
  form.querySelectorAll("input[data-key]").forEach((input) => { keyed[input.dataset.key.toLowerCase()] = input; });
  const missingBox = document.getElementById("missing");
  function missing() {
    const out = [];
    form.querySelectorAll("fieldset[data-required]").forEach((fs) => {
      const ok = fs.querySelector("input:checked") !== null;
      fs.classList.toggle("missing", !ok);
      if (!ok) out.push(fs.querySelector("legend").textContent);
    });
    return out;
  }
  let sent = false;
  form.addEventListener("submit", (e) => {
    const gaps = missing();
    if (gaps.length || sent) {
      e.preventDefault();
      if (gaps.length) { missingBox.textContent = "Please answer: " + gaps.join("; "); missingBox.hidden = false; }
      return;
    }
    sent = true;  // the server ignores a second submit anyway; this just avoids a needless request
    if (!document.hidden) visibleMs += performance.now() - since;
    document.getElementById("elapsed_ms").value = String(Math.round(visibleMs));
    document.getElementById("submit").disabled = true;
  });
  form.addEventListener("change", () => { if (!missingBox.hidden) missing(); });

  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLTextAreaElement || e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key.toLowerCase();
    if (key === "enter") { e.preventDefault(); form.requestSubmit(); return; }
    if (key === "+" || key === "=") { zoom(1.25); return; }
    if (key === "-") { zoom(0.8); return; }
    if (key === "0") { reset(); return; }
    const input = keyed[key];
    if (input) { e.preventDefault(); input.checked = true; input.dispatchEvent(new Event("change", { bubbles: true })); }
  });
})();
