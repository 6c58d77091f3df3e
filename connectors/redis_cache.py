"""The Redis cache: one hash per user, written in pipelined batches.

Any service reads a user's profile summary with one ``HGETALL persona:profile:{<user id>}``. The
braces make the user id the Redis Cluster hash tag, so every key Persona keeps for one user lands
in the same slot. Writes are upserts (``HSET``), so re-processing an event after a restart leaves
the same hash: the cache is idempotent. A batch is one pipeline, one round trip; when Redis is
down the writer retries the same batch with capped exponential backoff instead of dropping it, so
the worker pauses and catches up afterwards.

>>> profile_key("u-42")
'persona:profile:{u-42}'
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

KEY_PREFIX = "persona:profile:"
LEADS_KEY = "persona:leads"
"""Sorted set of user ids by lead score: "top N leads now"."""
ALIAS_PREFIX = "persona:alias:"
SEGMENT_SIZES_KEY = "persona:segment-sizes"
"""Hash of ``<partition>/<segment>`` → users: each partition's owner writes absolute counts."""
RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def profile_key(user_id: str) -> str:
    """Redis key of a user's profile hash; ``{user id}`` is the cluster hash tag."""
    return f"{KEY_PREFIX}{{{user_id}}}"


def _bulk(value: str | bytes | float | int) -> bytes:
    if type(value) is str:  # most values: no str() copy
        data = value.encode()
    else:
        data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def command(*args: str | bytes) -> bytes:
    """Any Redis command in RESP.

    >>> command("DEL", "k")
    b'*2\\r\\n$3\\r\\nDEL\\r\\n$1\\r\\nk\\r\\n'
    """
    return b"*%d\r\n%b" % (len(args), b"".join(_bulk(a) for a in args))


_FIELD_BULKS: dict[str, bytes] = {}
"""Hash field names in RESP: a profile hash has the same thirty in every write."""
_MAX_FIELD_BULKS = 1024


def hset_command(key: str, mapping: Mapping[str, str | float | int]) -> bytes:
    """``HSET key field value ...`` in RESP, ready to write to the socket.

    >>> hset_command("h", {"a": "1"})
    b'*4\\r\\n$4\\r\\nHSET\\r\\n$1\\r\\nh\\r\\n$1\\r\\na\\r\\n$1\\r\\n1\\r\\n'
    """
    parts = [b"$4\r\nHSET\r\n", _bulk(key)]
    fields = _FIELD_BULKS
    for field, value in mapping.items():
        bulk = fields.get(field)
        if bulk is None:
            bulk = _bulk(field)
            if len(fields) < _MAX_FIELD_BULKS:
                fields[field] = bulk
        parts.append(bulk)
        parts.append(_bulk(value))
    return b"*%d\r\n%b" % (2 + 2 * len(mapping), b"".join(parts))


def zadd_command(key: str, scores: Mapping[str, float]) -> bytes:
    """``ZADD key score member ...`` in RESP (scores written with ``repr``: exact floats)."""
    parts = [b"$4\r\nZADD\r\n", _bulk(key)]
    for member, score in scores.items():
        parts.append(_bulk(repr(float(score))))
        parts.append(_bulk(member))
    return b"*%d\r\n%b" % (2 + 2 * len(scores), b"".join(parts))


def alias_key(anonymous_id: str) -> str:
    """Redis key naming the user an anonymous id was merged into (same hash tag as its profile)."""
    return f"{ALIAS_PREFIX}{{{anonymous_id}}}"


def user_of_key(key: str | bytes) -> str:
    """The user id inside a profile key."""
    text = key.decode() if isinstance(key, bytes) else key
    return text[len(KEY_PREFIX) + 1 : -1]


class ProfileCache:
    """Pipelined, retrying writer and reader of the per-user profile hashes."""

    def __init__(
        self,
        url: str,
        *,
        max_backoff_s: float = 5.0,
        socket_timeout_s: float = 5.0,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        # The pipelines' own connection: its replies are read under one deadline per pipeline
        # (redis-py's socket timeout enters an asyncio timeout for every reply read: 4% of a
        # worker's time). redis-py 8 sets a 5 s socket timeout unless told None.
        self._pipelines = aioredis.Redis.from_url(
            url, socket_timeout=None, socket_connect_timeout=socket_timeout_s
        )
        self.socket_timeout_s = socket_timeout_s
        self.max_backoff_s = max_backoff_s
        self.on_error = on_error
        """Called at each failed attempt, while the outage lasts (for a metric)."""
        self.write_errors = 0
        self.last_write_s = 0.0

    async def write_profiles(
        self,
        summaries: Mapping[str, Mapping[str, str]],
        *,
        lead_scores: Mapping[str, float] | None = None,
        segment_sizes: Mapping[str, int] | None = None,
        erased: Sequence[str] = (),
        aliases: Mapping[str, str | None] | None = None,
    ) -> None:
        """Upsert summaries, lead scores and segment sizes, then forget ``erased`` users and
        re-key ``aliases``, all in one pipeline; retry until Redis takes it.

        ``erased``: everything Persona keeps in Redis about these users goes (erasure requests).
        ``aliases``: merged anonymous ids lose their profile hash and lead entry, and an alias key
        points to the known user (``None``: the alias key goes too, after an erasure).

        Every write is absolute (HSET, ZADD, HSET of counts, DEL, SET), never an increment, so
        writing the same batch twice after a crash leaves Redis as writing it once.
        """
        commands = [hset_command(profile_key(u), s) for u, s in summaries.items()]
        if lead_scores:
            commands.append(zadd_command(LEADS_KEY, lead_scores))
        if segment_sizes:
            commands.append(hset_command(SEGMENT_SIZES_KEY, segment_sizes))
        if erased:
            commands += [command("DEL", profile_key(u)) for u in erased]
            commands.append(command("ZREM", LEADS_KEY, *erased))
        for anonymous_id, user_id in (aliases or {}).items():
            commands.append(command("DEL", profile_key(anonymous_id)))
            if user_id is None:
                commands.append(command("DEL", alias_key(anonymous_id)))
            else:
                commands.append(command("SET", alias_key(anonymous_id), user_id))
        if aliases:
            commands.append(command("ZREM", LEADS_KEY, *aliases))
        await self._write(commands, f"{len(summaries)} profiles")

    async def _write(self, commands: list[bytes], what: str) -> None:
        """Send ``commands`` as one pipeline; on a connection failure retry with backoff until
        Redis takes them (every command here is absolute, so repeating one is harmless)."""
        if not commands:
            return
        backoff = 0.05
        while True:
            started = time.perf_counter()
            try:
                await self._send_packed(commands)
            except RETRYABLE as exc:
                self.write_errors += 1
                if self.on_error is not None:
                    self.on_error()
                log.warning(
                    "redis write of %s failed (%s); retrying in %.2fs",
                    what,
                    type(exc).__name__,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self.last_write_s = time.perf_counter() - started
            return

    async def _send_packed(self, commands: list[bytes]) -> None:
        """Send RESP-encoded commands in one write and read every reply (a pipeline without
        redis-py's per-command packing, which cost more than the rest of a batch's writes).
        The socket timeout is one deadline for the whole exchange."""
        pool = self._pipelines.connection_pool
        async with asyncio.timeout(self.socket_timeout_s):
            connection = await pool.get_connection()  # connects and greets the server if new
            try:
                await connection.send_packed_command(b"".join(commands), check_health=False)
                for _ in commands:
                    reply = await connection.read_response()
                    if isinstance(reply, ResponseError):
                        raise reply
            except BaseException:
                await connection.disconnect()  # a half-read reply stream must not be reused
                raise
            finally:
                await pool.release(connection)

    async def resolve(self, user_id: str) -> str:
        """The known user an anonymous id was merged into; the id itself otherwise."""
        target = await self.client.get(alias_key(user_id))
        return (target.decode() if isinstance(target, bytes) else target) or user_id

    async def read_profile(self, user_id: str) -> dict[str, str]:
        """The user's profile hash (after following an alias), decoded; empty when unknown."""
        raw = await self.client.hgetall(profile_key(await self.resolve(user_id)))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def top_leads(self, limit: int) -> list[tuple[str, float]]:
        """The ``limit`` users with the highest lead score, best first."""
        rows = await self.client.zrevrange(LEADS_KEY, 0, limit - 1, withscores=True)
        return [(member.decode(), float(score)) for member, score in rows]

    async def segment_sizes(self) -> dict[str, int]:
        """Users per segment, summed over partitions."""
        sizes: dict[str, int] = {}
        for field, value in (await self.client.hgetall(SEGMENT_SIZES_KEY)).items():
            segment = field.decode().split("/", 1)[-1]
            sizes[segment] = sizes.get(segment, 0) + int(value)
        return sizes

    async def count_profiles(self) -> int:
        """Number of profile hashes (SCAN: cluster- and production-safe, no KEYS)."""
        count = 0
        async for _ in self.client.scan_iter(match=f"{KEY_PREFIX}*", count=1000):
            count += 1
        return count

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RETRYABLE:
            return False

    async def close(self) -> None:
        await self.client.aclose()
        await self._pipelines.aclose()
