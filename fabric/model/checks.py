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
# What parsing a record that is not what it must be can raise (a missing field, a
# value of the wrong type, a number too big for a float): caught wherever an etcd
# record another writer may have left is read.
NOT_A_RECORD = (KeyError, TypeError, ValueError, AttributeError, OverflowError)


def record(value: Any, what: str = "record") -> dict[str, Any]:
    """The record itself: a JSON object. A list, a string or a number where a record
    belongs would otherwise fail later, as an AttributeError in whatever reads it."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__}, not a JSON object")
    return value


def flag(value: Any, what: str, default: bool = False) -> bool:
    """true or false; a string "false" is not false, so it is refused, not guessed."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not true or false")
    return value


def address(value: Any, what: str, empty_ok: bool = False) -> str:
    """An IPv4 or IPv6 address, in its canonical text. A scoped IPv6 address
    (`fe80::1%eth0`) is refused: ExaBGP, the kernel codec and policy take none."""
    text = "" if value is None else str(value)
    if not text and empty_ok:
        return ""
    try:
        if "%" in text:
            raise ValueError
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


def integer(value: Any, what: str, low: int, high: int) -> int:
    """A whole number from `low` to `high` (JSON's 1e999 or 2.5 are not)."""
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise ValueError(f"{what} {value!r} is not a number")
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} {value!r} is not a whole number") from None
    if not low <= number <= high:
        raise ValueError(f"{what} {number} is out of range ({low} to {high})")
    return number


def asn(value: Any, what: str = "AS") -> int:
    return integer(value, what, 1, MAX_ASN)


def text(value: Any, what: str, empty_ok: bool = False) -> str:
    if value is None or (isinstance(value, str) and not value and not empty_ok):
        raise ValueError(f"{what} is missing")
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not text")
    return str(value)


def optional_text(value: Any, what: str) -> str | None:
    return None if value is None else text(value, what, empty_ok=True)
