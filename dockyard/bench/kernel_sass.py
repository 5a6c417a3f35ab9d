"""The paged decode kernel compiled for Hopper on any machine (no GPU): its PTX and SASS, and the opcodes of its
loop over tiles. ``benchmarks/decode_kernel_sass.py`` prints them; a test checks that the FP8 value tile is not read
from shared memory byte by byte. Triton ships ptxas and cuobjdump, so this runs wherever Triton is installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dockyard.ops import triton_attention as ta

HOPPER = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {"q_ptr": "*{q}", "k_ptr": "*{kv}", "v_ptr": "*{kv}", "block_tables_ptr": "*i32",
                 "seq_lens_ptr": "*i32", "sinks_ptr": "*{q}", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
                 "out_ptr": "*{q}", "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32"}
VARIANTS = {"bf16 cache": ("bf16", "bf16"), "fp8 cache, bf16 products": ("fp8e4nv", "bf16"),
            "fp8 cache, f16 products": ("fp8e4nv", "fp16")}


def _compiled_kernels() -> ModuleType:
    """``triton_attention`` with compiled (not interpreted) kernels: the module itself, or, in a process that set
    ``TRITON_INTERPRET=1`` before importing it (the tests), a private copy loaded without that setting."""
    if isinstance(ta._paged_decode_kernel, triton.runtime.JITFunction):
        return ta
    spec = importlib.util.spec_from_file_location("_triton_attention_compiled", ta.__file__)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def compile_decode(kv: str, q: str, block_n: int, num_warps: int, num_stages: int) -> triton.compiler.CompiledKernel:
    """The decode kernel for Hopper: pointers and strides declared 16-aligned, as Triton specializes them at launch."""
    kernel = _compiled_kernels()._paged_decode_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    constants = dict(NUM_Q_HEADS=32, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, PAGE_SIZE=16, BLOCK_N=block_n,
                     USE_WINDOW=False, USE_SOFTCAP=False, USE_SINKS=False, SPLIT=False,
                     DOT_DTYPE=tl.bfloat16 if q == "bf16" else tl.float16, DOT_PRECISION=None,
                     KV_SCALED=kv == "fp8e4nv")
    signature = {n: "constexpr" if n in constants else POINTER_TYPES[n].format(q=q, kv=kv) if n in POINTER_TYPES
                 else "fp32" if n in ("scale", "softcap") else "i32" for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if signature[n].startswith("*") or n.startswith("stride")}
    source = ASTSource(kernel, signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()}, attrs=aligned)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def disassemble(kernel: triton.compiler.CompiledKernel) -> str:
    """The SASS of a compiled kernel, from Triton's own ``cuobjdump``."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as directory:
        cubin = Path(directory) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(cuobjdump), "--dump-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout


def ptx_count(ptx: str, opcode: str) -> int:
    """How many instructions of ``opcode`` (its full dotted name) the PTX holds."""
    return len(re.findall(rf"^\s*(?:@%p\d+\s+)?{re.escape(opcode)}\s", ptx, re.MULTILINE))


def loop_opcodes(sass: str) -> list[str]:
    """Opcodes of the longest loop (the span of the longest backward branch) of a SASS listing."""
    instructions = [(int(m.group(1), 16), m.group(2).strip())
                    for m in re.finditer(r"^\s+/\*([0-9a-f]{4})\*/\s+(.*?);", sass, re.MULTILINE)]
    loops = [(int(m.group(1), 16), address) for address, text in instructions
             if (m := re.search(r"BRA (?:`\(.*?\) )?0x([0-9a-f]+)", text)) and int(m.group(1), 16) < address]
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for address, text in instructions if start <= address <= end]


__all__ = ["HOPPER", "VARIANTS", "compile_decode", "disassemble", "loop_opcodes", "ptx_count"]
