"""Decode fused into the matmul: ``y_i = x @ W_i[layer].T`` reading only W_i's resident (compressed) bytes.

Decode-then-matmul writes 2 B per weight and reads them again; this kernel decodes each weight tile in registers
where it multiplies it, so a batch-1 step reads ~0.70 of BF16's bytes. It follows ``stacked_matmul``: whole-array
refs, a traced layer index, several weights that share x in one launch, an M = 1 path that sums products
elementwise and an M >= 16 path on ``plgpu.dot``.

Layout read (jcodec/resident.py, every array with a leading layer axis L; a single matrix is a stack of 1):
  layer    int32[1]                     which layer of every stack (traced: the scan's counter)
  x        [Mp, Kp/32, 32]              the activations, zero-padded to whole blocks, 32 inputs a row of words
  planes   uint32[L, bits, Np, Kp/32]   code bit planes (escape: all ones)
  raw      uint8[L, Np, Kp/32, 32]      sign << 7 | mantissa
  base     uint8[L, Np/tn, Kp/tk]       a tile's first exponent; code c < 2**bits - 1 means base + c
  offsets  int32[L, T + 1]              a tile's escapes in ``escapes``
  escapes  uint8[L * E]                 escaped exponents, layer after layer (E each), flat for the gather
  y        [Mp, Np]                     out, float32 accumulation
A program owns one tile row (``tile_n`` rows of one weight: no atomics) for ``block_m`` rows of x and walks K a
tile (``tile_k``) at a time: the blocks are the layout's tiles. A tile's escapes are ranked without a scan over
its values: the AND of its planes marks escapes 32 weights a word, so a weight's rank is a popcount plus the
words before it; tiles without escapes skip that (a uniform branch).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jcodec.resident import WORD, Geometry

from .launch import filter_triton_deprecation, run_segment

MIN_BLOCK = 16  # plgpu.dot's least block side: M > 1 needs tile_n >= 16


def decode_tile(planes, raw, base, start, count, escapes_ref, escapes_at, escapes_len, *, bits: int):
    """One tile's bfloat16 values [tn, G, 32] from its planes [bits, tn, G] (uint32), raw bytes [tn, G, 32]
    (uint8), base (int32), and its escapes: ``count`` of them from ``escapes_ref[escapes_at + start]`` on (reads
    clamped to the layer's ``escapes_len``, whatever the bytes say)."""
    lane = lax.broadcasted_iota(jnp.uint32, (1, 1, WORD), 2)
    codes = sum(((planes[p][:, :, None] >> lane) & 1) << p for p in range(bits))  # [tn, G, 32]
    exps = codes.astype(jnp.int32) + base
    marks = functools.reduce(jnp.bitwise_and, [planes[p] for p in range(bits)])   # [tn, G]: escapes, 32 a word

    def with_escapes(exps):
        words = lax.bitcast_convert_type(marks, jnp.int32)
        per_word = lax.population_count(words)                                    # [tn, G]
        in_row = jnp.cumsum(per_word, axis=1)
        rows = in_row[:, -1]
        word_start = (jnp.cumsum(rows) - rows)[:, None] + in_row - per_word        # escapes before the word
        below = lax.bitcast_convert_type(marks[:, :, None] & ((jnp.uint32(1) << lane) - 1), jnp.int32)
        rank = word_start[:, :, None] + lax.population_count(below)               # [tn, G, 32]
        escaped = ((marks[:, :, None] >> lane) & 1) == 1
        at = escapes_at + jnp.clip(start + rank, 0, escapes_len - 1)
        return jnp.where(escaped, escapes_ref[at].astype(jnp.int32), exps)

    exps = lax.cond(count > 0, with_escapes, lambda e: e, exps)
    r = raw.astype(jnp.int32)
    bits16 = ((r & 0x80) << 8) | (exps << 7) | (r & 0x7F)
    return lax.bitcast_convert_type(bits16.astype(jnp.uint16), jnp.bfloat16)


def fused_matmul_kernel(layer_ref, x_ref, *refs, geometries, starts, block_m: int):
    """One program: tile row ``pl.program_id(0) - starts[i]`` of weight i for rows ``pl.program_id(1) *
    block_m ..`` of x. refs: per weight its planes, raw, base, offsets and escapes refs, then the outputs."""
    count = len(geometries)
    w_refs, y_refs = [refs[5 * i:5 * i + 5] for i in range(count)], refs[5 * count:]
    pid = pl.program_id(0)
    m0 = pl.program_id(1) * block_m
    layer = layer_ref[0]

    def branch(i):
        def run():
            fused_block(x_ref, *w_refs[i], y_refs[i], layer, pid - starts[i], m0, g=geometries[i],
                        block_m=block_m)
        return run

    run_segment(pid, starts, branch)


def fused_block(x_ref, planes_ref, raw_ref, base_ref, offsets_ref, escapes_ref, y_ref, layer, row_tile, m0, *,
                g: Geometry, block_m: int):
    """y[m0:m0+block_m, tile row] = x[m0:..] @ W[layer][tile row].T, decoding W tile by tile."""
    tn, tk = g.tile_n, g.tile_k
    G = tk // WORD
    tiles_k = g.tiles[1]
    n0 = pl.multiple_of(row_tile * tn, tn)
    rows, cols = pl.ds(m0, block_m), pl.ds(n0, tn)
    escapes_len = escapes_ref.shape[0] // planes_ref.shape[0]
    escapes_at = layer * escapes_len

    def tile(j):  # [tn, G, 32] bfloat16
        words = pl.ds(pl.multiple_of(j * G, G), G)
        t = row_tile * tiles_k + j
        start = offsets_ref[layer, t]
        return decode_tile(planes_ref[layer, :, cols, words], raw_ref[layer, cols, words, :],
                           base_ref[layer, row_tile, j].astype(jnp.int32), start, offsets_ref[layer, t + 1] - start,
                           escapes_ref, escapes_at, escapes_len, bits=g.bits)

    def x_block(j):  # [block_m, G, 32]
        return x_ref[rows, pl.ds(pl.multiple_of(j * G, G), G), :]

    if block_m == 1:  # a matrix-vector product: products summed elementwise, one reduction at the end
        def body(j, acc):  # acc [tn, G, 32] float32
            return acc + x_block(j).astype(jnp.float32) * tile(j).astype(jnp.float32)
        acc = lax.fori_loop(0, tiles_k, body, jnp.zeros((tn, G, WORD), jnp.float32))
        y = jnp.sum(jnp.sum(acc, axis=2), axis=1)[None, :]                                 # [1, tn]
    else:
        def body(j, acc):  # acc [block_m, tn] float32
            x = x_block(j).reshape(block_m, tk)
            return acc + plgpu.dot(x, tile(j).reshape(tn, tk).astype(x.dtype), trans_b=True)
        y = lax.fori_loop(0, tiles_k, body, jnp.zeros((block_m, tn), jnp.float32))
    y_ref[rows, cols] = y.astype(y_ref.dtype)


def fused_matmul_call(layer, x, geometries, weights, *, out_dtype, block_m: int, num_warps: int, num_stages: int,
                      interpret: bool):
    """The ``pallas_call``: x [Mp, Kp/32, 32] times each resident weight; returns the [Mp, Np_i] outputs."""
    M = x.shape[0]
    starts = [0]
    for g in geometries:
        starts.append(starts[-1] + g.tiles[0])
    filter_triton_deprecation()
    kernel = functools.partial(fused_matmul_kernel, geometries=tuple(geometries), starts=tuple(starts),
                               block_m=block_m)
    tn, tk = geometries[0].tile_n, geometries[0].tile_k
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((M, g.padded[0]), out_dtype) for g in geometries],
        grid=(starts[-1], M // block_m),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"fused_matmul_b{geometries[0].bits}_m{block_m}_n{tn}_k{tk}_w{num_warps}_s{num_stages}",
    )(layer, x, *[a for w in weights for a in w])


def as_stack(g: Geometry, arrays) -> tuple:
    """One weight's arrays as the kernel reads them (module docstring): a leading layer axis, raw in words."""
    stacked = arrays["planes"].ndim == 4
    a = {k: jnp.asarray(v) if stacked else jnp.asarray(v)[None] for k, v in arrays.items()}
    L = a["planes"].shape[0]
    Np, Kp = g.padded
    return (a["planes"], a["raw"].reshape(L, Np, Kp // WORD, WORD), a["base"], a["offsets"],
            a["escapes"].reshape(-1))


def check_weights(x, weights, layer):
    if x.ndim != 2 or not weights:
        raise ValueError(f"x={x.dtype}{list(x.shape)} must be [M, K], with at least one weight")
    geometries = [g for g, _ in weights]
    if any(g.shape[1] != x.shape[1] or (g.tile_k, g.bits) != (geometries[0].tile_k, geometries[0].bits)
           for g in geometries):
        raise ValueError(f"weights {geometries} must all have K={x.shape[1]} and one tile_k and bits")
    stacked = {a["planes"].ndim for _, a in weights}
    if stacked not in ({3}, {4}):
        raise ValueError(f"weights must be all single matrices or all stacks, got plane ranks {stacked}")
    if stacked == {4} and (layer is None or jnp.shape(layer) != ()):
        raise ValueError(f"{layer=} must be an int32 scalar for stacked weights")
    return geometries


@functools.partial(jax.jit, static_argnames=["geometries", "out_dtype", "block_m", "num_warps", "num_stages",
                                             "interpret"])
def _fused_matmul(x, arrays, layer, *, geometries, out_dtype, block_m, num_warps, num_stages, interpret):
    M, K = x.shape
    Kp = geometries[0].padded[1]
    rows = -(-M // block_m) * block_m
    xp = jnp.pad(x, ((0, rows - M), (0, Kp - K))).reshape(rows, Kp // WORD, WORD)
    stacks = [as_stack(g, a) for g, a in zip(geometries, arrays)]
    index = jnp.clip(jnp.asarray(layer, jnp.int32), 0, stacks[0][0].shape[0] - 1).reshape(1)
    outs = fused_matmul_call(index, xp, geometries, stacks, out_dtype=out_dtype, block_m=block_m,
                             num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return [y[:M, :g.shape[0]] for y, g in zip(outs, geometries)]


def fused_matmul(x, weights, layer=None, *, out_dtype=None, block_m: int | None = None, num_warps: int = 4,
                 num_stages: int = 3, interpret: bool = False) -> list[jax.Array]:
    """``[x @ W[layer].T for W in weights]`` with each W resident (``(Geometry, arrays)`` from
    ``jcodec.resident.encode``, or ``resident.stack`` with ``layer`` an int32 scalar, traced welcome).

    ``x``: [M, K] bfloat16; results [M, N_i] in ``out_dtype`` (default x's dtype), float32 accumulation. The
    blocks along N and K are the layout's tiles; ``block_m``: 1 (M = 1: products summed on the CUDA cores) or a
    power of two >= 16 (``plgpu.dot``, which needs tile_n >= 16); None: 1 for M = 1, else 16 .. 64.
    """
    weights = tuple(weights)
    geometries = check_weights(x, weights, layer)
    M = x.shape[0]
    block_m = block_m or (1 if M == 1 else min(64, max(MIN_BLOCK, pl.next_power_of_2(M))))
    if not (block_m == 1 == M or (block_m >= MIN_BLOCK and block_m & (block_m - 1) == 0)):
        raise ValueError(f"{block_m=} must be 1 (for M=1) or a power of two >= {MIN_BLOCK}")
    if block_m > 1 and any(g.tile_n < MIN_BLOCK for g in geometries):
        raise ValueError(f"tile_n {[g.tile_n for g in geometries]} must be >= {MIN_BLOCK} for M={M} > 1")
    return _fused_matmul(x, [a for _, a in weights], jnp.int32(0) if layer is None else layer,
                         geometries=tuple(geometries), out_dtype=jnp.dtype(out_dtype or x.dtype), block_m=block_m,
                         num_warps=num_warps, num_stages=num_stages, interpret=interpret)


# ----------------------------------------------------------------------------------------- reference
def decode_reference(g: Geometry, arrays) -> jax.Array:
    """Plain jnp: one resident matrix (2-D arrays, no layer axis) -> bfloat16 [N, K], bit for bit."""
    Np, Kp = g.padded
    (tiles_n, tiles_k), tn, tk = g.tiles, g.tile_n, g.tile_k
    lane = jnp.arange(WORD, dtype=jnp.uint32)
    planes = jnp.asarray(arrays["planes"])
    codes = sum(((planes[p][:, :, None] >> lane) & 1) << p for p in range(g.bits)).reshape(Np, Kp)
    tiled = codes.astype(jnp.int32).reshape(tiles_n, tn, tiles_k, tk).transpose(0, 2, 1, 3).reshape(-1, tn * tk)
    escaped = tiled == g.escape
    rank = jnp.cumsum(escaped.reshape(-1)).reshape(tiled.shape) - 1  # escapes in tile order, row-major inside
    esc = jnp.asarray(arrays["escapes"])[jnp.clip(rank, 0, arrays["escapes"].shape[0] - 1)].astype(jnp.int32)
    exps = jnp.where(escaped, esc, tiled + jnp.asarray(arrays["base"]).reshape(-1, 1).astype(jnp.int32))
    exps = exps.reshape(tiles_n, tiles_k, tn, tk).transpose(0, 2, 1, 3).reshape(Np, Kp)
    r = jnp.asarray(arrays["raw"]).astype(jnp.int32)
    bits16 = (((r & 0x80) << 8) | (exps << 7) | (r & 0x7F)).astype(jnp.uint16)
    return lax.bitcast_convert_type(bits16, jnp.bfloat16)[:g.shape[0], :g.shape[1]]


def fused_matmul_reference(x, weights, layer=None, *, out_dtype=None) -> list[jax.Array]:
    """Plain jnp: decode each weight (its ``layer`` for stacks), then ``x @ W.T`` in float32."""
    out_dtype = out_dtype or x.dtype
    outs = []
    for g, a in weights:
        one = a if a["planes"].ndim == 3 else {k: v[layer] for k, v in a.items()}
        outs.append(jnp.einsum("mk,nk->mn", x, decode_reference(g, one),
                               preferred_element_type=jnp.float32).astype(out_dtype))
    return outs
