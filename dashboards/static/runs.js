// Runs list: keep the table fresh while runs are live, and open the compare page for picked runs.
(function () {
  "use strict";
  var table = document.getElementById("runs-table");
  var button = document.getElementById("compare-selected");
  if (button) {
    button.addEventListener("click", function () {
      var ids = Array.prototype.map.call(document.querySelectorAll("input.pick:checked"), function (b) { return b.value; });
      if (ids.length) { window.location.href = "/compare?runs=" + ids.join(","); }
    });
  }
  if (!table) { return; }
  function refresh() {
    if (document.querySelector("input.pick:checked")) { return; }  // do not wipe a selection
    var params = new URLSearchParams(window.location.search);
    params.set("fragment", "true");
    fetch(window.location.pathname + "?" + params.toString(), { headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html !== null) { table.innerHTML = html; } })
      .catch(function () { /* transient: try again next tick */ });
  }
  window.setInterval(refresh, 5000);
})();
