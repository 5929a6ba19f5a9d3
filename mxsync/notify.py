"""systemd's notify protocol (READY, STATUS, STOPPING) over $NOTIFY_SOCKET, without a dependency."""

import logging
import os
import socket

logger = logging.getLogger("mxsync.notify")


class SystemdNotifier:
    """Sends state to systemd when run as a Type=notify unit; does nothing otherwise (Type=simple, a terminal)."""

    def __init__(self, address=None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        # A leading '@' names a socket in the abstract namespace.
        self.address = "\0" + address[1:] if address and address.startswith("@") else address

    def send(self, **fields):
        if not self.address:
            return
        payload = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
                notify_socket.sendto(payload, self.address)
        except OSError as error:
            logger.debug("Could not notify systemd: %s", error)

    def ready(self, status):
        self.send(ready=1, status=status)

    def status(self, status):
        self.send(status=status)

    def stopping(self):
        self.send(stopping=1, status="stopping")
