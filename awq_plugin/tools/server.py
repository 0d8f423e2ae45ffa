"""Start and stop a real ``vllm serve`` process on loopback (for the demo, benchmarks and tests).

This module only runs the ``vllm`` command line as a subprocess; it never
imports vLLM, so the core stays free of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def vllm_executable() -> str:
    """The ``vllm`` console script next to this interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / "vllm"
    return str(candidate) if candidate.exists() else "vllm"


class VllmServer:
    """``vllm serve MODEL ...`` in the background; a context manager that always stops it.

    ``log_path`` receives the server's stdout and stderr (vLLM logs a lot, and
    keeps logging during shutdown).
    """

    def __init__(
        self,
        model: str | Path,
        log_path: str | Path,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 600.0,
        cwd: str | Path = "/",
    ) -> None:
        self.model = str(model)
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self.env.update(env or {})
        self.startup_timeout = startup_timeout
        # "/" by default: a checkout's root on sys.path would shadow installed packages.
        self.cwd = str(cwd)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> VllmServer:
        command = [
            vllm_executable(),
            "serve",
            self.model,
            "--host",
            HOST,
            "--port",
            str(self.port),
            *self.extra_args,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        # A new session, so stop() can signal vLLM's whole process tree (engine core, workers).
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=self.cwd
        )
        try:
            self.wait_ready()
        except BaseException:  # died, stalled or interrupted: leave no engine process behind
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with status {self.process.returncode} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve did not become ready within {self.startup_timeout:.0f} s")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT the process group (vLLM's clean shutdown), then SIGKILL whatever is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of the group
        self._log.close()
        self.process = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
