"""Expected abandoned-cart triggers computed independently from the raw REES46 / OTTO files.

What: plain Python over the raw rows. It uses neither ``connectors.replay`` nor ``models``, so a
test can check the engine (replay → segment → features → triggers) against it. The rules are:

* Rows per user in event-time order (ties: file order). REES46 ``cart`` and OTTO ``carts`` add an
  item; REES46 ``purchase`` and OTTO ``orders`` are orders. Views are ignored.
* An add at or before the user's last order is stale: that cart was already bought.
* An episode opens at the first add when none is open, and an order closes it.
* The episode is abandoned at ``last add + timeout`` if the next add or the order comes at least
  ``timeout`` later. For the last add it is abandoned if the final watermark, the largest event
  time in the file, reaches that deadline. There is no flush at +infinity, so a cart still
  waiting at the end of the file is not abandoned. At most one abandonment per episode (the
  first gap).
* Cap: sorted by abandonment time, an abandonment is kept only if none was kept in the previous
  ``cap_hours`` of event time. Consent is assumed given.

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = pathlib.Path(tmp) / "otto.jsonl"
...     _ = path.write_text('{"session": 1, "events": [{"aid": 5, "ts": 0, "type": "carts"}, '
...                         '{"aid": 6, "ts": 1800000, "type": "clicks"}]}\\n')
...     sorted(expected_abandoned_carts_otto(path))
[('otto-1', 0.0)]
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "Abandonment",
    "abandonments",
    "expected_abandoned_carts_otto",
    "expected_abandoned_carts_rees46",
    "read_otto_rows",
    "read_rees46_rows",
]

CART, ORDER, OTHER = "cart", "order", "other"


class Abandonment(NamedTuple):
    user_id: str
    episode_start: float
    abandoned_at: float


Row = tuple[float, str, str]  # (event time in seconds, user id, CART | ORDER | OTHER)


def read_rees46_rows(path: str | Path) -> list[Row]:
    """``(ts, user_id, kind)`` per usable REES46 row, in file order."""
    kinds = {"cart": CART, "purchase": ORDER}
    rows: list[Row] = []
    with Path(path).open(newline="", encoding="utf-8") as stream:
        for record in csv.DictReader(stream):
            user, product = record["user_id"].strip(), record["product_id"].strip()
            try:
                price = float(record["price"])
            except ValueError:
                continue
            if not user or not product or price < 0:
                continue
            when = datetime.strptime(record["event_time"].strip(), "%Y-%m-%d %H:%M:%S UTC")
            ts = when.replace(tzinfo=UTC).timestamp()
            rows.append((ts, user, kinds.get(record["event_type"].strip(), OTHER)))
    return rows


def read_otto_rows(path: str | Path) -> list[Row]:
    """``(ts, "otto-<session>", kind)`` per OTTO event (``ts`` is in ms in the file)."""
    kinds = {"carts": CART, "orders": ORDER}
    rows: list[Row] = []
    with Path(path).open(encoding="utf-8") as stream:
        for line in stream:
            if not line.strip():
                continue
            session = json.loads(line)
            user = f"otto-{session['session']}"
            for event in session["events"]:
                rows.append((event["ts"] / 1000.0, user, kinds.get(event["type"], OTHER)))
    return rows


def abandonments(
    rows: list[Row], *, abandon_after_minutes: float = 30.0, cap_hours: float = 24.0
) -> list[Abandonment]:
    """Abandonments (after the cap) per the module's rules, sorted by user then time."""
    if not rows:
        return []
    timeout = abandon_after_minutes * 60.0
    final_watermark = max(ts for ts, _, _ in rows)
    per_user: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for ts, user, kind in sorted(rows, key=lambda row: row[0]):  # stable: file order on ties
        if kind != OTHER:
            per_user[user].append((ts, kind))
    result: list[Abandonment] = []
    for user, events in per_user.items():
        found: list[Abandonment] = []
        last_order: float | None = None
        start: float | None = None  # open episode's start
        last_add = 0.0
        done = False
        for ts, kind in events:
            if kind == CART:
                if last_order is not None and ts <= last_order:
                    continue
                if start is None:
                    start, last_add, done = ts, ts, False
                    continue
                if not done and ts - last_add >= timeout:
                    found.append(Abandonment(user, start, last_add + timeout))
                    done = True
                last_add = max(last_add, ts)
            else:
                if start is not None and not done and ts - last_add >= timeout:
                    found.append(Abandonment(user, start, last_add + timeout))
                start = None
                last_order = ts if last_order is None else max(last_order, ts)
        if start is not None and not done and final_watermark - last_add >= timeout:
            found.append(Abandonment(user, start, last_add + timeout))
        kept_at: float | None = None
        for item in sorted(found, key=lambda a: a.abandoned_at):
            if kept_at is None or item.abandoned_at - kept_at >= cap_hours * 3600.0:
                result.append(item)
                kept_at = item.abandoned_at
    result.sort()
    return result


def expected_abandoned_carts_rees46(
    path: str | Path, *, abandon_after_minutes: float = 30.0, cap_hours: float = 24.0
) -> set[tuple[str, float]]:
    """``{(user_id, episode start)}`` of the abandoned-cart triggers expected on a REES46 csv."""
    found = abandonments(
        read_rees46_rows(path), abandon_after_minutes=abandon_after_minutes, cap_hours=cap_hours
    )
    return {(a.user_id, a.episode_start) for a in found}


def expected_abandoned_carts_otto(
    path: str | Path, *, abandon_after_minutes: float = 30.0, cap_hours: float = 24.0
) -> set[tuple[str, float]]:
    """``{(user_id, episode start)}`` of the abandoned-cart triggers expected on an OTTO jsonl."""
    found = abandonments(
        read_otto_rows(path), abandon_after_minutes=abandon_after_minutes, cap_hours=cap_hours
    )
    return {(a.user_id, a.episode_start) for a in found}
