"""Every error bridge raises, under one root.

    BridgeError
    ├── ConfigError              bad option, environment variable or argument
    ├── SecretError              the secret store cannot be read or written
    ├── RecordError              an endpoint record cannot be trusted
    │   ├── RecordSignatureError     signed with another key, or altered
    │   └── RecordExpiredError       past its expiry
    ├── DiscoveryError           no endpoint could be found or fetched
    ├── PublishError             an endpoint record could not be published
    ├── ServeError               the workstation side failed to start or run
    │   ├── MlflowStartError         `mlflow server` did not become healthy
    │   └── TunnelError              the tunnel (ngrok or cloudflared) could not be opened
    │       ├── NgrokAuthtokenError      no or invalid authtoken (ERR_NGROK_4018)
    │       ├── NgrokAgentRunningError   another agent holds the session (ERR_NGROK_108)
    │       ├── NgrokBinaryError         no agent binary and none downloadable
    │       └── CloudflaredBinaryError   no cloudflared binary, or it cannot be run
    ├── JournalError             the local journal cannot accept or yield data
    │   ├── JournalFullError         the configured size limit is reached, or the disk is full
    │   ├── JournalCorruptError      the journal file is damaged
    │   └── ExperimentExistsError    the journal has an experiment of that name already
    ├── UndeliverableError       a journal entry can never be delivered, for a local reason (named in `reason`)
    └── LinkError                the client's link to its server failed (bridge/client/link/)
        ├── TransportError           no usable HTTP answer: refused, reset, timed out, cut mid-response
        └── HttpError                the server answered with an error status
            └── TokenRejectedError       401/403: the access token was refused

Third-party exceptions are translated where they enter bridge (`raise X(...) from exc`),
and no message ever contains a secret.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error bridge raises on purpose."""


class ConfigError(BridgeError):
    """An option, environment variable or argument has a value bridge cannot use."""


class SecretError(BridgeError):
    """The secret store could not be read or written."""


class RecordError(BridgeError):
    """An endpoint record is malformed or cannot be trusted."""


class RecordSignatureError(RecordError):
    """The record's signature does not match: another token signed it, or it was altered."""


class RecordExpiredError(RecordError):
    """The record is past its expiry time."""


class DiscoveryError(BridgeError):
    """No usable endpoint could be found."""


class PublishError(BridgeError):
    """An endpoint record could not be published."""


class ServeError(BridgeError):
    """The workstation side could not start or keep running."""


class MlflowStartError(ServeError):
    """`mlflow server` did not become healthy before its deadline."""


class TunnelError(ServeError):
    """The tunnel (ngrok or cloudflared) could not be opened."""


class NgrokAuthtokenError(TunnelError):
    """ngrok has no valid authtoken (ERR_NGROK_4018)."""


class NgrokAgentRunningError(TunnelError):
    """Another ngrok agent already holds this account's session (ERR_NGROK_108)."""


class NgrokBinaryError(TunnelError):
    """No ngrok agent binary is installed and none could be downloaded."""


class CloudflaredBinaryError(TunnelError):
    """No cloudflared binary, or it could not be executed."""


class JournalError(BridgeError):
    """The local journal could not accept or yield data."""


class JournalFullError(JournalError):
    """The journal reached its configured size limit, or the disk holding it is full; the call was not recorded."""


class JournalCorruptError(JournalError):
    """The journal file is damaged."""


class ExperimentExistsError(JournalError):
    """The journal already has an experiment of this name (perhaps added by another process a moment ago)."""

    def __init__(self, name: str, local_id: str) -> None:
        super().__init__(f"the journal already has an experiment named {name!r} ({local_id})")
        self.name = name
        self.local_id = local_id


class UndeliverableError(BridgeError):
    """A journal entry cannot be delivered for a local reason; it becomes a dead letter named by `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class LinkError(BridgeError):
    """The client's link to its server failed: no answer, or an error status."""


class TransportError(LinkError):
    """No usable HTTP answer: refused, reset, timed out, or cut mid-response."""


class HttpError(LinkError):
    """The server answered with an error status; `error_code` is MLflow's, None when MLflow did not answer."""

    def __init__(self, status: int, error_code: str | None, message: str, headers: dict | None = None) -> None:
        super().__init__(f"HTTP {status}" + (f" {error_code}" if error_code else "") + f": {message}")
        self.status = status
        self.error_code = error_code
        self.message = message
        #: The answer's headers (who answered: an upload endpoint says Tus-Resumable, a tunnel's edge does not).
        self.headers = headers or {}


class TokenRejectedError(HttpError):
    """The tracking server (or the entrance) rejected the access token (401/403)."""
