"""Find the access token and the workstation's URL, trusting a published record only once it verifies.

    token:    argument → BRIDGE_TOKEN → Colab secret BRIDGE_TOKEN (only in Colab) → OS keyring
    endpoint: argument → BRIDGE_URL → record named by BRIDGE_DISCOVERY → local default record
              → the relay (BRIDGE_RELAY, default https://ntfy.sh; "off": none)

The relay holds the record sealed on a topic derived from the token (bridge/rendezvous.py): with the token
alone a client polls it, opens the newest message that opens with its key, and verifies what is inside.
A record (`file:PATH`, `gist:ID`, `https://…`, the relay's) is checked with `bridge.record.verify_record` before its URL
is returned, so no credential is ever sent to a URL the workstation did not sign. The environment is read
at call time. Error messages name sources, never secrets.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from bridge import config, secrets
from bridge.client.options import DEFAULT_REDISCOVER_INTERVAL_S, ClientOptions
from bridge.errors import BridgeError, ConfigError, DiscoveryError, RecordError, SecretError
from bridge.record import (
    GIST_FILE_NAME,
    GITHUB_API_ENV,
    EndpointRecord,
    RecordFreshness,
    check_http_url,
    describe_url,
    verify_record,
)
from bridge.record import GITHUB_API as DEFAULT_GITHUB_API
from bridge.rendezvous import MAX_POLL_BYTES, RELAY_ENV, Rendezvous, describe_relay, relay_from_env
from bridge.secrets import GITHUB_TOKEN_ENV

log = logging.getLogger(__name__)

TOKEN_ENV = "BRIDGE_TOKEN"
URL_ENV = "BRIDGE_URL"
DISCOVERY_ENV = "BRIDGE_DISCOVERY"

COLAB_SECRET_NAME = "BRIDGE_TOKEN"
DEFAULT_FETCH_TIMEOUT_S = 5.0
#: A record is a few hundred bytes; anything far larger is not one, and is not read whole.
MAX_RECORD_BYTES = 64 * 1024

ACCEPTED_FORMS = "file:PATH, gist:ID, or an https:// URL (http:// only for 127.0.0.1/localhost)"


def in_colab() -> bool:
    """True when this process runs inside Google Colab (its `google.colab` package is present)."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def _colab_secret(name: str) -> str | None:
    """The Colab secret `name`, or None when it is missing, not shared with this notebook, or unreadable."""
    try:
        userdata = importlib.import_module("google.colab.userdata")
    except ImportError:
        return None
    try:
        value = userdata.get(name)
    except Exception as exc:  # SecretNotFoundError, NotebookAccessError, TimeoutException, …
        # Only the class name: Colab's messages are harmless, but nothing here should echo secret-adjacent text.
        log.debug("Colab secret %s not available (%s)", name, type(exc).__name__)
        return None
    if not isinstance(value, str):
        return None
    return value.strip() or None


def find_token(token: str | None = None) -> str | None:
    """The access token: argument → BRIDGE_TOKEN → Colab secret BRIDGE_TOKEN (in Colab) → OS keyring."""
    if token:
        return token
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    if in_colab():
        value = _colab_secret(COLAB_SECRET_NAME)
        if value:
            return value
    try:
        return secrets.access_token(create=False)
    except SecretError as exc:
        log.debug("No access token from the secret store: %s", exc)
        return None


@dataclass(frozen=True)
class Endpoint:
    """Where to send MLflow calls, which source said so, and the verified record when there was one."""

    url: str
    source: str
    record: EndpointRecord | None = None

    def __repr__(self) -> str:
        # EndpointRecord's repr already hides its signature; the URL is checked to carry no credentials.
        expires = "" if self.record is None else f", expires_at={self.record.expires_at:.0f}"
        return f"Endpoint(url={self.url!r}, source={self.source!r}{expires})"


def normalize_url(url: str, *, what: str = "server URL") -> str:
    """`url` without a trailing slash, or a ConfigError when it is not a plain http(s) URL."""
    text = url.strip()
    try:
        # Plain http to a LAN/VPN address is allowed here: `bridge serve --tunnel none --host 100.x.y.z`.
        check_http_url(text, allow_plain_http_loopback_only=False, what=what)
    except ConfigError as exc:
        hint = f"; pass the token with token=… or {TOKEN_ENV} instead" if "credentials" in str(exc) else ""
        raise ConfigError(f"{exc}{hint}") from None
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ConfigError(f"{what} {describe_url(text)!r} must not have a query or fragment")
    return text.rstrip("/")


# --------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Spec:
    kind: str  # "file" | "gist" | "url" | "relay"
    value: str  # a path, a gist id, or a URL (the relay's base URL for "relay")

    def describe(self) -> str:
        if self.kind == "relay":
            return describe_relay(self.value)
        if self.kind == "file":
            return f"file:{self.value}"
        if self.kind == "gist":
            return f"gist:{self.value}"
        return describe_url(self.value)


def _parse_spec(spec: str) -> _Spec:
    text = spec.strip()
    if text.startswith("file:"):
        path = text[len("file:") :]
        if path.startswith("//"):  # file:///abs/path
            path = urlsplit(text).path
        if not path:
            raise ConfigError(f"discovery source {spec!r} names no file; accepted forms: {ACCEPTED_FORMS}")
        return _Spec("file", str(Path(path).expanduser()))
    if text.startswith("gist:"):
        # Accept a pasted gist URL or owner/ID as well: the ID is the last path segment.
        gist_id = text[len("gist:") :].rstrip("/").rsplit("/", 1)[-1]
        if not gist_id or not gist_id.isalnum():
            raise ConfigError(f"discovery source {spec!r} has no valid gist ID; accepted forms: {ACCEPTED_FORMS}")
        return _Spec("gist", gist_id)
    if urlsplit(text).scheme in ("http", "https"):
        try:
            check_http_url(text, what="discovery source")
        except ConfigError as exc:
            raise ConfigError(f"{exc} (accepted forms: {ACCEPTED_FORMS})") from None
        return _Spec("url", text)
    raise ConfigError(f"discovery source {describe_url(text)!r} is not understood; accepted forms: {ACCEPTED_FORMS}")


def _read_limited(resp: requests.Response, source: str) -> str:
    body = b""
    for chunk in resp.iter_content(8192):
        body += chunk
        if len(body) > MAX_RECORD_BYTES:
            raise DiscoveryError(
                f"{source} returned more than {MAX_RECORD_BYTES} bytes; that is not an endpoint record"
            )
    return body.decode(resp.encoding or "utf-8", errors="replace")


def _http_get(url: str, *, source: str, timeout: float, headers: dict[str, str] | None = None) -> requests.Response:
    try:
        resp = requests.get(url, headers=headers or {}, timeout=timeout, stream=True, allow_redirects=True)
    except requests.Timeout:
        raise DiscoveryError(f"{source} did not answer within {timeout:g} s") from None
    except requests.RequestException as exc:
        # requests' messages repeat the full URL (query included), so only the class name goes out.
        raise DiscoveryError(f"{source} could not be reached ({type(exc).__name__})") from None
    return resp


def _github_token() -> str | None:
    try:
        return secrets.github_token()
    except SecretError:
        return None


def _fetch_gist(gist_id: str, *, timeout: float) -> str:
    source = f"gist:{gist_id}"
    api = (os.environ.get(GITHUB_API_ENV, "").strip() or DEFAULT_GITHUB_API).rstrip("/")
    try:
        check_http_url(api, what=GITHUB_API_ENV)  # a GitHub token may go there: https, or loopback for tests
    except ConfigError as exc:
        raise DiscoveryError(f"{source}: {exc}") from None
    headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
    gh_token = _github_token()
    if gh_token:
        headers["Authorization"] = f"Bearer {gh_token}"
    resp = _http_get(f"{api}/gists/{gist_id}", source=source, timeout=timeout, headers=headers)
    with resp:
        if resp.status_code == 404:
            raise DiscoveryError(f"{source}: GitHub has no such gist (a secret gist needs its exact ID)")
        if resp.status_code in (403, 429):
            hint = "" if gh_token else f"; set {GITHUB_TOKEN_ENV} to raise the limit"
            raise DiscoveryError(f"{source}: GitHub refused the request (HTTP {resp.status_code}, rate limit?){hint}")
        if resp.status_code == 401:
            raise DiscoveryError(f"{source}: GitHub rejected the GitHub token (HTTP 401)")
        if resp.status_code != 200:
            raise DiscoveryError(f"{source}: GitHub answered HTTP {resp.status_code}")
        try:
            files = resp.json().get("files") or {}
        except (ValueError, AttributeError):
            raise DiscoveryError(f"{source}: GitHub's answer is not the expected JSON") from None
    entry = files.get(GIST_FILE_NAME)
    if not isinstance(entry, dict):
        names = ", ".join(sorted(files)) or "none"
        raise DiscoveryError(
            f"{source} has no file {GIST_FILE_NAME!r} (files: {names}); was it published by `bridge serve`?"
        )
    content = entry.get("content")
    if entry.get("truncated") or content is None:
        raw_url = entry.get("raw_url")
        if not raw_url:
            raise DiscoveryError(f"{source}: {GIST_FILE_NAME} is truncated and has no raw_url")
        # The raw file lives on another host: the GitHub token is not sent there.
        raw = _http_get(raw_url, source=f"{source} (raw file)", timeout=timeout)
        with raw:
            if raw.status_code != 200:
                raise DiscoveryError(f"{source}: raw file answered HTTP {raw.status_code}")
            return _read_limited(raw, source)
    return str(content)


def _fetch_url(url: str, *, timeout: float) -> str:
    source = describe_url(url)
    resp = _http_get(url, source=source, timeout=timeout, headers={"Accept": "application/json"})
    with resp:
        if resp.status_code != 200:
            raise DiscoveryError(f"{source} answered HTTP {resp.status_code}")
        return _read_limited(resp, source)


def _fetch_file(path: str) -> str:
    source = f"file:{path}"
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        raise DiscoveryError(f"{source}: no such file (is `bridge serve` publishing there?)") from None
    except OSError as exc:
        raise DiscoveryError(f"{source} could not be read ({type(exc).__name__})") from None
    if len(data) > MAX_RECORD_BYTES:
        raise DiscoveryError(f"{source} is larger than {MAX_RECORD_BYTES} bytes; that is not an endpoint record")
    return data.decode("utf-8", errors="replace")


def _poll_relay(relay: str, token: str, *, timeout: float) -> list[str]:
    """The records sealed for `token` on its relay topic, opened, newest first; messages that do not open are skipped.

    ntfy's poll API: `GET <relay>/<topic>/json?poll=1&since=all` answers one JSON object per line, oldest first,
    with the body in "message" (docs/subscribe/api.md). Junk anyone posted to the topic simply fails to open.
    """
    rendezvous = Rendezvous.for_token(relay, token)
    source = rendezvous.describe()
    # _http_get's errors name the class only: the URL holds the topic.
    resp = _http_get(rendezvous.poll_url, source=source, timeout=timeout, headers={"Accept": "application/x-ndjson"})
    with resp:
        if resp.status_code == 429:
            raise DiscoveryError(f"{source} refused the poll (HTTP 429: rate limit); trying again later")
        if resp.status_code != 200:
            raise DiscoveryError(f"{source} answered HTTP {resp.status_code}")
        lines: list[bytes] = []
        size = 0
        for line in resp.iter_lines(chunk_size=8192):
            size += len(line) + 1
            if size > MAX_POLL_BYTES:
                # Newest last: keep what was read, the newest of it may still be ours; the topic was flooded.
                log.warning("%s: the topic holds more than %d bytes (flooded?); reading no further", source, size)
                break
            if line.strip():
                lines.append(line)
    opened: list[str] = []
    for line in reversed(lines):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict) or message.get("event", "message") != "message":
            continue
        try:
            opened.append(rendezvous.open(str(message.get("message", ""))))
        except RecordError:
            continue
    if not opened:
        raise DiscoveryError(
            f"{source} holds no record for this access token (is `bridge serve` running with its relay on and a "
            "tunnel open? after `bridge token --rotate`, update BRIDGE_TOKEN here: the rendezvous moved with it)"
        )
    return opened


def _fetch(spec: _Spec, *, timeout: float) -> str:
    if spec.kind == "file":
        return _fetch_file(spec.value)
    if spec.kind == "gist":
        return _fetch_gist(spec.value, timeout=timeout)
    return _fetch_url(spec.value, timeout=timeout)


def fetch_record(spec: str, *, timeout: float = DEFAULT_FETCH_TIMEOUT_S) -> str:
    """The raw (unverified) record text named by `spec`: `file:PATH`, `gist:ID` or an https URL."""
    return _fetch(_parse_spec(spec), timeout=timeout)


# ------------------------------------------------------------------------------------------- discovery


def _record_sources() -> list[_Spec]:
    """The record sources to consult, in order: BRIDGE_DISCOVERY, the local default record if present, the relay."""
    found: list[_Spec] = []
    spec = os.environ.get(DISCOVERY_ENV, "").strip()
    if spec:
        found.append(_parse_spec(spec))
    local = config.paths().record_file
    if local.is_file() and not any(s.kind == "file" and Path(s.value).resolve() == local.resolve() for s in found):
        found.append(_Spec("file", str(local)))
    relay = relay_from_env()
    if relay is not None:
        found.append(_Spec("relay", relay))
    return found


#: Newest record seen per server instance in this process: an older one (a replay) is refused.
_freshness = RecordFreshness()


def _verified_endpoint(spec: _Spec, token: str, *, timeout: float) -> Endpoint:
    if spec.kind == "relay":
        return _verified_relay_endpoint(spec, token, timeout=timeout)
    text = _fetch(spec, timeout=timeout)
    try:
        record = _freshness.check(verify_record(text, token))
    except RecordError as exc:
        raise type(exc)(f"{spec.describe()}: {exc}") from None
    # verify_record has checked the scheme and that the URL carries no credentials.
    return Endpoint(url=record.url.rstrip("/"), source=spec.describe(), record=record)


def _verified_relay_endpoint(spec: _Spec, token: str, *, timeout: float) -> Endpoint:
    """The record on the relay that opens, verifies and was issued last; refused if older than one already seen.

    Issue time, not the relay's order, decides: whoever holds the topic can re-post an old genuine message, which
    then comes last, but cannot make it newer than the record the server published after it.
    """
    records: list[EndpointRecord] = []
    first_error: RecordError | None = None
    for text in _poll_relay(spec.value, token, timeout=timeout):
        try:
            records.append(verify_record(text, token))
        except RecordError as exc:  # expired, or signed by another token
            first_error = first_error or exc
    try:
        if not records:
            assert first_error is not None  # _poll_relay returned at least one opened record
            raise first_error
        record = _freshness.check(max(records, key=lambda r: r.issued_at))
    except RecordError as exc:
        raise type(exc)(f"{spec.describe()}: {exc}") from None
    return Endpoint(url=record.url.rstrip("/"), source=spec.describe(), record=record)


def find_endpoint(
    url: str | None = None, token: str | None = None, *, timeout: float = DEFAULT_FETCH_TIMEOUT_S
) -> Endpoint:
    """Where to log: argument → BRIDGE_URL → verified record from BRIDGE_DISCOVERY → verified local record."""
    if url:
        return Endpoint(url=normalize_url(url), source="argument")
    env_url = os.environ.get(URL_ENV, "").strip()
    if env_url:
        return Endpoint(url=normalize_url(env_url, what=URL_ENV), source=URL_ENV)

    tried = ["argument url (none)", f"{URL_ENV} (unset)"]
    if not os.environ.get(DISCOVERY_ENV, "").strip():
        tried.append(f"{DISCOVERY_ENV} (unset)")
    record_error: RecordError | None = None
    for spec in _record_sources():
        if not token:
            raise DiscoveryError(
                f"the endpoint record at {spec.describe()} needs the access token to verify it, and none was found; "
                f"pass token=…, set {TOKEN_ENV}, or add the Colab secret {COLAB_SECRET_NAME} "
                "(`bridge token` on the workstation prints it)"
            )
        try:
            return _verified_endpoint(spec, token, timeout=timeout)
        except RecordError as exc:
            log.warning("Ignoring endpoint record: %s", exc)
            record_error = record_error or exc
            tried.append(str(exc))
        except DiscoveryError as exc:
            log.info("Endpoint record not available: %s", exc)
            tried.append(str(exc))
    local = config.paths().record_file
    if not local.is_file():
        tried.append(f"local record file:{local} (absent)")

    if record_error is not None:
        # A record was found but cannot be trusted: say exactly why, as the record error it is.
        others = "; ".join(t for t in tried if t != str(record_error))
        raise type(record_error)(f"{record_error} (also tried: {others})")
    raise DiscoveryError(
        "no MLflow endpoint found; tried: " + "; ".join(tried) + ". "
        f"Set {URL_ENV} to the server URL, set {DISCOVERY_ENV} to where `bridge serve --publish` writes its "
        "record (file:PATH, gist:ID, https://…), or run `bridge serve` on this machine."
        + ("" if relay_from_env() else f" ({RELAY_ENV} is off, so no relay was asked.)")
    )


_rediscover_lock = threading.Lock()
_last_remote_fetch: dict[str, float] = {}
_warned_records: set[tuple[str, str]] = set()


def rediscover(
    token: str | None,
    current_url: str | None = None,
    *,
    interval_s: float | None = None,
    timeout: float = DEFAULT_FETCH_TIMEOUT_S,
) -> Endpoint | None:
    """A newly published endpoint whose URL differs from `current_url`, else None; never raises on fetch errors.

    Only the published record is re-read (BRIDGE_DISCOVERY, the local record, the relay): an explicit URL is fixed,
    so with BRIDGE_URL set this returns None. Remote sources are read at most every `interval_s`
    (ClientOptions.rediscover_interval_s, from BRIDGE_REDISCOVER_INTERVAL_S).
    """
    if not token or os.environ.get(URL_ENV, "").strip():
        return None
    if interval_s is None:
        try:
            interval_s = ClientOptions.from_env().rediscover_interval_s
        except ConfigError as exc:  # re-discovery runs in the sender's thread: a typo must not stop delivery
            log.debug("%s; using %s s", exc, DEFAULT_REDISCOVER_INTERVAL_S)
            interval_s = DEFAULT_REDISCOVER_INTERVAL_S
    try:
        sources = _record_sources()
    except ConfigError as exc:
        log.debug("Cannot re-discover: %s", exc)
        return None
    current = current_url.rstrip("/") if current_url else None
    for spec in sources:
        key = spec.describe()
        if spec.kind != "file":
            with _rediscover_lock:
                now = time.monotonic()
                last = _last_remote_fetch.get(key)
                if last is not None and now - last < interval_s:
                    return None  # asked too recently; a lower-priority source must not answer instead
                _last_remote_fetch[key] = now
        try:
            endpoint = _verified_endpoint(spec, token, timeout=timeout)
        except RecordError as exc:
            # Said once per source and reason: the sender asks again and again while the link is down.
            marker = (key, type(exc).__name__)
            with _rediscover_lock:
                first = marker not in _warned_records
                _warned_records.add(marker)
            (log.warning if first else log.debug)("Re-discovery ignored a record: %s", exc)
            continue
        except (BridgeError, OSError) as exc:
            log.debug("Re-discovery could not read %s: %s", key, exc)
            continue
        if endpoint.url != current:
            log.info("Endpoint changed to %s (from %s)", endpoint.url, endpoint.source)
            return endpoint
        return None
    return None
