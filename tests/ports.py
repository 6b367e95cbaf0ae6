"""Localhost ports for the coordinators of multi-process runs."""

import random
import socket

_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free localhost port below the kernel's ephemeral range, never handed out twice.

    A port from bind(("", 0)) is an ephemeral one: in the seconds before the coordinator binds
    it, a socket of another run (gloo pairs, gRPC clients) may take it, and two runs started side
    by side may be handed the same number. Ports below the ephemeral range are only taken by
    explicit binds."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no free localhost port below the ephemeral range")
