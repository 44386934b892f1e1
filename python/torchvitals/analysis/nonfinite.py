"""Where the first NaN/Inf was made.

At the first step where any tensor of any layer holds a non-finite value, the candidates are
ordered by where the value was made, not by the table's order:

1. activations (kind ``act``), in forward order: the first module whose output is
   non-finite made it in the forward pass (its input, the previous output, was finite);
2. activation gradients (``act_grad``, recorded with ``Monitor(act_grads=True)``), in
   backward order (reverse forward order): the last module in forward order whose output
   gradient is non-finite received it from the module after it, whose backward made it;
3. parameter gradients (``grad``), in backward order: the last parameterised module with a
   non-finite gradient. Without activation gradients the backward that made the value lies
   between that module and the next parameterised module, whose gradients are finite: the
   attribution names that range and its confidence is ``low`` (``medium`` when the two are
   adjacent in forward order);
4. weights (``weight``) only when nothing else is non-finite (an update made them).

``series`` holds ``nonfinite_<kind>/<layer>`` counts (see :mod:`runtables`) in forward order;
parameters (``<module>.<name>``) belong to their module.
"""

from __future__ import annotations

import numpy as np

KINDS = ("act", "act_grad", "grad", "weight")


def _module_of(param: str) -> str:
    """The module a parameter ``<module>.<param>`` belongs to (``""``: the root)."""
    return param.rpartition(".")[0]


def origin(step: np.ndarray, series: dict[str, np.ndarray]) -> dict | None:
    """``{"step", "layer", "kind", "made_in", "confidence", "candidates", "note"}`` for the
    first non-finite step, or ``None`` when every recorded tensor stayed finite."""
    per_kind: dict[str, list[tuple[str, np.ndarray]]] = {k: [] for k in KINDS}
    order: list[str] = []  # layers in forward order, as the series come
    for key, v in series.items():
        metric, _, layer = key.partition("/")
        if not layer:
            continue
        if layer not in order:
            order.append(layer)
        if metric.startswith("nonfinite_") and metric[10:] in per_kind:
            per_kind[metric[10:]].append((layer, np.asarray(v)))
    firsts = []
    for rows in per_kind.values():
        for _, v in rows:
            idx = np.flatnonzero(v > 0)
            if idx.size:
                firsts.append(int(idx[0]))
    if not firsts:
        return None
    i0 = min(firsts)
    at = {k: [lay for lay, v in rows if v[i0] > 0] for k, rows in per_kind.items()}
    pos: dict[str, int] = {}
    for j, lay in enumerate(order):
        pos.setdefault(lay, j)
        pos.setdefault(_module_of(lay), j)
    out = {"step": int(step[i0]), "candidates": []}
    # 1. made in the forward
    if at["act"]:
        first = min(at["act"], key=lambda lay: pos[lay])
        out.update(layer=first, kind="act", made_in="forward", confidence="high")
        out["note"] = f"the output of {first} is the first non-finite activation in forward order"
        out["candidates"] = sorted(at["act"], key=lambda lay: pos[lay])
        return out
    acts = [lay for lay, _ in per_kind["act"]]  # modules with recorded outputs
    # 2. made in the backward, activation gradients recorded
    if at["act_grad"]:
        ranked = sorted(at["act_grad"], key=lambda lay: -pos[lay])
        last_bad = ranked[0]
        recorded = [lay for lay, _ in per_kind["act_grad"]]
        later = [lay for lay in recorded if pos[lay] > pos[last_bad]]
        if later:
            maker = min(later, key=lambda lay: pos[lay])
            note = (
                f"the output gradient of {maker} is finite, that of {last_bad} (its input) is "
                f"not: the backward of {maker} made it"
            )
            out.update(layer=maker, kind="act_grad", made_in="backward", confidence="high")
        else:
            note = f"the output gradient of {last_bad}, the last recorded module, is non-finite"
            out.update(layer=last_bad, kind="act_grad", made_in="backward", confidence="medium")
        out["note"] = note
        out["candidates"] = ranked
        return out
    # 3. only parameter gradients
    if at["grad"]:
        mods = [_module_of(p) for p in at["grad"]]
        ranked = sorted(set(mods), key=lambda m: -pos.get(m, -1))
        last_bad = ranked[0]
        nxt = [m for m in _param_modules(series) if pos.get(m, -1) > pos.get(last_bad, -1)]
        if nxt:
            nm = min(nxt, key=lambda m: pos.get(m, 1 << 30))
            between = [
                lay
                for lay in order
                if pos.get(last_bad, -1) < pos[lay] < pos.get(nm, 1 << 30)
                and lay in acts
                and lay != nm
            ]
            conf = "medium" if not between else "low"
            note = (
                f"only parameter gradients recorded: the last parameterised module with a "
                f"non-finite gradient is {last_bad}, the next one ({nm}) is finite; the value "
                f"was made in the backward of {last_bad}"
                + (f" or of {', '.join(between)}" if between else "")
                + " (record act_grads=True to tell)"
            )
        else:
            conf = "medium"
            note = (
                f"only parameter gradients recorded: {last_bad} is the last parameterised "
                "module; the value came from its backward or from the loss"
            )
        out.update(layer=last_bad, kind="grad", made_in="backward", confidence=conf, note=note)
        out["candidates"] = ranked
        return out
    ranked = sorted(at["weight"], key=lambda lay: pos[lay])
    out.update(
        layer=_module_of(ranked[0]),
        kind="weight",
        made_in="update",
        confidence="low",
        note="only weights are non-finite: an optimizer update made them",
    )
    out["candidates"] = [_module_of(r) for r in ranked]
    return out


def _param_modules(series: dict[str, np.ndarray]) -> list[str]:
    """Modules with recorded parameter gradients, in forward order."""
    out = []
    for key in series:
        metric, _, layer = key.partition("/")
        if metric == "grad_norm" and layer:
            m = _module_of(layer)
            if m not in out:
                out.append(m)
    return out
