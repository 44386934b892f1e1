"""Regenerates docs/report.png: the demo's report as headless Chromium shows it.

    .venv/bin/python scripts/screenshot.py                 # trains the demo (about a minute)
    .venv/bin/python scripts/screenshot.py --run RUN_DIR   # the report of a run you have

Opens the report through tests/report/browser_harness.py (Debian's chromium and
chromium-driver, selenium), captures ``--height`` CSS pixels of the page at ``--width`` from
the section titled ``--start`` on (default: the loss chart, past the pre-flight table), and
stores them as a 256-colour PNG (the page is flat colours: a few hundred KB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests" / "report")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a recorded run (default: train the demo into a temp dir)")
    p.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=3000, help="CSS pixels captured")
    p.add_argument("--start", default="Loss and learning rate", help="the <h2> to start at")
    args = p.parse_args(argv)

    from browser_harness import headless_chromium, missing
    from PIL import Image

    from torchvitals import demo, detect_events, load_run
    from torchvitals.analysis.runtables import series_from_run
    from torchvitals.report.html import write_report

    if missing():
        print(f"screenshot: {missing()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.run) if args.run else demo.train(Path(tmp) / "demo")
        run = load_run(path)
        arrays = series_from_run(run)
        page = write_report(run, detect_events(run), Path(tmp) / "report.html", arrays=arrays)
        shot = Path(tmp) / "shot.png"
        with headless_chromium(args.width, args.height) as browser:
            browser.open(page)
            if browser.console_errors():
                print(f"screenshot: console errors: {browser.console_errors()}", file=sys.stderr)
                return 1
            top = browser.js(
                "var name = arguments[0];"
                "var h = Array.from(document.querySelectorAll('h2')).find(function (e) {"
                "  return e.textContent === name; });"
                "return h ? h.getBoundingClientRect().top + window.scrollY - 8 : 0;",
                args.start,
            )
            browser.screenshot(shot)
        image = Image.open(shot).convert("RGB")
        scale = image.size[0] / args.width  # device pixels per CSS pixel
        image = image.crop((0, int(top * scale), image.size[0], int((top + args.height) * scale)))
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"{args.out}: {image.size[0]}x{image.size[1]}, {Path(args.out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
