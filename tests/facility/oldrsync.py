"""An older rsync for tests: the newest one before 3.4 that apt can fetch (Debian 12's main archive has 3.2.7).

rsync 3.4 began refusing some symlink tricks on the receiving side; mxsync must hold without that help, as
with RHEL's 3.1 and 3.2. The package is fetched once with `apt-get download`, unpacked with `dpkg-deb -x`
into a cache (the venv's, else one per user under the temporary directory), and its binary run with the
libraries the installed rsync brought. Nothing is installed on the system.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BEFORE = (3, 4)  # the receiver's own defences against planted links arrived in 3.4.0
VERSION_LINE = re.compile(r"rsync\s+version\s+v?(\d+)\.(\d+)\.(\d+)")


class OldRsyncUnavailable(Exception):
    """No older rsync could be fetched or run here; the message says why (a test skips with it)."""


def old_rsync_directory():
    """Return a folder holding an older `rsync` (to put first on PATH); raise OldRsyncUnavailable if there is none."""
    version = _candidate_version()
    for cache in _caches():
        folder = cache / f"rsync-{_safe(version)}"
        binary = folder / "usr" / "bin" / "rsync"
        if not binary.exists():
            try:
                _fetch(version, folder)
            except OSError:
                continue  # this cache is not writable for us: try the next one
        _check_runs(binary)
        return binary.parent
    raise OldRsyncUnavailable(f"no writable cache folder for rsync {version}")


def rsync_version(binary="rsync"):
    """Return the (major, minor, patch) that `binary --version` reports."""
    output = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False).stdout
    match = VERSION_LINE.search(output)
    if not match:
        raise OldRsyncUnavailable(f"{binary} --version says {output[:80]!r}")
    return tuple(int(part) for part in match.groups())


def _candidate_version():
    if shutil.which("apt-cache") is None or shutil.which("dpkg-deb") is None:
        raise OldRsyncUnavailable("needs apt-cache and dpkg-deb (Debian or Ubuntu) to fetch an older rsync")
    listing = subprocess.run(["apt-cache", "madison", "rsync"], capture_output=True, text=True, check=False).stdout
    versions = [line.split("|")[1].strip() for line in listing.splitlines() if line.count("|") >= 2]
    older = [version for version in versions if _upstream(version) < BEFORE]
    if not older:
        raise OldRsyncUnavailable(f"apt knows no rsync older than {'.'.join(map(str, BEFORE))} (has {versions})")
    return max(older, key=_upstream)


def _upstream(debian_version):
    upstream = debian_version.split(":")[-1].split("-")[0]
    return tuple(int(part) for part in re.findall(r"\d+", upstream)[:3])


def _caches():
    yield Path(sys.prefix) / "cache"
    yield Path(tempfile.gettempdir()) / f"mxsync-test-cache-{os.getuid()}"


def _safe(version):
    return re.sub(r"[^A-Za-z0-9.+-]", "_", version)


def _fetch(version, folder):
    """Download rsync=`version` and unpack it into `folder` (OSError if the cache is not writable)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as download:
        # apt-get warns when run as root that its _apt user cannot write here; the download still works.
        fetched = subprocess.run(
            ["apt-get", "download", f"rsync={version}"], cwd=download, capture_output=True, text=True, check=False
        )
        packages = list(Path(download).glob("rsync_*.deb"))
        if fetched.returncode != 0 or not packages:
            raise OldRsyncUnavailable(f"apt-get download rsync={version} failed: {fetched.stderr.strip()[-200:]}")
        unpacked = Path(download) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(packages[0]), str(unpacked)], check=True, capture_output=True)
        try:
            os.replace(unpacked, folder)  # all at once: a concurrent run sees all of it or none
        except OSError:
            if not (folder / "usr" / "bin" / "rsync").exists():
                raise


def _check_runs(binary):
    found = rsync_version(binary)
    if found >= BEFORE:
        raise OldRsyncUnavailable(f"{binary} is rsync {'.'.join(map(str, found))}, not older than 3.4")
