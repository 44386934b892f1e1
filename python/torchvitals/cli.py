"""``torchvitals``: report, events, compare, export, pre-flight checks and demo from the
command line.

Bad input never ends in a traceback: a path that is not a run, a run with no data yet, a
missing scalar or package is one line on stderr naming the file or argument, and exit
status 2; what ``load_run`` recovered around damage, or a run not closed yet, is reported
as it is, with one ``note:`` line per problem on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class InputError(ValueError):
    """Bad input: printed as one line, exit status 2."""


def note(command: str, message: str) -> None:
    """One line on stderr about what was read (damage recovered around, a run not closed)."""
    print(f"torchvitals {command}: note: {message}", file=sys.stderr)


@contextlib.contextmanager
def _notes(command: str) -> Iterator[None]:
    """Each warning given inside as one ``note:`` line on stderr (after the block)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                note(command, str(w.message).removeprefix("torchvitals: "))


def _load(path: str, command: str = "report", lazy: bool = False):
    """``load_run(path)``, or with ``lazy`` ``scan_run(path)`` (read as it is analysed, in
    bounded memory: what report, events and compare need), with each warning it gives as
    one ``note:`` line on stderr."""
    from torchvitals.store.reader import load_run
    from torchvitals.store.scan import scan_run

    with _notes(command):
        run = (scan_run if lazy else load_run)(path)
    if not run.closed:
        note(
            command,
            f"{path} is not closed (still being written, or its process died): "
            "showing what is on disk",
        )
    return run


def _arrays(run, metric: str):
    """``series_from_run(run, metric)``; a run without data, or without ``metric``, is an
    ``InputError`` naming the run directory."""
    from torchvitals.analysis.runtables import series_from_run

    if run.scalars.num_rows == 0:
        raise InputError(f"{run.path}: no data recorded yet (no scalar rows in any segment)")
    try:
        return series_from_run(run, metric)
    except ValueError as exc:
        raise InputError(f"{run.path}: {exc}") from None


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
    from torchvitals.preflight.report import PreflightReport
    from torchvitals.report.html import write_report
    from torchvitals.report.terminal import print_summary

    with _progress(console) as bar:
        task = bar.add_task("detecting events", total=None)
        arrays = _arrays(run, getattr(args, "metric", "loss"))
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
        disable=not console.is_interactive,  # a pipe or a file gets no blank lines
    )


def _load_with_progress(path: str, console: Console, command: str = "report", lazy=False):
    with _progress(console) as bar:
        bar.add_task(f"reading {path}", total=None)
        return _load(path, command, lazy)


def cmd_report(args) -> int:
    if args.watch:
        from torchvitals.report.watch import watch

        return watch(args)
    console = Console()
    run = _load_with_progress(args.run, console, lazy=True)
    out = Path(args.out) if args.out else Path(args.run) / "report.html"
    with _notes("report"):  # damage found while the run is scanned
        _analyse_and_report(run, args, console, out)
    return 0


def cmd_events(args) -> int:
    # Progress on stderr: stdout carries the events (or their JSON) only.
    status = Console(stderr=True)
    run = _load_with_progress(args.run, status, "events", lazy=True)
    with _notes("events"), _progress(status) as bar:
        bar.add_task("detecting events", total=None)
        events = _detect(_arrays(run, getattr(args, "metric", "loss")), args)
    if args.json:
        json.dump([e.to_dict() for e in events], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for event in events:
            print(event)
    return 0


def cmd_compare(args) -> int:
    from torchvitals.analysis.compare import RunData, compare
    from torchvitals.report.compare_page import print_comparison, write_compare_page

    if len(args.runs) < 2:
        raise InputError(f"needs at least two run directories, got {len(args.runs)}")
    console = Console()
    runs = []
    for path in args.runs:
        run = _load_with_progress(path, console, "compare", lazy=True)
        with _notes("compare"), _progress(console) as bar:
            bar.add_task(f"detecting events in {path}", total=None)
            arrays = _arrays(run, args.metric)
            runs.append(RunData.from_arrays(path, arrays, _detect(arrays, args)))
    comparison = compare(runs, args.metric)
    with _progress(console) as bar:
        bar.add_task("writing the comparison page", total=None)
        out = write_compare_page(comparison, runs, args.runs, args.out)
    print_comparison(comparison, runs, args.runs, console)
    console.print(f"comparison: [bold]{out}[/bold]")
    return 0


def cmd_export(args) -> int:
    from torchvitals.integrations.tensorboard_export import export_tensorboard

    console = Console()
    run = _load_with_progress(args.run, console, "export tensorboard")
    if all(t.num_rows == 0 for t in run.tables.values()):
        raise InputError(f"{run.path}: no data recorded yet (no rows in any segment)")
    with _progress(console) as bar:
        bar.add_task(f"writing TensorBoard event files to {args.logdir}", total=None)
        written = export_tensorboard(run, args.logdir)
    for where, counts in written.items():
        console.print(
            f"{where}: {counts['scalars']} scalar values, {counts['histograms']} histograms"
        )
    console.print(f"view with: tensorboard --logdir {args.logdir}")
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


#: Packages some commands need, and the extra that installs them (None: the package itself).
OPTIONAL = {"matplotlib": "report", "tensorboard": None}


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
    p.add_argument(
        "--watch",
        action="store_true",
        help="re-render as the run grows (reads only what is new) until it closes or Ctrl-C",
    )
    p.add_argument(
        "--interval", type=float, default=5.0, help="seconds between --watch refreshes (5)"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare",
        help="compare runs: curves by step, where they part, the layers that differ most, events",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories; the first is the baseline"
    )
    p.add_argument("--higher-is-better", action="store_true", help="the metric is an accuracy")
    p.add_argument("--metric", default="loss", help="logged scalar to compare (val/loss...)")
    p.add_argument("--num-classes", type=int, default=None, help="checks the initial loss")
    p.add_argument("--out", default="compare.html", help="the HTML page (default compare.html)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="export a run to another tool's format")
    formats = p.add_subparsers(dest="format", required=True)
    q = formats.add_parser(
        "tensorboard",
        help="scalars, per-layer statistics and histograms as TensorBoard event files",
    )
    q.add_argument("run", help="run directory written by torchvitals.Monitor")
    q.add_argument("logdir", help="TensorBoard log directory to write (one sub-directory per rank)")
    q.set_defaults(func=cmd_export)

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
    command = " ".join(filter(None, (args.command, getattr(args, "format", None))))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"torchvitals {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `torchvitals events RUN | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except ModuleNotFoundError as exc:
        package = (exc.name or "").partition(".")[0]
        if package not in OPTIONAL:
            raise
        extra = OPTIONAL[package]
        install = f'"torchvitals[{extra}]"' if extra else package
        print(
            f"torchvitals {command}: needs {package}, which is not installed: "
            f"pip install {install}",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError) as exc:  # FileNotFoundError, ManifestError, InputError...
        print(f"torchvitals {command}: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
