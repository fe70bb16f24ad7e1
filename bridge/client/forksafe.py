"""Objects whose locks and connections a forked child (a DataLoader worker) must not inherit as they are.

A lock another thread of the parent held at `fork()` stays held for ever in the child, and a pooled HTTP or
SQLite connection would be shared by two processes. Each such object registers here and renews what it must
in `_after_fork_in_child()`, run by `os.register_at_fork` in the child before any of its code.
"""

from __future__ import annotations

import logging
import os
import weakref

log = logging.getLogger(__name__)

_objects: weakref.WeakSet = weakref.WeakSet()


def renew_after_fork(obj) -> None:
    """Call `obj._after_fork_in_child()` in every child forked from now on (while `obj` lives)."""
    _objects.add(obj)


def _after_fork() -> None:
    for obj in list(_objects):
        try:
            obj._after_fork_in_child()
        except Exception:  # never break the child: it has its own work to do
            log.exception("bridge: renewing %r after fork failed", obj)


os.register_at_fork(after_in_child=_after_fork)
