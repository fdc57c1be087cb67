"""HTTP/1.1 connections: what uvicorn's h11 protocol lacks for a server that clients on the internet can reach.

uvicorn (0.54, h11) already closes idle keep-alive connections (`timeout_keep_alive`) and bounds a request head's
size (`h11_max_incomplete_event_size`). It lacks, and this module adds:

- **a header timeout**: a connection that opens and says nothing, or sends its request head a byte at a time
  (slowloris), was held forever; now the head must be complete `header_timeout` seconds after the connection opened
  (or after its first byte, on a kept-alive connection). A silent connection is then closed; one that sent part of
  a head gets 408 first.
- **a connection cap that answers**: uvicorn's `limit_concurrency` answers plain text; here a request arriving while
  more than `max_connections` connections are open gets the API's 503 envelope with Retry-After and its connection
  is closed, so a flood of connections costs bounded memory and file descriptors and clients are told to come back.
- **protocol errors in the API's envelope**: a request that is not valid HTTP/1.1 got uvicorn's plain-text 400;
  now it gets the JSON envelope, and an oversized request head gets 431 (h11's own hint) instead of 400.
  The answer is followed by a short lingering close, so that a client still sending reads it instead of a reset.

The request body's pace is the app's business (server/app.py, `BodyLimitMiddleware`): it can answer 408 there.
"""

from __future__ import annotations

import asyncio
import functools
import http
import json
import logging
import re
import time
import uuid
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from server import errors
from server.protocol import QUOTED_CHARS

logger = logging.getLogger(__name__)

# Largest request head (request line and headers) accepted: h11's default, which is also nginx's order of
# magnitude (4 buffers of 8 KiB). An API request's head is a few hundred bytes.
MAX_HEAD_BYTES = 16 * 1024
# After answering an error on a connection whose client may still be sending, keep reading (and dropping) for
# this long before closing: closing a socket with unread data makes the kernel send a reset, which can destroy
# the answer before the client reads it.
LINGER_SECONDS = 2.0
# Where a request head ends: h11 accepts bare LF line endings as well as CRLF.
_HEAD_END = re.compile(rb"\n\r?\n")
# What h11 says before it quotes the client's bytes in a protocol error, at most.
H11_WORDS_CHARS = 40
# Connections come and go within seconds; an over-capacity client may retry soon.
OVER_CAPACITY_RETRY_AFTER_S = 1
# One warning per this many seconds while connections are refused, with the count, rather than one per request.
WARN_EVERY_S = 10.0


def _envelope(error: errors.ApiError) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of `error` in the API's envelope, on a connection that closes after it. Like every
    answer of the app, it carries an x-request-id (a new one: the client's own may be in the head that failed)."""
    mapped = errors.to_response(error)
    body = json.dumps(mapped.body).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]
    headers.append(("x-request-id", uuid.uuid4().hex))
    headers += [(name.lower(), value) for name, value in mapped.headers.items() if name.lower() != "connection"]
    return mapped.status, headers, body


def raw_error_response(error: errors.ApiError) -> bytes:
    """A complete HTTP/1.1 response carrying `error`, for answers given below the app."""
    status, headers, body = _envelope(error)
    head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + b"\r\n" + body


async def _answer(error: errors.ApiError, send: Any) -> None:
    status, headers, body = _envelope(error)
    raw_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class _RefusalLog:
    """Counts refused requests and logs them at most once per WARN_EVERY_S."""

    def __init__(self) -> None:
        self.count = 0
        self.last = float("-inf")

    def refused(self, open_connections: int, cap: int) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= WARN_EVERY_S:
            logger.warning(
                "%d request(s) refused with 503: %d connections open, --max-connections is %d",
                self.count,
                open_connections,
                cap,
            )
            self.count, self.last = 0, now


class _RecordingConnection(h11.Connection):
    """h11's connection, remembering the protocol error it last raised: its status hint (431 for an oversized
    head) is what the client should get, and uvicorn drops it."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, an answering connection cap and enveloped protocol errors."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout: float,
        max_connections: int,
        refusals: _RefusalLog,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _RecordingConnection(h11.SERVER, config.h11_max_incomplete_event_size or MAX_HEAD_BYTES)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._refusals = refusals
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = False

    # uvicorn reads `self.app` when a request head is complete, to choose who answers it: the app, or, past the cap,
    # a 503. (Its own `limit_concurrency` check sits at the same place but answers in plain text.)
    @property  # type: ignore[override]
    def app(self) -> Any:
        if len(self.connections) > self.max_connections:
            self._refusals.refused(len(self.connections), self.max_connections)
            return self._over_capacity
        return self._app

    @app.setter
    def app(self, value: Any) -> None:
        self._app = value

    async def _over_capacity(self, scope: Any, receive: Any, send: Any) -> None:
        await _answer(
            errors.TooManyConnections(
                "The server has too many open connections; retry shortly.", retry_after=OVER_CAPACITY_RETRY_AFTER_S
            ),
            send,
        )

    # -- the header timeout -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self.conn.their_state is h11.IDLE:
            if self._header_timer is None:
                # The first byte of a new request on a kept-alive connection: its head is now on the clock.
                self._arm_header_timer()
            if self._head_too_long(data):
                self._answer_and_close(self._headers_too_large())
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial, _ = self.conn.trailing_data
        logger.debug("closing a connection that sent no complete request head in %g s", self.header_timeout)
        if not partial:
            self._unset_keepalive_if_required()
            self.transport.close()
            return
        self._answer_and_close(
            errors.RequestTimeout(f"The request's headers did not arrive within {self.header_timeout:g} seconds.")
        )

    # -- protocol errors ----------------------------------------------------------------------------------------

    @property
    def _head_limit(self) -> int:
        return self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES

    def _head_too_long(self, data: bytes) -> bool:
        """Whether the request head being received is over the limit. h11 checks only a head it cannot parse
        yet, so a whole head over the limit that arrives in one read (up to 64 KiB) would pass it."""
        buffered, _ = self.conn.trailing_data
        window = (buffered + data)[: self._head_limit + 4]
        end = _HEAD_END.search(window)
        return (end.start() if end else len(window)) > self._head_limit

    def _headers_too_large(self) -> errors.ApiError:
        return errors.HeadersTooLarge(
            f"The request's headers are larger than the server's limit of {self._head_limit // 1024} KiB."
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this when h11 rejects the request's bytes; answer in the envelope, with h11's status."""
        if self.cycle is not None and not self.cycle.response_complete:
            # A request of this connection is with the app: it hears that its client is gone, and sends nothing.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            if self.cycle.response_started:
                self.transport.close()
                return
        problem = self.conn.last_error
        if problem is not None and problem.error_status_hint == 431:
            error = self._headers_too_large()
        else:
            detail = str(problem) if problem is not None else msg
            # h11 quotes the offending line whole (up to the head's limit, 16 KiB): bounded, as every echo is, past
            # h11's own words ("illegal header line: bytearray(b'", about 35 characters).
            if len(detail) > H11_WORDS_CHARS + QUOTED_CHARS:
                detail = detail[: H11_WORDS_CHARS + QUOTED_CHARS] + "…"
            error = errors.InvalidRequest(None, f"The request is not valid HTTP/1.1: {detail}", code="invalid_http")
        self._answer_and_close(error)

    def _answer_and_close(self, error: errors.ApiError) -> None:
        self._cancel_header_timer()
        self._unset_keepalive_if_required()
        self._lingering = True
        self.transport.write(raw_error_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


def protocol_factory(*, header_timeout: float, max_connections: int) -> Any:
    """What `uvicorn.Config(http=...)` takes to build each connection's protocol."""
    return functools.partial(
        GuardedH11Protocol, header_timeout=header_timeout, max_connections=max_connections, refusals=_RefusalLog()
    )
