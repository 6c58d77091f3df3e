"""The CLI reports every usage, file and setting error in one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATASETS, REPO


def persona(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("frobnicate",), None, "invalid choice"),
        (("demo", "--duration", "soon"), None, "'soon' is not a number"),
        (("demo", "--users", "-3"), None, "'-3' must be positive"),
        (("demo", "--invalid-rate", "2"), None, "between 0 and 1"),
        (("replay", "/nonexistent.csv", "--format", "rees46"), None, "/nonexistent.csv"),
        (("replay", "README.md", "--format", "rees46"), None, "README.md"),
        (("replay", "README.md", "--format", "parquet"), None, "invalid choice"),
        (("backtest", "x.csv", "--format", "rees46"), None, "--out"),
        (("evaluate", "lead", "--data", "/nonexistent"), None, "no such file"),
        (("evaluate", "offers", "--data", "README.md"), None, "not a offers evaluation file"),
        (("settings",), {"PERSONA_PARTITIONS": "many"}, "PERSONA_PARTITIONS='many'"),
        (("worker",), {"PERSONA_STORE": "s3://x"}, "PERSONA_STORE"),
        (("simulate", "--users", "3"), {"PERSONA_HEARTBEAT_S": "12"}, "PERSONA_HEARTBEAT_S"),
        (("simulate", "--users", "3"), {"PERSONA_BROKER_URL": "kafka://127.0.0.1:1"}, "Kafka"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    args: tuple[str, ...], env: dict[str, str] | None, expected: str
) -> None:
    result = persona(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr}"
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_backtest_with_a_bad_config_file_says_why_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[segments\n")
    log = DATASETS / "clickstream_samples" / "otto_train_first20sessions.jsonl"
    result = persona(
        "backtest", str(log), "--format", "otto", "--out", str(tmp_path), "--config", str(config)
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "invalid TOML" in result.stderr


def test_simulate_to_a_file_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        result = persona("simulate", "--users", "20", "--seed", "4", "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_settings_markdown_lists_every_variable() -> None:
    result = persona("settings", "--markdown")
    assert result.returncode == 0
    assert "| `PERSONA_BROKER_URL` |" in result.stdout


def test_bench_profile_without_py_spy_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from streams import cli

    # A machine without py-spy: not on the PATH, not beside the interpreter.
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", "/nonexistent/bin/python")

    assert cli.main(["bench", "--events", "10", "--profile", "out.raw"]) == 2
    message = capsys.readouterr().err.strip()
    assert message == "persona bench: error: --profile needs py-spy: pip install '.[profile]'"
