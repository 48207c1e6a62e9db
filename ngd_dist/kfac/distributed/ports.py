"""Free TCP ports on this machine: for the MPI bootstrap's rendezvous and for tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    return free_ports(1, host)


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A base port ``p`` with ``p .. p + count - 1`` all free a moment ago (one per local rank)."""
    if count < 1:
        raise ValueError(f"count: got {count}; expected an integer >= 1")
    for _ in range(100):
        with socket.socket() as first:
            first.bind((host, 0))
            base = int(first.getsockname()[1])
            if base + count - 1 > 65535:
                continue
            held: list[socket.socket] = []
            try:
                for offset in range(1, count):
                    sock = socket.socket()
                    held.append(sock)
                    sock.bind((host, base + offset))
            except OSError:
                continue
            finally:
                for sock in held:
                    sock.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports found on {host}")
