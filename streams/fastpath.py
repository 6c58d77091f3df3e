"""Faust's per-message steps that Persona does not use, made free.

Every message a Faust worker reads passes through the app's sensors (the ``Monitor`` counts it
in and out, times it through the stream and counts every table read and write) and through its
topic's schema (key and value through the serializer registry, even for ``raw`` bytes). Persona
keeps its own Prometheus metrics (``streams.metrics``) and reads raw bytes it parses in batches
(``streams.ingest``), so on the worker's hot path these steps only cost time: about 3% and 2% of
the worker's samples in the benchmark.

- :class:`QuietMonitor`: Faust's ``Monitor`` without its per-message and per-key bookkeeping
  (commits, rebalances, sends and web requests are still counted for Faust's ``/stats``).
- :class:`RawSchema`: a topic schema whose events carry the record's key and value bytes as
  they came, which is what the ``raw`` serializer returns, without the registry lookups.

>>> import asyncio
>>> from types import SimpleNamespace
>>> app = SimpleNamespace(create_event=lambda key, value, headers, message: (key, value))
>>> decode = RawSchema().compile(app)
>>> asyncio.run(decode(SimpleNamespace(key=b"u1", value=b"{}", headers=None)))
(b'u1', b'{}')
"""

from __future__ import annotations

from typing import Any

import faust
from faust.sensors import Monitor


class QuietMonitor(Monitor):
    """Faust's monitor minus the bookkeeping it does for every message and table key."""

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_table_get(self, table: Any, key: Any) -> None:
        return None

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        return None

    def on_table_del(self, table: Any, key: Any) -> None:
        return None


class RawSchema(faust.Schema):
    """Key and value bytes as read: the ``raw`` serializer's result, one call instead of six."""

    def __init__(self) -> None:
        super().__init__(
            key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    def compile(self, app: Any, **_: Any) -> Any:
        create_event = app.create_event

        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return create_event(message.key, message.value, message.headers, message)

        return decode
