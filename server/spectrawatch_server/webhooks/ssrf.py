"""SSRF guard for webhook targets: refuse URLs that resolve to internal address ranges.

A webhook URL is attacker-controlled input that makes the server send requests. Refused unless
explicitly allowed (``SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS``, comma-separated host names, IPs or
CIDRs): loopback, link-local (169.254.0.0/16 incl. cloud metadata endpoints, fe80::/10),
private (RFC 1918, fc00::/7), shared address space (100.64.0.0/10), multicast, unspecified,
reserved and every other non-global address. An IPv6 address that embeds an IPv4 one
(IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002:aabb:ccdd::``, Teredo ``2001:0::`` whose client
address is the obfuscated IPv4) is also judged by that IPv4 address.
The check runs at creation (a clear 4xx) and again before every attempt, and the sender connects
to the address that was checked (no second DNS lookup for a rebinding attack to race).
A host name is checked as httpx will send it (IDNA 2008, its ASCII form): Python's own ``idna``
codec (IDNA 2003) maps names httpx refuses onto others (``localhost`` spelt with U+217C, a
roman numeral, to ``localhost``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


class UnsafeTarget(ValueError):
    """A webhook URL that must not be called; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Allowlist:
    """Hosts and networks exempt from the private-range check."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str | Sequence[str]) -> Allowlist:
        """From ``"127.0.0.1,10.0.0.0/8,hooks.internal"`` (or a list of such entries)."""
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in items:
            item = raw.strip().lower()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                hosts.add(item.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        return host in self.hosts or any(address in n for n in self.networks)


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``) and what to call it (``host``)."""

    url: str
    scheme: str
    host: str
    port: int
    address: str


def classify(address: IPAddress) -> str | None:
    """The forbidden class of an address, or ``None`` when it is publicly routable."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return classify(address.ipv4_mapped)
        for v4 in (address.sixtofour, *(address.teredo or ())):  # teredo: (server, client)
            if v4 is not None and (kind := classify(v4)) is not None:
                return kind
    checks = (
        ("loopback", address.is_loopback),
        ("link_local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        # fec0::/10, deprecated (RFC 3879) but still routed inside some networks
        ("site_local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
    )
    for name, hit in checks:
        if hit:
            return name
    return None if address.is_global else "non_global"


def _sent_host(url: str) -> str:
    """The host name as httpx will send it (ASCII; IDNA 2008 punycode for a non-ASCII name):
    the name resolved, matched against the allowlist and named in ``Host`` and SNI."""
    try:
        raw = httpx.URL(url.strip()).raw_host
    except httpx.InvalidURL as exc:
        raise UnsafeTarget("bad_url", f"webhook URL cannot be sent: {exc}") from exc
    return raw.decode("ascii").strip("[]").rstrip(".").lower()


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (A and AAAA)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, allow: Allowlist, resolve: Resolver = system_resolver) -> Target:
    """Validate ``url`` and resolve it; raises :class:`UnsafeTarget` with a clear message.

    Every address the name resolves to must be allowed (an attacker's DNS could otherwise
    return one public and one internal address).
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise UnsafeTarget("bad_url", f"webhook URL is malformed: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeTarget("bad_scheme", f"webhook URL must be http(s), got {parts.scheme!r}")
    try:
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError as exc:  # e.g. "http://[zz]/": brackets around a non-address
        raise UnsafeTarget("bad_url", f"webhook URL is malformed: {exc}") from exc
    if not host:
        raise UnsafeTarget("bad_url", f"webhook URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("bad_url", "webhook URL must not carry credentials (user:pass@)")
    host = _sent_host(url)
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeTarget("bad_url", f"webhook URL has an invalid port: {exc}") from exc
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise UnsafeTarget(
                "unresolvable", f"cannot resolve webhook host {host!r}: {exc}"
            ) from exc
        if not addresses:
            raise UnsafeTarget("unresolvable", f"webhook host {host!r} has no address")
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        kind = classify(address)
        if kind is not None and not allow.allows(host, address):
            raise UnsafeTarget(
                f"forbidden_{kind}",
                f"webhook host {host!r} resolves to {address} ({kind.replace('_', '-')} address); "
                "add it to SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS to allow it",
            )
    return Target(url.strip(), scheme, host, port, addresses[0])
