"""The ``persona`` command: worker, demo, simulate, replay, settings.

Every usage or input error is reported in one line on stderr with exit status 2, never a
traceback: a marketer running a replay on a wrong file must see what is wrong at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from connectors.embedded import EmbeddedServerError
from streams.settings import Settings, SettingsError, settings_markdown


class UserError(Exception):
    """A mistake in the command line, a file or a setting: reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _at_least_two(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 2 (the first part warms up)")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from connectors.replay import FORMATS

    parser = _Parser(prog="persona", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    commands.add_parser("worker", help="run a worker against the broker and Redis in the settings")

    demo = commands.add_parser(
        "demo", help="embedded broker + Redis + worker + simulated shoppers, with a live view"
    )
    demo.add_argument("--duration", type=_non_negative_float, default=30.0, help="seconds")
    demo.add_argument("--users", type=_positive_int, default=2000)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--rate", type=_non_negative_float, default=3000.0, help="events/s; 0: max")
    demo.add_argument("--partitions", type=_positive_int, default=4)
    demo.add_argument("--web-port", type=_positive_int, default=None, help="default: a free port")
    demo.add_argument("--invalid-rate", type=_fraction, default=0.002)
    demo.add_argument("--json", action="store_true", help="end with one JSON line of results")

    simulate = commands.add_parser("simulate", help="simulated shoppers to the input topics")
    simulate.add_argument("--users", type=_positive_int, default=1000)
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--days", type=_non_negative_float, default=30.0)
    simulate.add_argument("--rate", type=_non_negative_float, default=0.0, help="events/s; 0: max")
    simulate.add_argument("--invalid-rate", type=_fraction, default=0.0)
    simulate.add_argument("--duplicate-rate", type=_fraction, default=0.0)
    simulate.add_argument("--ground-truth", type=Path, help="write each user's true type here")
    simulate.add_argument(
        "--out", type=Path, help="write Segment JSONL here instead of producing to Kafka"
    )

    replay = commands.add_parser("replay", help="a real event log to the input topics")
    replay.add_argument("file", type=Path)
    replay.add_argument("--format", choices=FORMATS, required=True)

    backtest = commands.add_parser(
        "backtest", help="run the whole engine over a log in event time and dump its outputs"
    )
    backtest.add_argument("file", type=Path)
    backtest.add_argument("--format", choices=FORMATS, required=True)
    backtest.add_argument("--out", type=Path, required=True, help="output directory")
    backtest.add_argument("--config", type=Path, help="TOML config (segments, offers, triggers)")
    backtest.add_argument("--partitions", type=_positive_int, default=4)
    backtest.add_argument("--json", action="store_true", help="end with one JSON line of counts")

    evaluate = commands.add_parser(
        "evaluate", help="model quality on real data, beside a strong baseline"
    )
    evaluate.add_argument("model", choices=("lead", "offers"))
    evaluate.add_argument("--data", type=Path, required=True, help="CSV file (see README)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", action="store_true", help="end with one JSON line")

    bench = commands.add_parser(
        "bench", help="throughput against a plain-aiokafka ceiling, latency, memory"
    )
    bench.add_argument("--events", type=_positive_int, default=60_000)
    bench.add_argument("--users", type=_positive_int, default=10_000)
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--workers", type=int, choices=(1, 2), default=1)
    bench.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="ceiling and engine runs, back to back in pairs (the ratio is the pairs' median)",
    )
    bench.add_argument("--partitions", type=_positive_int, default=4)
    bench.add_argument(
        "--memory-events",
        type=_positive_int,
        help="events of the memory run (a fresh worker, many users, in two halves; "
        "default 300,000)",
    )
    bench.add_argument(
        "--memory-users", type=_positive_int, help="users of the memory run (default 300,000)"
    )
    bench.add_argument(
        "--profile",
        type=Path,
        help="py-spy raw profile of the engine worker (its paced run: <name>-latency<suffix>)",
    )
    bench.add_argument("--json", action="store_true", help="end with one JSON line")

    memory = commands.add_parser(
        "bench-memory",
        help="resident memory of a worker as profiles grow, measured part by part (slow)",
    )
    memory.add_argument("--events", type=_positive_int, default=4_000_000)
    memory.add_argument("--users", type=_positive_int, default=4_000_000)
    memory.add_argument(
        "--parts", type=_at_least_two, default=4, help="parts the events are produced in"
    )
    memory.add_argument("--seed", type=int, default=7)
    memory.add_argument("--partitions", type=_positive_int, default=4)
    memory.add_argument("--json", action="store_true", help="end with one JSON line")

    dead = commands.add_parser("dead-letter", help="work with the dead-letter topic")
    dead_commands = dead.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dead_replay = dead_commands.add_parser(
        "replay", help="send dead-lettered messages back to their source topic (after a fix)"
    )
    dead_replay.add_argument(
        "--reason",
        action="append",
        dest="reasons",
        help="only this reason (repeatable; default: every reason)",
    )
    dead_replay.add_argument("--dry-run", action="store_true", help="count, send nothing")

    show = commands.add_parser("settings", help="print the settings (or their table)")
    show.add_argument("--markdown", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "worker":
        # Client libraries log connection failures themselves; the command says it in one line.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except (UserError, SettingsError, EmbeddedServerError, OSError) as exc:
        print(f"persona {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"persona {args.command}: error: Kafka: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"persona {args.command}: error: Redis: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from connectors.kafka import configure_security
    from connectors.replay import ReplayError

    if args.command in ("simulate", "replay", "dead-letter"):  # others: the embedded broker
        configure_security(Settings.from_env().kafka_security)
    try:
        if args.command == "settings":
            return _settings(args)
        if args.command == "worker":
            from streams.worker import run_worker

            run_worker(Settings.from_env())
            return 0
        if args.command == "demo":
            from streams.demo import run_demo

            return run_demo(args)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "replay":
            return _replay(args)
        if args.command == "backtest":
            return _backtest(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "dead-letter":
            return _dead_letter_replay(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "bench-memory":
            return _bench_memory(args)
    except ReplayError as exc:
        raise UserError(str(exc)) from None
    raise UserError(f"unknown command {args.command}")


def _settings(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_markdown())
        return 0
    for name, value in Settings.from_env().as_env().items():
        print(f"{name}={value}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import orjson

    from connectors.simulator import ShopperSimulator

    simulator = ShopperSimulator(
        args.users,
        args.seed,
        days=args.days,
        invalid_rate=args.invalid_rate,
        duplicate_rate=args.duplicate_rate,
    )
    if args.ground_truth:
        simulator.write_ground_truth(args.ground_truth)
    if args.out:
        with args.out.open("wb") as out:
            count = 0
            for _stream, _key, value in simulator.raw_messages():
                out.write(value.replace(b"\n", b" ") + b"\n")
                count += 1
        print(orjson.dumps({"events": count, "file": str(args.out)}).decode())
        return 0
    settings = Settings.from_env()
    topics = settings.input_topics
    messages = ((topics[stream], key, value) for stream, key, value in simulator.raw_messages())
    sent = _produce(settings, messages, total=None, rate=args.rate or None)
    print(orjson.dumps({"events": sent}).decode())
    return 0


def _replay(args: argparse.Namespace) -> int:
    import orjson

    from connectors.replay import read_log, stream_of

    log = read_log(args.file, args.format)
    settings = Settings.from_env()
    topics = settings.input_topics
    messages = ((topics[stream_of(m)], m.key or None, m.value) for m in log.messages)
    sent = _produce(settings, messages, total=len(log.messages))
    print(
        orjson.dumps(
            {"rows": log.rows, "events": sent, "rejected": dict(log.rejected)},
            option=orjson.OPT_SORT_KEYS,
        ).decode()
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    import orjson

    from streams.bench import MEMORY_EVENTS, PY_SPY_MISSING, format_report, py_spy, run_bench

    if args.profile is not None and py_spy() is None:
        raise UserError(PY_SPY_MISSING)
    result = run_bench(
        args.events,
        users=args.users,
        seed=args.seed,
        workers=args.workers,
        rounds=args.rounds,
        partitions=args.partitions,
        profile_path=args.profile,
        memory_events=args.memory_events or MEMORY_EVENTS,
        memory_users=args.memory_users or MEMORY_EVENTS,
    )
    print(format_report(result))
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode())
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    import orjson

    from streams.bench import format_memory_report, run_memory

    result = run_memory(
        args.events, users=args.users, parts=args.parts, seed=args.seed, partitions=args.partitions
    )
    print(format_memory_report(result))
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_SORT_KEYS).decode())
    return 0


def _dead_letter_replay(args: argparse.Namespace) -> int:
    import orjson

    from connectors.segment import REASONS
    from streams.deadletter import replay_dead_letters

    unknown = sorted(set(args.reasons or ()) - set(REASONS))
    if unknown:
        raise UserError(f"unknown reason {unknown[0]!r} (one of {', '.join(REASONS)})")
    settings = Settings.from_env()
    result = asyncio.run(
        replay_dead_letters(
            settings.broker_url,
            settings.topics["deadletter"],
            reasons=set(args.reasons) if args.reasons else None,
            dry_run=args.dry_run,
        )
    )
    print(orjson.dumps(result, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import time

    import orjson

    if not args.data.is_file():
        raise UserError(f"no such file: {args.data}")
    started = time.perf_counter()
    try:
        if args.model == "lead":
            from models.lead_eval import evaluate_bank_marketing

            full = evaluate_bank_marketing(args.data, seed=args.seed)
            rows = [
                ("online lead model (progressive, file order)", full["online_auc"]),
                ("gradient boosting, 5-fold stratified", full["baseline_auc_kfold"]),
                ("gradient boosting, chronological 80/20", full["baseline_auc_chrono"]),
            ]
            title = f"ROC AUC on {full['rows']} rows, without the leaking 'duration' column"
            keys = ("rows", "online_auc", "baseline_auc_kfold", "baseline_auc_chrono")
        else:
            from models.offer_eval import evaluate_open_bandit

            full = evaluate_open_bandit(args.data, seed=args.seed)
            lo, hi = full["ci95"]
            rows = [
                ("logged policy CTR", full["logged_ctr"]),
                ("engine policy, IPS", full["policy_value_ips"]),
                (f"engine policy, SNIPS (95% CI {lo:.4f} to {hi:.4f})", full["policy_value_snips"]),
                ("engine policy, doubly robust", full["policy_value_dr"]),
                ("ratio SNIPS / logged CTR", full["ratio"]),
            ]
            title = f"off-policy value on {full['rounds']} logged rounds ({full['clicks']} clicks)"
            keys = ("rounds", "logged_ctr", "policy_value_snips", "ci95", "ratio")
    except ImportError as exc:
        raise UserError(f"{exc.name} is needed: pip install -e '.[eval]'") from None
    except (ValueError, KeyError) as exc:
        raise UserError(f"{args.data}: not a {args.model} evaluation file ({exc})") from None
    print(title)
    for label, value in rows:
        print(f"  {label:<55} {value:.4f}")
    print(f"  ({time.perf_counter() - started:.1f} s)")
    if args.json:
        print(orjson.dumps({k: full[k] for k in keys}, option=orjson.OPT_SERIALIZE_NUMPY).decode())
    return 0


def _backtest(args: argparse.Namespace) -> int:
    import orjson

    from models.config import ConfigError, load_config
    from streams.backtest import run_backtest

    if args.config is not None:
        try:
            load_config(args.config)  # fail fast, in one line, before starting anything
        except ConfigError as exc:
            raise UserError(str(exc)) from None
    counts = run_backtest(
        args.file, args.format, args.out, config_path=args.config, partitions=args.partitions
    )
    for name, count in counts.items():
        if not args.json:
            print(f"{name}: {count}")
    if args.json:
        print(orjson.dumps(counts, option=orjson.OPT_SORT_KEYS).decode())
    return 0


def _produce(
    settings: Settings,
    messages: Iterator[tuple[str, bytes | None, bytes]],
    *,
    total: int | None,
    rate: float | None = None,
) -> int:
    """Produce to Kafka with a progress bar on stderr."""
    from connectors.kafka import produce_all
    from streams.worker import ensure_topics

    def progress(sent: int) -> None:
        if total:
            done = int(30 * sent / total)
            bar = "#" * done + "." * (30 - done)
            print(f"\r[{bar}] {sent}/{total}", end="", file=sys.stderr, flush=True)
        else:
            print(f"\rsent {sent}", end="", file=sys.stderr, flush=True)

    async def go() -> int:
        await ensure_topics(settings)
        return await produce_all(
            settings.broker_url, messages, on_progress=progress, rate_per_s=rate
        )

    sent = asyncio.run(go())
    print(file=sys.stderr)
    return sent


if __name__ == "__main__":
    sys.exit(main())
