"""The six figures of issue 7 (and the cipher comparison) and issue 11's lifecycle figures (7a-7c).

Every figure function takes (bench, sizes) and returns a dict with at least: id, title, value,
unit, target (text), passed (bool or None when it cannot be judged), runs (per-run figures) and
details. Pairs are run alternately (A B, B A, A B ...) so that drift in the machine's load
affects both sides alike; the figure is the median of the per-pair ratios. The lifecycle figures
run the service itself and time events at the facility against the targets; their baseline (HPC
ASSyncy, which copies nothing during a visit) is described in their details, not run.
"""

import json
import random
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone

import yaml

from bench.harness import (
    ENDED,
    MIB,
    PYTHON,
    BenchError,
    Heartbeat,
    LogTail,
    Scene,
    Service,
    copy_tree_like_mxsync,
    log_moment,
    median,
    parallel,
    percentile,
    plain_rsync_loop,
    run_measured,
    run_mxsync,
    tree_bytes,
)

# Sizes per mode. "full" follows the issue; "quick" is a smoke run of a minute or two.
SIZES = {
    "full": {
        "throughput": dict(epns=8, frames=50, frame_size=6 * 1000 * 1000, small_files=300, max_tasks=2, runs=5),
        "cipher": dict(epns=4, frames=50, frame_size=6 * 1000 * 1000, small_files=0, max_tasks=2),
        "small_files": dict(epns=4, files_per_epn=5000, file_size=4096, max_tasks=2),
        "scaling": dict(epns=4, frames=8, frame_size=4 * MIB, bwlimit="8M", tasks=(1, 2, 4)),
        "noop_ignored": dict(epns=5000),
        "noop_complete": dict(epns=500, max_tasks=2),
        "noop_history": dict(epns=50, history=5000, max_tasks=2, runs=5),
        "epnalert": dict(folders=10000, visits=10000, unknown_fraction=0.1),
        "memory": dict(big_files=20000, small_files=200, file_size=4096, max_tasks=2),
        "live_latency": dict(files=16, span_s=480, frame_size=4 * MIB, give_up_s=600),
        "settle_record": dict(lead_s=20, frames=2, give_up_s=600, max_runs=None),
        "noop_known": dict(epns=10000),
        # Issue 13's bags (bench/bag_figures.py): figure 1's EPNs, fewer of them.
        "bag_pass": dict(epns=4, frames=50, frame_size=6 * 1000 * 1000, small_files=300, max_tasks=2, runs=5),
        "bag_checksum": dict(epns=4, frames=50, frame_size=6 * 1000 * 1000, small_files=300, max_tasks=2),
        "bag_verify": dict(epns=4, frames=50, frame_size=6 * 1000 * 1000, small_files=300, max_tasks=2),
    },
    "quick": {
        "throughput": dict(epns=4, frames=10, frame_size=6 * 1000 * 1000, small_files=100, max_tasks=2, runs=3),
        "cipher": dict(epns=2, frames=20, frame_size=6 * 1000 * 1000, small_files=0, max_tasks=2),
        "small_files": dict(epns=4, files_per_epn=1000, file_size=4096, max_tasks=2),
        "scaling": dict(epns=4, frames=1, frame_size=4 * MIB, bwlimit="8M", tasks=(1, 2, 4)),
        "noop_ignored": dict(epns=1000),
        "noop_complete": dict(epns=30, max_tasks=2),
        "noop_history": dict(epns=20, history=5000, max_tasks=2, runs=3),
        "epnalert": dict(folders=2000, visits=2000, unknown_fraction=0.1),
        "memory": dict(big_files=5000, small_files=200, file_size=4096, max_tasks=2),
        "live_latency": dict(files=5, span_s=150, frame_size=MIB, give_up_s=300),
        "settle_record": dict(lead_s=15, frames=2, give_up_s=300, max_runs=1),
        "noop_known": dict(epns=2000),
        "bag_pass": dict(epns=2, frames=10, frame_size=6 * 1000 * 1000, small_files=100, max_tasks=2, runs=3),
        "bag_checksum": dict(epns=2, frames=10, frame_size=6 * 1000 * 1000, small_files=100, max_tasks=2),
        "bag_verify": dict(epns=2, frames=10, frame_size=6 * 1000 * 1000, small_files=100, max_tasks=2),
    },
}

RECOMMENDED_CIPHER = "aes128-gcm@openssh.com"
FIRST_NUMBER = 20000
LOG_TIME = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - mxsync\.sync - INFO:\d+: (\d+[a-z]+): (started|synced and verified)"
)


def epn_name(index):
    return f"{FIRST_NUMBER + index}a"


def cap_map_for(epns, projects=("ny79", "ab12", "cd34", "ef56")):
    """Map every EPN's number to one of a few project folders."""
    return {epn.rstrip("abcdefghijklmnopqrstuvwxyz"): projects[index % len(projects)] for index, epn in enumerate(epns)}


def add_experiments(scene, epns, **tree):
    """Create the EPNs' data (in parallel: writing random frames is the slow part) and their finished visits."""
    parallel(lambda epn: scene.facility.add_experiment("mx", epn, equipment_id=23, **tree, **ENDED), epns)


def alternate(runs, first, second):
    """Yield (run index, [callable, callable]) with the order swapped on every other run."""
    for index in range(runs):
        yield index, ([first, second] if index % 2 == 0 else [second, first])


def ratio_figure(ident, title, target_value, runs, numerator, denominator, details, lower_is_better=True, stretch=None):
    ratios = [run[numerator] / run[denominator] for run in runs]
    value = median(ratios)
    passed = value <= target_value if lower_is_better else value >= target_value
    target = f"{'<=' if lower_is_better else '>='} {target_value:g}"
    if stretch is not None:
        target += f" (stretch <= {stretch:g}: {'met' if value <= stretch else 'not met'})"
    return dict(
        id=ident,
        title=title,
        value=value,
        unit="ratio",
        target=target,
        passed=passed,
        runs=runs,
        details=details,
        ratios=ratios,
    )


def summary(runs, key):
    values = [run[key] for run in runs if run.get(key) is not None]
    return median(values)


# ---------------------------------------------------------------- 1. throughput


def transfer_pair(bench, scene, epns, max_tasks, label=""):
    """One side-by-side pair: mxsync pass and plain rsync loop over the same EPNs; return the run's figures."""
    run = {}

    def mxsync_side():
        scene.reset_destination()
        figures = run_mxsync(scene)
        run.update(
            {
                f"mxsync{label}_s": figures["seconds"],
                f"mxsync{label}_rss_kib": figures["self_maxrss_kib"],
                f"mxsync{label}_children_rss_kib": figures["children_maxrss_kib"],
                f"mxsync{label}_ssh_connections": figures["ssh_connections"],
                f"mxsync{label}_cpu_s": figures["self_cpu_s"],
                f"mxsync{label}_log_bytes": figures["log_bytes"],
                f"mxsync{label}_recheck_share": figures.get("recheck_share", 0.0),
            }
        )

    def plain_side():
        scene.reset_destination()
        figures = plain_rsync_loop(scene, epns, max_tasks)
        run.update({f"rsync{label}_s": figures["seconds"], f"rsync{label}_ssh_connections": figures["ssh_connections"]})

    return run, mxsync_side, plain_side


def fig_throughput(bench, sizes):
    """Throughput, MX-shaped: one mxsync pass against a plain rsync loop, same ssh options and max-tasks."""
    size = sizes["throughput"]
    epns = [epn_name(index) for index in range(size["epns"])]
    with Scene(bench.workdir, "throughput") as scene:
        add_experiments(
            scene, epns, frames=size["frames"], frame_size=size["frame_size"], small_files=size["small_files"]
        )
        scene.write_config(epn_cap_map=cap_map_for(epns), max_tasks=size["max_tasks"])
        files, total = tree_bytes(scene.source_root)
        runs = []
        # The tightest target and a noisy machine: more pairs than the other figures.
        for index in range(max(bench.runs, size["runs"])):
            run, mxsync_side, plain_side = transfer_pair(bench, scene, epns, size["max_tasks"])
            for side in [mxsync_side, plain_side] if index % 2 == 0 else [plain_side, mxsync_side]:
                side()
            run["mxsync_mib_s"] = total / MIB / run["mxsync_s"]
            run["rsync_mib_s"] = total / MIB / run["rsync_s"]
            runs.append(run)
            bench.progress(
                f"run {index + 1}: mxsync {run['mxsync_s']:.1f} s, rsync loop {run['rsync_s']:.1f} s "
                f"(post-transfer recheck: {run['mxsync_recheck_share']:.0%} of mxsync's EPN time)"
            )
        scene.reset_destination()
    details = dict(
        size,
        files=files,
        bytes=total,
        mxsync_s=summary(runs, "mxsync_s"),
        rsync_s=summary(runs, "rsync_s"),
        mxsync_mib_s=summary(runs, "mxsync_mib_s"),
        rsync_mib_s=summary(runs, "rsync_mib_s"),
        mxsync_log_bytes=summary(runs, "mxsync_log_bytes"),
        mxsync_recheck_share=summary(runs, "mxsync_recheck_share"),
        ssh_connections_per_pass=dict(
            mxsync=summary(runs, "mxsync_ssh_connections"), rsync=summary(runs, "rsync_ssh_connections")
        ),
    )
    return ratio_figure(
        "1", "Throughput, MX-shaped: mxsync pass / plain rsync loop (time)", 1.05, runs, "mxsync_s", "rsync_s", details
    )


def fig_cipher(bench, sizes):
    """Not one of the six: the cipher's effect on throughput, to back the ssh-cipher recommendation."""
    size = sizes["cipher"]
    epns = [epn_name(index) for index in range(size["epns"])]
    with Scene(bench.workdir, "cipher") as scene:
        add_experiments(
            scene, epns, frames=size["frames"], frame_size=size["frame_size"], small_files=size["small_files"]
        )
        files, total = tree_bytes(scene.source_root)
        runs = []

        def side(cipher):
            def measure():
                scene.write_config(epn_cap_map=cap_map_for(epns), max_tasks=size["max_tasks"], ssh_cipher=cipher)
                scene.reset_destination()
                figures = run_mxsync(scene)
                run[f"{cipher or 'default'}_s"] = figures["seconds"]

            return measure

        for index, order in alternate(bench.runs, side(None), side(RECOMMENDED_CIPHER)):
            run = {}
            for measure in order:
                measure()
            run["default_mib_s"] = total / MIB / run["default_s"]
            run["aes_mib_s"] = total / MIB / run[f"{RECOMMENDED_CIPHER}_s"]
            runs.append(run)
            bench.progress(
                f"run {index + 1}: default cipher {run['default_mib_s']:.0f} MiB/s, "
                f"{RECOMMENDED_CIPHER} {run['aes_mib_s']:.0f} MiB/s"
            )
        scene.reset_destination()
    details = dict(
        size, bytes=total, default_mib_s=summary(runs, "default_mib_s"), aes_mib_s=summary(runs, "aes_mib_s")
    )
    figure = ratio_figure(
        "1c",
        f"Cipher: mxsync pass time with {RECOMMENDED_CIPHER} / ssh default (chacha20-poly1305)",
        1.0,
        runs,
        f"{RECOMMENDED_CIPHER}_s",
        "default_s",
        details,
    )
    figure["passed"] = None  # informational: no target in the issue
    figure["target"] = "(information: < 1 means the cipher is faster)"
    return figure


# ---------------------------------------------------------------- 2. many small files


def fig_small_files(bench, sizes):
    """Many small files: one mxsync pass against a plain rsync loop."""
    size = sizes["small_files"]
    epns = [epn_name(index) for index in range(size["epns"])]
    with Scene(bench.workdir, "small-files") as scene:
        add_experiments(scene, epns, frames=size["files_per_epn"], frame_size=size["file_size"], small_files=0)
        scene.write_config(epn_cap_map=cap_map_for(epns), max_tasks=size["max_tasks"])
        files, total = tree_bytes(scene.source_root)
        runs = []
        for index in range(bench.runs):
            run, mxsync_side, plain_side = transfer_pair(bench, scene, epns, size["max_tasks"])
            for side in [mxsync_side, plain_side] if index % 2 == 0 else [plain_side, mxsync_side]:
                side()
            runs.append(run)
            bench.progress(
                f"run {index + 1}: mxsync {run['mxsync_s']:.1f} s, rsync loop {run['rsync_s']:.1f} s "
                f"(post-transfer recheck: {run['mxsync_recheck_share']:.0%} of mxsync's EPN time)"
            )
        scene.reset_destination()
    details = dict(
        size,
        files=files,
        bytes=total,
        mxsync_s=summary(runs, "mxsync_s"),
        rsync_s=summary(runs, "rsync_s"),
        mxsync_rss_mib=summary(runs, "mxsync_rss_kib") / 1024,
        mxsync_log_bytes=summary(runs, "mxsync_log_bytes"),
        mxsync_recheck_share=summary(runs, "mxsync_recheck_share"),
        ssh_connections_per_pass=dict(
            mxsync=summary(runs, "mxsync_ssh_connections"), rsync=summary(runs, "rsync_ssh_connections")
        ),
    )
    return ratio_figure(
        "2",
        f"Many small files ({files} files): mxsync pass / plain rsync loop (time)",
        1.10,
        runs,
        "mxsync_s",
        "rsync_s",
        details,
    )


# ---------------------------------------------------------------- 3. parallel scaling


def transfer_phase(log_text, epns):
    """From mxsync's log, return seconds from the first EPN started to the last one verified (this pass's EPNs)."""
    starts, ends = [], []
    wanted = set(epns)
    for line in log_text.splitlines():
        match = LOG_TIME.match(line)
        if match and match.group(2) in wanted:
            moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            (starts if match.group(3) == "started" else ends).append(moment)
    if len(starts) < len(wanted) or len(ends) < len(wanted):
        raise BenchError(f"log shows {len(starts)} starts and {len(ends)} ends for {len(wanted)} EPNs")
    return (max(ends) - min(starts)).total_seconds()


def fig_scaling(bench, sizes):
    """Parallel scaling: max-tasks 1, 2, 4 with every rsync limited by rsync-bwlimit."""
    size = sizes["scaling"]
    epns = [epn_name(index) for index in range(size["epns"])]
    tasks = size["tasks"]
    with Scene(bench.workdir, "scaling") as scene:
        add_experiments(scene, epns, frames=size["frames"], frame_size=size["frame_size"], small_files=0)
        files, total = tree_bytes(scene.source_root)
        log_path = scene.facility.workdir / "log" / "sync.log"
        runs = []
        for index in range(bench.runs):
            run = {}
            for max_tasks in tasks if index % 2 == 0 else tuple(reversed(tasks)):
                scene.write_config(epn_cap_map=cap_map_for(epns), max_tasks=max_tasks, rsync_bwlimit=size["bwlimit"])
                scene.reset_destination()
                log_path.unlink(missing_ok=True)
                figures = run_mxsync(scene)
                phase = transfer_phase(log_path.read_text(), epns)
                run[f"pass_s_{max_tasks}"] = figures["seconds"]
                run[f"phase_s_{max_tasks}"] = phase
                run[f"mib_s_{max_tasks}"] = total / MIB / phase
            # rsync's own scaling on this machine, for reference: the same loop of plain rsyncs, same limit.
            for max_tasks in (tasks[0], tasks[-1]):
                scene.reset_destination()
                seconds = plain_rsync_loop(scene, epns, max_tasks, rsync_options=[f"--bwlimit={size['bwlimit']}"])[
                    "seconds"
                ]
                run[f"rsync_mib_s_{max_tasks}"] = total / MIB / seconds
            run["rsync_efficiency"] = run[f"rsync_mib_s_{tasks[-1]}"] / (
                run[f"rsync_mib_s_{tasks[0]}"] * tasks[-1] / tasks[0]
            )
            one = run[f"mib_s_{tasks[0]}"]
            for max_tasks in tasks:
                run[f"efficiency_{max_tasks}"] = run[f"mib_s_{max_tasks}"] / (one * max_tasks / tasks[0])
                run[f"pass_efficiency_{max_tasks}"] = run[f"pass_s_{tasks[0]}"] / (
                    run[f"pass_s_{max_tasks}"] * max_tasks / tasks[0]
                )
            runs.append(run)
            bench.progress(
                f"run {index + 1}: "
                + ", ".join(
                    f"{n} tasks {run[f'mib_s_{n}']:.1f} MiB/s ({run[f'efficiency_{n}']:.2f} of linear)" for n in tasks
                )
                + f"; plain rsync loop at {tasks[-1]}: {run['rsync_efficiency']:.2f} of linear"
            )
        scene.reset_destination()
    worst = min(tasks[1:], key=lambda n: summary(runs, f"efficiency_{n}"))
    value = min(summary(runs, f"efficiency_{n}") for n in tasks[1:])
    details = dict(
        size,
        bytes=total,
        limit_note="each rsync limited by rsync-bwlimit; throughput over the transfer phase "
        "(first EPN started to last verified, from mxsync's log)",
        rsync_loop_efficiency=summary(runs, "rsync_efficiency"),
    )
    for n in tasks:
        details[f"mib_s_{n}_tasks"] = summary(runs, f"mib_s_{n}")
        details[f"efficiency_{n}_tasks"] = summary(runs, f"efficiency_{n}")
        details[f"whole_pass_efficiency_{n}_tasks"] = summary(runs, f"pass_efficiency_{n}")
    return dict(
        id="3",
        title=f"Parallel scaling, {size['bwlimit']}iB/s per stream: worst aggregate throughput / linear "
        f"(at {worst} tasks)",
        value=value,
        unit="ratio",
        target=">= 0.9",
        passed=value >= 0.9,
        runs=runs,
        details=details,
    )


# ---------------------------------------------------------------- 4. no-op passes

PORTAL_TIMER = r"""
import json, sys, time
from datetime import datetime, timezone
from mxsync.config import load_config
from mxsync.plan import fetch_visits
from mxsync.portal import PortalClient
config = load_config(sys.argv[1])
times = []
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    fetch_visits(config, PortalClient(config), datetime.now(timezone.utc))
    times.append(time.perf_counter() - started)
print(json.dumps(times))
"""


def portal_seconds(config_path, repeats=1):
    """Time mxsync's own portal call (token + current and previous visits, parsed) in a separate process."""
    result = subprocess.run(
        [PYTHON, "-c", PORTAL_TIMER, str(config_path), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return min(json.loads(result.stdout))


def fig_noop_ignored(bench, sizes):
    """No-op pass (a): every EPN in range already in ignore.yml; cost per 1,000 EPNs beyond the portal call."""
    size = sizes["noop_ignored"]
    count = size["epns"]
    epns = [epn_name(index) for index in range(count)]
    with Scene(bench.workdir, "noop-ignored") as scene:
        facility = scene.facility
        for epn in epns:
            facility.portal.add_visit(23, epn, ENDED["start"], ENDED["end"])
        facility.portal.add_equipment(24)  # no visits: the empty pass
        credentials = facility.portal.credentials[None]
        empty_equipment = [
            {
                "id": 24,
                "username": credentials.username,
                "password": credentials.password,
                "client_name": credentials.client_name,
                "client_password": credentials.client_password,
                "beamline": "mx",
            }
        ]
        empty_state = facility.workdir / "state-empty"
        empty_state.mkdir()
        scene.write_ignore(epns)
        full_config = scene.write_config(epn_cap_map=cap_map_for(epns))
        empty_config = facility.write_config(
            path=facility.workdir / "config-empty.yml",
            equipment=empty_equipment,
            ignore=str(empty_state / "ignore.yml"),
            epn_cap_map={"12282": "ny79"},
        )
        runs = []

        def full():
            scene.config_path = full_config
            run["full_s"] = run_mxsync(scene)["seconds"]
            run["full_portal_s"] = portal_seconds(full_config)

        def empty():
            scene.config_path = empty_config
            run["empty_s"] = run_mxsync(scene)["seconds"]
            run["empty_portal_s"] = portal_seconds(empty_config)

        for index, order in alternate(bench.runs, full, empty):
            run = {}
            for measure in order:
                measure()
            beyond = (run["full_s"] - run["empty_s"]) - (run["full_portal_s"] - run["empty_portal_s"])
            run["per_1000_s"] = beyond / (count / 1000)
            runs.append(run)
            bench.progress(
                f"run {index + 1}: {count} ignored {run['full_s']:.2f} s (portal {run['full_portal_s']:.2f} s), "
                f"empty {run['empty_s']:.2f} s (portal {run['empty_portal_s']:.2f} s): "
                f"{run['per_1000_s']:.3f} s per 1,000 EPNs"
            )
    value = summary(runs, "per_1000_s")
    details = dict(
        size,
        full_s=summary(runs, "full_s"),
        empty_s=summary(runs, "empty_s"),
        full_portal_s=summary(runs, "full_portal_s"),
        empty_portal_s=summary(runs, "empty_portal_s"),
        method="((pass with N ignored EPNs - pass with none) - (portal call with N visits - with none)) / (N/1000)",
    )
    return dict(
        id="4a",
        title=f"No-op pass, {count} EPNs all in ignore.yml: seconds per 1,000 EPNs beyond the portal call",
        value=value,
        unit="s",
        target="< 0.2",
        passed=value < 0.2,
        runs=runs,
        details=details,
    )


def fig_noop_complete(bench, sizes):
    """No-op pass (b): EPNs complete at the destination but not in ignore.yml, against a plain rsync loop."""
    size = sizes["noop_complete"]
    epns = [epn_name(index) for index in range(size["epns"])]
    cap_map = cap_map_for(epns)
    with Scene(bench.workdir, "noop-complete") as scene:
        add_experiments(scene, epns)
        scene.write_config(epn_cap_map=cap_map, max_tasks=size["max_tasks"])
        scene.reset_destination()
        # Already complete at both destinations, as each side would have left it.
        parallel(
            lambda epn: copy_tree_like_mxsync(
                scene.source_root / epn, scene.facility.destination / cap_map[epn[:-1]] / epn / "data"
            ),
            epns,
        )
        subprocess.run(["cp", "-a", f"{scene.source_root}/.", f"{scene.plain_destination}/"], check=True)
        runs = []

        def mxsync_side():
            scene.forget_records()
            figures = run_mxsync(scene)
            run.update(
                mxsync_s=figures["seconds"],
                mxsync_ssh_connections=figures["ssh_connections"],
                mxsync_cpu_s=figures["self_cpu_s"],
                children_cpu_s=figures["children_cpu_s"],
                mxsync_log_bytes=figures["log_bytes"],
            )

        def plain_side():
            figures = plain_rsync_loop(scene, epns, size["max_tasks"])
            run.update(rsync_s=figures["seconds"], rsync_ssh_connections=figures["ssh_connections"])

        with Heartbeat():
            for index, order in alternate(bench.runs, mxsync_side, plain_side):
                run = {}
                for measure in order:
                    measure()
                runs.append(run)
                bench.progress(
                    f"run {index + 1}: mxsync {run['mxsync_s']:.1f} s ({run['mxsync_ssh_connections']} ssh logins), "
                    f"rsync loop {run['rsync_s']:.1f} s ({run['rsync_ssh_connections']} ssh logins)"
                )
    details = dict(
        size,
        mxsync_s=summary(runs, "mxsync_s"),
        rsync_s=summary(runs, "rsync_s"),
        mxsync_cpu_s=summary(runs, "mxsync_cpu_s"),
        mxsync_log_bytes=summary(runs, "mxsync_log_bytes"),
        ssh_connections_per_pass=dict(
            mxsync=summary(runs, "mxsync_ssh_connections"), rsync=summary(runs, "rsync_ssh_connections")
        ),
    )
    return ratio_figure(
        "4b",
        f"No-op pass, {size['epns']} EPNs complete at the destination, not in ignore.yml: "
        "mxsync / plain rsync loop (time)",
        1.0,
        runs,
        "mxsync_s",
        "rsync_s",
        details,
        stretch=0.6,
    )


IGNORE_ADD_TIMER = r"""
import json, os, statistics, sys, tempfile, time
from mxsync.state import IgnoreFile
directory = tempfile.mkdtemp(dir=sys.argv[1])
result = {}
for entries in (0, 500, 5000):
    ignore = IgnoreFile(os.path.join(directory, f"ignore-{entries}.yml"))
    if entries:
        ignore.add({f"{10000 + index}a" for index in range(entries)})
    times = []
    for index in range(7):
        started = time.perf_counter()
        ignore.add([f"9{index:05d}z"])
        times.append(time.perf_counter() - started)
    result[entries] = statistics.median(times)
print(json.dumps(result))
"""


def ignore_add_seconds(workdir):
    """Time IgnoreFile.add of one EPN into files of 0, 500 and 5,000 entries (median of 7), in a separate process."""
    result = subprocess.run(
        [PYTHON, "-c", IGNORE_ADD_TIMER, str(workdir)],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return {int(entries): seconds for entries, seconds in json.loads(result.stdout).items()}


def fig_noop_history(bench, sizes):
    """No-op pass (b) with years of history: ignore.yml already holding thousands of other EPNs, against none."""
    size = sizes["noop_history"]
    epns = [epn_name(index) for index in range(size["epns"])]
    history = [f"{90000 + index}a" for index in range(size["history"])]
    cap_map = cap_map_for(epns)
    with Scene(bench.workdir, "noop-history") as scene:
        add_experiments(scene, epns)
        scene.write_config(epn_cap_map=cap_map, max_tasks=size["max_tasks"])
        scene.reset_destination()
        parallel(
            lambda epn: copy_tree_like_mxsync(
                scene.source_root / epn, scene.facility.destination / cap_map[epn[:-1]] / epn / "data"
            ),
            epns,
        )
        runs = []

        def with_history():
            scene.forget_records()
            scene.write_ignore(history)
            run["history_s"] = run_mxsync(scene)["seconds"]

        def without_history():
            scene.forget_records()
            run["fresh_s"] = run_mxsync(scene)["seconds"]

        for index, order in alternate(max(bench.runs, size["runs"]), with_history, without_history):
            run = {}
            for measure in order:
                measure()
            runs.append(run)
            bench.progress(
                f"run {index + 1}: {size['epns']} EPNs with {size['history']} in ignore.yml {run['history_s']:.1f} s, "
                f"with an empty ignore.yml {run['fresh_s']:.1f} s"
            )
        adds = ignore_add_seconds(scene.workdir)
        bench.progress(
            "IgnoreFile.add of one EPN: "
            + ", ".join(f"{seconds * 1000:.1f} ms at {entries} entries" for entries, seconds in adds.items())
        )
    details = dict(
        size,
        history_s=summary(runs, "history_s"),
        fresh_s=summary(runs, "fresh_s"),
        ignore_add_ms={entries: seconds * 1000 for entries, seconds in adds.items()},
    )
    figure = ratio_figure(
        "4c",
        f"No-op pass (b), {size['epns']} EPNs, with {size['history']} other EPNs in ignore.yml / "
        "with none (flat as history grows)",
        1.10,
        runs,
        "history_s",
        "fresh_s",
        details,
    )
    figure["target"] += " (not in the issue)"
    return figure


# ---------------------------------------------------------------- 5. epnalert at scale


def fig_epnalert(bench, sizes):
    """epnalert at scale: many SFTP folders and portal visits; wall time and peak RSS."""
    size = sizes["epnalert"]
    folders = [epn_name(index) for index in range(size["folders"])]
    visits = [epn_name(index) for index in range(size["visits"])]
    claimed = len(folders) - int(len(folders) * size["unknown_fraction"])
    with Scene(bench.workdir, "epnalert") as scene:
        facility = scene.facility
        for epn in folders:
            (scene.source_root / epn).mkdir()
        for epn in visits:
            facility.portal.add_visit(
                23, epn, ENDED["start"], ENDED["end"], data_scientists=[("Grace", "Hopper", "grace@uni.example.edu")]
            )
        # Two cases over the same facility: a centre that has claimed most EPNs (the email lists the rest),
        # and the worst case, nothing claimed (every EPN is listed: the largest email, the most matching).
        configs = {}
        for case, cap_map in (("all_unknown", {"1": "ny79"}), ("few_unknown", cap_map_for(folders[:claimed]))):
            state = facility.workdir / f"state-{case}"
            state.mkdir()
            configs[case] = facility.write_config(
                path=facility.workdir / f"config-{case}.yml", epn_cap_map=cap_map, ignore=str(state / "ignore.yml")
            )
        runs = []

        def measure(case):
            def run_case():
                before = len(facility.smtp.messages)
                figures = run_measured("epnalert", ["--config", configs[case]], scene.workdir)
                facility.smtp.wait_for(before + 1, timeout=60)
                run.update(
                    {
                        f"{case}_s": figures["seconds"],
                        f"{case}_rss_mib": figures["self_maxrss_kib"] / 1024,
                        f"{case}_email_kib": len(facility.smtp.messages[-1].raw) / 1024,
                    }
                )

            return run_case

        for index, order in alternate(bench.runs, measure("all_unknown"), measure("few_unknown")):
            run = {}
            for case in order:
                case()
            runs.append(run)
            bench.progress(
                f"run {index + 1}: all {len(folders)} unknown {run['all_unknown_s']:.2f} s, peak RSS "
                f"{run['all_unknown_rss_mib']:.0f} MiB, email {run['all_unknown_email_kib']:.0f} KiB; "
                f"{len(folders) - claimed} unknown {run['few_unknown_s']:.2f} s, "
                f"{run['few_unknown_rss_mib']:.0f} MiB, email {run['few_unknown_email_kib']:.0f} KiB"
            )
    seconds, rss = summary(runs, "all_unknown_s"), summary(runs, "all_unknown_rss_mib")
    details = {key: summary(runs, key) for key in runs[0]}
    details.update(size, judged="the worst case, every EPN unknown")
    return dict(
        id="5",
        title=f"epnalert, {len(folders)} SFTP folders + {len(visits)} visits, all unknown: seconds (peak RSS MiB)",
        value=seconds,
        unit="s",
        value2=rss,
        target="< 5 s and < 200 MB",
        passed=seconds < 5 and rss * 1.048576 < 200,
        runs=runs,
        details=details,
    )


# ---------------------------------------------------------------- 6. memory


def fig_memory(bench, sizes):
    """Memory: mxsync's peak RSS over many files against few."""
    size = sizes["memory"]
    big, small = epn_name(0), epn_name(1)
    with Scene(bench.workdir, "memory") as scene:
        add_experiments(scene, [big], frames=size["big_files"], frame_size=size["file_size"], small_files=0)
        add_experiments(scene, [small], frames=size["small_files"], frame_size=size["file_size"], small_files=0)
        scene.write_config(epn_cap_map=cap_map_for([big, small]), max_tasks=size["max_tasks"])
        runs = []

        def side(epn, other, key):
            def measure():
                scene.reset_destination()
                scene.write_ignore([other])
                figures = run_mxsync(scene, sample_children=True)
                run[f"{key}_rss_kib"] = figures["self_maxrss_kib"]
                run[f"{key}_rsync_rss_kib"] = figures["descendant_peak_kib"].get("rsync", 0)
                run[f"{key}_ssh_rss_kib"] = figures["descendant_peak_kib"].get("ssh", 0)

            return measure

        for index, order in alternate(bench.runs, side(big, small, "big"), side(small, big, "small")):
            run = {}
            for measure in order:
                measure()
            runs.append(run)
            bench.progress(
                f"run {index + 1}: mxsync peak RSS {run['big_rss_kib'] / 1024:.1f} MiB over {size['big_files']} "
                f"files, {run['small_rss_kib'] / 1024:.1f} MiB over {size['small_files']} "
                f"(rsync {run['big_rsync_rss_kib'] / 1024:.1f} / {run['small_rsync_rss_kib'] / 1024:.1f} MiB, "
                f"ssh {run['big_ssh_rss_kib'] / 1024:.1f} / {run['small_ssh_rss_kib'] / 1024:.1f} MiB)"
            )
        scene.reset_destination()
    details = dict(
        size,
        big_rss_mib=summary(runs, "big_rss_kib") / 1024,
        small_rss_mib=summary(runs, "small_rss_kib") / 1024,
        big_rsync_rss_mib=summary(runs, "big_rsync_rss_kib") / 1024,
        small_rsync_rss_mib=summary(runs, "small_rsync_rss_kib") / 1024,
        big_ssh_rss_mib=summary(runs, "big_ssh_rss_kib") / 1024,
        small_ssh_rss_mib=summary(runs, "small_ssh_rss_kib") / 1024,
        note="mxsync's own peak RSS (VmHWM of the mxsync process); rsync and ssh processes sampled apart "
        "from /proc (largest single process)",
    )
    return ratio_figure(
        "6",
        f"Memory: mxsync peak RSS over {size['big_files']} files / over {size['small_files']} files",
        1.10,
        runs,
        "big_rss_kib",
        "small_rss_kib",
        details,
    )


# ---------------------------------------------------------------- 7. the lifecycle (issue 11)

BASELINE_NOTE = (
    "HPC ASSyncy copies an EPN only after its visit has ended, at its next run (every sync-frequency-hours), "
    "so its latency for a file written during a visit is the rest of the visit plus up to sync-frequency-hours; "
    "not run here"
)
# How often the benchmark looks at the destination and at ignore.yml.
POLL_SECONDS = 0.2


def recorded_epns(scene):
    """The EPNs in ignore.yml now (empty while it is missing, or caught half-written)."""
    try:
        document = yaml.safe_load(scene.ignore_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return set()
    return set(document.get("previouslySynched") or [])


def home_of(scene, epn, cap_map):
    """Where mxsync puts an EPN's files at the destination."""
    return scene.facility.destination / cap_map[epn.rstrip("abcdefghijklmnopqrstuvwxyz")] / epn / "data"


def has_arrived(path, size):
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def wait_for(condition, timeout, service, what):
    """Poll `condition` until it holds; BenchError if the service dies or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        service.check_running()
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)


def sleep_until(moment, service):
    """Sleep until the aware datetime `moment`, checking that the service still runs."""
    while True:
        service.check_running()
        remaining = (moment - datetime.now(timezone.utc)).total_seconds()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 1.0))


def fig_live_latency(bench, sizes):
    """Live mode: a file written at the facility during a visit to its arrival at home, the service running."""
    size = sizes["live_latency"]
    epn = epn_name(0)
    cap_map = cap_map_for([epn])
    now = datetime.now(timezone.utc)
    with Scene(bench.workdir, "live-latency") as scene:
        experiment = scene.facility.add_experiment(
            "mx", epn, equipment_id=23, frames=2, start=now - timedelta(hours=1), end=now + timedelta(hours=12)
        )
        scene.write_config(epn_cap_map=cap_map, live_interval_minutes=1)
        frames_home = home_of(scene, epn, cap_map) / "frames"
        first_frame = next(iter(sorted((experiment / "frames").glob("*.cbf"))))
        # Random moments, the same in every run of the benchmark; where they fall among the passes is not.
        generator = random.Random(11)
        offsets = sorted(generator.uniform(0, size["span_s"]) for _ in range(size["files"]))
        log = LogTail(scene.facility.workdir / "log" / "sync.log")
        written, runs = {}, []
        with Service(scene) as service:
            # The service's first live pass brings the visit's first frames home; measure from then on.
            wait_for(
                lambda: has_arrived(frames_home / first_frame.name, first_frame.stat().st_size),
                300,
                service,
                "the first live pass",
            )
            started = time.monotonic()
            bench.progress(f"first live pass done; writing {len(offsets)} files over {size['span_s'] / 60:.0f} min")
            upcoming = list(enumerate(offsets))
            with Heartbeat():
                while upcoming or written:
                    service.check_running()
                    moment = time.monotonic()
                    if upcoming and moment - started >= upcoming[0][1]:
                        index, offset = upcoming.pop(0)
                        name = f"{epn}_live_{index + 1:04d}.cbf"
                        data = generator.randbytes(size["frame_size"])
                        (experiment / "frames" / name).write_bytes(data)
                        written[name] = (len(data), time.monotonic(), offset)
                    for name, (length, at, offset) in list(written.items()):
                        waited = time.monotonic() - at
                        if has_arrived(frames_home / name, length):
                            runs.append(dict(file=name, written_at_s=round(offset, 1), latency_s=waited))
                            del written[name]
                        elif waited > size["give_up_s"]:
                            runs.append(dict(file=name, written_at_s=round(offset, 1), latency_s=None))
                            del written[name]
                    time.sleep(POLL_SECONDS)
            recorded_during_visit = epn in recorded_epns(scene)
            service_figures = service.stop()
        text = log.read()
    latencies = [run["latency_s"] for run in runs if run["latency_s"] is not None]
    missing = [run["file"] for run in runs if run["latency_s"] is None]
    value, p95 = median(latencies), percentile(latencies, 0.95)
    for run in runs:
        bench.progress(
            f"{run['file']} written at +{run['written_at_s']:.0f} s: "
            + ("never arrived" if run["latency_s"] is None else f"home after {run['latency_s']:.1f} s")
        )
    details = dict(
        size,
        median_s=value,
        p95_s=p95,
        max_s=max(latencies) if latencies else None,
        missing=missing,
        live_passes=text.count(f"{epn}: live pass started"),
        recorded_during_visit=recorded_during_visit,
        service_cpu_s=service_figures.get("self_cpu_s"),
        service_children_cpu_s=service_figures.get("children_cpu_s"),
        service_rss_mib=service_figures.get("self_maxrss_kib", 0) / 1024,
        service_seconds=service_figures["seconds"],
        baseline=BASELINE_NOTE,
        method="one service (mxsync --config C --execute), live-interval-minutes 1, a visit running; each file "
        "written at a random moment; latency from its last byte written at the facility to the destination "
        f"file at full size (looked at every {POLL_SECONDS} s)",
    )
    return dict(
        id="7a",
        title=f"Live mode, live-interval-minutes 1: file at the facility -> home, median (p95) of {len(runs)} files",
        value=value,
        unit="s",
        value2=p95,
        value2_unit="s p95",
        target="median and p95 < 120 s",
        passed=bool(latencies) and not missing and not recorded_during_visit and value < 120 and p95 < 120,
        runs=runs,
        details=details,
    )


RECORD_LINE = re.compile(r" - mxsync\.\w+ - \w+:\d+: (\d+[a-z]+): (started,|synced and verified, recorded in)")


def fig_settle_record(bench, sizes):
    """Visit end + settle-minutes to the EPN recorded in ignore.yml, the service running."""
    size = sizes["settle_record"]
    count = bench.runs if size["max_runs"] is None else min(bench.runs, size["max_runs"])
    epns = [epn_name(index) for index in range(count)]
    cap_map = cap_map_for(epns)
    settle = timedelta(minutes=1)
    runs = []
    with Scene(bench.workdir, "settle-record") as scene:
        scene.write_config(epn_cap_map=cap_map, settle_minutes=1)
        log = LogTail(scene.facility.workdir / "log" / "sync.log")
        for index, epn in enumerate(epns):
            now = datetime.now(timezone.utc)
            end = now + timedelta(seconds=size["lead_s"])
            deadline = end + settle
            experiment = scene.facility.add_experiment(
                "mx", epn, equipment_id=23, frames=size["frames"], start=now - timedelta(hours=1), end=end
            )
            with Service(scene) as service:
                # Auto-processing writes after collection, while the visit settles: the record must include it.
                sleep_until(end + timedelta(seconds=10), service)
                processing = experiment / "processing"
                processing.mkdir()
                (processing / "result.mtz").write_bytes(b"processed " * 1000)
                wait_for(
                    lambda epn=epn: epn in recorded_epns(scene),
                    (deadline - datetime.now(timezone.utc)).total_seconds() + size["give_up_s"],
                    service,
                    f"{epn} recorded",
                )
                recorded_at = datetime.now(timezone.utc)
                service.stop()
            moments = {}
            for line in log.read().splitlines():
                match = RECORD_LINE.search(line)
                if match and match.group(1) == epn:
                    moments.setdefault(match.group(2).split()[0].rstrip(","), log_moment(line))
            run = dict(
                epn=epn,
                seconds=(recorded_at - deadline).total_seconds(),
                complete=has_arrived(home_of(scene, epn, cap_map) / "processing" / "result.mtz", 10000),
                final_pass_began_s=_since(moments.get("started"), deadline),
                recorded_in_log_s=_since(moments.get("synced"), deadline),
            )
            runs.append(run)
            bench.progress(
                f"run {index + 1}: {epn} recorded {run['seconds']:.1f} s after visit end + settle "
                f"(final pass began at +{run['final_pass_began_s']:.1f} s); "
                f"file written while settling {'home' if run['complete'] else 'MISSING'}"
            )
    value = summary(runs, "seconds")
    complete = all(run["complete"] for run in runs)
    details = dict(
        size,
        runs=count,
        max_s=max(run["seconds"] for run in runs),
        final_pass_began_s=summary(runs, "final_pass_began_s"),
        all_complete=complete,
        baseline="HPC ASSyncy records an EPN at its first run after the visit ends (every sync-frequency-hours), "
        "without a settle time: files written after that run are never fetched; not run here",
        method="per run one service (mxsync --config C --execute), settle-minutes 1, a visit ending "
        f"{size['lead_s']} s after the service starts; a file written 10 s after the visit ends; seconds from "
        f"visit end + settle-minutes to the EPN in ignore.yml (looked at every {POLL_SECONDS} s)",
    )
    return dict(
        id="7b",
        title=f"Visit end + settle-minutes -> recorded in ignore.yml, median of {count} run(s)",
        value=value,
        unit="s",
        target="< 120 s",
        passed=value < 120 and complete,
        runs=runs,
        details=details,
    )


def _since(moment, start):
    return None if moment is None else (moment - start).total_seconds()


CONFIG_TIMER = r"""
import json, statistics, sys, time
from mxsync.config import load_config
times = []
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    load_config(sys.argv[1])
    times.append(time.perf_counter() - started)
print(json.dumps(statistics.median(times)))
"""


def config_seconds(config_path, repeats=3):
    """Time mxsync's read of config.yml (the median of `repeats`), which the service repeats before every cycle."""
    result = subprocess.run(
        [PYTHON, "-c", CONFIG_TIMER, str(config_path), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return json.loads(result.stdout)


CYCLE_LINE = re.compile(r" - mxsync\.service - \w+:\d+: (mxsync started|Cycle finished)")


def cycle_seconds(log_text):
    """From one `--once` run's log: seconds from 'mxsync started' to 'Cycle finished' (the cycle, without the
    interpreter's start)."""
    moments = {}
    for line in log_text.splitlines():
        match = CYCLE_LINE.search(line)
        if match:
            moments[match.group(1)] = log_moment(line)
    if len(moments) < 2:
        raise BenchError(f"the log does not show the cycle's start and end: {sorted(moments)}")
    return (moments["Cycle finished"] - moments["mxsync started"]).total_seconds()


def fig_noop_known(bench, sizes):
    """No-op cycle with many EPNs known (mapped, recorded, the state dir from a first run), as a service pays it."""
    size = sizes["noop_known"]
    count = size["epns"]
    epns = [epn_name(index) for index in range(count)]
    with Scene(bench.workdir, "noop-known") as scene:
        for epn in epns:
            scene.facility.portal.add_visit(23, epn, ENDED["start"], ENDED["end"])
        scene.write_ignore(epns)
        config = scene.write_config(epn_cap_map=cap_map_for(epns))
        log = LogTail(scene.facility.workdir / "log" / "sync.log")
        first = run_mxsync(scene)  # leaves in the state dir whatever mxsync keeps of the EPNs it has seen
        log.read()
        bench.progress(f"first run (not measured): {first['seconds']:.2f} s")
        runs = []

        def cycle():
            figures = run_mxsync(scene)
            run.update(process_s=figures["seconds"], cycle_s=cycle_seconds(log.read()))

        def portal():
            # The fastest of three calls (the first pays for lazy imports): the figure errs high, not low.
            run["portal_s"] = portal_seconds(config, repeats=3)
            # The log shows the cycle from after config.yml was read; the service reads it again before each cycle.
            run["config_s"] = config_seconds(config)

        for index, order in alternate(bench.runs, cycle, portal):
            run = {}
            for measure in order:
                measure()
            run["beyond_s"] = run["config_s"] + run["cycle_s"] - run["portal_s"]
            run["process_beyond_s"] = run["process_s"] - run["portal_s"]
            runs.append(run)
            bench.progress(
                f"run {index + 1}: config.yml read {run['config_s']:.2f} s + cycle {run['cycle_s']:.2f} s "
                f"(whole process {run['process_s']:.2f} s), portal call {run['portal_s']:.2f} s: "
                f"{run['beyond_s']:.2f} s beyond it"
            )
        if recorded_epns(scene) != set(epns):
            raise BenchError("ignore.yml changed during no-op cycles")
    value = summary(runs, "beyond_s")
    details = dict(
        size,
        config_s=summary(runs, "config_s"),
        cycle_s=summary(runs, "cycle_s"),
        cycle_beyond_portal_s=median([run["cycle_s"] - run["portal_s"] for run in runs]),
        portal_s=summary(runs, "portal_s"),
        process_s=summary(runs, "process_s"),
        process_beyond_s=summary(runs, "process_beyond_s"),
        method="mxsync --execute --once over N ended visits, all mapped (N epn_cap_map entries) and in ignore.yml, "
        "after one unmeasured run. What a service cycle costs: the read of config.yml it makes before each cycle "
        "(load_config, median of 3) plus the cycle from the log ('mxsync started' to 'Cycle finished'), minus "
        "mxsync's own portal call (token + visits, parsed; the fastest of 3); both timed in a separate process, "
        "alternately before and after the run",
    )
    return dict(
        id="7c",
        title=f"No-op service cycle (config read + cycle), {count} EPNs known: seconds beyond the portal call",
        value=value,
        unit="s",
        target="< 1 s",
        passed=value < 1,
        runs=runs,
        details=details,
    )


FIGURES = {
    "1": fig_throughput,
    "1c": fig_cipher,
    "2": fig_small_files,
    "3": fig_scaling,
    "4a": fig_noop_ignored,
    "4b": fig_noop_complete,
    "4c": fig_noop_history,
    "5": fig_epnalert,
    "6": fig_memory,
    "7a": fig_live_latency,
    "7b": fig_settle_record,
    "7c": fig_noop_known,
}

# Issue 13's figures live in their own module, which uses the helpers above: imported last, on purpose.
from bench.bag_figures import fig_bag_checksum, fig_bag_pass, fig_bag_verify  # noqa: E402

FIGURES.update({"8a": fig_bag_pass, "8b": fig_bag_checksum, "8c": fig_bag_verify})
