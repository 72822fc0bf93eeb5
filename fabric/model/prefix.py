"""IP prefixes as integers: the key of every route, RIB entry and policy decision.

Prefixes are kept as `(family, network int, prefix length)` triples: the agent handles
100,000 routes, and `ipaddress` objects cost too much at that size.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

_V4 = struct.Struct("!I")


class Prefix(NamedTuple):
    """A network as integers: cheap to hash, compare and encode for netlink.

    A named tuple rather than a dataclass: prefixes are dictionary keys in the RIB, the
    desired routes and the kernel writer, and a tuple's hash and equality run in C
    (a dataclass's are Python functions called millions of times at 100,000 routes).
    """

    family: int  # 4 or 6
    network: int
    length: int

    @classmethod
    def parse(cls, text: str) -> Prefix:
        """`10.0.0.0/26` or `fd00::/64`; a bare address is a host prefix.

        Raises ValueError naming the text when it is not a network (or has host bits).
        """
        address, _, length_text = text.partition("/")
        try:
            if ":" in address:
                family, bits = 6, 128
                network = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
            else:
                family, bits = 4, 32
                network = _V4.unpack(socket.inet_pton(socket.AF_INET, address))[0]
        except OSError as exc:
            raise ValueError(f"{text!r} is not an IP prefix") from exc
        try:
            length = int(length_text) if length_text else bits
        except ValueError as exc:
            raise ValueError(f"{text!r} has a bad prefix length") from exc
        if not 0 <= length <= bits:
            raise ValueError(f"{text!r} has a bad prefix length")
        if network & ((1 << (bits - length)) - 1):
            raise ValueError(f"{text!r} has host bits set")
        return cls(family, network, length)

    @property
    def bits(self) -> int:
        return 128 if self.family == 6 else 32

    @property
    def packed(self) -> bytes:
        return self.network.to_bytes(16 if self.family == 6 else 4, "big")

    def contains(self, other: Prefix) -> bool:
        if other.family != self.family or other.length < self.length:
            return False
        shift = self.bits - self.length
        return (other.network >> shift) == (self.network >> shift)

    def overlaps(self, other: Prefix) -> bool:
        return self.contains(other) or other.contains(self)

    def __str__(self) -> str:
        af = socket.AF_INET6 if self.family == 6 else socket.AF_INET
        return f"{socket.inet_ntop(af, self.packed)}/{self.length}"


def address_int(text: str) -> tuple[int, int]:
    """(family, integer) of an IP address, fast."""
    if ":" in text:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    return 4, _V4.unpack(socket.inet_aton(text))[0]
