"""A real ``dockyard serve`` process for the server tests, plus small raw-HTTP helpers.

The server is started once per session (loading the model is the slow part) with an API key and
a warm-up gate, so the tests can watch /health go from 503 to 200 deterministically. Its log goes
to a file whose tail is shown when a test fails.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dockyard.model_path import bundled_model_path
from dockyard.ports import free_port  # noqa: F401  (the server tests import it from here)

API_KEY = "test-key-123"
MODEL_NAME = "smol"
STARTUP_TIMEOUT_S = 240



def http_call(port: int, method: str, path: str, body: bytes | dict | None = None,
              headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    """One raw HTTP call; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=raw, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} with the model_name and engine labels dropped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        name, _, labels = key.partition("{")
        kept = [lab for lab in labels.rstrip("}").split(",") if lab and not lab.startswith(("model_name=", "engine="))]
        out[name + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
    return out


@dataclass
class ServerProcess:
    """A running ``dockyard serve`` and what the fixture observed while it started."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    health_before_ready: list[tuple[int, dict | str]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(self, method: str, path: str, body: bytes | dict | None = None, auth: bool = True,
             headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
        hdrs = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
        return http_call(self.port, method, path, body, {**hdrs, **(headers or {})})

    def metrics(self) -> dict[str, float]:
        status, text = http_call(self.port, "GET", "/metrics")
        assert status == 200
        return parse_metrics(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def start_server(tmp: Path, *extra: str, gate: Path | None = None) -> ServerProcess:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gate is not None:
        env["DOCKYARD_WARMUP_WAIT_FOR"] = str(gate)
    cmd = [sys.executable, "-m", "dockyard.cli", "serve", "--port", str(port), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, port, log_path)


@contextlib.contextmanager
def ready_server(tmp_path_factory: pytest.TempPathFactory, name: str, *extra: str,
                 model_positional: bool = False) -> Iterator[ServerProcess]:
    """A ``dockyard serve`` of the bundled model (its path given as MODEL when ``model_positional``) with
    ``extra`` flags, ready (/health 200), stopped afterwards; skipped when the bundled model is not installed."""
    try:
        model = str(bundled_model_path())
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bundled model not installed: {exc}")
    srv = start_server(tmp_path_factory.mktemp(name), *([model] if model_positional else []), *extra)
    try:
        wait_for_health(srv, 200)
        yield srv
    finally:
        srv.stop()


def wait_for_health(server: ServerProcess, want: int, timeout: float = STARTUP_TIMEOUT_S) -> tuple[int, dict | str]:
    """Poll /health until it answers ``want``; returns that answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}:\n{server.log()[-3000:]}")
        try:
            status, body = http_call(server.port, "GET", "/health", timeout=5)
        except OSError:
            time.sleep(0.05)
            continue
        if status == want:
            return status, body
        server.health_before_ready.append((status, body))
        time.sleep(0.05)
    pytest.fail(f"/health did not answer {want} within {timeout}s:\n{server.log()[-3000:]}")


@pytest.fixture(scope="session")
def _launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerProcess, Path]:
    """The server process, launched (not yet ready) with a warm-up gate that does not exist yet."""
    try:
        bundled_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bundled model not installed: {exc}")
    tmp = tmp_path_factory.mktemp("server")
    gate = tmp / "warmup-gate"
    srv = start_server(tmp, "--api-key", API_KEY, "--served-model-name", MODEL_NAME, "--max-num-seqs", "64",
                       gate=gate)
    yield srv, gate
    srv.stop()


@pytest.fixture(scope="session")
def reference_llm(bundled_llm):
    """The same model in process (float32, CPU): the session's ``bundled_llm``, not a second load. ``server``
    asks for it after launching the process, so both load at the same time when it is not loaded yet."""
    return bundled_llm


@pytest.fixture(scope="session")
def server(_launched, reference_llm) -> ServerProcess:
    srv, gate = _launched
    # The warm-up waits for the gate file: until it exists /health must say 503.
    status, body = wait_for_health(srv, 503)
    srv.health_before_ready.append((status, body))
    gate.touch()
    wait_for_health(srv, 200)
    return srv
