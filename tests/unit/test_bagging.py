"""The bag step on its own: which checksums are reused, which algorithm a bag takes, bag-info from a record."""

import hashlib
import os
import threading

import bagit
import pytest

from mxsync.bag import file_stamp
from mxsync.bagging import Bagger, bag_info, make_bag
from mxsync.errors import TransferStopped
from mxsync.itemize import TransferResult

RECORD = {
    "epn": "12282a",
    "project": "ny79",
    "beamline": "mx",
    "visit_start": "2026-10-03T09:00:00+11:00",
    "visit_end": "2026-10-03T17:00:00+11:00",
    "principal": {"name": "Zoë Ångström", "email": "zoe@uni.example.edu"},
    "scientists": [{"name": "Ada Lovelace", "email": None}],
}


class FakeHistory:
    """The two store calls the bag step makes, kept in a dict."""

    def __init__(self):
        self.kept = {}

    def save_checksums(self, epn, algorithm, entries):
        for path, (size, stamp, digest) in entries.items():
            self.kept.setdefault(epn, {})[path] = (size, stamp, algorithm, digest)

    def checksums(self, epn):
        return dict(self.kept.get(epn, {}))


def _epn(tmp_path, files):
    data = tmp_path / "12282a" / "data"
    for name, content in files.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(content)
    return data


def _known(data, algorithm, names):
    return {
        name.encode(): (
            (data / name).stat().st_size,
            file_stamp(os.lstat(data / name)),
            algorithm,
            hashlib.new(algorithm, (data / name).read_bytes()).hexdigest(),
        )
        for name in names
    }


def test_known_checksums_are_reused_and_only_the_rest_hashed(tmp_path):
    data = _epn(tmp_path, {"a": b"1" * 100, "sub/b": b"2" * 200, "c": b"3" * 300})
    figures = make_bag(data.parent, bag_info(RECORD), _known(data, "sha1", ["a", "sub/b"]), preferred="md5")
    assert (figures.algorithm, figures.from_rsync, figures.hashed, figures.hashed_bytes) == ("sha1", 2, 1, 300)
    bagit.Bag(str(data.parent)).validate()


def test_a_file_changed_since_its_checksum_was_taken_is_hashed_again(tmp_path):
    data = _epn(tmp_path, {"a": b"old content"})
    known = _known(data, "sha1", ["a"])
    (data / "a").write_bytes(b"new content")  # same size, new stamp: the kept checksum is stale
    figures = make_bag(data.parent, bag_info(RECORD), known)
    assert figures.hashed == 1
    bagit.Bag(str(data.parent)).validate()  # the manifest holds the new content's checksum


def test_with_nothing_known_the_preferred_algorithm_is_used(tmp_path):
    data = _epn(tmp_path, {"a": b"x"})
    assert make_bag(data.parent, bag_info(RECORD), {}, preferred="md5").algorithm == "md5"
    assert (data.parent / "manifest-md5.txt").exists()


def test_bag_info_holds_the_epn_its_visit_and_people(tmp_path):
    pairs = bag_info(RECORD, "mx-sftp.synchrotron.org.au", "/data/mx/12282a")
    labels = dict(pairs)
    assert labels["EPN"] == "12282a" and labels["Project"] == "ny79" and labels["Beamline"] == "mx"
    assert labels["Principal-Scientist"] == "Zoë Ångström <zoe@uni.example.edu>"
    assert labels["Data-Scientist"] == "Ada Lovelace"
    assert labels["Source-Host"] == "mx-sftp.synchrotron.org.au" and labels["Source-Path"] == "/data/mx/12282a"
    assert labels["Visit-Start"] == RECORD["visit_start"] and labels["Bag-Software-Agent"].startswith("mxsync ")


def test_remember_keeps_rsyncs_checksums_with_the_stamp_and_skips_files_that_are_not_as_reported(tmp_path):
    data = _epn(tmp_path, {"a": b"abc", "b": b"grew since"})
    result = TransferResult("12282a", checksums={b"a": (3, "f" * 40), b"b": (2, "e" * 40), b"gone": (1, "d" * 40)})
    history = FakeHistory()
    bagger = Bagger(None, "sha1", "sha1", history, lambda epn: RECORD, "host", threading.Event())
    folder = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bagger.remember("12282a", folder, result)
    finally:
        os.close(folder)
    assert history.checksums("12282a") == {b"a": (3, file_stamp(os.lstat(data / "a")), "sha1", "f" * 40)}


def test_remember_ignores_a_digest_of_the_wrong_length(tmp_path):
    data = _epn(tmp_path, {"a": b"abc"})
    history = FakeHistory()
    bagger = Bagger(None, "sha1", "sha1", history, lambda epn: RECORD, "host", threading.Event())
    bagger.remember("12282a", str(data), TransferResult("12282a", checksums={b"a": (3, "f" * 32)}))
    assert history.checksums("12282a") == {}


def test_a_stop_ends_the_hashing(tmp_path):
    data = _epn(tmp_path, {"a": b"x" * (3 << 20)})
    stop = threading.Event()
    stop.set()
    with pytest.raises(TransferStopped):
        make_bag(data.parent, bag_info(RECORD), {}, stop=stop)
    assert not (data.parent / "bagit.txt").exists()
