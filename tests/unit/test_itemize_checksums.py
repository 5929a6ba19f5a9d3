"""rsync's itemised lines with the whole-file checksum (%C): parsed from the real rsync's output and from odd names."""

import hashlib
import subprocess

import pytest

from mxsync.commands import BASE_OPTIONS, checksum_options
from mxsync.itemize import TransferResult, record_item


def _parse(lines, checksums=True):
    result = TransferResult("12282a", checksums={} if checksums else None)
    for line in lines:
        record_item(result, line, "12282a")
    return result


@pytest.mark.parametrize("algorithm", ["md5", "sha1"])
def test_the_real_rsync_prints_the_checksum_of_each_file_it_sends_and_blanks_for_the_rest(tmp_path, algorithm):
    source, destination = tmp_path / "source", tmp_path / "destination"
    (source / "sub dir").mkdir(parents=True)
    files = {"a.cbf": b"frame" * 1000, "sub dir/b -> c.txt": b"x", "kept.txt": b"same", "newline\nname": b"odd"}
    for name, content in files.items():
        (source / name).write_bytes(content)
    (source / "link").symlink_to("a.cbf")
    destination.mkdir()
    (destination / "kept.txt").write_bytes(b"same")
    subprocess.run(["touch", "-r", str(source / "kept.txt"), str(destination / "kept.txt")], check=True)

    options = [option for option in BASE_OPTIONS if not option.startswith("--chmod")]
    output = subprocess.run(
        ["rsync", *options, *checksum_options(algorithm), f"{source}/", f"{destination}/"],
        check=True,
        capture_output=True,
    ).stdout
    result = _parse(output.splitlines(keepends=True))

    expected = {
        name.encode(): (len(content), hashlib.new(algorithm, content).hexdigest())
        for name, content in files.items()
        if name != "kept.txt"
    }
    assert result.checksums == expected
    assert sorted(name for name, _size in result.files) == sorted(files)
    assert result.links == [("link", "a.cbf")]
    assert result.files_transferred == 3


def test_without_checksums_the_old_format_is_read_as_before():
    result = _parse([b">f+++++++++ 6 a/b.cbf\n", b"cL+++++++++ 1 l -> a\n"], checksums=False)
    assert list(result.files) == [("a/b.cbf", 6)] and result.links == [("l", "a")] and result.checksums is None


def test_a_line_without_the_checksum_field_is_not_taken_for_a_file():
    result = _parse([b">f+++++++++ 6 nochecksum\n"])
    assert len(result.files) == 0 and result.checksums == {}
