"""Replies are read to a bound: a server answering without end, or with a compression bomb,
cannot fill the memory of the training process, the CLI or a notebook."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import pytest

MIB = 1 << 20


class FloodServer:
    """A real HTTP/1.1 server answering every request ``200`` with ``head`` (extra header
    lines) and the chunks ``body()`` yields, for as long as it yields them; ``sent`` counts
    the body bytes the client took."""

    def __init__(self, head: bytes, body: Callable[[], Iterator[bytes]]) -> None:
        self.head, self.body = head, body
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.sent = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client hung up: what it wanted
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + self.head)
            for chunk in self.body():
                conn.sendall(chunk)
                self.sent += len(chunk)

    def close(self) -> None:
        self.sock.close()


def endless() -> Iterator[bytes]:
    """A chunked body that never ends, 1 MiB of spaces a chunk."""
    chunk = b" " * MIB
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    while True:
        yield frame


def gzip_of_zeros(mib: int) -> bytes:
    """``mib`` MiB of zeros gzipped: ~1 KB a MiB."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(MIB)
    return b"".join(squeeze.compress(block) for _ in range(mib)) + squeeze.flush()


@pytest.fixture
def flood() -> Iterator[FloodServer]:
    server = FloodServer(b"transfer-encoding: chunked\r\n\r\n", endless)
    yield server
    server.close()


def bomb_server(mib: int) -> FloodServer:
    bomb = gzip_of_zeros(mib)
    head = b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(bomb)
    return FloodServer(head, lambda: iter([bomb]))


def assert_connection_closed(server: FloodServer) -> None:
    """The client hung up: the server can send no more (a reader left running would take
    hundreds of MiB a second)."""
    deadline = time.monotonic() + 10.0
    before = -1
    while server.sent != before:  # a send under way when the client hung up may still end
        assert time.monotonic() < deadline, f"the server is still sending: {server.sent} bytes"
        before = server.sent
        time.sleep(0.5)
    assert server.sent < 64 * MIB  # what was read plus the sockets' buffers


def test_the_training_client_reads_an_endless_reply_to_its_bound(flood: FloodServer) -> None:
    from spectrawatch._transport import Api, Unavailable

    api = Api(flood.url, None, timeout_s=5.0, deadline_s=5.0)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"POST /projects: .*reply larger than 4\.0 MiB"):
        api.create_project("p")
    assert time.monotonic() - t0 < 5.0  # refused at the bound, not abandoned at the deadline
    assert_connection_closed(flood)


def test_the_training_client_inflates_a_gzip_bomb_only_to_its_bound() -> None:
    from spectrawatch._transport import Api, Unavailable

    server = bomb_server(256)  # 256 KB of gzip
    try:
        api = Api(server.url, None, timeout_s=5.0, deadline_s=5.0)
        tracemalloc.start()
        try:
            with pytest.raises(Unavailable, match="reply larger than"):
                api.create_project("p")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * MIB  # inflated whole: 256 MiB
    finally:
        server.close()


def test_a_request_abandoned_at_its_deadline_stops_reading() -> None:
    from spectrawatch._transport import Api, Unavailable

    def slow() -> Iterator[bytes]:
        while True:
            time.sleep(0.05)
            yield b"1000\r\n" + b" " * 4096 + b"\r\n"

    server = FloodServer(b"transfer-encoding: chunked\r\n\r\n", slow)
    try:
        api = Api(server.url, None, timeout_s=1.0, deadline_s=0.5)
        with pytest.raises(Unavailable, match="no complete reply"):
            api.create_project("p")
        time.sleep(0.3)  # the abandoned request's next chunk ends it
        assert not any(t.is_alive() for t in api._abandoned)
    finally:
        server.close()


def test_a_reply_echoing_a_large_config_is_still_read() -> None:
    """The bound of the training client grows with what it sent: a run's reply echoes its
    config, which may be larger than the bound of the API's other replies."""
    import httpx

    from spectrawatch._transport import Api

    config = {"vocab": "x" * (6 * MIB)}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, content=request.content[:-1] + b',"id":1}')

    api = Api("http://sw.test", transport=httpx.MockTransport(handler))
    assert api.create_run("p", "r", config)["config"] == config


def test_a_resumed_runs_reply_echoing_a_config_another_process_sent_is_read() -> None:
    """A run resumed (or closed) by a process that sent no config: its reply echoes the stored
    config and summary, which another process sent (the server takes 32 MiB bodies); refused
    past 4 MiB, the resumed run's frames stayed spooled and ``sync`` could not deliver them."""
    import httpx

    from spectrawatch._transport import Api

    stored = {"vocab": "x" * (20 * MIB)}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": 1, "config": stored, "summary": stored})

    api = Api("http://sw.test", transport=httpx.MockTransport(handler))
    assert api.create_run("p", "r")["config"] == stored
    assert api.update_run(1, "finished")["summary"] == stored


def test_the_cli_reads_an_endless_reply_to_its_bound(flood: FloodServer) -> None:
    from spectrawatch._cli_http import CliError, call

    args = argparse.Namespace(url=flood.url, token=None)
    with pytest.raises(CliError, match=r"GET /runs: reply larger than 1\.0 MiB"):
        call(args, "GET", "/runs", MIB)
    assert_connection_closed(flood)


def test_the_notebook_api_reads_an_endless_reply_to_its_bound(
    flood: FloodServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spectrawatch.api as client_api

    monkeypatch.setattr(client_api, "REPLY_MAX", MIB)
    with (
        client_api.Api(flood.url, timeout_s=5) as api,
        pytest.raises(client_api.ApiError, match=r"GET /projects: reply larger than 1\.0 MiB"),
    ):
        api.projects()
    assert_connection_closed(flood)


def test_a_gzipped_reply_within_the_bound_is_decoded() -> None:
    import httpx

    from spectrawatch._reply import read_reply

    body = b'[{"name": "p"}]' + b" " * 100_000
    packed = gzip.compress(body)
    head = b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(packed)
    server = FloodServer(head, lambda: iter([packed]))
    try:
        with httpx.Client() as client:
            reply = read_reply(client, client.build_request("GET", server.url), len(body))
        assert reply.json() == [{"name": "p"}]
        assert "content-encoding" not in reply.headers
    finally:
        server.close()


@pytest.mark.parametrize("coding", [b"br", b"zstd", b"gzip, gzip"])
def test_a_coding_that_is_not_decoded_within_the_bound_is_refused(coding: bytes) -> None:
    import httpx

    from spectrawatch._reply import ReplyError, read_reply

    server = FloodServer(b"content-encoding: %s\r\ncontent-length: 2\r\n\r\n" % coding, endless)
    try:
        with httpx.Client() as client, pytest.raises(ReplyError, match="not decoded here"):
            read_reply(client, client.build_request("GET", server.url), MIB)
    finally:
        server.close()
