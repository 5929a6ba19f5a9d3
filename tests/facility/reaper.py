"""Run a command as a Linux child subreaper; on stop, end and reap every process it started.

Usage: python reaper.py COMMAND [ARG...]. Stops on SIGTERM, SIGINT, SIGHUP or when its parent dies.
"""

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
GRACE_SECONDS = 3.0
POLL_INTERVAL = 0.02


def main(command):
    """Run `command` until it exits or a stop signal arrives; return its exit status."""
    # sshd's session processes call setsid(), escaping process-group kills; orphaned, they would pass
    # to PID 1, which in some containers never reaps them. As subreaper, they come to us instead.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # If the test process is killed outright, this reaper hears SIGTERM and still cleans up. (Linux sends
    # it when the thread that started us ends, so start servers from a thread that outlives them.)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # Blocked signals stay pending for sigwait, so none is lost between two waits.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {signal.SIGCHLD})
    # Python ignores SIGPIPE and SIGXFSZ; like subprocess, give the command their defaults back.
    leader = os.posix_spawnp(command[0], command, os.environ, setsigmask=(), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    status = 0
    while signal.sigwait(STOP_SIGNALS | {signal.SIGCHLD}) == signal.SIGCHLD:
        exited, _ = _reap()
        if leader in exited:
            status = exited[leader]
            break
    _end_descendants()
    return status


def _end_descendants():
    """Terminate every descendant until none is left, escalating to SIGKILL after a grace period."""
    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        _, children_remain = _reap()
        if not children_remain:
            return
        signal_number = signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal_number)
            except ProcessLookupError:
                pass
        time.sleep(POLL_INTERVAL)


def _reap():
    """Collect every exited child; return ({pid: exit status}, whether any child is left)."""
    exited = {}
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exited, False
        if pid == 0:
            return exited, True
        exited[pid] = os.waitstatus_to_exitcode(wait_status)


def _descendants(root):
    """Return the pids of the live (not zombie) descendants of `root`."""
    table = _process_table()
    found = []
    parents = [root]
    while parents:
        parent = parents.pop()
        children = [pid for pid, (parent_pid, state) in table.items() if parent_pid == parent and state != "Z"]
        found += children
        parents += children
    return found


def _process_table():
    """Return {pid: (parent pid, state letter)} for every process in /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        # The command name may hold spaces or parentheses; the fixed fields follow the last ")".
        state, parent_pid = stat[stat.rindex(")") + 2 :].split()[:2]
        table[int(entry.name)] = (int(parent_pid), state)
    return table


def _prctl(option, value):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
