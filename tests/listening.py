"""Test helper: the TCP sockets a process tree listens on, and whether an address is loopback only.

The security tests use it on a Ray started the way the stages start it and on the `ray start` head
of docs/cluster.md's single-host route, to check that nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import ipaddress

import psutil


def listening_sockets(pid: int) -> list[tuple[str, str, int]]:
    """(process name, bound address, port) of every listening TCP socket of `pid` and its descendants."""
    root = psutil.Process(pid)
    found = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            found |= {(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # a worker that exited meanwhile
            continue
    return sorted(found)


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (::ffff:127.0.0.1); never :: or 0.0.0.0."""
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)
