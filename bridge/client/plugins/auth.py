"""MLflow request-auth plugin "bridge": the access token as `Authorization: Bearer …` on direct MLflow calls.

The client's `Link` (sender and reads) adds the header itself; this provider covers what talks to the server
directly (the model registry, which `connect()` points at the server with MLFLOW_TRACKING_AUTH=bridge).
MLFLOW_TRACKING_AUTH applies to every MLflow server the process talks to, so the token goes only to a
request whose scheme, host and port are those of the active connection's current server URL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import requests
from mlflow.tracking.request_auth.abstract_request_auth_provider import RequestAuthProvider
from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

from bridge.client.connect import active_connection
from bridge.client.link import NGROK_SKIP_WARNING

PROVIDER_NAME = "bridge"

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of `url`, the default port filled in; None when it is not an http(s) URL."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


class BearerAuth(requests.auth.AuthBase):
    """Adds the bearer token to requests for `server_url` only; its repr never shows the token."""

    def __init__(self, token: str | None, server_url: str | None = None) -> None:
        self._token = token
        self._origin = origin(server_url) if server_url else None

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._token and self._origin is not None and origin(request.url or "") == self._origin:
            request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(token=" + ("'…'" if self._token else "None") + ")"


def current_auth() -> BearerAuth:
    """The token and current server URL of this process's connection; no token without a connection."""
    conn = active_connection()
    if conn is None or not conn.link.token:
        return BearerAuth(None)
    return BearerAuth(conn.link.token, conn.link.url)


class BridgeHeaderProvider(RequestHeaderProvider):
    """While connected, MLflow's own requests (registry, model loading) skip ngrok's browser-warning page too."""

    def in_context(self) -> bool:
        return active_connection() is not None

    def request_headers(self) -> dict[str, str]:
        return dict(NGROK_SKIP_WARNING)


class BridgeAuthProvider(RequestAuthProvider):
    """Selected by MLFLOW_TRACKING_AUTH=bridge."""

    def get_name(self) -> str:
        return PROVIDER_NAME

    def get_auth(self) -> BearerAuth:
        return current_auth()
