"""The ``dockyard serve`` subcommand: its arguments and its entry point.

Kept apart from ``dockyard/cli.py`` so that the main CLI only registers it; nothing heavy
(FastAPI, uvicorn, torch) is imported until the command runs.
"""

from __future__ import annotations

import argparse
import os

from dockyard.cli_args import add_num_threads_arg, add_skip_memory_check_arg

DEFAULT_PORT = 8000


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                    "/v1/chat/completions, /health, /metrics, /version). /health answers 503 until a warm-up "
                    "request has gone through the whole server.",
    )
    p.add_argument("--model", default=None,
                   help="a directory with config.json (+ safetensors), a config.json (dummy weights) or a .gguf "
                        "file; default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the model's name); the first is reported")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + generated tokens")
    p.add_argument("--api-key", default=os.environ.get("DOCKYARD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /openapi.json and /docs (default: "
                        "$DOCKYARD_API_KEY, else none; the variable keeps the key out of `ps`)")
    p.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="web origins (e.g. http://localhost:3000, or *) whose pages may call the server; requests "
                        "with any other Origin header are refused (default: none)")
    p.add_argument("--allowed-methods", nargs="+", default=["*"], metavar="METHOD",
                   help="CORS: methods allowed to the allowed origins (default: *)")
    p.add_argument("--allowed-headers", nargs="+", default=["*"], metavar="HEADER",
                   help="CORS: request headers allowed to the allowed origins (default: *)")
    p.add_argument("--allow-credentials", action="store_true",
                   help="CORS: let the allowed origins' pages send credentials (cookies)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--seed", type=int, default=0, help="seed of dummy weights")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly (no CUDA graphs for decode steps)")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="CUDA: finish each step on the host before the next starts (default: the next step "
                        "runs while the host appends the previous one's tokens)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N processes (one per GPU; gloo on CPU); past one host, start every "
                        "rank with torchrun (docs/ARCHITECTURE.md, Parallelism)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE: place whole experts across the tensor-parallel ranks instead of splitting each")
    add_num_threads_arg(p)
    add_skip_memory_check_arg(p)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM; the exit status (0 on a requested stop)."""
    from dockyard.server.app import serve  # the CLI starts without torch: a command's modules load when it runs

    return serve(args)
