"""``dockyard serve`` start-up failures: the process exits non-zero with the reason, never sits up broken."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.server.conftest import free_port


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dockyard.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_model_that_fails_to_load_exits_nonzero_with_the_reason(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)  # the magic, then nothing valid
    proc = _serve("--model", str(broken), "--port", str(free_port()))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "dockyard serve: error:" in proc.stderr and "broken.gguf" in proc.stderr


def test_missing_model_exits_nonzero(tmp_path):
    proc = _serve("--model", str(tmp_path / "absent"), "--port", str(free_port()))
    assert proc.returncode == 2 and "not found" in proc.stderr, proc.stderr


def test_port_in_use_is_a_clear_error_before_loading():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = _serve("--port", str(port))
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "loading model" not in proc.stderr


def test_serve_help_lists_the_options():
    proc = _serve("--help", timeout=60)
    assert proc.returncode == 0
    for opt in ("--model", "--host", "--port", "--served-model-name", "--max-model-len", "--api-key", "--dtype",
                "--device", "--load-format", "--allowed-origins", "DOCKYARD_API_KEY"):
        assert opt in proc.stdout
