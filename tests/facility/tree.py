"""Lay out experiment data the way the Australian Synchrotron SFTP server shows it, and compare trees."""

import hashlib
import os
import random
from pathlib import Path, PurePosixPath

# The account whose auto-processing output sits under home/ in every experiment.
AUTO_PROCESSING_USER = "mxuser"


def make_experiment(root, beamline, epn, frames=5, frame_size=64 * 1024, small_files=3, seed=0):
    """Create `root`/data/`beamline`/`epn` with frames, auto-processing output and dot-files; return it."""
    experiment = Path(root) / "data" / beamline / epn
    # The same seed gives the same bytes, so a second run or a re-created tree compares equal.
    generator = random.Random(f"{seed}/{beamline}/{epn}")
    frames_dir = experiment / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    for number in range(1, frames + 1):
        (frames_dir / f"{epn}_{number:04d}.cbf").write_bytes(generator.randbytes(frame_size))
    auto_dir = experiment / "home" / AUTO_PROCESSING_USER / "auto"
    for number in range(1, small_files + 1):
        run_dir = auto_dir / f"run_{number:02d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.txt").write_text(f"{epn} run {number}: resolution {generator.uniform(1, 3):.2f} A\n")
    (experiment / ".info").write_text(f"epn: {epn}\nbeamline: {beamline}\n")
    # Dot-files the sync rule leaves behind.
    (experiment / ".hidden_cache").write_bytes(generator.randbytes(128))
    (frames_dir / ".lock").write_text("locked by the detector\n")
    return experiment


def tree_manifest(path, include=None):
    """Return {relative posix path: (size, sha256 hex)} for the files under `path` that `include` accepts."""
    path = Path(path)
    manifest = {}
    for directory, _, files in os.walk(path):
        for name in files:
            file_path = Path(directory) / name
            relative = file_path.relative_to(path).as_posix()
            if include is None or include(relative):
                data = file_path.read_bytes()
                manifest[relative] = (len(data), hashlib.sha256(data).hexdigest())
    return manifest


def wanted(relative_path):
    """True if the sync copies `relative_path`: no component is a dot-name other than exactly '.info'."""
    return not any(part.startswith(".") and part != ".info" for part in PurePosixPath(relative_path).parts)
