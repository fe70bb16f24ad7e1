"""The token-derived rendezvous on a relay: where `bridge serve` leaves its record so the token alone finds it.

    access token ──HKDF-SHA256──▶ topic (192 bits, ntfy's topic alphabet)   where the sealed record is posted
                 └─HKDF-SHA256──▶ key   (AES-256-GCM)                       what seals it

The relay is any server speaking ntfy's HTTP API (https://ntfy.sh by default, or a self-hosted one): the
server POSTs the sealed record to `<relay>/<topic>`; a client polls `<relay>/<topic>/json?poll=1`. The relay
sees an unguessable topic and base64 ciphertext, never the token, the URL or the record. The topic is a
capability (whoever holds it can read ciphertext and post junk to it), so it is kept out of logs and status.
A sealed record is bound to its topic (authenticated data), and is still a signed record inside: a client
verifies it exactly as it verifies one from a file or a gist (bridge/record.py).
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bridge.errors import ConfigError, RecordError
from bridge.record import check_http_url, describe_url

#: Where records go unless `--relay` / BRIDGE_RELAY says otherwise: the public ntfy server (no account).
DEFAULT_RELAY = "https://ntfy.sh"
#: Read by both sides at call time: a relay URL, or "off".
RELAY_ENV = "BRIDGE_RELAY"
OFF_WORDS = frozenset({"off", "none", "no", "false", "0"})

# ntfy's limits, as the real relay enforces them (tests/support/ntfy_relay.py enforces the same):
#: A message body may be at most 4,096 bytes; a longer one becomes an attachment, or is refused when the server
#: has none (binwiederhier/ntfy server/config.go DefaultMessageLengthLimit; docs/publish.md "Limitations").
MESSAGE_LIMIT_BYTES = 4096
#: A message is kept this long, then forgotten (server/config.go DefaultCacheDuration = 12h; ntfy.sh keeps the
#: default). The record is republished well before that (DEFAULT_REPUBLISH_S).
CACHE_DURATION_S = 12 * 3600
#: Requests per visitor (IP address): a bucket of 60, refilled one per 5 s (server/config.go
#: DefaultVisitorRequestLimitBurst / DefaultVisitorRequestLimitReplenish); past it the relay answers 429.
REQUEST_BURST = 60
REQUEST_REPLENISH_S = 5.0
#: ntfy.sh's free tier: 250 messages a day per IP address, then 429 "daily message quota reached" (code 42908;
#: binwiederhier/ntfy issues #740, #1265, #1963). Republishing every 4 h is 6 a day, plus one per URL change.
DAILY_MESSAGE_LIMIT = 250
#: One poll without a cursor replays the topic's whole cache; ntfy caps that replay at 10 MB (release v2.28.0).
#: A client reads no more than this of one poll.
MAX_POLL_BYTES = 10 * 1000 * 1000
#: How often the record is republished to the relay although nothing changed: a third of the cache duration,
#: so two republishes may fail before the relay forgets the record.
DEFAULT_REPUBLISH_S = 4 * 3600.0
#: The shortest republish period accepted: faster would spend ntfy.sh's daily quota for nothing.
MIN_REPUBLISH_S = 60.0

_SALT = b"bridge relay rendezvous v1"
_TOPIC_INFO = b"topic"
_KEY_INFO = b"record sealing key"
#: Marks the sealing format, so a later one can be told apart.
_PREFIX = "b1."
_NONCE_BYTES = 12
#: 24 bytes: 192 bits of topic, 32 characters of base64url (ntfy allows [-_A-Za-z0-9]{1,64}).
_TOPIC_BYTES = 24


def _derive(token: str, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(token.encode())


@dataclass(frozen=True)
class Rendezvous:
    """The topic and sealing key that one access token implies on a relay; its repr shows neither."""

    relay: str
    topic: str
    key: bytes

    @classmethod
    def for_token(cls, relay: str, token: str) -> Rendezvous:
        """Derive topic and key from `token` (HKDF-SHA256 with distinct labels); the token itself goes nowhere."""
        if not token:
            raise ConfigError("the relay rendezvous needs the access token")
        topic = base64.urlsafe_b64encode(_derive(token, _TOPIC_INFO, _TOPIC_BYTES)).decode().rstrip("=")
        return cls(relay=relay.rstrip("/"), topic=topic, key=_derive(token, _KEY_INFO, 32))

    @property
    def publish_url(self) -> str:
        return f"{self.relay}/{self.topic}"

    @property
    def poll_url(self) -> str:
        # since=all: every message still cached (a handful: one per republish and URL change), newest last.
        return f"{self.relay}/{self.topic}/json?poll=1&since=all"

    def describe(self) -> str:
        """Where records go, without the topic: `relay ntfy.sh (token-derived topic)`."""
        return describe_relay(self.relay)

    def seal(self, record_json: str) -> str:
        """The record encrypted under the token-derived key with a fresh random nonce, as ASCII for a message body."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(self.key).encrypt(nonce, record_json.encode(), self.topic.encode())
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, message: str) -> str:
        """The record text sealed in `message`; a `RecordError` when it was not sealed with this token's key."""
        text = message.strip()
        if not text.startswith(_PREFIX):
            raise RecordError("relay message is not a sealed bridge record")
        try:
            raw = base64.urlsafe_b64decode(text[len(_PREFIX) :])
        except (binascii.Error, ValueError):
            raise RecordError("relay message is not valid base64") from None
        if len(raw) <= _NONCE_BYTES + 16:
            raise RecordError("relay message is too short to be a sealed record")
        try:
            plain = AESGCM(self.key).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self.topic.encode())
        except InvalidTag:
            raise RecordError("relay message does not open with this access token's key") from None
        return plain.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Rendezvous({self.describe()})"


def describe_relay(relay: str) -> str:
    return f"relay {describe_url(relay.rstrip('/'))} (token-derived topic)"


def relay_url(value: str | None, *, what: str = RELAY_ENV) -> str | None:
    """The relay `value` names: None/empty → the default, an off word → None (no relay), else a checked URL."""
    text = (value or "").strip()
    if not text:
        return DEFAULT_RELAY
    if text.lower() in OFF_WORDS:
        return None
    # The relay sees only ciphertext, but plain http would show the topic to every hop: https, or loopback for tests.
    check_http_url(text, what=what)
    if urlsplit(text).query or urlsplit(text).fragment:
        raise ConfigError(f"{what} {describe_url(text)!r} must not have a query or fragment; name the server alone")
    return text.rstrip("/")


def relay_from_env() -> str | None:
    """The relay BRIDGE_RELAY names now (unset: the default; "off": none)."""
    return relay_url(os.environ.get(RELAY_ENV))
