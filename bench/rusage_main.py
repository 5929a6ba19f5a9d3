"""Run a console script's main() in this process, then write its own peak RSS and CPU time as JSON.

Usage: python bench/rusage_main.py OUT.json mxsync|epnalert ARGUMENTS...

The console scripts `mxsync` and `epnalert` do exactly `sys.exit(main())`; running main() here instead
lets the Python process's own peak RSS be told apart from that of its rsync and ssh children.

The peak is VmHWM from /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss over
exec() from the forked pre-exec image, so a process started by a large parent (the benchmark, with
the simulated facility in it) would report the parent's size. For the same reason RUSAGE_CHILDREN
reports at least mxsync's own size at each fork, not rsync's; it is kept only as an upper bound.
"""

import json
import resource
import sys
import time


def peak_rss_kib():
    """This process image's peak resident set (VmHWM) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv):
    out, program, arguments = argv[0], argv[1], argv[2:]
    started = time.monotonic()
    code = 70
    try:
        if program == "mxsync":
            from mxsync.cli import main as program_main
        elif program == "epnalert":
            from epnalert.cli import main as program_main
        else:
            raise SystemExit(f"unknown program {program!r}")
        code = program_main(arguments)
    finally:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(out, "w") as file:
            json.dump(
                {
                    "self_maxrss_kib": peak_rss_kib(),
                    "self_ru_maxrss_kib": own.ru_maxrss,
                    "children_maxrss_kib": children.ru_maxrss,
                    "self_cpu_s": own.ru_utime + own.ru_stime,
                    "children_cpu_s": children.ru_utime + children.ru_stime,
                    "inside_s": time.monotonic() - started,
                    "exit": code,
                },
                file,
            )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
