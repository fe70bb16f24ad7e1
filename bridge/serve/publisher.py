"""Where `bridge serve` puts the signed endpoint record so clients can find the tunnel's current URL.

    Publisher                 publish(record) · describe() · close()
    ├── FilePublisher         file:PATH — atomic replace (the default: the bridge data folder; point it at a
    │                         Google-Drive-synced folder to reach Colab)
    ├── GistPublisher         gist:ID — PATCH a secret GitHub gist, token from the keyring (`github-token`)
    └── HttpPublisher         https://… — PUT (or POST) the record, e.g. to an ntfy topic

`publisher_for(spec)` turns a `--publish` value into one of these. The record carries no secret, so it may sit
in a world-readable file or a gist; the GitHub token never leaves the request's Authorization header.
"""

from __future__ import annotations

import abc
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from bridge import secrets
from bridge.config import paths
from bridge.errors import ConfigError, PublishError
from bridge.record import EndpointRecord

log = logging.getLogger(__name__)

#: Connect and read timeout for one publish request, in seconds.
DEFAULT_TIMEOUT_S = 10.0
#: Extra attempts after a connection error or a 5xx/429, with urllib3's exponential backoff.
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_FACTOR_S = 0.3
#: The file name inside the gist; clients fetch this one.
GIST_FILE_NAME = "bridge-endpoint.json"
GITHUB_API = "https://api.github.com"
#: Overrides the GitHub API base (tests point it at a local stand-in).
GITHUB_API_ENV = "BRIDGE_GITHUB_API"

SPEC_FORMS = "file:PATH, gist:GIST_ID or an https:// URL"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class Publisher(abc.ABC):
    """Something that makes an endpoint record reachable to clients."""

    @abc.abstractmethod
    def publish(self, record: EndpointRecord) -> None:
        """Publish `record`, replacing what was published before; raise `PublishError` when it fails."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where records go, in words fit for `bridge status` (never a secret)."""

    def close(self) -> None:
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


def _session(retries: int, methods: frozenset[str]) -> requests.Session:
    """A session with a small bounded retry on connection errors, 429 and 5xx (publishing is idempotent)."""
    retry = Retry(
        total=retries, connect=retries, read=retries, status=retries,
        backoff_factor=DEFAULT_BACKOFF_FACTOR_S, status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=methods, raise_on_status=False, respect_retry_after_header=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _send(session: requests.Session, method: str, url: str, where: str, *, timeout: float, **kwargs: object) -> None:
    """One publish request; any failure becomes a PublishError naming `where` and the status, never a header."""
    try:
        response = session.request(
            method, url, timeout=timeout, allow_redirects=False, **kwargs  # type: ignore[arg-type]
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
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        gist_id = gist_id.strip()
        if not gist_id or not gist_id.isalnum():
            raise ConfigError(f"--publish gist:{gist_id!r}: a gist id is the hex string at the end of the gist's URL")
        self.gist_id = gist_id
        # Looked up at each publish, so `bridge login --github` takes effect without a restart.
        self._token_lookup = token_lookup or (lambda: secrets.get_secret(secrets.GITHUB_TOKEN))
        self._timeout_s = timeout_s
        self._session = _session(retries, frozenset({"PATCH"}))

    @property
    def api_url(self) -> str:
        base = os.environ.get(GITHUB_API_ENV, "").strip() or GITHUB_API
        _check_url(base, GITHUB_API_ENV)  # the GitHub token goes there: https only, or loopback for tests
        return f"{base.rstrip('/')}/gists/{self.gist_id}"

    def publish(self, record: EndpointRecord) -> None:
        token = self._token_lookup()
        if not token:
            raise PublishError(
                "no GitHub token for gist publishing; store one with a 'gist' scope in the keyring "
                f"(secret {secrets.GITHUB_TOKEN!r}, e.g. via `bridge login`)"
            )
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }
        body = {"files": {GIST_FILE_NAME: {"content": record.to_json()}}}
        _send(self._session, "PATCH", self.api_url, f"GitHub gist {self.gist_id}", timeout=self._timeout_s,
              headers=headers, json=body)
        log.info("Published endpoint record to gist %s", self.gist_id)

    def describe(self) -> str:
        return f"gist:{self.gist_id}"

    def close(self) -> None:
        self._session.close()


class HttpPublisher(Publisher):
    """Sends the record's JSON to an HTTPS URL (PUT by default; POST for endpoints like ntfy topics)."""

    def __init__(self, url: str, method: str = "PUT", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES) -> None:
        method = method.upper()
        if method not in ("PUT", "POST"):
            raise ConfigError(f"publish method {method!r} is not PUT or POST")
        _check_url(url, "--publish")
        self.url = url
        self.method = method
        self._timeout_s = timeout_s
        self._session = _session(retries, frozenset({method}))

    def publish(self, record: EndpointRecord) -> None:
        _send(self._session, self.method, self.url, self.describe(), timeout=self._timeout_s,
              data=record.to_json().encode(), headers={"Content-Type": "application/json"})
        log.info("Published endpoint record to %s", self.describe())

    def describe(self) -> str:
        return _without_query(self.url)

    def close(self) -> None:
        self._session.close()


def _check_url(url: str, what: str) -> None:
    """https://…, or plain http only to this machine; never credentials in the URL."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ConfigError(f"{what}: the URL must not carry credentials (they would show in logs and status)")
    if not parts.hostname or parts.scheme not in ("https", "http"):
        raise ConfigError(f"{what} {_without_query(url)!r} is not an https:// URL")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ConfigError(
            f"{what} {_without_query(url)!r}: plain http is allowed only to 127.0.0.1/localhost; use https://"
        )


def _without_query(url: str) -> str:
    """The URL without its query string, which may carry an access key (?auth=…)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else "")


def publisher_for(spec: str | None) -> Publisher:
    """The publisher a `--publish` value names: None → the default record file; file:PATH; gist:ID; https://…."""
    if spec is None or not spec.strip():
        return FilePublisher(paths().record_file)
    value = spec.strip()
    if value.startswith("file:"):
        path = value[len("file:"):]
        if path.startswith("//"):  # file:///abs/path
            path = path[2:]
        if not path:
            raise ConfigError(f"--publish {spec!r} names no file; accepted: {SPEC_FORMS}")
        return FilePublisher(path)
    if value.startswith("gist:"):
        return GistPublisher(value[len("gist:"):])
    if value.startswith(("https://", "http://")):
        return HttpPublisher(value)
    raise ConfigError(f"--publish {spec!r} is not understood; accepted: {SPEC_FORMS}")
