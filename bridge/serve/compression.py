"""Response compression for the entrance: fewer bytes sent out through the tunnel (ngrok caps them per month).

    Accept-Encoding ──▶ choose_encoding() ──▶ br (when `brotli` is installed) or gzip, or none
    MLflow's static UI files ──▶ StaticCache: compressed once per (path, validator, encoding), then reused
    JSON/text bodies above MIN_COMPRESS_BYTES ──▶ compressed on the fly (gzip level 5: cheap, ~6x on MLflow's JSON)

Never compressed: bodies MLflow already encoded, types that are compressed already (images, archives, fonts in
woff2, octet-stream artifacts), partial content, and tiny bodies. MLflow's own cache headers pass through;
`Vary: Accept-Encoding` is added and a strong ETag becomes weak, as nginx does, since the bytes differ.
"""

from __future__ import annotations

import collections
import gzip
import threading
import zlib
from collections.abc import Callable

try:  # optional: ~15-20 % smaller than gzip on the UI's JavaScript
    import brotli
except ImportError:  # pragma: no cover - depends on the install
    brotli = None

#: Bodies smaller than this go out as they are: the saving would not pay for the CPU (and a TCP packet holds them).
MIN_COMPRESS_BYTES = 1024
#: gzip level on the fly: level 5 keeps most of level 9's gain on JSON at a fraction of its CPU.
GZIP_LEVEL_ON_THE_FLY = 5
#: Static files are compressed once, so they get the best levels.
GZIP_LEVEL_STATIC = 9
BROTLI_QUALITY_STATIC = 7  # 11 would take ~20 s of CPU on the 4.4 MB bundle for 1-2 % less
BROTLI_QUALITY_ON_THE_FLY = 4
#: Memory the compressed static files may take (the MLflow UI's bundle is ~2 MB compressed).
STATIC_CACHE_BYTES = 64 * 1024 * 1024
#: Where MLflow serves its UI's files (hashed names, cacheable for a long time).
STATIC_PREFIXES = ("/static-files/",)

_COMPRESSIBLE_TYPES = frozenset({
    "application/json", "application/javascript", "application/x-javascript", "application/ecmascript",
    "application/xml", "application/xhtml+xml", "application/rss+xml", "application/atom+xml",
    "application/manifest+json", "application/ld+json", "application/wasm", "application/x-yaml",
    "application/yaml", "application/x-ndjson", "application/vnd.ms-fontobject", "application/x-font-ttf",
    "font/ttf", "font/otf", "image/svg+xml", "image/x-icon", "image/vnd.microsoft.icon", "image/bmp",
})  # fmt: skip


def available_encodings() -> tuple[str, ...]:
    return ("br", "gzip") if brotli is not None else ("gzip",)


def choose_encoding(accept_encoding: str | None) -> str | None:
    """The best coding the client accepts and bridge can produce: br, then gzip; None for neither (q=0 honoured)."""
    if not accept_encoding:
        return None
    accepted: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name:
            accepted[name] = q
    for coding in available_encodings():
        q = accepted[coding] if coding in accepted else accepted.get("*", 0.0)
        if q > 0:
            return coding
    return None


def is_compressible(content_type: str | None) -> bool:
    """True for text, JSON, JavaScript, SVG and the like; False for already-compressed or unknown binary types."""
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime.startswith("text/") or mime in _COMPRESSIBLE_TYPES or mime.endswith(("+json", "+xml"))


def compress(data: bytes, coding: str, *, static: bool = False) -> bytes:
    if coding == "br" and brotli is not None:
        return brotli.compress(data, quality=BROTLI_QUALITY_STATIC if static else BROTLI_QUALITY_ON_THE_FLY)
    if coding == "gzip":
        # mtime=0: the same input gives the same bytes (a cache, ETag-friendly).
        return gzip.compress(data, compresslevel=GZIP_LEVEL_STATIC if static else GZIP_LEVEL_ON_THE_FLY, mtime=0)
    raise ValueError(f"unsupported coding {coding!r}")


class StreamCompressor:
    """Compresses a body streamed in chunks: `compress(chunk)` for each, then `finish()` once."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._process: Callable[[bytes], bytes]
        self._finish: Callable[[], bytes]
        if coding == "br" and brotli is not None:
            br = brotli.Compressor(quality=BROTLI_QUALITY_ON_THE_FLY)
            self._process, self._finish = br.process, br.finish
        elif coding == "gzip":
            gz = zlib.compressobj(GZIP_LEVEL_ON_THE_FLY, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            self._process, self._finish = gz.compress, gz.flush
        else:
            raise ValueError(f"unsupported coding {coding!r}")

    def compress(self, chunk: bytes) -> bytes:
        return self._process(chunk)

    def finish(self) -> bytes:
        return self._finish()


def weak_etag(etag: str | None) -> str | None:
    """A compressed body is not byte-equal to MLflow's: its validator becomes weak (W/"…"), as nginx does."""
    if not etag or etag.startswith("W/"):
        return etag
    return "W/" + etag


def add_vary(existing: str | None) -> str:
    if not existing:
        return "Accept-Encoding"
    if "accept-encoding" in existing.lower() or existing.strip() == "*":
        return existing
    return existing + ", Accept-Encoding"


class StaticCache:
    """Compressed static files, by (path, validator, coding), least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int = STATIC_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple[str, str, str], bytes] = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str, str]) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: tuple[str, str, str], value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = value
            self._size += len(value)
            while self._size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
