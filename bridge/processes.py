"""Is a process still there? One answer for the CLI, the serve side and the journal (a leaf: imports nothing of bridge).

Signal 0 checks existence and permission without delivering anything: a process that exists but belongs to another
user (EPERM) is alive. A zombie counts as alive until its parent reaps it, as `kill -0` says.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["pid_alive", "process_group_alive"]


def pid_alive(pid: object) -> bool:
    """True while process `pid` exists; False for anything that is not a positive process id (None, a bool,
    a string, 0 or below, too large) — 0 and negative numbers would ask about process groups instead."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    return _signal_zero(os.kill, pid)


def process_group_alive(pgid: int) -> bool:
    """True while any process of group `pgid` exists (a leader that exited may leave children running)."""
    if not isinstance(pgid, int) or isinstance(pgid, bool) or pgid <= 0:
        return False
    return _signal_zero(os.killpg, pgid)


def _signal_zero(kill: Callable[[int, int], None], target: int) -> bool:
    try:
        kill(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OverflowError:  # larger than a pid_t: no such process
        return False
    return True
