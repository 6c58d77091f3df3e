"""``persona bench`` end to end on a small log: every number is there and sane, nothing is left.

No speed thresholds: how fast is a question for the benchmark itself, not for a test on a
shared machine.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from pathlib import Path

import orjson
import pytest

from streams import cli
from streams.bench import RESULT_KEYS, WARM_LEAD_VERSION, format_report, run_bench

pytestmark = pytest.mark.integration

TAG = "PERSONA_BENCH_TEST_TAG"


def processes_with(marker: bytes) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (ours are readable)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def test_bench_reports_every_number_and_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = uuid.uuid4().hex
    monkeypatch.setenv(TAG, marker)  # inherited by the broker, Redis, workers, the count app
    children_before = set(children_of(os.getpid()))

    result = run_bench(
        5000, users=1000, seed=7, workers=2, partitions=4, data_dir=tmp_path,
        memory_events=20_000, memory_users=20_000, rounds=2,
    )  # fmt: skip

    for key in (*RESULT_KEYS, "two_worker_events_per_s", "scale_ratio", "machine"):
        assert key in result, key
    assert result["events"] == 5000
    assert result["workers"] == 2
    for key in (
        "engine_events_per_s", "ceiling_events_per_s", "ratio", "faust_count_events_per_s",
        "p50_ms", "p99_ms", "two_worker_events_per_s", "scale_ratio",
    ):  # fmt: skip
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert result["p99_ms"] >= result["p50_ms"]
    # Two rounds of a ceiling and an engine run: the figures are their medians (two: the mean).
    rounds = result["rounds"]
    assert len(rounds) == 2
    for key in ("ceiling_events_per_s", "engine_events_per_s", "ratio"):
        assert all(r[key] > 0 for r in rounds), (key, rounds)
        assert result[key] == pytest.approx(sum(r[key] for r in rounds) / 2, rel=1e-9), key
    assert all(
        r["ratio"] == round(r["engine_events_per_s"] / r["ceiling_events_per_s"], 3) for r in rounds
    )
    # Taken into a batch comes before written to Redis, event by event: so do the quantiles.
    assert 0 < result["received_p99_ms"] <= result["p99_ms"]
    assert 0 < result["later_received_p99_ms"] <= result["later_p99_ms"]
    assert result["latency_events"] == 5000 and result["later_events"] > 0
    assert result["paced_rss_mb_per_100k_profiles"] > 0
    # The memory run: growth per profile of a fresh worker once warm, and the projection.
    assert result["memory_events"] == 20_000
    warm, profiles = result["memory_profiles_warm"], result["memory_profiles"]
    assert 0 < warm < profiles <= 20_000
    per_100k, end = result["rss_mb_per_100k_profiles"], result["memory_rss_end_mb"]
    assert result["memory_rss_start_mb"] > 0 and end > 0 and math.isfinite(per_100k)
    assert result["memory_rss_peak_mb"] >= result["memory_rss_start_mb"]
    assert math.isfinite(result["rss_mb_per_100k_profiles_with_startup"])
    projected = end + per_100k * (1_000_000 - profiles) / 100_000
    assert result["rss_mb_at_1m_profiles_projected"] == pytest.approx(projected, abs=0.1)
    # Every event changes a profile; several events of one user in one batch are written once.
    assert 0 < result["engine_profile_writes_per_event"] <= result["profile_writes_per_event"]
    assert 0 < result["profiles"] <= 1000
    # Every contender scored with the trained lead model; the engine served it as published.
    assert result["lead_model_examples"] > 100
    assert result["engine_lead_model_version"] == WARM_LEAD_VERSION
    assert result["machine"]["nproc"] >= 1 and result["machine"]["cpu_model"]
    report = format_report(result)
    assert "events/s" in report and "p99" in report and "per 100k profiles" in report
    assert "2 rounds" in report

    assert processes_with(f"{TAG}={marker}".encode()) == []
    assert set(children_of(os.getpid())) <= children_before


def test_bench_memory_reads_rss_after_every_part_and_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = uuid.uuid4().hex
    monkeypatch.setenv(TAG, marker)
    monkeypatch.setenv("PERSONA_MALLOC_TRIM_S", "1")  # the run waits for a trim after each part
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run's data directory
    children_before = set(children_of(os.getpid()))

    args = ["bench-memory", "--events", "12000", "--users", "12000", "--parts", "3", "--json"]
    assert cli.main(args) == 0

    out = capsys.readouterr().out
    result = orjson.loads(out.splitlines()[-1])
    assert result["memory_events"] == 12_000 and result["store"] == "memory://"
    assert Path(result["data_dir"]).parent == tmp_path
    parts = result["memory_parts"]
    assert len(parts) == 3
    counts = [part["profiles"] for part in parts]
    assert 0 < counts[0] < counts[1] < counts[2] <= 12_000, counts
    assert all(part["rss_mb"] > 0 for part in parts)
    assert result["memory_profiles"] == counts[2] and result["memory_profiles_warm"] == counts[1]
    grown = parts[2]["rss_mb"] - parts[1]["rss_mb"]
    added = counts[2] - counts[1]
    # Each part's rss_mb is rounded to 0.1 MiB, the figure is computed from KiB: their
    # difference can be 0.1 MiB over the profiles added (2% at 450 MiB per 100k and 1,000 added).
    rounding = 0.1 / added * 100_000 + 0.1
    slope = grown / added * 100_000
    assert result["rss_mb_per_100k_profiles"] == pytest.approx(slope, abs=rounding)
    assert out.count(" MiB  ") == 3  # a row per part, with its slope
    assert processes_with(f"{TAG}={marker}".encode()) == []
    assert set(children_of(os.getpid())) <= children_before
