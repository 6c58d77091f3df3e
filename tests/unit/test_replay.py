"""Unit tests for the replay adapters (``connectors.replay``) on the real datasets; no broker."""

from __future__ import annotations

import csv
import gzip
import json
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from connectors.replay import (
    FORMATS,
    ReplayError,
    ReplayLog,
    ReplayMessage,
    parse_lines,
    read_log,
    stream_of,
)
from models.events import (
    ORDER_COMPLETED,
    ORDER_REFUNDED,
    PRODUCT_ADDED,
    PRODUCT_VIEWED,
)
from tests.conftest import DATASETS

REES46 = DATASETS / "clickstream_samples" / "rees46_2019-Oct_first1000.csv"
OTTO = DATASETS / "clickstream_samples" / "otto_train_first20sessions.jsonl"
RETAIL = DATASETS / "uci_online_retail" / "online_retail.csv.gz"

REES46_NAMES = {"view": PRODUCT_VIEWED, "cart": PRODUCT_ADDED, "purchase": ORDER_COMPLETED}
OTTO_NAMES = {"clicks": PRODUCT_VIEWED, "carts": PRODUCT_ADDED, "orders": ORDER_COMPLETED}


def need(path: Path) -> Path:
    """Skip the test when a real dataset file is not there."""
    if not path.is_file():
        pytest.skip(f"dataset not found: {path.resolve()} (expected ../shared/datasets)")
    return path


def check_messages(log: ReplayLog) -> None:
    """Invariants shared by the converted formats."""
    assert [m.ts for m in log.messages] == sorted(m.ts for m in log.messages)
    ids = [m.payload["messageId"] for m in log.messages]
    assert len(ids) == len(set(ids))
    for m in log.messages:
        assert isinstance(m, ReplayMessage)
        assert m.value == orjson.dumps(m.payload)
        assert m.key == m.payload["userId"].encode()
        assert m.payload["type"] == "track"
        stamp = datetime.fromisoformat(m.payload["timestamp"])
        assert m.payload["timestamp"].endswith("Z")
        assert stamp.timestamp() == pytest.approx(m.ts, abs=1e-3)


def row_of(message_id: str) -> int:
    return int(message_id.split("-")[1])


# --- REES46 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rees46_rows() -> list[dict[str, str]]:
    with need(REES46).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_rees46_counts_order_and_revenue(rees46_rows: list[dict[str, str]]) -> None:
    log = read_log(REES46, "rees46")
    assert log.rows == len(rees46_rows) == 1000
    assert log.rejected == Counter()
    expected = Counter(REES46_NAMES[row["event_type"]] for row in rees46_rows)
    assert Counter(m.payload["event"] for m in log.messages) == expected
    check_messages(log)
    # Stable sort: equal timestamps keep file order.
    assert [(m.ts, row_of(m.payload["messageId"])) for m in log.messages] == sorted(
        (m.ts, row_of(m.payload["messageId"])) for m in log.messages
    )
    first = log.messages[0]
    assert first.ts == datetime(2019, 10, 1, tzinfo=UTC).timestamp()
    assert first.payload["timestamp"] == "2019-10-01T00:00:00Z"
    # Revenue per user equals an independent sum of purchase prices.
    revenue: dict[str, float] = defaultdict(float)
    for row in rees46_rows:
        if row["event_type"] == "purchase":
            revenue[row["user_id"]] += float(row["price"])
    got: dict[str, float] = defaultdict(float)
    for m in log.messages:
        if m.payload["event"] == ORDER_COMPLETED:
            props = m.payload["properties"]
            assert len(props["products"]) == 1 and props["products"][0]["quantity"] == 1
            assert props["revenue"] == props["products"][0]["price"]
            got[m.payload["userId"]] += props["revenue"]
    assert got.keys() == revenue.keys()
    for user, amount in revenue.items():
        assert got[user] == pytest.approx(amount)
    assert {stream_of(m) for m in log.messages if m.payload["event"] == ORDER_COMPLETED} == {
        "purchases"
    }


def test_rees46_properties(rees46_rows: list[dict[str, str]]) -> None:
    log = read_log(REES46, "rees46", limit_rows=50)
    assert log.rows == 50 and len(log.messages) == 50
    by_row = {row_of(m.payload["messageId"]): m.payload for m in log.messages}
    for row_no, row in enumerate(rees46_rows[:50], 1):
        props = by_row[row_no]["properties"]
        if row["event_type"] == "purchase":
            props = props["products"][0]
        assert props["product_id"] == row["product_id"]
        assert props["category"] == (row["category_code"] or row["category_id"])
        assert props.get("brand", "") == row["brand"]
        assert props["price"] == float(row["price"])
        assert by_row[row_no]["userId"] == row["user_id"]


def test_rees46_rejects_with_reasons(tmp_path: Path) -> None:
    lines = need(REES46).read_text().splitlines()
    header, good = lines[0], lines[1].split(",")

    def variant(**changes: str) -> str:
        row = dict(zip(header.split(","), good, strict=True))
        row.update(changes)
        return ",".join(row.values())

    bad = [
        variant(user_id=""),
        variant(price="abc"),
        variant(price="-1.50"),
        variant(price="nan"),
        variant(event_time="yesterday"),
        variant(event_type="remove_from_cart"),
        "2019-10-01 00:00:00 UTC,view,1",
    ]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([header, *bad, variant(), variant(price="0")]) + "\n")
    log = read_log(path, "rees46")
    assert log.rows == len(bad) + 2
    assert log.rejected == Counter(
        {
            "missing user_id": 1,
            "bad price": 3,
            "bad event_time": 1,
            "unknown event_type": 1,
            "wrong field count": 1,
        }
    )
    assert len(log.messages) == 2


def test_gzip_is_transparent(tmp_path: Path) -> None:
    packed = tmp_path / "rees46.csv.gz"
    packed.write_bytes(gzip.compress(need(REES46).read_bytes()))
    assert read_log(packed, "rees46").messages == read_log(REES46, "rees46").messages


# --- OTTO --------------------------------------------------------------------------------------


def test_otto_counts_and_ids() -> None:
    sessions = [json.loads(line) for line in need(OTTO).read_text().splitlines() if line.strip()]
    events = [(s["session"], e) for s in sessions for e in s["events"]]
    log = read_log(OTTO, "otto")
    assert log.rows == len(sessions) == 20
    assert log.rejected == Counter()
    assert len(log.messages) == len(events) == 862
    check_messages(log)
    assert Counter(m.payload["event"] for m in log.messages) == Counter(
        OTTO_NAMES[e["type"]] for _, e in events
    )
    assert Counter(m.key for m in log.messages) == Counter(f"otto-{s}".encode() for s, _ in events)
    assert sorted(m.ts for m in log.messages) == sorted(e["ts"] / 1000 for _, e in events)
    for m in log.messages:
        props = m.payload["properties"]
        if m.payload["event"] == ORDER_COMPLETED:
            assert props["revenue"] == 0
            assert "price" not in props["products"][0]
            assert stream_of(m) == "purchases"
        else:
            assert stream_of(m) == "clickstream"


def test_otto_rejects_malformed(tmp_path: Path) -> None:
    lines = [
        '{"session": 1, "events": [{"aid": 5, "ts": 1659304800025, "type": "clicks"},'
        ' {"aid": "x", "ts": 1659304800025, "type": "clicks"},'
        ' {"aid": 6, "ts": -3, "type": "carts"}, {"aid": 7, "ts": 1659304800030, "type": "buy"},'
        " 42]}",
        "not json",
        '{"session": "s", "events": []}',
        '{"session": 2, "events": {}}',
        "",
        '{"session": 3, "events": [{"aid": 8, "ts": 1659304800000, "type": "orders"}]}',
    ]
    path = tmp_path / "otto.jsonl"
    path.write_text("\n".join(lines) + "\n")
    log = read_log(path, "otto")
    assert log.rows == 5
    assert log.rejected == Counter(
        {
            "bad aid": 1,
            "bad ts": 1,
            "unknown type": 1,
            "bad event": 1,
            "bad json line": 1,
            "bad session": 1,
            "bad events": 1,
        }
    )
    assert [m.payload["event"] for m in log.messages] == [ORDER_COMPLETED, PRODUCT_VIEWED]
    assert parse_lines(lines, "otto").messages == log.messages


# --- UCI Online Retail -------------------------------------------------------------------------


def independent_invoices(limit: int) -> tuple[dict[str, float], dict[str, float], int]:
    """(completed invoice -> revenue, refunded invoice -> revenue, kept lines) by plain csv."""
    completed: dict[str, float] = defaultdict(float)
    refunded: dict[str, float] = defaultdict(float)
    kept = 0
    with gzip.open(RETAIL, "rt", encoding="utf-8", newline="") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            if i >= limit:
                break
            quantity, price = int(row["Quantity"]), float(row["UnitPrice"])
            cancelled = row["InvoiceNo"].startswith("C")
            if not row["CustomerID"] or price <= 0 or (quantity <= 0 and not cancelled):
                continue
            kept += 1
            target = refunded if cancelled else completed
            target[row["InvoiceNo"]] += abs(quantity) * price
    return completed, refunded, kept


def test_online_retail_slice_matches_independent_cleanup() -> None:
    need(RETAIL)
    limit = 20_000
    log = read_log(RETAIL, "online-retail", limit_rows=limit)
    completed, refunded, kept = independent_invoices(limit)
    assert log.rows == limit
    check_messages(log)
    lines = sum(len(m.payload["properties"]["products"]) for m in log.messages)
    assert lines == kept
    assert lines + sum(log.rejected.values()) == limit
    assert set(log.rejected) <= {"missing CustomerID", "UnitPrice <= 0", "Quantity <= 0"}
    got = {ORDER_COMPLETED: {}, ORDER_REFUNDED: {}}
    for m in log.messages:
        got[m.payload["event"]][m.payload["properties"]["order_id"]] = m.payload["properties"]
        assert stream_of(m) == "purchases"
    assert got[ORDER_COMPLETED].keys() == completed.keys()
    assert got[ORDER_REFUNDED].keys() == refunded.keys()
    for name, expected in ((ORDER_COMPLETED, completed), (ORDER_REFUNDED, refunded)):
        for invoice, amount in expected.items():
            props = got[name][invoice]
            assert props["revenue"] == round(amount, 2) and props["revenue"] > 0
            assert props["currency"] == "GBP"
            assert all(p["quantity"] > 0 and p["price"] > 0 for p in props["products"])
    first = log.messages[0].payload
    assert first["userId"] == "17850" and first["timestamp"] == "2010-12-01T08:26:00Z"
    assert first["properties"]["products"][0] == {
        "product_id": "85123A",
        "name": "WHITE HANGING HEART T-LIGHT HOLDER",
        "price": 2.55,
        "quantity": 6,
    }


def test_online_retail_full_file_matches_readme() -> None:
    """The whole file (541,909 lines) loads in a few seconds: README clean-up figures."""
    need(RETAIL)
    log = read_log(RETAIL, "online-retail")
    assert log.rows == 541_909
    orders = [m for m in log.messages if m.payload["event"] == ORDER_COMPLETED]
    assert len(orders) == 18_532
    assert len({m.key for m in orders}) == 4_338
    assert sum(len(m.payload["properties"]["products"]) for m in orders) == 397_884
    assert log.rejected["missing CustomerID"] == 135_080


# --- segment-jsonl -----------------------------------------------------------------------------


def test_segment_jsonl_keeps_raw_bytes_and_order(tmp_path: Path) -> None:
    later = (
        b'{"type":"track","event":"Order Completed","userId":"u-1","messageId":"m-1",'
        b'"timestamp":"2024-01-02T00:00:00Z","properties":{"revenue":5}}'
    )
    earlier = b'{ "type": "identify", "anonymousId": "a-9", "timestamp": "2024-01-01T00:00:00Z" }'
    raw_lines = [
        later,
        b"not json at all",
        b"",
        b'{"type": "track", "event": "Product Viewed", "userId": 7}\r',
        b"\xff\xfe invalid utf-8",
        b"[1, 2, 3]",
        earlier,
        b"   ",
        b'{"type":"track","event":"Email Opened","userId":["x"],"anonymousId":"a"}',
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(raw_lines))  # no trailing newline on the last line
    log = read_log(path, "segment-jsonl")
    values = [line.removesuffix(b"\r") for line in raw_lines if line.strip()]
    assert [m.value for m in log.messages] == values  # file order, bytes exact
    assert log.rows == len(values) and log.rejected == Counter()
    assert [m.key for m in log.messages] == [b"u-1", b"", b"7", b"", b"", b"a-9", b""]
    assert [m.payload is None for m in log.messages] == [
        False,
        True,
        False,
        True,
        True,
        False,
        False,
    ]
    assert [stream_of(m) for m in log.messages] == [
        "purchases",
        "clickstream",
        "clickstream",
        "clickstream",
        "clickstream",
        "identity",
        "email",
    ]
    assert log.messages[0].ts == datetime(2024, 1, 2, tzinfo=UTC).timestamp()
    assert log.messages[1].ts == 0.0
    assert parse_lines(raw_lines, "segment-jsonl").messages == log.messages


def test_segment_jsonl_round_trip_of_converted_log(tmp_path: Path) -> None:
    converted = read_log(need(REES46), "rees46")
    path = tmp_path / "rees46.jsonl"
    path.write_bytes(b"\n".join(m.value for m in converted.messages) + b"\n")
    assert read_log(path, "segment-jsonl").messages == converted.messages


# --- errors ------------------------------------------------------------------------------------


def assert_one_line(excinfo: pytest.ExceptionInfo[ReplayError], *words: str) -> None:
    message = str(excinfo.value)
    assert message and "\n" not in message
    for word in words:
        assert word in message


def test_errors_are_one_line(tmp_path: Path) -> None:
    assert FORMATS == ("segment-jsonl", "rees46", "otto", "online-retail")
    with pytest.raises(ReplayError) as excinfo:
        read_log(tmp_path / "missing.csv", "rees46")
    assert_one_line(excinfo, "missing.csv", "no such file")
    with pytest.raises(ReplayError) as excinfo:
        read_log(need(REES46), "parquet")
    assert_one_line(excinfo, "unknown format", "parquet")
    assert issubclass(ReplayError, ValueError)
    with pytest.raises(ReplayError) as excinfo:
        read_log(need(OTTO), "rees46")
    assert_one_line(excinfo, "not in rees46 format", "event_time")
    with pytest.raises(ReplayError) as excinfo:
        read_log(REES46, "online-retail")
    assert_one_line(excinfo, "not in online-retail format", "InvoiceNo")
    with pytest.raises(ReplayError) as excinfo:
        read_log(REES46, "otto")
    assert_one_line(excinfo, "not in otto format")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ReplayError) as excinfo:
        read_log(empty, "rees46")
    assert_one_line(excinfo, "empty file")
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(gzip.compress(REES46.read_bytes())[:500])
    with pytest.raises(ReplayError) as excinfo:
        read_log(broken, "rees46")
    assert_one_line(excinfo, "cannot read")


# --- contract with ingest ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fmt", "limit"),
    [(REES46, "rees46", None), (OTTO, "otto", None), (RETAIL, "online-retail", 20_000)],
)
def test_converted_messages_pass_ingest_validation(path: Path, fmt: str, limit: int | None) -> None:
    segment = pytest.importorskip("connectors.segment")
    log = read_log(need(path), fmt, limit_rows=limit)
    assert log.messages
    for m in log.messages:
        event = segment.parse_event(m.value, now=time.time())
        assert not isinstance(event, segment.Rejection), (event, m.value[:200])
        assert event["user_id"].encode() == m.key == segment.partition_key(m.payload)
        assert event["ts"] == pytest.approx(m.ts, abs=1e-3)
        assert segment.route(m.payload) == stream_of(m)
