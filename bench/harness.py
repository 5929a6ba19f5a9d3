"""What every figure needs: a facility in a scratch directory, timed runs of mxsync, epnalert and plain rsync.

Timings are wall-clock seconds of whole processes, as a user or systemd would see them. Peak RSS
comes from getrusage inside the measured process (bench/rusage_main.py), so that mxsync's own
memory is told apart from its rsync and ssh children.
"""

import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from tests.facility import Facility

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RUSAGE_MAIN = Path(__file__).with_name("rusage_main.py")
NOW = datetime.now(timezone.utc)
ENDED = dict(start=NOW - timedelta(days=3), end=NOW - timedelta(days=2))
MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A measured command failed, so its timing means nothing."""


def median(values):
    return statistics.median(values) if values else None


def percentile(values, share):
    """The `share` (0..1) quantile of `values`, linear between the nearest ranks (as numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * share
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def machine():
    """Describe the machine the figures come from."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3

    def version(command):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=10)
            return (result.stdout or result.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"

    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rsync": version(["rsync", "--version"]),
        "ssh": version(["ssh", "-V"]),
        "load_average_at_start": os.getloadavg(),
    }


def disk_free(path):
    usage = shutil.disk_usage(path)
    return usage.free / 1024**3


# ---------------------------------------------------------------- the facility


class Scene:
    """One figure's facility in its own scratch directory, removed by close()."""

    def __init__(self, parent, name):
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
        self.facility = Facility(self.workdir / "site")
        self.facility.start()
        self.plain_destination = self.workdir / "plain-destination"
        self.config_path = None
        self._sshd_log_offset = 0

    def close(self):
        try:
            self.facility.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def source_root(self):
        return self.facility.root / "data" / "mx"

    @property
    def state_dir(self):
        return self.facility.workdir / "state"

    @property
    def ignore_path(self):
        return self.state_dir / "ignore.yml"

    def write_config(self, **overrides):
        self.config_path = self.facility.write_config(**overrides)
        return self.config_path

    def ssh_arguments(self):
        """mxsync's own ssh arguments for the current config, without connection sharing."""
        from mxsync.config import load_config
        from mxsync.rsync import RsyncRunner

        return RsyncRunner(load_config(self.config_path)).ssh_arguments()

    def reset_destination(self):
        """Forget every sync: empty both destinations, ignore.yml and mxsync's history; flush dirty pages."""
        for directory in (self.facility.destination, self.plain_destination):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
        self.forget_records()
        os.sync()

    def forget_records(self):
        for name in ("ignore.yml", "mxsync-state.json"):
            (self.state_dir / name).unlink(missing_ok=True)

    def write_ignore(self, epns):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ignore_path.write_text(yaml.safe_dump({"previouslySynched": sorted(epns)}, default_flow_style=False))

    def ssh_connections(self):
        """Return how many ssh logins sshd accepted since the last call."""
        with open(self.facility.sshd.log_file, "rb") as log:
            log.seek(self._sshd_log_offset)
            text = log.read()
            self._sshd_log_offset = log.tell()
        return text.count(b"Accepted publickey")


# ---------------------------------------------------------------- measured runs


def run_measured(program, arguments, workdir, timeout=3600, env=None, sample_children=False):
    """Run `program` (mxsync or epnalert) with arguments; return wall seconds and getrusage figures.

    Raises BenchError if it exits non-zero.
    """
    out = Path(tempfile.mkstemp(prefix="rusage-", suffix=".json", dir=workdir)[1])
    command = [PYTHON, str(RUSAGE_MAIN), str(out), program, *map(str, arguments)]
    stderr_path = out.with_suffix(".stderr")
    with open(stderr_path, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=workdir
        )
        sampler = DescendantPeak(process.pid) if sample_children else None
        try:
            returncode = process.wait(timeout)
        finally:
            seconds = time.perf_counter() - started
            if sampler is not None:
                sampler.stop()
            if process.poll() is None:
                process.kill()
                process.wait()
    figures = json.loads(out.read_text()) if out.stat().st_size else {}
    tail = stderr_path.read_text(errors="replace")[-2000:]
    out.unlink()
    stderr_path.unlink()
    if returncode != 0:
        raise BenchError(f"{program} {shlex.join(map(str, arguments))} exited {returncode}:\n{tail}")
    figures["seconds"] = seconds
    if sampler is not None:
        figures["descendant_peak_kib"] = sampler.peaks
    return figures


class Service:
    """`mxsync --config C --execute` running as the service does (no --once) until stop().

    It runs under bench/rusage_main.py, so stop() returns its peak RSS and CPU seconds over the whole run.
    """

    def __init__(self, scene):
        self.scene = scene
        self.process = None
        self.started = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        if self.process is not None and self.process.poll() is None:
            self.stop()

    def start(self):
        workdir = self.scene.workdir
        self.out = Path(tempfile.mkstemp(prefix="service-", suffix=".json", dir=workdir)[1])
        self.stderr_path = self.out.with_suffix(".stderr")
        command = [PYTHON, str(RUSAGE_MAIN), str(self.out), "mxsync", "--config", str(self.scene.config_path)]
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [*command, "--execute"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, cwd=workdir
            )
        self.started = time.monotonic()

    def check_running(self):
        """Raise BenchError if the service has exited: whatever is measured after that means nothing."""
        if self.process.poll() is not None:
            raise BenchError(f"the mxsync service exited {self.process.returncode}:\n{self._tail()}")

    def stop(self, timeout=120):
        """SIGTERM, as systemd stops it; return its figures (seconds, peak RSS, CPU). BenchError unless it exits 0."""
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError(
                f"the mxsync service did not stop within {timeout} s of SIGTERM:\n{self._tail()}"
            ) from None
        figures = json.loads(self.out.read_text()) if self.out.stat().st_size else {}
        figures["seconds"] = time.monotonic() - self.started
        tail = self._tail()
        self.out.unlink()
        self.stderr_path.unlink()
        if returncode != 0:
            raise BenchError(f"the mxsync service exited {returncode} after SIGTERM:\n{tail}")
        return figures

    def _tail(self):
        return self.stderr_path.read_text(errors="replace")[-2000:]


class DescendantPeak:
    """Samples the peak RSS (VmHWM) of a process's rsync and ssh descendants from /proc until stopped.

    Sampling misses the last moments of a process's life, but VmHWM only grows, so the value read
    shortly before exit is the peak unless memory grew in the final interval.
    """

    NAMES = (b"rsync", b"ssh")

    def __init__(self, pid, interval=0.05):
        self.pid = pid
        self.interval = interval
        self.peaks = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()

    def _loop(self):
        while not self._done.wait(self.interval):
            parents, names = {}, {}
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/stat", "rb") as stat:
                        text = stat.read()
                except OSError:
                    continue
                close = text.rindex(b")")
                names[int(entry.name)] = text[text.index(b"(") + 1 : close]
                parents[int(entry.name)] = int(text[close + 2 :].split()[1])
            for pid, name in names.items():
                if name not in self.NAMES or not self._descends(pid, parents):
                    continue
                try:
                    with open(f"/proc/{pid}/status", "rb") as status:
                        for line in status:
                            if line.startswith(b"VmHWM:"):
                                key = name.decode()
                                self.peaks[key] = max(self.peaks.get(key, 0), int(line.split()[1]))
                                break
                except OSError:
                    continue

    def _descends(self, pid, parents):
        for _ in range(20):
            pid = parents.get(pid)
            if pid is None or pid <= 1:
                return False
            if pid == self.pid:
                return True
        return False


def run_mxsync(scene, timeout=3600, sample_children=False):
    """One `mxsync --config C --execute --once` pass; return its figures plus the ssh logins it made."""
    scene.ssh_connections()
    log = scene.facility.workdir / "log" / "sync.log"
    log_before = log.stat().st_size if log.exists() else 0
    figures = run_measured(
        "mxsync",
        ["--config", scene.config_path, "--execute", "--once"],
        scene.workdir,
        timeout,
        sample_children=sample_children,
    )
    figures["ssh_connections"] = scene.ssh_connections()
    # Bytes of sync.log this pass wrote (at log-level DEBUG, the facility's default); 0 if it rotated.
    log_after = log.stat().st_size if log.exists() else 0
    figures["log_bytes"] = max(0, log_after - log_before)
    if log_after > log_before:
        with open(log, "rb") as file:
            file.seek(log_before)
            figures.update(recheck_share(file.read().decode("utf-8", "replace")))
    return figures


LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - mxsync\.\w+ - \w+:\d+: (\d+[a-z]+): "
    r"(started|running rsync.*--dry-run|synced and verified)"
)


def recheck_share(log_text):
    """From one pass's DEBUG log: the share of the EPNs' worker time spent in the post-transfer dry-run recheck.

    Each EPN runs from 'started' to 'synced and verified'; its recheck from the dry-run rsync's 'running'
    line to 'synced'. Returns {} if the log shows no rechecks.
    """
    events = {}
    for line in log_text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            kind = "recheck" if match.group(3).startswith("running") else match.group(3).split()[0]
            events.setdefault(match.group(2), {})[kind] = moment
    total = recheck = 0.0
    for epn_events in events.values():
        if "started" in epn_events and "synced" in epn_events:
            total += (epn_events["synced"] - epn_events["started"]).total_seconds()
            if "recheck" in epn_events:
                recheck += (epn_events["synced"] - epn_events["recheck"]).total_seconds()
    if not recheck or not total:
        return {}
    return {"recheck_worker_s": recheck, "epn_worker_s": total, "recheck_share": recheck / total}


def plain_rsync_loop(scene, epns, max_tasks, rsync_options=(), timeout=3600, archive=True):
    """The baseline: `rsync -a -e SSH host:/data/mx/EPN/ DEST/EPN/` per EPN, max_tasks at once.

    SSH is mxsync's own ssh command line (port, key, known hosts, cipher) without connection sharing.
    archive=False leaves out -a (when rsync_options are mxsync's own, mxsync.commands.BASE_OPTIONS).
    Returns wall seconds and the ssh logins made.
    """
    rsh = shlex.join(scene.ssh_arguments())
    target = f"{scene.facility.sshd.target}"
    errors = []

    def one(epn):
        destination = scene.plain_destination / epn
        command = [
            "rsync",
            *(["-a"] if archive else []),
            *rsync_options,
            "-e",
            rsh,
            f"{target}:{scene.source_root}/{epn}/",
            f"{destination}/",
        ]
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout
        )
        if result.returncode != 0:
            errors.append(f"{epn}: rsync exit {result.returncode}: {result.stderr.decode(errors='replace')[-500:]}")

    scene.ssh_connections()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max_tasks) as pool:
        list(pool.map(one, epns))
    seconds = time.perf_counter() - started
    if errors:
        raise BenchError(f"plain rsync loop failed: {errors[0]}")
    return {"seconds": seconds, "ssh_connections": scene.ssh_connections()}


class LogTail:
    """The lines a log file gains from now on (a rotated or truncated file is read from its start)."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def read(self):
        if not self.path.exists():
            return ""
        if self.path.stat().st_size < self.offset:
            self.offset = 0
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            text = file.read()
        self.offset += len(text)
        return text.decode("utf-8", "replace")


def log_moment(line):
    """The aware time at the start of a line of mxsync's log (written in local time), or None."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone(timezone.utc)
    except ValueError:
        return None


def timed(action):
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def tree_bytes(path):
    total = files = 0
    for directory, _, names in os.walk(path):
        for name in names:
            total += os.lstat(os.path.join(directory, name)).st_size
            files += 1
    return files, total


def copy_tree_like_mxsync(source, destination):
    """Make `destination` what a completed mxsync transfer of `source` leaves (locally, no ssh)."""
    from mxsync.commands import BASE_OPTIONS

    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["rsync", *BASE_OPTIONS, f"{source}/", f"{destination}/"],
        check=True,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def parallel(function, items, workers=4):
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items))


class Heartbeat:
    """Prints a dot every few seconds so that a long figure visibly progresses."""

    def __init__(self, interval=10.0):
        self.interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._done.set()
        self._thread.join()

    def _loop(self):
        while not self._done.wait(self.interval):
            print(".", end="", flush=True)
