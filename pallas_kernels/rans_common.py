"""Backend-free rANS decoding maths shared by the Pallas kernels and the pure-JAX references.

Every function here is plain ``jnp`` on arrays of any shape, so the same lines run inside a Pallas
(Triton) kernel, under XLA, and in interpret mode. The constants mirror :mod:`jcodec.rans`: 32-bit
states in [2^16, 2^32), 16-bit renormalisation words, 12-bit probabilities, and the packed slot table
``symbol | (freq - 1) << 8 | bias << 20`` (one uint32 per probability slot).
"""
from __future__ import annotations

import functools
import warnings

import jax.numpy as jnp

PROB_BITS = 12
SLOT_MASK = (1 << PROB_BITS) - 1
WORD_BITS = 16
STATE_LOW = 1 << 16
TABLE_SIZE = 1 << PROB_BITS

# raw bytes per value and the unsigned container of each float codec dtype
RAW_BYTES = {"bfloat16": 1, "float16": 1, "float32": 3}
BITS_DTYPE = {"bfloat16": jnp.uint16, "float16": jnp.uint16, "float32": jnp.uint32}
INT32_MAX = (1 << 31) - 1


def rans_step(x, entry):
    """One decode step before renormalisation: ``(symbol, next state)``.

    ``x`` uint32 states, ``entry`` the packed table entries at ``x & 4095`` (uint32). The next state is
    ``freq * (x >> 12) + bias``; it needs a word when it falls below 2^16.
    """
    sym = entry & 0xFF
    freq = ((entry >> 8) & SLOT_MASK) + 1
    x = freq * (x >> PROB_BITS) + (entry >> 20)
    return sym, x


def renormalise(x, word):
    """``(state, need)``: shift the 16-bit ``word`` (uint32) in where the state fell below 2^16."""
    need = x < STATE_LOW
    return jnp.where(need, (x << WORD_BITS) | word, x), need


def join_float(sym, raw, dtype: str):
    """Symbol (exponent byte, uint32) and raw bits (uint32) -> the float's bit pattern (uint32).

    ``raw`` is the raw byte for bfloat16/float16 and the 24-bit little-endian value of the three raw
    bytes for float32 (see ``jcodec.codecs.split_float``).
    """
    if dtype == "bfloat16":  # raw = s mmmmmmm
        return ((raw & 0x80) << 8) | (sym << 7) | (raw & 0x7F)
    if dtype == "float16":  # symbol = high byte
        return (sym << 8) | raw
    if dtype == "float32":  # raw = s + 23 mantissa bits
        return ((raw & 0x800000) << 8) | (sym << 23) | (raw & 0x7FFFFF)
    raise ValueError(f"{dtype=} must be one of bfloat16, float16, float32")


def left_unpredict(r, carry, reset, base_of):
    """Inverse of the left predictor over one row of residuals, mod 256 (int32 in, int32 out).

    ``r`` int32 residuals in symbol order along the last axis; ``carry`` the value before the first
    element (0 at a tile start); ``reset[j]`` marks elements whose left neighbour is not used (row or tile
    start). ``base_of(cs_excl)`` returns, per element, ``cs_excl`` at the last reset at or before it (0
    where there is none): how it moves values across lanes is the caller's (a gather, or memory).
    Returns the decoded values (0..255) of the row.
    """
    cs = carry + jnp.cumsum(r, axis=-1)  # non-decreasing
    cs_excl = jnp.where(reset, cs - r, 0)
    return (cs - base_of(cs_excl)) & 0xFF


# jax 0.11 warns at every lowering of a Triton-backend pallas_call; these kernels use that backend on
# purpose (DESIGN.md, "The Pallas backend"). The warning is raised when the enclosing jit lowers, which can
# be after our function returned, so it is filtered by its exact text, once, when a kernel is first used.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated and will be removed in a future JAX version"


@functools.cache
def filter_triton_deprecation() -> None:
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
