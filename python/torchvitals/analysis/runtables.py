"""Turn a recorded run (pyarrow tables, see docs/schema.md) into aligned arrays.

``series_from_run(run)`` returns ``(step, loss, lr, series)`` where ``series`` uses the
keys of :func:`torchvitals.analysis.detect_events`:

* scalars: ``grad_norm``, ``loss_scale`` (by name from ``run.scalars``);
* per layer, from ``run.layers``: ``grad_norm/<layer>`` = sqrt(sumsq) of kind ``grad``,
  ``dead_frac/<layer>`` = dead_units/units of kind ``act`` (NaN where the row held NaN/Inf),
  ``sat_frac/<layer>`` = saturated/numel of kind ``act``, ``weight_norm/<layer>`` and
  ``act_grad_norm/<layer>`` = sqrt(sumsq) of kinds ``weight`` and ``act_grad``,
  ``nonfinite/<layer>`` = nan+inf summed over all kinds, and per kind
  ``nonfinite_act/``, ``nonfinite_grad/``, ``nonfinite_act_grad/``, ``nonfinite_weight/``
  (used to find where a NaN was made: :func:`torchvitals.analysis.nonfinite.origin`);
* ``large_frac/<layer>`` = large/numel of kind ``act`` (|x| >= 6 in the output of a linear
  layer or norm; schema version 2), where measured.

Layer series are returned in forward order: modules in the manifest's ``layers`` order
(``named_modules`` order), a parameter (``<module>.<name>``) with its module, layers the
manifest does not name after those, in table order.

``metric`` picks the scalar the curve events are computed on (default ``"loss"``; any
scalar the user logged, e.g. ``"val/loss"``); every series is aligned on its steps.

Everything is aligned on the steps of the ``loss`` scalar (missing values are NaN). Only
the lowest rank present is used, per series (so rows merged across
ranks, rank -1, win).

``run`` is a loaded ``Run``, or a run directory (a path) or a
:class:`torchvitals.store.scan.RunScan`: then the layers are streamed in step chunks
(bounded memory, :func:`torchvitals.store.scan.scan_run`) and only the rows the series use
are kept; the result is the same.
"""

from __future__ import annotations

import os

import numpy as np

from torchvitals.engine.derived import norm
from torchvitals.store.merge import whole_layer_rows
from torchvitals.store.scan import SERIES_COLUMNS
from torchvitals.store.schema import dictionary_codes


def _one_rank(table, *codes) -> np.ndarray:
    """Per series (rows with equal ``codes``): the rows of its lowest rank. Merged rows
    (rank -1, torchvitals.store.merge) are the lowest, so they win where a series has them."""
    n = table.num_rows
    if "rank" not in table.column_names or not n:
        return np.ones(n, dtype=bool)
    rank = _col(table, "rank").astype(np.int64)
    key = np.zeros(n, dtype=np.int64)
    for c in codes:
        key = key * (int(c.max()) + 1) + c
    best = np.full(int(key.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(best, key, rank)
    return rank == best[key]


def _col(table, name) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if hasattr(col, "dictionary_decode"):
        col = col.dictionary_decode()
    return col.to_numpy(zero_copy_only=False)


def _align(steps_all: np.ndarray, steps: np.ndarray, vals: np.ndarray) -> np.ndarray:
    out = np.full(steps_all.size, np.nan)
    pos = np.searchsorted(steps_all, steps)
    ok = (pos < steps_all.size) & (steps_all[np.minimum(pos, steps_all.size - 1)] == steps)
    out[pos[ok]] = vals[ok]
    return out


def layer_order(run, names) -> list[str]:
    """``names`` (layers or parameters) in forward order, from ``run.manifest["layers"]``."""
    manifest = getattr(run, "manifest", None) or {}
    entries = manifest.get("layers") if isinstance(manifest, dict) else None
    pos: dict[str, int] = {}
    for i, e in enumerate(entries or []):
        name = e.get("name") if isinstance(e, dict) else None
        if isinstance(name, str):
            pos.setdefault(name, i)
    big = len(pos) + 1

    def key(item):
        j, name = item
        if name in pos:
            return (pos[name], 0, j)
        mod, dot, _ = name.rpartition(".")
        if dot and mod in pos:
            return (pos[mod], 1, j)
        if not dot and "" in pos and name not in pos:  # a parameter of the root module
            return (pos[""], 1, j)
        return (big, 0, j)

    return [n for _, n in sorted(enumerate(names), key=key)]


def series_from_run(run, metric: str = "loss", progress=None):
    """``(step, loss, lr, series)`` of ``run`` (see the module docstring). ``progress``:
    ``progress(done, total)`` while a scanned run's layers are read."""
    if isinstance(run, (str, os.PathLike)):
        from torchvitals.store.scan import scan_run

        run = scan_run(run)
    scalars = getattr(run, "scalars", None)
    if scalars is None:
        raise ValueError("run: expected an object with a pyarrow Table attribute 'scalars'")
    for c in ("step", "name", "value"):
        if c not in scalars.column_names:
            raise ValueError(f"run.scalars: missing column {c!r}")
    step = _col(scalars, "step").astype(np.int64)
    val = _col(scalars, "value").astype(np.float64)
    codes, labels = dictionary_codes(scalars.column("name"))
    keep = _one_rank(scalars, codes)
    by_name = {}
    for k, lab in enumerate(labels):
        sel = keep & (codes == k)
        if sel.any():
            s, v = step[sel], val[sel]
            o = np.argsort(s, kind="stable")
            by_name[lab] = (s[o], v[o])
    if metric not in by_name:
        have = ", ".join(sorted(by_name)[:20])
        raise ValueError(f"run.scalars: no {metric!r} rows (scalars logged: {have})")
    steps_all, loss = by_name[metric]
    steps_all, uniq = np.unique(steps_all, return_index=True)
    loss = loss[uniq]
    lr = None
    lr_name = "lr/group0" if "lr/group0" in by_name else ("lr" if "lr" in by_name else None)
    if lr_name:
        lr = _align(steps_all, *by_name[lr_name])
    series = {}
    for name in ("grad_norm", "loss_scale"):
        if name in by_name:
            series[name] = _align(steps_all, *by_name[name])
    if hasattr(run, "series_rows"):  # a scanned run: only the rows the series use
        layers = run.series_rows(progress)
    else:
        layers = getattr(run, "layers", None)
    if layers is not None and layers.num_rows:
        # a shard's part of a parameter is no layer's statistic
        layer_part = _layer_series(whole_layer_rows(layers), steps_all)
        names = list(dict.fromkeys(k.partition("/")[2] for k in layer_part))
        rank = {n: i for i, n in enumerate(layer_order(run, names))}
        for k in sorted(layer_part, key=lambda k: rank[k.partition("/")[2]]):
            series[k] = layer_part[k]
    return steps_all, loss, lr, series


def _layer_series(layers, steps_all):
    need = tuple(c for c in SERIES_COLUMNS if c not in ("rank", "large"))
    optional = tuple(c for c in ("large",) if c in layers.column_names)
    for c in need:
        if c not in layers.column_names:
            raise ValueError(f"run.layers: missing column {c!r}")
    step = _col(layers, "step").astype(np.int64)
    lcodes, lnames = dictionary_codes(layers.column("layer"))
    kcodes, knames = dictionary_codes(layers.column("kind"))
    keep = _one_rank(layers, lcodes, kcodes)
    cols = {c: _col(layers, c).astype(np.float64) for c in need[3:] + optional}
    out = {}
    kind_idx = {k: i for i, k in enumerate(knames)}
    n = steps_all.size
    pos = np.searchsorted(steps_all, step)
    ok = keep & (pos < n) & (steps_all[np.minimum(pos, n - 1)] == step)
    nl = len(lnames)

    def grid(mask, values):
        g = np.full((nl, n), np.nan)
        m = ok & mask
        g[lcodes[m], pos[m]] = values[m]
        return g

    if "grad" in kind_idx:
        g = grid(kcodes == kind_idx["grad"], norm(cols["sumsq"]))
        for j, name in enumerate(lnames):
            if np.isfinite(g[j]).any():
                out[f"grad_norm/{name}"] = g[j]
    if "act" in kind_idx:
        m = kcodes == kind_idx["act"]
        with np.errstate(divide="ignore", invalid="ignore"):
            # A unit that saw only NaN was never positive, yet it did not die: unknown.
            finite = cols["nan"] + cols["inf"] == 0
            dead = np.where(
                (cols["units"] > 0) & finite, cols["dead_units"] / cols["units"], np.nan
            )
            sat = np.where(cols["numel"] > 0, cols["saturated"] / cols["numel"], np.nan)
            large = (
                np.where(cols["numel"] > 0, cols["large"] / cols["numel"], np.nan)
                if "large" in cols
                else None
            )
        gd, gs = grid(m, dead), grid(m, sat)
        gl = grid(m, large) if large is not None else None
        for j, name in enumerate(lnames):
            if np.isfinite(gd[j]).any():
                out[f"dead_frac/{name}"] = gd[j]
            if np.isfinite(gs[j]).any():
                out[f"sat_frac/{name}"] = gs[j]
            if gl is not None and np.isfinite(gl[j]).any():
                out[f"large_frac/{name}"] = gl[j]
    for kind, metric in (("weight", "weight_norm"), ("act_grad", "act_grad_norm")):
        if kind in kind_idx:
            g = grid(kcodes == kind_idx[kind], norm(cols["sumsq"]))
            for j, name in enumerate(lnames):
                if np.isfinite(g[j]).any():
                    out[f"{metric}/{name}"] = g[j]
    nf = np.zeros((nl, n))
    m = ok
    np.add.at(nf, (lcodes[m], pos[m]), cols["nan"][m] + cols["inf"][m])
    for j, name in enumerate(lnames):
        if nf[j].any():
            out[f"nonfinite/{name}"] = nf[j]
    if nf.any():
        bad = cols["nan"] + cols["inf"]
        for kind in ("act", "grad", "act_grad", "weight"):
            if kind not in kind_idx:
                continue
            g = np.zeros((nl, n))
            m = ok & (kcodes == kind_idx[kind])
            np.add.at(g, (lcodes[m], pos[m]), bad[m])
            for j, name in enumerate(lnames):
                if g[j].any():
                    out[f"nonfinite_{kind}/{name}"] = g[j]
    return out
