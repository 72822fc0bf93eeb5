"""Name lookup for workloads: `NAME.<fabric domain>` answers with the workload's IPs.

The CNI plugin registers each workload with the name the runtime gave it; every
agent mirrors those registrations and answers A and AAAA queries on its underlay
address, port 53. Workloads reach it through their default route (the host
delivers packets for its own address locally), and the CNI result names it as their
nameserver. It is authoritative for the fabric domain only: other names are refused,
not forwarded. Message handling is pure (`answer`); the server is a thin UDP loop.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fabric import logs

HEADER = struct.Struct("!HHHHHH")
QTYPE_A, QTYPE_AAAA, QCLASS_IN = 1, 28, 1
NOERROR, FORMERR, NXDOMAIN, REFUSED = 0, 1, 3, 5
TTL = 5


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    question: bytes  # the question section as received, echoed in the answer


def parse_query(data: bytes) -> Query | None:
    if len(data) < HEADER.size:
        return None
    ident, flags, qdcount, _, _, _ = HEADER.unpack_from(data)
    if flags & 0x8000 or qdcount != 1:
        return None
    labels, offset = [], HEADER.size
    while True:
        if offset >= len(data):
            return None
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0 or offset + length > len(data):
            return None
        labels.append(data[offset:offset + length].decode("ascii", "replace").lower())
        offset += length
    if offset + 4 > len(data):
        return None
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    return Query(ident, flags, ".".join(labels), qtype, qclass, data[HEADER.size:offset + 4])


def answer(data: bytes, domain: str, lookup: Callable[[str], Iterable[str]]) -> bytes | None:
    """The response to one query packet (None when it is not worth answering)."""
    query = parse_query(data)
    if query is None:
        if len(data) >= 2:
            return HEADER.pack(int.from_bytes(data[:2], "big"), 0x8000 | FORMERR, 0, 0, 0, 0)
        return None
    domain = domain.strip(".").lower()
    records: list[bytes] = []
    if query.name != domain and not query.name.endswith("." + domain):
        rcode = REFUSED
    else:
        workload = query.name[: -len(domain) - 1] if query.name != domain else ""
        addresses = list(lookup(workload)) if workload and "." not in workload else []
        rcode = NOERROR if addresses else NXDOMAIN
        family = {QTYPE_A: socket.AF_INET, QTYPE_AAAA: socket.AF_INET6}.get(query.qtype)
        if family is not None and query.qclass == QCLASS_IN:
            for address in addresses:
                if (":" in address) != (family == socket.AF_INET6):
                    continue
                rdata = socket.inet_pton(family, address)
                records.append(struct.pack("!HHHIH", 0xC00C, query.qtype, QCLASS_IN, TTL,
                                           len(rdata)) + rdata)
    flags = 0x8000 | 0x0400 | (query.flags & 0x0100) | rcode  # QR, AA, RD echoed
    return HEADER.pack(query.id, flags, 1, len(records), 0, 0) + query.question + \
        b"".join(records)


class DnsServer:
    def __init__(self, address: str, port: int, domain: str,
                 lookup: Callable[[str], Iterable[str]]) -> None:
        self.domain = domain
        self.lookup = lookup
        self.log = logs.get("dns", address=address, port=port)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self._thread = threading.Thread(target=self._run, name="dns", daemon=True)

    def start(self) -> threading.Thread:
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self.sock.close()

    def _run(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(512)
            except OSError:
                return
            try:
                reply = answer(data, self.domain, self.lookup)
            except Exception:
                self.log.exception("bad query")
                continue
            if reply is not None:
                try:
                    self.sock.sendto(reply, client)
                except OSError:
                    continue
