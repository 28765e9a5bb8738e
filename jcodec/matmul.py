"""The forward's matmuls: ``x @ w.T`` for every kind of weight the decode schedule hands the model.

A weight reaches the model as a plain array, as a :class:`LayerOf` (one layer of a stack, not sliced out), or as
a ``CompressedTensor`` (decoded here). :func:`linear` multiplies x by several weights that share it (q/k/v,
gate/up) and picks how:
- on a GPU, for few rows of x (a decode step: batch x tokens <= ``KERNEL_MAX_ROWS``), the Pallas kernel
  ``stacked_matmul``, which reads a layer in place from its stack and takes all the weights in one launch. XLA's
  library matmul needs its operand as a buffer of its own, so inside the layer scan it would copy each layer's
  weights out of the stack first: 3 weight-sized memory passes where 1 is needed (bench/matmul.py);
- otherwise XLA (:func:`contract`): prefill and large batches, which are compute bound, and every CPU run.
Results do not depend on how a weight is held (a layer read in place, decoded from a compressed stack, or an
array): the same kernel, blocks and order of summation, so plain and compressed params give bitwise equal logits.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jcodec.pallas_kernels import stacked_matmul as sm
from jcodec.tensor import materialize

KERNEL_MAX_ROWS = 64  # rows of x up to which the Pallas kernel runs on a GPU (decode steps); above, XLA
BACKEND = None  # None: "pallas" on a GPU, else "xla"; "interpret": the kernel in interpret mode (CPU tests)


@struct.dataclass
class LayerOf:
    """Layer ``index`` of ``stack`` [L, ...], standing in for ``stack[index]`` without slicing it out."""

    stack: Any   # [L, ...] a jax.Array
    index: Any   # [] int32, traced


def dense_weight(w):
    """The weight as one dense array: a stack's layer sliced out, a compressed tensor decoded."""
    if isinstance(w, LayerOf):
        return w.stack[w.index]
    return materialize(w)


def at_least_f32(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def precision(dtype):
    """Float32 compute means float32 matmuls: on GPU the default would use TF32 (10-bit mantissas)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


def contract(x, w, dtype, out_dtype=None):
    """x [..., in] @ w[out, in].T in ``dtype`` with XLA (``out_dtype``: the accumulator's, as
    ``preferred_element_type``).

    In float32 the input axis is summed in blocks of 192 and the block sums added in order, as torch's CPU
    matmul (MKL sgemm) does; XLA:CPU's dot over 192 inputs rounds as MKL's does within a block, so our
    float32 matmuls equal transformers' bit for bit (seen for 12 rows or more, and multiples of 4; below 12,
    the rows past a multiple of 4 differ). One long XLA:CPU dot rounds about twice as much (576 inputs:
    3.9e-6 from float64, torch 1.9e-6): on SmolLM2 it put our logits 0.5-1.8e-4 from transformers'.
    Other dtypes (bfloat16 on accelerators) keep one dot.
    """
    block = 192
    n = x.shape[-1]

    def dot(a, b):
        return jnp.einsum("...i,oi->...o", a, b, precision=precision(dtype), preferred_element_type=out_dtype)

    if jnp.dtype(dtype) != jnp.float32 or n <= block:
        return dot(x, w)
    out = None
    for a in range(0, n, block):
        part = dot(x[..., a:a + block], w[:, a:a + block])
        out = part if out is None else out + part
    return out


def kernel_weights(weights, dtype):
    """(stacks, index) for the Pallas kernel when every weight is a layer of a stack (one index for all) or every
    one a matrix, all in ``dtype``; None otherwise."""
    if all(isinstance(w, LayerOf) and w.stack.ndim == 3 for w in weights):
        index = weights[0].index
        if any(w.index is not index for w in weights):
            return None
        stacks = [w.stack for w in weights]
    elif all(isinstance(w, jax.Array) and w.ndim == 2 for w in weights):
        stacks, index = list(weights), None
    else:
        return None
    return (stacks, index) if all(s.dtype == dtype for s in stacks) else None


def choose_backend(backend: str | None) -> str:
    backend = backend or BACKEND or ("pallas" if jax.default_backend() == "gpu" else "xla")
    if backend not in ("pallas", "interpret", "xla"):
        raise ValueError(f"{backend=} must be 'pallas', 'interpret' or 'xla'")
    return backend


def kernel_plan(x, weights, dtype, backend: str | None = None):
    """(stacks, index) when :func:`linear` multiplies x by ``weights`` with the Pallas kernel; None when XLA."""
    backend = choose_backend(backend)
    rows, C = math.prod(x.shape[:-1]), x.shape[-1]
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)  # float32 compute stays on XLA (full precision)
    if backend == "xla" or not half or rows > KERNEL_MAX_ROWS:
        return None
    held = kernel_weights(weights, jnp.dtype(dtype))
    return held if held is not None and sm.fits(rows, [w.shape[-2] for w in held[0]], C) else None


def reads_in_place(x, weights, dtype, backend: str | None = None) -> bool:
    """Whether :func:`linear` multiplies x by ``weights`` with the kernel, reading them where they lie."""
    return kernel_plan(x, list(weights), dtype, backend) is not None


def linear(x, weights, dtype, out_dtype=None, *, backend: str | None = None) -> list:
    """``[x @ w.T for w in weights]``: x [..., C] in ``dtype``, each w [N_i, C] (an array, a :class:`LayerOf` or
    a CompressedTensor); results [..., N_i] in ``out_dtype`` (default ``dtype``). ``backend``: "pallas" (the
    stacked kernel where it applies), "interpret" (the same in interpret mode) or "xla"; None: :data:`BACKEND`.
    Weights the kernel cannot take together (layers at different indices) are multiplied one at a time."""
    weights = list(weights)
    out_dtype = jnp.dtype(out_dtype or dtype)
    plan = kernel_plan(x, weights, dtype, backend)
    if plan is not None:
        stacks, index = plan
        rows, C = math.prod(x.shape[:-1]), x.shape[-1]
        ys = sm.stacked_matmul(x.reshape(rows, C).astype(dtype), stacks, index, out_dtype=out_dtype,
                               interpret=choose_backend(backend) == "interpret")
        return [y.reshape(x.shape[:-1] + (y.shape[-1],)) for y in ys]
    if len(weights) > 1 and any(kernel_plan(x, [w], dtype, backend) for w in weights):
        return [linear(x, [w], dtype, out_dtype, backend=backend)[0] for w in weights]
    accumulate = None if out_dtype == jnp.dtype(dtype) else out_dtype
    return [contract(x, dense_weight(w).astype(dtype), dtype, accumulate).astype(out_dtype) for w in weights]
