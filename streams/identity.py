"""Identity stitching on the stream: move an anonymous profile to the known user's partition.

Input topics are keyed by user id, so an anonymous visitor's profile lives on the partition of
its ``anonymousId`` and the known user's on the partition of the ``userId``. An identify (or
alias) call that links the two reaches the user's partition; the link then travels over the
internal topic ``<app>-identity-links`` (co-partitioned, keyed by the id whose partition must act):

1. ``claim`` (key: anonymous id). The anonymous partition replaces the profile by an alias entry
   (table key ``\\x00alias/<anonymous id>`` → user id), re-keys Redis (the profile hash goes, an
   alias key ``persona:alias:{id}`` points to the user) and sends the profile on as ``merge``.
2. ``merge`` (key: user id). The user's partition folds it in (``models.identity``): counts add,
   cart and its abandonment timer kept, consent from the known user. The profile remembers the
   anonymous ids merged (``merged_from``), so a re-delivered merge is skipped. An anonymous id
   without a profile (no events of its own) is only noted there.
3. ``forward`` (key: user id). A later event of an aliased anonymous id is sent on as this user's
   event, so events on either id reach the same profile. Its message id keeps it counted once.
4. ``unlink`` (key: anonymous id). After the user is erased, the alias entry and key go too.

Every step is idempotent under re-delivery, and each is sent before the batch that caused it is
acknowledged, so a crash repeats a step but never drops one.

Most links are logins: an anonymous id with no events of its own, so no profile to move. When
its partition is this worker's too, claim and merge run on the spot, in the identify's own batch
(:func:`run_links`): the alias entry in, the id noted in the user's profile, no message through
the topic and no second write of the user (a newsletter's logins had doubled the messages the
worker handled).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from models import profile_codec
from models.events import ERASURE_REQUESTED, Event
from models.features import new_profile
from models.identity import MERGED_FROM_KEY, already_merged, merge_profiles, record_merged
from streams.engine import move_segment
from streams.ingest import Record

if TYPE_CHECKING:
    from streams.app import Persona

log = logging.getLogger(__name__)

ALIAS_KEY_PREFIX = b"\x00alias/"
TableWrite = Callable[[int, bytes, bytes | None], None]
"""Set (or, with None, delete) a profiles-table key on a partition."""
CLAIM, MERGE, FORWARD, UNLINK = "claim", "merge", "forward", "unlink"


def identity_topic_name(app_id: str) -> str:
    return f"{app_id}-identity-links"


def alias_key(anonymous_id: str) -> bytes:
    """Table key of an anonymous id's alias entry (user ids never start with NUL)."""
    return ALIAS_KEY_PREFIX + anonymous_id.encode()


@dataclass
class IdentityWork:
    """Identity messages of one batch, by step, and the messages to send for later steps."""

    forwarded: list[tuple[Record, Event]] = field(default_factory=list)
    claims: list[tuple[str, str, int]] = field(default_factory=list)
    """(anonymous id, user id, partition)."""
    merges: list[tuple[str, str, dict[str, Any] | None, int]] = field(default_factory=list)
    links: list[tuple[str, str, int]] = field(default_factory=list)
    """(anonymous id, user id, the user's partition) of this batch's identify/alias events."""
    unlinks: list[tuple[str, str, int]] = field(default_factory=list)
    outgoing: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(key, message) for the identity-links topic."""
    relinked: dict[str, str | None] = field(default_factory=dict)
    """Redis: anonymous id → the user its alias key points to (None: drop the alias key)."""

    def add(self, record: Record) -> None:
        """Sort one identity-links message into its step (the topic is internal: trusted)."""
        message = orjson.loads(record.value)
        op = message["op"]
        if op == FORWARD:
            self.forwarded.append((record, message["event"]))
        elif op == CLAIM:
            self.claims.append((message["anonymous_id"], message["user_id"], record.partition))
        elif op == MERGE:
            self.merges.append(
                (message["anonymous_id"], message["user_id"], message["profile"], record.partition)
            )
        elif op == UNLINK:
            self.unlinks.append((message["anonymous_id"], message["user_id"], record.partition))
        else:
            log.error("unknown identity-links message %r at offset %d", op, record.offset)

    def send(self, key: str, op: str, **fields: Any) -> None:
        self.outgoing.append((key, {"op": op, **fields}))

    def point_alias(
        self, write: TableWrite, partition: int, anonymous_id: str, user_id: str | None
    ) -> None:
        """Point the anonymous id's alias entry to ``user_id`` (None: drop it); Redis follows."""
        write(partition, alias_key(anonymous_id), None if user_id is None else user_id.encode())
        self.relinked[anonymous_id] = user_id

    def forward(self, user_id: str, event: Event) -> None:
        self.send(user_id, FORWARD, event={**event, "user_id": user_id})

    def link(self, event: Event, partition: int) -> None:
        """An identify/alias event of ``partition``: its link is stitched by :func:`run_links`."""
        anonymous_id = event.get("linked_id")
        if anonymous_id:
            self.links.append((anonymous_id, event["user_id"], partition))

    def unlink_all(self, erased: dict[str, Any]) -> None:
        """The user ``erased`` is gone: so are the aliases of the anonymous ids merged into it."""
        for anonymous_id in erased.get(MERGED_FROM_KEY, ()):
            self.send(anonymous_id, UNLINK, anonymous_id=anonymous_id, user_id=erased["user_id"])


def erasure_request(user_id: str, at: float) -> Event:
    """The erasure of an id merged into ``user_id``, as that user's own erasure request."""
    return Event(
        message_id=f"erasure-of-merged-id/{at!r}",
        user_id=user_id,
        type="track",
        event=ERASURE_REQUESTED,
        ts=at,
        properties={},
        traits={},
        consent=None,
    )


def internal_entry(persona: Persona, key: bytes) -> bytes | None:
    """The value of an internal table entry (alias, erasure marker), if there is one: looked
    up only where the key filter says it may be (most of these lookups miss)."""
    return persona.profiles.get(key) if key in persona.internal_keys else None


def alias_of(persona: Persona, user_id: str) -> str | None:
    """The known user an anonymous id was merged into, if it was."""
    target = internal_entry(persona, alias_key(user_id))
    return target.decode() if target else None


def run_links(
    work: IdentityWork,
    changed: dict[str, dict[str, Any]],
    partition_of: dict[str, int],
    *,
    local_partition: Callable[[str], int | None],
    has_profile: Callable[[str], bool],
    alias_of: Callable[[str], str | None],
    is_erased: Callable[[str], bool],
    load: Callable[[str], dict[str, Any] | None],
    write: TableWrite,
) -> tuple[int, int]:
    """Stitch this batch's links: claims and merges done here, and claims sent on.

    A link whose anonymous id has no profile (no events of its own) and whose partition is this
    worker's (``local_partition`` gives it, else None) is stitched on the spot: the id is noted
    in the user's profile (as a merge would) and the alias entry written (as a claim would).
    Each half checks its own result (the id noted, the alias pointing to the user), so a batch
    cut between the two table writes and run again does the missing half. Any other link sends
    a claim to the anonymous id's partition, unless the user has merged the id already.
    Returns (claims, merges) done here.
    """
    claimed = noted = 0
    for anonymous_id, user_id, partition in work.links:
        anonymous_partition = local_partition(anonymous_id)
        if anonymous_partition is None or anonymous_id in changed or has_profile(anonymous_id):
            known = changed.get(user_id)
            if known is None or not already_merged(known, anonymous_id):
                work.send(anonymous_id, CLAIM, anonymous_id=anonymous_id, user_id=user_id)
            continue
        if is_erased(user_id):
            continue  # the claim would be unlinked again (see run_merges)
        noted += note_merged(anonymous_id, user_id, partition, changed, partition_of, load, write)
        if alias_of(anonymous_id) != user_id:
            work.point_alias(write, anonymous_partition, anonymous_id, user_id)
            claimed += 1
    return claimed, noted


def note_merged(
    anonymous_id: str,
    user_id: str,
    partition: int,
    changed: dict[str, dict[str, Any]],
    partition_of: dict[str, int],
    load: Callable[[str], dict[str, Any] | None],
    write: TableWrite,
) -> bool:
    """Note in the user's profile that ``anonymous_id``, which brings no profile, was merged;
    False if it was already. A profile this batch changes takes the note along; a stored one is
    written back as it is, neither scored nor sent to Redis again (nothing they show changed).
    """
    changing = changed.get(user_id)
    if changing is not None:
        if already_merged(changing, anonymous_id):
            return False
        record_merged(changing, anonymous_id)
        return True
    stored = load(user_id)
    if stored is not None:
        if already_merged(stored, anonymous_id):
            return False
        record_merged(stored, anonymous_id)
        write(partition, user_id.encode(), profile_codec.encode(stored))
        return True
    profile = new_profile(user_id)  # no events of its own yet
    record_merged(profile, anonymous_id)
    changed[user_id] = profile
    partition_of[user_id] = partition
    return True


def run_claims(
    persona: Persona,
    work: IdentityWork,
    changed: dict[str, dict[str, Any]],
    partition_of: dict[str, int],
    write: TableWrite,
    load: Callable[[str], dict[str, Any] | None],
) -> None:
    """Step 1 on the anonymous id's partition: alias entry in, profile out and on to the user."""
    claimed = 0
    for anonymous_id, user_id, partition in work.claims:
        if alias_of(persona, anonymous_id) == user_id:
            continue  # re-delivered claim: done already
        profile = changed.pop(anonymous_id, None) or load(anonymous_id)
        partition_of.pop(anonymous_id, None)
        if profile is not None:
            write(partition, anonymous_id.encode(), None)
            segment = (profile.get("triggers") or {}).get("segment")
            move_segment(persona.segment_counts, partition, segment, None)
        work.point_alias(write, partition, anonymous_id, user_id)
        work.send(user_id, MERGE, anonymous_id=anonymous_id, user_id=user_id, profile=profile)
        claimed += 1
    if claimed:  # one labels() lookup a batch, not one a claim
        persona.metrics.identity_links.labels(step=CLAIM).inc(claimed)


def run_merges(
    persona: Persona,
    work: IdentityWork,
    changed: dict[str, dict[str, Any]],
    partition_of: dict[str, int],
    load: Callable[[str], dict[str, Any] | None],
    is_erased: Callable[[str], bool],
    write: TableWrite,
) -> None:
    """Step 2 on the user's partition: fold the anonymous profile into the user's.

    An anonymous id without events of its own (a login's identify, most often) brings nothing
    to fold: the user's profile only notes it (:func:`note_merged`).
    """
    settings = persona.settings
    folded = 0
    for anonymous_id, user_id, anonymous, partition in work.merges:
        if is_erased(user_id):
            work.send(anonymous_id, UNLINK, anonymous_id=anonymous_id, user_id=user_id)
            continue
        if anonymous is None:
            folded += note_merged(
                anonymous_id, user_id, partition, changed, partition_of, load, write
            )
            continue
        known = changed.get(user_id) or load(user_id)
        if known is not None and already_merged(known, anonymous_id):
            continue
        folded += 1
        merged = merge_profiles(
            known,
            anonymous,
            user_id=user_id,
            affinity_half_life_s=settings.affinity_half_life_days * 86400.0,
            dedupe_window=settings.dedupe_window,
        )
        persona.engine.merge_state(merged, anonymous)
        changed[user_id] = merged
        partition_of[user_id] = partition
    if folded:
        persona.metrics.identity_links.labels(step=MERGE).inc(folded)


def run_unlinks(persona: Persona, work: IdentityWork, write: TableWrite) -> None:
    """Step 4 on the anonymous id's partition: the alias of an erased user goes."""
    for anonymous_id, user_id, partition in work.unlinks:
        if alias_of(persona, anonymous_id) == user_id:
            work.point_alias(write, partition, anonymous_id, None)
            persona.metrics.identity_links.labels(step=UNLINK).inc()
