"""Field checks shared by every record read from etcd. Pure.

Records arrive from etcd, where anyone with access can write anything; the agent's
decisions assume well-formed values (an address is an address), and one bad value
once threw inside the owner loop and left the node half-updated. So every
`from_record` checks its fields with these and raises ValueError naming the field;
the reader then ignores that record (and says so) instead of acting on it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

MAX_ASN = 4294967295


def address(value: Any, what: str, empty_ok: bool = False) -> str:
    """An IPv4 or IPv6 address, in its canonical text."""
    text = "" if value is None else str(value)
    if not text and empty_ok:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IP address") from None


def ipv4(value: Any, what: str, empty_ok: bool = False) -> str:
    text = address(value, what, empty_ok)
    if text and ":" in text:
        raise ValueError(f"{what} {text!r} is not an IPv4 address")
    return text


def ipv6(value: Any, what: str, empty_ok: bool = False) -> str:
    text = address(value, what, empty_ok)
    if text and ":" not in text:
        raise ValueError(f"{what} {text!r} is not an IPv6 address")
    return text


def network(value: Any, what: str) -> str:
    """A network in canonical form (host bits clear)."""
    text = str(value)
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a network") from None


def asn(value: Any, what: str = "AS") -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not a number")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r} is not a number") from None
    if not 1 <= number <= MAX_ASN:
        raise ValueError(f"{what} {number} is out of range (1 to {MAX_ASN})")
    return number


def text(value: Any, what: str, empty_ok: bool = False) -> str:
    if value is None or (isinstance(value, str) and not value and not empty_ok):
        raise ValueError(f"{what} is missing")
    if not isinstance(value, (str, int)):
        raise ValueError(f"{what} {value!r} is not text")
    return str(value)
