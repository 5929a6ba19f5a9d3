"""Listing the facility's SFTP server with paramiko; the host key is always verified, never accepted blindly."""

import getpass
import logging
import socket
import stat

import paramiko

from mxsync.errors import SftpError
from mxsync.names import describe, is_epn
from mxsync.portal import Suspicious

logger = logging.getLogger("mxsync.sftp")


class SftpClient:
    """One SSH connection to the facility host with an SFTP session on it; use as a context manager."""

    def __init__(self, config):
        self.config = config
        self._ssh = None
        self._sftp = None

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def where(self):
        return f"{self.config.ssh_target}:{self.config.port}"

    def connect(self):
        config = self.config
        client = paramiko.SSHClient()
        try:
            if config.known_hosts is not None:
                client.load_host_keys(str(config.known_hosts))
            else:
                client.load_system_host_keys()
        except (OSError, paramiko.SSHException) as error:
            raise SftpError(f"known-hosts {config.known_hosts}: cannot read it ({error})") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                config.host,
                port=config.port,
                username=config.username or getpass.getuser(),
                key_filename=str(config.key_file) if config.key_file else None,
                look_for_keys=config.key_file is None,
                allow_agent=config.key_file is None,
                timeout=config.ssh_connect_timeout,
                banner_timeout=config.ssh_connect_timeout,
                auth_timeout=config.ssh_connect_timeout,
            )
            self._sftp = client.open_sftp()
            self._sftp.get_channel().settimeout(config.sftp_timeout)
        except paramiko.BadHostKeyException:
            client.close()
            raise SftpError(
                f"SFTP {self.where}: the host key does not match {self._known_hosts_name()}; refusing to connect. "
                "If the facility really changed its key, verify the new one and update that file"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise SftpError(
                f"SFTP {self.where}: login refused; check username and key-file {config.key_file}"
            ) from None
        except paramiko.SSHException as error:
            client.close()
            if "not found in known_hosts" in str(error):
                raise SftpError(
                    f"SFTP {self.where}: host key unknown, not in {self._known_hosts_name()}; refusing to connect. "
                    f"Add it after verifying it (ssh-keyscan -p {config.port} {config.host})"
                ) from None
            raise SftpError(f"SFTP {self.where}: SSH failed: {error}") from None
        except (OSError, socket.timeout, EOFError) as error:
            client.close()
            raise SftpError(f"SFTP {self.where}: cannot connect: {error or type(error).__name__}") from None
        self._ssh = client
        logger.debug("Connected to %s over SFTP", self.where)

    def _known_hosts_name(self):
        return f"known-hosts {self.config.known_hosts}" if self.config.known_hosts else "your known_hosts files"

    def close(self):
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = self._sftp = None

    def list_epns(self, source_path):
        """Given a remote parent directory, return (EPN names, suspicious entries) of the folders in it."""
        try:
            entries = self._sftp.listdir_attr(source_path)
        except (OSError, paramiko.SSHException, socket.timeout, EOFError) as error:
            raise SftpError(f"SFTP {self.where}: cannot list {source_path}: {error or type(error).__name__}") from None
        except (
            UnicodeDecodeError
        ) as error:  # paramiko decodes every name as UTF-8 and gives up on the first that is not
            name = error.object[max(0, error.start - 20) : error.end + 20]
            raise SftpError(
                f"SFTP {self.where}: cannot list {source_path}: an entry's name is not UTF-8 (near {name!r}); "
                "rename it on the facility side"
            ) from None
        epns, suspicious = [], []
        for entry in entries:
            if not stat.S_ISDIR(entry.st_mode or 0):
                continue
            if is_epn(entry.filename):
                epns.append(entry.filename)
            else:
                suspicious.append(
                    Suspicious(f"SFTP {source_path}", describe(entry.filename), "folder name is not an EPN")
                )
        logger.debug("SFTP %s: %d EPN folders, %d other folders", source_path, len(epns), len(suspicious))
        return epns, suspicious
