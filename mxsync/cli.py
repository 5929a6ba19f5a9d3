"""mxsync's command line: arguments, the one-line error, the exit code. Heavy modules load after parsing.

Old deployments run `mxsync --config C [--execute]`; that still means `mxsync run`.
"""

import argparse
import sys

COMMANDS = ("run", "check", "status", "verify")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mxsync",
        description="Repatriate finished synchrotron experiments (EPNs) into HPC project folders with rsync over ssh.",
        epilog="Without a command, 'run' is assumed: 'mxsync --config C --execute' works as it always has.",
    )
    from mxsync import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{run,check,status,verify}")

    run = commands.add_parser("run", help="sync finished visits, every sync-frequency-hours (default command)")
    add_config_argument(run)
    run.add_argument("--execute", action="store_true", help="really transfer and record; without it, a dry run")
    run.add_argument(
        "--once", action="store_true", help="run one cycle and exit: 0 if all planned EPNs synced, 1 if not"
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log to the terminal at the configured level")

    check = commands.add_parser("check", help="validate the config; with --connect also try every connection")
    add_config_argument(check)
    check.add_argument(
        "--connect", action="store_true", help="also check files, destination, SSH/SFTP, portal tokens and SMTP"
    )
    check.add_argument(
        "--name",
        metavar="PATH",
        help="call the config file PATH in messages (for a copy checked before it replaces PATH)",
    )

    status = commands.add_parser("status", help="show each EPN of the visits in range and its sync state")
    add_config_argument(status)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    verify = commands.add_parser("verify", help="check recorded EPNs' BagIt bags again; exit 0 only if all are valid")
    add_config_argument(verify)
    verify.add_argument("epns", nargs="*", metavar="EPN", help="the EPNs to check (e.g. 12282a)")
    verify.add_argument("--all", action="store_true", help="check every EPN recorded in ignore.yml")
    verify.add_argument("--fast", action="store_true", help="check sizes and counts only, hash nothing")
    verify.add_argument(
        "--bag", action="store_true", help="first bag EPNs recorded before bags (hashing here); alone, means --all"
    )
    return parser


def add_config_argument(parser):
    parser.add_argument("--config", required=True, metavar="PATH", help="path of config.yml")


def parse_arguments(argv):
    """Given argv without the program name, return parsed arguments; no command means 'run'."""
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "run")
    return build_parser().parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    from mxsync.cli_support import run_reporting_errors

    return run_reporting_errors("mxsync", lambda: dispatch(arguments))


def dispatch(arguments):
    if arguments.command in ("check", "status"):
        import logging

        # These print their own lines; without a handler Python would print stray warnings
        # (e.g. the portal's retries) bare on stderr, next to the one-line error.
        logging.getLogger().addHandler(logging.NullHandler())
    if arguments.command == "check":
        from mxsync.check import run_check

        return run_check(arguments.config, connect=arguments.connect, name=arguments.name)
    if arguments.command == "status":
        from mxsync.status import run_status

        return run_status(arguments.config, as_json=arguments.json)
    if arguments.command == "verify":
        from mxsync.verify import run_verify

        return run_verify(
            arguments.config, arguments.epns, all_epns=arguments.all, fast=arguments.fast, bag=arguments.bag
        )
    from mxsync.service import run_service

    return run_service(arguments.config, execute=arguments.execute, once=arguments.once, verbose=arguments.verbose)


if __name__ == "__main__":
    sys.exit(main())
