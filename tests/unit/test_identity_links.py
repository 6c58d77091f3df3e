"""Links stitched where they arrive (streams.identity.run_links) or sent on as claims."""

from __future__ import annotations

from typing import Any

from models import profile_codec
from models.features import new_profile
from models.identity import record_merged
from streams.identity import CLAIM, IdentityWork, alias_key, run_links

HERE, THERE = 1, 2  # partitions: this worker's, and another worker's


class Table:
    """A profiles table over real encoded bytes, with the partition each write went to."""

    def __init__(self, profiles: dict[str, dict[str, Any]] | None = None) -> None:
        self.data = {k.encode(): profile_codec.encode(p) for k, p in (profiles or {}).items()}
        self.writes: list[tuple[int, bytes, bytes | None]] = []

    def write(self, partition: int, key: bytes, value: bytes | None) -> None:
        self.writes.append((partition, key, value))
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value

    def load(self, user_id: str) -> dict[str, Any] | None:
        raw = self.data.get(user_id.encode())
        return profile_codec.decode(raw) if raw else None

    def alias_of(self, anonymous_id: str) -> str | None:
        target = self.data.get(alias_key(anonymous_id))
        return target.decode() if target else None


def stitch(
    table: Table,
    links: list[tuple[str, str, int]],
    changed: dict[str, dict[str, Any]],
    *,
    anonymous_partition: int = HERE,
    erased: frozenset[str] = frozenset(),
) -> tuple[IdentityWork, tuple[int, int], dict[str, int]]:
    work = IdentityWork(links=list(links))
    partition_of = {user_id: 0 for user_id in changed}
    done = run_links(
        work,
        changed,
        partition_of,
        local_partition=lambda _: anonymous_partition if anonymous_partition == HERE else None,
        has_profile=lambda user_id: user_id.encode() in table.data,
        alias_of=table.alias_of,
        is_erased=erased.__contains__,
        load=table.load,
        write=table.write,
    )
    return work, done, partition_of


def claims_sent(work: IdentityWork) -> list[tuple[str, dict[str, Any]]]:
    return [(key, message) for key, message in work.outgoing if message["op"] == CLAIM]


def test_a_login_here_is_stitched_in_its_batch_without_a_message() -> None:
    table = Table()
    user = new_profile("u")  # the identify's own batch changed it
    work, done, _ = stitch(table, [("a", "u", 0)], {"u": user})
    assert done == (1, 1) and work.outgoing == []
    assert user["merged_from"] == ["a"]  # written with the batch's other changes, once
    assert table.writes == [(HERE, alias_key("a"), b"u")]
    assert work.relinked == {"a": "u"}


def test_a_stored_user_not_changed_now_is_noted_and_written_back() -> None:
    table = Table({"u": {**new_profile("u"), "events": 3}})
    changed: dict[str, dict[str, Any]] = {}
    work, done, _ = stitch(table, [("a", "u", 0)], changed)
    assert done == (1, 1) and changed == {} and work.outgoing == []  # not scored again
    stored = table.load("u")
    assert stored is not None and stored["merged_from"] == ["a"] and stored["events"] == 3
    assert [key for _, key, _ in table.writes] == [b"u", alias_key("a")]


def test_a_user_seen_first_in_the_link_gets_a_new_profile() -> None:
    table = Table()
    changed: dict[str, dict[str, Any]] = {}
    _, done, partition_of = stitch(table, [("a", "u", 5)], changed)
    assert done == (1, 1) and changed["u"]["merged_from"] == ["a"] and partition_of["u"] == 5


def test_links_elsewhere_or_with_a_profile_to_move_are_claimed_over_the_topic() -> None:
    elsewhere, _, _ = stitch(
        Table(), [("a", "u", 0)], {"u": new_profile("u")}, anonymous_partition=THERE
    )
    with_events = Table({"b": new_profile("b")})
    moving, done, _ = stitch(with_events, [("b", "u", 0)], {"u": new_profile("u")})
    in_batch, _, _ = stitch(
        Table(), [("c", "u", 0)], {"u": new_profile("u"), "c": new_profile("c")}
    )
    for work, anonymous_id in ((elsewhere, "a"), (moving, "b"), (in_batch, "c")):
        assert claims_sent(work) == [
            (anonymous_id, {"op": CLAIM, "anonymous_id": anonymous_id, "user_id": "u"})
        ]
    assert done == (0, 0) and with_events.writes == []


def test_a_link_already_merged_sends_no_claim() -> None:
    known = new_profile("u")
    record_merged(known, "a")
    work, done, _ = stitch(Table(), [("a", "u", 0)], {"u": known}, anonymous_partition=THERE)
    assert work.outgoing == [] and done == (0, 0)


def test_a_batch_run_again_after_a_cut_does_the_missing_half() -> None:
    """A crash can keep either table write of a link without the other; the batch runs again."""
    noted_only = Table({"u": new_profile("u")})
    user = noted_only.load("u")
    assert user is not None
    record_merged(user, "a")
    _, done, _ = stitch(noted_only, [("a", "u", 0)], {"u": user})
    assert done == (1, 0) and noted_only.writes == [(HERE, alias_key("a"), b"u")]

    aliased_only = Table()
    aliased_only.data[alias_key("a")] = b"u"
    again = new_profile("u")
    work, done, _ = stitch(aliased_only, [("a", "u", 0)], {"u": again})
    assert done == (0, 1) and again["merged_from"] == ["a"] and aliased_only.writes == []
    assert work.relinked == {}

    both = Table()
    both.data[alias_key("a")] = b"u"
    twice, done, _ = stitch(both, [("a", "u", 0)], {"u": user})
    assert done == (0, 0) and both.writes == [] and twice.outgoing == []


def test_an_alias_to_another_user_is_moved_to_the_new_one() -> None:
    table = Table()
    table.data[alias_key("a")] = b"old"
    _, done, _ = stitch(table, [("a", "u", 0)], {"u": new_profile("u")})
    assert done == (1, 1) and table.alias_of("a") == "u"


def test_an_erased_user_links_nothing() -> None:
    table = Table()
    changed = {"u": new_profile("u")}
    work, done, _ = stitch(table, [("a", "u", 0)], changed, erased=frozenset({"u"}))
    assert done == (0, 0) and table.writes == [] and work.outgoing == []
    assert "merged_from" not in changed["u"]


def test_link_keeps_only_events_that_name_an_anonymous_id() -> None:
    work = IdentityWork()
    work.link({"user_id": "u", "linked_id": "a"}, 3)  # type: ignore[typeddict-item]
    work.link({"user_id": "u"}, 3)  # type: ignore[typeddict-item]
    assert work.links == [("a", "u", 3)]
