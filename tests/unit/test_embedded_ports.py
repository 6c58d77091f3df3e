"""Ports for embedded servers (connectors.embedded)."""

from __future__ import annotations

import socket
from pathlib import Path

from connectors.embedded import free_port, free_port_below_ephemeral


def ephemeral_start() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_a_port_below_the_ephemeral_range_is_free_and_outside_it() -> None:
    port = free_port_below_ephemeral()
    assert 1024 <= port < ephemeral_start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free: binding it works


def test_a_taken_port_is_passed_over() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port_below_ephemeral()))
        taken = holder.getsockname()[1]
        assert free_port_below_ephemeral() != taken


def test_free_port_comes_from_the_ephemeral_range() -> None:
    assert free_port() >= ephemeral_start()  # why a server that restarts needs the other one
