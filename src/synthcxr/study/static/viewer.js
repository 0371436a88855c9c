// Reader viewer: zoom/pan, window/level presets and invert (CSS filter), full resolution, keyboard
// answers, visible-time measurement. A paired task has two images; they share one view (zoom, pan
// and window move together, so the two are always compared alike).
(function () {
  "use strict";
  const imgs = Array.from(document.querySelectorAll("img.xray"));
  const stages = Array.from(document.querySelectorAll(".stage"));
  const form = document.getElementById("answer-form");
  if (!imgs.length || !form) return;

  // progress bar width (no inline styles: the CSP forbids them)
  const fill = document.querySelector(".fill");
  if (fill) fill.style.width = (100 * Number(fill.dataset.done) / Math.max(1, Number(fill.dataset.total))) + "%";

  // --- view state ---------------------------------------------------------------------------
  const view = { scale: 1, x: 0, y: 0, level: 1, window: 1, invert: false };
  // a window [lo, hi] of the grey range (0..1) as CSS brightness b then contrast c:
  // (b v - 0.5) c + 0.5 = (v - lo) / (hi - lo)  <=>  b = 1 / (hi + lo), c = (hi + lo) / (hi - lo)
  const PRESETS = { lung: [0.0, 0.65], soft: [0.2, 0.8], bone: [0.4, 1.0] };
  const invertButton = document.getElementById("invert");
  const levelInput = document.getElementById("level");
  const windowInput = document.getElementById("window");
  function apply() {
    imgs.forEach((img) => {
      img.style.transform = `translate(-50%, -50%) translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
      img.style.filter = `brightness(${view.level}) contrast(${view.window})` + (view.invert ? " invert(1)" : "");
    });
    levelInput.value = view.level;
    windowInput.value = view.window;
    invertButton.setAttribute("aria-pressed", String(view.invert));
    document.body.dataset.view = JSON.stringify(view);  // read by the browser tests
  }
  function reset() { Object.assign(view, { scale: 1, x: 0, y: 0, level: 1, window: 1, invert: false }); apply(); }
  function zoom(factor) { view.scale = Math.min(32, Math.max(0.5, view.scale * factor)); apply(); }
  function preset(name) {
    const [lo, hi] = PRESETS[name];
    view.level = 1 / (hi + lo);
    view.window = (hi + lo) / (hi - lo);
    apply();
  }
  function fullResolution() {  // one image pixel per screen pixel
    const img = imgs[0];
    if (!img.naturalWidth || !img.clientWidth) return;
    view.scale = img.naturalWidth / (img.clientWidth * (window.devicePixelRatio || 1));
    view.x = 0; view.y = 0;
    apply();
  }
  function toggleInvert() { view.invert = !view.invert; apply(); }
  document.querySelectorAll("button[data-preset]").forEach((b) => b.addEventListener("click", () => preset(b.dataset.preset)));
  invertButton.addEventListener("click", toggleInvert);
  document.getElementById("fullres").addEventListener("click", fullResolution);
  levelInput.addEventListener("input", () => { view.level = Number(levelInput.value); apply(); });
  windowInput.addEventListener("input", () => { view.window = Number(windowInput.value); apply(); });
  document.getElementById("reset").addEventListener("click", reset);
  let drag = null;
  stages.forEach((stage) => {
  stage.addEventListener("wheel", (e) => { e.preventDefault(); zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15); }, { passive: false });
  stage.addEventListener("contextmenu", (e) => e.preventDefault());
  stage.addEventListener("pointerdown", (e) => {
    drag = { button: e.button, x: e.clientX, y: e.clientY, view: { ...view }, stage };
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
  });
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
    if (key === "i") { toggleInvert(); return; }
    if (key === "f") { fullResolution(); return; }
    const input = keyed[key];
    if (input) { e.preventDefault(); input.checked = true; input.dispatchEvent(new Event("change", { bubbles: true })); }
  });
})();
