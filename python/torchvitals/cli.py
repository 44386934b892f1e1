"""``torchvitals``: report, events, pre-flight checks and demo from the command line."""

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
        metric=getattr(args, "metric", "loss"),
        higher_is_better=args.higher_is_better,
        num_classes=args.num_classes,
        **series,
    )


def _analyse_and_report(
    run, args, console: Console, out: Path, *, show_preflight: bool = True
) -> list:
    from torchvitals.analysis.runtables import series_from_run
    from torchvitals.preflight.report import PreflightReport
    from torchvitals.report.html import write_report
    from torchvitals.report.terminal import print_summary

    with _progress(console) as bar:
        task = bar.add_task("detecting events", total=None)
        arrays = series_from_run(run, getattr(args, "metric", "loss"))
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
    preflight = PreflightReport.load(run.path) if show_preflight else None
    print_summary(
        events, arrays[3], console, preflight=preflight, verbose=getattr(args, "verbose", False)
    )
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


def _load_with_progress(path: str, console: Console):
    with _progress(console) as bar:
        bar.add_task(f"reading {path}", total=None)
        return _load(path)


def cmd_report(args) -> int:
    console = Console()
    run = _load_with_progress(args.run, console)
    out = Path(args.out) if args.out else Path(args.run) / "report.html"
    _analyse_and_report(run, args, console, out)
    return 0


def cmd_events(args) -> int:
    from torchvitals.analysis.runtables import series_from_run

    # Progress on stderr: stdout carries the events (or their JSON) only.
    status = Console(stderr=True)
    run = _load_with_progress(args.run, status)
    with _progress(status) as bar:
        bar.add_task("detecting events", total=None)
        events = _detect(series_from_run(run, getattr(args, "metric", "loss")), args)
    if args.json:
        json.dump([e.to_dict() for e in events], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for event in events:
            print(event)
    return 0


def cmd_preflight(args) -> int:
    from torchvitals.preflight import preflight
    from torchvitals.preflight.target import load_target
    from torchvitals.report.terminal import print_preflight

    kwargs = load_target(args.target)
    for name in ("num_classes", "steps", "lr_probe_steps", "grad_check_samples", "seed"):
        if getattr(args, name) is not None:  # the command line wins over the target
            kwargs[name] = getattr(args, name)
    if args.json:
        json.dump(preflight(**kwargs).to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = Console()
    with console.status(f"pre-flight checks on {args.target}"):
        report = preflight(**kwargs)
    print_preflight(report, console)
    return 0


def cmd_demo(args) -> int:
    from torchvitals.demo import train
    from torchvitals.report.terminal import print_preflight
    from torchvitals.store.reader import load_run

    console = Console()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new directory for the demo run")
    console.print(f"training the demo model for {args.steps} steps, recording every step to {out}")
    start = time.perf_counter()
    with _progress(console) as bar:
        task = bar.add_task("pre-flight checks", total=args.steps)

        def preflight_done(report) -> None:
            print_preflight(report, console)
            bar.update(task, description="training")

        train(
            out,
            steps=args.steps,
            progress=lambda done, total: bar.update(task, completed=done),
            on_preflight=preflight_done,
        )
    console.print(f"pre-flight checks and training in {time.perf_counter() - start:.1f} s")
    args.layers, args.higher_is_better, args.num_classes = None, False, 10
    _analyse_and_report(load_run(out), args, console, out / "report.html", show_preflight=False)
    return 0


#: Packages some commands need, and the extra that installs them.
OPTIONAL = {"matplotlib": "report"}


def _version() -> str:
    from torchvitals import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchvitals", description=__doc__)
    parser.add_argument("--version", action="version", version=f"torchvitals {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def analysis_options(p):
        p.add_argument("run", help="run directory written by torchvitals.Monitor")
        p.add_argument("--higher-is-better", action="store_true", help="the metric is an accuracy")
        p.add_argument("--metric", default="loss", help="logged scalar to analyse (val/loss...)")
        p.add_argument("--num-classes", type=int, default=None, help="checks the initial loss")

    p = sub.add_parser("report", help="terminal summary and a self-contained report.html")
    analysis_options(p)
    p.add_argument("--out", help="where to write the HTML (default RUN/report.html)")
    p.add_argument("--layers", nargs="*", help="layers whose histogram evolution to plot")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="every event's full cause and attribution"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("events", help="list the detected events")
    analysis_options(p)
    p.add_argument("--json", action="store_true", help="print the events as JSON")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser(
        "preflight",
        help="pre-flight checks on a model before training (run first when it does not learn)",
    )
    p.add_argument(
        "target",
        help="module:function or path/to/file.py:function returning (model, batch, loss_fn), "
        "(model, batch, loss_fn, optimizer) or a dict of torchvitals.preflight arguments",
    )
    p.add_argument("--num-classes", type=int, default=None, help="C for the ln C check")
    p.add_argument("--steps", type=int, default=None, help="most steps on the batch (200)")
    p.add_argument("--lr-probe-steps", type=int, default=None, help="steps per probe LR (5)")
    p.add_argument(
        "--grad-check-samples", type=int, default=None, help="samples in the gradient check (4)"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser(
        "demo", help="pre-flight checks, then train a small model, record it, detect events, report"
    )
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
    except ModuleNotFoundError as exc:
        extra = OPTIONAL.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"torchvitals {args.command}: needs {exc.name}, which is not installed: "
            f'pip install "torchvitals[{extra}]"',
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
