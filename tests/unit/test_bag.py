"""BagIt bags on their own (mxsync.bag): written bags pass the real `bagit` package, verify_bag finds every problem."""

import hashlib
import logging
import os
import stat
import tempfile
import threading
from contextlib import contextmanager

import bagit
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxsync import bag
from mxsync.bag import (
    ALGORITHMS,
    bagit_cannot_read,
    decode_path,
    encode_path,
    file_stamp,
    hash_file,
    parse_manifest,
    payload_entries,
    verify_bag,
    write_bag,
)
from mxsync.errors import BagError, TransferStopped

INFO = [("Source-Organization", "Australian Synchrotron"), ("External-Identifier", "12282a")]
BIG = 2 * bag.CHUNK_SIZE + 12345  # spans three reads


@contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def make_payload(bag_dir, files):
    """Create bag_dir/data with {relative path (str or bytes): content bytes}; return bag_dir."""
    data = os.path.join(os.fsencode(bag_dir), b"data")
    os.makedirs(data, exist_ok=True)
    for name, content in files.items():
        path = os.path.join(data, os.fsencode(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(content)
    return bag_dir


def bag_up(bag_dir, algorithm="sha256", info=INFO):
    entries, _files, _bytes = payload_entries(bag_dir, algorithm)
    write_bag(bag_dir, entries, info, algorithm)
    return entries


def bagit_problems(bag_dir, **options):
    """What the Library of Congress package says of the bag: None when valid."""
    try:
        bagit.Bag(str(bag_dir)).validate(**options)
    except (bagit.BagError, UnicodeDecodeError, OSError) as error:
        return str(error)
    return None


PAYLOAD = {
    "a.cbf": b"frame one",
    "empty": b"",
    "sub/deeper/b.h5": bytes(range(256)) * 7,
    "big.bin": os.urandom(BIG),
}


# ---------------------------------------------------------------- written bags are valid bags


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_written_bag_passes_the_bagit_package_and_our_own_verify(tmp_path, algorithm):
    make_payload(tmp_path, PAYLOAD)
    entries = bag_up(tmp_path, algorithm)

    assert bagit_problems(tmp_path) is None
    assert bagit_problems(tmp_path, fast=True) is None
    assert verify_bag(tmp_path) == [] and verify_bag(tmp_path, fast=True) == []
    read = bagit.Bag(str(tmp_path))
    assert read.algorithms == [algorithm]  # one manifest and one tag manifest, of our algorithm
    assert read.info["Payload-Oxum"] == f"{sum(map(len, PAYLOAD.values()))}.{len(PAYLOAD)}"
    assert read.info["External-Identifier"] == "12282a" and read.info["Bagging-Date"]
    assert (tmp_path / "bagit.txt").read_bytes() == b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
    assert [entry[0] for entry in entries] == sorted(os.fsencode(name) for name in PAYLOAD)
    assert {(entry[0], entry[1]) for entry in entries} == {(os.fsencode(k), len(v)) for k, v in PAYLOAD.items()}
    assert {name for name in os.listdir(tmp_path)} == {
        "data",
        "bagit.txt",
        "bag-info.txt",
        f"manifest-{algorithm}.txt",
        f"tagmanifest-{algorithm}.txt",
    }  # no temporary file left


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_manifest_digests_equal_an_independent_hash_of_each_file(tmp_path, algorithm):
    make_payload(tmp_path, PAYLOAD)
    bag_up(tmp_path, algorithm)

    lines = (tmp_path / f"manifest-{algorithm}.txt").read_text().splitlines()
    manifest = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}
    expected = {f"data/{name}": hashlib.new(algorithm, content).hexdigest() for name, content in PAYLOAD.items()}
    assert manifest == expected
    assert hash_file(tmp_path / "data" / "big.bin", algorithm) == expected["data/big.bin"]


def test_hash_file_reports_progress_per_chunk_and_does_not_follow_a_link(tmp_path):
    make_payload(tmp_path, {"big.bin": b"x" * BIG})
    counts = []
    hash_file(tmp_path / "data" / "big.bin", "md5", progress=counts.append)
    assert counts == [bag.CHUNK_SIZE, bag.CHUNK_SIZE, 12345]

    os.symlink("big.bin", tmp_path / "data" / "link")
    with pytest.raises(BagError, match="link: cannot be hashed"):
        hash_file(tmp_path / "data" / "link", "md5")
    with pytest.raises(ValueError, match="unsupported"):
        hash_file(tmp_path / "data" / "big.bin", "crc32")


def test_bag_files_are_0664_less_the_umask_or_exactly_the_mode_asked_for(tmp_path):
    make_payload(tmp_path, {"a": b"1"})
    entries, _, _ = payload_entries(tmp_path, "md5")
    with umask(0o027):
        write_bag(tmp_path, entries, INFO, "md5")
    assert stat.S_IMODE(os.stat(tmp_path / "manifest-md5.txt").st_mode) == 0o640
    write_bag(tmp_path, entries, INFO, "md5", mode=0o664)
    for name in ("bagit.txt", "bag-info.txt", "manifest-md5.txt", "tagmanifest-md5.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o664


# ---------------------------------------------------------------- verify finds every problem


def test_one_flipped_byte_is_named_by_a_full_verify_and_passes_a_fast_one(tmp_path):
    make_payload(tmp_path, PAYLOAD)
    bag_up(tmp_path, "md5")
    path = tmp_path / "data" / "sub" / "deeper" / "b.h5"
    content = bytearray(path.read_bytes())
    content[100] ^= 0x01
    path.write_bytes(bytes(content))

    problems = verify_bag(tmp_path)
    expected = hashlib.md5(PAYLOAD["sub/deeper/b.h5"]).hexdigest()
    assert problems == [f"data/sub/deeper/b.h5: changed (md5 {expected} != {hashlib.md5(content).hexdigest()})"]
    assert verify_bag(tmp_path, fast=True) == []
    assert bagit_problems(tmp_path) is not None and bagit_problems(tmp_path, fast=True) is None


def test_a_removed_an_added_and_a_changed_file_are_all_reported_with_the_oxum(tmp_path):
    make_payload(tmp_path, {"keep": b"k", "gone": b"gone", "changed": b"before"})
    bag_up(tmp_path)
    os.unlink(tmp_path / "data" / "gone")
    make_payload(tmp_path, {"new/added": b"added!", "changed": b"after!"})

    problems = verify_bag(tmp_path)
    assert problems[0] == "Payload-Oxum mismatch: bag-info.txt says 11.3 (bytes.files), data/ holds 13.3"
    assert problems[1].startswith("data/changed: changed (sha256 ")
    assert problems[2:] == ["data/gone: missing", "data/new/added: not in the manifest"]
    fast = verify_bag(tmp_path, fast=True)
    assert fast == [problems[0], "data/gone: missing", "data/new/added: not in the manifest"]


def test_tag_files_changed_after_bagging_are_reported_by_the_tag_manifest(tmp_path):
    make_payload(tmp_path, {"a": b"1"})
    bag_up(tmp_path, "sha1")
    with open(tmp_path / "bag-info.txt", "a") as handle:
        handle.write("Internal-Sender-Description: edited by hand\n")
    os.unlink(tmp_path / "bagit.txt")
    (tmp_path / "bagit.txt").write_text("BagIt-Version: 1.0\r\nTag-File-Character-Encoding: UTF-8\r\n")

    problems = verify_bag(tmp_path)
    assert [problem.split(" (")[0] for problem in problems] == [
        "tagmanifest-sha1.txt: bag-info.txt: changed",
        "tagmanifest-sha1.txt: bagit.txt: changed",
    ]
    assert verify_bag(tmp_path, fast=True) == []  # fast hashes nothing, tag files included


def test_a_folder_without_bagit_txt_is_not_a_bag(tmp_path):
    make_payload(tmp_path, {"a": b"1"})
    assert verify_bag(tmp_path) == ["not a bag: no bagit.txt"]
    assert verify_bag(tmp_path / "absent") == ["not a bag: no bagit.txt"]


def test_broken_manifests_and_tag_files_are_reported_not_raised(tmp_path):
    make_payload(tmp_path, {"a": b"1", "b": b"2"})
    entries = bag_up(tmp_path, "md5")
    digest = entries[0][2]
    (tmp_path / "manifest-md5.txt").write_text(
        f"{digest}  data/a\nnot a line\n{digest}  data/../../etc/passwd\n{digest}  data/a\n{digest}  bag-info.txt\n"
    )
    problems = verify_bag(tmp_path)
    assert problems[:4] == [
        "manifest-md5.txt line 2: not '<md5 digest> <path>'",
        "manifest-md5.txt line 3: path data/../../etc/passwd is outside data/",
        "manifest-md5.txt line 4: data/a listed twice",
        "manifest-md5.txt line 5: path bag-info.txt is outside data/",
    ]
    assert problems[4].startswith("tagmanifest-md5.txt: manifest-md5.txt: changed")
    assert problems[5:] == ["data/b: not in the manifest"]

    (tmp_path / "bagit.txt").write_text("BagIt-Version: 1.0\nTag-File-Character-Encoding: ISO-8859-1\n")
    assert verify_bag(tmp_path) == ["bagit.txt: Tag-File-Character-Encoding is 'ISO-8859-1'; only UTF-8 is read"]
    (tmp_path / "bagit.txt").write_text("no colon here\n")
    assert verify_bag(tmp_path)[0].startswith("bagit.txt: unreadable: line 'no colon here' has no ':'")


def test_verify_reads_the_strongest_manifest(tmp_path):
    make_payload(tmp_path, {"a": b"1"})
    bag_up(tmp_path, "md5")
    (tmp_path / "manifest-sha512.txt").write_text(f"{hashlib.sha512(b'other').hexdigest()}  data/a\n")
    assert verify_bag(tmp_path) == [
        f"data/a: changed (sha512 {hashlib.sha512(b'other').hexdigest()} != {hashlib.sha512(b'1').hexdigest()})"
    ]


# ---------------------------------------------------------------- known digests


def test_known_digests_are_reused_only_when_size_and_stamp_both_match(tmp_path):
    make_payload(tmp_path, {"a": b"aaaa", "b": b"bbbb", "c": b"cccc"})
    data = tmp_path / "data"
    entries, files, nbytes = payload_entries(tmp_path, "sha256")
    assert (files, nbytes) == (3, 12)

    def known_now(digests):
        return {os.fsencode(n): (os.lstat(data / n).st_size, file_stamp(os.lstat(data / n)), d) for n, d in digests}

    # A digest nobody computed proves that it is reused, not recomputed.
    known = known_now([("a", "f" * 64), ("b", "e" * 64), ("c", "d" * 64)])
    entries, files, nbytes = payload_entries(tmp_path, "sha256", known=known)
    assert (files, nbytes) == (0, 0)
    assert [entry[2] for entry in entries] == ["f" * 64, "e" * 64, "d" * 64]

    size, stamp, digest = known[b"b"]
    known[b"b"] = (size, (stamp[0] - 1, stamp[1], stamp[2]), digest)  # an older mtime
    known[b"c"] = (size + 1, stamp, digest)  # another size, same stamp
    entries, files, nbytes = payload_entries(tmp_path, "sha256", known=known)
    assert (files, nbytes) == (2, 8)
    assert dict((entry[0], entry[2]) for entry in entries) == {
        b"a": "f" * 64,
        b"b": hashlib.sha256(b"bbbb").hexdigest(),
        b"c": hashlib.sha256(b"cccc").hexdigest(),
    }

    # A file replaced by another with the same size and mtime has another inode or ctime: hashed again.
    known = known_now([("a", "f" * 64)])
    mtime = os.lstat(data / "a").st_mtime_ns
    os.rename(data / "a", tmp_path / "old-a")
    (data / "a").write_bytes(b"AAAA")
    os.utime(data / "a", ns=(mtime, mtime))
    entries, files, _ = payload_entries(tmp_path, "sha256", known=known)
    assert files == 3 and entries[0][2] == hashlib.sha256(b"AAAA").hexdigest()


# ---------------------------------------------------------------- names


# (name, whether bagit 1.9 cannot read it back): the experiment behind bagit_cannot_read.
NAMES = [
    (b"with space", False),
    (b" leading space", False),
    ("unicodé ✓ 日本".encode(), False),
    ("e\u0301 decomposed".encode(), False),
    (b"new\nline", False),
    (b"two\nnew\nlines", False),
    (b"carriage\rreturn", False),
    (b"crlf\r\nin the middle", False),
    (b"ends with newline\n", False),
    (b"back\\slash", False),
    (b"tab\tinside", False),
    (b"control\x01char", False),
    (b"#hash", False),
    (b"~tilde", False),
    (b"colon:name", False),
    (b"sub dir/file name", False),
    (b"percent%sign", True),  # bagit does not decode %25
    (b"literal%25", True),
    (b"literal%0A", True),
    (b"literal%0D", True),
    (b"three\nnew\nlines\n", True),  # bagit decodes only the first two %0A (and %0D)
    (b"three\rreturns\r\r", True),
    (b"trailing space ", True),  # bagit strips the line
    (b"trailing tab\t", True),
    ("trailing nbsp\xa0".encode(), True),
    (b"vertical\x0btab", True),  # bagit splits lines at every str.splitlines break
    (b"form\x0cfeed", True),
    (b"file\x1cseparator", True),
    ("next\x85line".encode(), True),
    ("line\u2028separator".encode(), True),
    (b"latin-1 \xe9t\xe9", True),  # not UTF-8: bagit rejects the whole manifest
]


@pytest.mark.parametrize("name, unreadable", NAMES, ids=[repr(name)[2:-1] for name, _ in NAMES])
def test_every_name_round_trips_through_our_manifest_and_bagit_cannot_read_says_which_bagit_fails(
    tmp_path, name, unreadable
):
    make_payload(tmp_path, {name: b"payload of " + name, "plain": b"plain"})
    entries = bag_up(tmp_path)
    assert name in [entry[0] for entry in entries]
    assert verify_bag(tmp_path) == []
    assert bagit_cannot_read(name) is unreadable
    assert (bagit_problems(tmp_path) is not None) is unreadable

    with open(os.path.join(os.fsencode(tmp_path), b"data", name), "ab") as handle:
        handle.write(b"!")
    problems = verify_bag(tmp_path)
    assert len(problems) == 2 and problems[1].startswith(f"{bag.display_path(name)}: changed (sha256 ")
    assert "\n" not in problems[1] and "\r" not in problems[1]


def test_a_manifest_line_percent_encodes_exactly_cr_lf_and_percent(tmp_path):
    make_payload(tmp_path, {b"a%b\r\nc": b"1"})
    bag_up(tmp_path, "md5")
    line = f"{hashlib.md5(b'1').hexdigest()}  data/a%25b%0D%0Ac\n"
    assert (tmp_path / "manifest-md5.txt").read_bytes() == line.encode()


names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b"/" not in b and b not in (b".", b".."))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_path_encoding_round_trips_and_leaves_no_line_break(path):
    encoded = encode_path(path)
    assert decode_path(encoded) == path
    assert b"\n" not in encoded and b"\r" not in encoded


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(names, min_size=1, max_size=3).map(b"/".join), min_size=1, max_size=5, unique=True))
def test_manifest_lines_written_are_read_back_exactly(paths):
    digest = "0" * 64
    content = b"".join(bag._manifest_line(digest, b"data/" + path) for path in paths)
    digests, problems = parse_manifest(content, "manifest-sha256.txt", payload=True)
    assert problems == [] and digests == {b"data/" + path: digest for path in paths}


def test_bag_info_values_stay_on_one_line_and_bagit_reads_them_back(tmp_path):
    make_payload(tmp_path, {"a": b"1"})
    entries, _, _ = payload_entries(tmp_path, "sha256")
    info = [
        ("Contact-Name", ["Rosalind F", "Max P\nNewline"]),
        ("Source-Path", " /data/12282a\r\n\x00rm -rf\u2028 \x85x\t"),
        ("Bagging-Date", "2024-04-28"),
        ("Payload-Oxum", "1.1"),
        ("Bag-Count", 1),
        ("Visit-End", None),
        ("Contact-Email", [None]),
    ]
    write_bag(tmp_path, entries, info, "sha256")
    assert (tmp_path / "bag-info.txt").read_text() == (
        "Contact-Name: Rosalind F\nContact-Name: Max P Newline\nSource-Path: /data/12282a rm -rf   x\n"
        "Bagging-Date: 2024-04-28\nPayload-Oxum: 1.1\nBag-Count: 1\n"
    )
    read = bagit.Bag(str(tmp_path))
    assert read.info["Contact-Name"] == ["Rosalind F", "Max P Newline"]
    assert read.info["Source-Path"] == "/data/12282a rm -rf   x"
    assert bagit_problems(tmp_path) is None and verify_bag(tmp_path) == []
    for label in ("", "Has: colon", " Padded", "Line\nbreak"):
        with pytest.raises(ValueError, match="label"):
            write_bag(tmp_path, entries, [(label, "x")], "sha256")


# ---------------------------------------------------------------- rewriting


def test_a_rewrite_with_another_algorithm_sets_the_old_manifests_aside(tmp_path):
    make_payload(tmp_path, {"a": b"1", "b": b"2"})
    bag_up(tmp_path, "md5")
    old = {name: (tmp_path / name).read_bytes() for name in ("manifest-md5.txt", "tagmanifest-md5.txt")}
    (tmp_path / "manifest-sha384.txt").write_text("from another tool\n")
    make_payload(tmp_path, {"c": b"3"})

    bag_up(tmp_path, "sha256")
    assert not (tmp_path / "manifest-md5.txt").exists() and not (tmp_path / "tagmanifest-md5.txt").exists()
    assert {name: (tmp_path / f"{name}.set-aside").read_bytes() for name in old} == old
    assert (tmp_path / "manifest-sha384.txt.set-aside").read_text() == "from another tool\n"
    assert bagit_problems(tmp_path) is None and verify_bag(tmp_path) == []

    bag_up(tmp_path, "md5")  # and back: the first set-aside copies are kept, the next get another name
    bag_up(tmp_path, "sha256")
    assert {(tmp_path / f"{name}.set-aside").read_bytes() for name in old} == set(old.values())
    assert (tmp_path / "manifest-md5.txt.set-aside.2").exists()
    assert (tmp_path / "manifest-sha256.txt.set-aside").exists()
    assert bagit_problems(tmp_path) is None and verify_bag(tmp_path) == []


def test_bagit_txt_is_removed_first_and_written_last(tmp_path, monkeypatch):
    make_payload(tmp_path, {"a": b"1"})
    bag_up(tmp_path)
    steps = []
    real_rename, real_unlink = os.rename, os.unlink
    monkeypatch.setattr(
        os, "unlink", lambda path: (steps.append(("unlink", os.path.basename(path))), real_unlink(path))
    )
    monkeypatch.setattr(
        os, "rename", lambda old, new: (steps.append(("rename", os.path.basename(new))), real_rename(old, new))
    )
    bag_up(tmp_path)
    assert steps == [
        ("unlink", b"bagit.txt"),
        ("rename", b"manifest-sha256.txt"),
        ("rename", b"bag-info.txt"),
        ("rename", b"tagmanifest-sha256.txt"),
        ("rename", b"bagit.txt"),
    ]


def test_a_bag_cut_off_before_its_end_has_no_bagit_txt(tmp_path, monkeypatch):
    make_payload(tmp_path, {"a": b"1"})
    bag_up(tmp_path)
    real_rename = os.rename

    def failing_rename(source, target):
        if target.endswith(b"tagmanifest-sha256.txt"):
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", failing_rename)
    make_payload(tmp_path, {"b": b"2"})
    with pytest.raises(BagError, match=r"tagmanifest-sha256.txt: cannot write the bag: No space left on device"):
        bag_up(tmp_path)
    assert verify_bag(tmp_path) == ["not a bag: no bagit.txt"]
    assert sorted(os.listdir(tmp_path)) == ["bag-info.txt", "data", "manifest-sha256.txt", "tagmanifest-sha256.txt"]


def test_a_bag_that_cannot_be_written_raises_bag_error_naming_the_file(tmp_path):
    make_payload(tmp_path, {"a": b"1"})
    (tmp_path / "bag-info.txt").mkdir()
    with pytest.raises(BagError, match=r"bag-info.txt: cannot write the bag: Is a directory"):
        bag_up(tmp_path)
    assert os.listdir(tmp_path / "bag-info.txt") == []


# ---------------------------------------------------------------- links and special files


def test_links_are_never_followed_nor_in_the_payload(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not payload")
    bag_dir = make_payload(tmp_path / "bag", {"real": b"real", "sub/file": b"file"})
    data = bag_dir / "data"
    os.symlink("real", data / "to-file")
    os.symlink(outside, data / "to-folder")
    os.symlink("nowhere", data / "sub" / "dangling")
    os.mkfifo(data / "fifo")  # opening one would block

    skipped = []
    with caplog.at_level(logging.DEBUG, logger="mxsync.bag"):
        entries, files, _ = payload_entries(bag_dir, "sha256", skipped=skipped)
    assert [entry[0] for entry in entries] == [b"real", b"sub/file"] and files == 2
    assert sorted(skipped) == [b"fifo", b"sub/dangling", b"to-file", b"to-folder"]
    assert "data/to-folder: a symbolic link, not in the bag's payload" in caplog.text
    write_bag(bag_dir, entries, INFO, "sha256")
    assert verify_bag(bag_dir) == [] and verify_bag(bag_dir, fast=True) == []
    assert b"secret" not in (bag_dir / "manifest-sha256.txt").read_bytes()

    # A payload file replaced by a link is not read through it.
    os.unlink(data / "real")
    os.symlink(outside / "secret", data / "real")
    assert verify_bag(bag_dir) == [
        "Payload-Oxum mismatch: bag-info.txt says 8.2 (bytes.files), data/ holds 4.1",
        "data/real: not a regular file, not followed",
    ]


def test_a_data_folder_that_is_a_link_is_refused(tmp_path):
    real = make_payload(tmp_path / "elsewhere", {"a": b"1"})
    (tmp_path / "bag").mkdir()
    os.symlink(real / "data", tmp_path / "bag" / "data")
    with pytest.raises(BagError, match="not a folder"):
        payload_entries(tmp_path / "bag", "md5")
    (tmp_path / "bag" / "bagit.txt").write_bytes(bag.BAGIT_TXT)
    assert verify_bag(tmp_path / "bag")[-1].startswith("data/: ")


def test_a_payload_deeper_than_the_recursion_limit_is_walked():
    # Not in tmp_path: pytest removes old temporary folders with a recursive rmtree that this depth breaks, so the
    # tree is taken down here, deepest first, and a leftover (a killed run) would stay out of pytest's way.
    depth = 1100
    bag_dir = tempfile.mkdtemp(prefix="mxsync-deep-bag-")
    folders = [os.path.join(bag_dir, "data")]
    for _ in range(depth):  # os.makedirs itself recurses
        folders.append(os.path.join(folders[-1], "d"))
    leaf = os.path.join(folders[-1], "leaf")
    try:
        for folder in folders:
            os.mkdir(folder)
        with open(leaf, "wb") as handle:
            handle.write(b"leaf")
        entries, _, _ = payload_entries(bag_dir, "md5")
        assert entries == [(b"d/" * depth + b"leaf", 4, hashlib.md5(b"leaf").hexdigest())]
    finally:
        if os.path.exists(leaf):
            os.unlink(leaf)
        for folder in reversed([bag_dir] + folders):
            if os.path.isdir(folder):
                os.rmdir(folder)


# ---------------------------------------------------------------- stopping


def test_a_stop_event_ends_hashing_with_transfer_stopped(tmp_path):
    make_payload(tmp_path, {"big.bin": b"x" * BIG})
    stop = threading.Event()
    chunks = []

    def progress(count):
        chunks.append(count)
        stop.set()  # asked to stop while the file is being read

    with pytest.raises(TransferStopped):
        hash_file(tmp_path / "data" / "big.bin", "sha256", stop=stop, progress=progress)
    assert chunks == [bag.CHUNK_SIZE]
    with pytest.raises(TransferStopped):
        payload_entries(tmp_path, "sha256", stop=stop)
    bag_up(tmp_path)
    with pytest.raises(TransferStopped):
        verify_bag(tmp_path, stop=stop)
    assert verify_bag(tmp_path, fast=True, stop=stop) == []  # nothing to hash, nothing to stop
