"""uvicorn's HTTP protocol (httptools) with the limits it lacks against slow and greedy clients, enforced per
connection before any request reaches the app, so before the API key is checked.

uvicorn closes a connection that stays idle after a response (keep-alive, 5 s), and nothing else: a client that
opened a connection and sent nothing, sent half a request head, or a body a byte at a time was held as long as it
liked (20 such sockets, all held for 60 s), and a 16 MB request head without a key was read to its end (40 MB more
server memory) before its 401. Here:

- the request head must arrive whole within `header_timeout` seconds of the connection opening or of the previous
  response, and the body within `body_timeout` seconds of the head; a client that is slower gets 408 and the
  connection is closed (one log line names the client and the limit);
- a request head longer than `max_header_bytes` gets 431 and the connection is closed, having read at most that
  much plus one network read;
- a connection beyond `max_connections` open at once gets 503 with Retry-After and is closed unread, so that what
  slow clients hold stays bounded (about 72 KiB a connection with full 64 KiB heads: 1,000 such sockets held 70 MiB).

What is read of a body is bounded by uvicorn's flow control (it stops reading past 64 KiB until the app takes it)
and by the middleware's `max_body_bytes`. The limits come from the recipe's serve section, through the environment
(`serving.middleware.Settings`); `serving.vllm_server` hands the class to uvicorn.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.middleware import Settings, logger

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
LINGER_SECONDS = 1.0  # how long a refused connection still takes (and drops) the client's bytes before closing


class GuardedHttpProtocol(HttpToolsProtocol):
    """See the module's docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = Settings.from_environment()
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._reading_head = False
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # adds this connection to the server's set of open ones
        if len(self.server_state.connections) > self.limits.max_connections:
            self._refuse(503, f"more than {self.limits.max_connections} connections open", retry_after=1)
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered and closing: what still comes is dropped unread
            return
        super().data_received(data)
        if self._reading_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
                self._refuse(431, f"a request head over {self.limits.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head, self._head_bytes = True, 0
        if self._deadline is None:  # a request pipelined behind one still answered: its head is timed from here
            self._arm(self.limits.header_timeout, "its request head")

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._arm(self.limits.body_timeout, "its request body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Unless a pipelined request has just started, the connection now waits for the next request's head.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()

    def _await_head(self) -> None:
        self._reading_head, self._head_bytes = True, 0
        self._arm(self.limits.header_timeout, "its request head")

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._too_slow, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, what: str, seconds: float) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self._refuse(408, f"{what} took more than {seconds:g} s")

    def _refuse(self, status: int, why: str, retry_after: int | None = None) -> None:
        """Answer `status` unless a response has begun, and close the connection."""
        self._disarm()
        client = "%s:%d" % self.client if self.client else "a client"
        logger.info("Closed the connection from %s (%d): %s", client, status, why)
        if self.cycle is None or not self.cycle.response_started:
            body = why.encode()
            retry = b"retry-after: %d\r\n" % retry_after if retry_after is not None else b""
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"%sconnection: close\r\n\r\n%s" % (status, REASONS[status], len(body), retry, body)
            )
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()  # the app's next receive() gets http.disconnect
        # A close with unread bytes from the client resets the connection, which can discard the answer before the
        # client reads it: end the sending side, read and drop what still comes for a moment, then close.
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
