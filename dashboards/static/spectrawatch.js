// spectrawatch dashboards: fetch Plotly figures from /api/v1/dashboards/..., render them, keep
// the page state in the URL, and refresh while the run is live (polling /api/v1/runs/{id}).
(function () {
  "use strict";

  var cfg = JSON.parse(document.getElementById("sw-config").textContent);
  // interactiveMs: ms after navigation start when the plots in the viewport were drawn and
  // bound; allDrawnMs: when every plot was (then body[data-ready] is set).
  var SW = (window.SW = { cfg: cfg, renders: 0, ready: false, interactiveMs: null, allDrawnMs: null,
                          lastData: null, errors: [] });
  // while a run is live / once every run has ended (then only its state is polled, to notice a
  // resumed run); window.SW_POLL_MS (set before this script: the browser tests) shortens them
  var POLL_LIVE_MS = (window.SW_POLL_MS && window.SW_POLL_MS.live) || 2000;
  var POLL_IDLE_MS = (window.SW_POLL_MS && window.SW_POLL_MS.idle) || 15000;
  var STATE_KEYS = { overview: ["sed_layer"], layers: ["metric"], layer: ["step", "metric"], activations: [],
                     alerts: [], compare: ["runs", "names", "layer"] };
  // This script runs before plotly.min.js (so the first request overlaps its parsing); every
  // Plotly call waits for the document's scripts to have run.
  var plotlyReady = window.Plotly ? Promise.resolve() : new Promise(function (resolve) {
    document.addEventListener("DOMContentLoaded", function () { resolve(); });
  });
  var domReadyAt = null;
  document.addEventListener("DOMContentLoaded", function () { domReadyAt = window.performance.now(); });
  var lastSignature = null;
  var loading = false;

  var C = window.SWCommon;  // common.js: loaded first by base.html
  var $ = C.$, el = C.el, token = C.token, askToken = C.askToken, showError = C.showError,
      clearError = C.clearError, formatTime = C.formatTime;
  function timeNode(value, id) {
    var date = value instanceof Date ? value : new Date(value);
    var attrs = { title: isNaN(date.getTime()) ? "" : date.toISOString().replace(".000Z", "Z") + " (UTC)" };
    if (!isNaN(date.getTime())) { attrs.datetime = date.toISOString(); }
    if (id) { attrs.id = id; }
    return el("time", attrs, formatTime(date));
  }
  SW.formatTime = formatTime;

  function params() { return new URLSearchParams(window.location.search); }

  function api(path) {
    var headers = { Accept: "application/json" };
    var t = token();
    if (t) { headers.Authorization = "Bearer " + t; }
    return fetch(cfg.api + path, { headers: headers }).then(function (r) {
      if (r.status === 401) { askToken(); throw new Error("this server requires a token"); }
      if (!r.ok) {
        return r.text().then(function (body) {
          var msg = body;
          try {
            var parsed = JSON.parse(body);  // the API's errors: {"error": {"code", "message"}}
            msg = (parsed.error && parsed.error.message) || parsed.message || parsed.detail || body;
          } catch (e) { /* plain text */ }
          var err = new Error(r.status + ": " + (typeof msg === "string" ? msg : JSON.stringify(msg)));
          err.status = r.status;
          throw err;
        });
      }
      return r.json();
    });
  }

  function plotWidth() {
    return Math.max(300, Math.min(4000, Math.round(window.innerWidth || 1200)));
  }

  function endpoint() {
    var p = params();
    var q = new URLSearchParams();
    // every value of a key: names=a&names=b (a name may hold a comma)
    (STATE_KEYS[cfg.page] || []).forEach(function (k) {
      p.getAll(k).forEach(function (v) { if (v) { q.append(k, v); } });
    });
    var path;
    if (cfg.page === "compare") {
      path = "/dashboards/compare";
    } else if (cfg.page === "layer") {
      path = "/dashboards/runs/" + cfg.runId + "/layer";
      q.set("layer", cfg.layer);
    } else {
      path = "/dashboards/runs/" + cfg.runId + "/" + cfg.page;
    }
    if (cfg.page !== "layers" && cfg.page !== "alerts") { q.set("max_points", String(plotWidth())); }
    return path + "?" + q.toString();
  }

  // --- downloads ----------------------------------------------------------------------------
  function csvCell(v) {
    if (v === null || v === undefined) { return ""; }
    var s = String(v);
    // a name a spreadsheet would run as a formula (=, +, -, @, tab, CR first) is kept as text
    if (typeof v === "string" && /^[=+\-@\t\r]/.test(s)) { s = "'" + s; }
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  // The name of row i (heatmap) or of the trace as stored: labels shown are HTML-escaped.
  function rawName(t, i) {
    if (Array.isArray(t.meta)) { return t.meta[i] !== undefined ? t.meta[i] : (t.y || [])[i]; }
    return typeof t.meta === "string" ? t.meta : t.name;
  }

  function figureCsv(gd) {
    var lines = [];
    (gd.data || []).forEach(function (t) {
      if (t.hoverinfo === "skip") { return; }  // holds no data (the heatmap's top axis)
      if (t.swSmoothed) { return; }  // the smoothing slider's line: the raw one has the data
      if (t.type === "heatmap") {
        if (!lines.length) { lines.push("layer,step,value"); }
        (t.y || []).forEach(function (_, i) {
          var layer = rawName(t, i);
          // a log-coloured heatmap keeps the values themselves in customdata
          var values = Array.isArray(t.customdata) ? t.customdata : t.z;
          (t.x || []).forEach(function (step, j) { lines.push([layer, step, values[i][j]].map(csvCell).join(",")); });
        });
      } else if (t.meta && Array.isArray(t.meta.csv)) {
        // its own columns (the alert timeline): the name, each point's stored fields, the step
        if (!lines.length) { lines.push(t.meta.csv.map(csvCell).join(",")); }
        (t.x || []).forEach(function (x, i) {
          if (x === null || x === undefined) { return; }
          lines.push([t.name].concat((t.customdata || [])[i] || [], [x]).map(csvCell).join(","));
        });
      } else {
        if (!lines.length) { lines.push("series,x,y"); }
        (t.x || []).forEach(function (x, i) {
          if (x === null || x === undefined) { return; }
          lines.push([rawName(t), x, t.y[i]].map(csvCell).join(","));
        });
      }
    });
    return lines.join("\n") + "\n";
  }

  function download(name, text) {
    var blob = new Blob([text], { type: "text/csv" });
    var a = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.appendChild(a);
    a.click();
    window.setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }
  SW.figureCsv = figureCsv;

  // The modebar buttons of our own, as words: a 16 px glyph of a table or of a log curve read
  // as a grey square and a signal icon. Plotly takes a function returning the icon's node.
  function textIcon(text) {
    return function () {
      var span = document.createElement("span");
      span.className = "sw-modebar-text";
      span.textContent = text;
      span.style.cssText = "display:inline-block;min-width:16px;font:bold 10px/16px sans-serif;" +
        "color:#506784;text-align:center;letter-spacing:0;vertical-align:top";
      return span;
    };
  }
  var CSV_ICON = textIcon("CSV");

  // a log/linear y axis toggle on line plots; the reader's choice per panel survives refreshes
  var LOG_ICON = textIcon("log");
  var yAxisChoice = {};
  function isLinePlot(panel) {
    var fig = panel.figure;
    return !!(fig && fig.data.length && /^scatter/.test(fig.data[0].type) && fig.layout.yaxis &&
      fig.layout.yaxis.type !== "category");
  }
  function withAxisChoice(panel, layout) {
    var type = yAxisChoice[panel.id];
    if (!type || !isLinePlot(panel)) { return layout; }
    var out = Object.assign({}, layout);
    out.yaxis = Object.assign({}, layout.yaxis, { type: type, autorange: true });
    return out;
  }

  function plotConfig(panel) {
    var base = "spectrawatch-" + (cfg.runId || "compare") + "-" + (panel.csv_name || panel.id);
    var buttons = [{
      name: "downloadCsv", title: "Download data as CSV", icon: CSV_ICON,
      click: function (gd) { download(base + ".csv", figureCsv(gd)); }
    }];
    if (isLinePlot(panel)) {
      buttons.push({
        name: "toggleLogY", title: "Log / linear y axis", icon: LOG_ICON,
        click: function (gd) {
          var next = gd.layout.yaxis && gd.layout.yaxis.type === "log" ? "linear" : "log";
          yAxisChoice[panel.id] = next;
          Plotly.relayout(gd, { "yaxis.type": next, "yaxis.autorange": true });
        }
      });
    }
    return {
      responsive: true,
      displaylogo: false,
      // plotly.js 4 offers to share a chart on Plotly Cloud by default: run data stays here
      showSendToCloud: false,
      toImageButtonOptions: { format: "png", filename: base, scale: 2 },
      modeBarButtonsToAdd: buttons
    };
  }

  // --- rendering ------------------------------------------------------------------------------
  function renderMeta(data) {
    var meta = $("run-meta");
    meta.textContent = "";
    var runs = data.runs || (data.run ? [data.run] : []);
    runs.forEach(function (run, i) {
      if (i) { meta.appendChild(document.createTextNode(" · ")); }
      var a = el("a", { href: "/runs/" + run.id }, run.project + " / " + run.name + " (#" + run.id + ")");
      meta.appendChild(a);
      meta.appendChild(document.createTextNode(" "));
      meta.appendChild(el("span", { "class": "badge " + run.status }, run.status));
      var frames = run.frames || {};
      var pending = (frames.pending || 0) + (frames.running || 0);
      meta.appendChild(document.createTextNode(
        " last step " + (run.last_step === null ? "—" : run.last_step) +
        " · frames analysed " + (frames.done || 0) + (pending ? " (" + pending + " queued)" : "") +
        (frames.failed ? " · " + frames.failed + " failed" : "")));
      if (!data.runs) {
        meta.appendChild(document.createTextNode(" · started "));
        meta.appendChild(timeNode(run.created_at, "run-started"));
        var seen = run.last_seen_at || run.updated_at;
        meta.appendChild(document.createTextNode(run.last_seen_at ? " · last seen " : " · updated "));
        meta.appendChild(timeNode(seen, "run-seen"));
        renderClient(meta, run.client_stats);
      }
    });
    if (data.run) {
      $("run-title").textContent = data.run.name + " (#" + data.run.id + ")";
      document.title = data.page.title + " · " + data.run.name + " · spectrawatch";
      var cmp = $("compare-link");
      if (cmp) { cmp.href = "/compare?runs=" + data.run.id; }
    }
    var summary = $("summary");
    summary.textContent = "";
    if (cfg.page === "alerts" && data.run) {  // the rules that raise these alerts
      var project = data.run.project;
      var href = (project === "." || project === "..")
        ? "/alert-rules?project=" + encodeURIComponent(project)
        : "/projects/" + encodeURIComponent(project) + "/alert-rules";
      summary.appendChild(el("a", { href: href, id: "rules-link" }, "Alert rules of project " + project + " →"));
    }
    if (data.notice) {  // compare: runs asked for past the cap, named
      summary.appendChild(el("span", { id: "notice", role: "note", "class": "warn" }, data.notice));
    }
    var s = data.summary;
    if (s) {
      var parts = [];
      if (s.early_warning_step !== null) { parts.push(["early warning at step ", s.early_warning_step]); }
      if (s.early_warning_reason) { parts.push([s.early_warning_reason, ""]); }
      if (s.val_acc_crossing_step !== null) { parts.push([s.val_acc_name + " ≥ " + (s.val_acc_threshold || 0.9) + " at step ", s.val_acc_crossing_step]); }
      if (s.lead_steps !== null) { parts.push(["lead time ", s.lead_steps + " steps"]); }
      if (s.open_alerts) { parts.push(["open alerts ", s.open_alerts]); }
      if (s.nonfinite_step !== null && s.nonfinite_step !== undefined) {
        parts.push(["non-finite (NaN/Inf) from step ", s.nonfinite_step]);
      }
      parts.forEach(function (pair, i) {
        if (i) { summary.appendChild(document.createTextNode(" · ")); }
        summary.appendChild(document.createTextNode(pair[0]));
        summary.appendChild(el("b", {}, pair[1]));
      });
    }
  }

  // What the page says once above its panels: its figures' shared caption and why data stops
  // (NaN/Inf), each panel's chart marking the step.
  function renderPageNote(data) {
    [["page-help", data.help], ["page-note", data.note]].forEach(function (pair) {
      var node = $(pair[0]);
      if (!node) { return; }
      node.textContent = pair[1] || "";
      node.hidden = !pair[1];
    });
  }

  // the client's own report (client stats): what it sent, dropped, spooled, its cadence
  function renderClient(meta, cs) {
    if (!cs || !Object.keys(cs).length) { return; }
    var bits = [(cs.sent_frames || 0) + " frames sent"];
    if (cs.dropped_frames) { bits.push(cs.dropped_frames + " dropped"); }
    if (cs.spooled_frames) { bits.push(cs.spooled_frames + " spooled"); }
    if (cs.replayed_frames) { bits.push(cs.replayed_frames + " delivered from the spool"); }
    if (cs.spooled_pending) { bits.push(cs.spooled_pending + " still in the spool (spectrawatch sync)"); }
    if (cs.errors) { bits.push(cs.errors + (cs.errors === 1 ? " error" : " errors")); }
    if (cs.update_every) {
      bits.push("update sketch every " + (cs.update_every === 1 ? "step" : cs.update_every + " steps"));
    }
    var bad = cs.dropped_frames || cs.errors || cs.spooled_pending;
    meta.appendChild(document.createTextNode(" · "));
    meta.appendChild(el("span", {
      id: "client-stats", "class": "client" + (bad ? " warn" : ""), title: cs.last_error || ""
    }, "client: " + bits.join(", ")));
  }

  function renderControls(data) {
    var form = $("controls");
    var controls = data.controls || {};
    var key = JSON.stringify(controls) + "|" + smoothWeight();  // Back may change either
    if (form.dataset.key === key) { return; }
    form.dataset.key = key;
    form.textContent = "";
    Object.keys(controls).forEach(function (name) {
      var c = controls[name];
      var label = el("label", {}, c.label + " ");
      var select = el("select", { name: name, id: "control-" + name });
      if (c.multiple) { select.multiple = true; }
      var values = Array.isArray(c.value) ? c.value : [c.value];
      c.options.forEach(function (opt, i) {
        var o = el("option", { value: opt }, c.labels ? c.labels[i] : opt);
        if (values.indexOf(opt) >= 0) { o.selected = true; }
        select.appendChild(o);
      });
      select.addEventListener("change", function () {
        var chosen = Array.prototype.filter.call(select.options, function (o) { return o.selected; })
          .map(function (o) { return o.value; });
        var p = params();
        if (name === "add") {  // compare: one more run of the compared runs' projects
          if (!chosen[0]) { return; }
          p.set("runs", (p.get("runs") || "").split(",").filter(Boolean).concat(chosen).join(","));
        } else if (c.multiple) {  // one parameter per choice: a name may hold a comma
          p.delete(name);
          chosen.forEach(function (v) { p.append(name, v); });
        } else {
          p.set(name, chosen.join(","));
        }
        if (name === "metric" && cfg.page === "layer") { p.delete("step"); }
        // one history entry per choice: Back returns to the previous one (see popstate)
        window.history.pushState(null, "", window.location.pathname + "?" + p.toString());
        load();
      });
      label.appendChild(select);
      form.appendChild(label);
    });
    if (SMOOTHED_PAGES[cfg.page]) { form.appendChild(smoothControl()); }
    if (cfg.page === "layer" && data.links && data.links.heatmap_metric) {
      form.appendChild(el("a", { href: "/runs/" + cfg.runId + "/layers?metric=" + encodeURIComponent(data.links.heatmap_metric) },
        "← back to the layer heatmap"));
    }
  }

  // --- smoothing (overview and compare) ---------------------------------------------------
  // An exponential moving average of each line, TensorBoard's: smoothed = last·w + (1−w)·y,
  // divided by 1 − (product of the weights so far) so the first points are not pulled to 0.
  // Steps are not always even (bucketed series, gaps): each point's weight is w^(Δstep/mean
  // Δstep), which is w itself on evenly spaced points (TensorBoard's numbers exactly). A
  // null/NaN point stays a gap; the average goes on after it, the past weighed down by the
  // steps the gap spans (w per mean step). w = 0 (the default): no smoothing. Kept in the URL
  // as ``smooth`` (the figure API never sees it).
  var SMOOTHED_PAGES = { overview: true, compare: true };
  var SMOOTH_MAX = 0.999;
  // a figure's colorway (the server's: plotly's default here): a raw line and its smoothed
  // twin take the colour the raw line had (the server gives each line its own; else its index)
  var COLORWAY = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"];

  function ema(xs, ys, w) {
    if (!(w > 0)) { return ys.slice(); }
    var finite = function (v) { return v !== null && v !== undefined && isFinite(v); };
    var first = null, last = null, count = 0;  // the mean step, gaps included
    xs.forEach(function (x) {
      if (finite(x)) { if (first === null) { first = x; } last = x; count += 1; }
    });
    var spacing = count > 1 && last > first ? (last - first) / (count - 1) : 1;
    var acc = 0, decay = 1, prev = null;
    return ys.map(function (y, i) {
      if (!finite(y) || !finite(xs[i])) { return y === undefined ? null : y; }
      var wi = prev === null ? w : Math.pow(w, Math.max(0, xs[i] - prev) / spacing);
      acc = acc * wi + (1 - wi) * y;
      decay *= wi;
      prev = xs[i];
      return decay < 1 ? acc / (1 - decay) : y;
    });
  }
  SW.ema = ema;

  function smoothWeight() {
    if (!SMOOTHED_PAGES[cfg.page]) { return 0; }
    var w = parseFloat(params().get("smooth") || "0");
    return isFinite(w) ? Math.max(0, Math.min(SMOOTH_MAX, w)) : 0;
  }

  function smoothable(t) {
    return /^scatter/.test(t.type) && String(t.mode || "lines").indexOf("lines") >= 0 && !t.fill &&
      (t.x || []).length > 2;
  }

  // ``data`` with each line drawn twice: the raw one faint behind, the smoothed one in the
  // legend (one legend group: a click hides both). The CSV download skips the smoothed ones.
  function smoothedData(data, w, colorway) {
    if (!(w > 0)) { return data; }
    var colors = colorway || COLORWAY;
    var out = [];
    data.forEach(function (t, i) {
      if (!smoothable(t)) { out.push(t); return; }
      var color = (t.line && t.line.color) || colors[i % colors.length];
      var group = t.legendgroup || "sw-smooth-" + i;
      out.push(Object.assign({}, t, {
        line: Object.assign({}, t.line, { color: color }), opacity: 0.25, showlegend: false,
        legendgroup: group, mode: "lines" }));
      out.push(Object.assign({}, t, {
        y: ema(t.x, t.y, w), line: Object.assign({}, t.line, { color: color, width: 2 }),
        legendgroup: group, mode: "lines", swSmoothed: true }));
    });
    return out;
  }

  function smoothControl() {
    var w = smoothWeight();
    var label = el("label", { title: "Exponential moving average of each line (TensorBoard's); " +
      "0: off. The raw line stays, faint, behind." }, "smoothing ");
    var input = el("input", { type: "range", id: "control-smooth", min: "0", max: "0.99", step: "0.01" });
    input.value = String(w);
    var shown = el("output", { id: "smooth-value", "for": "control-smooth" }, w.toFixed(2));
    var timer = null;
    input.addEventListener("input", function () {
      shown.textContent = Number(input.value).toFixed(2);
      var p = params();
      if (Number(input.value) > 0) { p.set("smooth", input.value); } else { p.delete("smooth"); }
      // the page state, without one history entry per slider tick
      window.history.replaceState(null, "", window.location.pathname + (p.toString() ? "?" + p.toString() : ""));
      window.clearTimeout(timer);
      timer = window.setTimeout(function () {
        if (SW.lastData && !loading) {
          renderPanels(SW.lastData).all.then(function () { SW.smoothings = (SW.smoothings || 0) + 1; });
        }
      }, 60);
    });
    label.appendChild(input);
    label.appendChild(document.createTextNode(" "));
    label.appendChild(shown);
    return label;
  }

  // --- compare: the runs' configs ----------------------------------------------------------
  // One column per run, rows for its status and tags, then one per config key: the keys whose
  // values differ first (highlighted), the identical ones folded under a toggle.
  var configOpen = false;
  function configRow(key, values, cls) {
    var tr = el("tr", cls ? { "class": cls } : {});
    tr.appendChild(el("td", { "class": "key" }, key));
    values.forEach(function (v) {
      tr.appendChild(el("td", v === null ? { "class": "unset" } : {}, v === null ? "—" : v));
    });
    return tr;
  }
  function renderConfig(data) {
    var box = $("config");
    var c = data.config;
    if (!box || !c) { return; }
    var key = JSON.stringify(c);
    if (box.dataset.key === key) { return; }  // a refresh keeps the table (and its toggle)
    box.dataset.key = key;
    box.textContent = "";
    box.hidden = !c.columns.length;
    if (!c.columns.length) { return; }
    box.appendChild(el("h2", {}, "Config"));
    var table = el("table", { "class": "config", id: "config-table" });
    var head = el("tr");
    head.appendChild(el("th", {}, "key"));
    c.columns.forEach(function (label, i) {
      var th = el("th");
      th.appendChild(el("a", { href: "/runs/" + data.runs[i].id }, label));
      head.appendChild(th);
    });
    table.appendChild(el("thead")).appendChild(head);
    var body = el("tbody");
    var differs = function (values) { return new Set(values).size > 1 ? "differs" : ""; };
    body.appendChild(configRow("status", c.status, differs(c.status)));
    var tags = c.tags.map(function (t) { return t.join(", "); });
    body.appendChild(configRow("tags", tags, differs(tags)));
    var same = c.rows.filter(function (r) { return !r.differs; });
    c.rows.filter(function (r) { return r.differs; }).forEach(function (r) {
      body.appendChild(configRow(r.key, r.values, "differs"));
    });
    table.appendChild(body);
    if (!c.rows.length) {
      var none = el("tr", { "class": "toggle" });
      none.appendChild(el("td", { colspan: String(c.columns.length + 1) },
        "No config logged: pass config={...} to monitor.init."));
      body.appendChild(none);
    }
    if (same.length) {
      var toggleRow = el("tr", { "class": "toggle" });
      var cell = el("td", { colspan: String(c.columns.length + 1) });
      var button = el("button", { type: "button", id: "config-toggle" });
      var rest = el("tbody", { "class": "same" });
      same.forEach(function (r) { rest.appendChild(configRow(r.key, r.values, "")); });
      var show = function () {
        rest.hidden = !configOpen;
        button.textContent = (configOpen ? "hide " : "show ") + same.length + " key" +
          (same.length > 1 ? "s" : "") + " identical in every run";
      };
      button.addEventListener("click", function () { configOpen = !configOpen; show(); });
      show();
      cell.appendChild(button);
      toggleRow.appendChild(cell);
      body.appendChild(toggleRow);
      table.appendChild(rest);
    }
    box.appendChild(C.scrollBox(table));
  }

  function bindClick(gd, panel) {
    if (!panel.click || gd.dataset.clickBound) { return; }
    gd.dataset.clickBound = "1";
    gd.on("plotly_click", function (ev) {
      var p = ev.points && ev.points[0];
      if (!p) { return; }
      var metric = gd.dataset.metric;
      var row = Array.isArray(p.pointNumber) ? p.pointNumber[0] : p.pointNumber;
      var layer = rawName(gd.data[p.curveNumber] || {}, row);
      window.location.href = "/runs/" + cfg.runId + "/layers/" + encodeURIComponent(layer) +
        "?metric=" + encodeURIComponent(metric) + "&step=" + encodeURIComponent(p.x);
    });
  }

  // The step axes of a page share one range (the server's): zooming or panning one chart's
  // steps sets the others' to the same; a reset (double-click) puts them all back. The last
  // range synced is remembered, so the relayouts this makes do not echo back.
  var syncedRange = "";
  function bindSharedX(gd) {
    if (gd.dataset.sharedBound) { return; }
    gd.dataset.sharedBound = "1";
    gd.on("plotly_relayout", function (ev) {
      if (!ev || !gd.dataset.sharedX) { return; }
      var range = ev["xaxis.range"] ||
        (ev["xaxis.range[0]"] !== undefined && ev["xaxis.range[1]"] !== undefined
          ? [ev["xaxis.range[0]"], ev["xaxis.range[1]"]] : null);
      var reset = !range && ev["xaxis.autorange"] === true;
      if (!range && !reset) { return; }
      if (reset) { range = JSON.parse(gd.dataset.xRange || "null"); }
      if (!range) { return; }
      var key = JSON.stringify(range);
      if (key === syncedRange && !reset) { return; }
      syncedRange = key;
      Array.prototype.forEach.call(document.querySelectorAll("#panels .plot"), function (other) {
        if ((other === gd && !reset) || other.dataset.sharedX !== "1" || !other._fullLayout) { return; }
        Plotly.relayout(other, { "xaxis.range": range.slice() });
      });
      SW.xSyncs = (SW.xSyncs || 0) + 1;
    });
  }

  // A horizontal legend under a plot is placed at a fraction of the plot area's height, and
  // Plotly shrinks that area to make room for the legend's rows: from two rows on, the legend
  // rides up over the x-axis title. Such a legend goes to the bottom of the figure instead, and
  // the bottom margin grows by its height: estimated before the first draw (entry widths
  // measured on a canvas), checked after it (one more layout pass only when the estimate was
  // short), remembered for the panel's next refresh.
  var LEGEND_GAP_PX = 6;
  var UNDER_PLOT_PX = 56;  // tick labels and the x-axis title under the plot area
  var LEGEND_ROW_PX = 21;
  var measure = null;
  function textWidth(text) {
    measure = measure || document.createElement("canvas").getContext("2d");
    measure.font = "11px 'Open Sans', verdana, arial, sans-serif";
    return measure.measureText(text).width;
  }
  function legendRows(data, width) {
    var shown = (data || []).filter(function (t) { return t.showlegend !== false && t.type !== "heatmap"; });
    if (shown.length < 2) { return 0; }
    var rows = 1;
    var x = 0;
    shown.forEach(function (t) {
      var name = String(t.name || "").replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&");
      var w = textWidth(name) + 50;  // symbol, gaps
      if (x && x + w > width) { rows += 1; x = 0; }
      x += w;
    });
    return rows;
  }
  function legendBottom(plot, figure) {
    if (plot.dataset.legendBottom) { return Number(plot.dataset.legendBottom); }
    var margin = figure.layout.margin || {};
    var rows = legendRows(figure.data, plot.clientWidth - (margin.l || 0) - (margin.r || 0));
    return rows < 2 ? 0 : UNDER_PLOT_PX + LEGEND_ROW_PX * rows + 2 * LEGEND_GAP_PX;
  }
  function legendLayout(layout, bottom) {
    if (!bottom) { return layout; }
    var out = Object.assign({}, layout);
    out.legend = Object.assign({}, layout.legend, { yref: "container", y: 0, yanchor: "bottom" });
    out.margin = Object.assign({}, layout.margin, { b: bottom });
    return out;
  }
  function clearLegend(gd) {
    var title = gd.querySelector(".xtitle");
    var texts = gd.querySelectorAll(".legend .legendtext");
    if (!title || !texts.length) { return gd; }
    var titleBottom = title.getBoundingClientRect().bottom;
    var legend = gd.querySelector(".legend").getBoundingClientRect();
    var textTop = Math.min.apply(null, Array.prototype.map.call(texts, function (t) { return t.getBoundingClientRect().top; }));
    if (!legend.height || textTop >= titleBottom - LEGEND_GAP_PX) { return gd; }
    var size = gd._fullLayout._size;
    var underPlot = titleBottom - gd.getBoundingClientRect().top - (size.t + size.h);
    var bottom = Math.ceil(underPlot + legend.height + LEGEND_GAP_PX);
    gd.dataset.legendBottom = String(bottom);
    return Plotly.relayout(gd, { "legend.yref": "container", "legend.y": 0, "legend.yanchor": "bottom", "margin.b": bottom })
      .then(function () { return gd; });
  }

  function nextTask() { return new Promise(function (resolve) { window.setTimeout(resolve, 0); }); }

  // Plots in the viewport are drawn first, in this task; the ones below the fold in the next
  // task (after the browser could paint and take input). Returns {visible, all} promises.
  function drawVisibleFirst(draws) {
    var height = window.innerHeight || 800;
    var visible = draws.filter(function (d) { return d.node.getBoundingClientRect().top < height; });
    var later = draws.filter(function (d) { return visible.indexOf(d) < 0; });
    var first = Promise.all(visible.map(function (d) { return d.draw(); }));
    var all = !later.length ? first : first.then(nextTask).then(function () {
      return Promise.all(later.map(function (d) { return d.draw(); }));
    });
    return { visible: first, all: all };
  }

  // A panel's DOM id: its id with each character outside [A-Za-z0-9_-] written as ·<hex>·
  // (one to one: train/loss and train_loss are two panels; "·" is a CSS name character).
  function domId(panelId) {
    return "panel-" + panelId.replace(/[^A-Za-z0-9_-]/gu, function (c) {
      return "\u00b7" + c.codePointAt(0).toString(16) + "\u00b7";
    });
  }
  SW.domId = domId;

  function renderPanels(data) {
    var box = $("panels");
    box.removeAttribute("aria-busy");
    var loadingNode = box.querySelector(".loading");
    if (loadingNode) { loadingNode.remove(); }
    box.classList.toggle("two", cfg.page === "overview" || cfg.page === "activations" || cfg.page === "layer");
    var keep = {};
    var draws = [];
    (data.panels || []).forEach(function (panel, index) {
      var id = domId(panel.id);
      keep[id] = true;
      var node = $(id);
      if (!node) {
        node = el("section", { id: id, "class": "panel" });
        node.appendChild(el("div", { "class": "help" }));
        node.appendChild(el("div", { "class": "note", role: "note" }));
        node.appendChild(el("div", { "class": "plot" }));
        node.appendChild(el("div", { "class": "empty" }));
      }
      if (box.children[index] !== node) { box.insertBefore(node, box.children[index] || null); }
      var isHeatmap = panel.figure && panel.figure.data.length && panel.figure.data[0].type === "heatmap";
      node.classList.toggle("heatmap", !!isHeatmap);
      // one readable row per layer (16 px): 150 layers in the fixed 620 px were 4 px each; the
      // same for a plot of named rows (the alert timeline: one per rule and layer)
      var yaxis = panel.figure && panel.figure.layout.yaxis;
      var categories = !isHeatmap && yaxis && yaxis.type === "category" ? (yaxis.categoryarray || []).length : 0;
      var rows = isHeatmap ? (panel.figure.data[0].y || []).length : categories;
      var minHeight = isHeatmap ? 620 : 360;
      node.querySelector(".plot").style.height = rows ? Math.min(4000, Math.max(minHeight, 160 + 16 * rows)) + "px" : "";
      node.dataset.panel = panel.id;
      node.querySelector(".help").textContent = panel.help || "";
      renderMetricHelp(node, panel.metrics_help || []);
      var note = node.querySelector(".note");  // why the data stops (NaN/Inf weights...)
      note.textContent = panel.note || "";
      note.hidden = !panel.note;
      var plot = node.querySelector(".plot");
      var empty = node.querySelector(".empty");
      if (panel.figure) {
        empty.hidden = true;
        plot.hidden = false;
        if (panel.click) { plot.dataset.metric = panel.click.metric; }
        draws.push({ node: node, draw: function () {
          var drawStart = window.performance.now();
          var layout = withAxisChoice(panel, legendLayout(panel.figure.layout, legendBottom(plot, panel.figure)));
          var traces = smoothedData(panel.figure.data, smoothWeight(), panel.figure.layout.colorway);
          plot.dataset.sharedX = panel.shared_x ? "1" : "";
          syncedRange = "";  // a redrawn chart shows its full range: the next zoom is news
          plot.dataset.xRange = panel.shared_x ? JSON.stringify(panel.figure.layout.xaxis.range) : "";
          return Plotly.react(plot, traces, layout, plotConfig(panel)).then(clearLegend).then(function (gd) {
            bindClick(gd, panel);
            bindSharedX(gd);
            if (SW.timing && !SW.ready) { SW.timing.draws.push([panel.id, Math.round(window.performance.now() - drawStart)]); }
            return gd;
          });
        } });
        node.dataset.state = "plot";
      } else {
        if (plot.dataset.plotted) { Plotly.purge(plot); }
        plot.hidden = true;
        empty.hidden = false;
        empty.textContent = "";
        empty.appendChild(el("b", {}, panel.title));
        empty.appendChild(el("br"));
        empty.appendChild(document.createTextNode(panel.empty));
        node.dataset.state = "empty";
      }
      plot.dataset.plotted = panel.figure ? "1" : "";
    });
    Array.prototype.slice.call(box.children).forEach(function (child) {
      if (!keep[child.id]) {
        var plot = child.querySelector(".plot");
        if (plot && plot.dataset.plotted) { Plotly.purge(plot); }
        child.remove();
      }
    });
    return drawVisibleFirst(draws);
  }

  // A panel's metrics as docs/metrics.md reads them: definition, how to read it, the healthy
  // range shaded on the chart, a link to the metrics reference page. Folded but on the layers
  // page (one metric); a refresh keeps it as the reader left it.
  function renderMetricHelp(node, items) {
    var box = node.querySelector(".metric-help");
    if (!box) {
      box = el("details", { "class": "metric-help" });
      node.insertBefore(box, node.querySelector(".note"));
      box.open = cfg.page === "layers";
    }
    var key = JSON.stringify(items);
    box.hidden = !items.length;
    if (box.dataset.key === key) { return; }
    box.dataset.key = key;
    box.textContent = "";
    if (!items.length) { return; }
    box.appendChild(el("summary", {}, items.length === 1
      ? "What " + items[0].name + " is and how to read it"
      : "What these " + items.length + " metrics are and how to read them"));
    items.forEach(function (item) {
      var div = el("div", { "class": "metric", "data-key": item.key });
      div.appendChild(el("code", {}, item.name));
      div.appendChild(document.createTextNode(": " + item.definition + "."));
      if (item.reading) { div.appendChild(el("div", { "class": "reading" }, "How to read it: " + item.reading)); }
      if (item.healthy) {
        div.appendChild(el("div", { "class": "healthy" }, "Healthy range (shaded on line charts): " + item.healthy.text));
      }
      var more = el("div", { "class": "docs" });
      more.appendChild(el("a", { href: "/metrics-reference#" + encodeURIComponent(item.key) },
        "docs/metrics.md § " + item.section));
      div.appendChild(more);
      box.appendChild(div);
    });
  }

  function renderTables(data) {
    var box = $("tables");
    box.className = "tables";
    box.textContent = "";
    (data.tables || []).forEach(function (t) {
      var section = el("section", { id: "table-" + t.id });
      section.appendChild(el("h2", {}, t.title));
      if (t.help) { section.appendChild(el("div", { "class": "help" }, t.help)); }
      var times = t.times || [];  // columns holding UTC ISO times: shown local, zone named
      if (times.length && t.rows.length) {
        section.appendChild(el("div", { "class": "help" },
          "Times are your browser's local time (zone shown after each); hover one for UTC."));
      }
      if (!t.rows.length) {
        section.appendChild(el("div", { "class": "empty" }, t.empty));
      } else {
        var table = el("table", { "data-rows": String(t.rows.length) });
        var head = el("tr");
        // a column of numbers (nulls aside) is right-aligned, its header too
        var numeric = t.columns.map(function (_, i) {
          var values = t.rows.map(function (row) { return row[i]; }).filter(function (v) { return v !== null; });
          return values.length > 0 && values.every(function (v) { return typeof v === "number"; });
        });
        t.columns.forEach(function (c, i) {
          head.appendChild(el("th", numeric[i] ? { "class": "num" } : {}, (t.labels || t.columns)[i]));
        });
        if (t.actions) { head.appendChild(el("th", {}, "")); }
        table.appendChild(el("thead")).appendChild(head);
        var body = el("tbody");
        t.rows.forEach(function (row, r) {
          var tr = el("tr");
          row.forEach(function (v, i) {
            var cls = numeric[i] ? "num" : C.cellClass(v);
            var td = el("td", cls ? { "class": cls } : {}, v === null ? "—" : (times.indexOf(t.columns[i]) >= 0 ? undefined : v));
            if (v !== null && times.indexOf(t.columns[i]) >= 0) { td.appendChild(timeNode(v)); }
            tr.appendChild(td);
          });
          if (t.actions) { tr.appendChild(ackCell(t.actions[r])); }
          body.appendChild(tr);
        });
        table.appendChild(body);
        section.appendChild(C.scrollBox(table));
      }
      box.appendChild(section);
    });
  }

  // An alert row's acknowledge / unacknowledge button: PATCH /alerts/{id}, then the page again
  // (the runs list and the overview count only unacknowledged open alerts).
  function ackCell(action) {
    var td = el("td", {});
    var button = el("button", { type: "button", "class": "ack", "data-alert": String(action.id) },
                    action.acknowledged ? "unacknowledge" : "acknowledge");
    button.addEventListener("click", function () {
      button.disabled = true;
      acknowledge(action.id, !action.acknowledged).then(function () { clearError(); return load(); })
        .catch(function (err) {
          var msg = String(err.message || err);
          SW.errors.push(msg);
          showError("Could not change alert " + action.id + ": " + msg);
          button.disabled = false;
        });
    });
    td.appendChild(button);
    return td;
  }

  function acknowledge(id, value) {
    var headers = { Accept: "application/json", "Content-Type": "application/json" };
    var t = token();
    if (t) { headers.Authorization = "Bearer " + t; }
    return fetch(cfg.api + "/alerts/" + encodeURIComponent(id), {
      method: "PATCH", headers: headers, credentials: "same-origin",
      body: JSON.stringify({ acknowledged: value }),
    }).then(function (r) {
      if (r.status === 401) { askToken(); throw new Error("this server requires a token"); }
      if (r.ok) { return r.json(); }
      return r.text().then(function (text) {
        var msg = text;
        try { var parsed = JSON.parse(text); msg = (parsed.error && parsed.error.message) || text; } catch (e) { /* plain text */ }
        throw new Error(r.status + ": " + msg);
      });
    });
  }

  var loadAgain = false;
  function load() {
    if (loading) { loadAgain = true; return Promise.resolve(); }
    loading = true;
    var started = window.performance.now();
    return api(endpoint()).then(function (data) {
      if (!SW.ready) { SW.timing = { fetchStart: started, fetchEnd: window.performance.now(), draws: [] }; }
      SW.lastData = data;
      clearError();
      renderMeta(data);
      renderPageNote(data);
      renderControls(data);
      renderConfig(data);
      renderTables(data);
      return plotlyReady.then(function () {
        var drawn = renderPanels(data);
        drawn.visible.then(function () {
          if (SW.interactiveMs === null) { SW.interactiveMs = window.performance.now(); }
        });
        return drawn.all;
      }).then(function () {
        SW.renders += 1;
        document.body.dataset.renders = String(SW.renders);
        if (!SW.ready) {
          SW.ready = true;
          SW.allDrawnMs = window.performance.now();
          SW.timing.scriptsDone = domReadyAt;
          document.body.dataset.ready = "1";
        }
        lastSignature = data.runs ? runsSignature(data.runs) : signature(data.run);
        liveBadge(data.runs || [data.run]);
      });
    }).catch(function (err) {
      SW.errors.push(String(err.message || err));
      showError("Could not load this page: " + (err.message || err));
      if (!SW.ready) { $("panels").textContent = ""; document.body.dataset.ready = "error"; }
    }).then(function () {
      loading = false;
      if (loadAgain) { loadAgain = false; return load(); }
    });
  }

  SW.reload = load;  // the page's data fetched and drawn again (what a refresh does)

  function signature(run) {
    return [run.status, run.last_step, JSON.stringify(run.frames), run.updated_at, run.last_seen_at].join("|");
  }

  function runsSignature(runs) { return runs.map(signature).join(";"); }

  function isLive(runs) { return runs.some(function (r) { return r && r.status === "running"; }); }

  function liveBadge(runs) {
    var badge = $("live");
    badge.hidden = false;
    var live = isLive(runs);
    badge.classList.toggle("on", live);
    badge.textContent = (live ? "live · " : "") + "page updated " + formatTime(new Date());
    badge.title = badge.textContent;  // a phone shows only the dot (spectrawatch.css)
  }

  function poll() {
    var data = SW.lastData;
    var runs = data ? (data.runs || [data.run]) : [];
    var delay = isLive(runs) ? POLL_LIVE_MS : POLL_IDLE_MS;
    window.setTimeout(function () {
      if (document.hidden || !data) { poll(); return; }
      var check;
      if (cfg.page === "compare") {  // the figure again only when a compared run changed
        check = Promise.all(runs.map(function (r) { return api("/runs/" + r.id); }))
          .then(function (now) { return runsSignature(now) !== lastSignature; });
      } else {
        check = api("/runs/" + cfg.runId).then(function (run) { return signature(run) !== lastSignature; });
      }
      check.then(function (changed) { return changed ? load() : null; })
        .catch(function (err) { console.warn("spectrawatch: refresh failed:", err.message || err); })
        .then(poll);
    }, delay);
  }

  // Plotly (responsive) follows the window's width, but a legend moved under the axis title
  // was measured at the old width (more or fewer rows now): measure again once resizing stops.
  var resizeTimer = null;
  SW.resizes = 0;
  window.addEventListener("resize", function () {
    window.clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(function () {
      if (!SW.ready || !SW.lastData || loading) { return; }  // a load draws afresh anyway
      Array.prototype.forEach.call(document.querySelectorAll("#panels .plot"), function (plot) {
        delete plot.dataset.legendBottom;
      });
      renderPanels(SW.lastData).all.then(function () { SW.resizes += 1; });
    }, 250);
  });

  // Back / Forward between the page's own states (control choices): draw the URL's state.
  window.addEventListener("popstate", function () { load(); });
  load().then(poll);
})();
