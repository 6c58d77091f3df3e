"""Settings: every knob of a Persona worker, read from ``PERSONA_*`` environment variables.

One table, :data:`SETTINGS`, defines each setting once: its environment variable, type, default
and meaning. The README's settings table is generated from it (``persona settings --markdown``)
and a test keeps the two equal, so the documentation cannot drift from the code.

>>> settings = Settings.from_env({"PERSONA_PARTITIONS": "4"})
>>> settings.partitions, settings.topics["clickstream"]
(4, 'clickstream')
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from connectors.kafka import KafkaSecurity
from streams.ordering import DEFAULT_MAX_HELD


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a number >= 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError("must be a number in [0, 1)")
    return value


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _choice_upper(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().upper()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _store(text: str) -> str:
    if not text.startswith(("memory://", "rocksdb://")):
        raise ValueError("must be memory:// or rocksdb://")
    return text


SETTINGS: dict[str, Setting] = {
    "broker_url": Setting(
        "PERSONA_BROKER_URL", "kafka://localhost:9092", "Kafka bootstrap servers, Faust form"
    ),
    "kafka_security_protocol": Setting(
        "PERSONA_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        _choice_upper("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    ),
    "kafka_sasl_mechanism": Setting(
        "PERSONA_KAFKA_SASL_MECHANISM",
        "PLAIN",
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
        _choice_upper("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    ),
    "kafka_sasl_username": Setting("PERSONA_KAFKA_SASL_USERNAME", "", "SASL user"),
    "kafka_sasl_password": Setting("PERSONA_KAFKA_SASL_PASSWORD", "", "SASL password"),
    "kafka_ssl_cafile": Setting(
        "PERSONA_KAFKA_SSL_CAFILE", "", "CA bundle to verify the brokers (default: system CAs)"
    ),
    "redis_url": Setting(
        "PERSONA_REDIS_URL",
        "redis://localhost:6379/0",
        "Redis URL; redis://:<password>@host:port/db for AUTH, rediss:// for TLS",
    ),
    "app_id": Setting(
        "PERSONA_APP_ID", "persona", "Faust app id: consumer group and internal topic prefix"
    ),
    "partitions": Setting(
        "PERSONA_PARTITIONS", 8, "partitions of every topic Persona creates", _positive_int
    ),
    "replication_factor": Setting(
        "PERSONA_REPLICATION_FACTOR", 1, "replication factor of created topics", _positive_int
    ),
    "topic_prefix": Setting("PERSONA_TOPIC_PREFIX", "", "prefix added to every topic name below"),
    "topic_clickstream": Setting("PERSONA_TOPIC_CLICKSTREAM", "clickstream", "input topic"),
    "topic_purchases": Setting("PERSONA_TOPIC_PURCHASES", "purchases", "input topic"),
    "topic_email": Setting("PERSONA_TOPIC_EMAIL", "email-events", "input topic"),
    "topic_identity": Setting("PERSONA_TOPIC_IDENTITY", "identity", "input topic"),
    "topic_deadletter": Setting(
        "PERSONA_TOPIC_DEADLETTER", "deadletter", "invalid input, with reason and source"
    ),
    "topic_abandoned_cart": Setting(
        "PERSONA_TOPIC_ABANDONED_CART", "abandoned-cart", "output topic"
    ),
    "topic_offers": Setting("PERSONA_TOPIC_OFFERS", "offers", "output topic"),
    "topic_segment_changes": Setting(
        "PERSONA_TOPIC_SEGMENT_CHANGES", "segment-changes", "output topic"
    ),
    "topic_hot_leads": Setting("PERSONA_TOPIC_HOT_LEADS", "hot-leads", "output topic"),
    "topic_training_examples": Setting(
        "PERSONA_TOPIC_TRAINING_EXAMPLES", "training-examples", "internal topic"
    ),
    "store": Setting(
        "PERSONA_STORE",
        "memory://",
        "table store: memory:// or rocksdb:// (needs the rocksdb extra)",
        _store,
    ),
    "rocksdb_memory_mb": Setting(
        "PERSONA_ROCKSDB_MEMORY_MB",
        64,
        "with rocksdb://: block cache per table partition, MiB (the write buffers take half as "
        "much again, the compressed cache a quarter); RocksDB's defaults allow 2.7 GiB",
        _positive_int,
    ),
    "data_dir": Setting(
        "PERSONA_DATA_DIR", ".persona", "worker data directory (table stores, embedded logs)"
    ),
    "web_host": Setting("PERSONA_WEB_HOST", "127.0.0.1", "bind address of /metrics"),
    "web_port": Setting(
        "PERSONA_WEB_PORT", 6066, "port of /metrics and the read API", _positive_int
    ),
    "session_timeout_s": Setting(
        "PERSONA_SESSION_TIMEOUT_S",
        10.0,
        "consumer group session timeout; about 2 on the embedded broker",
        _positive_float,
    ),
    "heartbeat_s": Setting(
        "PERSONA_HEARTBEAT_S",
        3.0,
        "consumer heartbeat interval, below the session timeout",
        _positive_float,
    ),
    "batch_size": Setting(
        "PERSONA_BATCH_SIZE", 1000, "events processed together on the hot path", _positive_int
    ),
    "batch_within_s": Setting(
        "PERSONA_BATCH_WITHIN_S",
        0.05,
        "longest an input event waits for its batch to fill, from the batch's first event "
        "(the trainer's batches: after the previous batch), seconds",
        _positive_float,
    ),
    "fetch_max_wait_ms": Setting(
        "PERSONA_FETCH_MAX_WAIT_MS",
        20,
        "longest a consumer fetch waits at the broker for data (Faust fixes 1500; the embedded "
        "broker holds a fetch most of that even when data arrives, so it bounds latency there)",
        _positive_int,
    ),
    "timer_chunk": Setting(
        "PERSONA_TIMER_CHUNK",
        50,
        "most profiles whose timer came due one run of timers handles between two batches "
        "(shared by the partitions); smaller runs keep the events waiting behind them shorter",
        _positive_int,
    ),
    "gc_gen0_threshold": Setting(
        "PERSONA_GC_GEN0_THRESHOLD",
        20000,
        "allocations between two young-generation garbage collections (Python's default is 700; "
        "the worker also freezes what exists at start-up out of every collection)",
        _positive_int,
    ),
    "malloc_trim_s": Setting(
        "PERSONA_MALLOC_TRIM_S",
        10.0,
        "seconds between two returns of the C allocator's free memory to the system "
        "(glibc malloc_trim, a few ms each; 0: never)",
        _non_negative_float,
    ),
    "batch_drain": Setting(
        "PERSONA_BATCH_DRAIN",
        True,
        "hand each consumer fetch to the streams under one wait instead of one per message "
        "(streams/drain.py); false restores Faust's own loop",
        _boolean,
    ),
    "max_event_bytes": Setting(
        "PERSONA_MAX_EVENT_BYTES", 65536, "larger messages are dead-lettered", _positive_int
    ),
    "max_future_s": Setting(
        "PERSONA_MAX_FUTURE_S",
        86400.0,
        "events timestamped further ahead of the wall clock are dead-lettered",
        _positive_float,
    ),
    "dedupe_window": Setting(
        "PERSONA_DEDUPE_WINDOW",
        128,
        "message ids remembered per user for de-duplication",
        _positive_int,
    ),
    "affinity_half_life_days": Setting(
        "PERSONA_AFFINITY_HALF_LIFE_DAYS",
        14.0,
        "half-life of category affinity, days of event time",
        _positive_float,
    ),
    "consent_default": Setting(
        "PERSONA_CONSENT_DEFAULT",
        "deny",
        "consent of a user who never stated it: deny or allow",
        _choice("deny", "allow"),
    ),
    "config_path": Setting(
        "PERSONA_CONFIG",
        "",
        "TOML file with [segments], [offers], [triggers] sections (default: built-in)",
    ),
    "live_clock": Setting(
        "PERSONA_LIVE_CLOCK",
        True,
        "advance idle partitions' watermark with the wall clock (off for replays)",
        _boolean,
    ),
    "allowed_lateness_s": Setting(
        "PERSONA_ALLOWED_LATENESS_S",
        60.0,
        "watermark = largest event time seen minus this",
        _non_negative_float,
    ),
    "reorder_max_held": Setting(
        "PERSONA_REORDER_MAX_HELD",
        DEFAULT_MAX_HELD,
        "most valid events a partition holds back to apply them in event-time order across the "
        "input topics; beyond it the oldest go on out of order "
        "(persona_ordering_forced_events). A held event takes about 4 KB of memory",
        _positive_int,
    ),
    "idle_after_s": Setting(
        "PERSONA_IDLE_AFTER_S",
        5.0,
        "wall-clock silence after which a partition's watermark follows the wall clock",
        _positive_float,
    ),
    "tick_interval_s": Setting(
        "PERSONA_TICK_INTERVAL_S", 1.0, "how often idle partitions are ticked", _positive_float
    ),
    "pseudonym_secret": Setting(
        "PERSONA_PSEUDONYM_SECRET",
        "change-me",
        "HMAC-SHA256 key of the ids sent to ad platforms; set a long random value",
    ),
    "snapshot_secret": Setting(
        "PERSONA_SNAPSHOT_SECRET",
        "change-me-too",
        "HMAC key that signs model snapshots; a snapshot that fails it is refused",
    ),
    "lead_horizon_days": Setting(
        "PERSONA_LEAD_HORIZON_DAYS",
        7.0,
        "lead score = P(purchase within this many days of event time)",
        _positive_float,
    ),
    "attribution_window_hours": Setting(
        "PERSONA_ATTRIBUTION_WINDOW_HOURS",
        24.0,
        "a purchase this soon after an offer rewards it",
        _positive_float,
    ),
    "holdout_share": Setting(
        "PERSONA_HOLDOUT_SHARE",
        0.05,
        "share of users (by hashed id) in the control group",
        _fraction,
    ),
    "snapshot_every_examples": Setting(
        "PERSONA_SNAPSHOT_EVERY_EXAMPLES",
        1000,
        "a trainer publishes its model after this many new examples ...",
        _positive_int,
    ),
    "snapshot_every_s": Setting(
        "PERSONA_SNAPSHOT_EVERY_S",
        30.0,
        "... or after this many seconds with new examples",
        _positive_float,
    ),
    "checkpoint_every_s": Setting(
        "PERSONA_CHECKPOINT_EVERY_S",
        1.0,
        "a trainer checkpoints what it learned at most this often (and at each publish); the "
        "examples are acknowledged after the checkpoint that holds them",
        _positive_float,
    ),
    "log_level": Setting(
        "PERSONA_LOG_LEVEL", "info", "log level", _choice("debug", "info", "warning", "error")
    ),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved settings of one worker; build with :meth:`from_env`."""

    broker_url: str
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str
    kafka_sasl_password: str
    kafka_ssl_cafile: str
    redis_url: str
    app_id: str
    partitions: int
    replication_factor: int
    topic_prefix: str
    topic_clickstream: str
    topic_purchases: str
    topic_email: str
    topic_identity: str
    topic_deadletter: str
    topic_abandoned_cart: str
    topic_offers: str
    topic_segment_changes: str
    topic_hot_leads: str
    topic_training_examples: str
    store: str
    data_dir: str
    web_host: str
    web_port: int
    session_timeout_s: float
    heartbeat_s: float
    batch_size: int
    batch_within_s: float
    rocksdb_memory_mb: int
    fetch_max_wait_ms: int
    batch_drain: bool
    gc_gen0_threshold: int
    malloc_trim_s: float
    timer_chunk: int
    max_event_bytes: int
    max_future_s: float
    dedupe_window: int
    affinity_half_life_days: float
    consent_default: str
    config_path: str
    live_clock: bool
    allowed_lateness_s: float
    reorder_max_held: int
    idle_after_s: float
    tick_interval_s: float
    pseudonym_secret: str
    snapshot_secret: str
    lead_horizon_days: float
    attribution_window_hours: float
    holdout_share: float
    snapshot_every_examples: int
    snapshot_every_s: float
    checkpoint_every_s: float
    log_level: str
    topics: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``env`` (default ``os.environ``); ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, setting in SETTINGS.items():
            if name in overrides:
                values[name] = overrides[name]
                continue
            raw = env.get(setting.env)
            if raw is None or raw == "":
                values[name] = setting.default
                continue
            try:
                values[name] = setting.parse(raw)
            except ValueError as exc:
                reason = str(exc) if "must" in str(exc) else f"not a valid {setting.parse.__name__}"
                raise SettingsError(f"{setting.env}={raw!r}: {reason}") from None
        if values["heartbeat_s"] >= values["session_timeout_s"]:
            raise SettingsError(
                "PERSONA_HEARTBEAT_S must be below PERSONA_SESSION_TIMEOUT_S "
                f"({values['heartbeat_s']} >= {values['session_timeout_s']})"
            )
        prefix = values["topic_prefix"]
        values["topics"] = {
            name.removeprefix("topic_"): prefix + values[name]
            for name in SETTINGS
            if name.startswith("topic_") and name != "topic_prefix"
        }
        return cls(**values)

    @property
    def kafka_security(self) -> KafkaSecurity:
        return KafkaSecurity(
            protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            username=self.kafka_sasl_username or None,
            password=self.kafka_sasl_password or None,
            ssl_cafile=self.kafka_ssl_cafile or None,
        )

    def as_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in another process."""
        return {
            SETTINGS[f.name].env: str(getattr(self, f.name))
            for f in fields(self)
            if f.name in SETTINGS
        }

    @property
    def input_topics(self) -> dict[str, str]:
        """Input stream kind (as :func:`models.events.topic_kind` names it) → topic name."""
        kinds = ("clickstream", "purchases", "email", "identity")
        return {kind: self.topics[kind] for kind in kinds}

    @property
    def output_topics(self) -> dict[str, str]:
        names = ("deadletter", "abandoned_cart", "offers", "segment_changes", "hot_leads")
        return {kind: self.topics[kind] for kind in names}


def settings_markdown() -> str:
    """The README's settings table."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS.values():
        default = f"`{setting.default}`" if setting.default != "" else "(empty)"
        lines.append(f"| `{setting.env}` | {default} | {setting.help} |")
    return "\n".join(lines)
