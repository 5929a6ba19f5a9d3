"""The README's demo: epnalert and one mxsync pass, for real, against the simulated facility.

Usage: python -m tests.facility.demo [WORKDIR]   (default ./demo-run, emptied first)
"""

import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.facility.facility import Facility

BIN = Path(sys.executable).parent


def main(arguments):
    workdir = Path(arguments[0] if arguments else "demo-run").resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    now = datetime.now(timezone.utc)
    ended = dict(start=now - timedelta(days=3), end=now - timedelta(days=2))
    with Facility(workdir) as facility:
        facility.add_experiment("mx", "12282a", equipment_id=23, frames=20, frame_size=256 * 1024, **ended)
        facility.add_experiment("mx", "12282b", equipment_id=23, **ended)
        facility.add_experiment(
            "mx",
            "12290a",
            equipment_id=23,
            principal=("Zoë", "Ångström", "zoe@uni.example.edu"),
            data_scientists=[("Bob", "<b>Builder</b>", "bob@uni.example.edu")],
            **ended,
        )
        facility.add_experiment("mx", "13001a")  # on SFTP with no visit in range
        facility.portal.add_visit(23, "14002a", now + timedelta(days=2), now + timedelta(days=3))  # booked, no data yet
        facility.add_experiment(
            "mx", "12282c", equipment_id=23, start=now - timedelta(hours=3), end=now + timedelta(hours=5)
        )
        config = facility.write_config(epn_cap_map={"12282": "ny79"}, log_level="INFO")
        print(
            f"Simulated facility up: sshd on 127.0.0.1:{facility.sshd.port}, portal {facility.portal.url}, "
            f"SMTP sink on port {facility.smtp.port}\nConfig: {config}\n"
        )

        step(f"epnalert --config {config}")
        run("epnalert", "--config", config)
        if facility.smtp.wait_for(1, timeout=10):
            message = facility.smtp.messages[0].message
            print(f"Email received by the SMTP sink: To: {message['To']}  Subject: {message['Subject']}\n")
            print(message.get_body(preferencelist=("plain",)).get_content())

        step(f"mxsync --config {config} --execute --once")
        run("mxsync", "--config", config, "--execute", "--once", "-v")

        step("Where the data went")
        for data in sorted(facility.destination.glob("*/*/data")):
            files = [path for path in data.rglob("*") if path.is_file()]
            size = sum(path.stat().st_size for path in files)
            print(f"{data}: {len(files)} files, {size / 1024:.0f} KiB")
        ignore = workdir / "state" / "ignore.yml"
        step(f"{ignore} now says")
        print(ignore.read_text() if ignore.exists() else "(not written)")

        step(f"mxsync status --config {config}")
        run("mxsync", "status", "--config", config)

        step(f"mxsync verify --config {config} --all   (every recorded EPN's BagIt bag, checked again)")
        run("mxsync", "verify", "--config", config, "--all")
        print(f"Logs are in {workdir / 'log'}; the facility is stopped now.")


def step(title):
    print(f"\n=== {title}\n", flush=True)


def run(program, *arguments):
    result = subprocess.run([str(BIN / program), *map(str, arguments)], env=dict(os.environ))
    print(f"(exit {result.returncode})", flush=True)
    return result.returncode


if __name__ == "__main__":
    main(sys.argv[1:])
