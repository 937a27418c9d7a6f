// Helpers every dashboard page shares (base.html loads this before the page's own script): the
// browser's API token and its prompt, DOM building, the error banner and the one time format.
// Exposed as window.SWCommon; the page scripts (spectrawatch.js, rules.js, runs.js) read it.
(function () {
  "use strict";
  var TOKEN_KEY = "spectrawatch.token";

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  // ``table`` in a box that scrolls sideways when the table is wider than the page (a phone):
  // its columns keep their words whole instead of breaking them mid-token.
  function scrollBox(table) {
    var box = el("div", { "class": "table-scroll" });
    box.appendChild(table);
    return box;
  }
  // The class of a cell showing ``value``: "num" for numbers (right-aligned, one line), "token"
  // for one short word (a status, a rule or layer name: one line), "text" for free text (wraps,
  // in a column wide enough to read).
  function cellClass(value) {
    if (typeof value === "number") { return "num"; }
    var s = value === null || value === undefined ? "" : String(value);
    return s.length <= 60 && !/\s/.test(s) ? "token" : "text";
  }
  function token() { try { return window.localStorage.getItem(TOKEN_KEY); } catch (e) { return null; } }

  // A password box and a "use token" button appended to ``container``: the token is stored
  // and the page loaded again with it.
  function tokenForm(container, inputId) {
    var input = el("input", { type: "password", size: "40", placeholder: "sw_…", id: inputId });
    var save = el("button", { type: "button" }, "use token");
    save.addEventListener("click", function () {
      try { window.localStorage.setItem(TOKEN_KEY, input.value.trim()); } catch (e) { /* private mode */ }
      window.location.reload();
    });
    container.appendChild(input);
    container.appendChild(save);
  }

  // The #banner asks for a token (once): none stored, or the stored one refused (revoked?).
  function askToken() {
    var banner = $("banner");
    if (banner.dataset.token) { return; }
    banner.dataset.token = "1";
    banner.hidden = false;
    banner.className = "banner";
    banner.textContent = token() ? "This server refused the stored API token (revoked?); paste another: "
                                 : "This server requires an API token: ";
    tokenForm(banner, "token-input");
  }

  function showError(message) {
    var banner = $("banner");
    if (banner.dataset.token) { return; }  // the token prompt says why; replacing it left no way in
    banner.hidden = false;
    banner.className = "banner error";
    banner.textContent = message;
  }

  function clearError() {
    var banner = $("banner");
    if (!banner.dataset.token) { banner.hidden = true; }
  }

  // Every time on the pages: the browser's local time with its zone, one format
  // ("2026-11-28 12:03:18 GMT+1"); the API's UTC ISO value is the element's tooltip.
  var TIME_FORMAT = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
    second: "2-digit", hourCycle: "h23", timeZoneName: "short" });
  function formatTime(value) {
    if (value === null || value === undefined || value === "") { return "—"; }
    var date = value instanceof Date ? value : new Date(value);
    if (isNaN(date.getTime())) { return String(value); }
    var p = {};
    TIME_FORMAT.formatToParts(date).forEach(function (part) { p[part.type] = part.value; });
    return p.year + "-" + p.month + "-" + p.day + " " + p.hour + ":" + p.minute + ":" + p.second +
      " " + p.timeZoneName;
  }

  window.SWCommon = { TOKEN_KEY: TOKEN_KEY, $: $, el: el, token: token, tokenForm: tokenForm,
                      askToken: askToken, showError: showError, clearError: clearError,
                      formatTime: formatTime, scrollBox: scrollBox, cellClass: cellClass };
})();
