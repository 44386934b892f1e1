"""Evaluate ``torchvitals.analysis.detect_events`` on the labelled real curves.

Usage: ``python benchmarks/eval_curves.py [--perf]``. The curves live in ``../shared/curves``
next to the repository checkout (or ``$TORCHVITALS_CURVES``); without them the script
prints a message and exits 0.

Ground truth is the event table of ``shared/curves/README.md``, encoded in ``LABELS`` below
(one row per event, with its tolerance window in the series' own step units). Labels marked
``optional`` are events the README mentions without classifying them (training resumes,
augmentation switched off, an LR "change" that keeps the LR) or that it lists with "...":
a detection there is neither a true nor a false positive, a miss is not a false negative.
Series marked ``exhaustive=False`` for a kind (README lists are explicitly incomplete) do not
count unmatched detections of that kind as false positives. The same detector settings,
and the same baseline settings, are used for every file.

Baselines:
* ``pelt``: ``ruptures.Pelt(model="l2", min_size=2)`` on the same log-scale, block-median
  (<= 2000 points) series, BIC-style penalty ``pen = 2 sigma^2 log n`` (sigma from the MAD
  of first differences). A breakpoint where the segment mean improves is ``lr_drop`` when
  the LR fell by >= 30% within one segment of it, else ``kick_in``; a worsening followed by
  an improvement is ``spike``, a final worsening ``divergence``; a segment of >= 5% of the
  series before an improvement is a ``plateau``.
* ``rop``: the rule of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (patience 10,
  threshold 1e-4, rel mode, cooldown 0) run on the raw metric point by point: a ``plateau``
  each time it would fire, and an improvement event (``lr_drop``/``kick_in`` as above) at
  the first point beating the best value by the threshold after a firing.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from torchvitals.analysis.detect import detect_events  # noqa: E402
from torchvitals.analysis.series import (  # noqa: E402
    block_bounds,
    block_reduce,
    diff_noise,
    fit_scale,
)

EVAL_KINDS = ("lr_drop", "kick_in", "plateau", "spike", "divergence")
DROP = ("lr_drop", "kick_in")


def curves_dir() -> Path | None:
    env = os.environ.get("TORCHVITALS_CURVES")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "curves"
    return p if p.is_dir() else None


@dataclass
class Label:
    kind: str  # primary kind (for per-kind stats)
    lo: float  # tolerance window (point events) or the labelled interval (plateau)
    hi: float
    accept: tuple = ()  # kinds accepted as a match (default: kind)
    optional: bool = False
    note: str = ""

    def kinds(self):
        return self.accept or (self.kind,)


@dataclass
class Curve:
    name: str
    file: str
    column: str
    higher_is_better: bool = False
    lr: str | None = None
    step: str | None = None  # column with the step; None = row index
    labels: list = field(default_factory=list)
    kinds: tuple = EVAL_KINDS  # kinds evaluated on this series
    not_exhaustive: tuple = ()  # kinds whose unmatched detections are ignored
    negative_control: bool = False
    rows: tuple | None = None  # (source_file substring, first iteration, last iteration)
    extra: dict = field(default_factory=dict)  # layer_series keyword -> column


def lrd(step, tol, **kw):
    return Label("lr_drop", step - tol, step + tol, **kw)


# ---------------------------------------------------------------- ground truth (README.md)
def build_curves() -> list[Curve]:
    cs: list[Curve] = []
    # WRN: lr x0.2 at epochs 60/120/160 (1-based, lr column already changed on that row);
    # plateaus ~40-59 and ~100-119. Tolerance: 3 epochs.
    for net in ("wide-resnet", "nin", "vgg", "resnet-pre-act"):
        cs.append(
            Curve(
                f"wrn/{net}",
                f"wrn_cifar10_{net}.csv",
                "train_loss",
                lr="lr",
                step="epoch",
                labels=[
                    lrd(60, 3),
                    lrd(120, 3),
                    lrd(160, 3, note="small drop (README: hard)"),
                    Label("plateau", 40, 59),
                    Label("plateau", 100, 119),
                ],
            )
        )
    # mxnet: LR x0.1 at these 0-based epochs (README). Optional: unclassified changes.
    mx = {
        "resnet-18": ([29, 59, 89], [(98, "resume, LR 1e-4 -> 1e-3")]),
        "resnet-50": ([29, 59, 95], [(83, "resume, LR unchanged at 1e-3")]),
        "resnet-101": ([59, 89, 119], [(120, "README: augmentation disabled from 120")]),
        "resnet-152": ([29, 59, 89], [(101, "README: augmentation disabled from 101")]),
        "resnet-18-512batch": ([59, 74, 89], [(95, "resume")]),
        "resnet-34": ([59], []),
        "cifar10_resnet-164": ([219, 259, 279], []),
    }
    for net, (drops, opt) in mx.items():
        ds = "cifar10" if "cifar" in net else "imagenet"
        stem = f"mxnet_{ds}_{net.replace('cifar10_', '')}"
        ep_labels = [lrd(e, 2) for e in drops]
        ep_labels += [Label("kick_in", e - 2, e + 2, DROP, optional=True, note=n) for e, n in opt]
        if net == "resnet-34":
            ep_labels.append(
                Label(
                    "lr_drop",
                    88,
                    96,
                    DROP,
                    note="observed: LR change logged at 89 shows no "
                    "effect until the resume (segment 1) at 95, in both series",
                )
            )
            ep_labels.append(
                Label("lr_drop", 73, 77, DROP, note="hidden LR change at 75 (not in lr column)")
            )
        cs.append(
            Curve(
                f"mxnet/{net}/val",
                f"{stem}_epochs.csv",
                "val_acc",
                True,
                "lr_at_val",
                "epoch",
                ep_labels,
                not_exhaustive=("plateau",),
            )
        )
        # batches: step = row index; an epoch label covers the rows of epochs e-1 .. e+1
        cs.append(
            Curve(
                f"mxnet/{net}/train",
                f"{stem}_batches.csv",
                "train_acc",
                True,
                "lr",
                None,
                [("epoch_labels", ep_labels)],
                not_exhaustive=("plateau",),
            )
        )
    # grokking (Nanda): test curves plateau ~100-4000, kick-in 4100 (>0.1) .. 5900 (>0.99)
    for col, hib in (("test_loss", False), ("test_acc", True)):
        cs.append(
            Curve(
                f"grok/nanda/{col}",
                "grok_nanda_modadd113.csv",
                col,
                hib,
                step="epoch",
                labels=[Label("plateau", 100, 4000), Label("kick_in", 3500, 6000)],
                kinds=("plateau", "kick_in"),
            )
        )
    cs.append(
        Curve(
            "grok/nanda/train_loss",
            "grok_nanda_modadd113.csv",
            "train_loss",
            step="epoch",
            labels=[
                Label("spike", s - 200, s + 200, ("spike",)) for s in (14200, 15900, 37100, 37900)
            ],
            kinds=("spike", "divergence", "kick_in", "lr_drop"),
        )
    )
    cs.append(
        Curve(
            "grok/slingshot/train_loss",
            "grok_slingshot.csv",
            "train_loss",
            step="epoch",
            labels=[
                Label("spike", s - 200, s + 200)
                for s in (600, 3700, 5600, 20800, 31200, 32700, 33500)
            ]
            + [Label("divergence", 38600, 39000, note="never recovers to <1e-2")],
            kinds=("spike", "divergence", "kick_in", "lr_drop"),
            not_exhaustive=("spike",),
        )
    )
    cs.append(
        Curve(
            "grok/liu/train_loss (neg)",
            "grok_liu_effective_theory.csv",
            "train_loss",
            step="epoch",
            kinds=("spike", "divergence", "kick_in", "lr_drop"),
            negative_control=True,
        )
    )
    for f, lr in (
        ("modded_nanogpt_2024-10-10_Muon_steps.csv", "lr_multiplier_from_schedule"),
        ("modded_nanogpt_2024-12-04_ValueEmbed_75a3af7b_steps.csv", "lr_multiplier_from_schedule"),
        ("modded_nanogpt_2024-10-20_ScaleUp1B_87bd51fd_steps.csv", "lr_multiplier_from_schedule"),
        ("modded_nanogpt_2024-06-06_AdamW_llmc_steps.csv", None),
    ):
        cs.append(
            Curve(
                f"nanogpt/{f.split('_')[2]} (neg)",
                f,
                "train_loss",
                lr=lr,
                step="step",
                kinds=("spike", "divergence", "kick_in", "lr_drop"),
                negative_control=True,
            )
        )
    bs = "bigscience_chronicles_log_lines.csv"
    ex = {"grad_norm": "grad_norm", "loss_scale": "loss_scale"}
    cs.append(
        Curve(
            "bigscience/176B-spike",
            bs,
            "lm_loss",
            lr="lr",
            step="iteration",
            labels=[Label("spike", 31214, 31222)],
            kinds=("spike", "divergence"),
            rows=("tr11-176B-ml/chronicles.md", 31214, 31251),
            extra=ex,
        )
    )
    cs.append(
        Curve(
            "bigscience/13B-scale-collapse",
            bs,
            "lm_loss",
            lr="lr",
            step="iteration",
            labels=[Label("spike", 29040, 29060, ("spike", "divergence"))],
            kinds=("spike", "divergence"),
            rows=("tr1-13B-base", 29020, 43680),
            extra=ex,
        )
    )
    cs.append(
        Curve(
            "bigscience/104B-divergence",
            bs,
            "lm_loss",
            lr="lr",
            step="iteration",
            labels=[Label("divergence", 7000, 7010, ("divergence", "spike"))],
            kinds=("spike", "divergence"),
            rows=("tr8-104B-wide", 7000, 7220),
            extra=ex,
        )
    )
    return cs


NANOGPT_OUTLIERS = {
    "Muon": [919, 947, 1760, 3361, 5335, 6127],
    "ValueEmbed": [946],
    "ScaleUp1B": [3962, 5964, 7799, 8542, 9435, 10989, 14675, 14738],
}


# ------------------------------------------------------------------------------ loading
def load(curve: Curve, root: Path):
    import pandas as pd

    d = pd.read_csv(root / curve.file)
    if curve.rows is not None:
        src, a, b = curve.rows
        d = d[d["source_file"].str.contains(src, regex=False)]
        d = d[(d["iteration"] >= a) & (d["iteration"] <= b)]
        d = d.drop_duplicates("iteration", keep="last")
    d = d[d[curve.column].notna()].reset_index(drop=True)
    x = d[curve.column].to_numpy(np.float64)
    step = d[curve.step].to_numpy(np.int64) if curve.step else np.arange(len(d), dtype=np.int64)
    lr = d[curve.lr].to_numpy(np.float64) if curve.lr else None
    extra = {k: d[c].to_numpy(np.float64) for k, c in curve.extra.items()}
    labels = list(curve.labels)
    if labels and isinstance(labels[0], tuple):  # epoch labels on a per-batch series
        ep = d["epoch"].to_numpy()
        out = []
        for lab in labels[0][1]:
            rows = np.flatnonzero((ep >= lab.lo + 1) & (ep <= lab.hi - 1))
            if rows.size == 0:
                continue
            out.append(
                Label(lab.kind, float(rows[0]), float(rows[-1]), lab.accept, lab.optional, lab.note)
            )
        labels = out
    return step, x, lr, extra, labels


# -------------------------------------------------------------------------- baselines
def _improvement_kind(lr, i_lo, i_hi):
    if lr is None:
        return "kick_in"
    seg = lr[max(0, i_lo) : i_hi + 1]
    seg = seg[np.isfinite(seg) & (seg > 0)]
    if seg.size >= 2 and seg[-1] / seg[0] <= 0.7:
        return "lr_drop"
    return "kick_in"


def baseline_pelt(step, x, lr, hib):
    import ruptures

    fin = np.isfinite(x)
    step, x = step[fin], x[fin]
    lr = lr[fin] if lr is not None else None
    if x.size < 6:
        return []
    y = fit_scale(x, hib).forward(x)
    bounds = block_bounds(y.size, 2000)
    c = block_reduce(y, bounds, "median")
    sig = max(diff_noise(c), 1e-9)
    pen = 2.0 * sig**2 * math.log(c.size)
    bkps = ruptures.Pelt(model="l2", min_size=2, jump=2).fit(c.reshape(-1, 1)).predict(pen=pen)
    edges = [0, *list(bkps)]
    means = [float(np.mean(c[a:b])) for a, b in itertools.pairwise(edges)]
    out = []
    for k in range(1, len(means)):
        b = edges[k]
        s = int(step[bounds[b]])
        if means[k] < means[k - 1]:
            prev_len = edges[k] - edges[k - 1]
            i_lo, i_hi = bounds[edges[k - 1]], bounds[min(edges[k + 1], c.size) - 1]
            kind = _improvement_kind(lr, int(i_lo), int(i_hi))
            out.append((kind, s, s))
            if prev_len >= max(3, 0.05 * c.size):
                out.append(("plateau", int(step[bounds[edges[k - 1]]]), int(step[bounds[b] - 1])))
        else:
            kind = "spike" if k + 1 < len(means) and means[k + 1] < means[k] else "divergence"
            out.append((kind, s, s))
    return out


def baseline_rop(step, x, lr, hib, patience=10, threshold=1e-4):
    out = []
    best = math.inf if not hib else -math.inf
    bad = 0
    last_best = 0
    fired = False
    for i, v in enumerate(x):
        if not math.isfinite(v):
            continue
        better = v > best * (1 + threshold) if hib else v < best * (1 - threshold)
        if hib and best < 0:
            better = v > best * (1 - threshold)
        if better:
            if fired:
                kind = _improvement_kind(lr, max(0, i - patience), i)
                out.append((kind, int(step[i]), int(step[i])))
                fired = False
            best, bad, last_best = v, 0, i
        else:
            bad += 1
        if bad > patience:
            out.append(("plateau", int(step[last_best]), int(step[i])))
            fired = True
            bad = 0
    return out


# --------------------------------------------------------------------------- matching
def match(dets, labels, kinds, not_exhaustive, spacing):
    """Return {kind: [tp, fp, fn]} and the list of (label, det) matches."""
    stats = {k: [0, 0, 0] for k in EVAL_KINDS}
    dets = [d for d in dets if d[0] in kinds]
    used = [False] * len(dets)
    for lab in sorted(labels, key=lambda lb: lb.lo):
        best, bi = None, -1
        for j, (kind, s, e) in enumerate(dets):
            if used[j] or kind not in lab.kinds():
                continue
            if lab.kind == "plateau":
                ov = min(e, lab.hi) - max(s, lab.lo)
                if ov < 0.5 * (lab.hi - lab.lo):
                    continue
                dist = 0.0
            else:
                tol = 0.5 * spacing
                if not (lab.lo - tol <= s <= lab.hi + tol):
                    continue
                dist = abs(s - 0.5 * (lab.lo + lab.hi))
            if best is None or dist < best:
                best, bi = dist, j
        if bi >= 0:
            used[bi] = True
            if not lab.optional:
                stats[lab.kind][0] += 1
        elif not lab.optional:
            stats[lab.kind][2] += 1
    for j, (kind, s, _e) in enumerate(dets):
        if used[j] or kind in not_exhaustive:
            continue
        # a detection inside an optional label's window is ignored
        if any(
            kind in lab.kinds() and lab.lo - spacing <= s <= lab.hi + spacing
            for lab in labels
            if lab.optional
        ):
            continue
        stats[kind][1] += 1
    return stats


def prf(tp, fp, fn):
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    f = 2 * p * r / (p + r) if tp and (p + r) else (0.0 if tp + fp + fn else float("nan"))
    return p, r, f


def fmt(v):
    return "  -  " if isinstance(v, float) and math.isnan(v) else f"{v:5.2f}"


def perf(n_steps=1_000_000, n_layers=200):
    rng = np.random.default_rng(0)
    t = np.arange(n_steps)
    loss = 3 * np.exp(-t / (n_steps / 10)) + 1 + 0.05 * rng.standard_normal(n_steps)
    lr = np.where(t < n_steps // 2, 0.1, 0.01)
    loss[n_steps // 2 :] *= 0.7
    series = {"grad_norm": np.abs(1 + 0.1 * rng.standard_normal(n_steps))}
    base = np.abs(1 + 0.1 * rng.standard_normal(n_steps)).astype(np.float32)
    for k in range(n_layers):
        series[f"grad_norm/layer{k}"] = base * (1 + 0.01 * k)
    t0 = time.perf_counter()
    ev = detect_events(loss=loss, step=t, lr=lr, **series)
    dt = time.perf_counter() - t0
    return dt, len(ev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--perf", action="store_true", help="also time 1M steps x 200 layers")
    ap.add_argument("--verbose", action="store_true", help="print every detection")
    args = ap.parse_args(argv)
    root = curves_dir()
    if root is None:
        print("eval_curves: ../shared/curves not found (set TORCHVITALS_CURVES); skipping.")
        return 0
    methods = ("detector", "pelt", "rop")
    total = {m: {k: [0, 0, 0] for k in EVAL_KINDS} for m in methods}
    neg_fp = {m: 0 for m in methods}
    per_file = []
    notes = []
    for cv in build_curves():
        step, x, lr, extra, labels = load(cv, root)
        spacing = float(np.median(np.diff(step))) if step.size > 1 else 1.0
        t0 = time.perf_counter()
        evs = detect_events(loss=x, step=step, lr=lr, higher_is_better=cv.higher_is_better, **extra)
        dt = time.perf_counter() - t0
        dets = {
            "detector": [(e.kind, e.step, e.end_step) for e in evs],
            "pelt": baseline_pelt(step, x, lr, cv.higher_is_better),
            "rop": baseline_rop(step, x, lr, cv.higher_is_better),
        }
        row = [cv.name, len(x)]
        for m in methods:
            st = match(dets[m], labels, cv.kinds, cv.not_exhaustive, spacing)
            for k in EVAL_KINDS:
                for j in range(3):
                    total[m][k][j] += st[k][j]
            tp = sum(v[0] for v in st.values())
            fp = sum(v[1] for v in st.values())
            fn = sum(v[2] for v in st.values())
            if cv.negative_control:
                neg_fp[m] += fp
            row.append(f"{tp}/{fp}/{fn}")
        row.append(f"{dt * 1000:.0f}ms")
        per_file.append(row)
        if args.verbose:
            for e in evs:
                if e.kind != "outlier":
                    print(f"  {cv.name}: {e}")
        key = next((k for k in NANOGPT_OUTLIERS if k in cv.file), None)
        if key:
            bad = [
                s
                for s in NANOGPT_OUTLIERS[key]
                if any(e.kind in ("spike", "divergence") and abs(e.step - s) <= 2 for e in evs)
            ]
            info = sum(
                1
                for s in NANOGPT_OUTLIERS[key]
                if any(e.kind == "outlier" and abs(e.step - s) <= 1 for e in evs)
            )
            notes.append(
                f"{cv.name}: labelled one-step outliers {len(NANOGPT_OUTLIERS[key])}, "
                f"reported as spike/divergence {len(bad)}, as 'outlier' info {info}"
            )
        if "176B" in cv.name:
            sp = [e for e in evs if e.kind == "spike"]
            if sp:
                notes.append(f"{cv.name}: attribution {sp[0].layers[:3]}")
        if "13B" in cv.name:
            sp = [e for e in evs if e.kind in ("spike", "divergence")]
            if sp:
                notes.append(f"{cv.name}: attribution {sp[0].layers[:3]}")

    print("Event detection on real curves (shared/curves): tp/fp/fn per series")
    print(f"{'series':40s} {'n':>6s}  {'detector':>9s} {'pelt':>9s} {'rop':>9s} {'time':>7s}")
    for r in per_file:
        print(f"{r[0]:40s} {r[1]:6d}  {r[2]:>9s} {r[3]:>9s} {r[4]:>9s} {r[5]:>7s}")
    print()
    print("Precision / recall / F1 per kind (required labels; optional labels ignored)")
    print(f"{'kind':12s} " + " ".join(f"{m:>23s}" for m in methods))
    print(f"{'':12s} " + " ".join(f"{'P     R     F1  (tp/fp/fn)':>23s}" for _ in methods))
    for k in (*EVAL_KINDS, "overall"):
        cells = []
        for m in methods:
            if k == "overall":
                tp, fp, fn = (sum(total[m][kk][j] for kk in EVAL_KINDS) for j in range(3))
            else:
                tp, fp, fn = total[m][k]
            p, r, f = prf(tp, fp, fn)
            cells.append(f"{fmt(p)} {fmt(r)} {fmt(f)} ({tp}/{fp}/{fn})")
        print(f"{k:12s} " + " ".join(f"{c:>23s}" for c in cells))
    print()
    print(
        "False positives on negative controls (liu smooth curve, 4 nanogpt runs): "
        + ", ".join(f"{m}={neg_fp[m]}" for m in methods)
    )
    for n in notes:
        print("  " + n)
    if args.perf:
        dt, ne = perf()
        print(
            f"\nperf: 1,000,000 steps x 200 layers (grad_norm/<layer>) + lr + grad_norm: "
            f"{dt:.1f} s, {ne} events"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
