"""The signed endpoint record: written by `bridge serve`, verified by `bridge.connect()`.

A record says where the workstation can be reached now. It is signed with HMAC-SHA256 under a
key derived from the access token, so a client holding the token can check that the URL came
from its own workstation before sending the token there. The token itself is never in it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from bridge.errors import ConfigError, RecordError, RecordExpiredError, RecordSignatureError

RECORD_VERSION = 1
_KEY_LABEL = b"bridge endpoint record signing key v1"
#: Clocks of Colab and a workstation disagree a little; a record "from the future" within this is fine.
CLOCK_SKEW_S = 300

# Names both sides must agree on: the publisher writes them, discovery reads them.
#: The file inside a gist that holds the record.
GIST_FILE_NAME = "bridge-endpoint.json"
#: The GitHub API base; `GITHUB_API_ENV` overrides it (tests point it at a local stand-in).
GITHUB_API = "https://api.github.com"
GITHUB_API_ENV = "BRIDGE_GITHUB_API"
#: Host names that mean "this machine"; the only ones plain http may reach.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def describe_url(url: str) -> str:
    """`url` fit for messages: no user info, and the query (which may carry a key, ?auth=…) replaced by `?…`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparseable URL)"
    if ":" in host:
        host = f"[{host}]"
    if port:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def check_http_url(url: str, *, allow_plain_http_loopback_only: bool = True, what: str = "URL") -> str:
    """Return `url` when it is http(s) with a host and no credentials; else raise a `ConfigError` naming `what`.

    With `allow_plain_http_loopback_only` (the default), plain http is accepted only to this machine, since
    whatever travels there (a token, a record) would cross the network in clear text.
    """
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        raise ConfigError(f"{what} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ConfigError(f"{what} {describe_url(url)!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ConfigError(f"{what}: the URL must not carry credentials (they would show in logs and status)")
    if allow_plain_http_loopback_only and parts.scheme == "http" and hostname not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"{what} {describe_url(url)!r}: plain http is allowed only to 127.0.0.1/localhost; use https://"
        )
    return url


def signing_key(token: str) -> bytes:
    """Derive the record key from the access token, so the record never needs the token itself."""
    return hmac.new(token.encode(), _KEY_LABEL, hashlib.sha256).digest()


@dataclass(frozen=True)
class EndpointRecord:
    """Where a `bridge serve` instance is reachable, until when, and who says so."""

    url: str
    issued_at: float
    expires_at: float
    instance: str
    mlflow_version: str
    version: int = RECORD_VERSION
    signature: str = field(default="", repr=False)

    def _payload(self) -> bytes:
        fields = asdict(self)
        fields.pop("signature")
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, token: str) -> EndpointRecord:
        sig = hmac.new(signing_key(token), self._payload(), hashlib.sha256).hexdigest()
        return EndpointRecord(**{**asdict(self), "signature": sig})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def make_record(
    url: str, *, token: str, instance: str, mlflow_version: str, ttl_s: float, now: float | None = None
) -> EndpointRecord:
    """A new record for `url`, valid for `ttl_s` seconds from `now`, signed with `token`."""
    _check_url(url)
    issued = time.time() if now is None else now
    return EndpointRecord(
        url=url.rstrip("/"),
        issued_at=round(issued, 3),
        expires_at=round(issued + ttl_s, 3),
        instance=instance,
        mlflow_version=mlflow_version,
    ).signed(token)


def _check_url(url: str) -> None:
    # A record may point at plain http on a LAN/VPN address (`--tunnel none --host 100.x.y.z`).
    try:
        check_http_url(url, allow_plain_http_loopback_only=False, what="record URL")
    except ConfigError as exc:
        raise RecordError(str(exc)) from None


def parse_record(text: str | bytes) -> EndpointRecord:
    """Parse a record's JSON without trusting it yet; see `verify_record`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"endpoint record is not valid JSON ({exc.msg} at position {exc.pos})") from None
    except UnicodeDecodeError:  # bytes that are not UTF-8/16/32 (a ValueError without .msg and .pos)
        raise RecordError("endpoint record is not valid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise RecordError("endpoint record must be a JSON object")
    required = ("url", "issued_at", "expires_at", "instance", "mlflow_version", "signature")
    missing = [name for name in required if name not in data]
    if missing:
        raise RecordError(f"endpoint record lacks {', '.join(missing)}")
    if data.get("version", RECORD_VERSION) != RECORD_VERSION:
        raise RecordError(f"endpoint record version {data.get('version')!r} is not supported (want {RECORD_VERSION})")
    try:
        return EndpointRecord(
            url=str(data["url"]),
            issued_at=float(data["issued_at"]),
            expires_at=float(data["expires_at"]),
            instance=str(data["instance"]),
            mlflow_version=str(data["mlflow_version"]),
            version=RECORD_VERSION,
            signature=str(data["signature"]),
        )
    except (TypeError, ValueError):
        raise RecordError("endpoint record has a field of the wrong type") from None


def verify_record(record: EndpointRecord | str | bytes, token: str, *, now: float | None = None) -> EndpointRecord:
    """Return the record if `token`'s key signed it and it is current; raise a `RecordError` saying why not."""
    if not isinstance(record, EndpointRecord):
        record = parse_record(record)
    expected = hmac.new(signing_key(token), record._payload(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, record.signature):
        raise RecordSignatureError(
            "endpoint record signature does not match this access token "
            "(the record was altered, or signed by a server with a different token)"
        )
    _check_url(record.url)
    now = time.time() if now is None else now
    if record.expires_at <= now:
        age = now - record.expires_at
        raise RecordExpiredError(
            f"endpoint record for {record.url} expired {age:.0f} s ago; is `bridge serve` running?"
        )
    if record.issued_at > now + CLOCK_SKEW_S:
        raise RecordError(f"endpoint record was issued {record.issued_at - now:.0f} s in the future; check the clocks")
    return record


class RecordFreshness:
    """Refuses a record older than the newest one already accepted from the same server instance.

    Signature and expiry cannot stop a replay: anyone who can write a world-writable publish target (an ntfy
    topic) can put back an older, still-valid record pointing at a stale URL. Keep one of these per client
    and call `check()` after `verify_record()`.
    """

    def __init__(self) -> None:
        self._newest: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, record: EndpointRecord) -> EndpointRecord:
        """Return `record` and remember it, or raise a `RecordError` when it is older than one seen before."""
        with self._lock:
            newest = self._newest.get(record.instance)
            if newest is not None and record.issued_at < newest:
                raise RecordError(
                    f"endpoint record for {describe_url(record.url)} was issued {newest - record.issued_at:.0f} s "
                    "before one already seen from the same server; refusing the older record (replayed?)"
                )
            self._newest[record.instance] = record.issued_at
            return record
