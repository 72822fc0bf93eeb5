"""What this kernel can do, probed rather than assumed."""

from __future__ import annotations

import socket
import struct

TCP_MD5SIG = 14


def tcp_md5_supported() -> bool:
    """Whether TCP MD5 signatures (RFC 2385, BGP passwords) work here.

    Setting a key on a plain socket is accepted exactly when the kernel was built
    with CONFIG_TCP_MD5SIG; ENOPROTOOPT otherwise.
    """
    address = socket.inet_aton("127.0.0.1")
    # struct tcp_md5sig: sockaddr_storage (128), flags, prefixlen, keylen, ifindex, key[80]
    sockaddr = struct.pack("=HH4s", socket.AF_INET, 0, address).ljust(128, b"\0")
    key = b"probe"
    value = sockaddr + struct.pack("=BBHi", 0, 0, len(key), 0) + key.ljust(80, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, value)
        except OSError:
            return False
    return True
