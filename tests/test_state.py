"""ignore.yml and the state stores: old formats load, corrupt files are refused and left byte for byte."""

import multiprocessing
import os

import pytest

from mxsync.errors import LockHeldError, StateFileError
from mxsync.state import IgnoreFile, InstanceLock, JsonStore


@pytest.mark.parametrize(
    "text, expected",
    [
        ("previouslySynched: [12282a, 12283b]\n", {"12282a", "12283b"}),
        ("previouslySynched:\n- 12282a\n- 12283\n", {"12282a", "12283"}),
        ("", set()),
        ("previouslySynched: null\n", set()),
        ("previouslySynched: []\n", set()),
    ],
)
def test_old_formats_load(tmp_path, text, expected):
    path = tmp_path / "ignore.yml"
    path.write_text(text)
    assert IgnoreFile(path).load() == expected


def test_missing_file_is_empty(tmp_path):
    assert IgnoreFile(tmp_path / "ignore.yml").load() == set()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("previouslySynched: [12282a\n", "not valid YAML"),
        ("synched: [12282a]\n", "expected only the key 'previouslySynched'"),
        ("previouslySynched: 12282a\n", "must be a list"),
        ("previouslySynched: [{a: 1}]\n", "not an EPN"),
        ("- 12282a\n", "expected only the key"),
    ],
)
def test_corrupt_file_is_refused_and_never_overwritten(tmp_path, text, expected):
    path = tmp_path / "ignore.yml"
    path.write_text(text)
    record = IgnoreFile(path)
    with pytest.raises(StateFileError, match=expected) as raised:
        record.add(["99999a"])
    assert str(path) in str(raised.value)
    assert path.read_text() == text


def test_add_rereads_and_keeps_hand_edits(tmp_path):
    path = tmp_path / "ignore.yml"
    record = IgnoreFile(path)
    record.add(["12282a"])
    # A member of staff edits the file by hand meanwhile: adds one EPN and removes another to force a re-sync.
    path.write_text("previouslySynched: [12282a, 55555a]\n")
    record.add(["12283a"])
    assert record.load() == {"12282a", "55555a", "12283a"}
    path.write_text("previouslySynched: [55555a, 12283a]\n")
    record.add(["77777a"])
    assert record.load() == {"55555a", "12283a", "77777a"}


def test_add_preserves_mode_and_writes_sorted_old_format(tmp_path):
    path = tmp_path / "ignore.yml"
    path.write_text("previouslySynched: [b2a]\n")
    path.chmod(0o640)
    IgnoreFile(path).add(["12283a", "12282a"])
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    text = path.read_text()
    assert text.index("12282a") < text.index("12283a") < text.index("b2a")
    assert "previouslySynched:" in text
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def _add_many(path, prefix, count):
    record = IgnoreFile(path)
    for number in range(count):
        record.add([f"{prefix}{number}a"])


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "ignore.yml"
    workers = [multiprocessing.Process(target=_add_many, args=(path, prefix, 40)) for prefix in ("1", "2", "3")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(IgnoreFile(path).load()) == 120


def test_json_store_round_trip_and_corruption(tmp_path):
    store = JsonStore(tmp_path / "state.json", "test history")
    assert store.load() == {}
    store.save({"a": 1})
    assert store.load() == {"a": 1}
    (tmp_path / "state.json").write_text("{trunc")
    with pytest.raises(StateFileError, match="test history is corrupt"):
        store.load()


def _hold_lock(path, ready, release):
    with InstanceLock(path):
        ready.set()
        release.wait(10)


def test_instance_lock_names_its_holder(tmp_path):
    path = tmp_path / "mxsync.lock"
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        assert InstanceLock(path).is_held_elsewhere()
        with pytest.raises(LockHeldError, match=f"pid {holder.pid} on"):
            InstanceLock(path).acquire()
    finally:
        release.set()
        holder.join()
    with InstanceLock(path):
        pass


@pytest.mark.parametrize(
    "epns",
    [
        {"12282a", "9a", "123456789012abcd"},
        {"12282a", "0123a"},  # a leading zero takes the YAML path
        {"12282"},  # a bare number (hand-written) must stay quoted
    ],
)
def test_fast_rendering_matches_yaml_and_round_trips(tmp_path, epns):
    import yaml

    from mxsync.state import IGNORE_HEADER, IGNORE_KEY

    text = IgnoreFile.render(epns)
    assert text == IGNORE_HEADER + yaml.safe_dump({IGNORE_KEY: sorted(epns)}, default_flow_style=False)
    path = tmp_path / "ignore.yml"
    path.write_text(text)
    assert IgnoreFile(path).load() == epns == {str(entry) for entry in yaml.safe_load(text)[IGNORE_KEY]}
