"""``--backend`` values: fixed addresses, or DNS names the bridge resolves again and again.

Python gRPC resolves a DNS name when a channel connects and re-resolves only when a connection
drops, so a channel to ``dns:///model-server:50051`` never sees pods that start later. The
bridge therefore resolves names itself, every ``--backend-resolve-seconds``, and keeps one
channel per address (see backend.py). The syntax is grpc's:

- ``10.0.0.5:50051``, ``[::1]:50051``, ``localhost:50051``, ``unix:/path``, ``ipv4:a:p,b:p``:
  fixed;
- ``name:50051`` or ``dns:///name:50051``: the system resolver (``/etc/hosts``, resolv.conf
  search domains, as in a Kubernetes pod);
- ``dns://10.0.0.10:53/name:50051``: that DNS server, asked directly (A and AAAA).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

DNS_TIMEOUT = 2.0


@dataclass(frozen=True)
class Address:
    """One model server: a grpc target for a single address, and the name TLS checks.

    ``tls_name`` is the DNS name the address was found under (the certificate names the
    service, not the pod IP); None for an address given as such.
    """

    target: str
    tls_name: str | None = None


@dataclass(frozen=True)
class Source:
    """One ``--backend`` value: ``fixed`` addresses, or ``host:port`` to resolve."""

    text: str
    fixed: tuple[Address, ...] = ()
    host: str = ""
    port: int = 0
    dns_server: tuple[str, int] | None = None  # dns://SERVER[:PORT]/...

    @property
    def resolved(self) -> bool:
        return not self.fixed


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"backend {what!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def address_target(ip: str, port: int) -> str:
    """The grpc target of one IP address (no resolver involved)."""
    return f"ipv6:[{ip}]:{port}" if ":" in ip else f"ipv4:{ip}:{port}"


def parse_target(text: str) -> Source:
    """A ``--backend`` value as a Source; a ValueError says what is wrong with it."""
    text = text.strip()
    if text.startswith(("unix:", "unix-abstract:", "vsock:")):
        return Source(text, fixed=(Address(text),))
    for scheme in ("ipv4:", "ipv6:"):
        if text.startswith(scheme):
            items = [i for i in text[len(scheme) :].split(",") if i]
            if not items:
                raise ValueError(f"backend {text!r}: no address after {scheme}")
            addresses = []
            for item in items:
                host, port = _split_host_port(item, text)
                if _ip(host) is None:
                    raise ValueError(f"backend {text!r}: {host!r} is not an IP address")
                addresses.append(Address(address_target(host, port)))
            return Source(text, fixed=tuple(addresses))
    server = None
    rest = text
    if text.startswith("dns:"):
        rest = text[len("dns:") :]
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if not slash:
                raise ValueError(f"backend {text!r}: expected dns://[SERVER]/host:port")
            if authority:
                server = _dns_server(authority, text)
    host, port = _split_host_port(rest, text)
    ip = _ip(host)
    if ip is not None:
        return Source(text, fixed=(Address(address_target(str(ip), port)),))
    if host == "localhost":  # one address, not one per family (getaddrinfo may give two)
        return Source(text, fixed=(Address(address_target("127.0.0.1", port), host),))
    return Source(text, host=host, port=port, dns_server=server)


def _dns_server(authority: str, text: str) -> tuple[str, int]:
    """``1.2.3.4``, ``1.2.3.4:53``, ``[::1]`` or ``[::1]:53`` (port 53 unless given)."""
    if authority.startswith("["):
        host, _, port = authority[1:].partition("]")
        port = port.removeprefix(":") or "53"
    elif authority.count(":") == 1:
        host, _, port = authority.partition(":")
    else:
        host, port = authority, "53"
    if _ip(host) is None or not port.isdigit():
        raise ValueError(f"backend {text!r}: the DNS server must be IP[:PORT]")
    return host, int(port)


async def resolve(source: Source) -> list[Address]:
    """The addresses ``source`` names now, in the resolver's order, without duplicates.

    Raises OSError when the name cannot be resolved (the caller keeps what it had)."""
    if source.fixed:
        return list(source.fixed)
    if source.dns_server is None:
        infos = await asyncio.get_running_loop().getaddrinfo(
            source.host, source.port, type=socket.SOCK_STREAM
        )
        ips = [str(info[4][0]) for info in infos]
    else:
        ips = await _ask_server(source)
    unique = list(dict.fromkeys(ips))
    return [Address(address_target(ip, source.port), source.host) for ip in unique]


async def _ask_server(source: Source) -> list[str]:
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    assert source.dns_server is not None
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [source.dns_server[0]]
    resolver.port = source.dns_server[1]
    resolver.lifetime = DNS_TIMEOUT
    ips: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(source.host, rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        except dns.exception.DNSException as err:
            raise OSError(f"{source.text}: {err}") from None
        ips += [rr.address for rr in answer]
    return ips
