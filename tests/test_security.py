"""Issue 19, item 1: a hostile member of a project's group cannot make mxsync write anywhere else.

A real second account in project ny79's group plants symlinks at the EPN folder, at data/ and inside
data/, before the cycle and racing the transfer, towards project ab12, the state directory and a folder
outside the destination root. Each case runs with the installed rsync and with an older one (Debian 12's
3.2.7, fetched by tests/facility/oldrsync.py), which has none of the receiver's own defences of 3.4+.
The races are timed, not hoped for: a wrapper first on mxsync's PATH holds each transfer's rsync for a few
seconds before it starts (as a slow login would), and the attacker acts while it waits or once a
transfer's first file has arrived. Fast tests of the parts (mxsync.destination, verification) follow.
"""

import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from mxsync.destination import FOLDER_MODE, check_destination_root, writable_destination
from mxsync.errors import UnsafeNameError
from mxsync.itemize import FileList, TransferResult, verify_destination
from mxsync.processes import Finished
from mxsync.rsync import RsyncRunner, _name_open_folder
from tests.conftest import _skip_without_ssh_tools
from tests.facility import Facility
from tests.facility.oldrsync import OldRsyncUnavailable, old_rsync_directory
from tests.test_mxsync import ENDED, MXSYNC, recorded, source_manifest, synced_manifest

ATTACKER = "mxsync-eve"
SERVICE = "mxsync-svc"  # the unprivileged account mxsync runs as, in the project's group as a service account is
PROJECT_GROUP = "mxsync-ny79"  # project ny79's group: the attacker is a member, as every project member is
PROJECT, OTHER_PROJECT, OTHER_EPN = "ny79", "ab12", "13000a"
MARKER = b"planted-by-eve"
MXSYNC_STATE_FILES = {
    "ignore.yml",
    "ignore.yml.lock",
    "mxsync.db",
    "mxsync.db-wal",
    "mxsync.db-shm",
    "mxsync.db.lock",
    "mxsync.lock",
}
HOLD_SECONDS = 3  # how long the wrapper holds a transfer's rsync before it starts
# Run as the attacker with the system's Python (the venv may sit where the attacker cannot reach).
ATTACK = """
import os, sys
action, path, target = sys.argv[1:]
try:
    if action == "mkdir":  # a folder of one's own, open to everyone
        os.mkdir(path)
        os.chmod(path, 0o2777)
    else:
        if action == "swap":  # move the real folder aside and leave a link in its place
            os.rename(path, path + ".moved-by-eve")
        os.symlink(target, path)
except OSError as error:
    print(f"{action} {path}: {error.strerror}")
    sys.exit(1)
print(f"{action} {path}: done")
"""
RSYNC_WRAPPER = """#!/bin/sh
# Hold a transfer (not a listing) for a while, as a slow login or a busy facility host would.
case " $* " in *" --itemize-changes "*) sleep {hold} ;; esac
exec {rsync} "$@"
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the attacker is a second real account, made with useradd, that the test acts as",
)


@dataclass
class Site:
    facility: Facility
    env: dict
    base: Path
    service: object  # the account mxsync runs as (a pwd entry), or None for root

    @property
    def project(self):
        return self.facility.destination / PROJECT

    @property
    def other(self):
        return self.facility.destination / OTHER_PROJECT

    @property
    def state(self):
        return self.facility.workdir / "state"

    @property
    def outside(self):
        return self.facility.workdir / "outside"


@pytest.fixture(scope="module")
def attacker():
    """The attacker's account, a member of project ny79's group (made once, like scripts/test-environments' account)."""
    return _account(ATTACKER)


@pytest.fixture(params=["root", "unprivileged"], ids=["as-root", "as-service-account"])
def service(request):
    """The account mxsync runs as: root, or an unprivileged service account that is also in ny79's group."""
    return None if request.param == "root" else service_account()


def _account(name):
    if _run(["getent", "group", PROJECT_GROUP]).returncode != 0:
        _run(["groupadd", PROJECT_GROUP], check=True)
    if _run(["id", name]).returncode != 0:
        _run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups", PROJECT_GROUP, name],
            check=True,
        )
    return pwd.getpwnam(name)


@pytest.fixture(params=["installed", "older"], ids=["rsync-installed", "rsync-older"])
def rsync_binary(request):
    """The rsync mxsync runs: the installed one, or an older one (skipped, saying why, if none can be fetched)."""
    if request.param == "installed":
        return Path(shutil.which("rsync"))
    try:
        return old_rsync_directory() / "rsync"
    except OldRsyncUnavailable as error:
        pytest.skip(f"no older rsync: {error}")


@pytest.fixture
def site(attacker, service, rsync_binary):
    """A facility the attacker can reach, projects ny79 (theirs) and ab12 (not theirs), and mxsync's PATH."""
    _skip_without_ssh_tools()
    with security_site(service, rsync_binary) as site:
        yield site


@contextlib.contextmanager
def security_site(service, rsync_binary):
    """The site of these tests, for mxsync running as `service` (None: root) with `rsync_binary` (also for bench)."""
    _account(ATTACKER)
    # pytest's own temporary folders are closed to other accounts; the attacker must reach the destination.
    base = Path(tempfile.mkdtemp(prefix="mxsync-security-", dir="/tmp"))
    try:
        base.chmod(0o711)
        with Facility(base / "site") as facility:
            facility.workdir.chmod(0o711)
            facility.destination.chmod(0o711)
            bin_dir = base / "bin"
            bin_dir.mkdir()
            wrapper = bin_dir / "rsync"
            wrapper.write_text(RSYNC_WRAPPER.format(hold=HOLD_SECONDS, rsync=rsync_binary))
            wrapper.chmod(0o755)
            env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
            if service is not None:
                env["HOME"] = str(base)  # ssh looks there, and must find nothing of root's
            site = Site(facility, env, base, service)
            _make_projects(site)
            yield site
    finally:
        shutil.rmtree(base, ignore_errors=True)


def service_account():
    """The unprivileged service account of these tests (a pwd entry), made if missing, able to run this checkout."""
    # It must reach the checkout and its venv (CI clones into a private mktemp folder): let it traverse, not
    # list, every folder above, as scripts/test-environments does for its account.
    for folder in Path(__file__).resolve().parents[1].parents:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
    return _account(SERVICE)


def _make_projects(site):
    # ny79: owned by root (staff), group-writable for the project's members, as project folders are.
    site.project.mkdir(mode=0o700)
    os.chown(site.project, 0, grp.getgrnam(PROJECT_GROUP).gr_gid)
    site.project.chmod(0o2770)
    # ab12: another project's EPN, synced by the service, which the attacker can neither read nor write.
    frames = site.other / OTHER_EPN / "data" / "frames"
    frames.mkdir(parents=True)
    for number in (1, 2, 3):
        (frames / f"{OTHER_EPN}_{number:04d}.cbf").write_bytes(f"project ab12 frame {number}\n".encode() * 100)
    for folder in (site.other, site.other / OTHER_EPN, frames.parent, frames):
        folder.chmod(0o2770)
    for entry in (site.other, *site.other.rglob("*")):
        _service_owns(site, entry)
    # The root stays root's and closed to the service (issue 19, item 4): transfers write only in project folders.
    site.facility.destination.chmod(0o711)
    site.outside.mkdir()
    site.outside.chmod(0o755)
    (site.outside / "keep.txt").write_text("outside the destination root\n")


def _attacker_epn(site, epn, frames=4, frame_size=256 * 1024):
    """The attacker's EPN at the facility, with a frame named like one of ab12's and a file named ignore.yml."""
    experiment = site.facility.add_experiment("mx", epn, equipment_id=23, frames=frames, frame_size=frame_size, **ENDED)
    (experiment / "frames" / f"{OTHER_EPN}_0002.cbf").write_bytes(MARKER + b" overwrote ab12's frame\n")
    (experiment / "ignore.yml").write_bytes(b"# " + MARKER + b"\npreviouslySynched: [12282z]\n")
    return experiment


def _config(site, **overrides):
    config = site.facility.write_config(epn_cap_map={"12282": PROJECT, "13000": OTHER_PROJECT}, **overrides)
    workdir, sshd = site.facility.workdir, site.facility.sshd
    for entry in (config, site.state, workdir / "log", sshd.client_key, sshd.known_hosts):
        _service_owns(site, entry)
    return config


def _service_owns(site, path):
    if site.service is not None:
        os.chown(path, site.service.pw_uid, -1)


def _made_by_the_service(site, folder):
    """Make a folder as an earlier, unfinished transfer left it: the service's, open to the project's group."""
    folder.mkdir()
    folder.chmod(0o2774)
    _service_owns(site, folder)


# ---------------------------------------------------------------- what must not change


def _tree(path, skip=()):
    """Return {relative path: (type, mode, owner, size, sha256 or link target)} under `path`, links not followed."""
    found = {}
    path = Path(path)
    if not path.exists():
        return found
    for directory, folders, files in os.walk(path):
        folders[:] = [name for name in folders if Path(directory, name) not in skip]
        for name in folders + files:
            entry = Path(directory, name)
            if entry in skip:
                continue
            info = entry.lstat()
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(entry.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(entry)
            else:
                content = None
            found[str(entry.relative_to(path))] = (
                stat.S_IFMT(info.st_mode),
                stat.S_IMODE(info.st_mode),
                info.st_uid,
                info.st_size if content else 0,
                content,
            )
    info = path.lstat()
    found["."] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, 0, None)
    return found


def _outside_the_destination(site):
    workdir = site.facility.workdir
    return _tree(workdir, skip=(site.facility.destination, workdir / "log", site.state, workdir / "sshd"))


def _state_folder(site):
    """The state folder's own mode and the names in it (mxsync's files change; nothing else may appear)."""
    return stat.S_IMODE(site.state.lstat().st_mode), sorted(os.listdir(site.state))


def _snapshot(site):
    return {"ab12": _tree(site.other), "outside": _outside_the_destination(site)}


def _assert_nothing_else_changed(site, before, state_before):
    assert sorted(os.listdir(site.facility.destination)) == [OTHER_PROJECT, PROJECT]
    after = _snapshot(site)
    changed = {
        area: sorted(
            name for name in set(before[area]) | set(after[area]) if before[area].get(name) != after[area].get(name)
        )
        for area in before
    }
    assert changed == {"ab12": [], "outside": []}, changed
    mode, names = _state_folder(site)
    assert mode == state_before[0], f"state folder mode {oct(mode)}, was {oct(state_before[0])}"
    assert set(names) <= set(state_before[1]) | MXSYNC_STATE_FILES, names
    for name in names:
        entry = site.state / name
        assert entry.is_file() and not entry.is_symlink() and MARKER not in entry.read_bytes(), name
    assert "12282z" not in recorded(site.facility.workdir / "config.yml")


def _log(site):
    return (site.facility.workdir / "log" / "sync.log").read_text(errors="replace")


def _refused(site, epn, link, why="symlink"):
    """Assert that `epn` was not recorded and that a log line names the link (or the folder) and says `why`."""
    assert epn not in recorded(site.facility.workdir / "config.yml")
    lines = [line for line in _log(site).splitlines() if str(link) in line and why in line]
    assert lines, f"no log line names {link}:\n{_log(site)[-3000:]}"
    assert all("Traceback" not in line for line in lines)


# ---------------------------------------------------------------- the attacker


def _as_account(account):
    """Popen's options to run as `account` (a pwd entry) with its own groups, or as ourselves for None."""
    if account is None:
        return {}
    groups = [group.gr_gid for group in grp.getgrall() if account.pw_name in group.gr_mem]
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": groups}


def _as_attacker(action, path, target):
    """Run one attack step as the attacker's account; return what it printed (it may be refused)."""
    result = subprocess.run(
        ["/usr/bin/python3", "-c", ATTACK, action, str(path), str(target)],
        **_as_account(pwd.getpwnam(ATTACKER)),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )
    return result.stdout.strip() or result.stderr.strip()


def _held_transfer_of(site, epn):
    """True while the wrapper holds (or rsync runs) the transfer of `epn` from this test's facility."""
    source = f":{site.facility.root}/data/mx/{epn}/".encode()  # other tests may run the same EPNs meanwhile
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--itemize-changes" in arguments and any(argument.endswith(source) for argument in arguments):
            return True
    return False


def _run_cycle(site, config, attacks=(), timeout=180):
    """Run one `mxsync --execute --once`; attacks are (ready(), action, path, target), each done once ready."""
    process = subprocess.Popen(
        MXSYNC + ["--config", str(config), "--execute", "--once"],
        **_as_account(site.service),
        env=site.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    pending, done = list(attacks), []
    deadline = time.monotonic() + timeout
    while pending and process.poll() is None and time.monotonic() < deadline:
        for attack in list(pending):
            ready, action, path, target = attack
            if ready():
                done.append(_as_attacker(action, path, target))
                pending.remove(attack)
        time.sleep(0.02)
    _out, err = process.communicate(timeout=max(1, deadline - time.monotonic()))
    assert not pending, f"the cycle ended before these attacks were ready: {pending}"
    assert "Traceback" not in err, err
    return process.returncode, done


# ---------------------------------------------------------------- before the cycle


@needs_root
def test_links_planted_before_the_cycle_redirect_nothing(site):
    for epn in ("12282b", "12282c", "12282d", "12282e", "12282f"):
        _attacker_epn(site, epn)
    site.facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)  # an honest EPN beside them
    config = _config(site)
    for folder in ("12282c", "12282d", "12282d/data", "12282e", "12282f", "12282f/data"):
        _made_by_the_service(site, site.project / folder)
    other_data = site.other / OTHER_EPN / "data"
    attacks = [
        _as_attacker("link", site.project / "12282b", site.other / OTHER_EPN),  # (a) the EPN folder
        _as_attacker("link", site.project / "12282c" / "data", other_data),  # (b) data/
        _as_attacker("link", site.project / "12282d" / "data" / "frames", other_data / "frames"),  # (c) inside data/
        _as_attacker("link", site.project / "12282e" / "data", site.state),  # (d) data/ to the state folder
        # A folder of the attacker's own, which they could open to anyone, and swap what is in it, while rsync runs.
        _as_attacker("mkdir", site.project / "12282f" / "data" / "frames", ""),
    ]
    assert all(line.endswith("done") for line in attacks), attacks
    before, state_before = _snapshot(site), _state_folder(site)

    returncode, _ = _run_cycle(site, config)

    assert returncode == 1
    _assert_nothing_else_changed(site, before, state_before)
    _refused(site, "12282b", site.project / "12282b")
    _refused(site, "12282c", site.project / "12282c" / "data")
    _refused(site, "12282e", site.project / "12282e" / "data")
    _refused(site, "12282f", site.project / "12282f" / "data" / "frames", f"belongs to {ATTACKER}")
    # A link inside data/ is replaced by the real folder, as rsync does (-K is never given): nothing went through it.
    assert not (site.project / "12282d" / "data" / "frames").is_symlink()
    assert recorded(config) >= {"12282a", "12282d"}
    for epn in ("12282a", "12282d"):
        assert synced_manifest(site.facility, PROJECT, epn) == source_manifest(site.facility, epn)


# ---------------------------------------------------------------- racing the cycle


@needs_root
def test_links_planted_while_the_transfer_starts_redirect_nothing(site):
    """The folders are made and checked, then swapped for links before rsync opens them."""
    for epn in ("12282b", "12282c", "12282e"):
        _attacker_epn(site, epn)
    config = _config(site, max_tasks=3)
    other_epn = site.other / OTHER_EPN
    attacks = [
        (lambda: _held_transfer_of(site, "12282b"), "swap", site.project / "12282b", other_epn),  # (a)
        (
            lambda: _held_transfer_of(site, "12282c"),
            "swap",
            site.project / "12282c" / "data",
            other_epn / "data",
        ),  # (b)
        (lambda: _held_transfer_of(site, "12282e"), "swap", site.project / "12282e" / "data", site.state),  # (d)
    ]
    before, state_before = _snapshot(site), _state_folder(site)

    returncode, done = _run_cycle(site, config, attacks)

    assert all(line.endswith("done") for line in done), done  # the project's members may rename their folders
    assert returncode == 1
    _assert_nothing_else_changed(site, before, state_before)
    _refused(site, "12282b", site.project / "12282b")
    _refused(site, "12282c", site.project / "12282c" / "data")
    _refused(site, "12282e", site.project / "12282e" / "data")


@needs_root
def test_link_planted_inside_data_during_the_transfer_redirects_nothing(site):
    """(c) racing: once the first frame has arrived, data/frames is swapped for a link into project ab12."""
    _attacker_epn(site, "12282d", frames=8)
    config = _config(site, rsync_bwlimit="512")  # about half a second a frame
    frames = site.project / "12282d" / "data" / "frames"
    first_frame = frames / "12282d_0001.cbf"
    attacks = [(first_frame.exists, "swap", frames, site.other / OTHER_EPN / "data" / "frames")]
    before, state_before = _snapshot(site), _state_folder(site)

    returncode, done = _run_cycle(site, config, attacks)

    _assert_nothing_else_changed(site, before, state_before)
    # The folders stay closed to the group while rsync runs: the swap is refused and the EPN arrives whole.
    assert done == [f"swap {frames}: Permission denied"], done
    assert returncode == 0, _log(site)[-3000:]
    assert recorded(config) == {"12282d"}
    assert synced_manifest(site.facility, PROJECT, "12282d") == source_manifest(site.facility, "12282d")
    # ... and open to it again afterwards, as rsync's --chmod=Dg+s,ug+w leaves them.
    for folder in (frames.parent, frames):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o2070 == 0o2070, oct(folder.stat().st_mode)


def _run(arguments, check=False):
    return subprocess.run(arguments, capture_output=True, text=True, check=check)


# ---------------------------------------------------------------- the parts, fast


def _folders(tmp_path):
    config = SimpleNamespace(destination_root=tmp_path / "root")
    config.destination_root.mkdir()
    return config, config.destination_root / PROJECT / "12282a" / "data"


def _group_writable(path):
    return bool(os.lstat(path).st_mode & stat.S_IWGRP)


def test_folders_are_closed_to_the_group_while_rsync_writes_and_open_afterwards(tmp_path):
    config, data = _folders(tmp_path)
    (data / "frames" / "sub").mkdir(parents=True)
    for folder in (data, data / "frames", data / "frames" / "sub"):
        folder.chmod(0o2774)  # as a finished transfer leaves them
    (data / "link").symlink_to("frames")

    with writable_destination(config, data) as folder:
        assert os.path.samefile(f"/proc/self/fd/{folder}", data)
        assert not any(_group_writable(path) for path in (data, data / "frames", data / "frames" / "sub"))
        (Path(f"/proc/self/fd/{folder}") / "frames" / "new").mkdir(mode=0o750)  # as rsync would, during the run

    assert all(
        _group_writable(path) for path in (data, data / "frames", data / "frames" / "sub", data / "frames" / "new")
    )
    assert (data / "link").is_symlink()


def test_new_folders_get_the_mode_rsync_gives_folders(tmp_path):
    config, data = _folders(tmp_path)
    with writable_destination(config, data):
        assert stat.S_IMODE(data.stat().st_mode) == FOLDER_MODE & ~0o020  # rsync writes into it: closed
    modes = [stat.S_IMODE(folder.stat().st_mode) for folder in (data.parent.parent, data.parent, data)]
    assert modes == [FOLDER_MODE] * 3


@pytest.mark.parametrize("where", ["epn", "data"])
def test_a_symlink_on_the_way_is_refused_naming_it_and_nothing_is_written_behind_it(tmp_path, where):
    config, data = _folders(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = data.parent if where == "epn" else data
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere)

    with pytest.raises(UnsafeNameError, match=f"^{link} is a symlink to {elsewhere}; refusing"):
        with writable_destination(config, data):
            pass
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("where", ["epn", "data"])
def test_a_folder_swapped_for_a_symlink_while_rsync_writes_is_refused_and_nothing_went_through(tmp_path, where):
    config, data = _folders(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    swapped = data.parent if where == "epn" else data

    with pytest.raises(UnsafeNameError, match=f"^{swapped} is a symlink to {elsewhere}; it replaced the folder"):
        with writable_destination(config, data) as folder:
            swapped.rename(swapped.with_name("moved"))
            swapped.symlink_to(elsewhere)
            (Path(f"/proc/self/fd/{folder}") / "frame.cbf").write_bytes(b"x")
    assert list(elsewhere.iterdir()) == []
    assert (swapped.with_name("moved") / ("data/frame.cbf" if where == "epn" else "frame.cbf")).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another account")
def test_a_folder_of_someone_elses_is_refused_naming_its_owner(tmp_path):
    config, data = _folders(tmp_path)
    (data / "frames").mkdir(parents=True)
    os.chown(data / "frames", 65534, -1)

    with pytest.raises(UnsafeNameError, match=f"^{data / 'frames'} belongs to {pwd.getpwuid(65534).pw_name}, not to"):
        with writable_destination(config, data):
            pass
    assert _group_writable(data)  # what it closed, it opened again


def test_rsync_is_given_the_open_folder_and_inherits_it():
    runner = RsyncRunner(
        SimpleNamespace(
            rsync_io_timeout=0,
            rsync_bwlimit=None,
            rsync_options=(),
            port=22,
            known_hosts=None,
            key_file=None,
            ssh_connect_timeout=30,
            ssh_keepalive_interval=0,
            ssh_cipher=None,
            ssh_target="u@h",
            rsync_checksum="md5",
        )
    )
    assert runner.rsync_arguments("/data/12282a", 7)[-2:] == ["u@h:/data/12282a/", "/proc/self/fd/7/"]
    assert runner.rsync_arguments("/data/12282a", Path("/dest/ny79/12282a/data"))[-1] == "/dest/ny79/12282a/data/"
    assert "--chmod=Dg+s,Du+w,Dg-w,Fug+w,o-wx,ug+X" in runner.rsync_arguments("/data/12282a", 7)


def test_rsync_messages_name_the_folder_not_its_descriptor(tmp_path):
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tail = [f'rsync: [receiver] mkstemp "/proc/self/fd/{folder}/frames/.a.cbf.Xy" failed: No space left on device']
        finished = _name_open_folder(Finished(11, tail, False), folder)
    finally:
        os.close(folder)
    assert finished.stderr_tail == [
        f'rsync: [receiver] mkstemp "{tmp_path}/frames/.a.cbf.Xy" failed: No space left on device'
    ]


def test_verification_follows_no_symlink(tmp_path):
    """A link planted where a file or folder should be never makes an incomplete EPN look complete."""
    copy = tmp_path / "copy"  # a complete copy somewhere else, e.g. another project's
    (copy / "frames").mkdir(parents=True)
    (copy / "frames" / "a.cbf").write_bytes(b"12345")
    (copy / "b.cbf").write_bytes(b"123")
    data = tmp_path / "epn" / "data"
    data.mkdir(parents=True)
    (data / "frames").symlink_to(copy / "frames")
    (data / "b.cbf").symlink_to(copy / "b.cbf")
    result = TransferResult("12282a", files=FileList([("frames/a.cbf", 5), ("b.cbf", 3)]), links=[("frames/l", "a")])
    assert verify_destination(result, data) == ["frames/a.cbf: missing", "b.cbf: missing", "frames/l: symlink missing"]

    assert verify_destination(result, copy) == ["frames/l: symlink missing"]  # the same files, really there
    (tmp_path / "swapped").symlink_to(copy, target_is_directory=True)
    assert verify_destination(result, tmp_path / "swapped") == [
        f"{tmp_path / 'swapped'} is a symlink, so nothing behind it is counted"
    ]


def test_the_start_check_writes_nothing_into_the_root(tmp_path):
    """Issue 19, item 4: the service account needs write access to project folders only, not to the root."""
    config = SimpleNamespace(destination_root=tmp_path / "root", destination_must_be_mount_point=False)
    config.destination_root.mkdir()
    os.utime(config.destination_root, ns=(0, 0))
    check_destination_root(config)
    assert list(config.destination_root.iterdir()) == []
    assert config.destination_root.stat().st_mtime_ns == 0  # not even a temporary file came and went


def test_verification_accepts_a_project_folder_symlinked_inside_the_root(tmp_path):
    """Only whoever manages the root can link a project folder (checked when planned); below it, nothing is followed."""
    data = tmp_path / "real-ny79" / "12282a" / "data"
    data.mkdir(parents=True)
    (data / "b.cbf").write_bytes(b"123")
    (tmp_path / "ny79").symlink_to(tmp_path / "real-ny79")
    result = TransferResult("12282a", files=FileList([("b.cbf", 3)]))
    assert verify_destination(result, tmp_path / "ny79" / "12282a" / "data") == []
