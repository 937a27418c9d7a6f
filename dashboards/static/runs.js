// Runs list: keep the table fresh while runs are live, and open the compare page for picked runs.
// With auth on, the page comes without rows: the table is asked for with the browser's token.
(function () {
  "use strict";
  var C = window.SWCommon;  // common.js: loaded first by base.html
  var table = document.getElementById("runs-table");
  var button = document.getElementById("compare-selected");
  if (button) {
    button.addEventListener("click", function () {
      var ids = Array.prototype.map.call(document.querySelectorAll("input.pick:checked"), function (b) { return b.value; });
      if (ids.length) { window.location.href = "/compare?runs=" + ids.join(","); }
    });
  }
  // The ages' tooltips: the time in the browser's zone, the run pages' format.
  function titleTimes() {
    Array.prototype.forEach.call(document.querySelectorAll("table.runs time[datetime]"), function (node) {
      var date = new Date(node.getAttribute("datetime"));
      if (!isNaN(date.getTime())) { node.title = C.formatTime(date); }
    });
  }
  titleTimes();
  // The config-column picker lists the keys of the runs in the table: a page served without
  // rows (auth on) learns them from the table it fetches.
  function offerConfigKeys() {
    var picker = document.getElementById("config-columns");
    var runs = document.querySelector("table.runs[data-config-keys]");
    if (!picker || !runs) { return; }
    var have = {};
    Array.prototype.forEach.call(picker.options, function (o) { have[o.value] = true; });
    JSON.parse(runs.dataset.configKeys).forEach(function (k) {
      if (!have[k]) { picker.appendChild(C.el("option", { value: k }, k)); }
    });
  }
  offerConfigKeys();
  // Likewise the summary-column picker: the scalars the listed runs logged, a new one picked
  // when the table shows it (a default column of a page served without rows).
  function offerSummaryNames() {
    var picker = document.getElementById("summary-columns");
    var runs = document.querySelector("table.runs[data-scalar-names]");
    if (!picker || !runs) { return; }
    var shown = JSON.parse(runs.dataset.summaryColumns);
    var have = {};
    Array.prototype.forEach.call(picker.options, function (o) { have[o.value] = true; });
    JSON.parse(runs.dataset.scalarNames).forEach(function (k) {
      if (have[k]) { return; }  // as served, or as the user left it
      var option = picker.appendChild(C.el("option", { value: k }, k));
      option.selected = shown.indexOf(k) >= 0;
    });
  }
  offerSummaryNames();
  if (!table) { return; }
  var locked = table.dataset.locked === "1";
  var refused = false;  // the server refused the stored token: asking again is the user's move
  var token = C.token;

  function promptToken(refused) {
    var prompt = document.getElementById("runs-token-prompt");
    if (!prompt || prompt.dataset.shown) { return; }
    prompt.dataset.shown = "1";
    prompt.appendChild(document.createTextNode(refused ? "The stored token was refused (revoked?); paste another: " : "Paste one: "));
    C.tokenForm(prompt, "runs-token-input");
  }

  function refresh(force) {
    if (!force && document.querySelector("input.pick:checked")) { return; }  // do not wipe a selection
    var params = new URLSearchParams(window.location.search);
    params.set("fragment", "true");
    var headers = { Accept: "text/html" };
    var t = token();
    if (t) { headers.Authorization = "Bearer " + t; }
    fetch(window.location.pathname + "?" + params.toString(), { headers: headers })
      .then(function (r) {
        if (r.status === 401) { refused = true; promptToken(Boolean(t)); return null; }
        if (r.status === 403 || r.status === 404) {  // the token is fine; these runs are not its
          refused = true;
          var notice = document.getElementById("runs-locked");
          if (notice) {
            notice.textContent = r.status === 404
              ? "No such project, or not one this token may see (HTTP 404)."
              : "This token may not see these runs (HTTP 403).";
            notice.dataset.refused = String(r.status);
          }
          var prompt = document.getElementById("runs-token-prompt");
          if (prompt) { prompt.hidden = true; }
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) { return; }
        table.innerHTML = html;
        titleTimes();
        offerConfigKeys();
        offerSummaryNames();
        var notice = document.getElementById("runs-locked");
        if (notice) { notice.hidden = true; }
        document.body.dataset.runs = "1";
      })
      .catch(function () { /* transient: try again next tick */ });
  }
  if (locked) {
    if (token()) { refresh(true); } else { promptToken(false); }
  }
  window.setInterval(function () { if (!refused && (!locked || token())) { refresh(false); } }, 5000);
})();
