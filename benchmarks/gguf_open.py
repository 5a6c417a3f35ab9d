"""CPU time to open a GGUF file and build its HF config (what every command that names a .gguf pays first).

Each file is opened in a fresh process (nothing cached yet; dockyard from PYTHONPATH, not the working
directory), after transformers' config tables are imported (a cost of its own, apart):
``GGUFFile(path).hf_config()``, then the token list decoded (what a tokenizer build asks for), then the same
file opened again in the same process. Run it against another tree to compare, e.g.
``PYTHONPATH=/tmp/base python benchmarks/gguf_open.py FILE...``.

    python benchmarks/gguf_open.py ~/.cache/dockyard/models/gemma-3-270m-q4_k_m.gguf [more.gguf ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, sys, time
import transformers.integrations.ggml, transformers.models.auto.modeling_auto  # their import time apart
from dockyard.weights.gguf_metadata import GGUFFile
path = sys.argv[1]
t = time.process_time(); f = GGUFFile(path); f.hf_config(); first = time.process_time() - t
t = time.process_time(); tokens = f.get("tokenizer.ggml.tokens"); decode = time.process_time() - t
t = time.process_time(); GGUFFile(path).hf_config(); again = time.process_time() - t
print(json.dumps({"open": first, "tokens": decode, "n_tokens": len(tokens), "open_again": again}))
"""


def measure(path: Path) -> dict[str, float]:
    """The CPU seconds of one fresh process's open, token decode and second open of ``path``."""
    out = subprocess.run([sys.executable, "-P", "-c", _CHILD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    print("| file | open + config (CPU s) | token list (CPU s) | tokens | open again (CPU s) |")
    print("|---|---|---|---|---|")
    for path in args.files:
        r = measure(path.expanduser())
        print(f"| {path.name} | {r['open']:.3f} | {r['tokens']:.3f} | {r['n_tokens']} | {r['open_again']:.3f} |")


if __name__ == "__main__":
    main()
