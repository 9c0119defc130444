"""A tiny DNS server on loopback whose answers a test changes: one name, its A records.

Real UDP DNS (dnspython builds and parses the messages), so the bridge resolves through the
same code path as against a cluster's DNS, given ``--backend dns://127.0.0.1:PORT/name:port``.
Other names get NXDOMAIN.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class StubDNS:
    """Answers ``name``'s A queries with :attr:`addresses` (a list the test replaces)."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.rstrip(".") + "."
        self.addresses = list(addresses)
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            (question,) = query.question
            self.queries += 1
            if question.name.to_text().lower() != self.name:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A and self.addresses:
                response.answer.append(
                    dns.rrset.from_text_list(
                        question.name, 1, dns.rdataclass.IN, dns.rdatatype.A, list(self.addresses)
                    )
                )
            self._sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
