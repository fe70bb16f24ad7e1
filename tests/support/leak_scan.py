"""Session-end check of the spec's "the token never appears in any log file written during the test session".

Every access token that existed during the session is collected — each one generated or stored in this
process (`bridge.secrets.new_token` / `set_secret` are wrapped), and every secret left in a fallback secret
store file (`secrets.json`, which subprocesses such as `bridge serve` write too) under pytest's basetemp.
At the end of the session every file under the basetemp except those stores is scanned for them: logs,
process output, state and record JSON, MLflow's SQLite files, the client journals. A hit fails the run
(an error in the teardown of the session, so the exit status is non-zero) naming files, never a token.

Tokens rotated away inside a subprocess are not seen here; tests that rotate in a subprocess scan for
both tokens themselves (tests/test_no_secret_leaks.py).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import secrets

#: Shorter test values ("abc123") would match by chance; every real token is 43 characters.
MIN_TOKEN_CHARS = 16
#: The 0600 fallback secret store: the one file that must hold the secrets.
SECRET_STORE_NAMES = frozenset({"secrets.json"})
#: ngrok's own config holds its authtoken by design (pyngrok writes it there, mode 0600).
NGROK_CONFIG_NAMES = frozenset({"ngrok.yml", "ngrok.yaml"})
_URLSAFE = re.compile(rb"[A-Za-z0-9_\-]+")
#: 1 for each url-safe byte value, 0 for the rest (bytes.translate's table).
_SAFE_MASK = bytes(int(bool(_URLSAFE.fullmatch(bytes([b])))) for b in range(256))

_seen_in_process: set[str] = set()
_seen_ngrok: set[str] = set()
_planted: set[Path] = set()


def planted(path: Path) -> Path:
    """Mark a file a test writes a token into on purpose (the scanner's own tests), so the session scan skips it."""
    _planted.add(Path(path).resolve())
    return path


def _record(name: str, value: object) -> None:
    if not isinstance(value, str) or len(value) < MIN_TOKEN_CHARS:
        return
    if name == secrets.NGROK_AUTHTOKEN:
        _seen_ngrok.add(value)
    else:
        _seen_in_process.add(value)


def install_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember every token generated or stored in this process."""
    new_token, set_secret = secrets.new_token, secrets.set_secret

    def recording_new_token() -> str:
        token = new_token()
        _record(secrets.ACCESS_TOKEN, token)
        return token

    def recording_set_secret(name: str, value: str) -> None:
        _record(name, value)
        set_secret(name, value)

    monkeypatch.setattr(secrets, "new_token", recording_new_token)
    monkeypatch.setattr(secrets, "set_secret", recording_set_secret)


def _stored_secrets(root: Path) -> tuple[set[str], set[str]]:
    """(secrets other than ngrok's, ngrok authtokens) found in every secret store file under `root`."""
    tokens: set[str] = set()
    ngrok: set[str] = set()
    for store in root.rglob("secrets.json"):
        try:
            data = json.loads(store.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for name, value in data.items():
            if isinstance(value, str) and len(value) >= MIN_TOKEN_CHARS:
                (ngrok if name == secrets.NGROK_AUTHTOKEN else tokens).add(value)
    return tokens, ngrok


class _Matcher:
    """Finds any of many tokens in a file's bytes in one pass.

    A url-safe token lies inside a run of url-safe bytes at least as long as the shortest token. Within a run,
    only every `block`-th position is looked up, in a table of every `block`-long piece of every token: with
    `block` at most half the shortest token, each occurrence covers one looked-up piece, so none is missed,
    and a session's basetemp (hundreds of MiB, long runs in artifacts and databases) takes seconds, not a minute.
    The runs themselves are found in C: the bytes are mapped to a mask (1 where url-safe) and the mask searched for
    `shortest` ones in a row; a regular expression stepping through every byte of a session's 2 GiB (weights,
    zero-filled journal reserves, benchmark files) took over a minute of the session's end on a busy machine.
    """

    def __init__(self, tokens: set[str]) -> None:
        raws = {token.encode() for token in tokens}
        self.safe = {raw for raw in raws if _URLSAFE.fullmatch(raw)}
        self.other = [raw for raw in raws if raw not in self.safe]
        self.shortest = min(map(len, self.safe), default=0)
        self.block = max(1, min(16, (self.shortest + 1) // 2))
        self.pieces: dict[bytes, list[tuple[bytes, int]]] = defaultdict(list)
        for raw in self.safe:
            for offset in range(len(raw) - self.block + 1):
                self.pieces[raw[offset : offset + self.block]].append((raw, offset))

    def _runs_in(self, data: bytes) -> Iterator[bytes]:
        """Every maximal run of url-safe bytes at least `shortest` long."""
        mask = data.translate(_SAFE_MASK)
        needle = b"\x01" * self.shortest
        at = mask.find(needle)
        while at != -1:  # `at` starts a run: the search begins at 0 or just past a run's end (an unsafe byte)
            end = mask.find(b"\x00", at + self.shortest)
            end = len(data) if end == -1 else end
            yield data[at:end]
            at = mask.find(needle, end)

    def __bool__(self) -> bool:
        return bool(self.safe or self.other)

    def found_in(self, data: bytes) -> bool:
        if any(raw in data for raw in self.other):
            return True
        if not self.safe:
            return False
        block, pieces = self.block, self.pieces
        for run in self._runs_in(data):
            if run in self.safe:
                return True
            for start in range(0, len(run) - block + 1, block):
                for raw, offset in pieces.get(run[start : start + block], ()):
                    at = start - offset
                    if at >= 0 and run[at : at + len(raw)] == raw:
                        return True
        return False


def files_with_tokens(
    root: Path, tokens: set[str], ngrok_tokens: set[str] = frozenset(), skip: set[Path] = frozenset()
) -> list[str]:
    """Paths (relative to `root`) of files that hold one of `tokens` (or an ngrok token outside ngrok's config)."""
    everywhere = _Matcher(set(tokens))
    with_ngrok = _Matcher(set(tokens) | set(ngrok_tokens))
    leaks = []
    for path in sorted(root.rglob("*")):
        if path.name in SECRET_STORE_NAMES or path.is_symlink() or not path.is_file() or path.resolve() in skip:
            continue
        matcher = everywhere if path.name in NGROK_CONFIG_NAMES else with_ngrok
        if not matcher:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if matcher.found_in(data):
            leaks.append(str(path.relative_to(root)))
    return leaks


@pytest.fixture(scope="session", autouse=True)
def no_token_leaks_in_session_files(tmp_path_factory):
    """At session end, fail the run if any file written under the basetemp holds a token of this session."""
    patch = pytest.MonkeyPatch()
    install_hooks(patch)
    yield
    patch.undo()
    root = tmp_path_factory.getbasetemp()
    stored, stored_ngrok = _stored_secrets(root)
    leaks = files_with_tokens(root, _seen_in_process | stored, _seen_ngrok | stored_ngrok, _planted)
    if leaks:
        # File names only: the report itself must not become the leak.
        pytest.fail(
            f"{len(leaks)} file(s) written during the test session contain an access token or other secret:\n  "
            + "\n  ".join(leaks),
            pytrace=False,
        )
