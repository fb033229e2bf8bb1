// pgdurable ui: live updates of the page's #live region. Small and dependency-free.
//
// The region is fetched again with the header X-Live: 1 (the server answers with that
// region alone, and its hash in X-Live-Version; the page has the hash it was drawn from). The interval starts at 1 s, grows by half after every poll that changed
// nothing (to 15 s at most) and is back to 1 s after a change. Polling stops for a finished
// run (X-Live-Final: 1) and while the tab is hidden (it resumes when the tab is shown).
// A region whose form the viewer is filling in is not replaced: a note offers a reload.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !live.dataset.poll) { return; }
  var MIN = parseInt(live.dataset.min, 10) || 1000, MAX = Math.max(15000, MIN);
  var delay = MIN, timer = null, dirty = false, busy = false;
  var stale = document.getElementById("stale");

  function editing() {
    var el = document.activeElement;
    return dirty || (el && live.contains(el) &&
      (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT"));
  }
  function openDetails() {
    var open = [];
    live.querySelectorAll("details[open]").forEach(function (d) { open.push(d.className); });
    return open;
  }
  function schedule() {
    clearTimeout(timer);
    timer = null;
    if (document.hidden || live.dataset.final === "1") { return; }
    timer = setTimeout(poll, delay);
  }
  function poll() {
    if (busy) { return; }
    busy = true;
    fetch(live.dataset.poll, { headers: { "X-Live": "1" }, credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        var final = r.headers.get("X-Live-Final") === "1";
        var version = r.headers.get("X-Live-Version");
        return r.text().then(function (html) {
          return { html: html, final: final, version: version };
        });
      })
      .then(function (got) {
        if (got.version === live.dataset.version) {
          delay = Math.min(delay * 1.5, MAX);
        } else if (editing()) {
          if (stale) { stale.hidden = false; }
          delay = Math.min(delay * 1.5, MAX);
        } else {
          var open = openDetails();
          live.innerHTML = got.html;  // the server's own escaped markup
          live.querySelectorAll("details").forEach(function (d) {
            if (open.indexOf(d.className) >= 0) { d.open = true; }
          });
          live.dataset.version = got.version;
          delay = MIN;
        }
        if (got.final) { live.dataset.final = "1"; }
      })
      .catch(function () { delay = Math.min(delay * 2, MAX); })
      .then(function () { busy = false; schedule(); });
  }
  live.addEventListener("input", function () { dirty = true; });
  live.addEventListener("submit", function () { dirty = true; clearTimeout(timer); });
  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { clearTimeout(timer); timer = null; }
    else { delay = MIN; poll(); }
  });
  schedule();
})();
