"""The real HTTP transport (bridge/client/link/, RequestsTransport) against a server that closes a pooled
keep-alive connection just as the next request arrives — what uvicorn does to a connection idle for 5 s.

Harness seed 190213 (logged models on): after a slow `log_model` (a pytorch export), the next read went out on
such a connection and failed with no fault injected; the read took the server for unreachable, and `log_table`
raised TEMPORARILY_UNAVAILABLE where stock MLflow (whose client retries) logged the table.
"""

from __future__ import annotations

import io
import socket
import threading

import pytest

from bridge.client.link import Request, RequestsTransport
from bridge.errors import TransportError


class DropsSecondRequest:
    """127.0.0.1 HTTP server: on each connection answers the first request (keep-alive), reads the second and
    closes without an answer. Records (connection number, method, path, body length) of every request."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[tuple[int, str, str, int]] = []
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        number = 0
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            number += 1
            threading.Thread(target=self._connection, args=(conn, number), daemon=True).start()

    def _connection(self, conn: socket.socket, number: int) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            for answered in (True, False):
                line = reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                reader.read(length)
                self.seen.append((number, method, path, length))
                if answered:
                    body = b'{"ok": true}'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode()
                        + b"\r\nConnection: keep-alive\r\n\r\n"
                        + body
                    )

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def server():
    found = DropsSecondRequest()
    yield found
    found.close()


def test_a_read_on_a_connection_closed_under_it_goes_once_more_on_a_new_one(server):
    transport = RequestsTransport()
    assert transport.send(Request("GET", server.url + "/first")).status == 200
    answer = transport.send(Request("GET", server.url + "/second"))  # its pooled connection dies under it
    assert answer.status == 200
    assert server.seen == [(1, "GET", "/first", 0), (1, "GET", "/second", 0), (2, "GET", "/second", 0)]


def test_a_post_is_never_sent_again_by_the_transport(server):
    """A POST may have been applied before its connection died (a lost answer): trying it again is the
    journal's business (run keys, marks), never the transport's."""
    transport = RequestsTransport()
    assert transport.send(Request("GET", server.url + "/first")).status == 200
    with pytest.raises(TransportError):
        transport.send(Request("POST", server.url + "/runs/create", json={"experiment_id": "1"}))
    assert [(n, method) for n, method, _, _ in server.seen] == [(1, "GET"), (1, "POST")]


def test_an_upload_streamed_from_a_file_is_not_sent_again_half_read(server):
    transport = RequestsTransport()
    assert transport.send(Request("GET", server.url + "/first")).status == 200
    with pytest.raises(TransportError):
        transport.send(Request("PUT", server.url + "/artifact", data=io.BytesIO(b"x" * 1000)))
    assert [(n, method, length) for n, method, _, length in server.seen] == [(1, "GET", 0), (1, "PUT", 1000)]
