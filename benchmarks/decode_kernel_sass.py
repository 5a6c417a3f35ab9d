"""Instructions per tile of the paged decode kernel's main loop, compiled for Hopper on any machine (no GPU).

    PYTHONPATH=. python benchmarks/decode_kernel_sass.py [--block-n 64] [--out DIR]

Triton compiles ``triton_attention._paged_decode_kernel`` for sm_90 at Llama-3.1-8B's decode shapes (a GQA group of 4
query heads, 128 dims, 16-token blocks, no split) for a bf16 cache, an FP8 cache with bf16 products and an FP8 cache
with float16 products (:mod:`dockyard.bench.kernel_sass`); Triton's ``cuobjdump`` disassembles each, and the longest
backward branch bounds the loop over tiles. Printed per variant: the loop's instruction count (one warp, one tile of
``BLOCK_N`` tokens) and its most frequent opcodes, plus the shared-memory loads of the PTX (byte-wide
``ld.shared.b8`` against ``ldmatrix``). A kernel bound by issued instructions rather than bytes shows it here
before any device time is spent.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from dockyard.bench.kernel_sass import VARIANTS, compile_decode, disassemble, loop_opcodes, ptx_count

SHARED_LOADS = ("ld.shared.b8", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also keep each variant's PTX and SASS there")
    args = p.parse_args()
    for label, (kv, q) in VARIANTS.items():
        kernel = compile_decode(kv, q, args.block_n, args.num_warps, args.num_stages)
        sass, ptx = disassemble(kernel), kernel.asm["ptx"]
        opcodes = loop_opcodes(sass)
        shared_loads = {op: ptx_count(ptx, op) for op in SHARED_LOADS}
        print(f"{label}: {len(opcodes)} instructions per {args.block_n}-token tile; shared memory "
              f"{kernel.metadata.shared} bytes; PTX {shared_loads}")
        print("   ", dict(collections.Counter(opcodes).most_common(12)))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            stem = label.replace(", ", "_").replace(" ", "_")
            (args.out / f"{stem}.ptx").write_text(ptx)
            (args.out / f"{stem}.sass").write_text(sass)


if __name__ == "__main__":
    main()
