"""Compile a jcodec kernel to Hopper SASS on a machine WITHOUT a GPU, and summarise its step loop.

    pip install triton==3.6.0        # (not a project dependency: the compiler, ptxas and nvdisasm it bundles)
    python -P bench/sass.py --kernel float --variant 8,4,5,0 --out /tmp/sass

JAX lowers the ``pallas_call`` for CUDA on any machine (the Triton module is built before any device is
needed); this script captures that module, compiles it with the pip ``triton`` for sm_90 and disassembles
it. The GPU machine's jaxlib embeds its own Triton, so the SASS there can differ in details: this is for
reading what a change does to the loop (instructions per step, loads, where the loop waits on them), and
timings are still taken on the GPU (``bench/decode.py``). Writes ``k.ttir``, ``k.ptx`` and ``k.sass`` under
``--out`` and prints: registers, spills, and per step of the innermost loop its instructions, global loads
and stores, and the scoreboards the loop head waits on (a load the loop head waits on was issued in the
previous iteration: its latency is only hidden by the steps between).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import numpy as np

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import pallas_call_registration as registration

from jcodec import codecs, tensor
from jcodec.pallas_kernels import rans_common as rc, rans_float, rans_int8

MODULES: list[str] = []


def capture_modules():
    """Keep the text of every Triton module JAX lowers (the registration calls ``lowering`` by attribute)."""
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def keep(*a, **k):
        result = lower(*a, **k)
        MODULES.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = keep


def lower(kernel: str, variant: list[int], shape: tuple[int, int], steps: int | None = None,
          pairs: bool = False) -> None:
    x = (np.random.default_rng(0).standard_normal(shape, np.float32) * 0.02).astype(jnp.bfloat16)
    codec = "bf16-lossless" if kernel == "float" else "int8"
    args, meta = tensor.kernel_args(tensor.from_encoded(codecs.encode(np.asarray(x), codec, steps=steps,
                                                                      pairs=pairs)))
    if kernel == "float":
        u, w, c, p, g, r, sy = variant
        args, c = symbol_tables(args, 5, pairs, sy), rc.BY_SYMBOL if sy else c
        f = lambda *a: rans_float.rans_float_decode(*a, n=meta[0], lanes=meta[1], steps=meta[2], dtype=meta[3], carry=meta[4], run=meta[5],
                                                    unroll=u, num_warps=w, coarse_bits=c,
                                                    prefetch=p, word_group=g, raw_early=bool(r))
    else:
        u, w, c, p, g, sy = variant
        args, c = symbol_tables(args, 4, False, sy), rc.BY_SYMBOL if sy else c
        f = lambda *a: rans_int8.rans_int8_decode(*a, **dict(zip(("n", "rows", "cols", "lanes", "steps", "dtype"),
                                                                 meta)), predictors_used=meta[6], unroll=u,
                                                  num_warps=w, coarse_bits=c,
                                                  prefetch=p, word_group=g)
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def summarise(sass: str, unroll: int) -> dict:
    # the innermost loop: the last backward branch's body (label .. branch)
    text = sass.splitlines()
    branches = [(i, re.search(r"BRA (\w+)", l).group(1)) for i, l in enumerate(text) if re.search(r"@!?U?P\d BRA", l)]
    best = None
    for i, label in branches:
        starts = [j for j, l in enumerate(text[:i]) if l.strip() == f"{label}:"]
        if starts and (best is None or i - starts[-1] < best[1] - best[0]):
            best = (starts[-1], i)
    if best is None:
        return {"loop": None}
    body = [l.split("\t", 1) for l in text[best[0] + 1:best[1] + 1] if "\t" in l]
    ops = [b[1].strip() for b in body]
    mask = 0  # the waits of the loop's first instructions, up to its first load
    for ctrl, op in body:
        if "LDG" in op:
            break
        mask |= 0 if ctrl.split(":")[0] == "--" else int(ctrl.split(":")[0], 16)
    waits = [s for s in range(6) if mask >> s & 1]
    count = lambda pat: sum(1 for o in ops if re.search(pat, o))
    return {"loop_instructions": len(ops), "per_step": round(len(ops) / unroll, 1),
            "loads_per_step": round(count(r"\bLDG") / unroll, 2), "stores_per_step": round(count(r"\bSTG") / unroll, 2),
            "loop_head_waits_on_scoreboards": waits}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=("float", "int8"), default="float")
    ap.add_argument("--variant", help="as bench/decode.py: float 'u,w,c,p[,gG][,rR][,s1]', int8 'u,w,c,p[,gG][,s1]'")
    ap.add_argument("--shape", default="64,4096", help="rows,cols of the Gaussian tensor encoded")
    ap.add_argument("--steps", type=int, help="steps per lane (default: the encoder's for the codec)")
    ap.add_argument("--pairs", action="store_true", help="bf16-lossless with pair symbols (a step decodes 2 values)")
    ap.add_argument("--out", default="/tmp/sass")
    a = ap.parse_args()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        sys.exit("bench/sass.py needs the triton package (pip install triton==3.6.0): it is not a jcodec dependency")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    global symbol_tables
    from decode import FLOAT_OPTIONS, INT8_OPTIONS, parse_variants, symbol_tables
    numbers, options, default = ((4, FLOAT_OPTIONS, "16,4,5,8,r1") if a.kernel == "float"
                                 else (4, INT8_OPTIONS, "8,4,5,0"))
    variant, = parse_variants(a.variant or default, numbers, options)
    capture_modules()
    lower(a.kernel, variant, tuple(int(s) for s in a.shape.split(",")), a.steps, a.pairs)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "k.ttir")
    with open(path, "w") as f:
        f.write(MODULES[-1])
    warps = variant[1]
    compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=1))
    for ext in ("ptx", "sass"):
        with open(os.path.join(a.out, f"k.{ext}"), "w") as f:
            f.write(compiled.asm[ext])
    cubin = os.path.join(a.out, "k.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    unroll = variant[0]
    info = {"registers": regs and int(regs.group(1)), "stack_bytes": stack and int(stack.group(1)),
            "shared_bytes": compiled.metadata.shared,
            **summarise(compiled.asm["sass"], unroll)}
    print(" ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
