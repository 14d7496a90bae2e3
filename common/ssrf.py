"""Webhook URL policy: refuse URLs that would make the service call into its own network (SSRF).

The check runs at submit and pins the address it approved; the dispatcher later connects to that address only
(never a fresh DNS answer, which an attacker could rebind to 127.0.0.1 between the check and the delivery).
Every spelling of an address is normalised first: IPv6, IPv4-mapped IPv6, and the legacy inet_aton forms
(`2130706433`, `0x7f000001`, `017700000001`, `127.1`) that getaddrinfo and browsers still accept.
"""

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> addresses as strings

# Blocks that Python 3.11's flags do not call private although they reach local networks.
EXTRA_BLOCKED = [
    ipaddress.ip_network("fec0::/10"),  # deprecated site-local: still routed inside sites
    ipaddress.ip_network("64:ff9b:1::/48"),  # local-use NAT64
]
NAT64 = ipaddress.ip_network("64:ff9b::/96")
HOST_RE = re.compile(r"^[a-z0-9_.-]+$")  # after IDNA: anything else (%, @, \) is a parsing trick
NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class UnsafeUrl(ValueError):
    """The URL is refused; the message says why and names the address. `allow` names the policy switch that would
    admit it ("allow_http" or "allow_addresses"; None when none would), so each caller can name its own setting."""

    def __init__(self, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.allow = allow

    def hint(self, prefix: str) -> str:
        """The message with the setting that would allow the URL, e.g. prefix `SDXL_WEBHOOK_`."""
        if self.allow == "allow_http":
            return f"{self} (set {prefix}ALLOW_HTTP=true to allow plain http)"
        if self.allow == "allow_addresses":
            return f"{self} (add the address, or address:port, to {prefix}ALLOW_ADDRESSES to allow it)"
        return str(self)


@dataclass(frozen=True)
class Policy:
    allow_http: bool = False
    allow_ips: frozenset[IP] = frozenset()
    allow_ip_ports: frozenset[tuple[IP, int]] = field(default_factory=frozenset)

    @classmethod
    def build(cls, allow_addresses: Iterable[str], allow_http: bool) -> "Policy":
        ips: set[IP] = set()
        pairs: set[tuple[IP, int]] = set()
        for entry in allow_addresses:
            ip, port = parse_allow_entry(entry)
            if port is None:
                ips.add(ip)
            else:
                pairs.add((ip, port))
        return cls(allow_http=allow_http, allow_ips=frozenset(ips), allow_ip_ports=frozenset(pairs))

    def allows(self, ip: IP, port: int) -> bool:
        return ip in self.allow_ips or (ip, port) in self.allow_ip_ports


@dataclass(frozen=True)
class CheckedUrl:
    url: str
    scheme: str
    host: str  # as written (lower case): the Host header and TLS SNI name
    port: int
    address: str  # the approved IP to connect to


def split_list(value: Any) -> list[str]:
    """Settings lists from the environment: comma or whitespace separated (JSON lists work too)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return [str(v) for v in json.loads(text)]
        return [part for part in re.split(r"[,\s]+", text) if part]
    return [str(v) for v in value]


def parse_allow_entry(entry: str) -> tuple[IP, int | None]:
    """`10.0.0.5`, `10.0.0.5:8443`, `::1`, `[::1]:8443` -> (ip, port or None)."""
    text = entry.strip()
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        return normalise(ipaddress.ip_address(m.group(1))), int(m.group(2)) if m.group(2) else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return normalise(ipaddress.ip_address(host)), int(port)
    return normalise(ipaddress.ip_address(text)), None


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton's forms: 1 to 4 parts, each decimal, 0x-hex or 0-octal, the last filling the remaining bytes.

    Returns None when the host is not numeric; raises UnsafeUrl when it looks numeric but is malformed
    (a resolver might still read it as an address).
    """
    parts = host.split(".")
    if not NUMERIC_LABEL.match(parts[-1]):
        return None  # a name: the WHATWG rule is that a numeric last label makes the host an IPv4 address
    if len(parts) > 4 or any(not NUMERIC_LABEL.match(p) for p in parts):
        raise UnsafeUrl(f"host `{host}` is neither a valid IPv4 address nor a name")
    nums = []
    for p in parts:
        try:
            if p.startswith("0x"):
                nums.append(int(p[2:] or "0", 16))
            elif len(p) > 1 and p.startswith("0"):
                nums.append(int(p, 8))
            else:
                nums.append(int(p, 10))
        except ValueError as exc:
            raise UnsafeUrl(f"host `{host}` is neither a valid IPv4 address nor a name") from exc
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise UnsafeUrl(f"host `{host}` is an IPv4 address out of range")
    value = 0
    for n in head:
        value = value * 256 + n
    value = value * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(value)


def normalise(ip: IP) -> IP:
    """Unwrap IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64): the IPv4 one is where it goes."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def classify(ip: IP) -> str | None:
    """Why an address is refused, or None for a public unicast address."""
    ip = normalise(ip)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or any(ip in net for net in EXTRA_BLOCKED):
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def _explain_numeric_host(url: str) -> None:
    try:
        host = (urlsplit(url).hostname or "").rstrip(".")
        ip = parse_legacy_ipv4(host) if host and ":" not in host else None
    except (ValueError, UnsafeUrl):
        return
    reason = classify(ip) if ip is not None else None
    if reason is not None:
        raise UnsafeUrl(f"points to a {reason} address (`{host}` -> `{ip}`)")


def system_resolver(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _parse_resolved(text: str) -> IP:
    return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id


def check_url(url: str, policy: Policy, resolver: Resolver = system_resolver) -> CheckedUrl:
    """Approve `url` for webhook delivery and pin the address to connect to, or raise UnsafeUrl."""
    try:
        parsed = httpx.URL(url)
    except Exception as exc:  # httpx.InvalidURL and friends
        _explain_numeric_host(url)  # `0177.0.0.1` is invalid to httpx but loopback to inet_aton: say so
        raise UnsafeUrl(f"is not a valid URL: {exc}") from exc
    scheme = parsed.scheme
    if scheme not in ("https", "http"):
        raise UnsafeUrl(f"must be an https URL, not `{scheme or 'relative'}`")
    if scheme == "http" and not policy.allow_http:
        raise UnsafeUrl("must use https (plain http is not allowed by this deployment)", allow="allow_http")
    if parsed.userinfo:
        raise UnsafeUrl("must not carry credentials (user:password@); the signature authenticates deliveries")
    host = parsed.host.lower().rstrip(".") if parsed.host else ""
    if not host:
        raise UnsafeUrl("has no host")
    port = parsed.port or (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise UnsafeUrl(f"port {port} is out of range")

    literal: IP | None = None
    if ":" in host:
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise UnsafeUrl(f"host `{host}` is not a valid IPv6 address") from exc
    else:
        if not HOST_RE.match(host):
            raise UnsafeUrl(f"host `{host}` must be an ASCII name (punycode for IDNs) or an IP address")
        literal = parse_legacy_ipv4(host)

    if literal is not None:
        candidates = [literal]
    else:
        try:
            resolved = resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise UnsafeUrl(f"host `{host}` could not be resolved") from exc
        try:
            candidates = [_parse_resolved(a) for a in resolved]
        except ValueError as exc:
            raise UnsafeUrl(f"host `{host}` resolved to something that is not an address") from exc
        if not candidates:
            raise UnsafeUrl(f"host `{host}` resolved to no address")

    approved: list[IP] = []
    for ip in candidates:
        norm = normalise(ip)
        reason = classify(norm)
        if reason is not None and not policy.allows(norm, port):
            # every address must pass: a name with one public and one private record is refused
            shown = host if literal is not None and str(norm) == host else f"{host}` -> `{norm}"
            raise UnsafeUrl(f"points to a {reason} address (`{shown}`)", allow="allow_addresses")
        approved.append(norm)
    return CheckedUrl(url=url, scheme=scheme, host=host, port=port, address=str(approved[0]))


def pinned_target(url: str, address: str) -> tuple[httpx.URL, str, dict[str, Any]]:
    """Where to connect for `url` pinned to `address`, and what to present there: (URL with the address as its
    host, the Host header, the request extensions that keep TLS SNI and the certificate check on the name)."""
    target = httpx.URL(url)
    host = target.host
    host_header = f"[{host}]" if ":" in host else host
    if target.port is not None:
        host_header += f":{target.port}"
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    return target.copy_with(host=address, fragment=None), host_header, extensions


def recheck_address(address: str, port: int, policy: Policy) -> str | None:
    """At delivery: is the pinned address still allowed under the current policy? (No DNS.)"""
    try:
        ip = normalise(ipaddress.ip_address(address))
    except ValueError:
        return f"`{address}` is not an IP address"
    reason = classify(ip)
    if reason is not None and not policy.allows(ip, port):
        return f"`{address}` is a {reason} address and is not allowed"
    return None
