"""The A/B that found session 7's slowdown (bench/RESULTS.md, session 9). Times the bf16-lossless matrix, the
bf16-lossless layer (one launch) and the int8 matrix with the installed jcodec, whichever lane layout its
device arrays have:
  offsets  session 6: each lane's uint32 start in the words;
  counts   sessions 7-8: the file's word counts, summed by each program (a ``jnp.cumsum``, Triton's ``tt.scan``);
           ``--starts`` patches those kernels' ``tile_lanes_init`` to read starts precomputed on the host;
  starts   session 9 on: each lane's start within its tile, summed on the host.

    python3 -P bench/lane_starts.py --out /tmp/ls.json [--starts] [--once]

``--once``: one launch of each kernel, nothing timed (a target for ``ncu -k regex:rans``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from jcodec import codecs, tensor
from jcodec.pallas_kernels import rans_float, rans_int8

MATRIX = (4096, 14336)
LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def gaussian(shape, seed):
    return (np.random.default_rng(seed).standard_normal(shape, np.float32) * 0.02).astype(jnp.bfloat16)


def patch_starts():
    """Make the kernels read precomputed uint32 lane starts from the ``counts`` array (no prefix sum)."""
    def tile_lanes_init(words_ref, counts_ref, bases_ref, states_ref, tile, lanes, live, word_base, prefetch):
        l = jnp.where(live, jnp.arange(live.shape[0], dtype=jnp.int32), 0)
        start = plgpu.load(counts_ref.at[tile * lanes + l], mask=live, other=0).astype(jnp.int32)
        return rans_float.lanes_init(words_ref, start, states_ref[tile * lanes + l], word_base, prefetch)
    rans_float.tile_lanes_init = rans_int8.tile_lanes_init = tile_lanes_init
    rans_float.check_lanes = rans_int8.check_lanes = lambda *a: None


def with_starts(args, lanes):
    """The same arrays with ``counts`` replaced by each lane's uint32 start (bases + exclusive prefix sum)."""
    counts, bases = np.asarray(args[1]).astype(np.int64), np.asarray(args[2]).astype(np.int64)
    c = counts.reshape(-1, lanes)
    starts = (bases[:, None] + np.cumsum(c, axis=1) - c).reshape(-1).astype(np.uint32)
    return (args[0], jnp.asarray(starts), *args[2:])


def lane_layout(codec):
    """"offsets", "counts" or "starts": the lane array the installed jcodec keeps on the device."""
    arrays = tensor.DEVICE_ARRAYS[codec]
    return "counts" if "counts" in arrays else "starts" if "starts" in arrays else "offsets"


def args_of(x, codec, steps, starts):
    args, meta = tensor.kernel_args(tensor.from_encoded(codecs.encode(np.asarray(x), codec, steps=steps)))
    if starts:
        args = with_starts(args, meta[1] if codec == "bf16-lossless" else meta[3])
    return args, meta, lane_layout(codec)


def float_fn(metas, layout, unroll, prefetch, raw_early, interpret=False):
    extra = {"interpret": interpret} if layout != "offsets" else {"block_lanes": 128, "interpret": interpret}
    return jax.jit(lambda ts: rans_float.rans_float_decode_many(ts, metas=metas, unroll=unroll, num_warps=4,
                                                                coarse_bits=5, prefetch=prefetch,
                                                                raw_early=raw_early, **extra))


def int8_fn(metas, interpret=False):
    return jax.jit(lambda ts: rans_int8.rans_int8_decode_many(ts, metas=metas, unroll=16, num_warps=4, coarse_bits=5,
                                                          prefetch=8, interpret=interpret))


def time_it(fn, tensors, reps):
    out = fn(tensors)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(tensors))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", action="store_true", help="precomputed lane starts (patched kernels)")
    ap.add_argument("--once", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--small", action="store_true", help="tiny shapes in interpret mode: a dry run on CPU")
    ap.add_argument("--out")
    a = ap.parse_args()
    global MATRIX, LAYER
    if a.small:
        MATRIX, LAYER, a.reps = (64, 2053), [(64, 2053), (33, 4096)], 2
    if a.starts:
        if lane_layout("bf16-lossless") != "counts":
            sys.exit(f"--starts patches kernels that sum lane counts (sessions 7-8); this jcodec keeps "
                     f"{lane_layout('bf16-lossless')}")
        patch_starts()
    rows = []
    x = gaussian(MATRIX, 0)
    layer = [gaussian(s, i + 1) for i, s in enumerate(LAYER)]
    cases = [("bf16-lossless matrix u16 p8 r1", [x], "bf16-lossless", 240, (16, 8, True)),
             ("bf16-lossless layer u4 p0", layer, "bf16-lossless", 240, (4, 0, False)),
             ("int8 matrix u16 p8", [x], "int8", 1024, None)]
    for name, xs, codec, steps, opts in cases:
        encoded = [args_of(w, codec, steps, a.starts) for w in xs]
        tensors = [e[0] for e in encoded]
        metas = tuple(e[1] for e in encoded)
        layout = encoded[0][2]
        fn = (float_fn(metas, layout, *opts, interpret=a.small) if opts
              else int8_fn(metas, interpret=a.small))
        if a.once:
            jax.block_until_ready(fn(tensors))
            continue
        s, outs = time_it(fn, tensors, a.reps)
        if codec == "bf16-lossless":
            exact = all(np.array_equal(np.asarray(o).view(np.uint16), np.asarray(w).reshape(-1).view(np.uint16))
                        for o, w in zip(outs, xs))
        else:  # against the NumPy decoder
            exact = all(np.array_equal(np.asarray(o).view(np.uint16),
                                       np.asarray(codecs.decode(codecs.encode(np.asarray(w), codec, steps=steps)))
                                       .reshape(-1).view(np.uint16)) for o, w in zip(outs, xs))
        gbs = sum(w.size for w in xs) * 2 / s / 1e9
        rows.append({"case": name, "starts": a.starts, "layout": layout, "ms": s * 1e3, "gb_s": gbs,
                     "exact": exact})
        print(f"{name:34s} starts={a.starts!s:5s} layout={layout:7s} {s * 1e3:8.3f} ms "
              f"{gbs:7.1f} GB/s exact={exact}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
