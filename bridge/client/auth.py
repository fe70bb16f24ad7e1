"""MLflow request-auth plugin "bridge": the access token as `Authorization: Bearer …` on direct MLflow calls.

The journal's sender and reads add the header themselves; this provider covers what talks to the server
directly (the model registry, which `connect()` points at the server with MLFLOW_TRACKING_AUTH=bridge).
"""

from __future__ import annotations

import requests
from mlflow.tracking.request_auth.abstract_request_auth_provider import RequestAuthProvider

PROVIDER_NAME = "bridge"


class BearerAuth(requests.auth.AuthBase):
    """Adds the bearer token to a request; its repr never shows the token."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(token=" + ("'…'" if self._token else "None") + ")"


def current_token() -> str | None:
    """The token of this process's connection, else the one discovery finds (argument-less)."""
    from bridge.client.connect import active_connection

    conn = active_connection()
    if conn is not None and conn.sender.token:
        return conn.sender.token
    try:
        from bridge.client.discovery import find_token
    except ImportError:
        return None
    return find_token(None)


class BridgeAuthProvider(RequestAuthProvider):
    """Selected by MLFLOW_TRACKING_AUTH=bridge."""

    def get_name(self) -> str:
        return PROVIDER_NAME

    def get_auth(self) -> BearerAuth:
        return BearerAuth(current_token())
