"""``torchvitals``: report, events and demo from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def _load(path: str):
    from torchvitals.store.reader import load_run

    return load_run(path)


def _detect(arrays, args):
    """Events from ``series_from_run``'s arrays, which are read once and shared."""
    from torchvitals.analysis import detect_events

    step, loss, lr, series = arrays
    return detect_events(
        loss=loss,
        step=step,
        lr=lr,
        higher_is_better=args.higher_is_better,
        num_classes=args.num_classes,
        **series,
    )


def _analyse_and_report(run, args, console: Console, out: Path) -> list:
    from torchvitals.analysis.runtables import series_from_run
    from torchvitals.report.html import write_report
    from torchvitals.report.terminal import print_summary

    with _progress(console) as bar:
        task = bar.add_task("detecting events", total=None)
        arrays = series_from_run(run)
        events = _detect(arrays, args)
        bar.update(task, description="writing report")
        write_report(
            run,
            events,
            out,
            layers=args.layers,
            progress=lambda what: bar.update(task, description=what),
            arrays=arrays,
        )
    print_summary(events, arrays[3], console)
    console.print(f"report: [bold]{out}[/bold]")
    return events


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def cmd_report(args) -> int:
    console = Console()
    run = _load(args.run)
    out = Path(args.out) if args.out else Path(args.run) / "report.html"
    _analyse_and_report(run, args, console, out)
    return 0


def cmd_events(args) -> int:
    from torchvitals.analysis.runtables import series_from_run

    events = _detect(series_from_run(_load(args.run)), args)
    if args.json:
        json.dump([e.to_dict() for e in events], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for event in events:
            print(event)
    return 0


def cmd_demo(args) -> int:
    from torchvitals.demo import train
    from torchvitals.store.reader import load_run

    console = Console()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new directory for the demo run")
    console.print(f"training the demo model for {args.steps} steps, recording every step to {out}")
    start = time.perf_counter()
    with _progress(console) as bar:
        task = bar.add_task("training", total=args.steps)
        train(out, steps=args.steps, progress=lambda done, total: bar.update(task, completed=done))
    console.print(f"trained in {time.perf_counter() - start:.1f} s")
    args.layers, args.higher_is_better, args.num_classes = None, False, 10
    _analyse_and_report(load_run(out), args, console, out / "report.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchvitals", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def analysis_options(p):
        p.add_argument("run", help="run directory written by torchvitals.Monitor")
        p.add_argument("--higher-is-better", action="store_true", help="the metric is an accuracy")
        p.add_argument("--num-classes", type=int, default=None, help="checks the initial loss")

    p = sub.add_parser("report", help="terminal summary and a self-contained report.html")
    analysis_options(p)
    p.add_argument("--out", help="where to write the HTML (default RUN/report.html)")
    p.add_argument("--layers", nargs="*", help="layers whose histogram evolution to plot")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("events", help="list the detected events")
    analysis_options(p)
    p.add_argument("--json", action="store_true", help="print the events as JSON")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("demo", help="train a small model, record it, detect events, report")
    p.add_argument("--out", default="runs/demo", help="run directory to create")
    p.add_argument("--steps", type=int, default=4000)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"torchvitals {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
