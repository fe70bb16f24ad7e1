"""bridge/processes.py: whether a process, or a process group, is still there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bridge.processes import pid_alive, process_group_alive


def test_this_process_is_alive_and_a_reaped_child_is_not():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid no longer names a process
    assert not pid_alive(child.pid)


def test_another_users_process_counts_as_alive(monkeypatch):
    def refused(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    assert pid_alive(1)


# The own pid negated gets a fixed id: every xdist worker must collect the same test names.
@pytest.mark.parametrize(
    "bad", [None, "123", 12.0, True, False, 0, -1, pytest.param(-os.getpid(), id="minus-own-pid"), 2**80]
)
def test_anything_but_a_positive_pid_is_not_a_live_process(bad):
    assert not pid_alive(bad)


def test_a_process_group_is_alive_while_any_member_is():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert process_group_alive(child.pid)  # a new session: the child leads its own group
    finally:
        child.kill()
        child.wait()
    assert not process_group_alive(child.pid)
    assert not process_group_alive(0) and not process_group_alive(-1)
