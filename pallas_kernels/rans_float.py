"""Fused ``bf16-lossless`` decoder: rANS-coded exponent bytes + raw sign/mantissa -> float bits.

Layout read (the device arrays of ``jcodec.tensor.from_encoded``; T tiles of L lanes x S steps):
  words    uint16[W]     every lane's 16-bit renormalisation words, lane by lane, each lane's in read order
  offsets  uint32[T*L]   where lane ``t*L + l`` starts reading in ``words``
  states   uint32[T*L]   each lane's start state
  raw      uint8[n*rb]   the raw bytes of value i at ``i*rb .. i*rb+rb-1`` (rb = 1, or 3 for float32)
  table    uint32[4096]  packed slot table ``symbol | (freq - 1) << 8 | bias << 20``
Value ``i`` of the tensor lies in tile ``i // (L*S)``, at step ``(i % (L*S)) // L`` of lane ``i % L``.

The kernel gives every program ``block_lanes`` consecutive lanes (of one or several tiles; the lanes are
independent), one lane per vector element. Each step it gathers the table entry of every lane, updates
the states, renormalises from a word it prefetched at the previous step (a lane reads at most one word per
step), and writes one value per lane: the exponent joined with its raw bits, read ``unroll`` steps ahead.
No intermediate array is written: compressed bytes in, output bits out.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import rans_common as rc


def rans_float_kernel(
    words_ref,    # [W] uint16, whole array
    offsets_ref,  # [T*L] uint32, whole array
    states_ref,   # [T*L] uint32, whole array
    raw_ref,      # [n*rb] uint8, whole array
    table_ref,    # [4096] uint32, whole array
    out_ref,      # [n] uint16 | uint32 (the float bits), whole array; this program writes its lanes' values
    *, n: int, lanes: int, steps: int, dtype: str, block_lanes: int, unroll: int,
):
    total_lanes = states_ref.shape[0]
    last_word = words_ref.shape[0] - 1
    f = pl.program_id(0) * block_lanes + jnp.arange(block_lanes, dtype=jnp.int32)  # [B] flat lane ids
    live = f < total_lanes
    # Lanes past the end read lane 0 (masked writes need no valid address, but interpret mode's masked
    # scatter must not see two lanes at one address) and write past n, where nothing is written.
    fc = jnp.where(live, f, 0)
    x = states_ref[fc]
    ptr = offsets_ref[fc].astype(jnp.int32)
    word = words_ref[jnp.minimum(ptr, last_word)].astype(jnp.uint32)
    first = (f // lanes) * (lanes * steps) + f % lanes  # [B] index of each lane's value at step 0
    rb = rc.RAW_BYTES[dtype]

    def read_raw(k):  # [B] uint32 raw bits of step k (masked past the end)
        i = first + k * lanes
        ok = live & (i < n) & (k < steps)
        if rb == 1:
            return plgpu.load(raw_ref.at[i], mask=ok, other=0).astype(jnp.uint32)
        b = [plgpu.load(raw_ref.at[3 * i + c], mask=ok, other=0).astype(jnp.uint32) for c in range(3)]
        return b[0] | (b[1] << 8) | (b[2] << 16)

    def block(b, carry):  # `unroll` steps; raw bytes are loaded `unroll` steps before they are used
        x, ptr, word, raws = carry
        nxt = []
        for u in range(unroll):
            k = b * unroll + u
            entry = table_ref[(x & rc.SLOT_MASK).astype(jnp.int32)]
            sym, x = rc.rans_step(x, entry)
            x, need = rc.renormalise(x, word)
            ptr = ptr + need.astype(jnp.int32)
            word = plgpu.load(words_ref.at[jnp.minimum(ptr, last_word)], mask=need,
                              other=word.astype(jnp.uint16)).astype(jnp.uint32)
            i = first + k * lanes
            bits = rc.join_float(sym, raws[u], dtype).astype(out_ref.dtype)
            plgpu.store(out_ref.at[i], bits, mask=live & (i < n))
            nxt.append(read_raw(k + unroll))
        return x, ptr, word, tuple(nxt)

    raws = tuple(read_raw(u) for u in range(unroll))
    lax.fori_loop(0, steps // unroll, block, (x, ptr, word, raws))


def _check(words, offsets, states, raw, table, n, lanes, steps, dtype):
    if dtype not in rc.RAW_BYTES:
        raise ValueError(f"{dtype=} must be one of {', '.join(rc.RAW_BYTES)}")
    if not (1 <= lanes and 1 <= steps < 1 << 16):
        raise ValueError(f"{lanes=} must be >= 1 and {steps=} must be in [1, 65536)")
    t = max(1, -(-n // (lanes * steps)))
    if n < 1 or n * rc.RAW_BYTES[dtype] > rc.INT32_MAX or t * lanes * steps > rc.INT32_MAX:
        raise ValueError(f"{n=} must be >= 1 and its padded tiles and raw bytes must have < 2^31 elements")
    for name, a, dt, size in [("offsets", offsets, jnp.uint32, t * lanes), ("states", states, jnp.uint32, t * lanes),
                              ("raw", raw, jnp.uint8, n * rc.RAW_BYTES[dtype]), ("table", table, jnp.uint32, 4096)]:
        if a.dtype != dt or a.shape != (size,):
            raise ValueError(f"{name}={a.dtype}{list(a.shape)} must be {jnp.dtype(dt).name}[{size}]")
    if words.dtype != jnp.uint16 or words.ndim != 1 or not 1 <= words.shape[0] <= rc.INT32_MAX:
        raise ValueError(f"words={words.dtype}{list(words.shape)} must be uint16[W] with 1 <= W < 2^31")


@functools.partial(jax.jit, static_argnames=["n", "lanes", "steps", "dtype", "block_lanes", "unroll",
                                             "num_warps", "interpret"])
def rans_float_decode(words, offsets, states, raw, table, *, n: int, lanes: int, steps: int, dtype: str,
                      block_lanes: int = 128, unroll: int = 8, num_warps: int = 4,
                      interpret: bool = False) -> jax.Array:
    """Decode a ``bf16-lossless`` tensor to ``dtype[n]`` (flat) with the Pallas kernel; bit-exact.

    ``block_lanes`` lanes per program (a power of two), ``unroll`` steps per loop iteration (also how far
    ahead raw bytes are read; reduced to a divisor of ``steps``), ``num_warps`` warps per program.
    """
    _check(words, offsets, states, raw, table, n, lanes, steps, dtype)
    if block_lanes < 1 or block_lanes & (block_lanes - 1):
        raise ValueError(f"{block_lanes=} must be a power of two")
    if unroll < 1:
        raise ValueError(f"{unroll=} must be >= 1")
    rc.filter_triton_deprecation()
    unroll = math.gcd(unroll, steps)
    total_lanes = states.shape[0]
    kernel = functools.partial(rans_float_kernel, n=n, lanes=lanes, steps=steps, dtype=dtype,
                               block_lanes=block_lanes, unroll=unroll)
    bits = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n,), rc.BITS_DTYPE[dtype]),
        grid=(pl.cdiv(total_lanes, block_lanes),),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"rans_float_b{block_lanes}_u{unroll}_w{num_warps}",
    )(words, offsets, states, raw, table)
    return lax.bitcast_convert_type(bits, jnp.dtype(dtype))


# ----------------------------------------------------------------------------------------- reference
def rans_symbols_reference(words, offsets, states, table, *, n: int, lanes: int, steps: int) -> jax.Array:
    """All lanes' decoded symbols (uint32[n], symbol order) in pure jnp: a fori_loop over the steps,
    every lane at once; the exact inverse of ``jcodec.rans.encode``."""
    last_word = words.shape[0] - 1
    total_lanes = states.shape[0]

    def step(k, carry):
        x, ptr, out = carry
        sym, x = rc.rans_step(x, table[x & rc.SLOT_MASK])
        word = words[jnp.minimum(ptr, last_word)].astype(jnp.uint32)
        x, need = rc.renormalise(x, word)
        return x, ptr + need.astype(ptr.dtype), out.at[k].set(sym.astype(jnp.uint8))

    out = jnp.zeros((steps, total_lanes), jnp.uint8)
    _, _, out = lax.fori_loop(0, steps, step, (states, offsets, out))
    tiles = total_lanes // lanes
    # [steps, tiles*lanes] -> [tiles, steps, lanes] -> symbol order
    return out.reshape(steps, tiles, lanes).transpose(1, 0, 2).reshape(-1)[:n].astype(jnp.uint32)


@functools.partial(jax.jit, static_argnames=["n", "lanes", "steps", "dtype"])
def rans_float_reference(words, offsets, states, raw, table, *, n: int, lanes: int, steps: int,
                         dtype: str) -> jax.Array:
    """Pure-JAX ``bf16-lossless`` decoder (any backend); bit-exact with the kernel and with NumPy."""
    _check(words, offsets, states, raw, table, n, lanes, steps, dtype)
    sym = rans_symbols_reference(words, offsets, states, table, n=n, lanes=lanes, steps=steps)
    if rc.RAW_BYTES[dtype] == 1:
        r = raw.astype(jnp.uint32)
    else:
        r3 = raw.reshape(n, 3).astype(jnp.uint32)
        r = r3[:, 0] | (r3[:, 1] << 8) | (r3[:, 2] << 16)
    bits = rc.join_float(sym, r, dtype).astype(rc.BITS_DTYPE[dtype])
    return lax.bitcast_convert_type(bits, jnp.dtype(dtype))
