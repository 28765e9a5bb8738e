"""Backend-free rANS decoding maths shared by the Pallas kernels and the pure-JAX references.

Every function here is plain ``jnp`` on arrays of any shape, so the same lines run inside a Pallas
(Triton) kernel, under XLA, and in interpret mode. The constants mirror :mod:`jcodec.rans`: 32-bit
states in [2^16, 2^32), 16-bit renormalisation words, 12-bit probabilities, and the packed slot table
``cum | symbol << 12 | (freq - 1) << 20`` (one uint32 per probability slot).
"""
from __future__ import annotations

import jax.numpy as jnp

PROB_BITS = 12
SLOT_MASK = (1 << PROB_BITS) - 1
WORD_BITS = 16
STATE_LOW = 1 << 16
TABLE_SIZE = 1 << PROB_BITS

# raw bytes per value and the unsigned container of each float codec dtype. With pair symbols (bfloat16 only,
# jcodec.codecs.encode_pairs) a symbol is two values: their raw bytes one uint16, their bits one uint32 (the
# first value in the low half); see raw_bytes and bits_dtype
RAW_BYTES = {"bfloat16": 1, "float16": 1, "float32": 3}
BITS_DTYPE = {"bfloat16": jnp.uint16, "float16": jnp.uint16, "float32": jnp.uint32}
PAIR_RAW_BYTES = 2
ESC = 255  # jcodec.rans.ESC: the pair symbol followed by 16 bypass bits
PAIR_TABLE = 256  # pair symbols: entries after the slot (and coarse) table, ``e1 << 7 | e2 << 23`` per symbol
INT32_MAX = (1 << 31) - 1


def rans_step(x, entry, sym=None):
    """One decode step before renormalisation: ``(symbol, next state)``.

    ``x`` uint32 states, ``entry`` the packed table entries at ``x & 4095`` (uint32), or with ``sym`` given
    (the symbol layout's lookup) ``cum | (freq - 1) << 20``. The next state is
    ``freq * (x >> 12) + (x & 4095) - cum``; it needs a word when it falls below 2^16.
    """
    if sym is None:
        sym = (entry >> 12) & 0xFF
    freq = (entry >> 20) + 1
    x = freq * (x >> PROB_BITS) + (x & SLOT_MASK) - (entry & SLOT_MASK)
    return sym, x


# Two-level slot lookup. A warp's 32 lanes gather 32 random slots of the 16 KiB slot table: ~30 distinct
# cache lines, one L1 wavefront each, every step. Most slots lie in buckets of 2^COARSE_BITS slots that hold
# a single symbol, so a 128-entry coarse table (512 B, 4 lines) answers them; only lanes whose bucket is
# MIXED (a symbol boundary inside it) then read the full table.
COARSE_BITS = 5
COARSE_SIZE = TABLE_SIZE >> COARSE_BITS
MIXED = 0xFFFFFFFF


# Lookup by symbol (``coarse_bits`` = :data:`BY_SYMBOL`): the packed table's 16 KiB split in two, after the
# slot table. A warp's 32 slots gather from a slot -> symbol table of uint8s packed four to a uint32 (4 KiB, 32
# lines: ~20 distinct lines for 32 random slots, against ~29 of the packed table's 128), then each lane's symbol
# gathers ``cum | (freq - 1) << 20`` from a 256-entry table where the frequent symbols share a few lines. Two
# dependent loads a step over fewer cache lines: int8's layer launch (~50 warps per SM) decodes 12-14% faster
# with it (H100, bench/decode.py); int8's lone matrix, latency-bound at 13 warps per SM, is fastest with the
# full table's one load; exponents (one a symbol, or pairs) are faster with the packed lookups.
SYMBOL_SLOTS = TABLE_SIZE // 4
SYMBOLS = 256
SYMBOL_TABLE = SYMBOL_SLOTS + SYMBOLS
BY_SYMBOL = -1


def symbol_table(table, xp=jnp):
    """The packed slot table (uint32[4096]) in the symbol layout, uint32[1280]: the slots' symbols four to a
    word (slot ``s`` in byte ``s & 3`` of word ``s >> 2``), then per symbol ``cum | (freq - 1) << 20`` (0 for
    symbols with no slot). Works on NumPy (``xp=np``) and JAX arrays."""
    sym = (table >> 12) & 0xFF
    quads = sym.reshape(-1, 4).astype(xp.uint32)
    slots = quads[:, 0] | (quads[:, 1] << 8) | (quads[:, 2] << 16) | (quads[:, 3] << 24)
    info_of_slot = table & xp.uint32(~(0xFF << 12) & 0xFFFFFFFF)
    if xp is jnp:
        info = jnp.zeros(SYMBOLS, jnp.uint32).at[sym].set(info_of_slot)  # every slot of a symbol holds one value
    else:
        info = xp.zeros(SYMBOLS, xp.uint32)
        info[sym] = info_of_slot
    return xp.concatenate([slots, info]).astype(xp.uint32)


def with_symbol_table(table, pairs: bool = False, xp=jnp):
    """A device table (``[..., 4096 (+ 128) (+ 256)]``: slot, coarse and pair tables) with the symbol tables
    after its slot table in place of the coarse table: ``[..., 4096 + 1280 (+ 256)]``."""
    rows = table.reshape(-1, table.shape[-1])
    parts = [rows[:, :TABLE_SIZE], xp.stack([symbol_table(r[:TABLE_SIZE], xp) for r in rows])]
    if pairs:
        parts.append(rows[:, -PAIR_TABLE:])
    out = xp.concatenate(parts, axis=1)
    return out.reshape(table.shape[:-1] + (out.shape[-1],))


def symbol_lookup(table, slot, base=0, gather=None):
    """``(entry, symbol)`` of ``slot`` (uint32), as :func:`rans_step` takes them (the entry
    ``cum | (freq - 1) << 20``), from the symbol tables of the device table that starts at ``base`` in ``table``
    (a kernel's Ref or an array: both gather with ``[]``; a kernel passes ``gather(index)`` for its own loads)."""
    gather = gather or table.__getitem__
    word = gather((slot >> 2).astype(jnp.int32) + (base + TABLE_SIZE))
    sym = (word >> ((slot & 3) << 3)) & 0xFF
    return gather(sym.astype(jnp.int32) + (base + TABLE_SIZE + SYMBOL_SLOTS)), sym


def lookup_name(coarse_bits: int) -> str:
    """The lookup in a kernel's name (``c5``, ``c0``, ``sym``): the name is a symbol of the compiled module,
    where a ``-`` is not allowed."""
    return "sym" if coarse_bits == BY_SYMBOL else f"c{coarse_bits}"


def device_table_size(pairs: bool = False, by_symbol: bool = False) -> int:
    """Entries of a tensor's device table (``jcodec.tensor.host_arrays``): the slot table, then the coarse
    table (bf16-lossless) or the symbol tables (``by_symbol``: int8), then with pair symbols the pair table."""
    return TABLE_SIZE + (SYMBOL_TABLE if by_symbol else COARSE_SIZE) + (PAIR_TABLE if pairs else 0)


def coarse_table(table, xp=jnp, bits: int = COARSE_BITS):
    """Per bucket of ``2^bits`` slots: the packed entry of its only symbol (every slot of a symbol holds the
    same entry), or :data:`MIXED`. ``table`` is the packed slot table (uint32[4096]); works on NumPy
    (``xp=np``) and JAX arrays."""
    t = table.reshape(-1, 1 << bits)
    first = t[:, 0]
    pure = xp.all(t == first[:, None], axis=1)
    return xp.where(pure, first, xp.uint32(MIXED)).astype(xp.uint32)


def exponents_in_place(payload):
    """An escaped pair's 16 bits ``e1 | e2 << 8`` -> ``e1 << 7 | e2 << 23`` (as the pair table holds them)."""
    return ((payload & 0xFF) | ((payload & 0xFF00) << 8)) << 7


def bypass(x, word):
    """``(bits, state)``: the 16 bits coded after an ESC (the state's low half) and the state with ``word``
    shifted in their place (``jcodec.rans.ESC``); ``x`` is renormalised (>= 2^16)."""
    return x & 0xFFFF, (x & jnp.uint32(0xFFFF0000)) | word


def pair_step(sym, x, ptr, word, pair):
    """The rest of a pair symbol's step, after its renormalisation, in the pure-JAX references:
    ``(exponents in place, state, read position)``. ``word``: the lane's word at ``ptr``, ``pair``: the pair
    table's entry for ``sym``; an ESC takes its 16 bits from the state and ``word`` in their place."""
    esc = sym == ESC
    payload, escaped = bypass(x, word)
    return jnp.where(esc, exponents_in_place(payload), pair), jnp.where(esc, escaped, x), ptr + esc.astype(ptr.dtype)


def check_run(run: int, steps: int, carry: int) -> None:
    """A tensor's run length (``jcodec.rans.lane_positions``): a power of two that divides its steps in runs."""
    if run < 1 or run & (run - 1) or (steps - carry) % run:
        raise ValueError(f"{run=} must be a power of two that divides steps - carry = {steps} - {carry}")


def run_positions(k, l, lanes: int, steps: int, run: int, carry: int):
    """The position in its tile of lane ``l``'s value at step ``k`` (int32 arrays, broadcast): ``k * lanes + l``, or
    with runs (``run`` > 1) ``(k // run) * lanes * run + l * run + k % run`` in the first ``steps - carry`` steps
    (``jcodec.rans.lane_positions``)."""
    if run == 1:
        return k * lanes + l
    return jnp.where(k < steps - carry, (k // run) * (lanes * run) + l * run + k % run, k * lanes + l)


def raw_bytes(dtype: str, pairs: bool = False) -> int:
    """Raw bytes per symbol of a float codec dtype: a value's (``RAW_BYTES``), or a pair's two."""
    return PAIR_RAW_BYTES if pairs else RAW_BYTES[dtype]


def bits_dtype(dtype: str, pairs: bool = False):
    """The unsigned container of a symbol's decoded bits: a value's, or (pair symbols) uint32 for two."""
    return jnp.uint32 if pairs else BITS_DTYPE[dtype]


def raw_layout(dtype: str, pairs: bool = False):
    """``(element dtype, elements per symbol)`` of a kernel's ``raw`` array: bytes (``RAW_BYTES`` of them), or
    with pair symbols one uint16 per pair."""
    return (jnp.uint16, 1) if pairs else (jnp.uint8, RAW_BYTES[dtype])


def renormalise(x, word):
    """``(state, need)``: shift the 16-bit ``word`` (uint32) in where the state fell below 2^16."""
    need = x < STATE_LOW
    return jnp.where(need, (x << WORD_BITS) | word, x), need


def join_float(sym, raw, dtype: str, pairs: bool = False):
    """Symbol (exponent byte, uint32) and raw bits (uint32) -> the float's bit pattern (uint32).

    ``raw`` is the raw byte for bfloat16/float16 and the 24-bit little-endian value of the three raw
    bytes for float32 (see ``jcodec.codecs.split_float``). With ``pairs`` (bfloat16) the symbol is both
    exponents in place (``e1 << 7 | e2 << 23``), ``raw`` the pair's bytes ``r1 | r2 << 8``, and the bits
    those of two bfloat16 values (the first in the low half).
    """
    if pairs:
        spread = (raw & 0xFF) | ((raw & 0xFF00) << 8)
        return (spread & 0x007F007F) | ((spread & 0x00800080) << 8) | sym
    if dtype == "bfloat16":  # raw = s mmmmmmm
        return ((raw & 0x80) << 8) | (sym << 7) | (raw & 0x7F)
    if dtype == "float16":  # symbol = high byte
        return (sym << 8) | raw
    if dtype == "float32":  # raw = s + 23 mantissa bits
        return ((raw & 0x800000) << 8) | (sym << 23) | (raw & 0x7FFFFF)
    raise ValueError(f"{dtype=} must be one of bfloat16, float16, float32")


def carried_raw(x_end, j: int, rb: int):
    """Raw bits (uint32, as ``join_float`` takes them) of a lane's carried value ``j`` (0 = the first of its
    last ``carry`` values), read from the lane's end state ``2^(8 rb carry) | R`` (``jcodec.codecs.split_carry``)."""
    return (x_end >> (8 * rb * j)) & ((1 << 8 * rb) - 1)
