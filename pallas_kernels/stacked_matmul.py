"""Skinny matmuls that read their weights in place from a stack of layers: ``y_i = x @ w_i[layer].T``.

At batch 1-64 a decode step is a chain of matrix-vector products whose cost is reading the weights. The
weights of all layers sit in one ``[L, N, K]`` array (the forward is a ``lax.scan`` over layers); a library
matmul inside the scan needs its operand as a buffer of its own, so XLA copies each layer's weights out of the
stack before multiplying (2 bytes read and written, then read again, per weight). This kernel reads the layer
straight from the stack, and multiplies several weights that share an input (q/k/v, gate/up) in one launch.

Layout read:
  layer  int32[1]         which layer of every stacked weight (a traced value: the scan's counter)
  x      [M, K]           the activations (M padded by the wrapper: 1 stays 1, else a power of two >= 16)
  w_i    [L, N_i, K] | [N_i, K]   each weight in HF's [out, in] layout, a stack or a single matrix
  y_i    [M, N_i]         out, ``out_dtype`` (float32 accumulation)
One program computes ``block_n`` output columns of one weight for ``block_m`` rows of x, walking K in blocks of
``block_k``: for M = 1 it accumulates products elementwise and reduces once at the end (no tensor cores: the
step is memory bound), for M >= 16 it uses ``plgpu.dot``. Programs ``starts[i] .. starts[i+1]`` serve weight i.
Sizes must be whole blocks (N_i and K multiples of the block sizes, which are powers of two); the wrapper picks
blocks that divide them and raises ValueError when none does.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .launch import filter_triton_deprecation, run_segment

MAX_BLOCK_M = 64      # rows of x a program takes: beyond it, more programs along M
MIN_BLOCK = 16        # plgpu.dot's least block side, and the least block_k
BLOCK_K = 512         # default block sizes (bench/matmul.py sweeps them on the GPU)
BLOCK_N_VECTOR = 16   # M = 1
BLOCK_N_DOT = 32      # M >= 16


def stacked_matmul_kernel(layer_ref, x_ref, *refs, starts, block_m: int, block_n: int, block_k: int):
    """One program: ``block_n`` columns of weight i (the segment of ``pl.program_id(0)``) for rows
    ``pl.program_id(1) * block_m ..`` of x.

    layer_ref: [1] int32; x_ref: [M, K]; refs: the weights ([L, N_i, K] or [N_i, K]) then the outputs
    ([M, N_i]), whole arrays (each program slices its blocks: a stack's layer is not known at launch)."""
    count = len(starts) - 1
    w_refs, y_refs = refs[:count], refs[count:]
    pid = pl.program_id(0)
    m0 = pl.program_id(1) * block_m
    layer = layer_ref[0]

    def branch(i):
        def run():
            n0 = pl.multiple_of((pid - starts[i]) * block_n, block_n)
            matmul_block(x_ref, w_refs[i], y_refs[i], layer, m0, n0, block_m=block_m, block_n=block_n,
                         block_k=block_k)
        return run

    run_segment(pid, starts, branch)


def matmul_block(x_ref, w_ref, y_ref, layer, m0, n0, *, block_m: int, block_n: int, block_k: int):
    """y[m0:m0+block_m, n0:n0+block_n] = x[m0:.., :] @ w[layer][n0:.., :].T, float32 accumulation."""
    K = x_ref.shape[1]
    rows = pl.ds(m0, block_m)
    cols = pl.ds(n0, block_n)

    def w_block(k0):  # [block_n, block_k]
        ks = pl.ds(k0, block_k)
        return w_ref[layer, cols, ks] if len(w_ref.shape) == 3 else w_ref[cols, ks]

    if block_m == 1:  # a matrix-vector product: products summed elementwise, one reduction at the end
        def body(j, acc):  # acc [block_n, block_k] float32
            k0 = pl.multiple_of(j * block_k, block_k)
            x = x_ref[rows, pl.ds(k0, block_k)].astype(jnp.float32)  # [1, block_k]
            return acc + x * w_block(k0).astype(jnp.float32)
        acc = lax.fori_loop(0, K // block_k, body, jnp.zeros((block_n, block_k), jnp.float32))
        y = jnp.sum(acc, axis=1)[None, :]                               # [1, block_n]
    else:
        def body(j, acc):  # acc [block_m, block_n] float32
            k0 = pl.multiple_of(j * block_k, block_k)
            x = x_ref[rows, pl.ds(k0, block_k)]                          # [block_m, block_k]
            return acc + plgpu.dot(x, w_block(k0), trans_b=True)
        y = lax.fori_loop(0, K // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    y_ref[rows, cols] = y.astype(y_ref.dtype)


def stacked_matmul_call(layer, x, weights, *, out_dtype, block_m: int, block_n: int, block_k: int,
                        num_warps: int, num_stages: int, interpret: bool):
    """The ``pallas_call``: x [M, K] (M a multiple of ``block_m``) times each weight; returns the outputs."""
    M = x.shape[0]
    sizes = [w.shape[-2] for w in weights]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n // block_n)
    filter_triton_deprecation()
    kernel = functools.partial(stacked_matmul_kernel, starts=tuple(starts), block_m=block_m, block_n=block_n,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((M, n), out_dtype) for n in sizes],
        grid=(starts[-1], M // block_m),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"stacked_matmul_m{block_m}_n{block_n}_k{block_k}_w{num_warps}_s{num_stages}",
    )(layer, x, *weights)


def pick_block(size: int, largest: int, least: int = 1) -> int | None:
    """The largest power of two in [least, largest] that divides ``size``; None if there is none."""
    b = largest
    while b >= least:
        if size % b == 0:
            return b
        b //= 2
    return None


def default_blocks(m: int, sizes, k: int) -> tuple[int, int, int] | None:
    """(block_m, block_n, block_k) for x [m, k] and outputs of ``sizes`` columns; None if no blocks fit.

    ``block_n`` depends on m alone wherever it divides the sizes: then a column's arithmetic (and its bits) is
    the same whichever rows of a weight a launch covers, so a head multiplied whole and one decoded and
    multiplied in chunks give equal logits."""
    block_m = 1 if m == 1 else min(MAX_BLOCK_M, max(MIN_BLOCK, pl.next_power_of_2(m)))
    block_k = pick_block(k, BLOCK_K, MIN_BLOCK)
    block_n = pick_block(math.gcd(*sizes), BLOCK_N_VECTOR if block_m == 1 else BLOCK_N_DOT,
                         1 if block_m == 1 else MIN_BLOCK)
    return None if block_k is None or block_n is None else (block_m, block_n, block_k)


def fits(m: int, sizes, k: int) -> bool:
    """Whether :func:`stacked_matmul` takes these shapes with its default blocks."""
    return default_blocks(m, sizes, k) is not None


@functools.partial(jax.jit, static_argnames=["out_dtype", "block_m", "block_n", "block_k", "num_warps",
                                             "num_stages", "interpret"])
def stacked_matmul(x, weights, layer=None, *, out_dtype=None, block_m: int | None = None,
                   block_n: int | None = None, block_k: int | None = None, num_warps: int = 4,
                   num_stages: int = 3, interpret: bool = False) -> list[jax.Array]:
    """``[x @ w[layer].T for w in weights]`` (or ``x @ w.T`` for 2-D weights), reading each layer in place.

    ``x``: [M, K]; ``weights``: a sequence of [L, N_i, K] stacks (with ``layer``, an int32 scalar, traced
    welcome; clamped to the stack as an index would be) or [N_i, K] matrices, all of x's dtype. Returns
    [M, N_i] per weight in ``out_dtype`` (default x's dtype), accumulated in float32. ``block_n``, ``block_k``
    (powers of two dividing every N_i and K; None: :func:`default_blocks`), ``num_warps`` and ``num_stages``
    are the launch's; M is padded to a multiple of ``block_m`` (1: products reduced on the CUDA cores, for M = 1
    only; or a power of two >= 16: ``plgpu.dot``; None: 1 for M = 1).
    """
    weights = tuple(weights)
    if x.ndim != 2 or not weights:
        raise ValueError(f"x={x.dtype}{list(x.shape)} must be [M, K], with at least one weight")
    M, K = x.shape
    stacked = {w.ndim for w in weights}
    if stacked not in ({2}, {3}) or any(w.shape[-1] != K or w.dtype != x.dtype for w in weights):
        raise ValueError(f"weights {[f'{w.dtype}{list(w.shape)}' for w in weights]} must all be [L, N, {K}] "
                         f"or all [N, {K}], of x's dtype {x.dtype}")
    if stacked == {3} and (layer is None or jnp.shape(layer) != ()):
        raise ValueError(f"{layer=} must be an int32 scalar for stacked weights")
    sizes = [w.shape[-2] for w in weights]
    blocks = default_blocks(M, sizes, K)
    if blocks is None:
        raise ValueError(f"no power-of-two blocks divide K={K} and N={sizes} (K needs >= {MIN_BLOCK})")
    block_m0, block_n0, block_k0 = blocks
    block_m, block_n, block_k = block_m or block_m0, block_n or block_n0, block_k or block_k0
    if not (block_m == 1 == M or (block_m >= MIN_BLOCK and block_m & (block_m - 1) == 0)):
        raise ValueError(f"{block_m=} must be 1 (for M=1) or a power of two >= {MIN_BLOCK}")
    if K % block_k or any(n % block_n for n in sizes) or block_k < MIN_BLOCK \
            or (block_m > 1 and block_n < MIN_BLOCK):
        raise ValueError(f"{block_n=} and {block_k=} must divide N={sizes} and K={K} "
                         f"(block_k >= {MIN_BLOCK}; block_n >= {MIN_BLOCK} when M > 1)")
    rows = -(-M // block_m) * block_m
    xp = x if rows == M else jnp.pad(x, ((0, rows - M), (0, 0)))
    index = jnp.zeros((1,), jnp.int32) if layer is None else jnp.clip(
        jnp.asarray(layer, jnp.int32), 0, weights[0].shape[0] - 1).reshape(1)
    outs = stacked_matmul_call(index, xp, weights, out_dtype=jnp.dtype(out_dtype or x.dtype), block_m=block_m,
                               block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                               interpret=interpret)
    return [y[:M] for y in outs]


# ----------------------------------------------------------------------------------------- reference
def stacked_matmul_reference(x, weights, layer=None, *, out_dtype=None) -> list[jax.Array]:
    """Plain jnp: ``x @ w[layer].T`` per weight, float32 accumulation, cast to ``out_dtype``."""
    out_dtype = out_dtype or x.dtype
    return [jnp.einsum("mk,nk->mn", x, w if w.ndim == 2 else w[layer], preferred_element_type=jnp.float32)
            .astype(out_dtype) for w in weights]
