"""The Redis writer's connection settings (its behaviour against a server is in integration)."""

from __future__ import annotations

import asyncio

from connectors.redis_cache import ProfileCache


def test_pipeline_replies_are_read_without_a_timeout_each() -> None:
    """A pipeline's exchange has one deadline (``socket_timeout_s``, see the silent-server fault
    test); a socket timeout on its connection would also enter an asyncio timeout for every
    reply read, which redis-py 8 does by default (5 s)."""
    cache = ProfileCache("redis://127.0.0.1:1/0", socket_timeout_s=0.5)
    try:
        connection = cache._pipelines.connection_pool.make_connection()
        assert connection.socket_timeout is None
        assert connection.socket_connect_timeout == 0.5
        assert cache.client.connection_pool.make_connection().socket_timeout == 0.5
    finally:
        asyncio.run(cache.close())
