"""epnalert's command line: arguments, the one-line error, the exit code. Heavy modules load after parsing.

Cron runs `epnalert --config /opt/mx_sync/etc/config.yml` daily, as it ran HPC ASSyncy's epnalert.
"""

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="epnalert",
        description=(
            "Email staff about experiments (EPNs) on the facility's SFTP server or booked on its portal "
            "whose number is not in epn_cap_map, so that nobody's data goes unclaimed."
        ),
        epilog="Exit status: 0 alert sent or not needed, 1 failed (reason on stderr), 2 unusable config or state file.",
    )
    parser.add_argument("--config", required=True, metavar="PATH", help="path of config.yml")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the email (headers and both parts) instead of sending it; change no state",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log to the terminal at the configured level")
    return parser


def main(argv=None):
    arguments = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mxsync.cli_support import run_reporting_errors

    return run_reporting_errors("epnalert", lambda: run(arguments))


def run(arguments):
    from mxsync.cli_support import load_and_log

    config = load_and_log(
        arguments.config,
        "epnalert",
        extra_files=[("epnalert.email", "email")],
        dry_run=arguments.dry_run,
        verbose=arguments.verbose,
    )
    from epnalert.alert import run_alert

    return run_alert(config, dry_run=arguments.dry_run)


if __name__ == "__main__":
    sys.exit(main())
