"""Gate 8, serve-smoke: ``dockyard serve`` answers a chat and a completion request over HTTP.

The gate runs the tutorial's own commands: ``dockyard serve ... --port 8000`` (the deploy port, the
serve command's default) and the two curl command lines, executed as written with ``curl``. Only when the
deploy port is taken on this machine does it run on a free loopback port instead, with the port the only
difference (the evidence says so). ``/health`` 200 alone proves nothing: the gate passes only when both
requests came back with non-empty answers, and a server that says ready but fails a request is recorded
as "false ready". The commands and the chat's real response go into the tutorial.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dockyard.onboard.context import GateContext, Outcome, source_flags
from dockyard.ports import free_port, port_is_free
from dockyard.server.cli import DEFAULT_PORT
from dockyard.tokenizer import TOKENIZER_FILES

logger = logging.getLogger(__name__)

CHAT_QUESTION = "What is the capital of France?"
COMPLETION_PROMPT = "The quick brown fox"
MAX_TOKENS = 24
SERVER_MODULES = ("dockyard.server", "fastapi", "uvicorn")


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(errors="replace"), exc.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def serve_command(ctx: GateContext, port: int | None = None) -> list[str]:
    """The ``dockyard serve`` arguments for this model (without the executable)."""
    args = ["serve"]
    if ctx.options.model is not None:
        args += ["--model", str(ctx.options.model)]
    args += source_flags(ctx.options.to_dict())
    if (ctx.source is not None and not ctx.source.has_real_weights) or ctx.options.weights == "dummy":
        args += ["--load-format", "dummy"]
    if ctx.machine.device != "cpu":
        args += ["--device", ctx.machine.device]
    if ctx.options.model_impl != "auto":
        args += ["--model-impl", ctx.options.model_impl]
    if ctx.options.trust_remote_code:
        args += ["--trust-remote-code"]
    if ctx.options.dtype != "auto":
        args += ["--dtype", ctx.options.dtype]
    if port is not None:
        args += ["--port", str(port)]
    return args


def curl_command(url: str, body: dict[str, Any]) -> str:
    """The curl command line the tutorial shows (a shell line continued with a backslash)."""
    return f"curl -s {url} -H 'Content-Type: application/json' \\\n  -d {shlex.quote(json.dumps(body))}"


def run_curl(command: str, timeout: float = 120.0) -> tuple[int, Any]:
    """Run a :func:`curl_command` line as a shell would (without a shell); (HTTP status, parsed body)."""
    argv = shlex.split(command.replace("\\\n", " "))
    argv[1:1] = ["-w", "\\n%{http_code}"]  # the status on a last line of its own
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    body, _, status = proc.stdout.rpartition("\n")
    try:
        return int(status), json.loads(body)
    except ValueError:
        return (int(status) if status.isdigit() else 0), body or proc.stderr


def _stop(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def _start(ctx: GateContext, port: int, server_log: Any) -> tuple[subprocess.Popen, bool, Any]:
    """Start ``dockyard serve`` on ``port``; (process, whether /health said 200 in time, the last /health body)."""
    cmd = [sys.executable, "-m", "dockyard.cli", *serve_command(ctx, port)]
    logger.info("starting: %s (server output: %s)", " ".join(cmd), server_log.name)
    proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, cwd=Path.cwd())
    health = None
    deadline = time.monotonic() + ctx.options.serve_timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, health = _request(f"http://127.0.0.1:{port}/health", timeout=5)
            if status == 200:
                return proc, True, health
        except (urllib.error.URLError, OSError, TimeoutError):
            pass
        time.sleep(0.5)
    return proc, False, health


def run(ctx: GateContext) -> Outcome:
    absent = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if absent:
        return Outcome("skip", f"server not available ({', '.join(absent)} not installed)", hard=False)
    if ctx.spec is None:
        return Outcome("skip", "no validated spec (inspect did not pass)", hard=False)

    source = ctx.source
    if source.gguf is None and not any((source.path / f).exists() for f in TOKENIZER_FILES):
        return Outcome("skip", f"{source.path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): the server's chat "
                               "and completion endpoints need one", hard=False)
    if ctx.fits_device is False or (ctx.dummy is not None and ctx.dummy.layers < ctx.spec.num_hidden_layers):
        return Outcome("skip", "the whole model does not fit this machine, so it cannot be served here", hard=False)
    log_path = ctx.out_dir / "logs" / "serve-smoke.server.log"
    evidence: dict[str, Any] = {"deploy_command": "dockyard " + " ".join(shlex.quote(a) for a in
                                                                         serve_command(ctx, DEFAULT_PORT)),
                                "deploy_port": DEFAULT_PORT, "server_log": str(log_path)}
    has_curl = shutil.which("curl") is not None
    t0 = time.perf_counter()
    with open(log_path, "w") as server_log:
        port = DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()
        ctx.step(f"starting dockyard serve on port {port}, waiting for /health")
        proc, ready, health = _start(ctx, port, server_log)
        if not ready and proc.poll() is not None and port == DEFAULT_PORT and not port_is_free(DEFAULT_PORT):
            port = free_port()  # another process took the deploy port between the check and the bind
            proc, ready, health = _start(ctx, port, server_log)
        base = f"http://127.0.0.1:{port}"
        evidence.update(command="dockyard " + " ".join(shlex.quote(a) for a in serve_command(ctx, port)), port=port,
                        port_note=None if port == DEFAULT_PORT else
                        f"port {DEFAULT_PORT} was taken on this machine: the commands ran on port {port}, otherwise "
                        "exactly as shown")
        try:
            evidence["startup_seconds"] = time.perf_counter() - t0
            evidence["health"] = health
            if not ready:
                why = (f"server exited with status {proc.returncode}" if proc.poll() is not None
                       else f"/health not 200 after {ctx.options.serve_timeout_s:.0f}s")
                return Outcome("fail", f"server never became ready: {why} (see {log_path})", evidence)
            _, models = _request(f"{base}/v1/models")
            model_id = models["data"][0]["id"] if isinstance(models, dict) and models.get("data") else None
            evidence["model_id"] = model_id
            chat_body = {"model": model_id, "messages": [{"role": "user", "content": CHAT_QUESTION}],
                         "max_tokens": MAX_TOKENS, "temperature": 0}
            comp_body = {"model": model_id, "prompt": COMPLETION_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
            chat_curl = curl_command(f"{base}/v1/chat/completions", chat_body)
            comp_curl = curl_command(f"{base}/v1/completions", comp_body)
            ctx.step("ready; sending the tutorial's chat and completion requests")
            if has_curl:  # the tutorial's command lines, run as written
                chat_status, chat = run_curl(chat_curl)
                comp_status, comp = run_curl(comp_curl)
            else:
                evidence["curl_note"] = "curl is not installed here: the same requests were sent with urllib"
                chat_status, chat = _request(f"{base}/v1/chat/completions", chat_body)
                comp_status, comp = _request(f"{base}/v1/completions", comp_body)
        finally:
            evidence["server_exit_code"] = _stop(proc)
    chat_text = _answer(chat, "chat")
    comp_text = _answer(comp, "completion")
    deploy = f"http://127.0.0.1:{DEFAULT_PORT}"
    evidence["chat"] = {"status": chat_status, "answer": chat_text, "response": chat,
                        "curl": curl_command(f"{deploy}/v1/chat/completions", chat_body), "curl_run": chat_curl}
    evidence["completion"] = {"status": comp_status, "answer": comp_text, "response": comp,
                              "curl": curl_command(f"{deploy}/v1/completions", comp_body), "curl_run": comp_curl}
    # A GGUF without a chat template is a base model: its chat request is refused (400), as it should be.
    chat_applies = source.gguf is None or source.gguf.chat_template() is not None
    evidence["chat_applies"] = chat_applies
    ok = (chat_status == 200 and bool(chat_text) if chat_applies else chat_status == 400) and (
        comp_status == 200 and bool(comp_text))
    verified = evidence["chat" if chat_applies else "completion"]  # a base model's example is its completion
    if verified["status"] == 200 and verified["answer"]:
        ctx.serve_example = {"command": evidence["deploy_command"], "port": DEFAULT_PORT, "ran_on_port": port,
                             "port_note": evidence["port_note"], "chat": evidence["chat"],
                             "completion": evidence["completion"],
                             "request": verified}
    if ok:
        chat_said = (f"chat answered {chat_text[:40]!r}" if chat_applies else
                     "no chat template in the GGUF (a base model): chat refused with 400 as it should be")
        return Outcome("pass", f"ready after {evidence['startup_seconds']:.1f}s; {chat_said}; "
                               f"completion answered {comp_text[:30]!r}", evidence, hard=False)
    return Outcome("fail", f"false ready: /health said 200 but chat → {chat_status} {chat_text[:60]!r}, "
                           f"completion → {comp_status} {comp_text[:60]!r}", evidence, hard=False)


def _answer(body: Any, kind: str) -> str:
    try:
        choice = body["choices"][0]
        return str(choice["message"]["content"] if kind == "chat" else choice["text"]).strip()
    except (KeyError, IndexError, TypeError):
        return ""
