"""Forged-source UDP for anti-spoofing tests: one datagram built by hand and sent on a
raw socket (what a container with CAP_NET_RAW, granted by default, can do), and a
receiver that says whether anything came."""

from __future__ import annotations

import ipaddress
import socket
import struct

from fabric.kernel import netns


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def datagram(source: str, destination: str, port: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 packet holding one UDP datagram from `source` port 40000."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    length = 8 + len(payload)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 17, length)
    else:
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", length, 17)
    udp = struct.pack("!HHHH", 40000, port, length, 0) + payload
    udp = struct.pack("!HHHH", 40000, port, length, _checksum(pseudo + udp) or 0xFFFF) + payload
    if src.version == 6:
        return struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, src.packed,
                           dst.packed) + udp
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0, 64, 17, 0, src.packed,
                         dst.packed)
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + udp


def send_raw(netns_name: str, source: str, destination: str, port: int,
             payload: bytes) -> None:
    """Send a datagram with any source address from inside a namespace."""
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    with netns.entered(netns.path(netns_name)):
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with sock:
        sock.sendto(datagram(source, destination, port, payload), (destination, 0))


def receiver(netns_name: str, family: int, port: int) -> socket.socket:
    """A UDP socket on every address of a namespace (close it when done)."""
    with netns.entered(netns.path(netns_name)):
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET,
                             socket.SOCK_DGRAM)
    sock.bind(("::" if family == 6 else "0.0.0.0", port))
    return sock


def received(sock: socket.socket, timeout: float = 1.0) -> list[bytes]:
    """Every datagram that arrived within `timeout` (from the first wait on)."""
    out = []
    sock.settimeout(timeout)
    try:
        while True:
            out.append(sock.recv(2048))
            sock.settimeout(0.2)
    except TimeoutError:
        return out
