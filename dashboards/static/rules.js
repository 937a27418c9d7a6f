// Alert rules of a project: list them with their open alerts, switch one on or off, reset a
// customized default, edit a rule's parameters. Writes go to the rules API
// (PATCH/DELETE /api/v1/projects/{p}/alert-rules/{rule}) with the browser's token when it has
// one (a server requiring auth); an anonymous loopback server takes them as same-origin
// requests (api/cross_site.py refuses other origins).
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("sw-config").textContent);
  var box = document.getElementById("rules");
  var SW = (window.SW = { cfg: cfg, renders: 0, errors: [], lastData: null });
  var writes = 0;  // writes in flight: a poll's answer would be older than the table they bring
  var epoch = 0;  // writes started: a poll's answer asked for before one is dropped

  var C = window.SWCommon;  // common.js: loaded first by base.html
  var el = C.el, token = C.token, askToken = C.askToken, showError = C.showError,
      clearError = C.clearError;
  function rulesPath(rule) {
    return cfg.api + "/projects/" + encodeURIComponent(cfg.project) + "/alert-rules" +
      (rule === undefined ? "" : "/" + encodeURIComponent(rule));
  }

  // One request: JSON in and out, the API's error message ({"error": {"message"}}) thrown.
  function request(method, url, body) {
    var headers = { Accept: "application/json" };
    var t = token();
    if (t) { headers.Authorization = "Bearer " + t; }
    var init = { method: method, headers: headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init).then(function (r) {
      if (r.status === 401) { askToken(); throw new Error("this server requires a token"); }
      if (r.status === 204) { return null; }
      return r.text().then(function (text) {
        var parsed = null;
        try { parsed = JSON.parse(text); } catch (e) { /* plain text */ }
        if (!r.ok) {
          var msg = (parsed && parsed.error && parsed.error.message) || (parsed && parsed.detail) || text;
          throw new Error(r.status + ": " + (typeof msg === "string" ? msg : JSON.stringify(msg)));
        }
        return parsed;
      });
    });
  }

  // A write, then the table again (the server's view: alerts resolved by a disable, etc.).
  function write(method, rule, body, onError) {
    writes += 1;
    epoch += 1;
    return request(method, rulesPath(rule), body).then(function () {
      clearError();
      return load(true);
    }).catch(function (err) {
      var msg = String(err.message || err);
      SW.errors.push(msg);
      if (onError) { onError(msg); return null; }
      showError("Could not change rule " + rule + ": " + msg);
      return load(true);  // the server's state again (a checkbox flipped by a refused write)
    }).then(function (out) { writes -= 1; return out; });
  }

  function editor(cell, rule) {
    if (cell.querySelector("form")) { return; }
    var form = el("form", { "class": "rule-edit" });
    form.addEventListener("submit", function (ev) { ev.preventDefault(); });
    var area = el("textarea", { rows: "8", cols: "44", spellcheck: "false", "aria-label": "parameters of " + rule.name });
    var editable = Object.assign({}, rule.params);
    delete editable.kind;  // a rule's kind is fixed; PATCH merges the rest into its overrides
    area.value = JSON.stringify(editable, null, 1);
    var error = el("div", { "class": "rule-error", role: "alert" });
    error.hidden = true;
    var save = el("button", { type: "button", "class": "rule-save" }, "save");
    var cancel = el("button", { type: "button" }, "cancel");
    save.addEventListener("click", function () {
      var params;
      try { params = JSON.parse(area.value); } catch (e) {
        error.textContent = "not JSON: " + e.message; error.hidden = false; return;
      }
      if (!params || typeof params !== "object" || Array.isArray(params)) {
        error.textContent = "the parameters are a JSON object ({\"above\": 6, ...})"; error.hidden = false; return;
      }
      // only what changed: PATCH merges into the stored overrides, and an unchanged value
      // sent back would make a default rule "customized"
      var changed = {};
      Object.keys(params).forEach(function (k) {
        if (JSON.stringify(params[k]) !== JSON.stringify(rule.params[k])) { changed[k] = params[k]; }
      });
      if (!Object.keys(changed).length) { form.remove(); return; }
      save.disabled = true;
      write("PATCH", rule.name, { params: changed }, function (msg) {
        save.disabled = false;
        error.textContent = msg;
        error.hidden = false;
      });
    });
    cancel.addEventListener("click", function () { form.remove(); });
    form.appendChild(area);
    form.appendChild(el("br"));
    form.appendChild(save);
    form.appendChild(document.createTextNode(" "));
    form.appendChild(cancel);
    form.appendChild(error);
    cell.appendChild(form);
    area.focus();
  }

  function render(data) {
    // the "parameters" boxes the user opened stay open
    var opened = Array.prototype.map.call(box.querySelectorAll("tr[data-rule] details[open]"),
      function (node) { return node.closest("tr").dataset.rule; });
    box.removeAttribute("aria-busy");
    box.textContent = "";
    if (!data.rules.length) {
      box.appendChild(el("div", { "class": "empty" }, "This project has no alert rules."));
      return;
    }
    var table = el("table", { "class": "rules", "data-rows": String(data.rules.length) });
    var head = el("tr");
    ["rule", "kind", "condition", "layers", "enabled", "settings", "open alerts", ""].forEach(function (c) {
      head.appendChild(el("th", {}, c));
    });
    table.appendChild(el("thead")).appendChild(head);
    var body = el("tbody");
    data.rules.forEach(function (rule) {
      var tr = el("tr", { "data-rule": rule.name, "class": rule.enabled ? "on" : "off" });
      var name = el("td");
      name.appendChild(el("b", {}, rule.name));
      if (rule.description) { name.appendChild(el("div", { "class": "help" }, rule.description)); }
      if (rule.problem) {
        name.appendChild(el("div", { "class": "note rule-problem", role: "note" }, rule.problem));
      }
      tr.appendChild(name);
      tr.appendChild(el("td", {}, rule.kind));
      var cond = el("td", { "class": "condition" });
      if (rule.condition) { cond.appendChild(document.createTextNode(rule.condition)); }
      var details = el("details");
      details.appendChild(el("summary", {}, "parameters"));
      details.appendChild(el("pre", { "class": "params" }, JSON.stringify(rule.params, null, 1)));
      cond.appendChild(details);
      tr.appendChild(cond);
      tr.appendChild(el("td", { "class": "layers" })).appendChild(el("code", {}, rule.layers));
      var enabled = el("td", { "class": "enabled" });
      var toggle = el("input", { type: "checkbox", "class": "rule-toggle",
                                 "aria-label": "rule " + rule.name + " enabled" });
      toggle.checked = rule.enabled;
      toggle.addEventListener("change", function () {
        toggle.disabled = true;
        write("PATCH", rule.name, { enabled: toggle.checked }).then(function () { toggle.disabled = false; });
      });
      enabled.appendChild(toggle);
      enabled.appendChild(document.createTextNode(rule.enabled ? " on" : " off"));
      tr.appendChild(enabled);
      var kind = !rule.builtin ? "custom" : (rule.customized ? "customized" : "default");
      tr.appendChild(el("td", { "class": "origin" })).appendChild(el("span", { "class": "badge " + kind }, kind));
      var open = el("td", { "class": "num open-alerts" }, rule.open_alerts);
      if (rule.open_alerts) { open.classList.add("alerts"); }
      tr.appendChild(open);
      var actions = el("td", { "class": "actions" });
      var edit = el("button", { type: "button", "class": "rule-edit-button" }, "edit");
      edit.addEventListener("click", function () { editor(actions, rule); });
      actions.appendChild(edit);
      if (rule.builtin && rule.customized) {
        var reset = el("button", { type: "button", "class": "rule-reset" }, "reset to default");
        reset.addEventListener("click", function () {
          if (!window.confirm("Reset " + rule.name + " to its default parameters?")) { return; }
          reset.disabled = true;
          write("DELETE", rule.name);
        });
        actions.appendChild(document.createTextNode(" "));
        actions.appendChild(reset);
      }
      if (!rule.builtin) {
        var remove = el("button", { type: "button", "class": "rule-delete" }, "delete");
        remove.addEventListener("click", function () {
          if (!window.confirm("Delete custom rule " + rule.name + "? Its open alerts are resolved.")) { return; }
          remove.disabled = true;
          write("DELETE", rule.name);
        });
        actions.appendChild(document.createTextNode(" "));
        actions.appendChild(remove);
      }
      tr.appendChild(actions);
      body.appendChild(tr);
    });
    table.appendChild(body);
    box.appendChild(C.scrollBox(table));
    opened.forEach(function (name) {
      var row = box.querySelector("tr[data-rule='" + CSS.escape(name) + "'] details");
      if (row) { row.open = true; }
    });
  }

  // ``force``: draw what the server answers (a page load, after a write); a poll draws only an
  // answer that differs from the table shown, and only while the user is not busy with it.
  function load(force) {
    var asked = epoch;
    // the project as a query: "." and ".." in a path are resolved away by the browser
    return request("GET", cfg.api + "/dashboards/alert-rules?project=" + encodeURIComponent(cfg.project))
      .then(function (data) {
        if (!force && SW.renders && (busy() || asked !== epoch || JSON.stringify(data) === JSON.stringify(SW.lastData))) {
          return;
        }
        SW.lastData = data;
        render(data);
        SW.renders += 1;
        document.body.dataset.renders = String(SW.renders);
        document.body.dataset.ready = "1";
      })
      .catch(function (err) {
        SW.errors.push(String(err.message || err));
        if (!force && SW.renders) {  // a poll: the table shown stays, the next poll tries again
          console.warn("spectrawatch: refresh failed:", err.message || err);
          return;
        }
        showError("Could not load the alert rules: " + (err.message || err));
        if (!SW.renders) { box.textContent = ""; document.body.dataset.ready = "error"; }
      });
  }

  // Refresh while the page is open, as the run pages do (spectrawatch.js poll): the worker
  // opens and resolves alerts, another user or the CLI changes rules. Not while the tab is
  // hidden, a write is in flight, a rule's editor is open (the user's typing is never
  // overwritten) or the token prompt waits for the user. window.SW_POLL_MS.rules (set before
  // this script: the browser tests) shortens the period.
  var POLL_MS = (window.SW_POLL_MS && window.SW_POLL_MS.rules) || 10000;
  SW.polls = 0;
  function busy() { return writes > 0 || Boolean(box.querySelector("form.rule-edit")); }
  function poll() {
    window.setTimeout(function () {
      if (document.hidden || busy() || document.getElementById("banner").dataset.token) {
        poll();
        return;
      }
      SW.polls += 1;
      load(false).then(poll);
    }, POLL_MS);
  }
  SW.load = load;
  load(true).then(poll);
})();
