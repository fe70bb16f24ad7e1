"""Installed as `sitecustomize.py` in a Colab-like test environment (tests/support/colab_runtime.py): DNS for
`*.trycloudflare.com`, standing in at the process boundary so pip, urllib and requests in that environment reach the
stand-in cloudflared's quick tunnels by their public names, over TLS.

A name resolves while the stand-in's state file (`FAKE_CLOUDFLARED_STATE`, read at every lookup) lists it, so a
tunnel opened after this process started resolves too; it resolves to the local TLS edge, which terminates TLS with
a certificate from the test's CA and routes by SNI to that tunnel's forwarder. Every other name resolves as usual.
Its settings are in `quick_tunnel_dns.json` next to it: {"state": PATH, "edge_port": N}. Nothing here is bridge's.
"""

from __future__ import annotations

import json
import os
import socket

_SETTINGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quick_tunnel_dns.json")
_SUFFIX = ".trycloudflare.com"
_getaddrinfo = socket.getaddrinfo


def _tunnels(state: str) -> dict:
    try:
        with open(state) as fh:
            return json.loads(fh.read() or "{}")
    except (OSError, ValueError):
        return {}


def getaddrinfo(host, port, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.lower().rstrip(".").endswith(_SUFFIX):
        with open(_SETTINGS) as fh:
            settings = json.load(fh)
        if "https://" + name.lower().rstrip(".") not in _tunnels(settings["state"]):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return _getaddrinfo("127.0.0.1", settings["edge_port"], *args, **kwargs)
    return _getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
