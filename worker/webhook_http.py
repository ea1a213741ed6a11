"""One webhook POST on httpcore: connected to the checked addresses only, and over in one deadline.

The connection goes to the addresses `check_url` resolved and passed (`WebhookTarget.addresses`,
tried in order), never to a second resolution of the name: the Host header and, for https, the
TLS server name (SNI) and certificate check are still the URL's host. Every step (connect, TLS
handshake, each write and read) waits at most for what is left of `timeout_s` from the start,
so a receiver that trickles its answer a byte at a time cannot hold the attempt longer. Only
the status line and headers are read: the body is never read, and the connection is closed.
"""
from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from typing import Any

import httpcore

from api.services.webhook_urls import WebhookTarget


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every wait ends by `deadline` (time.monotonic())."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream, self._deadline = stream, deadline

    def _left(self, timeout: float | None, timed_out: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise timed_out("the attempt's deadline has passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to `max_bytes`, waiting no longer than the deadline allows."""
        return self._stream.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send `buffer`, waiting no longer than the deadline allows."""
        self._stream.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        """Close the connection."""
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        """The TLS stream over this one (SNI `server_hostname`), under the same deadline."""
        stream = self._stream.start_tls(ssl_context, server_hostname,
                                        self._left(timeout, httpcore.ConnectTimeout))
        return DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        """What the wrapped stream says (e.g. `server_addr`, the peer connected to)."""
        return self._stream.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Connects to `addresses` (in order, the first that answers) whatever host is asked for,
    every stream under `deadline`."""

    def __init__(self, addresses: Iterable[str], deadline: float) -> None:
        self.addresses, self.deadline = tuple(addresses), deadline
        self._system = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        """A connection to the first checked address that accepts one on `port` (`host`, the
        URL's name, is not resolved again)."""
        failure: Exception = httpcore.ConnectError("no address to connect to")
        for address in self.addresses:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise httpcore.ConnectTimeout("the attempt's deadline has passed")
            wait = left if timeout is None else min(timeout, left)
            try:
                stream = self._system.connect_tcp(address, port, wait, local_address,
                                                  socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                failure = err
                continue
            return DeadlineStream(stream, self.deadline)
        raise failure

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None
                            ) -> httpcore.NetworkStream:
        """Never: a webhook goes over TCP."""
        raise httpcore.ConnectError("webhooks connect over TCP only")

    def sleep(self, seconds: float) -> None:
        """Wait (httpcore's retry back-off; no retries are asked for)."""
        time.sleep(seconds)


def post_webhook(target: WebhookTarget, *, headers: dict[str, str], body: bytes,
                 timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> int:
    """POST `body` to `target`, connecting only to its checked addresses, all within
    `timeout_s`; the answer's status code (its body unread). httpcore's errors propagate."""
    deadline = time.monotonic() + timeout_s
    url = httpcore.URL(scheme=target.scheme, host=target.host, port=target.port,
                       target=target.target)
    with httpcore.ConnectionPool(ssl_context=ssl_context or ssl.create_default_context(),
                                 network_backend=PinnedBackend(target.addresses, deadline),
                                 max_connections=1, retries=0) as pool, \
            pool.stream("POST", url, content=body,
                        headers={**headers, "Host": target.host_header},
                        extensions={"timeout": dict.fromkeys(
                            ("connect", "read", "write", "pool"), timeout_s)}) as answer:
        return answer.status
