"""Webhook URL safety: which URLs an endpoint may have, and the addresses a POST to one may reach.

A URL is printable ASCII with no space, tab or control character (a parser that drops a tab
would check one URL and call another), http(s), a host name or IP literal, no credentials, and a
port in 1-65535. Its host is resolved by `resolver` (the system's getaddrinfo; a test puts a
rebinding one in its place, in process) and every address must be public: no private,
loopback, link-local, multicast or reserved address, and no IPv6 address that embeds a
non-public IPv4 one (IPv4-mapped and -compatible, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo
2001::/32: each judged by the IPv4 addresses it carries). `allow_loopback` admits 127.0.0.0/8
and ::1 written as themselves, never embedded.

`check_url` returns a `WebhookTarget`: the parsed URL with the addresses that passed. A POST
connects to those addresses only (worker/webhook_http.py), so a name that answers differently
the next time it is resolved (DNS rebinding) cannot move the connection.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

DEFAULT_PORTS = {"http": 80, "https": 443}
URL_CHARACTERS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII: no space, tab or control
HOST_NAME = re.compile(r"^[a-z0-9_.-]+$")  # after urlsplit's lowercasing; IP literals aside
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: IPv4 in the last 32
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local use: never public
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d (:: and ::1 aside)
ALLOW_LOOPBACK_HINT = "; set SPEFT_WEBHOOK_ALLOW_LOOPBACK=true to allow loopback"


class UnsafeURL(ValueError):
    """A webhook URL that may not be called (the message says why, for the 400)."""


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL: where to connect (`addresses`, in order) and what to send."""

    scheme: str
    host: str  # as the URL names it (lowercase; an IPv6 literal without brackets)
    port: int
    target: str  # path and query, what the request line asks for
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        """The Host header: the URL's host (bracketed when IPv6), and its port unless default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses getaddrinfo gives for a TCP connection to host:port, in order, once each."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# How webhook hosts are resolved; replaceable in process (a test's rebinding resolver).
resolver: Resolver = system_resolver


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: IPv4-mapped or -compatible, NAT64, 6to4,
    Teredo (its server and its client)."""
    found = [address.ipv4_mapped] if address.ipv4_mapped else []
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour:
        found.append(address.sixtofour)
    if address.teredo:
        found.extend(address.teredo)
    return found


def _is_public(address: IPAddress) -> bool:
    return address.is_global and not address.is_multicast and address not in NAT64_LOCAL


def refusal(address: IPAddress, *, allow_loopback: bool) -> str | None:
    """Why a POST may not reach `address` ("loopback", "non-public"); None when it may."""
    if address.is_loopback:
        return None if allow_loopback else "loopback"
    carried = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else []
    if not _is_public(address) or not all(_is_public(inner) for inner in carried):
        return "non-public"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_url(url: str) -> WebhookTarget:
    """The parts of a webhook URL (no addresses yet); UnsafeURL when it is not one."""
    if not URL_CHARACTERS.match(url):
        raise UnsafeURL("a webhook URL must be printable ASCII without spaces, tabs or control "
                        "characters (percent-encode the rest; a host name in its xn-- form)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise UnsafeURL(f"not a valid URL: {err}") from err
    host = parts.hostname or ""
    if parts.scheme not in DEFAULT_PORTS or not host:
        raise UnsafeURL("a webhook URL must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("a webhook URL must not carry credentials")
    if port == 0:
        raise UnsafeURL("a webhook URL's port must be 1-65535")
    if _literal(host) is None and not HOST_NAME.match(host):
        raise UnsafeURL(f"not a valid host name: {host!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(scheme=parts.scheme, host=host,
                         port=port or DEFAULT_PORTS[parts.scheme], target=target, addresses=())


def check_url(url: str, *, allow_loopback: bool) -> WebhookTarget:
    """The URL's target with the addresses its host resolves to, when it is a webhook URL and
    every address is public (loopback too with `allow_loopback`); UnsafeURL saying why otherwise."""
    parsed = parse_url(url)
    literal = _literal(parsed.host)
    try:
        found = [parsed.host] if literal is not None else resolver(parsed.host, parsed.port)
    except (OSError, UnicodeError, ValueError) as err:
        raise UnsafeURL(f"cannot resolve {parsed.host}") from err
    if not found:
        raise UnsafeURL(f"cannot resolve {parsed.host}")
    for text in found:
        address = ipaddress.ip_address(text.split("%")[0])
        why = refusal(address, allow_loopback=allow_loopback)
        if why is not None:
            # The address itself only where the URL wrote it: a name's internal answers stay here.
            shown = f" {address}" if literal is not None else ""
            hint = ALLOW_LOOPBACK_HINT if why == "loopback" else ""
            raise UnsafeURL(f"{parsed.host} resolves to a {why} address{shown}{hint}")
    return WebhookTarget(scheme=parsed.scheme, host=parsed.host, port=parsed.port,
                         target=parsed.target, addresses=tuple(found))
