"""`mxsync verify`: check recorded EPNs' bags again (every missing, changed or extra file), or bag older records.

Exit 0 only when every EPN checked is a valid bag; 1 otherwise. It reads the destination and never changes a file
of data/; `--bag` writes the tag files of EPNs recorded before bags (hashing here), as the service would.
"""

import logging
import os
import sys
import time

from mxsync.bag import verify_bag
from mxsync.bagging import Bagger
from mxsync.cli_support import load_and_log
from mxsync.destination import epn_destination, writable_destination
from mxsync.errors import BagError, ConfigError, UnsafeNameError
from mxsync.followups import build_record
from mxsync.history import History
from mxsync.names import describe, epn_number, is_epn
from mxsync.pipeline import PipelineSettings, human_bytes
from mxsync.state import IgnoreFile

logger = logging.getLogger("mxsync.verify")


def run_verify(config_path, epns=(), all_epns=False, fast=False, bag=False, out=None):
    """Check (or with `bag`, first make) the bags of the EPNs named, or of every recorded one; return the exit code."""
    out = out or sys.stdout
    if epns and all_epns:
        raise ConfigError("mxsync verify", ["name EPNs or pass --all, not both"])
    if not epns and not all_epns and not bag:
        raise ConfigError("mxsync verify", ["name the EPNs to verify, or pass --all for every recorded EPN"])
    for epn in epns:
        if not is_epn(epn):
            raise ConfigError("mxsync verify", [f"{describe(epn)} is not an EPN (digits then lower-case letters)"])
    config = load_and_log(config_path, "sync")
    selected = list(epns) or sorted(IgnoreFile(config.ignore_file).load())
    progress = ByteProgress(sys.stderr) if sys.stderr.isatty() else None
    failed = bagged = 0
    with History(config.state_dir, read_only=True) as history:
        bagger = Bagger(
            PipelineSettings.from_config(config),
            config.bag_algorithm,
            None,
            history,
            lambda epn: build_record(config, history, epn),
            config.ssh_target,
            stop=None,
        )
        folders = {epn: _bag_folder(config, epn) for epn in selected}
        if progress is not None and not fast:
            progress.total = sum(_payload_bytes(folder) for folder in folders.values() if isinstance(folder, str))
        for epn, folder in folders.items():
            if not isinstance(folder, str):  # why it has no folder to check
                failed += 1
                print(f"{epn}: {folder[0]}", file=out)
                continue
            if not os.path.exists(os.path.join(folder, "bagit.txt")):
                if not bag:
                    failed += 1
                    print(f"{epn}: not a bag yet (recorded before bags?): `mxsync verify --bag` makes one", file=out)
                    continue
                try:
                    figures = _make_bag(bagger, config, epn, progress)
                except (BagError, UnsafeNameError, OSError) as error:
                    failed += 1
                    print(f"{epn}: cannot bag {folder}: {error}", file=out)
                    continue
                bagged += 1
                print(f"{epn}: {figures}", file=out)
                continue
            problems = verify_bag(folder, fast=fast, progress=progress.add if progress else None)
            if problems:
                failed += 1
                print(f"{epn}: {len(problems)} problem(s) in {folder}", file=out)
                for problem in problems:
                    print(f"  {problem}", file=out)
            else:
                print(f"{epn}: valid{' (sizes and counts only)' if fast else ''}", file=out)
    if progress is not None:
        progress.finish()
    checked = len(selected)
    print(
        f"{checked} EPN(s): {checked - failed} valid{f' ({bagged} bagged now)' if bagged else ''}, "
        f"{failed} with problems",
        file=out,
    )
    return 1 if failed else 0


def _bag_folder(config, epn):
    """Return the EPN's folder (a str), or a 1-tuple saying why it has none to check."""
    project = config.project_for(epn_number(epn))
    if project is None:
        return (f"not in epn_cap_map, so it has no folder at {config.destination_root}",)
    try:
        data = epn_destination(config, project, epn)
    except UnsafeNameError as error:
        return (f"refused: {error}",)
    if not os.path.isdir(data):
        return (f"no folder {data}",)
    return str(data.parent)


def _make_bag(bagger, config, epn, progress):
    destination = epn_destination(config, config.project_for(epn_number(epn)), epn)
    with writable_destination(bagger.settings, destination) as data_folder:
        return bagger.bag_open_folder(epn, data_folder, destination.parent, progress=progress.add if progress else None)


def _payload_bytes(folder):
    """The bytes of a bag's payload as its bag-info.txt says (Payload-Oxum), 0 if it does not say."""
    try:
        with open(os.path.join(folder, "bag-info.txt"), encoding="utf-8", errors="replace") as lines:
            for line in lines:
                label, _, value = line.partition(":")
                if label.strip().lower() == "payload-oxum":
                    return int(value.strip().partition(".")[0])
    except (OSError, ValueError):
        pass
    return 0


class ByteProgress:
    """A one-line byte progress bar on a terminal, redrawn at most ten times a second."""

    def __init__(self, stream, total=0):
        self.stream = stream
        self.total = total
        self.done = 0
        self._drawn = 0.0
        self._started = time.monotonic()

    def add(self, count):
        self.done += count
        now = time.monotonic()
        if now - self._drawn >= 0.1:
            self._drawn = now
            self._draw(now)

    def _draw(self, now):
        rate = self.done / max(now - self._started, 1e-6)
        if self.total:
            share = min(self.done / self.total, 1.0)
            bar = "#" * int(share * 30)
            text = f"[{bar:<30}] {human_bytes(self.done)} of {human_bytes(self.total)} ({human_bytes(rate)}/s)"
        else:
            text = f"{human_bytes(self.done)} ({human_bytes(rate)}/s)"
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()

    def finish(self):
        if self.done:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
