"""Models trained and served the right way, end to end on the real broker and Redis.

Simulated shoppers flow through a worker: trainers learn from the training-examples topic and
publish signed snapshots that the scoring replicas swap in; the read API serves the answers; a
trainer killed with SIGKILL resumes from its checkpoint with no example lost or learned twice;
a snapshot with a bad signature is refused.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.embedded import EmbeddedBroker, EmbeddedRedis
from connectors.kafka import produce_all
from connectors.simulator import ShopperSimulator
from models.snapshots import Snapshot, sign, verify_and_load
from streams.backtest import read_whole_topic
from streams.settings import Settings
from streams.worker import WorkerProcess
from tests.conftest import engine_settings, wait_until

pytestmark = pytest.mark.integration

USERS = 150


def sample(worker: WorkerProcess, name: str, **labels: str) -> float:
    text = worker.scrape() or ""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def progress(worker: WorkerProcess) -> str:
    """What a worker has done so far, for a failure message."""
    names = (
        "persona_events_total",
        "persona_batch_events_count",
        "persona_offset_gaps_total",
        "persona_consumer_lag",
        "persona_ordering_held_events",
    )
    lagging = [
        f"{s.labels['topic']}[{s.labels['partition']}] {s.value:g}"
        for family in text_string_to_metric_families(worker.scrape() or "")
        for s in family.samples
        if s.name == "persona_consumer_lag" and s.value
    ]
    counts = ", ".join(f"{name} {sample(worker, name):g}" for name in names)
    return f"worker: {counts}; lagging partitions: {', '.join(lagging) or 'none'}"


def get(worker: WorkerProcess, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(worker.url(path), timeout=5) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


def simulated(settings: Settings, users: int, seed: int) -> list[tuple[str, bytes, bytes]]:
    simulator = ShopperSimulator(users, seed, days=21.0)
    return [(settings.input_topics[s], k, v) for s, k, v in simulator.raw_messages()]


@pytest.fixture(scope="module")
def served(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, WorkerProcess, int]]:
    data_dir = tmp_path_factory.mktemp("served")
    settings = engine_settings(
        broker,
        redis_server,
        data_dir,
        redis_url=redis_server.database_url(2),
        snapshot_every_examples=50,
        snapshot_every_s=0.5,
        live_clock=False,
    )
    messages = simulated(settings, USERS, seed=5)
    worker = WorkerProcess(settings, data_dir / "worker.log").start()
    try:
        worker.wait_serving()
        asyncio.run(produce_all(settings.broker_url, messages))
        wait_until(
            lambda: sample(worker, "persona_events_total") >= len(messages),
            timeout=120,
            what=f"{len(messages)} simulated events consumed",
        )
        for model in ("lead", "offers", "clusters"):
            wait_until(
                lambda model=model: (
                    sample(worker, "persona_model_snapshot_version", model=model) > 0
                ),
                timeout=60,
                what=f"a published {model} snapshot served by the worker",
            )
        yield settings, worker, len(messages)
    finally:
        worker.stop()


def test_profiles_carry_segment_cluster_lead_and_offer(served) -> None:
    _, worker, _ = served
    status, body = get(worker, "/v1/profiles/u00001")
    assert status == 200
    assert body["segment"] and body["segment_reason"]
    assert 0.0 <= body["lead"]["score"] <= 1.0
    assert body["lead"]["model_version"] >= 0
    assert isinstance(body["lead"]["explanation"], list)
    assert body["consent"]["email"] in (True, False)
    status, body = get(worker, "/v1/profiles/nobody-here")
    assert status == 404


def test_top_leads_segments_and_health(served) -> None:
    _, worker, _ = served
    status, body = get(worker, "/v1/leads/top?limit=5")
    assert status == 200
    scores = [lead["score"] for lead in body["leads"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert get(worker, "/v1/leads/top?limit=0")[0] == 400
    status, body = get(worker, "/v1/segments")
    assert status == 200
    assert sum(body["sizes"].values()) == USERS
    assert {d["name"] for d in body["definitions"]} >= {"vip", "at_risk", "cart_abandoner"}
    assert get(worker, "/healthz") == (200, {"status": "ok"})
    status, body = get(worker, "/readyz")
    assert status == 200 and body["ready"] and body["redis"]


def checkpoints(settings: Settings) -> dict[str, Snapshot]:
    """The last checkpoint of each trainer, from the trainer-state changelog."""
    topic = f"{settings.app_id}-trainer-state-changelog"
    values = asyncio.run(read_whole_topic(settings.broker_url, topic))
    secret = settings.snapshot_secret.encode()
    latest: dict[str, Snapshot] = {}
    for value in values:
        snap = verify_and_load(value, secret)
        if snap.name not in latest or snap.examples_seen >= latest[snap.name].examples_seen:
            latest[snap.name] = snap
    return latest


def examples_in_topic(settings: Settings) -> dict[str, int]:
    values = asyncio.run(
        read_whole_topic(settings.broker_url, settings.topics["training_examples"])
    )
    counts: dict[str, int] = {}
    for value in values:
        message = orjson.loads(value)
        counts[message["model"]] = counts.get(message["model"], 0) + len(message["examples"])
    return counts


def test_trainer_killed_mid_stream_resumes_without_losing_or_doubling_examples(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = engine_settings(
        broker,
        redis_server,
        tmp_path,
        redis_url=redis_server.database_url(3),
        snapshot_every_examples=50,
        snapshot_every_s=0.5,
        live_clock=False,
    )
    messages = simulated(settings, 200, seed=9)
    first_half, second_half = messages[: len(messages) // 2], messages[len(messages) // 2 :]
    worker = WorkerProcess(settings, tmp_path / "first.log").start()
    try:
        worker.wait_serving()
        asyncio.run(produce_all(settings.broker_url, first_half))
        wait_until(
            lambda: sample(worker, "persona_model_snapshot_version", model="lead") > 0,
            timeout=120,
            what="the lead trainer's first published snapshot",
        )
        asyncio.run(produce_all(settings.broker_url, second_half[:2000]))
        worker.kill()  # SIGKILL while it consumes: no shutdown, no flush
    finally:
        worker.stop()
    asyncio.run(produce_all(settings.broker_url, second_half[2000:]))
    restarted = WorkerProcess(settings, tmp_path / "second.log").start()
    try:
        restarted.wait_serving()

        looks: list[tuple[dict[str, int], dict[str, int]]] = []

        def settled() -> bool:
            """Caught up, and unchanged since the previous look: the stream ended, not paused."""
            produced = examples_in_topic(settings)
            learned = {name: snap.examples_seen for name, snap in checkpoints(settings).items()}
            looks.append((produced, learned))
            steady = len(looks) >= 2 and looks[-2] == looks[-1]
            return bool(produced) and produced == learned and steady

        wait_until(
            settled,
            timeout=180,
            interval=2.0,
            what="trainers caught up with the topic",
            detail=lambda: f"examples produced, learned: {looks[-1]}; {progress(restarted)}",
        )
    finally:
        restarted.stop()
    produced = examples_in_topic(settings)
    learned = {name: snap.examples_seen for name, snap in checkpoints(settings).items()}
    assert produced == learned, f"examples in topic {produced} != learned {learned}"
    assert produced["lead"] > 0 and produced["clusters"] > 0


def test_a_snapshot_with_a_bad_signature_is_refused(served) -> None:
    settings, worker, _ = served
    refused_before = sample(worker, "persona_model_snapshot_refused_total")
    version_before = sample(worker, "persona_model_snapshot_version", model="lead")
    forged = sign(
        Snapshot(
            name="lead",
            version=10_000,
            examples_seen=1,
            training_offset=0,
            payload=b"cos\nsystem\n(S'touch /tmp/persona-pwned'\ntR.",
        ),
        b"not the worker's secret",
    )
    topic = f"{settings.app_id}-model-snapshots"
    asyncio.run(produce_all(settings.broker_url, [(topic, b"lead", forged)]))

    def refused() -> bool:
        return sample(worker, "persona_model_snapshot_refused_total") > refused_before

    wait_until(refused, timeout=30, interval=1.0, what="the forged snapshot to be refused")
    assert sample(worker, "persona_model_snapshot_version", model="lead") == version_before
    assert not Path("/tmp/persona-pwned").exists()
