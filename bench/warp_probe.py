"""Can a Pallas (Triton) kernel talk across a warp? A probe for word streams shared by a warp's lanes.

    python3 -P bench/warp_probe.py            # on the GPU machine: prints one line per check, exit 1 on a mismatch

Interleaving a warp's word streams in read order (DietGPU's layout) needs each lane's offset among the lanes that
read this step (a ballot and a population count) and a word passed between lanes (a shuffle). Pallas has neither,
but ``plgpu.elementwise_inline_asm`` runs PTX per element; with one lane per thread (a block of 32 x num_warps
elements) element ``j`` is thread ``j``, so warp-wide PTX (``vote``, ``shfl``) sees the block's lanes in order.
This checks that mapping on the GPU against NumPy, for the block sizes the kernels use. Nothing here is used by
jcodec yet.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

PREFIX = """{ .reg .pred p; .reg .b32 b, m;
 setp.ne.u32 p, $1, 0;
 vote.sync.ballot.b32 b, p, 0xffffffff;
 mov.u32 m, %lanemask_lt;
 and.b32 m, m, b;
 popc.b32 $0, m; }"""
SHUFFLE = "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;"


def asm(code, *args):
    """``code`` on int32 operands (Triton's inline asm takes signless integers, not uint32) -> uint32."""
    args = [a.astype(jnp.int32) for a in args]
    return plgpu.elementwise_inline_asm(code, args=args, constraints="=r" + ",r" * len(args), pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.int32)])[0]


def probe(block: int, num_warps: int, tiles: int = 3):
    def kernel(flag_ref, value_ref, src_ref, prefix_ref, moved_ref):
        i = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
        flag, value, src = flag_ref[i], value_ref[i], src_ref[i]
        prefix_ref[i] = asm(PREFIX, flag).astype(jnp.uint32)
        moved_ref[i] = asm(SHUFFLE, value, src).astype(jnp.uint32)

    rng = np.random.default_rng(block)
    flag = (rng.random(tiles * block) < 0.3).astype(np.uint32)
    value = rng.integers(0, 2 ** 32, tiles * block, dtype=np.uint32)
    src = rng.integers(0, 32, tiles * block, dtype=np.uint32)
    out = jax.ShapeDtypeStruct((tiles * block,), jnp.uint32)
    prefix, moved = pl.pallas_call(kernel, out_shape=[out, out], grid=(tiles,),
                                   compiler_params=plgpu.CompilerParams(num_warps=num_warps))(flag, value, src)
    warps = flag.reshape(-1, 32)
    want_prefix = (np.cumsum(warps, axis=1) - warps).reshape(-1)
    want_moved = np.take_along_axis(value.reshape(-1, 32), src.reshape(-1, 32).astype(np.int64), axis=1).reshape(-1)
    ok = [np.array_equal(np.asarray(prefix), want_prefix), np.array_equal(np.asarray(moved), want_moved)]
    print(f"block {block} num_warps {num_warps}: ballot prefix {'ok' if ok[0] else 'WRONG'}, "
          f"shuffle {'ok' if ok[1] else 'WRONG'}", flush=True)
    return all(ok)


if __name__ == "__main__":
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    sys.exit(0 if all([probe(128, 4), probe(256, 8), probe(64, 2)]) else 1)
