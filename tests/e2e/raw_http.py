"""Raw HTTP/1.1 over a socket, for what an HTTP client library will not do: send a malformed or oversized head,
trickle bytes, stop in the middle of a body, or keep a connection open without a word."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` seconds pass: AssertionError)."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the server kept the connection open for {timeout:g} s; received {received[:200]!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def parse(raw: bytes) -> RawResponse | None:
    """The first response in `raw`, or None when the server sent nothing."""
    if not raw:
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(int(status_line.split()[1]), headers, body)


def exchange(port: int, data: bytes, timeout: float = 30) -> RawResponse | None:
    """Send `data` on a new connection and read until the server closes it."""
    with connect(port) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking everything: its answer is still readable
        return parse(read_until_closed(sock, timeout))


def assert_envelope(response: RawResponse | None, status: int, code: str | None = None) -> dict:
    """A raw response is `status` with the API's JSON error envelope."""
    assert response is not None, "the server closed the connection without an answer"
    assert response.status == status, (response.status, response.body[:300])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and "Traceback" not in error["message"]
    # Answers given below the app (timeouts, protocol errors, the connection cap) carry one as the app's do.
    assert response.headers.get("x-request-id"), response.headers
    if code is not None:
        assert error["code"] == code, error
    return error
