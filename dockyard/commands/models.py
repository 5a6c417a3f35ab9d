"""``dockyard models``: the supported-models page, derived from the registry and real configs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dockyard.errors import DockyardError
from dockyard.supported_models import catch_table, render


def run(args: argparse.Namespace) -> int:
    """Print (or write) the supported-models page, or the mutation-catch table."""
    configs = [Path(c) for c in args.configs]
    for c in configs:
        if not c.is_dir():
            raise DockyardError(f"--configs {c} is not a directory of <name>/config.json")
    if args.catches and not configs:
        raise DockyardError("--catches runs the mutation check on real configs: give --configs DIR")
    page = catch_table(configs) if args.catches else render(configs)
    if args.write:
        Path(args.write).write_text(page)
        print(f"wrote {args.write}", file=sys.stderr)
    else:
        sys.stdout.write(page)
    return 0
