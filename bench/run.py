"""Benchmark mxsync and epnalert against the simulated facility and print each figure against its target.

Usage (from the repository root):
    .venv/bin/python -m bench.run                 # every figure, issue-sized data (about 31 minutes on 2 cores, 13 of them 7a-7c)
    .venv/bin/python -m bench.run --quick         # smaller data, a smoke run of a couple of minutes
    .venv/bin/python -m bench.run --only 1 4b     # some figures only
Results go to bench/results/<time>.json and bench/results/latest.json. Exit status 0 if every
judged figure met its target, 1 if not, 2 if a measurement could not be made.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.figures import FIGURES, SIZES  # noqa: E402
from bench.harness import disk_free, machine  # noqa: E402

RESULTS = REPO / "bench" / "results"
# The order; 1c (cipher) backs the ssh-cipher recommendation, 4c measures ignore.yml's growth.
# 7a-7c are issue 11's lifecycle figures (live latency, settle to record, no-op cycle with many EPNs known).
# 8a-8c are issue 13's bags (a pass with bags against without, the checksum's cost in rsync, mxsync verify's speed).
DEFAULT_ORDER = ("1", "1c", "2", "3", "4a", "4b", "4c", "5", "6", "7a", "7b", "7c", "8a", "8b", "8c")
MIN_FREE_GIB = 8


class Bench:
    def __init__(self, workdir, runs, quick):
        self.workdir = workdir
        self.runs = runs
        self.quick = quick

    def progress(self, text):
        print(f"    {text}", flush=True)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data sets: a smoke run of a couple of minutes")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=DEFAULT_ORDER,
        metavar="FIGURE",
        help=f"figures to run, of {', '.join(DEFAULT_ORDER)}",
    )
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new one under $TMPDIR or /tmp)")
    parser.add_argument("--output", default=None, help="results JSON path (default bench/results/<time>.json)")
    arguments = parser.parse_args(argv)
    if arguments.runs < 1:
        parser.error("--runs must be at least 1")
    return arguments


def format_value(figure):
    if figure.get("value") is None:
        return "n/a"
    text = f"{figure['value']:.3f}" if figure["unit"] in ("ratio", "s") else f"{figure['value']:.3g}"
    if figure["unit"] == "s":
        text += " s"
    if figure.get("value2") is not None:
        text += f" ({figure['value2']:.0f} {figure.get('value2_unit', 'MiB')})"
    return text


def verdict(figure):
    return {True: "PASS", False: "FAIL", None: "info"}[figure.get("passed")]


def print_table(figures):
    print("\n" + "=" * 100)
    print(f"{'fig':4} {'result':>20}  {'target':<28} {'':5} what")
    print("-" * 100)
    for figure in figures:
        print(
            f"{figure['id']:4} {format_value(figure):>20}  {figure['target'][:28]:<28} {verdict(figure):5} {figure['title']}"
        )
    print("=" * 100)


def main(argv=None):
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    mode = "quick" if arguments.quick else "full"
    sizes = SIZES[mode]
    order = [ident for ident in DEFAULT_ORDER if not arguments.only or ident in arguments.only]
    parent = Path(arguments.workdir or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mxsync-bench-", dir=parent))
    free = disk_free(workdir)
    if free < MIN_FREE_GIB and not arguments.quick:
        print(f"only {free:.1f} GiB free under {workdir}; the full run needs about {MIN_FREE_GIB} GiB", file=sys.stderr)
        return 2
    about = machine()
    print(
        f"mxsync benchmarks ({mode}, {arguments.runs} runs per figure) on {about['cpu']}, {about['cores']} cores, "
        f"{about['memory_gib']} GiB; {about['rsync']}; {about['ssh']}; load {about['load_average_at_start'][0]:.2f}; "
        f"scratch {workdir} ({free:.0f} GiB free)",
        flush=True,
    )
    bench = Bench(workdir, arguments.runs, arguments.quick)
    started = time.monotonic()
    results = []
    failed_to_measure = False
    try:
        for ident in order:
            figure_started = time.monotonic()
            print(
                f"\n[{ident}] {FIGURES[ident].__doc__.splitlines()[0] if FIGURES[ident].__doc__ else ''}".rstrip(),
                flush=True,
            )
            try:
                figure = FIGURES[ident](bench, sizes)
            except Exception as error:  # one figure's failure must not lose the others
                traceback.print_exc()
                failed_to_measure = True
                figure = dict(
                    id=ident,
                    title=f"{FIGURES[ident].__name__}: not measured",
                    value=None,
                    unit="",
                    target="",
                    passed=False,
                    error=f"{type(error).__name__}: {error}",
                    runs=[],
                    details={},
                )
            figure["seconds_to_measure"] = time.monotonic() - figure_started
            results.append(figure)
            print(
                f"  => {format_value(figure)}  target {figure['target']}  {verdict(figure)}   ({figure['title']}; "
                f"{figure['seconds_to_measure']:.0f} s)",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)
    if arguments.quick:
        print(
            "quick mode: small data sets, where fixed per-pass costs dominate; PASS/FAIL here is a smoke test only, "
            "the targets apply to the full run"
        )
    total = time.monotonic() - started
    print(f"total {total / 60:.1f} min; load average now {os.getloadavg()[0]:.2f}")
    document = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "runs_per_figure": arguments.runs,
        "machine": about,
        "load_average_at_end": os.getloadavg(),
        "total_seconds": total,
        "sizes": {
            ident: sizes.get(key)
            for ident, key in (
                ("1", "throughput"),
                ("1c", "cipher"),
                ("2", "small_files"),
                ("3", "scaling"),
                ("4a", "noop_ignored"),
                ("4b", "noop_complete"),
                ("4c", "noop_history"),
                ("5", "epnalert"),
                ("6", "memory"),
                ("7a", "live_latency"),
                ("7b", "settle_record"),
                ("7c", "noop_known"),
                ("8a", "bag_pass"),
                ("8b", "bag_checksum"),
                ("8c", "bag_verify"),
            )
        },
        "figures": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = Path(arguments.output) if arguments.output else RESULTS / f"{datetime.now():%Y%m%d-%H%M%S}-{mode}.json"
    text = json.dumps(document, indent=2, default=str) + "\n"
    output.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    print(f"results: {output}")
    if failed_to_measure:
        return 2
    return 0 if all(figure.get("passed") is not False for figure in results) else 1


if __name__ == "__main__":
    sys.exit(main())
