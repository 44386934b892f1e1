"""Names from a run are shown as written: matplotlib's mathtext ($...$) never parses them."""

from __future__ import annotations

import base64
import re

import numpy as np

from torchvitals.report.html import write_report
from torchvitals.store.reader import load_run
from torchvitals.store.writer import RunWriter

NAMES = ["$\\foo{$", "a$b$c", "$x^2_{1}$", "\\alpha", "{}^_%#&"]


def test_mathtext_characters_in_layer_names_render_literally(tmp_path):
    path = tmp_path / "run"
    rng = np.random.default_rng(0)
    with RunWriter(str(path), manifest={"world_size": 1}) as w:
        for step in range(40):
            w.submit("scalars", {"step": step, "name": "loss", "value": 1.0 / (step + 1)})
            w.submit(
                "layers",
                {
                    "step": step,
                    "layer": NAMES,
                    "kind": "grad",
                    "numel": [16] * len(NAMES),
                    "sumsq": rng.uniform(0.5, 2.0, len(NAMES)),
                    "units": [4] * len(NAMES),
                    "dead_units": [1] * len(NAMES),
                },
            )
            w.submit(
                "hist",
                {"step": step, "layer": NAMES, "kind": "grad",
                 "counts": rng.integers(0, 5, (len(NAMES), 84))},
            )  # fmt: skip
    run = load_run(path)
    out = write_report(run, [], tmp_path / "report.html")  # raised ValueError before
    page = out.read_text()
    assert "data-layer='$\\foo{$'" in page  # its histogram, the name as written
    pngs = re.findall(r"base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) >= 4 and all(base64.b64decode(p)[:4] == b"\x89PNG" for p in pngs)
