"""One MLflow REST call through the client's `Link`: what both read-side RestStores' `_call_endpoint` do.

MLflow's RestStores (tracking and registry) funnel every call through `_call_endpoint`; bridge's subclasses
replace it with `call_endpoint` below, so reads use the Link (its token, timeouts, failure translation) and
make one try. A failure that is the link's or the server's state (no answer, 5xx, 429) raises `Offline` —
the caller answers from the journal instead; a refusal raises the `MlflowException` MLflow itself would.
"""

from __future__ import annotations

import json

from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from mlflow.utils.proto_json_utils import parse_dict

from bridge.client.link import READ_TIMEOUT, Link, Verdict, classify_failure
from bridge.errors import HttpError, TransportError


class Offline(Exception):
    """The server did not answer a read (or answered with its state, not an answer): use the journal."""


def error_code(name: str) -> int:
    """MLflow's numeric error code for `name` (INTERNAL_ERROR when MLflow has no such code)."""
    return getattr(databricks_pb2, name, databricks_pb2.INTERNAL_ERROR)


def call_endpoint(link: Link, endpoint: str, method: str, json_body: str | None, response_proto):
    """Send one REST call as MLflow's RestStore would, through `link`; fill and return `response_proto`."""
    body = json.loads(json_body) if json_body else None
    try:
        if method == "GET":
            resp = link.request("GET", endpoint, params=body, timeout=READ_TIMEOUT)
        else:
            resp = link.request(method, endpoint, json_body=body, timeout=READ_TIMEOUT)
    except TransportError as exc:
        raise Offline(str(exc)) from None
    except HttpError as exc:
        if classify_failure(exc) is Verdict.RETRY:
            # A 5xx/429 (MLflow's own error body or not) is the link's or server's state, not an answer:
            # the journal answers instead, as for a refused connection (stock MLflow would retry it).
            raise Offline(str(exc)) from None
        if exc.status in (401, 403):
            message = f"the bridge server rejected the access token (HTTP {exc.status})"
        else:
            message = exc.message
        raise MlflowException(message, error_code=error_code(exc.error_code or "PERMISSION_DENIED")) from None
    parse_dict(js_dict=resp.json(), message=response_proto)
    return response_proto
