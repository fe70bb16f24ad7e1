"""bridge: one durable MLflow history on your workstation, fed from Colab through an authenticated tunnel.

import bridge
bridge.connect()   # then log with MLflow as usual
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "connect"]


def connect(*args, **kwargs):
    """Discover the workstation, verify it, and route this process's MLflow calls through the journal.

    See `bridge.client.connect.connect` for the arguments.
    """
    from bridge.client.connect import connect as _connect

    return _connect(*args, **kwargs)
