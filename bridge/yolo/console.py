"""Capture a training's console output as a log, with progress-bar redraws collapsed to their last frame.

`ConsoleCapture` tees `sys.stdout`/`sys.stderr` (where Ultralytics' progress bars write) and points the
`ultralytics` logger's stream handlers at the tee for the duration, so the terminal shows what it always
showed while `ConsoleLog` keeps what a terminal would finally display: a carriage return starts the line
over, ANSI escapes are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from typing import TextIO, cast

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
#: Lines kept; past this the oldest are dropped (the head is kept: it holds the set-up summary).
DEFAULT_MAX_LINES = 20_000
HEAD_LINES = 200


class ConsoleLog:
    """Lines of console text as a terminal would leave them; thread-safe, bounded."""

    def __init__(self, max_lines: int = DEFAULT_MAX_LINES) -> None:
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._partial = ""
        self._pending_cr = False
        self._dropped = 0
        self._max_lines = max(max_lines, HEAD_LINES + 1)
        self.version = 0  # bumped on every change, so a reader can tell whether to upload again

    def write(self, text: str) -> None:
        if not text:
            return
        text = _ANSI.sub("", text)
        with self._lock:
            self.version += 1
            for chunk in re.split(r"(\r|\n)", text):
                if chunk == "\n":
                    self._pending_cr = False  # "\r\n" is a plain newline
                    self._lines.append(self._partial)
                    self._partial = ""
                elif chunk == "\r":
                    self._pending_cr = True
                elif chunk:
                    if self._pending_cr:  # a redraw: the new frame replaces the line
                        self._partial = ""
                        self._pending_cr = False
                    self._partial += chunk
            if len(self._lines) > self._max_lines:
                cut = len(self._lines) - self._max_lines
                del self._lines[HEAD_LINES : HEAD_LINES + cut]
                self._dropped += cut

    def text(self) -> str:
        """The log so far, including the line being drawn."""
        with self._lock:
            lines = list(self._lines)
            partial, dropped = self._partial, self._dropped
        if dropped:
            lines.insert(HEAD_LINES, f"[... {dropped} lines dropped ...]")
        out = "\n".join(lines)
        if lines:
            out += "\n"
        return out + partial


class _Tee:
    """A text stream that writes to the original stream and to a `ConsoleLog`; everything else is delegated."""

    def __init__(self, stream: TextIO, log: ConsoleLog) -> None:
        self._stream = stream
        self._log = log

    def write(self, text: str) -> int:
        try:
            self._log.write(text)
        except Exception:  # the log must never break printing
            pass
        return self._stream.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class ConsoleCapture:
    """Install and remove the tee; `start()`/`stop()` nest safely and restore exactly what was there."""

    def __init__(self, log: ConsoleLog | None = None, logger_name: str = "ultralytics") -> None:
        self.log = log or ConsoleLog()
        self._logger_name = logger_name
        self._saved: tuple[TextIO, TextIO] | None = None
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []

    @property
    def active(self) -> bool:
        return self._saved is not None

    def start(self) -> None:
        if self._saved is not None:
            return
        out, err = sys.stdout, sys.stderr
        self._saved = (out, err)
        # A stand-in for a TextIO: whatever it does not define itself is delegated to the wrapped stream.
        tee_out = cast(TextIO, _Tee(out, self.log))
        sys.stdout = tee_out
        sys.stderr = _Tee(err, self.log)
        # Ultralytics' logger holds the stdout of its import time; send it through the tee too.
        for h in logging.getLogger(self._logger_name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                self._handlers.append((h, _swap_stream(h, tee_out)))

    def stop(self) -> None:
        if self._saved is None:
            return
        out, err = self._saved
        # Only undo our own tee: someone who replaced it after us keeps theirs.
        if isinstance(sys.stdout, _Tee) and sys.stdout._stream is out:
            sys.stdout = out
        if isinstance(sys.stderr, _Tee) and sys.stderr._stream is err:
            sys.stderr = err
        for h, stream in self._handlers:
            _swap_stream(h, stream)
        self._handlers.clear()
        self._saved = None


@contextlib.contextmanager
def logger_follows_stdout(logger_name: str = "ultralytics") -> Iterator[None]:
    """Point the logger's stream handlers at the current `sys.stdout` for a while (e.g. a rich live display's
    proxy, so log lines print above the progress bars instead of through them)."""
    saved = [
        (h, h.stream)
        for h in logging.getLogger(logger_name).handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for h, _ in saved:
        _swap_stream(h, sys.stdout)
    try:
        yield
    finally:
        for h, stream in saved:
            _swap_stream(h, stream)


def _swap_stream(handler: logging.StreamHandler, stream: TextIO) -> TextIO:
    """Point `handler` at `stream` and return the old one. Unlike `setStream`, this never flushes the old
    stream, which may already be closed (a handler created while stdout was a since-closed capture)."""
    handler.acquire()
    try:
        old, handler.stream = handler.stream, stream
    finally:
        handler.release()
    return old


_ERASE = re.compile(r"\x1b\[[012]?K")


class _LineWriter:
    """A stream that passes on whole lines only, each as a terminal would finally show it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._partial = ""
        self._pending_cr = False

    def write(self, text: str) -> int:
        for chunk in re.split(r"(\r|\n)", _ERASE.sub("", text)):
            if chunk == "\n":
                self._stream.write(self._partial + "\n")
                self._partial, self._pending_cr = "", False
            elif chunk == "\r":
                self._pending_cr = True
            elif chunk:
                if self._pending_cr:
                    self._partial, self._pending_cr = "", False
                self._partial += chunk
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):  # the wrapped stream was closed under us
            self._stream.flush()

    def close_line(self) -> None:
        if self._partial:
            self._stream.write(self._partial + "\n")
            self._partial = ""

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def collapsed_output(logger_name: str = "ultralytics") -> Iterator[None]:
    """While inside, stdout/stderr and the logger carry whole lines only: progress-bar redraws are collapsed to
    their final frame. For a display (e.g. rich's live progress) that cannot handle carriage returns."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LineWriter(out), _LineWriter(err)
    try:
        with logger_follows_stdout(logger_name):
            yield
    finally:
        for writer in (sys.stdout, sys.stderr):
            if isinstance(writer, _LineWriter):
                writer.close_line()
        sys.stdout, sys.stderr = out, err
