"""Which TCP ports a set of processes listens on, and which of those are reachable from outside.

The local stack runs with throwaway credentials, so every port it opens must be on loopback;
`stack up` checks that with `exposed()` (and says so loudly when not), and so do the tests.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Listener:
    pid: int
    name: str
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        addr = ipaddress.ip_address(self.ip.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped  # "::ffff:127.0.0.1": a dual-stack socket bound to loopback
        return addr.is_loopback

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.name} (pid {self.pid}) on {host}:{self.port}"


def listeners(procs) -> list[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) of the given psutil processes."""
    import psutil

    found = set()
    for proc in procs:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add(Listener(proc.pid, name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:  # exited meanwhile: it listens on nothing
            continue
    return sorted(found, key=lambda l: (l.pid, l.port))


def exposed(procs) -> list[Listener]:
    """The listening sockets of `procs` that are not on a loopback address."""
    return [l for l in listeners(procs) if not l.loopback]


def process_tree(pid: int) -> list:
    """The process `pid` and all its descendants (psutil processes); empty if it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
