"""The ``dockyard serve`` subcommand: its arguments and its entry point.

Kept apart from ``dockyard/cli.py`` so that the main CLI only registers it; nothing heavy
(FastAPI, uvicorn, torch) is imported until the command runs.
"""

from __future__ import annotations

import argparse
import os

from dockyard.engine_args import EngineArgs, add_vllm_refusals
from dockyard.reasoning import REASONING_PARSERS
from dockyard.tool_parsers import TOOL_PARSERS

DEFAULT_PORT = 8000
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on the CLI's subparsers: the frontend's flags here, the engine's from ``EngineArgs``."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                    "/v1/chat/completions, /health, /metrics, /version). /health answers 503 until a warm-up "
                    "request has gone through the whole server. The flags are vLLM's `vllm serve` flags where "
                    "vLLM has them; a vLLM flag dockyard does not honour is refused with the reason.",
    )
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model (as --model; give one or the other)")
    front = p.add_argument_group("Frontend", "the HTTP server")
    front.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    front.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port to listen on (default {DEFAULT_PORT}; 0 = any free port)")
    front.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients use in 'model' (default: the model's name); the first is reported")
    front.add_argument("--api-key", default=os.environ.get("DOCKYARD_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/*, /openapi.json and /docs (default: "
                            "$DOCKYARD_API_KEY, else none; the variable keeps the key out of `ps`)")
    front.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                       help="the chat template to use instead of the tokenizer's: a file, or the Jinja text itself")
    front.add_argument("--uvicorn-log-level", default=None, choices=UVICORN_LOG_LEVELS,
                       help="uvicorn's own log (start-up lines; access lines at info and below) (default: follows "
                            "--log-level)")
    front.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                       help="web origins (e.g. http://localhost:3000, or *) whose pages may call the server; "
                            "requests with any other Origin header are refused (default: none)")
    front.add_argument("--allowed-methods", nargs="+", default=["*"], metavar="METHOD",
                       help="CORS: methods allowed to the allowed origins (default: *)")
    front.add_argument("--allowed-headers", nargs="+", default=["*"], metavar="HEADER",
                       help="CORS: request headers allowed to the allowed origins (default: *)")
    front.add_argument("--allow-credentials", action="store_true",
                       help="CORS: let the allowed origins' pages send credentials (cookies)")
    front.add_argument("--metrics-prefix", default="dockyard",
                       help="prefix of the /metrics names (default dockyard; vllm gives vLLM's names, vllm:..., for "
                            "its dashboards)")
    logs = front.add_mutually_exclusive_group()
    logs.add_argument("--enable-log-requests", action="store_true",
                      help="log each request's prompt and sampling parameters on stderr")
    logs.add_argument("--disable-log-requests", action="store_true",
                      help="do not log requests (the default; accepted for vLLM's command lines)")
    tools = p.add_argument_group("Tool calling and reasoning", "how the model's tool calls and reasoning are read")
    tools.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='answer tool_choice "auto" (the default when a request has tools): the model decides, '
                            "and its tool calls are read with --tool-call-parser")
    tools.add_argument("--tool-call-parser", default=None, metavar="NAME",
                       help=f"the format the model writes tool calls in: {', '.join(TOOL_PARSERS)}")
    tools.add_argument("--reasoning-parser", default=None, metavar="NAME",
                       help="separate the model's reasoning into reasoning_content: "
                            f"{', '.join(REASONING_PARSERS)}")
    EngineArgs.add_cli_args(p)
    add_vllm_refusals(p)
    return p


