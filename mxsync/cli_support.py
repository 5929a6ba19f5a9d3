"""What both command lines share: turning our errors into one line and an exit code, loading config with logging."""

import logging
import os
import sys

from mxsync.errors import ConfigError, MxsyncError
from mxsync.logsetup import masker, setup_logging


def run_reporting_errors(program, action):
    """Run action(); turn our own errors into 'program: error: ...' on stderr and their exit code."""
    try:
        return action()
    except ConfigError as error:
        for line in str(error).splitlines():
            print(f"{program}: error: {masker.mask(line)}", file=sys.stderr)
        return error.exit_code
    except MxsyncError as error:
        print(f"{program}: error: {masker.mask(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`mxsync status | head`): stop quietly, and keep Python's final flush quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def load_and_log(config_path, log_file_key, extra_files=(), dry_run=False, verbose=False):
    """Load the config, set up logging to its `log-files.<log_file_key>`, log its warnings; return the Config.

    `extra_files` lists dedicated logs as (logger name, log-files key), e.g. [("epnalert.email", "email")].
    """
    from mxsync.config import load_config

    config = load_config(config_path)
    apply_logging(config, log_file_key, extra_files, dry_run, verbose)
    for warning in config.warnings:
        logging.getLogger("mxsync.config").warning("%s", warning)
    return config


def apply_logging(config, log_file_key, extra_files=(), dry_run=False, verbose=False):
    """Route logging as the config says (level, files, rotation) and register its secrets with the masker."""
    try:
        setup_logging(
            config.log_level,
            log_file=getattr(config.log_files, log_file_key),
            extra_files=[(logger_name, getattr(config.log_files, key)) for logger_name, key in extra_files],
            max_bytes=config.log_max_bytes,
            backup_count=config.log_backup_count,
            secrets=config.secrets(),
            dry_run=dry_run,
            verbose=verbose,
        )
    except OSError as error:  # a log path that is a directory, or whose folder cannot be created
        where = error.filename or "a log file"
        raise ConfigError(config.path, [f"log-files: cannot open {where}: {error.strerror or error}"]) from None
