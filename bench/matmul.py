"""The forward's skinny matmuls on their own: weights read in place from a layer stack, against XLA.

    python bench/matmul.py --out /tmp/matmul.json              # GPU: Llama-3-8B shapes, batch 1 and 16
    python bench/matmul.py --tiny --out /tmp/matmul.json       # CPU smoke test (interpret mode)

Each row multiplies x [M, K] by one layer's weights for every layer of a stack, in one jitted ``lax.scan`` (as
the forward does), and reports the weights' GB/s:
- ``xla scan``: ``x @ w[l].T`` with XLA's matmul inside the scan (XLA slices the layer out of the stack first);
- ``xla unrolled``: the same on separate per-layer arrays, layers unrolled (no slice: the library's own rate);
- ``pallas mBnK wW sS``: ``jcodec.pallas_kernels.stacked_matmul`` with those blocks, warps and stages.
Beside them, an XLA pass that reads and writes 2 GiB (the copy bandwidth: the roofline of a weight-reading
step). Random weights; shapes those of Llama-3-8B (q/k/v and gate/up multiplied in one launch).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jcodec.benchmark import copy_pass, time_calls
from jcodec.pallas_kernels.stacked_matmul import stacked_matmul, stacked_matmul_reference

SHAPES_8B = {  # name: (K, [N_i]) of one layer's matmul (several N: one launch), and layers
    "qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]), "head": (4096, [128256]),
}
LAYERS = 32
VARIANTS = {  # (block_n, block_k, num_warps, num_stages[, block_m]) per M
    1: [(8, 512, 4, 3), (16, 512, 4, 3), (16, 256, 4, 3), (32, 256, 4, 3), (16, 1024, 8, 3), (16, 512, 8, 1),
        (8, 1024, 4, 1), (32, 512, 8, 3), (16, 512, 4, 3, 16), (32, 256, 4, 3, 16), (64, 256, 8, 3, 16)],
    16: [(32, 512, 4, 3), (64, 512, 8, 3), (32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (64, 128, 8, 3)],
}


def copy_bandwidth(reps: int, nbytes: int = 2 << 30) -> float:
    """Bytes a second an XLA pass moves reading and writing ``nbytes`` (half read, half written)."""
    return nbytes / copy_pass(nbytes // 2, reps, min_rounds=4).seconds


def scan_over(layers: int, matmul):
    """A jitted fn(x, stacks) applying ``matmul(x, stacks, l)`` for every layer l, keeping one value each."""
    def fn(x, stacks):
        def body(acc, l):
            ys = matmul(x, stacks, l)
            return acc + sum(y[0, 0].astype(jnp.float32) for y in ys), None
        return jax.lax.scan(body, jnp.float32(0), jnp.arange(layers, dtype=jnp.int32))[0]
    return jax.jit(fn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--shapes", default=",".join(SHAPES_8B))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    interpret = jax.devices()[0].platform != "gpu"
    copy_bps = copy_bandwidth(args.reps, 64 << 20 if args.tiny else 2 << 30)
    rng = np.random.default_rng(0)
    rows = []
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; copy pass {copy_bps / 1e9:.1f} GB/s moved")
    print(f"{'shape':<8} {'M':>3} {'variant':<24} {'ms/layer':>9} {'GB/s':>7} {'of copy':>7} {'max err':>8}")
    for name in args.shapes.split(","):
        K, sizes = SHAPES_8B[name]
        L = 1 if name == "head" else LAYERS
        if args.tiny:
            K, sizes, L = 256, [max(64, n // 256) for n in sizes], 2
        stacks = [jnp.asarray(rng.standard_normal((L, n, K), np.float32) * 0.02, jnp.bfloat16) for n in sizes]
        weight_bytes = sum(s.nbytes for s in stacks)
        for M in args.batches:
            x = jnp.asarray(rng.standard_normal((M, K), np.float32), jnp.bfloat16)
            want = [np.asarray(y, np.float32) for y in stacked_matmul_reference(x, stacks, L - 1)]
            variants = {"xla scan": scan_over(L, lambda x, ws, l: [x @ w[l].T for w in ws])}
            layers = [[w[l] for w in stacks] for l in range(L)]
            variants["xla unrolled"] = jax.jit(lambda x, ls: sum(
                (x @ w.T)[0, 0].astype(jnp.float32) for ws in ls for w in ws))
            for bn, bk, nw, ns, *bm in VARIANTS[1 if M == 1 else 16]:
                bm = bm[0] if bm else None
                label = f"pallas n{bn} k{bk} w{nw} s{ns}" + (f" m{bm}" if bm else "")
                if any(n % bn for n in sizes) or K % bk:
                    continue
                variants[label] = scan_over(L, lambda x, ws, l, bm=bm, bn=bn, bk=bk, nw=nw, ns=ns: stacked_matmul(
                    x, ws, l, block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, interpret=interpret))
            for label, fn in variants.items():
                inputs = (x, layers) if label == "xla unrolled" else (x, stacks)
                err = None
                try:
                    if label.startswith("pallas"):
                        opts = {t[0]: int(t[1:]) for t in label.split()[1:]}
                        got = stacked_matmul(x, stacks, jnp.int32(L - 1), block_m=opts.get("m"), block_n=opts["n"],
                                             block_k=opts["k"], num_warps=opts["w"], num_stages=opts["s"],
                                             interpret=interpret)
                        err = max(float(np.max(np.abs(np.asarray(g, np.float32) - w))) for g, w in zip(got, want))
                    t = time_calls(fn, [inputs], args.reps, min_rounds=2)
                except Exception as e:  # noqa: BLE001  (a variant that does not compile is reported, not fatal)
                    print(f"{name:<8} {M:>3} {label:<24} failed: {type(e).__name__}: {str(e)[:200]}")
                    rows.append(dict(shape=name, M=M, variant=label, error=f"{type(e).__name__}: {str(e)[:500]}"))
                    continue
                gbs = weight_bytes / t.seconds / 1e9
                row = dict(shape=name, M=M, variant=label, K=K, N=sizes, layers=L, ms_per_layer=t.seconds / L * 1e3,
                           weights_gbs=gbs, of_copy=gbs * 1e9 / copy_bps, max_abs_err=err)
                rows.append(row)
                print(f"{name:<8} {M:>3} {label:<24} {row['ms_per_layer']:>9.4f} {gbs:>7.1f} {row['of_copy']:>7.1%} "
                      f"{'' if err is None else f'{err:.2g}':>8}")
        del stacks
    if args.out:
        meta = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, platform=platform.platform(),
                    copy_gbs_moved=copy_bps / 1e9, date=time.strftime("%Y-%m-%d %H:%M:%S"))
        with open(args.out + ".tmp", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
