"""Replay adapters: real event logs turned into Segment-spec messages ready to produce.

What: :func:`read_log` reads a log in one of :data:`FORMATS` (plain or gzip) and returns a
:class:`ReplayLog` of :class:`ReplayMessage` ``(ts, key, value, payload)``: ``value`` is the exact
bytes to produce (orjson of the Segment ``track`` dict), ``key`` the user id, ``ts`` the event
time in epoch seconds; :func:`stream_of` tells the caller which input topic it belongs to.

Why: tests, demos and benchmarks must exercise the engine on real behaviour (REES46, OTTO, UCI
Online Retail) through the same contract as production producers. This module is pure (no Kafka,
Redis or Faust): it only parses files, so the mapping can be unit-tested and the producer stays
a thin loop. Rows that cannot become a valid event are not produced but counted per reason in
``ReplayLog.rejected``; the ``segment-jsonl`` format instead passes every line through unchanged so
that ingest's dead-letter path is exercised.

Choices:

* ``messageId`` is deterministic (``<format>-<row>-<hash of the row>``; ``otto-<session>-<index>-
  <hash>``; ``online-retail-<row>-<InvoiceNo>``), so replaying a file twice is de-duplicated.
  ``row`` is the 1-based data-row number (csv header excluded) or the 1-based line number (jsonl).
* REES46 has no order entity: each ``purchase`` row is one Order Completed of one product, with
  ``order_id = f"{user_session}-{row}"``. OTTO ``orders`` events likewise (revenue 0, no prices).
  REES46 prices are taken as USD, Online Retail as GBP.
* Online Retail lines are grouped by InvoiceNo into one Order Completed (or, for ``C`` invoices,
  one Order Refunded with positive amounts); the invoice time is the earliest kept line's.
* Messages are sorted by ``ts`` (stable: file order on ties), except ``segment-jsonl``, which is
  already a producer log and is replayed in file order (out-of-order events included).

>>> import tempfile
>>> header = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,"
>>> rows = ["2019-10-01 00:00:05 UTC,purchase,1004856,2053,electronics.smartphone,samsung,"
...         "130.76,543,s-1", "2019-10-01 00:00:01 UTC,view,1004856,2053,,samsung,130.76,543,s-1",
...         "2019-10-01 00:00:02 UTC,view,1004856,2053,,,-1,543,s-1"]
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = Path(tmp) / "rees46.csv"
...     _ = path.write_text(header + "user_session\\n" + "\\n".join(rows) + "\\n")
...     log = read_log(path, "rees46")
>>> [(m.payload["event"], stream_of(m)) for m in log.messages]
[('Product Viewed', 'clickstream'), ('Order Completed', 'purchases')]
>>> log.rows, dict(log.rejected)
(3, {'bad price': 1})
>>> log.messages[1].payload["properties"]["revenue"], log.messages[1].key
(130.76, b'543')
>>> otto = parse_lines(['{"session": 7, "events": [{"aid": 42, "ts": 1659304800025, '
...                     '"type": "carts"}]}'], "otto")
>>> message = otto.messages[0]
>>> message.payload["timestamp"], message.payload["properties"]
('2022-07-31T22:00:00.025Z', {'product_id': '42', 'quantity': 1})
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import attrgetter
from pathlib import Path
from typing import Any

import orjson

from models import jsonbytes
from models.events import (
    ORDER_COMPLETED,
    ORDER_REFUNDED,
    PRODUCT_ADDED,
    PRODUCT_VIEWED,
    topic_kind,
)

FORMATS = ("segment-jsonl", "rees46", "otto", "online-retail")

REES46_COLUMNS = (
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
)
ONLINE_RETAIL_COLUMNS = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
REES46_EVENTS = {"view": PRODUCT_VIEWED, "cart": PRODUCT_ADDED, "purchase": ORDER_COMPLETED}
OTTO_EVENTS = {"clicks": PRODUCT_VIEWED, "carts": PRODUCT_ADDED, "orders": ORDER_COMPLETED}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_GZIP_MAGIC = b"\x1f\x8b"


class ReplayError(ValueError):
    """The log cannot be replayed at all: missing file, unknown format, wrong header."""


@dataclass(frozen=True, slots=True)
class ReplayMessage:
    """One message to produce: event time, Kafka key, exact value bytes, parsed payload."""

    ts: float
    key: bytes
    value: bytes
    payload: dict[str, Any] | None


@dataclass(slots=True)
class ReplayLog:
    """A parsed log: messages (sorted by ``ts``), rejected rows per reason, data rows read."""

    messages: list[ReplayMessage] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    rows: int = 0


def stream_of(msg: ReplayMessage) -> str:
    """Input stream of a message: ``clickstream``, ``purchases``, ``email`` or ``identity``.

    Unparsable lines go to ``clickstream`` so that ingest dead-letters them.
    """
    payload = msg.payload
    if payload is None:
        return "clickstream"
    call_type = payload.get("type")
    event = payload.get("event")
    return topic_kind(
        call_type if isinstance(call_type, str) else "",
        event if isinstance(event, str) else "",
    )


def read_log(path: str | Path, fmt: str, *, limit_rows: int | None = None) -> ReplayLog:
    """Read ``path`` (plain or gzip) as ``fmt``; ``limit_rows`` stops after that many data rows.

    With ``limit_rows`` an Online Retail invoice cut by the limit keeps only its lines read.
    """
    _check_format(fmt)
    source = Path(path)
    if not source.is_file():
        raise ReplayError(_one_line(f"{source}: no such file"))
    try:
        with source.open("rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
        with gzip.open(source, "rb") if gzipped else source.open("rb") as stream:
            if fmt in ("segment-jsonl", "otto"):
                return _parse(stream, fmt, limit_rows, str(source))
            lines = (line.decode("utf-8-sig", errors="replace") for line in stream)
            return _parse(lines, fmt, limit_rows, str(source))
    except (OSError, EOFError) as exc:
        raise ReplayError(_one_line(f"{source}: cannot read: {exc}")) from exc


def parse_lines(
    lines: Iterable[str | bytes], fmt: str, *, limit_rows: int | None = None
) -> ReplayLog:
    """Like :func:`read_log` on already-open lines (e.g. ``io.StringIO`` or a list of strings)."""
    _check_format(fmt)
    if fmt in ("segment-jsonl", "otto"):
        data = (line.encode() if isinstance(line, str) else line for line in lines)
        return _parse(data, fmt, limit_rows, "<lines>")
    text = (
        line.decode("utf-8-sig", errors="replace") if isinstance(line, bytes) else line
        for line in lines
    )
    return _parse(text, fmt, limit_rows, "<lines>")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        expected = ", ".join(FORMATS)
        raise ReplayError(_one_line(f"unknown format {fmt!r}; expected one of {expected}"))


def _parse(lines: Iterable[Any], fmt: str, limit_rows: int | None, source: str) -> ReplayLog:
    log = ReplayLog()
    if fmt == "segment-jsonl":
        _read_segment(lines, log, limit_rows)
        return log
    if fmt == "otto":
        _read_otto(lines, log, limit_rows, source)
    elif fmt == "rees46":
        _read_rees46(lines, log, limit_rows, source)
    else:
        _read_online_retail(lines, log, limit_rows, source)
    log.messages.sort(key=attrgetter("ts"))
    return log


# --- helpers -----------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _iso(dt: datetime) -> str:
    """ISO-8601 UTC with ``Z``; milliseconds only when the time has a fraction."""
    spec = "milliseconds" if dt.microsecond else "seconds"
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat(timespec=spec) + "Z"


@lru_cache(maxsize=65536)
def _parse_time(text: str) -> tuple[float, str] | None:
    """``(epoch seconds, ISO Z string)`` for ISO-ish text (``... UTC`` suffix, naive = UTC)."""
    text = text.strip()
    if text.endswith(" UTC"):
        text = text[:-4]
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp(), _iso(parsed)
    except (ValueError, OverflowError, OSError):
        return None


def _track(message_id: str, user_id: str, event: str, iso: str, props: dict[str, Any]) -> dict:
    return {
        "type": "track",
        "event": event,
        "userId": user_id,
        "messageId": message_id,
        "timestamp": iso,
        "properties": props,
    }


def _message(ts: float, user_id: str, payload: dict[str, Any]) -> ReplayMessage:
    return ReplayMessage(ts, user_id.encode(), jsonbytes.dumps(payload), payload)


def _csv_rows(
    lines: Iterable[str], fmt: str, columns: tuple[str, ...], source: str
) -> tuple[Iterator[list[str]], dict[str, int]]:
    """A csv reader past the header, and the column positions; :class:`ReplayError` if wrong."""
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise ReplayError(_one_line(f"{source}: not in {fmt} format: {exc}")) from exc
    if not header:
        raise ReplayError(_one_line(f"{source}: empty file, expected a {fmt} csv header"))
    positions = {name.strip(): i for i, name in enumerate(header)}
    missing = [name for name in columns if name not in positions]
    if missing:
        raise ReplayError(
            _one_line(f"{source}: not in {fmt} format: header lacks column(s) {', '.join(missing)}")
        )
    return _guard_csv(reader, fmt, source), positions


def _guard_csv(reader: Iterator[list[str]], fmt: str, source: str) -> Iterator[list[str]]:
    try:
        yield from reader
    except csv.Error as exc:
        raise ReplayError(_one_line(f"{source}: corrupt {fmt} csv: {exc}")) from exc


def _price(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# --- segment-jsonl -----------------------------------------------------------------------------


def _read_segment(lines: Iterable[bytes], log: ReplayLog, limit_rows: int | None) -> None:
    """Every non-empty line, byte for byte, in file order; nothing is rejected here."""
    messages = log.messages
    for line in lines:
        raw = line[:-1] if line.endswith(b"\n") else line
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            continue
        if limit_rows is not None and log.rows >= limit_rows:
            break
        log.rows += 1
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            messages.append(ReplayMessage(0.0, b"", raw, None))
            continue
        key = _segment_key(parsed)
        stamp = parsed.get("timestamp")
        ts = 0.0
        if isinstance(stamp, str):
            parsed_time = _parse_time(stamp)
            ts = parsed_time[0] if parsed_time else 0.0
        elif isinstance(stamp, int | float) and not isinstance(stamp, bool):
            ts = float(stamp) / 1000.0 if stamp > 1e11 else float(stamp)
        messages.append(ReplayMessage(ts, key, raw, parsed))


def _segment_key(payload: dict[str, Any]) -> bytes:
    """``userId`` else ``anonymousId`` (string or integer); ``b""`` if absent or mistyped."""
    for name in ("userId", "anonymousId"):
        ident = payload.get(name)
        if ident is None or ident == "" or isinstance(ident, bool):
            continue
        if isinstance(ident, str):
            return ident.encode("utf-8", "surrogatepass")
        return str(ident).encode() if isinstance(ident, int) else b""
    return b""


# --- REES46 ------------------------------------------------------------------------------------


def _read_rees46(lines: Iterable[str], log: ReplayLog, limit_rows: int | None, source: str) -> None:
    """REES46 ``view|cart|purchase`` rows: one track event per row."""
    rows, pos = _csv_rows(lines, "rees46", REES46_COLUMNS, source)
    width = len(pos)
    i_time, i_type, i_product = pos["event_time"], pos["event_type"], pos["product_id"]
    i_cat_id, i_cat_code, i_brand = pos["category_id"], pos["category_code"], pos["brand"]
    i_price, i_user, i_session = pos["price"], pos["user_id"], pos["user_session"]
    rejected, messages = log.rejected, log.messages
    for row_no, row in enumerate(rows, 1):
        if limit_rows is not None and row_no > limit_rows:
            break
        log.rows = row_no
        if len(row) != width:
            rejected["wrong field count"] += 1
            continue
        event = REES46_EVENTS.get(row[i_type].strip())
        if event is None:
            rejected["unknown event_type"] += 1
            continue
        user_id = row[i_user].strip()
        if not user_id:
            rejected["missing user_id"] += 1
            continue
        product_id = row[i_product].strip()
        if not product_id:
            rejected["missing product_id"] += 1
            continue
        price = _price(row[i_price])
        if price is None or price < 0:
            rejected["bad price"] += 1
            continue
        when = _parse_time(row[i_time])
        if when is None:
            rejected["bad event_time"] += 1
            continue
        category = row[i_cat_code].strip() or row[i_cat_id].strip()
        brand = row[i_brand].strip()
        product: dict[str, Any] = {"product_id": product_id}
        if category:
            product["category"] = category
        if brand:
            product["brand"] = brand
        product["price"] = price
        product["quantity"] = 1
        if event == ORDER_COMPLETED:
            props: dict[str, Any] = {
                "order_id": f"{row[i_session].strip()}-{row_no}",
                "revenue": price,
                "currency": "USD",
                "products": [product],
            }
        else:
            props = {**product, "currency": "USD"}
        message_id = f"rees46-{row_no}-{_digest(','.join(row))}"
        messages.append(
            _message(when[0], user_id, _track(message_id, user_id, event, when[1], props))
        )


# --- OTTO --------------------------------------------------------------------------------------


def _read_otto(lines: Iterable[bytes], log: ReplayLog, limit_rows: int | None, source: str) -> None:
    """OTTO sessions: one track event per clicks/carts/orders event; userId ``otto-<session>``."""
    rejected, messages = log.rejected, log.messages
    checked = False
    for line in lines:
        if not line.strip():
            continue
        if limit_rows is not None and log.rows >= limit_rows:
            break
        log.rows += 1
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            record = None
        if not checked:
            if not (isinstance(record, dict) and "session" in record and "events" in record):
                raise ReplayError(
                    _one_line(
                        f"{source}: not in otto format: first line is not a JSON object with "
                        "'session' and 'events'"
                    )
                )
            checked = True
        if not isinstance(record, dict):
            rejected["bad json line"] += 1
            continue
        session = record.get("session")
        events = record.get("events")
        if not isinstance(session, int) or isinstance(session, bool):
            rejected["bad session"] += 1
            continue
        if not isinstance(events, list):
            rejected["bad events"] += 1
            continue
        user_id = f"otto-{session}"
        for index, item in enumerate(events):
            if not isinstance(item, dict):
                rejected["bad event"] += 1
                continue
            aid, ms, kind = item.get("aid"), item.get("ts"), item.get("type")
            if not isinstance(aid, int) or isinstance(aid, bool) or aid < 0:
                rejected["bad aid"] += 1
                continue
            if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms < 253402300800000:
                rejected["bad ts"] += 1
                continue
            event = OTTO_EVENTS.get(kind) if isinstance(kind, str) else None
            if event is None:
                rejected["unknown type"] += 1
                continue
            product_id = str(aid)
            props: dict[str, Any]
            if event == ORDER_COMPLETED:
                props = {
                    "order_id": f"otto-{session}-{index}",
                    "revenue": 0,
                    "products": [{"product_id": product_id, "quantity": 1}],
                }
            elif event == PRODUCT_ADDED:
                props = {"product_id": product_id, "quantity": 1}
            else:
                props = {"product_id": product_id}
            message_id = f"otto-{session}-{index}-{_digest(f'{session}:{aid}:{ms}:{kind}')}"
            iso = _iso(_EPOCH + timedelta(milliseconds=ms))
            messages.append(
                _message(ms / 1000.0, user_id, _track(message_id, user_id, event, iso, props))
            )


# --- UCI Online Retail -------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _customer(text: str) -> str | None:
    """``"17850.0"`` -> ``"17850"``; ``None`` when not an integral number."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value != int(value) or value < 0:
        return None
    return str(int(value))


class _Invoice:
    __slots__ = ("country", "customer", "iso", "number", "products", "revenue", "row", "ts")

    def __init__(self, number: str, row: int, customer: str, ts: float, iso: str, country: str):
        self.number, self.row, self.customer, self.country = number, row, customer, country
        self.ts, self.iso = ts, iso
        self.products: list[dict[str, Any]] = []
        self.revenue = 0.0


def _read_online_retail(
    lines: Iterable[str], log: ReplayLog, limit_rows: int | None, source: str
) -> None:
    """UCI Online Retail lines grouped into one Order Completed / Order Refunded per invoice."""
    rows, pos = _csv_rows(lines, "online-retail", ONLINE_RETAIL_COLUMNS, source)
    width = len(pos)
    i_inv, i_code, i_desc = pos["InvoiceNo"], pos["StockCode"], pos["Description"]
    i_qty, i_date, i_price = pos["Quantity"], pos["InvoiceDate"], pos["UnitPrice"]
    i_cust, i_country = pos["CustomerID"], pos["Country"]
    rejected = log.rejected
    invoices: dict[str, _Invoice] = {}
    shared: dict[str, str] = {}
    prices: dict[float, float] = {}
    for row_no, row in enumerate(rows, 1):
        if limit_rows is not None and row_no > limit_rows:
            break
        log.rows = row_no
        if len(row) != width:
            rejected["wrong field count"] += 1
            continue
        number = row[i_inv].strip()
        if not number:
            rejected["missing InvoiceNo"] += 1
            continue
        cust_text = row[i_cust].strip()
        if not cust_text:
            rejected["missing CustomerID"] += 1
            continue
        customer = _customer(cust_text)
        if customer is None:
            rejected["bad CustomerID"] += 1
            continue
        try:
            quantity = int(row[i_qty])
        except ValueError:
            rejected["bad Quantity"] += 1
            continue
        cancelled = number.startswith("C")
        if quantity == 0 or (quantity < 0 and not cancelled):
            rejected["Quantity <= 0"] += 1
            continue
        price = _price(row[i_price])
        if price is None:
            rejected["bad UnitPrice"] += 1
            continue
        if price <= 0:
            rejected["UnitPrice <= 0"] += 1
            continue
        when = _parse_time(row[i_date])
        if when is None:
            rejected["bad InvoiceDate"] += 1
            continue
        invoice = invoices.get(number)
        if invoice is None:
            invoice = invoices[number] = _Invoice(
                number, row_no, customer, when[0], when[1], row[i_country].strip()
            )
        elif invoice.customer != customer:
            rejected["CustomerID differs within invoice"] += 1
            continue
        elif when[0] < invoice.ts:
            invoice.ts, invoice.iso = when
        quantity = abs(quantity)
        # Codes, names and prices repeat a lot: share one object each to keep memory down.
        code = row[i_code].strip()
        product: dict[str, Any] = {"product_id": shared.setdefault(code, code)}
        name = row[i_desc].strip()
        if name:
            product["name"] = shared.setdefault(name, name)
        product["price"] = prices.setdefault(price, price)
        product["quantity"] = quantity
        invoice.products.append(product)
        invoice.revenue += quantity * price
    messages = log.messages
    for invoice in invoices.values():
        event = ORDER_REFUNDED if invoice.number.startswith("C") else ORDER_COMPLETED
        props = {
            "order_id": invoice.number,
            "revenue": round(invoice.revenue, 2),
            "currency": "GBP",
            "products": invoice.products,
        }
        payload = _track(
            f"online-retail-{invoice.row}-{invoice.number}",
            invoice.customer,
            event,
            invoice.iso,
            props,
        )
        if invoice.country:
            payload["context"] = {"location": {"country": invoice.country}}
        messages.append(_message(invoice.ts, invoice.customer, payload))
