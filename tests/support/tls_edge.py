"""The TLS half of a tunnel's edge, for tests that meet a public https name: terminate HTTPS on 127.0.0.1 and pass
the bytes on to the stand-in agent's forwarder (plain HTTP). Subclasses say where each connection goes:

    TlsRelay         (tests/test_browser.py) one forwarder, behind a self-signed certificate
    QuickTunnelEdge  (tests/support/colab_runtime.py) the forwarder of the quick tunnel the SNI name asks for
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path


class TlsEdge:
    """HTTPS on 127.0.0.1 (`port` once started) with `cert_file`/`key_file`, in an event loop of its own thread."""

    #: Whether `upstream` is told each connection's SNI name (else ""): only an edge that routes by name asks for it.
    routes_by_name = False

    def __init__(self, cert_file: Path, key_file: Path, *, name: str = "tls-edge") -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)
        self._names: dict[int, str] = {}
        if self.routes_by_name:
            self.context.sni_callback = self._sni
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def upstream(self, host: str) -> tuple[str, int] | None:
        """Where a connection for `host` (its SNI name, lower case; "" without one) goes; None: nowhere."""
        raise NotImplementedError

    def _sni(self, ssl_object, server_name, _context) -> None:
        self._names[id(ssl_object)] = (server_name or "").lower()

    def start(self):
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        target = self.upstream(self._names.pop(id(client_w.get_extra_info("ssl_object")), ""))
        try:
            if target is None:
                raise OSError("no upstream")
            up_r, up_w = await asyncio.open_connection(*target)
        except OSError:  # nowhere to go (a tunnel whose agent is gone): the connection ends, as a dead edge's would
            client_w.close()
            return

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w), return_exceptions=True)
