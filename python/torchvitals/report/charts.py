"""Interactive line charts of the report (the loss and LR, the layers' gradient norms):
inline SVG drawn by a small inline script from the data embedded beside it as JSON.
Hover shows the values at the step under the pointer (the nearest line first, drawn
bold); dragging across the plot zooms on those steps, a double click zooms back out.

Everything is in the page: no library, no network (about 8 KB of script, against about
3.5 MB for plotly's bundle, see docs/report.md). Long series are cut to at most
``POINTS`` points per line by keeping each block's lowest and highest value, so a spike
stays visible at any zoom.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

import numpy as np

POINTS = 2000  # per line


def envelope(x: np.ndarray, y: np.ndarray, limit: int = POINTS) -> tuple[list, list]:
    """``(x, y)`` as JSON lists of at most ``limit`` points: every point when they fit,
    else each block's minimum and maximum in step order; NaN and inf become ``None`` (a gap)."""
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    if y.size > limit:
        keep: list[int] = []
        for block in np.array_split(np.arange(y.size), limit // 2):
            vals = y[block]
            finite = np.isfinite(vals)
            if not finite.any():
                keep.append(int(block[0]))
                continue
            lo = int(block[np.argmin(np.where(finite, vals, np.inf))])
            hi = int(block[np.argmax(np.where(finite, vals, -np.inf))])
            keep += sorted({lo, hi})
        x, y = x[keep], y[keep]
    ys = [float(v) if np.isfinite(v) else None for v in y]
    return [int(v) for v in x], ys


def line(name: str, x: np.ndarray, y: np.ndarray, color: str, axis: str = "y") -> dict:
    """One line of a chart (``axis``: ``"y"``, left, or ``"y2"``, right)."""
    xs, ys = envelope(x, y)
    return {"name": name, "x": xs, "y": ys, "color": color, "axis": axis}


def log_scale(values: Sequence[np.ndarray], decades: float = 0.0) -> bool:
    """A log axis for lines whose finite values are all positive and span more than
    ``decades`` decades."""
    finite = np.concatenate([np.asarray(v, float)[np.isfinite(v)] for v in values] or [[]])
    return bool(
        finite.size and finite.min() > 0 and np.log10(finite.max() / finite.min()) > decades
    )


def chart(spec: dict, alt: str) -> str:
    """A ``<figure>`` holding an empty SVG that :data:`SCRIPT` draws from ``spec``: ``lines``
    (:func:`line`), ``ylabel``, ``ylog``, optional ``y2label``/``y2log``, ``events``
    (``step``, ``end``, ``label``, ``color``) and ``nearest`` (hover names the nearest line
    first)."""
    data = json.dumps(spec, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    return (
        "<figure class='plot chart'>"
        f"<svg role='img' aria-label='{html.escape(alt, quote=True)}'></svg>"
        f"<script type='application/json'>{data}</script>"
        "<figcaption>Hover for values; drag across the plot to zoom on those steps, "
        "double-click to zoom out.</figcaption><noscript>This plot needs JavaScript.</noscript>"
        "</figure>"
    )


SCRIPT = r"""
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg", W = 1100, PLOT_H = 300, LEFT = 78;
  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, s, attrs) {
    var t = el("text", attrs || {}, parent);
    t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = s;
    return t;
  }
  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "-";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2).replace(/\.?0+e/, "e");
    return String(+v.toPrecision(4));
  }
  function nice(lo, hi, n) {
    var span = hi - lo;
    if (!(span > 0)) return [lo];
    var step = Math.pow(10, Math.floor(Math.log10(span / n))), err = span / n / step;
    step *= err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      out.push(+v.toPrecision(12));
    }
    return out;
  }
  function axis(lo, hi, log, a, b) {
    var f = log ? Math.log10 : function (v) { return v; };
    var l = f(lo), h = f(hi);
    if (!(h > l)) { l -= 0.5; h += 0.5; }
    return {
      log: log,
      px: function (v) { return a + (f(v) - l) / (h - l) * (b - a); },
      inv: function (p) {
        var v = l + (p - a) / (b - a) * (h - l);
        return log ? Math.pow(10, v) : v;
      },
      ticks: function () {
        if (!log) return nice(lo, hi, 5);
        var t = nice(l, h, 5).filter(function (e) { return Math.abs(e - Math.round(e)) < 1e-9; });
        if (t.length >= 2) return t.map(function (e) { return Math.pow(10, e); });
        return nice(lo, hi, 4).filter(function (v) { return v > 0; });
      }
    };
  }
  function nearest(xs, x) {
    var lo = 0, hi = xs.length - 1;
    while (hi - lo > 1) { var mid = (lo + hi) >> 1; if (xs[mid] < x) lo = mid; else hi = mid; }
    return Math.abs(xs[lo] - x) <= Math.abs(xs[hi] - x) ? lo : hi;
  }
  function usable(v, log) { return v !== null && isFinite(v) && (!log || v > 0); }
  function extent(lines, x0, x1, log) {
    var lo = Infinity, hi = -Infinity;
    lines.forEach(function (s) {
      for (var i = 0; i < s.x.length; i++) {
        var v = s.y[i];
        if (s.x[i] < x0 || s.x[i] > x1 || !usable(v, log)) continue;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    });
    if (lo === Infinity) return null;
    if (lo === hi) { if (log) { lo /= 2; hi *= 2; } else { lo -= 0.5; hi += 0.5; } }
    else if (log) { var f = Math.pow(hi / lo, 0.04); lo /= f; hi *= f; }
    else { var pad = (hi - lo) * 0.04; lo -= pad; hi += pad; }
    return [lo, hi];
  }
  function path(s, X, Y, x0, x1) {
    var d = "", pen = false;
    for (var i = 0; i < s.x.length; i++) {
      // the points just outside the domain too, so that lines reach the plot's edges
      var inside = s.x[i] >= x0 && s.x[i] <= x1 ||
        (i + 1 < s.x.length && s.x[i + 1] >= x0 && s.x[i] < x0) ||
        (i > 0 && s.x[i - 1] <= x1 && s.x[i] > x1);
      if (!inside || !usable(s.y[i], Y.log)) { pen = false; continue; }
      d += (pen ? "L" : "M") + X.px(s.x[i]).toFixed(1) + " " + Y.px(s.y[i]).toFixed(1);
      pen = true;
    }
    return d;
  }
  function draw(fig, spec, dom) {
    var svg = fig.querySelector("svg");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var all = spec.lines, x0 = dom[0], x1 = dom[1];
    var right = all.some(function (s) { return s.axis === "y2"; }) ? 78 : 24;
    var X0 = LEFT, X1 = W - right;
    var X = axis(x0, x1, false, X0, X1);
    // event labels in a band above the plot, staggered into rows so that none overlap
    var rows = [], placed = [];
    var events = (spec.events || []).slice().sort(function (a, b) { return a.step - b.step; });
    events.forEach(function (ev) {
      if (ev.step > x1 || (ev.end === null ? ev.step : ev.end) < x0) return;
      var px = X.px(Math.max(ev.step, x0)), w = 6.2 * ev.label.length + 8, r = 0;
      while (r < rows.length && rows[r] > px) r++;
      rows[r] = px + w;
      placed.push({ev: ev, px: px, row: r});
    });
    var band = rows.length ? 14 * rows.length + 6 : 0, top = band + 8, bottom = top + PLOT_H;
    var legendRows = Math.ceil(all.length / 5);
    var H = bottom + 42 + 16 * legendRows;
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    var clipId = fig.dataset.clip;
    var defs = el("defs", {}, svg), clip = el("clipPath", {id: clipId}, defs);
    el("rect", {x: X0, y: top, width: X1 - X0, height: PLOT_H}, clip);
    el("rect", {x: X0, y: top, width: X1 - X0, height: PLOT_H, fill: "#fff", stroke: "#bbb"}, svg);
    var axes = {};
    [["y", spec.ylog, spec.ylabel], ["y2", spec.y2log, spec.y2label]].forEach(function (a) {
      var mine = all.filter(function (s) { return (s.axis || "y") === a[0]; });
      var ex = mine.length && extent(mine, x0, x1, a[1]);
      if (!ex) return;
      var Y = axis(ex[0], ex[1], a[1], bottom, top);
      axes[a[0]] = Y;
      var xText = a[0] === "y" ? X0 - 6 : X1 + 6, anchor = a[0] === "y" ? "end" : "start";
      Y.ticks().forEach(function (t) {
        var py = Y.px(t);
        if (py < top - 1 || py > bottom + 1) return;
        if (a[0] === "y") el("line", {x1: X0, x2: X1, y1: py, y2: py, stroke: "#eee"}, svg);
        text(svg, xText, py + 4, fmt(t), {"text-anchor": anchor, "font-size": 11, fill: "#555"});
      });
      var lx = a[0] === "y" ? 14 : W - 10, ly = (top + bottom) / 2;
      text(svg, lx, ly, a[2] || "", {"text-anchor": "middle", "font-size": 12, fill: "#333",
        transform: "rotate(-90 " + lx + " " + ly + ")"});
    });
    nice(x0, x1, 8).forEach(function (t) {
      var px = X.px(t);
      el("line", {x1: px, x2: px, y1: top, y2: bottom, stroke: "#f2f2f2"}, svg);
      text(svg, px, bottom + 15, fmt(t), {"text-anchor": "middle", "font-size": 11, fill: "#555"});
    });
    text(svg, (X0 + X1) / 2, bottom + 32, "step",
      {"text-anchor": "middle", "font-size": 12, fill: "#333"});
    placed.forEach(function (p) {
      var ev = p.ev, g = el("g", {"class": "event"}, svg);
      if (ev.end !== null && ev.end > ev.step) {
        var a = X.px(Math.max(ev.step, x0)), b = X.px(Math.min(ev.end, x1));
        el("rect", {x: a, y: top, width: Math.max(b - a, 1), height: PLOT_H, fill: ev.color,
          "fill-opacity": 0.12, "clip-path": "url(#" + clipId + ")"}, g);
      }
      if (ev.step >= x0) el("line", {x1: p.px, x2: p.px, y1: 4 + 14 * p.row + 12, y2: bottom,
        stroke: ev.color, "stroke-dasharray": "4 3", "stroke-width": 1.2}, g);
      text(g, p.px + 2, 4 + 14 * p.row + 10, ev.label, {"font-size": 11, fill: ev.color});
    });
    var paths = all.map(function (s) {
      var Y = axes[s.axis || "y"];
      if (!Y) return null;
      return el("path", {d: path(s, X, Y, x0, x1), fill: "none", stroke: s.color,
        "stroke-width": s.axis === "y2" ? 1.2 : 1, "stroke-opacity": s.axis === "y2" ? 0.8 : 1,
        "clip-path": "url(#" + clipId + ")"}, svg);
    });
    all.forEach(function (s, i) {
      var lx = X0 + (i % 5) * 200, ly = bottom + 52 + 16 * Math.floor(i / 5);
      el("line", {x1: lx, x2: lx + 18, y1: ly - 4, y2: ly - 4, stroke: s.color,
        "stroke-width": 2}, svg);
      var name = s.name.length > 28 ? s.name.slice(0, 27) + "\u2026" : s.name;
      var label = text(svg, lx + 22, ly, name, {"font-size": 11, fill: "#333"});
      el("title", {}, label).textContent = s.name;
    });
    // hover and zoom
    var cursor = el("line", {y1: top, y2: bottom, stroke: "#555", visibility: "hidden"}, svg);
    var sel = el("rect", {y: top, height: PLOT_H, fill: "#1565c0", "fill-opacity": 0.12,
      visibility: "hidden"}, svg);
    var tip = el("g", {visibility: "hidden", "pointer-events": "none"}, svg);
    var overlay = el("rect", {x: X0, y: top, width: X1 - X0, height: PLOT_H, fill: "transparent",
      "class": "overlay"}, svg);
    function local(e) {
      var pt = svg.createSVGPoint(); pt.x = e.clientX; pt.y = e.clientY;
      return pt.matrixTransform(svg.getScreenCTM().inverse());
    }
    var drag = null, bold = -1;
    overlay.addEventListener("mousemove", function (e) {
      var p = local(e), x = X.inv(p.x), rowsOut = [], step = null;
      all.forEach(function (s, i) {
        var Y = axes[s.axis || "y"];
        if (!Y || !s.x.length) return;
        var j = nearest(s.x, x), v = s.y[j];
        if (step === null || Math.abs(s.x[j] - x) < Math.abs(step - x)) step = s.x[j];
        var d = usable(v, Y.log) ? Math.abs(Y.px(v) - p.y) : Infinity;
        rowsOut.push({i: i, name: s.name, v: v, d: d, color: s.color});
      });
      if (step === null) return;
      if (spec.nearest) rowsOut.sort(function (a, b) { return a.d - b.d; });
      if (bold >= 0 && paths[bold]) paths[bold].setAttribute("stroke-width", 1);
      bold = spec.nearest && rowsOut.length && rowsOut[0].d < Infinity ? rowsOut[0].i : -1;
      if (bold >= 0 && paths[bold]) paths[bold].setAttribute("stroke-width", 2.6);
      var cx = X.px(step);
      cursor.setAttribute("x1", cx);
      cursor.setAttribute("x2", cx);
      cursor.setAttribute("visibility", "visible");
      while (tip.firstChild) tip.removeChild(tip.firstChild);
      var lines = ["step " + step].concat(rowsOut.slice(0, 10).map(function (r) {
        return r.name + ": " + fmt(r.v);
      }));
      var tw = 7 + 6.4 * Math.max.apply(null, lines.map(function (s) { return s.length; }));
      var tx = cx + 12 + tw > X1 ? cx - 12 - tw : cx + 12;
      el("rect", {x: tx, y: top + 6, width: tw, height: 16 * lines.length + 6, fill: "#fff",
        stroke: "#999", "fill-opacity": 0.95, rx: 3}, tip);
      lines.forEach(function (s, k) {
        text(tip, tx + 5, top + 20 + 16 * k, s, {"font-size": 11,
          fill: k ? rowsOut[k - 1].color : "#222",
          "font-weight": k === 1 && spec.nearest ? "bold" : "normal"});
      });
      tip.setAttribute("visibility", "visible");
      if (drag !== null) {
        sel.setAttribute("x", Math.min(drag, p.x)); sel.setAttribute("width", Math.abs(p.x - drag));
        sel.setAttribute("visibility", "visible");
      }
    });
    overlay.addEventListener("mouseleave", function () {
      cursor.setAttribute("visibility", "hidden"); tip.setAttribute("visibility", "hidden");
    });
    overlay.addEventListener("mousedown", function (e) { drag = local(e).x; e.preventDefault(); });
    overlay.addEventListener("mouseup", function (e) {
      var a = drag, b = local(e).x;
      drag = null; sel.setAttribute("visibility", "hidden");
      if (a !== null && Math.abs(b - a) > 4) {
        draw(fig, spec, [X.inv(Math.min(a, b)), X.inv(Math.max(a, b))]);
      }
    });
    overlay.addEventListener("dblclick", function () { draw(fig, spec, spec.full); });
    fig.dataset.domain = x0 + " " + x1;
  }
  function steps(spec) {
    var lo = Infinity, hi = -Infinity;
    spec.lines.forEach(function (s) {
      if (!s.x.length) return;
      lo = Math.min(lo, s.x[0]);
      hi = Math.max(hi, s.x[s.x.length - 1]);
    });
    return lo === Infinity ? [0, 1] : [lo, hi > lo ? hi : lo + 1];
  }
  Array.prototype.forEach.call(document.querySelectorAll("figure.chart"), function (fig, k) {
    var spec = JSON.parse(fig.querySelector("script[type='application/json']").textContent);
    spec.full = steps(spec);
    fig.dataset.clip = "clip" + k;
    draw(fig, spec, spec.full);
  });
  // histogram of any layer: the pre-rendered figures wait in a <template> until picked
  var layerSel = document.getElementById("hist-layer");
  var kindSel = document.getElementById("hist-kind");
  function showHist() {
    var opt = layerSel.options[layerSel.selectedIndex], kinds = opt.dataset.kinds.split(" ");
    Array.prototype.forEach.call(kindSel.options, function (o) {
      o.disabled = kinds.indexOf(o.value) < 0;
    });
    if (kinds.indexOf(kindSel.value) < 0) kindSel.value = kinds[0];
    var view = document.getElementById("hist-view"), layer = layerSel.value, kind = kindSel.value;
    while (view.firstChild) view.removeChild(view.firstChild);
    var store = document.getElementById("hist-store").content.children;
    for (var i = 0; i < store.length; i++) {
      if (store[i].dataset.layer === layer && store[i].dataset.kind === kind) {
        view.appendChild(document.importNode(store[i], true));
        return;
      }
    }
  }
  if (layerSel && kindSel) {
    layerSel.addEventListener("change", showHist);
    kindSel.addEventListener("change", showHist);
    showHist();
  }
})();
"""
