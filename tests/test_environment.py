"""mxsync.environment: where an install's Python lies, against what mx_sync.service hides.

That such an install really fails under the unit (status 203/EXEC) is shown in tests/test_systemd.py.
"""

import sys

import pytest

from mxsync.environment import protected_home_problem

SYSTEM = {
    "executable": "/opt/mx_sync/bin/python",
    "prefix": "/opt/mx_sync",
    "base_prefix": "/usr",
}


def test_venv_from_the_system_python_is_fine():
    assert protected_home_problem(**SYSTEM) is None


def test_system_python_without_a_venv_is_fine():
    assert protected_home_problem(executable="/usr/bin/python3", prefix="/usr", base_prefix="/usr") is None


def test_venv_in_opt_made_from_pyenv_under_root_names_the_base_python():
    message = protected_home_problem(**{**SYSTEM, "base_prefix": "/root/.pyenv/versions/3.11.7"})
    assert message.startswith("the Python this venv was made from (/root/.pyenv/versions/3.11.7) lies under /root")
    assert "ProtectHome=yes" in message and "203/EXEC" in message and "/usr/bin/python3 -m venv" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "prefix, hidden",
    [
        ("/home/alice/mx_sync", "/home"),
        ("/root/venv", "/root"),
        ("/run/user/1000/venv", "/run/user"),
        ("/home", "/home"),
    ],
)
def test_venv_under_a_hidden_directory_names_the_venv(prefix, hidden):
    message = protected_home_problem(executable=f"{prefix}/bin/python", prefix=prefix, base_prefix="/usr")
    assert message.startswith(f"the venv ({prefix}) lies under {hidden},")


def test_interpreter_alone_under_home_is_named():
    message = protected_home_problem(executable="/home/alice/python3", prefix="/usr", base_prefix="/usr")
    assert message.startswith("the Python interpreter (/home/alice/python3) lies under /home,")


@pytest.mark.parametrize(
    "prefix",
    [
        "/homework/venv",
        "/rootfs/venv",
        "/run/users/venv",
        "/srv/home/venv",
        "/opt/root",
    ],
)
def test_names_that_only_look_alike_are_fine(prefix):
    assert protected_home_problem(executable=f"{prefix}/bin/python", prefix=prefix, base_prefix="/usr") is None


def test_defaults_describe_the_running_interpreter():
    expected = protected_home_problem(sys.executable, sys.prefix, sys.base_prefix)
    assert protected_home_problem() == expected
