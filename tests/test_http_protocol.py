"""The server's HTTP protocol (serving/http_protocol.py) under uvicorn, driven over raw sockets: slow and oversized
request heads and bodies are cut off before the app sees them, and ordinary requests, one after another on one
connection, are not. Small limits, so that the whole file takes seconds; tests/test_serving.py runs it in vLLM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.core import server_process
from serving import http_protocol, middleware

from conftest import REPO

HEADER_TIMEOUT, BODY_TIMEOUT, MAX_HEADER_BYTES, MAX_CONNECTIONS = 0.6, 0.6, 4096, 320
SERVER = """
import asyncio
import uvicorn
from serving.http_protocol import GuardedHttpProtocol

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":  # an answer that takes longer than a head may
        await asyncio.sleep(2.5 * float(__import__("os").environ["PIPELINE_SERVE_HEADER_TIMEOUT"]))
    answer = b"read %d bytes" % len(body)
    headers = [(b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})

uvicorn.run(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), http=GuardedHttpProtocol, log_level="info")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    chosen = server_process.free_port()
    limits = middleware.Settings(
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        max_header_bytes=MAX_HEADER_BYTES,
        max_connections=MAX_CONNECTIONS,
    )
    log = tmp_path_factory.mktemp("protocol") / "server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(chosen)],
            cwd=REPO,
            env={**os.environ, **limits.environment()},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", chosen), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield chosen, process
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def port(server: tuple) -> int:
    return server[0]


def answer_and_close(connection: socket.socket, limit: float = 10) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    connection.settimeout(limit)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received, time.monotonic() - started


def test_ordinary_requests_on_one_connection_pass(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        for _ in range(2):
            connection.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            time.sleep(HEADER_TIMEOUT / 2)  # the head timer runs again for the next request, from the answer
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")


def test_requests_pipelined_behind_a_slow_answer_are_answered(port: int) -> None:
    """The head timer waits while the server works: two requests sent at once, the first answered after longer
    than a head may take, both answered."""
    request = b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(request * 2)
        connection.settimeout(30)
        received = b""
        while received.count(b"HTTP/1.1 200") < 2:
            chunk = connection.recv(65536)
            assert chunk, received
            received += chunk


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST / HTTP/1.1\r\nHost: x\r\n", b"GET / HTTP/1.1\r\n"],
    ids=["nothing", "half-a-head", "request-line-only"],
)
def test_a_head_that_does_not_arrive_in_time_gets_408(port: int, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(sent)
        received, seconds = answer_and_close(connection)
    assert received.startswith(b"HTTP/1.1 408") and b"its request head took more than" in received
    assert HEADER_TIMEOUT * 0.9 <= seconds < HEADER_TIMEOUT + 5


def test_a_head_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline(port: int) -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", port)) as connection:
        started = time.monotonic()
        try:
            for byte in head:
                connection.sendall(bytes([byte]))
                time.sleep(0.02)
        except OSError:  # the server closed the connection under the sender
            pass
        received, _ = answer_and_close(connection)
    assert received.startswith(b"HTTP/1.1 408") and time.monotonic() - started < len(head) * 0.02


def test_a_body_that_does_not_arrive_in_time_gets_408(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        received, seconds = answer_and_close(connection)
    assert received.startswith(b"HTTP/1.1 408") and b"its request body took more than" in received
    assert seconds < BODY_TIMEOUT + 5


def test_an_oversized_head_gets_431_before_it_is_read_to_its_end(port: int) -> None:
    """A head sent in parts: the server answers once it passes the limit, without waiting for the rest."""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES * 2))
        received, seconds = answer_and_close(connection)
    assert received.startswith(b"HTTP/1.1 431") and seconds < HEADER_TIMEOUT


def test_many_slow_heads_hold_bounded_memory_and_are_all_closed_at_the_deadline(server: tuple) -> None:
    """Held connections cost the server what their heads hold, and the head deadline frees them all: 300 sockets,
    each 100 bytes short of the head limit and silent after that."""
    import psutil

    port, process = server
    resident = psutil.Process(process.pid).memory_info
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEADER_BYTES - 128)
    count = 300
    before = resident().rss
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        for connection in connections:
            connection.sendall(head)
        time.sleep(HEADER_TIMEOUT / 2)
        held = resident().rss - before
        answers = [answer_and_close(connection)[0] for connection in connections]
    finally:
        for connection in connections:
            connection.close()
    print(f"{count} slow heads of {len(head)} bytes: server memory +{held / 2**20:.1f} MiB while held")
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers)
    assert held < count * (len(head) + 16 * 1024)


def test_a_connection_beyond_the_limit_gets_503_and_is_closed_unread(port: int) -> None:
    time.sleep(http_protocol.LINGER_SECONDS + 0.5)  # connections refused by earlier tests are gone
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        with socket.create_connection(("127.0.0.1", port)) as extra:
            extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            received, seconds = answer_and_close(extra)
        assert received.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in received.lower()
        assert f"more than {MAX_CONNECTIONS} connections open".encode() in received
        assert seconds < HEADER_TIMEOUT
    finally:
        for connection in held:
            connection.close()
    time.sleep(http_protocol.LINGER_SECONDS + 0.5)
    with socket.create_connection(("127.0.0.1", port)) as connection:  # below the limit again: served
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")
