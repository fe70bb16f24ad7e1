"""Where `bridge serve` puts the signed endpoint record so clients can find the tunnel's current URL.

    Publisher                 publish(record) · describe() · close()
    ├── FilePublisher         file:PATH — atomic replace (the default: the bridge data folder; point it at a
    │                         Google-Drive-synced folder to reach Colab)
    ├── GistPublisher         gist:ID — PATCH a secret GitHub gist, token from the keyring (`github-token`)
    ├── HttpPublisher         https://… — PUT (or POST) the record, e.g. to an ntfy topic
    └── RelayPublisher        --relay URL — the record sealed under a token-derived key, POSTed to a token-derived
                              topic on an ntfy-compatible relay (bridge/rendezvous.py): the token alone finds it

`publisher_for(spec)` turns a `--publish` value into one of these; the relay runs beside it (`--relay`). The
record carries no secret, so it may sit in a world-readable file or a gist; the GitHub token never leaves the
request's Authorization header.
A publish is one attempt: the supervisor's loop (bridge.retry.compute_backoff_ms) is the only retry layer.
"""

from __future__ import annotations

import abc
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import requests

from bridge import secrets
from bridge.config import paths
from bridge.errors import ConfigError, PublishError
from bridge.record import GIST_FILE_NAME, GITHUB_API, GITHUB_API_ENV, EndpointRecord, check_http_url, describe_url
from bridge.rendezvous import MESSAGE_LIMIT_BYTES, Rendezvous, describe_relay

log = logging.getLogger(__name__)

#: Connect and read timeout for one publish request, in seconds.
DEFAULT_TIMEOUT_S = 10.0

SPEC_FORMS = "file:PATH, gist:GIST_ID or an https:// URL"


class Publisher(abc.ABC):
    """Something that makes an endpoint record reachable to clients."""

    @abc.abstractmethod
    def publish(self, record: EndpointRecord) -> None:
        """Publish `record`, replacing what was published before; raise `PublishError` when it fails."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where records go, in words fit for `bridge status` (never a secret)."""

    def close(self) -> None:  # noqa: B027 - an optional hook: most publishers hold nothing to release
        """Release what the publisher holds (sessions); publishing after close is an error."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class FilePublisher(Publisher):
    """Writes the record to a file by temp file + fsync + rename, so readers never see half a record."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        if self.path.exists() and self.path.is_dir():
            raise ConfigError(
                f"--publish file:{self.path} is a folder; name a file, e.g. {self.path / 'endpoint.json'}"
            )

    def publish(self, record: EndpointRecord) -> None:
        data = record.to_json().encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, 0o644)  # the record holds no secret; Drive sync or a web server may read it
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise PublishError(f"could not write the endpoint record to {self.path}: {exc.strerror or exc}") from exc
        log.info("Published endpoint record to %s", self.path)

    def describe(self) -> str:
        return f"file:{self.path}"


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable too (ignored where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _send(session: requests.Session, method: str, url: str, where: str, *, timeout: float, **kwargs: object) -> None:
    """One publish request; any failure becomes a PublishError naming `where` and the status, never a header."""
    try:
        response = session.request(
            method,
            url,
            timeout=timeout,
            allow_redirects=False,
            **kwargs,  # type: ignore[arg-type]
        )
    except requests.RequestException as exc:
        raise PublishError(f"could not reach {where}: {type(exc).__name__}") from exc
    if not 200 <= response.status_code < 300:
        reason = response.reason or ""
        raise PublishError(f"{where} answered {response.status_code} {reason}".rstrip())


class GistPublisher(Publisher):
    """Updates one file of an existing (secret) GitHub gist with the record."""

    def __init__(
        self,
        gist_id: str,
        token_lookup: Callable[[], str | None] | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        gist_id = gist_id.strip()
        if not gist_id or not gist_id.isalnum():
            raise ConfigError(f"--publish gist:{gist_id!r}: a gist id is the hex string at the end of the gist's URL")
        self.gist_id = gist_id
        # Looked up at each publish, so `bridge login --github` takes effect without a restart.
        self._token_lookup = token_lookup or secrets.github_token
        self._timeout_s = timeout_s
        self._session = requests.Session()

    @property
    def api_url(self) -> str:
        base = os.environ.get(GITHUB_API_ENV, "").strip() or GITHUB_API
        check_http_url(base, what=GITHUB_API_ENV)  # the GitHub token goes there: https only, or loopback for tests
        return f"{base.rstrip('/')}/gists/{self.gist_id}"

    def publish(self, record: EndpointRecord) -> None:
        token = self._token_lookup()
        if not token:
            raise PublishError(
                f"no GitHub token for gist publishing; set {secrets.GITHUB_TOKEN_ENV} or store one with a 'gist' "
                f"scope in the keyring (secret {secrets.GITHUB_TOKEN!r}, e.g. via `bridge login --github-token -`)"
            )
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }
        body = {"files": {GIST_FILE_NAME: {"content": record.to_json()}}}
        _send(
            self._session,
            "PATCH",
            self.api_url,
            f"GitHub gist {self.gist_id}",
            timeout=self._timeout_s,
            headers=headers,
            json=body,
        )
        log.info("Published endpoint record to gist %s", self.gist_id)

    def describe(self) -> str:
        return f"gist:{self.gist_id}"

    def close(self) -> None:
        self._session.close()


class HttpPublisher(Publisher):
    """Sends the record's JSON to an HTTPS URL (PUT by default; POST for endpoints like ntfy topics)."""

    def __init__(self, url: str, method: str = "PUT", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        method = method.upper()
        if method not in ("PUT", "POST"):
            raise ConfigError(f"publish method {method!r} is not PUT or POST")
        check_http_url(url, what="--publish")
        self.url = url
        self.method = method
        self._timeout_s = timeout_s
        self._session = requests.Session()

    def publish(self, record: EndpointRecord) -> None:
        _send(
            self._session,
            self.method,
            self.url,
            self.describe(),
            timeout=self._timeout_s,
            data=record.to_json().encode(),
            headers={"Content-Type": "application/json"},
        )
        log.info("Published endpoint record to %s", self.describe())

    def describe(self) -> str:
        return describe_url(self.url)

    def close(self) -> None:
        self._session.close()


class RelayPublisher(Publisher):
    """POSTs the sealed record to the token's topic on an ntfy-compatible relay (ntfy's publish API).

    The topic and key are derived from the token the record is signed with, at each publish: after
    `bridge token --rotate` the record goes to the new token's topic, and the old topic gets nothing more.
    """

    def __init__(
        self, relay: str, token_lookup: Callable[[], str | None], *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        check_http_url(relay, what="--relay")
        self.relay = relay.rstrip("/")
        self._token_lookup = token_lookup
        self._timeout_s = timeout_s
        self._session = requests.Session()
        #: When the relay says it forgets the last message (ntfy's `expires`), or None when it did not say.
        self.expires_at: float | None = None

    def publish(self, record: EndpointRecord, *, token: str | None = None) -> None:
        """Seal `record` for `token` (default: the current token) and post it to that token's topic."""
        token = token or self._token_lookup()
        if not token:
            raise PublishError("no access token to derive the relay topic from")
        rendezvous = Rendezvous.for_token(self.relay, token)
        body = rendezvous.seal(record.to_json()).encode()
        if len(body) > MESSAGE_LIMIT_BYTES:  # ntfy would make it an attachment, or refuse it (413)
            raise PublishError(f"the sealed record is {len(body)} bytes; the relay takes {MESSAGE_LIMIT_BYTES}")
        where = self.describe()
        try:
            response = self._session.post(
                rendezvous.publish_url,
                data=body,
                # Firebase: no keeps the message on the relay (ntfy.sh would forward it to Google's FCM otherwise);
                # the title and tags ntfy would show stay empty: nothing about bridge is said in clear.
                headers={"Content-Type": "text/plain", "Firebase": "no"},
                timeout=self._timeout_s,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            # requests' messages name the URL, and the URL holds the topic: the class name only.
            raise PublishError(f"could not reach {where}: {type(exc).__name__}") from exc
        with response:
            if response.status_code == 429:
                raise PublishError(f"{where} answered 429: rate limit or daily message quota reached; retrying later")
            if response.status_code == 413:
                raise PublishError(f"{where} answered 413: the sealed record is larger than it accepts")
            if not 200 <= response.status_code < 300:
                raise PublishError(f"{where} answered {response.status_code} {response.reason or ''}".rstrip())
            try:
                expires = response.json().get("expires")
            except (ValueError, AttributeError):
                expires = None
        self.expires_at = float(expires) if isinstance(expires, (int, float)) else None
        log.info("Published the sealed endpoint record to %s", where)

    def describe(self) -> str:
        return describe_relay(self.relay)

    def close(self) -> None:
        self._session.close()


def publisher_for(spec: str | None) -> Publisher:
    """The publisher a `--publish` value names: None → the default record file; file:PATH; gist:ID; https://…."""
    if spec is None or not spec.strip():
        return FilePublisher(paths().record_file)
    value = spec.strip()
    if value.startswith("file:"):
        path = value[len("file:") :]
        if path.startswith("//"):  # file:///abs/path
            path = path[2:]
        if not path:
            raise ConfigError(f"--publish {spec!r} names no file; accepted: {SPEC_FORMS}")
        return FilePublisher(path)
    if value.startswith("gist:"):
        return GistPublisher(value[len("gist:") :])
    if value.startswith(("https://", "http://")):
        return HttpPublisher(value)
    raise ConfigError(f"--publish {spec!r} is not understood; accepted: {SPEC_FORMS}")
