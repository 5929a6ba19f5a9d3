"""Loopback networking helpers shared by the simulated services."""

import socket

LOOPBACK = "127.0.0.1"


def free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago; callers retry if it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]
