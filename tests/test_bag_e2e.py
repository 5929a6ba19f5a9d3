"""Every recorded EPN a BagIt bag, on the simulated facility (real sshd, rsync, portal), checked by the real `bagit`
package; `mxsync verify` finds a flipped byte, a removed and an added file."""

import hashlib
import re
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import bagit
import pytest
import yaml

from tests.facility.portal import _iso
from tests.facility.tree import wanted
from tests.test_mxsync import ENDED, MXSYNC, _wait_for, ignore_path, mxsync, recorded, sync_log


def _folder(facility, epn="12282a", project="ny79"):
    return facility.destination / project / epn


def _manifest(folder, algorithm="sha1"):
    """{path under data/: digest} of the bag's payload manifest."""
    entries = {}
    for line in (folder / f"manifest-{algorithm}.txt").read_text().splitlines():
        digest, path = line.split("  ", 1)
        path = re.sub("%(0A|0D|25)", lambda match: chr(int(match.group(1), 16)), path)  # RFC 8493 2.1.3
        entries[path.removeprefix("data/")] = digest
    return entries


def _source_digests(facility, epn, algorithm="sha1", beamline="mx"):
    """An independent hash of the files the facility holds for the EPN (those a sync takes)."""
    root = facility.root / "data" / beamline / epn
    return {
        path.relative_to(root).as_posix(): hashlib.new(algorithm, path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink() and wanted(path.relative_to(root).as_posix())
    }


def _bag_info(folder):
    info = {}
    for line in (folder / "bag-info.txt").read_text().splitlines():
        label, _, value = line.partition(": ")
        info.setdefault(label, []).append(value)
    return info


def test_a_synced_epn_is_a_valid_bag_whose_manifest_is_rsyncs_checksums(facility):
    facility.add_experiment(
        "mx", "12282a", equipment_id=23, data_scientists=[("Ada", "Lovelace", "ada@uni.example.edu")], **ENDED
    )
    config = facility.write_config()

    mxsync("--config", config, "--execute", "--once", check=0)

    folder = _folder(facility)
    assert recorded(config) == {"12282a"}
    bagit.Bag(str(folder)).validate()  # the Library of Congress's own validation, every checksum
    assert _manifest(folder) == _source_digests(facility, "12282a")
    info = _bag_info(folder)
    assert info["EPN"] == ["12282a"] and info["Project"] == ["ny79"] and info["Beamline"] == ["mx"]
    assert info["Principal-Scientist"] == ["Rosalind Franklin <rosalind.franklin@uni.example.edu>"]
    assert info["Data-Scientist"] == ["Ada Lovelace <ada@uni.example.edu>"]
    assert info["Source-Path"] == [f"{facility.root}/data/mx/12282a"]
    assert info["Visit-Start"][0].startswith(ENDED["start"].date().isoformat()) and info["Visit-End"]
    files = len(_manifest(folder))
    assert info["Payload-Oxum"] == [
        f"{sum(p.stat().st_size for p in (folder / 'data').rglob('*') if p.is_file())}.{files}"
    ]
    # Every checksum came from rsync: nothing was read again here.
    assert f"12282a: bagged {files} files in" in sync_log(facility)
    assert f"sha1 ({files} checksums from rsync, 0 files hashed here, 0 B)" in sync_log(facility)
    assert sorted(path.name for path in folder.iterdir()) == [
        "bag-info.txt",
        "bagit.txt",
        "data",
        "manifest-sha1.txt",
        "tagmanifest-sha1.txt",
    ]


def test_verify_names_a_flipped_byte_and_fast_checks_only_sizes(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)
    mxsync("verify", "--config", config, "12282a", check=0)

    frame = next((_folder(facility) / "data" / "frames").glob("*.cbf"))
    content = bytearray(frame.read_bytes())
    content[100] ^= 0xFF  # same size, one bit pattern changed: what a size check cannot see
    frame.write_bytes(bytes(content))

    result = mxsync("verify", "--config", config, "12282a", check=1)
    assert f"data/frames/{frame.name}: " in result.stdout and "changed" in result.stdout
    assert "1 EPN(s): 0 valid" in result.stdout
    assert mxsync("verify", "--config", config, "--all", check=1).stdout.count(frame.name) == 1
    assert (
        "12282a: valid (sizes and counts only)"
        in mxsync("verify", "--config", config, "--fast", "12282a", check=0).stdout
    )


def test_verify_reports_a_removed_and_an_added_file_both(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)
    data = _folder(facility) / "data"
    removed = next((data / "frames").glob("*.cbf"))
    removed.unlink()
    (data / "frames" / "stray.cbf").write_bytes(b"not from the facility")

    for arguments in ([], ["--fast"]):
        output = mxsync("verify", "--config", config, "12282a", *arguments, check=1).stdout
        assert f"data/frames/{removed.name}: missing" in output
        assert "data/frames/stray.cbf" in output


def test_a_resumed_partial_file_gets_the_checksum_of_the_whole_file(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, frames=3, frame_size=1024 * 1024, **ENDED)
    config = facility.write_config(rsync_bwlimit="512")  # several seconds a frame
    log_file = facility.workdir / "log" / "sync.log"
    process = subprocess.Popen(MXSYNC + ["--config", str(config), "--execute", "--once"])
    _wait_for(lambda: log_file.exists() and "12282a: started" in log_file.read_text(), process)
    time.sleep(2.5)  # the first frame is half sent
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert recorded(config) == set()
    partial = [path for path in (_folder(facility) / "data").rglob(".*") if path.is_file()]
    assert partial, "rsync --partial kept nothing to resume from; the test needs a slower transfer"

    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)

    folder = _folder(facility)
    assert _manifest(folder) == _source_digests(facility, "12282a")
    bagit.Bag(str(folder)).validate()


def test_live_passes_do_not_bag_and_their_checksums_serve_the_final_pass(facility):
    now = datetime.now(timezone.utc)
    facility.add_experiment(
        "mx", "12282a", equipment_id=23, start=now - timedelta(hours=2), end=now + timedelta(hours=2)
    )
    visit = facility.portal._visits[23][-1]
    config = facility.write_config(settle_minutes=0)

    mxsync("--config", config, "--execute", "--once", check=0)
    assert "live pass done" in sync_log(facility)
    assert not (_folder(facility) / "bagit.txt").exists() and recorded(config) == set()

    visit["end_time"] = _iso(now - timedelta(minutes=5))  # the visit is over
    (facility.root / "data" / "mx" / "12282a" / "frames" / "late.cbf").write_bytes(b"written after the live pass")
    mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a"}
    folder = _folder(facility)
    bagit.Bag(str(folder)).validate()
    assert _manifest(folder) == _source_digests(facility, "12282a")
    files = len(_manifest(folder))
    # The live pass's files were not read again: their checksums were kept from rsync.
    assert f"({files} checksums from rsync, 0 files hashed here" in sync_log(facility)


def test_an_epn_synced_again_after_its_removal_from_ignore_yml_gets_a_fresh_bag(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)
    (facility.root / "data" / "mx" / "12282a" / "frames" / "reprocessed.cbf").write_bytes(b"new at the facility")
    ignore = ignore_path(config)
    content = yaml.safe_load(ignore.read_text())
    content["previouslySynched"] = []
    ignore.write_text(yaml.safe_dump(content))

    mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a"}
    folder = _folder(facility)
    assert "frames/reprocessed.cbf" in _manifest(folder)
    assert _manifest(folder) == _source_digests(facility, "12282a")
    bagit.Bag(str(folder)).validate()


def test_md5_is_used_when_configured_and_a_bag_of_another_algorithm_is_set_aside(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(bag_algorithm="md5")
    mxsync("--config", config, "--execute", "--once", check=0)
    folder = _folder(facility)
    assert _manifest(folder, "md5") == _source_digests(facility, "12282a", "md5")
    assert not (folder / "manifest-sha1.txt").exists()
    bagit.Bag(str(folder)).validate()
    assert "--checksum-choice=md5" in sync_log(facility)
    assert f"md5 ({len(_manifest(folder, 'md5'))} checksums from rsync, 0 files hashed here" in sync_log(facility)

    # Synced again (taken out of ignore.yml) with sha1: nothing to transfer, so every file is hashed here.
    ignore = ignore_path(config)
    ignore.write_text(yaml.safe_dump({**yaml.safe_load(ignore.read_text()), "previouslySynched": []}))
    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)
    assert _manifest(folder) == _source_digests(facility, "12282a")
    assert (folder / "manifest-md5.txt.set-aside").exists() and not (folder / "manifest-md5.txt").exists()
    bagit.Bag(str(folder)).validate()


def test_a_users_checksum_choice_makes_the_bag_hash_here(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(rsync_options=["--checksum-choice=xxh128"])
    result = mxsync("--config", config, "--execute", "--once", check=0)
    assert "--checksum-choice is set" in sync_log(facility) + result.stderr
    folder = _folder(facility)
    assert _manifest(folder) == _source_digests(facility, "12282a")
    bagit.Bag(str(folder)).validate()
    files = len(_manifest(folder))
    assert f"sha1 (0 checksums from rsync, {files} files hashed here" in sync_log(facility)


def test_bag_false_leaves_nothing_beside_data_and_verify_bag_bags_it_later(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(bag=False)
    mxsync("--config", config, "--execute", "--once", check=0)
    folder = _folder(facility)
    assert recorded(config) == {"12282a"}
    assert [path.name for path in folder.iterdir()] == ["data"]
    assert "--checksum-choice" not in sync_log(facility)

    config = facility.write_config()  # bags turned on: older records are bagged by hand
    output = mxsync("verify", "--config", config, "12282a", check=1).stdout
    assert "12282a: not a bag yet" in output
    output = mxsync("verify", "--config", config, "--bag", check=0).stdout
    assert re.search(r"12282a: bagged \d+ files in .* sha1 \(0 checksums from rsync, \d+ files hashed here", output)
    bagit.Bag(str(folder)).validate()
    assert _manifest(folder) == _source_digests(facility, "12282a")
    assert _bag_info(folder)["EPN"] == ["12282a"]
    mxsync("verify", "--config", config, "--all", check=0)


def test_verify_usage_errors_are_one_line_and_exit_2(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    for arguments, message in (
        ([], "name the EPNs to verify, or pass --all"),
        (["12282a", "--all"], "not both"),
        (["../etc"], "is not an EPN"),
    ):
        result = mxsync("verify", "--config", config, *arguments, check=2)
        assert message in result.stderr and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    result = mxsync("verify", "--config", config, "12282b", check=1)
    assert "12282b: no folder" in result.stdout


@pytest.mark.parametrize(
    "name, bagit_reads_it", [("with space.cbf", True), ("zoë-ångström.cbf", True), ("100%.cbf", False)]
)
def test_unusual_names_are_bagged_and_verified(facility, name, bagit_reads_it):
    experiment = facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    (experiment / "frames" / name).write_bytes(b"frame")
    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)
    folder = _folder(facility)
    assert _manifest(folder) == _source_digests(facility, "12282a")
    mxsync("verify", "--config", config, "12282a", check=0)
    if bagit_reads_it:
        bagit.Bag(str(folder)).validate()
    else:  # the bagit package never decodes %25: the log names the file for staff using other tools
        assert "file name(s) that the bagit package cannot read back (first: 'frames/100%.cbf')" in sync_log(facility)
