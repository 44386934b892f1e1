"""The demo end to end, with only what `scripts/demo.sh` installs (no pandas, polars, ...)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torchvitals

# What the demo's set-up does not install: importing them must not be needed.
NOT_INSTALLED = ("pandas", "polars", "duckdb", "ruptures", "pytest", "lightning", "transformers")


def test_demo_runs_with_the_demo_dependencies_only(tmp_path):
    out = tmp_path / "demo"
    script = textwrap.dedent(
        f"""
        import sys
        for name in {NOT_INSTALLED!r}:
            sys.modules[name] = None  # import raises ImportError, as if not installed
        from torchvitals.cli import main
        sys.exit(main(["demo", "--out", {str(out)!r}, "--steps", "800"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report:" in done.stdout
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 4
    run = torchvitals.load_run(out)
    assert run.closed and run.scalar("loss")[0].size == 800
